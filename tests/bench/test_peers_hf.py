"""The transformers peers of ``hierseq bench speed --peers`` compute what ours compute: HF's pure-PyTorch
gated delta rule (Qwen3-Next) and Mamba-2 SSD agree with our ops in values, final states and input
gradients at tiny shapes (several chunks and a padded last one), HF's whole ``Mamba2Mixer`` with our
mixer's weights agrees with our ``mamba2`` mixer, and the equality check does catch a wrong mapping."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from hierseq.bench import peers as peers_mod

pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")

TOL = peers_mod.CHECK_TOLERANCE
CPU = torch.device("cpu")


def _gdr_case(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    return peers_mod.gated_delta_rule_inputs(batch=2, heads=2, length=37, key_dim=16, value_dim=8, seed=seed)


def _ssd_case(groups: int = 2) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    return peers_mod.ssd_inputs(batch=2, length=37, heads=4, headdim=8, groups=groups, d_state=6, seed=1)


def _gdr(chunk: int = 16):
    return (
        lambda *a: peers_mod.ours_gated_delta_rule(*a, chunk_size=chunk),
        lambda *a: peers_mod.hf_gated_delta_rule(*a, chunk_size=chunk),
    )


def _ssd(chunk: int = 16):
    return (
        lambda *a: peers_mod.ours_ssd(*a, chunk_size=chunk),
        lambda *a: peers_mod.hf_ssd(*a, chunk_size=chunk),
    )


def test_gated_delta_rule_matches_hf_in_values_state_and_grads() -> None:
    inputs, weights = _gdr_case()
    agree = peers_mod.agreement(*_gdr(), inputs, weights, length=37)
    assert agree.ok and agree.max_abs_diff < TOL, agree
    # every tensor was compared: the gradients of all five inputs are there and non-zero
    found = peers_mod.fwd_bwd_results(_gdr()[1], inputs, weights)
    assert set(found) == {"output", "final state", "d q", "d k", "d v", "d beta", "d g"}
    assert all(t.abs().max() > 0 for t in found.values())


def test_hf_in_kernel_l2_norm_equals_ours_only_with_our_norm_in_the_graph() -> None:
    """On unit vectors HF's in-kernel L2 norm leaves the values as they are but not d q, d k (its Jacobian
    projects them onto the tangent plane): the peer keeps it off; on, ours must normalise too."""
    from transformers.models.qwen3_next import modeling_qwen3_next

    inputs, weights = _gdr_case(seed=3)
    hf = inspect.unwrap(modeling_qwen3_next.torch_chunk_gated_delta_rule)

    def hf_normed(q, k, v, beta, g):
        t = [x.transpose(1, 2) for x in (q, k, v, g, beta)]
        o, s = hf(*t, chunk_size=16, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o.transpose(1, 2), s

    def ours_normed(q, k, *rest):
        return _gdr()[0](F.normalize(q, dim=-1), F.normalize(k, dim=-1), *rest)

    ours, theirs = (
        peers_mod.fwd_bwd_results(_gdr()[0], inputs, weights),
        peers_mod.fwd_bwd_results(hf_normed, inputs, weights),
    )
    assert (ours["output"] - theirs["output"]).abs().max() < TOL
    assert (ours["d q"] - theirs["d q"]).abs().max() > 100 * TOL
    assert peers_mod.agreement(ours_normed, hf_normed, inputs, weights, length=37).ok


def test_ssd_matches_hf_chunk_scan_in_values_state_and_grads() -> None:
    pytest.importorskip("hierseq.ops.ssd", reason="our SSD op is not in this checkout")
    for groups in (1, 2):
        inputs, weights = _ssd_case(groups)
        agree = peers_mod.agreement(*_ssd(), inputs, weights, length=37)
        assert agree.ok and agree.max_abs_diff < TOL, (groups, agree)


def _hf_mixer_from(ours):
    """HF ``Mamba2Mixer`` with the shapes and weights of our ``mamba2`` mixer (same layouts: in_proj rows
    [z, xBC, dt], conv1d [C, 1, K] with bias, the gated RMSNorm's weight, eps 1e-5, norm after the gate)."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = ours.cfg
    config = Mamba2Config(
        hidden_size=ours.d_model,
        num_heads=ours.n_heads,
        head_dim=cfg.headdim,
        expand=cfg.expand,
        state_size=cfg.d_state,
        n_groups=cfg.ngroups,
        conv_kernel=cfg.d_conv,
        chunk_size=cfg.chunk_size,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
    )
    theirs = Mamba2Mixer(config, layer_idx=0)
    with torch.no_grad():
        for mine, hf in [
            (ours.in_proj.weight, theirs.in_proj.weight),
            (ours.conv.weight, theirs.conv1d.weight),
            (ours.conv.bias, theirs.conv1d.bias),
            (ours.dt_bias, theirs.dt_bias),
            (ours.A_log, theirs.A_log),
            (ours.D, theirs.D),
            (ours.norm_weight, theirs.norm.weight),
            (ours.out_proj.weight, theirs.out_proj.weight),
        ]:
            assert mine.shape == hf.shape
            hf.copy_(mine)
    return theirs


def test_mamba2_mixer_matches_hf_mixer_with_our_weights() -> None:
    mamba2 = pytest.importorskip("hierseq.mixers.mamba2", reason="our mamba2 mixer is not in this checkout")
    torch.manual_seed(0)
    ours = mamba2.Mamba2(32, mamba2.Mamba2MixerConfig(headdim=16, d_state=8, ngroups=2, chunk_size=16)).train()
    theirs = _hf_mixer_from(ours).train()  # training, no cache: HF's torch path (mamba_ssm's fused kernel off)
    x = torch.randn(2, 37, 32)
    results = []
    for module, run in ((ours, lambda t: ours(t)[0]), (theirs, theirs)):
        xin = x.clone().requires_grad_()
        y = run(xin)
        y.pow(2).mean().backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((y.detach(), xin.grad, grads))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert (y0 - y1).abs().max() < TOL and (dx0 - dx1).abs().max() < TOL
    pairs = {"in_proj.weight": "in_proj.weight", "conv.weight": "conv1d.weight", "conv.bias": "conv1d.bias"}
    pairs |= {"norm_weight": "norm.weight"} | {n: n for n in ("dt_bias", "A_log", "D", "out_proj.weight")}
    for mine, hf in pairs.items():
        assert (g0[mine] - g1[hf]).abs().max() < TOL, mine


def test_wrong_mappings_are_detected() -> None:
    from hierseq.ops.delta_rule import gated_delta_rule_chunked

    inputs, weights = _gdr_case()
    hf = _gdr()[1]
    unscaled = peers_mod.agreement(gated_delta_rule_chunked, hf, inputs, weights, length=37)  # q not * dk^-0.5
    assert not unscaled.ok and unscaled.max_scaled_diff > 100 * TOL
    transposed = peers_mod.agreement(
        lambda q, k, v, beta, g: hf(k, q, v, beta, g), hf, inputs, weights, length=37
    )  # q and k swapped
    assert not transposed.ok

    def nan_op(*args):
        o, s = hf(*args)
        return o * math.nan, s

    assert not peers_mod.agreement(hf, nan_op, inputs, weights, length=37).ok  # NaN never passes


def test_wrong_ssd_mapping_is_detected() -> None:
    pytest.importorskip("hierseq.ops.ssd", reason="our SSD op is not in this checkout")
    from transformers.models.mamba2 import modeling_mamba2

    hf = inspect.unwrap(modeling_mamba2.mamba2_chunk_scan)
    inputs, weights = _ssd_case()

    def softplus_twice(x, dt, A, B, C, D):  # dt passed as if before the softplus
        return hf(x, dt, A, B, C, 16, D=D, dt_softplus=True, return_final_states=True)

    agree = peers_mod.agreement(_ssd()[0], softplus_twice, inputs, weights, length=37)
    assert not agree.ok and agree.max_scaled_diff > 100 * TOL


def _gdn_config() -> dict:
    return {"d_model": 32, "n_layers": 1, "n_heads": 2, "chunk_size": 16}


def test_run_peers_rows_carry_the_difference_and_the_times() -> None:
    (peer,) = peers_mod.select_peers(["hf-gated-delta-rule"])
    result = peers_mod.run_peers([peer], {"gated_deltanet": _gdn_config()}, [24], 32, 1, 1, CPU, 1e9)
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["check_length"] == 24 and row["max_abs_diff"] < TOL
    assert row["ours_fwd_bwd_ms"] > 0 and row["peer_fwd_bwd_ms"] > 0
    assert "max abs diff" in row["compared"] and result["notes"] == []


def test_a_peer_that_differs_is_not_timed() -> None:
    def wrong(shape):
        from hierseq.ops.delta_rule import gated_delta_rule_chunked

        inputs, weights = _gdr_case()
        return peers_mod.agreement(gated_delta_rule_chunked, _gdr()[1], inputs, weights, length=37)

    def never(shape):
        raise AssertionError("a peer that differs must not be built for timing")

    peer = peers_mod.Peer("wrong", "torch", "torch", "gated_deltanet", "x", "y", never, check=wrong)
    (row,) = peers_mod.run_peers([peer], {"gated_deltanet": _gdn_config()}, [24], 32, 1, 1, CPU, 1e9)["rows"]
    assert row["status"].startswith("differs from ours") and "not timed" in row["status"]
    assert row["max_scaled_diff"] > TOL and "ours_fwd_bwd_ms" not in row


def test_missing_hf_peer_points_at_the_hf_extra(monkeypatch) -> None:
    peer = peers_mod.Peer("gone", "gone", "hierseq_no_such_module", None, "x", "y", None, hint=peers_mod.HF_HINT)
    (note,) = peers_mod.run_peers([peer], {}, [8], 8, 1, 1, CPU, 1e9)["notes"]
    assert note["status"] == "not installed: pip install hierseq[hf]"
    monkeypatch.setattr(peers_mod, "PEERS", [peer])
    with pytest.raises(ValueError, match=r"hierseq\[hf\]"):
        peers_mod.select_peers(True)
