"""The CLI: bad input ends in a one-line error and a non-zero exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hierseq.cli import main
from hierseq.training.checkpoint import load_trainer_state
from hierseq.training.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hierseq.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("hierseq: error:"), err[0]
    assert needle in err[0], err[0]
    assert "Traceback" not in proc.stderr


def test_list_and_info(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    assert "transformer" in capsys.readouterr().out
    assert main(["info", "transformer", "--set", "d_model=64", "--set", "n_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "d_model: 64" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--model", "nosuchmodel", "--set", "max_steps=1"], "nosuchmodel"),
        (["train", "--set", "lr"], "key=value"),
        (["train", "--set", "no_such_field=1"], "no_such_field"),
        (["train", "--set", "model.d_model=-5"], "d_model"),
        (["train", "--set", "lr=-1"], "lr"),
        (["train", "--data", "/no/such/path.txt"], "/no/such/path.txt"),
        (["train", "--config", "/no/such/config.yaml"], "config"),
        (["info", "nosuchmodel"], "nosuchmodel"),
        (["info", "transformer", "--set", "n_heads=3"], "n_heads"),
        (["eval", "/no/such/dir"], "/no/such/dir"),
        (["generate", "/no/such/dir"], "/no/such/dir"),
        (["bench", "speed", "--models", "nosuchmodel"], "nosuchmodel"),
        (["train", "--set", "lr=[1"], "not a valid YAML value"),
        (["train", "--set", "model.=3"], "needs a field name"),
        (["train", "--set", "task=images"], "task='images'"),
        (["train", "--model", "hama", "--set", "task=regression"], "task='regression': trains seq_regression"),
        (["train", "--set", "task.n_pairs=2"], "task_options.n_pairs=2: unknown option of the lm task"),
        (["train", "--set", "task=mqar", "--set", "task.n_pairs=0"], "task_options.n_pairs=0: must be a positive"),
        (
            ["train", "--config", str(CONFIGS / "hiss_imu.yaml"), "--set", "task.signal=gps"],
            "task_options.signal='gps'",
        ),
        (["train", "--config", str(CONFIGS / "hiss_imu.yaml"), "--set", "task_options=3"], "task_options=3: must be"),
        (["train", "--config", str(CONFIGS / "hiss_imu.yaml"), "--set", "loader=stream"], "loader='stream'"),
        (["train", "--config", str(CONFIGS / "hama_signal.yaml"), "--set", "model.d_input=3"], "d_input=3"),
        (["info", "transformer", "--set", "task.n_pairs=3"], "model fields only"),
    ],
)
def test_bad_input_is_one_line_error(args: list[str], needle: str, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(*args, cwd=tmp_path), needle)


def test_bad_yaml_config_value(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: transformer\nseq_len: zero\n")
    assert_one_line_error(run_cli("train", "--config", str(cfg), cwd=tmp_path), "seq_len")


def test_train_eval_generate_end_to_end(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "run"
    sets = [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "seq_len=32",
        "batch_size=4",
        "max_steps=6",
        "eval_every=3",
        "eval_batches=2",
        "progress=false",
        "warmup_steps=2",
    ]
    proc = run_cli("train", "--data", str(text), "--out", str(out), *sum((["--set", s] for s in sets), []))
    assert proc.returncode == 0, proc.stderr
    assert "bits/byte" in proc.stdout
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file()
    proc = run_cli("eval", str(out), "--data", str(text), "--seq-len", "32", "--max-batches", "2")
    assert proc.returncode == 0, proc.stderr
    assert "bits/byte" in proc.stdout
    proc = run_cli("generate", str(out), "--prompt", "the quick", "--max-new-tokens", "20", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the quick") and len(proc.stdout.rstrip("\n")) >= len("the quick")


def test_train_runs_masked_autoencoders_and_resumes_them(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("pack my box with five dozen liquor jugs. " * 300)
    out = tmp_path / "hama_run"
    sets = [
        "seq_len=64",
        "batch_size=2",
        "max_steps=2",
        "eval_batches=1",
        "eval_batch_size=2",
        "log_every=1",
        "progress=false",
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.nodes_per_layer=[2]",
        "model.partition_lengths=[16]",
        "model.n_masks=[4]",
    ]
    args = ["train", "--model", "hama", "--data", str(text), "--out", str(out), *sum((["--set", s] for s in sets), [])]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "masked_acc" in proc.stdout and "masked bytes" in proc.stdout
    assert (out / "metrics.jsonl").is_file() and load_trainer_state(out / "checkpoint")["step"] == 2
    proc = run_cli(*args, "--resume", "--set", "max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and load_trainer_state(out / "checkpoint")["step"] == 3
    assert [e["step"] for e in read_metrics(out / "metrics.jsonl") if e["event"] == "train"] == [1, 2, 3]


def test_train_runs_the_shipped_hiss_config_with_overrides(tmp_path: Path) -> None:
    out = tmp_path / "hiss"
    sets = ["task.n_train=8", "task.n_val=2", "task.n_test=2", "seq_len=30", "batch_size=4", "max_steps=3"]
    sets += ["eval_every=2", "log_every=1", "progress=false", "model.d_model=8", "model.d_state=4", "lr=3e-3"]
    proc = run_cli(
        "train", "--config", str(CONFIGS / "hiss_imu.yaml"), "--out", str(out), *sum((["--set", s] for s in sets), [])
    )
    assert proc.returncode == 0, proc.stderr
    assert "test mse" in proc.stdout.splitlines()[-1]
    assert (out / "loss.png").stat().st_size > 1000
    assert load_trainer_state(out / "checkpoint")["step"] == 3
    events = read_metrics(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 3] and events[-1]["event"] == "test"
    saved = (out / "train_config.yaml").read_text()
    assert "lr: 0.003" in saved and "n_train: 8" in saved and "d_model: 8" in saved


def test_train_eval_generate_with_bpe_on_the_embedded_corpus_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`hierseq train --tokenizer bpe:4096` on the embedded corpus, then eval and generate with no tokenizer
    argument, offline; the saved folder reloads with its tokenizer through hierseq.load and through
    AutoTokenizer + AutoModelForCausalLM."""
    import transformers

    import hierseq
    import hierseq.hf  # noqa: F401  (registers the Auto classes)
    from hierseq.data import tokenizer_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    sets = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "seq_len=32", "batch_size=4", "max_steps=2"]
    sets += ["eval_batches=1", "progress=false", "warmup_steps=1"]
    args = ["train", "--model", "transformer", "--tokenizer", "bpe:4096", "--out", "run"]
    assert main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    out = capsys.readouterr().out
    assert "tokenizer bpe:4096 (trained on the train split, 4096 tokens): tokens per byte train 0.2" in out
    assert "nats/token" in out and "bits/byte" in out

    assert main(["eval", "run", "--max-batches", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("val: loss ") and "nats/token" in line and "(tokenizer bpe:4096, 0.2" in line

    prompt = "It is a truth universally acknowledged"
    assert main(["generate", "run", "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    model = hierseq.load(tmp_path / "run" / "final")
    tokenizer = tokenizer_of(model)
    assert tokenizer.spec == "bpe:4096" and model.config.vocab_size == 4096
    ids = hierseq.generate(model, tokenizer.encode(prompt)[None], 8, temperature=0)
    assert text == prompt + tokenizer.decode(ids[0, -8:])  # 8 tokens, decoded by the saved tokenizer

    auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    unicode = "naïve café 👍🏽 e\u0301 日本語"
    assert auto_tok(unicode)["input_ids"] == tokenizer.encode(unicode).tolist()
    assert auto_tok.decode(auto_tok(unicode)["input_ids"]) == unicode
    auto_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    prompt_ids = auto_tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(auto_model.generate(prompt_ids, max_new_tokens=8, do_sample=False), ids)
    auto_model.save_pretrained(tmp_path / "hf_copy")  # carries the tokenizer along
    assert tokenizer_of(hierseq.load(tmp_path / "hf_copy")).to_json() == tokenizer.to_json()
