"""Every entry point keeps its promise (issue 20).

The table: bad input to ``hierseq train / eval / generate / bench / info`` and to ``python -m
hierseq.training`` ends in exactly one line ``hierseq: error: ...`` on stderr, a non-zero exit, no
traceback, and leaves every file it could touch as it was. Most cases run in-process (the entry points'
``main(argv)``); a few need a real process (``python -m``, ``torchrun``). Then the behaviour behind the
other items: eval reads the run's own corpus and says so, generate checks before it prints, HAMA runs
save where --help says, the folder split, help text.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import hierseq
from hierseq.cli import main, make_parser
from hierseq.data.subword import train_bpe
from hierseq.training.__main__ import main as training_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TORCHRUN = Path(sys.executable).parent / "torchrun"
#: a seconds-long transformer run on a small text file
TINY = [
    *("--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2"),
    *("--set", "seq_len=16", "--set", "batch_size=2", "--set", "max_steps=2", "--set", "warmup_steps=1"),
    *("--set", "eval_batches=1", "--set", "log_every=1", "--set", "progress=false"),
]
#: a tiny HAMA (masked autoencoder)
TINY_HAMA = [
    *("--set", "seq_len=64", "--set", "batch_size=2", "--set", "max_steps=1", "--set", "eval_batches=1"),
    *("--set", "eval_batch_size=2", "--set", "progress=false", "--set", "model.d_model=16"),
    *("--set", "model.n_heads=2", "--set", "model.n_layers=1", "--set", "model.nodes_per_layer=[2]"),
    *("--set", "model.partition_lengths=[16]", "--set", "model.n_masks=[4]"),
]


@dataclass
class World:
    """Files the cases point at, made once: a corpus, a finished run, saved models of every kind."""

    root: Path
    text: Path  # the run's corpus (bytes up to 'z')
    other_text: Path
    run: Path  # a finished tiny transformer run on ``text``
    hama: Path  # hierseq.save of a masked AE
    hiss: Path  # hierseq.save of a sequence regressor
    small_vocab: Path  # a causal LM with vocab_size 64 (below the corpus' bytes)
    no_model: Path  # an empty folder
    used: Path  # a folder holding a run's metrics but no checkpoint
    yaml_ok: Path  # a valid config for python -m hierseq.training
    yaml_bad: Path  # not YAML
    docs: Path  # a small jsonl file of documents (hf: data)
    foreign_tokenizer: Path  # a saved causal LM (vocab 64) next to another model's 257-token tokenizer.json

    def paths(self) -> dict[str, str]:
        return {k: str(v) for k, v in vars(self).items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("entry_points")
    text = root / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    other = root / "other.txt"
    other.write_text("pack my box with five dozen liquor jugs. " * 120)
    run = root / "run"
    assert main(["train", "--data", str(text), "--out", str(run), *TINY]) == 0
    hama_model = hierseq.build_model(
        "hama", d_model=16, n_heads=2, n_layers=1, nodes_per_layer=[2], partition_lengths=[16], n_masks=[4]
    )
    hama = hierseq.save(hama_model, root / "hama")
    hiss = hierseq.save(hierseq.build_model("hiss", d_model=8, n_layers=1, d_state=4), root / "hiss")
    small = hierseq.save(
        hierseq.build_model("transformer", vocab_size=64, d_model=16, n_layers=1, n_heads=2), root / "v64"
    )
    (root / "empty").mkdir()
    (root / "used").mkdir()
    (root / "used" / "metrics.jsonl").write_text("")
    yaml_ok = root / "ok.yaml"
    yaml_ok.write_text(f"model: transformer\ndata: {text}\nout_dir: {root / 'yaml_run'}\nprogress: false\n")
    yaml_bad = root / "bad.yaml"
    yaml_bad.write_text("model: [transformer\n")
    docs = root / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document {i}: the quick brown fox"}}\n' for i in range(200)))
    foreign = hierseq.save(
        hierseq.build_model("transformer", vocab_size=64, d_model=16, n_layers=1, n_heads=2), root / "foreign"
    )
    (foreign / "tokenizer.json").write_text(train_bpe(text.read_text(), 257).to_json())
    return World(
        root, text, other, run, hama, hiss, small, root / "empty", root / "used", yaml_ok, yaml_bad, docs, foreign
    )


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``roots``: (mtime_ns, content hash) - what a call must not change."""
    out: dict[str, tuple[int, str]] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p)] = (p.stat().st_mtime_ns, digest)
    return out


