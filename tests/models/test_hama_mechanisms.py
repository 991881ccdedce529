"""HAMA's named mechanisms each do something: separate node weights, overlapping windows, fusion across
windows (receptive field), and a masking decision that learns by REINFORCE (issue #17)."""

from __future__ import annotations

import pytest
import torch
from tests.models.test_hama import README_ARCH, README_SCALING, _one_thread  # noqa: F401 (autouse fixture)

import hierseq
from hierseq.models.hama import HAMA, HAMAConfig, WindowGeometry
from hierseq.models.hama_masking import reinforce_loss

README = {**README_ARCH, **README_SCALING}


def build(**extra) -> HAMA:
    torch.manual_seed(0)
    over = {**HAMAConfig.small_overrides(), "input_type": "continuous", "d_input": 3, **extra}
    return HAMA(HAMAConfig(**over)).eval()


def per_node_params(model: HAMA, layer: int) -> int:
    block = model.blocks[layer]
    return sum(p.numel() // p.shape[0] for m in (block.encoder, block.decoder) for p in m.parameters())


# ---------------------------------------------------------------------------------------------- nodes
def test_parameter_count_scales_with_the_node_count() -> None:
    four_two, two_one = build(), build(nodes_per_layer=(2, 1))
    expected = 2 * per_node_params(four_two, 0) + 1 * per_node_params(four_two, 1)
    assert hierseq.count_parameters(four_two) - hierseq.count_parameters(two_one) == expected
    shared, shared_small = build(share_nodes=True), build(share_nodes=True, nodes_per_layer=(2, 1))
    # Shared weights: only the node embeddings and node queries (2 x d_model per node) grow.
    assert hierseq.count_parameters(shared) - hierseq.count_parameters(shared_small) == (2 + 1) * 2 * 32


def test_nodes_receive_different_gradients() -> None:
    model = build().train()
    torch.manual_seed(1)
    model(torch.randn(2, 64, 3)).loss.backward()
    grad = model.blocks[0].encoder.blocks[0].qkv.weight.grad  # [4 nodes, D, 3D]
    assert all(float(g.abs().sum()) > 0 for g in grad)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(grad[i], grad[j], rtol=1e-3, atol=1e-6), f"nodes {i} and {j}"


def test_each_node_uses_its_own_weights() -> None:
    """Giving node 1 the weights of node 0 changes the output: the nodes are not one shared network."""
    model = build(mask_strategy="random")
    x = torch.randn(1, 64, 3)
    with torch.no_grad():
        before = model(x).reconstruction
        for p in model.blocks[0].encoder.parameters():
            p[1] = p[0]
        after = model(x).reconstruction
    window_of_node_1 = slice(8, 16)  # layer 0 windows of 8: window 1 belongs to node 1
    assert not torch.allclose(before[:, window_of_node_1], after[:, window_of_node_1])


def test_windows_overlap_when_nodes_times_partition_exceed_the_length() -> None:
    g = WindowGeometry.of(20, 8, 2, nodes=4)  # 4 * 8 > 20: one segment of 5 per node, windows of 8
    assert g.overlap and g.windows == 4 and g.seg_start.tolist() == [0, 5, 10, 15]
    assert g.win_start.tolist() == [0, 3, 8, 12]
    starts, ends = g.win_start, g.win_start + g.window_length
    assert (starts <= g.seg_start).all() and (ends >= g.seg_start + 5).all(), "every window holds its segment"
    assert (ends[:-1] > starts[1:]).all(), "neighbouring windows overlap"
    assert sorted(g.seg_pos[g.seg_valid].tolist()) == list(range(20)), "segments partition the sequence"
    # A node's encoder sees its neighbours' visible tokens: with the first 2 tokens of every segment
    # hidden, node 1's window (positions 3-10) holds 3, 4 of segment 0 besides its own 7, 8, 9.
    model = build(nodes_per_layer=(4, 2), partition_lengths=(8, 16), mask_strategy="random")
    block = model.blocks[0]
    hidden = torch.zeros(1, 20, dtype=torch.bool)
    hidden[0, [0, 1, 5, 6, 10, 11, 15, 16]] = True
    _, slot_pos, slot_valid = block.fission(torch.randn(1, 20, 32), hidden, block.geometry(20))
    assert slot_pos[0, 1][slot_valid[0, 1]].tolist() == [3, 4, 7, 8, 9]


# --------------------------------------------------------------------------------------------- fusion
def _reach(model: HAMA, x: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """[L] bool: outputs changed by perturbing the first visible input position."""
    with torch.no_grad():
        base = model(x)
        t = int((~base.mask[0]).nonzero()[0])
        moved = x.clone()
        moved[0, t] += 1.0
        return (model(moved).reconstruction - base.reconstruction)[0].abs().amax(-1) > tol


def test_fusion_exchanges_information_across_windows() -> None:
    one_layer = dict(n_layers=1, nodes_per_layer=(4,), partition_lengths=(8,), n_masks=(2,), mask_strategy="random")
    x = torch.randn(1, 64, 3)
    isolated = _reach(build(**one_layer, fusion_tokens=0, decoder_context=0), x)
    assert isolated.sum() <= 8 and not isolated[8:].any(), "without fusion a window only reaches itself"
    assert _reach(build(**one_layer, fusion_tokens=4, decoder_context=0), x).all()
    neighbours = _reach(build(**one_layer, fusion_tokens=0, decoder_context=1), x)
    assert neighbours[:16].all() and not neighbours[16:].any(), "decoder context reaches the next segment only"


def test_receptive_field_covers_the_whole_readme_sequence() -> None:
    """In the README configuration at L = 512, the first visible input token changes every output."""
    torch.manual_seed(0)
    model = HAMA(**README).eval()
    x = torch.randn(1, 512, 256, generator=torch.Generator().manual_seed(0))
    assert _reach(model, x, tol=1e-6).all()


# -------------------------------------------------------------------------------------------- masking
def test_mask_ratio_sets_layer_zero_to_an_mae_fraction() -> None:
    model = build(mask_ratio=0.75, partition_lengths=(16, 16), n_masks=(1, 0))
    assert model.config.layer_plan()[0] == (4, 16, 12)
    assert int(model(torch.randn(2, 64, 3)).mask[0].sum()) == 48
    with pytest.raises(ValueError, match="mask_ratio=1.5: must be null or a number in"):
        HAMAConfig(mask_ratio=1.5)


@pytest.mark.parametrize("reward,sign", [("adversarial", 1.0), ("cooperative", -1.0)])
def test_reinforce_moves_the_policy_towards_the_reward(reward: str, sign: float) -> None:
    """Two hidden tokens, one with a large and one with a small reconstruction error: a gradient step
    on the surrogate raises the logit of the hard one (adversarial, AdaMAE) or of the easy one."""
    logits = torch.zeros(1, 4, requires_grad=True)
    hidden = torch.tensor([[True, True, False, False]])
    log_prob = torch.log_softmax(logits, -1) * hidden
    error = torch.tensor([[2.0, 0.5, 1.0, 1.0]])
    reinforce_loss(log_prob, hidden, torch.arange(4)[None], error, reward).backward()
    step = -logits.grad[0]
    assert sign * (step[0] - step[1]) > 0


def test_the_masking_decision_learns_only_through_the_policy_gradient() -> None:
    """No straight-through path: the reconstruction loss alone gives the scorer no gradient; the
    REINFORCE term (aux_loss, training only) does."""
    model = build().train()
    torch.manual_seed(2)
    out = model(torch.randn(2, 48, 3))
    scorer = [p for b in model.blocks for p in b.masker.parameters()]
    recon_grads = torch.autograd.grad(out.loss - out.aux_loss, scorer, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in recon_grads)
    policy_grads = torch.autograd.grad(out.aux_loss, scorer)
    assert all(float(g.abs().sum()) > 0 for g in policy_grads)
    model.eval()
    with torch.no_grad():
        assert float(model(torch.randn(2, 48, 3)).aux_loss) == 0.0


def test_training_masks_are_sampled_from_the_policy() -> None:
    model = build().train()
    x = torch.randn(1, 64, 3)
    masks = {tuple(model(x).mask[0].tolist()) for _ in range(4)}
    assert len(masks) > 1, "the training mask does not vary: no exploration for REINFORCE"
