"""hierseq.generate: shapes, ragged prompts, sampling rules, seeding, eos, streaming and argument errors.

The cached-greedy == full-forward property is checked for every causal LM in the conformance suite;
here the transformer control (through the registry) exercises the generation logic itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import hierseq
from hierseq.generation import sample_next_token

V = 32


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    overrides = hierseq.get_entry("transformer").config_cls.small_overrides()
    return hierseq.build_model("transformer", vocab_size=V, **overrides).eval()


def prompts_tensor(batch: int = 3, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_tensor_prompts_give_tensor_with_prompt_kept(model: torch.nn.Module) -> None:
    prompt = prompts_tensor()
    out = hierseq.generate(model, prompt, 7, seed=0)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < V


def test_zero_new_tokens_returns_the_prompt(model: torch.nn.Module) -> None:
    prompt = prompts_tensor()
    assert torch.equal(hierseq.generate(model, prompt, 0), prompt)
    assert [t.tolist() for t in hierseq.generate(model, [[1, 2], [3]], 0)] == [[1, 2], [3]]


def test_ragged_prompts_match_generating_each_alone(model: torch.nn.Module) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12], [13], torch.tensor([14, 15, 16, 17, 18, 19])]
    out = hierseq.generate(model, prompts, 9, temperature=0)
    assert isinstance(out, list) and len(out) == len(prompts)
    for prompt, row in zip(prompts, out):
        prompt = torch.as_tensor(prompt)
        alone = hierseq.generate(model, prompt[None], 9, temperature=0)[0]
        assert row.shape == (len(prompt) + 9,)
        assert torch.equal(row, alone)
        assert torch.equal(row[: len(prompt)], prompt)


def test_same_seed_same_output_and_global_rng_untouched(model: torch.nn.Module) -> None:
    prompt = prompts_tensor()
    rng_before = torch.get_rng_state()
    a = hierseq.generate(model, prompt, 20, temperature=1.0, seed=7)
    b = hierseq.generate(model, prompt, 20, temperature=1.0, seed=7)
    c = hierseq.generate(model, prompt, 20, temperature=1.0, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_and_tiny_top_p_are_greedy(model: torch.nn.Module) -> None:
    prompt = prompts_tensor()
    greedy = hierseq.generate(model, prompt, 15, temperature=0)
    assert torch.equal(hierseq.generate(model, prompt, 15, temperature=1.5, top_k=1, seed=1), greedy)
    assert torch.equal(hierseq.generate(model, prompt, 15, temperature=1.5, top_p=1e-6, seed=2), greedy)
    # High temperature without truncation does leave the greedy path (so the two lines above are not vacuous).
    assert not torch.equal(hierseq.generate(model, prompt, 15, temperature=1.5, seed=1), greedy)


def test_sample_next_token_respects_top_k_and_top_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # order by probability: 1, 3, 2, 0
    logits = probs.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)

    def used(**kwargs: float) -> set[int]:
        return set(sample_next_token(logits, generator=gen, **kwargs).tolist())

    assert used(top_k=2) == {1, 3}
    assert used(top_p=0.35) == {1}  # 0.4 alone already reaches 0.35
    assert used(top_p=0.5) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert used(top_p=0.75) == {1, 3, 2}
    assert used(top_p=1.0) == {0, 1, 2, 3}
    assert used(top_k=3, top_p=0.5) == {1, 3}
    assert sample_next_token(logits[:2], temperature=0).tolist() == [1, 1]


def test_sample_next_token_frequencies_follow_temperature() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log().expand(40000, 4)
    gen = torch.Generator().manual_seed(1)
    for temperature in (1.0, 0.5):
        tokens = sample_next_token(logits, temperature=temperature, generator=gen)
        freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
        expected = (probs.log() / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.01), (temperature, freq, expected)


def test_eos_stops_rows(model: torch.nn.Module) -> None:
    prompt = prompts_tensor(batch=3, length=4, seed=3)
    n_new = 12
    free = hierseq.generate(model, prompt, n_new, temperature=0)
    eos = int(free[0, 4 + 2])  # row 0 emits this token at its third step
    stopped = hierseq.generate(model, prompt, n_new, temperature=0, eos_id=eos)
    # Tensor form: identical up to and including each row's first eos, eos afterwards.
    expected = free.clone()
    for b in range(3):
        hits = (free[b, 4:] == eos).nonzero()
        if hits.numel():
            expected[b, 4 + int(hits[0]) + 1 :] = eos
    assert torch.equal(stopped, expected)
    # List form: each row ends at its first eos.
    rows = hierseq.generate(model, list(prompt), n_new, temperature=0, eos_id=eos)
    first_eos = int((free[0, 4:] == eos).nonzero()[0])
    assert rows[0].tolist() == free[0, : 4 + first_eos + 1].tolist() and rows[0][-1] == eos
    for b in range(3):
        row = rows[b].tolist()
        assert row == expected[b, : len(row)].tolist()
        assert eos not in row[4:-1]


def test_callback_streams_every_token_in_eval_no_grad(model: torch.nn.Module) -> None:
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    seen: list[tuple[int, list[int], bool, bool]] = []

    def callback(step: int, tokens: torch.Tensor) -> None:
        assert tokens.shape == (3,)
        seen.append((step, tokens.tolist(), torch.is_grad_enabled(), model.training))

    model.train()
    try:
        out = hierseq.generate(model, prompts, 6, temperature=0, callback=callback)
        assert model.training, "training mode was not restored"
    finally:
        model.eval()
    assert [s[0] for s in seen] == list(range(6))
    assert not any(s[2] or s[3] for s in seen), "generation must run under no_grad and in eval mode"
    for b, row in enumerate(out):
        assert [s[1][b] for s in seen] == row[len(prompts[b]) :].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens=2.5"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"temperature": math.nan}, "temperature=nan"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"eos_id": V}, f"eos_id={V}"),
        ({"seed": "x"}, "seed='x'"),
        ({"prompts": []}, "prompts=\\[\\]"),
        ({"prompts": [[1, 2], []]}, "prompts\\[1\\]"),
        ({"prompts": torch.zeros(2, 0, dtype=torch.long)}, "prompts=\\(2, 0\\)"),
        ({"prompts": torch.zeros(4, dtype=torch.long)}, "prompts=\\(4,\\)"),
        ({"prompts": torch.tensor([[1, V]])}, "input_ids"),
        ({"prompts": [[1, 2], [-1]]}, "input_ids"),
    ],
)
def test_argument_errors(model: torch.nn.Module, kwargs: dict, message: str) -> None:
    arguments = {"prompts": prompts_tensor(), "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        hierseq.generate(model, **arguments)


def test_float_prompt_is_rejected_by_the_model(model: torch.nn.Module) -> None:
    with pytest.raises(TypeError, match="input_ids"):
        hierseq.generate(model, prompts_tensor().float(), 3)