def assert_one_line_error(rc: int, err: str, needle: str) -> str:
    assert rc != 0, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hierseq: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


S = "--set"
CASES = [
    # --------------------------------------------------------------------------- train
    ("hierseq", ["train", "--model", "nosuchmodel"], "model='nosuchmodel': unknown model"),
    ("hierseq", ["train", S, "lr"], "must have the form key=value"),
    ("hierseq", ["train", S, "no_such_field=1"], "no_such_field=1: unknown TrainConfig field"),
    ("hierseq", ["train", S, "model.d_model=-5"], "d_model=-5"),
    ("hierseq", ["train", S, "max_steps=2.5"], "max_steps=2.5: must be a positive integer"),
    ("hierseq", ["train", S, "warmup_steps=-1"], "warmup_steps=-1"),
    ("hierseq", ["train", "--seq-len", "5"], "unrecognized arguments: --seq-len 5"),
    ("hierseq", ["train", "--config", "{root}/missing.yaml"], "config='{root}/missing.yaml': no such file"),
    ("hierseq", ["train", "--config", "{yaml_bad}"], "not valid YAML"),
    ("hierseq", ["train", "--data", "/no/such/file.txt", "--out", "{new}", *TINY], "data='/no/such/file.txt'"),
    ("hierseq", ["train", "--data", "/dev/zero", "--out", "{new}", *TINY], "is not a regular file or a folder"),
    ("hierseq", ["train", "--data", "~/hierseq-no-such.txt", "--out", "{new}", *TINY], "{home}/hierseq-no-such.txt"),
    ("hierseq", ["train", "--out", "", *TINY], "out_dir='': must be a non-empty path"),
    ("hierseq", ["train", "--out", "{text}", *TINY], "exists and is not a directory"),
    ("hierseq", ["train", "--out", "{text}/run", *TINY], "is a file, so the folder cannot be created"),
    ("hierseq", ["train", "--data", "{text}", "--out", "{run}", *TINY], "already holds a run (train_config.yaml"),
    (
        "hierseq",
        ["train", "--data", "{text}", "--out", "{new}", *TINY, S, "model.vocab_size=10"],
        "model_config.vocab_size=10: the corpus",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--out", "{run}", "--overwrite", *TINY, S, "model.vocab_size=10"],
        "model_config.vocab_size=10",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--out", "{run}", "--resume", *TINY, S, "seq_len=8"],
        "resume: seq_len=8 differs from the checkpoint's 16",
    ),
    (
        "hierseq",
        ["train", "--data", "{other_text}", "--out", "{run}", "--resume", *TINY],
        "differs from the checkpoint",
    ),
    ("hierseq", ["train", "--data", "{text}", "--out", "{used}", "--resume", *TINY], "no checkpoint to resume from"),
    ("hierseq", ["train", "--model", "hama", S, "task=regression"], "task='regression': trains seq_regression"),
    # --------------------------------------------------------------------------- train: tokenizers and hf: data
    (
        "hierseq",
        ["train", "--tokenizer", "words", "--out", "{new}", *TINY],
        "tokenizer='words': must be 'bytes', 'bpe:",
    ),
    ("hierseq", ["train", "--tokenizer", "bpe:100", "--out", "{new}", *TINY], "needs an integer vocab_size >= 257"),
    (
        "hierseq",
        ["train", "--data", "{text}", "--tokenizer", "hf:{root}/none/tokenizer.json", "--out", "{new}", *TINY],
        "tokenizer='hf:{root}/none/tokenizer.json': no such file or directory",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--tokenizer", "hf:{no_model}", "--out", "{new}", *TINY],
        "tokenizer='hf:{no_model}': the folder holds no tokenizer.json",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--tokenizer", "hf:hierseq-tests/no-such-tokenizer", "--out", "{new}", *TINY],
        "tokenizer='hf:hierseq-tests/no-such-tokenizer': is a Hugging Face hub name, the hub is offline",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--tokenizer", "bpe:5000", "--out", "{new}", *TINY],
        "tokenizer='bpe:5000': the training split (4,860 bytes) allows only 288 tokens",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--tokenizer", "bpe:257", "--out", "{new}", *TINY, S, "model.vocab_size=256"],
        "model_config.vocab_size=256: the tokenizer 'bpe:257' has 257 tokens",
    ),
    (
        "hierseq",
        ["train", "--data", "{text}", "--out", "{run}", "--resume", "--tokenizer", "bpe:257", *TINY],
        "resume: tokenizer='bpe:257' differs from the checkpoint's 'bytes'",
    ),
    ("hierseq", ["train", "--model", "hama", "--tokenizer", "bpe:300", *TINY_HAMA], "is an lm task field"),
    (
        "hierseq",
        ["train", "--data", "hf:{root}/missing.parquet", "--out", "{new}", *TINY],
        "data='hf:{root}/missing.parquet': no such file or directory",
    ),
    (
        "hierseq",
        ["train", "--data", "hf:wikitext:wikitext-103-raw-v1", "--out", "{new}", *TINY],
        "is a Hugging Face hub dataset and the hub is offline",
    ),
    ("hierseq", ["train", "--data", "hf:{docs}@nope", "--out", "{new}", *TINY], "Bad split: nope"),
    (
        "hierseq",
        ["train", "--config", str(CONFIGS / "hiss_imu.yaml"), "--out", "{new}", S, "model.chunk_size=7"],
        "set --set task.chunk_size=7 instead",
    ),
    # --------------------------------------------------------------------------- eval
    ("hierseq", ["eval", "{root}/no_such_dir"], "model_dir='{root}/no_such_dir': no such directory"),
    ("hierseq", ["eval", "{no_model}"], "holds no saved model"),
    ("hierseq", ["eval", "{hama}"], "holds a masked_ae model (hama)"),
    ("hierseq", ["eval", "{hiss}"], "holds a seq_regression model (hiss)"),
    ("hierseq", ["eval", "{run}", "--data", "/no/such.txt"], "--data='/no/such.txt': no such file"),
    ("hierseq", ["eval", "{run}", "--split", "nope"], "argument --split: invalid choice: 'nope'"),
    ("hierseq", ["eval", "{run}", "--seq-len", "0"], "argument --seq-len: '0': must be a positive integer"),
    ("hierseq", ["eval", "{small_vocab}", "--data", "{text}"], "vocab_size=64: the corpus"),
    ("hierseq", ["eval", "{run}", "--data", "hf:/no/such.jsonl"], "--data='hf:/no/such.jsonl': no such file"),
    ("hierseq", ["eval", "{foreign_tokenizer}"], "tokenizer.json: has 257 tokens, the model's vocab_size in config"),
    # --------------------------------------------------------------------------- generate
    ("hierseq", ["generate", "{run}", "--top-p", "0"], "top_p=0.0: must be None or a number in (0, 1]"),
    ("hierseq", ["generate", "{run}", "--temperature", "-1"], "temperature=-1.0"),
    ("hierseq", ["generate", "{run}", "--max-new-tokens", "-3"], "max_new_tokens=-3"),
    ("hierseq", ["generate", "{run}", "--top-k", "0"], "top_k=0"),
    ("hierseq", ["generate", "{run}", "--prompt", ""], "--prompt='': must contain at least one character"),
    ("hierseq", ["generate", "{hama}"], "holds a masked_ae model (hama); `hierseq generate`"),
    ("hierseq", ["generate", "{small_vocab}", "--prompt", "xyz"], "--prompt: token id 122 out of range"),
    ("hierseq", ["generate", "{root}/no_such_dir"], "no such directory"),
    ("hierseq", ["generate", "{foreign_tokenizer}"], "tokenizer.json: has 257 tokens"),
    # --------------------------------------------------------------------------- bench
    ("hierseq", ["bench", "speed", "--models", "nosuchmodel", "--out", "{new}"], "nosuchmodel"),
    ("hierseq", ["bench", "speed", "--lengths", "1,x", "--out", "{new}"], "comma-separated list of int"),
    ("hierseq", ["bench", "speed", "--repeats", "0", "--out", "{new}"], "repeats=0"),
    ("hierseq", ["bench", "recall", "--steps", "0", "--out", "{new}"], "steps=0"),
    ("hierseq", ["bench", "signals", "--tasks", "nope", "--out", "{new}"], "tasks='nope'"),
    (
        "hierseq",
        ["bench", "signals", "--long", "--tasks", "imu_integration", "--out", "{new}"],
        "tasks='imu_integration'",
    ),
    ("hierseq", ["bench", "recon", "--tasks", "nope", "--out", "{new}"], "tasks=['nope']"),
    ("hierseq", ["bench", "lm", "--data", "/no/such.txt", "--out", "{new}"], "data='/no/such.txt'"),
    ("hierseq", ["bench", "lm", "--tokenizer", "bpe:4k", "--out", "{new}"], "tokenizer='bpe:4k': bpe:<vocab_size>"),
    ("hierseq", ["bench", "lm", "--data", "hf:{root}/gone", "--out", "{new}"], "data='hf:{root}/gone': no such"),
    ("hierseq", ["bench", "nosuch"], "argument bench: invalid choice: 'nosuch'"),
    # --------------------------------------------------------------------------- info, the bare command
    ("hierseq", ["info", "nosuchmodel"], "nosuchmodel"),
    ("hierseq", ["info", "transformer", S, "n_heads=3"], "n_heads"),
    ("hierseq", ["info", "transformer", S, "task.n_pairs=3"], "model fields only"),
    ("hierseq", [], "the following arguments are required: command"),
    # --------------------------------------------------------------------------- python -m hierseq.training
    ("training", ["{root}/missing.yaml"], "config='{root}/missing.yaml': no such file"),
    ("training", [], "the following arguments are required: config"),
    ("training", ["{yaml_ok}", S, "lr=-1"], "lr=-1.0: must be a number in (0.0, inf]"),
    ("training", ["{yaml_ok}", S, "out_dir={run}", *TINY], "already holds a run"),
    ("training", [str(CONFIGS / "hiss_imu.yaml"), S, "model.chunk_size=7"], "task.chunk_size=7"),
    ("training", ["{yaml_ok}", S, "tokenizer=bpe:1"], "tokenizer='bpe:1': bpe:<vocab_size> needs an integer"),
]


