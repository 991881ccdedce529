"""hierseq.hf: every causal LM as a transformers AutoModelForCausalLM.

For every registered causal LM: Auto* registration, config mapping both ways, save_pretrained /
from_pretrained (and native directories) giving identical logits with tied weights kept tied, greedy
generate() == hierseq.generate token for token, seeded sampling (temperature, top-k, top-p) == hierseq's,
incremental decoding (the native model sees only the new token after the prefill), left-padded batches,
beam search with and without the cache, and a constant-size state for recurrent models.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import hierseq

transformers = pytest.importorskip("transformers", reason="the optional 'hf' extra (transformers) is not installed")
hf = pytest.importorskip("hierseq.hf")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

CAUSAL_LMS = hierseq.list_models(kind="causal_lm")
# Models whose decoding state is a fixed-size recurrent state (no KV cache growing with the prompt).
RECURRENT = [name for name in ("mamba", "hamt", "linear_attn") if name in CAUSAL_LMS]
V = 256


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tiny models here are all small ops: intra-op threads only spin against each other on a
    # shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_native(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = hierseq.get_entry(name).config_cls.small_overrides()
    return hierseq.build_model(name, **{**config, **overrides}).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


class LengthRecorder:
    """Forward pre-hook on the native model recording the length of every input it receives."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.lengths.append(int(args[0].shape[1]))

    def remove(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------ core stays light
def test_import_hierseq_does_not_import_transformers() -> None:
    code = (
        "import sys, hierseq, hierseq.generation; hierseq.list_models(); "
        "hierseq.build_model('transformer', d_model=32, n_layers=1, n_heads=2); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'huggingface_hub')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ registration / config
def test_every_causal_lm_is_registered_with_auto_classes() -> None:
    assert hf.register_all() == sorted(f"hierseq-{name}" for name in CAUSAL_LMS)
    assert hf.register_all() == sorted(f"hierseq-{name}" for name in CAUSAL_LMS)  # idempotent
    for name in CAUSAL_LMS:
        config = AutoConfig.for_model(f"hierseq-{name}")
        assert type(config) is hf.config_class_for(name)
        assert config.to_native() == hierseq.get_entry(name).config_cls()  # same defaults
        assert AutoModelForCausalLM._model_mapping[type(config)] is hf.model_class_for(name)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_config_maps_both_ways(name: str) -> None:
    native = hierseq.build_config(name, **hierseq.get_entry(name).config_cls.small_overrides())
    config = hf.config_class_for(name).from_native(native, eos_token_id=10)
    assert config.model_type == f"hierseq-{name}"
    assert config.to_native() == native
    assert config.eos_token_id == 10
    assert config.hidden_size == native.d_model and config.num_hidden_layers == native.n_layers
    rebuilt = type(config).from_dict(config.to_dict())
    assert rebuilt.to_native() == native


def test_config_validates_with_native_rules() -> None:
    with pytest.raises(ValueError, match="n_layers=0"):
        hf.config_class_for("transformer")(n_layers=0)
    with pytest.raises(ValueError, match="not a hierseq causal LM"):
        hf.config_class_for("hama")


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_save_pretrained_round_trip_gives_identical_logits(name: str, tmp_path: Path) -> None:
    native = small_native(name)
    model = hf.wrap(native).eval()
    ids = tokens(2, 11)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, native(ids).logits)  # the wrapper adds nothing to the forward
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is hf.model_class_for(name)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # Tied parameters: stored once, shared again after loading, declared to transformers.
    tied = hf._shared_parameter_map(model)
    assert tied == hf._shared_parameter_map(loaded) == loaded.all_tied_weights_keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert stored.isdisjoint(tied) and set(tied.values()) <= stored


def test_untied_native_config_saves_both_matrices(tmp_path: Path) -> None:
    model = hf.wrap(small_native("transformer", tie_embeddings=False))
    assert model.all_tied_weights_keys == {}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.lm_head.weight is not loaded.model.embed.weight
    assert torch.equal(loaded.model.lm_head.weight, model.model.lm_head.weight)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_native_directory_loads(name: str, tmp_path: Path) -> None:
    native = small_native(name, seed=3)
    hierseq.save(native, tmp_path)
    ids = tokens(1, 9)
    expected = native(ids).logits.detach()
    with torch.no_grad():
        assert torch.equal(hf.from_native(tmp_path).eval()(ids).logits, expected)
        # The model class also reads a native config.json (model_type without the prefix).
        assert torch.equal(hf.model_class_for(name).from_pretrained(tmp_path).eval()(ids).logits, expected)


# ------------------------------------------------------------------------------------------ forward contract
def test_labels_follow_the_transformers_convention() -> None:
    model = hf.wrap(small_native("transformer"))
    ids = tokens(2, 9)
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert model(ids, labels=ids, return_dict=False)[0].item() == pytest.approx(out.loss.item())


def test_forward_refuses_padding_and_unknown_inputs() -> None:
    model = hf.wrap(small_native("mamba"))
    ids = tokens(2, 5)
    mask = torch.ones_like(ids)
    assert torch.equal(model(ids, attention_mask=mask).logits, model(ids).logits)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        model(ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model(ids, output_hidden_states=True)
    with pytest.raises(TypeError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_greedy_generate_equals_hierseq_and_is_incremental(name: str) -> None:
    native = small_native(name)
    model = hf.wrap(native).eval()
    prompt = tokens(2, 7)
    expected = hierseq.generate(native, prompt, max_new_tokens=6, temperature=0)
    recorder = LengthRecorder(native)
    try:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    finally:
        recorder.remove()
    assert torch.equal(out.sequences, expected)
    # One prefill over the prompt, then one token per step (the last token is never fed back).
    assert recorder.lengths == [7, 1, 1, 1, 1, 1]
    assert isinstance(out.cache, hf.HierseqCache) and out.cache.get_seq_length() == 12


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_seeded_sampling_equals_hierseq(name: str) -> None:
    native = small_native(name)
    model = hf.wrap(native).eval()
    prompt = tokens(2, 5)
    settings = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
    expected = hierseq.generate(native, prompt, max_new_tokens=8, seed=123, **settings)
    torch.manual_seed(123)  # transformers samples from the global generator; hierseq seeds a local one alike
    out = model.generate(prompt, max_new_tokens=8, do_sample=True, **settings)
    assert torch.equal(out, expected)
    torch.manual_seed(124)
    assert not torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=True, **settings), expected)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_left_padded_batch_equals_unpadded_rows(name: str) -> None:
    native = small_native(name)
    model = hf.wrap(native).eval()
    rows = [tokens(1, 4, seed=5)[0], tokens(1, 7, seed=6)[0], tokens(1, 4, seed=7)[0]]
    pad = 0
    ids = torch.full((3, 7), pad)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row) :] = row
        mask[i, 7 - len(row) :] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    expected = hierseq.generate(native, rows, max_new_tokens=5, temperature=0)
    assert out.shape == (3, 12)
    for i, row in enumerate(expected):
        assert torch.equal(out[i, 7 - len(rows[i]) :], row)
        assert torch.equal(out[i, : 7 - len(rows[i])], torch.full((7 - len(rows[i]),), pad))


