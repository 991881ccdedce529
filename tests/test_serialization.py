"""save / load: exact round trips, safetensors + JSON only, and clear errors for damaged directories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hierseq

V = 32


def small_transformer(seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    base = hierseq.get_entry("transformer").config_cls.small_overrides()
    return hierseq.build_model("transformer", **{**base, "vocab_size": V, **overrides}).eval()


def tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(24).remainder(V).view(2, 12)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path: Path, tie: bool) -> None:
    model = small_transformer(tie_embeddings=tie)
    # Move weights off their init so the test cannot pass by re-initialising identically.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hierseq.save(model, tmp_path / "m")
    loaded = hierseq.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(logits(loaded.eval()), logits(model))
    assert tied_groups(loaded) == tied_groups(model)
    assert bool(tied_groups(model)) == tie


def test_directory_holds_only_json_and_safetensors(tmp_path: Path) -> None:
    hierseq.save(small_transformer(), tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]  # no temporary leftovers, no pickle files
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "hierseq-transformer" and config["vocab_size"] == V  # not transformers' names
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "embed.weight" in header or "lm_head.weight" in header


def test_saving_again_overwrites_cleanly(tmp_path: Path) -> None:
    hierseq.save(small_transformer(seed=0), tmp_path / "m")
    second = small_transformer(seed=1)
    hierseq.save(second, tmp_path / "m")
    assert torch.equal(logits(hierseq.load(tmp_path / "m")), logits(second))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_only_registered_models_can_be_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model=Linear: only registered hierseq models"):
        hierseq.save(nn.Linear(2, 2), tmp_path / "m")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return hierseq.save(small_transformer(), tmp_path / "m")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hierseq.load(tmp_path / "nothing_here")


def test_missing_config(saved: Path) -> None:
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        hierseq.load(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        hierseq.load(saved)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_weights(saved: Path, keep: float) -> None:
    path = saved / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match="model.safetensors: unreadable or truncated"):
        hierseq.load(saved)


def test_corrupt_json(saved: Path) -> None:
    (saved / "config.json").write_text('{"model_type": "transformer", "d_model": ')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        hierseq.load(saved)


@pytest.mark.parametrize("content", ["[1, 2]", '{"d_model": 32}'])
def test_config_without_model_type(saved: Path, content: str) -> None:
    (saved / "config.json").write_text(content)
    with pytest.raises(ValueError, match="must be a JSON object with a 'model_type' field"):
        hierseq.load(saved)


def test_config_of_an_unknown_model(saved: Path) -> None:
    (saved / "config.json").write_text('{"model_type": "no_such_model"}')
    with pytest.raises(ValueError, match="model='no_such_model': unknown model"):
        hierseq.load(saved)


def test_weights_of_another_width(saved: Path, tmp_path: Path) -> None:
    other = hierseq.save(small_transformer(d_model=64), tmp_path / "wide")
    (saved / "config.json").write_text((other / "config.json").read_text())
    with pytest.raises(ValueError, match="has shape .* config needs"):
        hierseq.load(saved)


def test_weights_of_another_depth(saved: Path, tmp_path: Path) -> None:
    other = hierseq.save(small_transformer(n_layers=3), tmp_path / "deep")
    (saved / "config.json").write_text((other / "config.json").read_text())
    with pytest.raises(ValueError, match="weights do not match the config \\(missing: \\['blocks.2"):
        hierseq.load(saved)


def test_unexpected_extra_tensor(saved: Path) -> None:
    state = load_file(str(saved / "model.safetensors"))
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected: \\['extra.weight'\\]"):
        hierseq.load(saved)


# ------------------------------------------------------------------------------------------ issue 20
def test_a_header_edited_to_another_dtype_is_refused(saved: Path) -> None:
    path = saved / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    assert b'"F32"' in header
    # F32 -> I32 has the same byte size, so the file stays valid and its data would read as garbage integers.
    path.write_bytes(raw[:8] + header.replace(b'"F32"', b'"I32"', 1) + raw[8 + n :])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' is stored as int32, the model's is float32"):
        hierseq.load(saved)


def test_weights_stored_in_another_float_precision_are_cast(saved: Path) -> None:
    model = hierseq.load(saved)
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(str(saved / "model.safetensors")).items()},
        str(saved / "model.safetensors"),
    )
    loaded = hierseq.load(saved)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name


def test_directories_of_older_versions_still_load(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "hierseq-transformer"
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "transformer"}))  # before the prefix
    assert hierseq.load(saved).config.model_type == "transformer"


def test_a_failed_save_keeps_the_previous_files(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def full_disk(model: nn.Module, path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hierseq.serialization.save_model", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hierseq.save(small_transformer(seed=5, d_model=64), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temporary file, nothing replaced


def test_saving_something_that_is_not_a_hierseq_model_is_one_line(tmp_path: Path) -> None:
    class Foreign(nn.Module):
        config = {"model_type": "transformer"}  # a config, but not a hierseq one

    with pytest.raises(ValueError, match="^model=Foreign: only registered hierseq models can be saved$"):
        hierseq.save(Foreign(), tmp_path / "m")
    assert not (tmp_path / "m").exists()