@pytest.mark.parametrize("entry, argv, needle", CASES, ids=[" ".join([e, *a])[:60] for e, a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, entry, argv, needle
) -> None:
    values = {**world.paths(), "new": str(tmp_path / "new"), "home": str(Path.home().resolve())}
    argv = [a.format(**values) for a in argv]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the table runs offline: no row may reach the network
    capsys.readouterr()
    before = snapshot(world.root, tmp_path)
    rc = (main if entry == "hierseq" else training_main)(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, needle.format(**values))
    assert snapshot(world.root, tmp_path) == before  # nothing created, emptied or rewritten
    if argv and argv[0] == "generate":
        assert out == ""  # checked before printing anything


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert {a[0] for e, a, _ in CASES if e == "hierseq" and a} >= {"train", "eval", "generate", "bench", "info"}


# ------------------------------------------------------------------------------------ real processes
def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, cwd=cwd, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", **env}
    )


@pytest.mark.parametrize(
    "module, args, needle",
    [
        ("hierseq.training", ["{yaml_ok}", S, "seq_len=0"], "seq_len=0: must be a positive integer"),
        ("hierseq.cli", ["train", "--data", "/dev/zero"], "is not a regular file"),
        # Offline as the hub libraries see it from their start (HF_HUB_OFFLINE set before they are imported).
        ("hierseq.cli", ["train", "--tokenizer", "hf:hierseq-tests/none", *TINY], "hub name, the hub is offline"),
        ("hierseq.cli", ["train", "--data", "hf:hierseq-tests/none", *TINY], "hub dataset and the hub is offline"),
    ],
)
def test_module_entries_in_a_process(world: World, tmp_path: Path, module: str, args: list[str], needle: str) -> None:
    hub_home = str(world.root / "hf_home")  # an empty hub cache, outside the folder that must stay empty
    args = [sys.executable, "-m", module, *(a.format(**world.paths()) for a in args)]
    proc = _run(args, tmp_path, HF_HUB_OFFLINE="1", HF_HOME=hub_home)
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert proc.returncode == 2 and list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "hierseq.cli", "train", S, "lr=-1"], tmp_path, HIERSEQ_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "lr=-1.0" in proc.stderr


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_workers_report_once(world: World, tmp_path: Path) -> None:
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    args = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "hierseq.training", str(world.yaml_ok)]
    proc = _run([*args, S, "seq_len=0"], tmp_path)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hierseq: error:")]
    assert ours == ["hierseq: error: seq_len=0: must be a positive integer"]  # rank 0 alone, once
    # What remains on stderr is torchrun's own summary, with no frame of our workers in it.
    assert "hierseq/training" not in proc.stderr and "hierseq/cli.py" not in proc.stderr


