"""The seq_regression contract, checked for every model registered with ``kind="seq_regression"``.

``model(x [B, T, D_in], targets=None, target_mask=None) -> SeqRegressionOutput(prediction [B, n, D_out],
loss)`` with n = T // chunk_size (``remainder="drop"``), prediction k made after input step
(k + 1) * C - 1. Models are built through the registry at ``small_overrides()`` size. Each check also
runs with every level kind the model offers (mamba / lstm / transformer), since a choice a user can make
must honour the contract too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hierseq


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small ops: one intra-op thread avoids spin contention on a busy 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: config fields that pick a sequence mixer, per model; each is checked with every kind.
LEVEL_FIELDS = ("low_level", "high_level", "backbone")
KINDS = ("mamba", "lstm", "transformer")


def variants(name: str) -> list[dict]:
    """small_overrides plus, for every level field the model has, each kind in turn (others default)."""
    base = hierseq.get_entry(name).config_cls.small_overrides()
    fields = [f for f in LEVEL_FIELDS if f in hierseq.get_entry(name).config_cls.field_names()]
    out = [dict(base)]
    for f in fields:
        out += [{**base, f: k} for k in KINDS if k != getattr(hierseq.build_config(name, **base), f)]
    return out


def build(name: str, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hierseq.build_model(name, **over).eval()


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).prediction


@pytest.fixture
def models(seq_regression_name: str) -> list[tuple[dict, torch.nn.Module]]:
    return [(over, build(seq_regression_name, **over)) for over in variants(seq_regression_name)]


def test_shapes_including_t_not_a_multiple_of_chunk(models) -> None:
    for over, model in models:
        c, d_in, d_out = model.config.chunk_size, model.config.d_in, model.config.d_out
        for length in (c, 2 * c + 1, 3 * c - 1, 5 * c):
            for batch in (1, 3):
                pred = predict(model, rand(batch, length, d_in, seed=length))
                assert pred.shape == (batch, length // c, d_out), f"{over}: T={length}: {tuple(pred.shape)}"
                assert torch.isfinite(pred).all()


def test_causal_at_chunk_granularity(models) -> None:
    """Changing input step t leaves every prediction of a chunk that finished before t unchanged, and
    changes the prediction of the chunk containing t."""
    for over, model in models:
        c, d_in = model.config.chunk_size, model.config.d_in
        length = 5 * c
        x = rand(1, length, d_in, seed=1)
        base = predict(model, x)
        for t in (0, c - 1, c, 2 * c + 1, length - 1):
            x2 = x.clone()
            x2[:, t] += 2.0
            pred = predict(model, x2)
            k = t // c  # the chunk containing t
            assert torch.equal(pred[:, :k], base[:, :k]), f"{over}: step {t} changed predictions of earlier chunks"
            assert (pred[:, k] - base[:, k]).abs().max() > 1e-6, f"{over}: step {t} did not change chunk {k}"


def test_streaming_equals_batch(models) -> None:
    for over, model in models:
        c, d_in = model.config.chunk_size, model.config.d_in
        x = rand(2, 4 * c + 3, d_in, seed=2)
        full = predict(model, x)
        stream = model.stream(2)
        cuts = [0, 1, c - 1, c + 2, 2 * c, 2 * c + 1, 4 * c + 3]
        pieces = [stream.push(x[:, a:b]) for a, b in zip(cuts, cuts[1:])]
        assert all(p.shape[0] == 2 for p in pieces)
        assert [p.shape[1] for p in pieces] == [(b // c) - (a // c) for a, b in zip(cuts, cuts[1:])]
        streamed = torch.cat(pieces + [stream.flush()], dim=1)
        torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5, msg=f"{over}: streaming != batch")


def test_save_load_round_trip(seq_regression_name: str, tmp_path: Path) -> None:
    for i, over in enumerate(variants(seq_regression_name)):
        model = build(seq_regression_name, **over)
        hierseq.save(model, tmp_path / str(i))
        loaded = hierseq.load(tmp_path / str(i)).eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        x = rand(2, 3 * model.config.chunk_size + 1, model.config.d_in, seed=3)
        assert torch.equal(predict(loaded, x), predict(model, x)), f"{over}: loaded model differs"


def test_deterministic(seq_regression_name: str) -> None:
    for over in variants(seq_regression_name):
        a, b = build(seq_regression_name, seed=5, **over), build(seq_regression_name, seed=5, **over)
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), f"{over}: {name} differs between seeded builds"
        x = rand(2, 2 * a.config.chunk_size, a.config.d_in, seed=4)
        assert torch.equal(predict(a, x), predict(b, x)) and torch.equal(predict(a, x), predict(a, x))


def test_batch_independent(models) -> None:
    for _over, model in models:
        x = rand(3, 3 * model.config.chunk_size, model.config.d_in, seed=6)
        batched = predict(model, x)
        for b in range(3):
            torch.testing.assert_close(batched[b : b + 1], predict(model, x[b : b + 1]), rtol=1e-5, atol=1e-6)


def test_loss_is_masked_mse(models) -> None:
    for _over, model in models:
        c, d_in, d_out = model.config.chunk_size, model.config.d_in, model.config.d_out
        x = rand(2, 3 * c, d_in, seed=7)
        targets = rand(2, 3, d_out, seed=8)
        mask = torch.tensor([[True, False, True], [False, False, True]])
        with torch.no_grad():
            out = model(x, targets=targets, target_mask=mask)
            no_mask = model(x, targets=targets)
        err = (out.prediction - targets).pow(2)
        expected = err[mask].mean()
        torch.testing.assert_close(out.loss, expected)
        torch.testing.assert_close(no_mask.loss, err.mean())
        assert model(x).loss is None


def test_bad_inputs_raise_clear_errors(seq_regression_name: str) -> None:
    model = build(seq_regression_name, **hierseq.get_entry(seq_regression_name).config_cls.small_overrides())
    c, d_in, d_out = model.config.chunk_size, model.config.d_in, model.config.d_out
    good = rand(2, 2 * c, d_in)
    cases = {
        "integer dtype": (good.long(), None, "x"),
        "rank 2": (good[0], None, "x"),
        "wrong D_in": (rand(2, 2 * c, d_in + 1), None, "x"),
        "batch 0": (good[:0], None, "x"),
        "length 0": (good[:, :0], None, "x"),
        "shorter than a chunk": (good[:, : c - 1], None, "x"),
        "targets shape": (good, rand(2, 3, d_out), "targets"),
    }
    for what, (x, targets, name) in cases.items():
        with pytest.raises((ValueError, TypeError), match=name):
            model(x, targets=targets)
            raise AssertionError(f"{what}: no error")
    with pytest.raises(ValueError, match="target_mask"):
        model(good, targets=rand(2, 2, d_out), target_mask=torch.ones(2, 3, dtype=torch.bool))


def test_gradients_reach_every_parameter(models) -> None:
    for over, model in models:
        model.train()
        c = model.config.chunk_size
        x = rand(2, 3 * c, model.config.d_in, seed=9)
        model(x, targets=rand(2, 3, model.config.d_out, seed=10)).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{over}: no gradient reached {name}"
            assert torch.isfinite(p.grad).all(), f"{over}: non-finite gradient in {name}"
            assert torch.count_nonzero(p.grad) > 0, f"{over}: all-zero gradient in {name}"