def test_padded_batch_pads_rows_that_stop_early_and_rejects_right_padding() -> None:
    native = small_native("transformer")
    model = hf.wrap(native).eval()
    short, long = tokens(1, 3, seed=8)[0], tokens(1, 6, seed=9)[0]
    free = hierseq.generate(native, [short, long], max_new_tokens=6, temperature=0)
    eos = int(free[0][3 + 1])  # the short prompt's 2nd new token: that group stops there
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=255)
    expected = hierseq.generate(native, [short, long], max_new_tokens=6, temperature=0, eos_id=eos)
    assert torch.equal(out[0, 3 : 3 + len(expected[0])], expected[0])
    assert bool((out[0, 3 + len(expected[0]) :] == 255).all())
    assert torch.equal(out[1, : len(expected[1])], expected[1])

    with pytest.raises(ValueError, match="only left padding"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_beam_search_through_the_cache_equals_full_recompute(name: str) -> None:
    model = hf.wrap(small_native(name)).eval()
    prompt = tokens(1, 6)
    cached = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False)
    recomputed = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, recomputed)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_state_does_not_grow_with_the_prompt(name: str) -> None:
    model = hf.wrap(small_native(name)).eval()
    sizes = []
    for length in (8, 40):
        out = model.generate(tokens(1, length), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        sizes.append(state_bytes(out.cache.native))
    assert sizes[0] == sizes[1] > 0


def state_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from a native cache object."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return state_bytes(vars(obj), seen)
    if hasattr(obj, "__slots__"):
        return sum(state_bytes(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    return 0


# ------------------------------------------------------------------------------------------ native <-> transformers
@pytest.mark.parametrize("name", ["transformer", "mamba"])
def test_hierseq_load_reads_a_save_pretrained_directory(name: str, tmp_path: Path) -> None:
    native = small_native(name, seed=4)
    hf.wrap(native).save_pretrained(tmp_path)
    loaded = hierseq.load(tmp_path).eval()
    assert type(loaded) is type(native) and loaded.config == native.config
    ids = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, native(ids).logits)


def test_cli_eval_and_generate_read_a_save_pretrained_directory(tmp_path: Path, capsys) -> None:
    from hierseq.cli import main

    hf.wrap(small_native("transformer")).save_pretrained(tmp_path / "hf")
    assert main(["eval", str(tmp_path / "hf"), "--seq-len", "16", "--max-batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_hierseq_save_of_a_transformers_model_saves_the_native_one(tmp_path: Path) -> None:
    native = small_native("mamba", seed=2)
    hierseq.save(hf.wrap(native), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ids = tokens(1, 9)
    with torch.no_grad():
        assert torch.equal(hierseq.load(tmp_path).eval()(ids).logits, native(ids).logits)


def test_native_model_types_do_not_collide_with_transformers_own(tmp_path: Path) -> None:
    native = small_native("mamba", seed=1)
    hierseq.save(native, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers has a "mamba" of its own
    assert type(model) is hf.model_class_for("mamba")
    ids = tokens(1, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native(ids).logits)
    # A directory of an older hierseq (bare model_type) still loads natively and through the model class.
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with torch.no_grad():
        assert torch.equal(hierseq.load(tmp_path).eval()(ids).logits, native(ids).logits)
        assert torch.equal(hf.model_class_for("mamba").from_pretrained(tmp_path).eval()(ids).logits, native(ids).logits)