# ------------------------------------------------------------------------------------ 2. the NaN stop
def test_nan_stop_is_one_line_and_removes_the_run_it_started(tmp_path: Path, capsys, monkeypatch) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij " * 300)
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--data", str(text), "--out", "runs/nan", *TINY, S, "lr=1e6", S, "max_steps=8"])
    _, err = capsys.readouterr()
    line = assert_one_line_error(rc, err, "training stopped and nothing was saved over the last good state")
    assert rc == 1 and "non-finite" in line and "this run saved no checkpoint yet" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


# ------------------------------------------------------------------------------------ 3. output paths, as the OS says
def test_os_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij " * 300)
    rc = main(["train", "--data", str(text), "--out", str(tmp_path / "out"), *TINY])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, f"path='{tmp_path / 'out'}': read-only file system")
    assert rc == 1


# ------------------------------------------------------------------------------------ 6. eval reads the run's corpus
def test_eval_uses_the_runs_recorded_corpus_and_says_so(world: World, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # another directory than the run's: the record is an absolute path
    assert main(["eval", str(world.run), "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert f"data: text file '{world.text}'" in out and f"(recorded by the run in '{world.run}')" in out
    assert "(seq_len 16)" in out  # the run's window length
    assert main(["eval", str(world.run / "final"), "--max-batches", "2", "--data", str(world.text)]) == 0
    explicit = capsys.readouterr().out
    assert explicit.splitlines()[-1] == out.splitlines()[-1]  # same corpus, same numbers
    assert main(["eval", str(world.run), "--max-batches", "2", "--data", str(world.other_text)]) == 0
    assert "other.txt" in capsys.readouterr().out
    # A plain saved model has no run: the embedded corpus, and the output says so.
    assert main(["eval", str(world.run / "final"), "--max-batches", "1", "--seq-len", "16"]) == 0
    assert "(recorded by the run" in capsys.readouterr().out  # final/ belongs to the run
    plain = hierseq.save(hierseq.load(world.run / "final"), tmp_path / "plain")
    assert main(["eval", str(plain), "--max-batches", "1", "--seq-len", "16"]) == 0
    assert "data: Jane Austen's six novels" in capsys.readouterr().out


def test_eval_of_a_run_whose_corpus_is_gone(world: World, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    config = (run / "train_config.yaml").read_text().replace(str(world.text), str(tmp_path / "gone.txt"))
    (run / "train_config.yaml").write_text(config)
    rc = main(["eval", str(run)])
    assert_one_line_error(rc, capsys.readouterr().err, "the corpus recorded by the run in")


# ------------------------------------------------------------------------------------ 7. generate checks first
def test_generate_streams_only_after_every_check(world: World, capsys) -> None:
    assert main(["generate", str(world.run), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the") and len(out.rstrip("\n").encode()) >= 4
    with pytest.raises(ValueError, match=r"^model='HAMA': is a masked_ae model; generate needs a causal LM"):
        hierseq.generate(hierseq.load(world.hama), [[1, 2]], max_new_tokens=2)


# ------------------------------------------------------------------------------------ 8. the advertised default
def test_train_hama_without_out_saves_to_runs_train(world: World, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "hama", "--data", str(world.text), *TINY_HAMA]) == 0
    assert "-> runs/train" in capsys.readouterr().out
    assert (tmp_path / "runs" / "train" / "final" / "config.json").is_file()
    assert (tmp_path / "runs" / "train" / "checkpoint" / "trainer_state.json").is_file()
    train_help = " ".join(_subparser("train").format_help().split())
    assert "default: the config's out_dir, else runs/train" in train_help


# ------------------------------------------------------------------------------------ 10. defaults
def test_tilde_in_data_is_expanded_and_recorded(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.txt").write_text("some text of my own. " * 200)
    out = tmp_path / "run"
    assert main(["train", "--data", "~/mine.txt", "--out", str(out), *TINY, S, "max_steps=1"]) == 0
    assert f"data: {(tmp_path / 'mine.txt').resolve()}" in (out / "train_config.yaml").read_text()
    assert main(["train", "--data=~/mine.txt", "--out", str(out), "--resume", *TINY]) == 0  # the same corpus
    capsys.readouterr()


def test_max_steps_in_exponent_form(tmp_path: Path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij " * 300)
    assert main(["train", "--data", str(text), "--out", str(tmp_path / "r"), *TINY, S, "max_steps=2e0"]) == 0
    assert "done: step 2" in capsys.readouterr().out


def test_a_folder_of_three_files_trains_on_all_of_them(tmp_path: Path) -> None:
    from hierseq.data.corpora import load_corpus

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"<{name}>" * 200)
    corpus = load_corpus(tmp_path)
    train = bytes(corpus.train.tolist())
    assert all(f"<{name}>".encode() in train for name in "abc")
    assert "3 text file(s)" in corpus.description and "split by position" in corpus.description


# ------------------------------------------------------------------------------------ 13. help text
def _subparser(*names: str):
    parser = make_parser()
    for name in names:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return parser


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_every_eval_and_generate_option_has_help_and_a_default(command: str) -> None:
    parser = _subparser(command)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.option_strings:
            assert "default" in parser.formatter_class("x")._get_help_string(action), action.dest
    assert "(default: 0.95)" in text or command == "eval"
    assert "(default: the run's seq_len, else 256)" in text or command == "generate"


def test_demo_help_says_what_it_trains() -> None:
    text = " ".join(_subparser("demo").format_help().split())
    assert "every causal LM" in text and "the control" not in text


def test_train_help_documents_resume_and_overwrite() -> None:
    text = " ".join(_subparser("train").format_help().split())
    assert "--overwrite" in text and "is refused unless --resume continues it or --overwrite replaces it" in text
    assert "Changed lr" in text and "recorded in train_config.yaml" in text


def test_ctrl_c_during_train_saves_and_says_how_to_continue(world: World, tmp_path: Path, monkeypatch, capsys) -> None:
    import signal

    from hierseq.training.tasks.lm import LMTask

    real = LMTask.forward
    calls = {"n": 0}

    def forward(self, model, micro, index):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, micro, index)

    monkeypatch.setattr(LMTask, "forward", forward)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(world.text), "--out", str(out), *TINY, S, "max_steps=50"])
    captured = capsys.readouterr()
    assert rc == 130 and captured.err == "hierseq: interrupted at step 2, saved; add --resume to continue\n"
    assert (out / "final" / "config.json").is_file() and "done: step 2" in captured.out


def test_a_closed_stdout_ends_quietly() -> None:
    # `hierseq info transformer | head -1`: the reader leaves early; that is not an error to report.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hierseq.cli", "info", "transformer"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# ------------------------------------------------------------------------------------ a missing optional extra
@pytest.mark.parametrize(
    "module, args, needle",
    [
        ("datasets", ["--data", "hf:{docs}"], "reading Hugging Face datasets needs the optional 'data' extra: pip"),
        ("tokenizers", ["--data", "{text}", "--tokenizer", "bpe:300"], "needs the optional 'hf' extra: pip install"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(world: World, tmp_path: Path, monkeypatch, capsys, module, args, needle):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    before = snapshot(world.root)
    rc = main(["train", *(a.format(**world.paths()) for a in args), "--out", str(tmp_path / "run"), *TINY])
    assert_one_line_error(rc, capsys.readouterr().err, needle)
    assert rc == 2 and list(tmp_path.iterdir()) == [] and snapshot(world.root) == before
