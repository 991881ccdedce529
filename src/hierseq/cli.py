"""The ``hierseq`` command: list, info, train, eval, generate, demo, bench.

Every entry point (these subcommands and ``python -m hierseq.training``, also under ``torchrun``) ends
through :func:`run_entry_point`: whatever goes wrong - an unknown option, model, field or value, a
missing or unusable path, a failed write, a non-finite loss - ends in one line ``hierseq: error:
<argument>=<value>: <rule>`` on stderr (under torchrun from rank 0 only) and a non-zero exit code: 2 for
bad input, 1 for a run that failed, 130 after Ctrl-C. Set HIERSEQ_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

EXIT_USAGE = 2  # bad input: an option, a value, a path
EXIT_FAILURE = 1  # the run failed: a write (disk full, read-only), a non-finite loss, an internal error
EXIT_INTERRUPTED = 130
DEFAULT_EVAL_SEQ_LEN = 256
SILENT_RANK_EXIT_DELAY_S = 2.0


# ---------------------------------------------------------------------------- the one error path
class UsageError(ValueError):
    """A command line argparse refused (unknown option, bad type, missing argument)."""


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors go through :func:`run_entry_point` like every other error
    (one line), instead of printing the usage block and exiting by itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        where = "" if self.prog == "hierseq" else f"{self.prog}: "  # the line already starts "hierseq:"
        raise UsageError(f"{where}{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, unless its help already says what it is (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def error_message(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception that reached an entry point.

    Bad input (``ValueError`` / ``TypeError``: every validator in hierseq raises them as
    ``name=value: rule``; missing paths; a missing optional extra) exits 2; a run that failed (a write into
    ``out_dir``, a non-finite loss) exits 1; anything else is a bug, reported in one line too, with its type."""
    from safetensors import SafetensorError

    from hierseq.config import MissingExtra, RunStopped

    if isinstance(exc, RunStopped):
        return _one_line(exc), EXIT_FAILURE
    if isinstance(exc, (ValueError, TypeError, MissingExtra)):
        return _one_line(exc), EXIT_USAGE
    if isinstance(exc, OSError):
        bad_path = isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError))
        code = EXIT_USAGE if bad_path or isinstance(exc, PermissionError) else EXIT_FAILURE
        if exc.errno is not None and exc.strerror:  # raised by the OS: name the path and the reason
            where = f"path={exc.filename!r}: " if exc.filename is not None else ""
            return f"{where}{exc.strerror.lower()}", code
        return _one_line(exc), code
    if isinstance(exc, SafetensorError):
        return f"safetensors: {_one_line(exc)}", EXIT_FAILURE
    detail = f"internal error: {type(exc).__name__}: {_one_line(exc)} (a bug; HIERSEQ_DEBUG=1 shows the traceback)"
    return detail, EXIT_FAILURE


def _reports_errors() -> bool:
    """Under torchrun every rank fails alike: only rank 0 prints, so the error appears once."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def run_entry_point(body: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point's ``body(argv)`` (``hierseq``, ``python -m hierseq.training``) and turn whatever
    escapes it into one line ``hierseq: error: <argument>=<value>: <rule>`` on stderr and an exit code
    (:func:`error_message`); ``--help`` still exits through argparse. HIERSEQ_DEBUG=1 re-raises, so the
    traceback shows."""
    try:
        return body(argv)
    except BrokenPipeError:
        # stdout closed by the reader (`hierseq info x | head`): not an error; silence the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if _reports_errors():
            print("hierseq: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("HIERSEQ_DEBUG"):
            raise
        message, code = error_message(e)
        sys.stdout.flush()
        if _reports_errors():
            print(f"hierseq: error: {message}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every worker as soon as one exits: the silent ranks wait a moment, so rank 0
            # has printed the error before it is stopped.
            time.sleep(SILENT_RANK_EXIT_DELAY_S)
        return code


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def build_train_config(args: argparse.Namespace):
    """The run's :class:`~hierseq.training.TrainConfig` (any model kind) from (YAML file) <- (--model,
    --data, --tokenizer, --out, --resume flags) <- (--set overrides, :mod:`hierseq.training.overrides`). Paths are
    checked by the trainer, before it writes anything."""
    from hierseq.training.config import TrainConfig, load_yaml_mapping
    from hierseq.training.overrides import apply_overrides

    data: dict[str, Any] = load_yaml_mapping(args.config) if args.config else {}
    for key, value in (
        ("model", args.model),
        ("data", args.data),
        ("tokenizer", args.tokenizer),
        ("out_dir", args.out),
    ):
        if value is not None:  # `--out ''` is a value (refused by TrainConfig), not "use the default"
            data[key] = value
    if args.resume:
        data["resume"] = True
    return TrainConfig.from_dict(apply_overrides(data, args.set or []))


# ---------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    import hierseq
    from hierseq.registry import get_entry

    for name in hierseq.list_models():
        print(f"{name:<14} {get_entry(name).kind}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import hierseq
    from hierseq.training.overrides import parse_overrides

    parsed = parse_overrides(args.set or [])
    if parsed["task_options"]:
        raise ValueError(f"--set task.{next(iter(parsed['task_options']))}: `hierseq info` takes model fields only")
    overrides = {**parsed["train"], **parsed["model_config"]}  # in `info` every key is a model field
    model = hierseq.build_model(args.model, **overrides)
    entry = hierseq.get_entry(args.model)
    print(f"model: {args.model} ({entry.kind}, {type(model).__name__})")
    print(f"parameters: {hierseq.count_parameters(model):,}")
    describe = getattr(model.config, "describe", None)
    if callable(describe):  # e.g. maha: its block's parameters against a standard block's, and any flag over budget
        for line in describe():
            print(line)
    print("config:")
    print(yaml.safe_dump(model.config.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  ").join(["  ", ""]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hierseq.training import train
    from hierseq.training.tasks import task_class

    cfg = build_train_config(args)
    result = train(cfg, overwrite=args.overwrite)
    task = task_class(cfg.task)(cfg)
    tested = f", test {task.describe(result['test'])}" if result["test"] is not None else ""
    print(
        f"done: step {result['step']}, val {task.describe(result['val'])}{tested}, "
        f"{result['tokens_per_s']:.0f} tokens/s -> {result['out_dir']}"
    )
    if result["stopped_reason"] == "interrupted":
        print(f"hierseq: interrupted at step {result['step']}, saved; add --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _model_dir(path: str) -> Path:
    """The folder holding config.json + model.safetensors for ``path``: a ``hierseq.save`` or
    ``save_pretrained`` directory, or a training run directory (its final/, else its checkpoint/)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model_dir={path!r}: no such directory")
    for candidate in (p, p / "final", p / "checkpoint"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"model_dir={path!r}: holds no saved model (config.json), and no final/ or checkpoint/ of a training run"
    )


def _load_causal_lm(path: str, command: str):
    """The causal LM saved under ``path``; a one-line error for any other model kind."""
    import hierseq
    from hierseq.config import config_error

    model = hierseq.load(_model_dir(path))
    kind = model.model_kind
    if kind != "causal_lm":
        raise config_error(
            "model_dir",
            path,
            f"holds a {kind} model ({model.config.model_type}); `hierseq {command}` works on causal LMs only "
            "(a training run's metrics.jsonl holds its validation metrics)",
        )
    return model


def cmd_eval(args: argparse.Namespace) -> int:
    from hierseq.data.corpora import check_data, data_exists, load_corpus
    from hierseq.data.tokenizer import ByteTokenizer, tokenize_split, tokenizer_of
    from hierseq.training.run_dir import recorded_run
    from hierseq.training.tasks import TASKS
    from hierseq.training.tasks.lm import evaluate_split

    model_dir = _model_dir(args.model_dir)
    run = recorded_run(model_dir)
    # The data: --data, else the corpus the run recorded (its absolute path), else the embedded corpus.
    if args.data is not None:
        data, source = check_data(args.data, "--data"), "--data"
    elif run is not None and run.data is not None:
        data, source = run.data, f"recorded by the run in {str(run.directory)!r}"
        if not data_exists(data):
            raise FileNotFoundError(
                f"data={data!r}: the corpus recorded by the run in {str(run.directory)!r} is gone; pass --data"
            )
    else:
        data, source = None, "the default"
        if run is not None:
            reads_text = TASKS[run.task].reads_text if run.task in TASKS else True  # no task: an lm run
            source = (
                f"the run in {str(run.directory)!r} trained on it"
                if reads_text
                else f"the default; the run in {str(run.directory)!r} trained on the {run.task} task, not on text"
            )
    seq_len = args.seq_len or (run.seq_len if run is not None and run.seq_len else DEFAULT_EVAL_SEQ_LEN)
    model = _load_causal_lm(args.model_dir, "eval")
    tokenizer = tokenizer_of(model)  # the one saved with the model
    corpus = load_corpus(data, min_split_len=seq_len + 1)
    if isinstance(tokenizer, ByteTokenizer):
        corpus.check_vocab(model.config.vocab_size, name="vocab_size")
    print(f"data: {corpus.description} ({source})")
    split = tokenize_split(corpus.split(args.split), tokenizer)
    if len(split) < seq_len + 1:
        raise ValueError(
            f"--seq-len={seq_len}: the {args.split} split is {len(split)} tokens under the model's tokenizer "
            f"{tokenizer.spec!r}, needs at least seq_len + 1"
        )
    result = evaluate_split(model, split, seq_len, args.batch_size, args.max_batches)
    if isinstance(tokenizer, ByteTokenizer):
        print(
            f"{args.split}: loss {result['loss']:.4f} nats, {result['bpb']:.4f} bits/byte over {result['tokens']} "
            f"tokens (seq_len {seq_len})"
        )
    else:
        print(
            f"{args.split}: loss {result['loss']:.4f} nats/token, {result['bpb']:.4f} bits/byte over "
            f"{result['tokens']} tokens = {result['bytes']} bytes (tokenizer {tokenizer.spec}, "
            f"{result['tokens'] / max(result['bytes'], 1):.4f} tokens/byte; seq_len {seq_len})"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import hierseq
    from hierseq.data.tokenizer import tokenizer_of
    from hierseq.generation import check_sampling_arguments
    from hierseq.validation import check_input_ids

    # Everything is checked before the first byte is printed (`generate ... > file` gets all or nothing).
    check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if not args.prompt:
        raise ValueError("--prompt='': must contain at least one character")
    model = _load_causal_lm(args.model_dir, "generate")
    tokenizer = tokenizer_of(model)  # the one saved with the model (bytes when none was)
    prompt = tokenizer.encode(args.prompt)
    if prompt.numel() == 0:
        raise ValueError(f"--prompt={args.prompt!r}: the tokenizer {tokenizer.spec!r} gives it no token")
    try:
        check_input_ids(prompt[None], model.config.vocab_size, name="--prompt")
    except ValueError as e:
        raise ValueError(f"{e} (the model's vocab_size is {model.config.vocab_size})") from None
    print(args.prompt, end="", flush=True)
    # A character's bytes (or a word's pieces) can arrive over several steps: print only what decodes.
    decode = tokenizer.stream_decoder(prompt.tolist())

    def stream(step: int, tokens: torch.Tensor) -> None:
        text = decode(int(tokens[0]))
        if text:
            print(text, end="", flush=True)

    hierseq.generate(
        model,
        prompt[None],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        callback=stream,
    )
    print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hierseq.demo import run_demo

    run_demo(out_dir=args.out, models=_split_list(args.models))
    return 0


def _split_list(text: str | None, cast=str) -> list | None:
    if not text:
        return None
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r}: must be a comma-separated list of {cast.__name__} values") from None


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from hierseq.bench.speed import run_speed_bench

    run_speed_bench(
        out_dir=args.out,
        models=_split_list(args.models),
        lengths=_split_list(args.lengths, int),
        repeats=args.repeats,
        time_budget_s=args.time_budget,
        d_model=args.d_model,
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        gen_contexts=_split_list(args.gen_contexts, int) or [],
        gen_tokens=args.gen_tokens,
        peers=args.peers,
    )
    return 0


def cmd_bench_lm(args: argparse.Namespace) -> int:
    from hierseq.bench.lm import run_lm_bench
    from hierseq.bench.report import set_threads

    size = "full" if args.full else "standard" if args.standard else "quick"
    set_threads(args.threads)
    run_lm_bench(
        # Each tier its own folder: their runs differ, and each tier reuses its own finished runs.
        out_dir=args.out or ("runs/bench/lm" if size == "quick" else f"runs/bench/lm_{size}"),
        size=size,
        models=_split_list(args.models),
        data=os.path.expanduser(args.data) if args.data else args.data,
        seeds=_split_list(args.seeds, int),
        tokenizer=args.tokenizer,
    )
    return 0


def cmd_bench_extrapolate(args: argparse.Namespace) -> int:
    from hierseq.bench.extrapolate import run_extrapolate_bench

    run_extrapolate_bench(
        out_dir=args.out,
        models=_split_list(args.models),
        eval_len=args.eval_len,
        n_windows=args.windows,
        seed=args.seed,
        data=os.path.expanduser(args.data) if args.data else args.data,
        threads=args.threads,
    )
    return 0


def cmd_bench_recall(args: argparse.Namespace) -> int:
    from hierseq.bench.recall import run_recall_bench, run_recall_sweep

    out = args.out or ("runs/bench/recall_sweep" if args.sweep else "runs/bench/recall")
    kwargs = dict(
        out_dir=out,
        seq_len=args.seq_len,
        n_pairs=args.n_pairs,
        vocab_size=args.vocab_size,
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    kwargs.update({k: v for k, v in (("steps", args.steps), ("stop_at", args.stop_at)) if v is not None})
    for key, text, cast in (
        ("models", args.models, str),
        ("widths", args.widths, int),
        ("lrs", args.lrs, float),
        ("seeds", args.seeds, int),
    ):
        values = _split_list(text, cast)
        if values:
            kwargs[key] = values
    if args.sweep:
        run_recall_sweep(**kwargs)
    else:
        run_recall_bench(**kwargs)
    return 0


def cmd_bench_signals(args: argparse.Namespace) -> int:
    from hierseq.bench.signals import run_signals_bench

    if args.long:
        return _bench_long_signals(args)
    run_signals_bench(
        out_dir=args.out,
        quick=args.quick,
        seeds=_split_list(args.seeds, int) or (0, 1, 2),
        tasks=_split_list(args.tasks),
        models=_split_list(args.models),
        threads=args.threads,
    )
    return 0


def _bench_long_signals(args: argparse.Namespace) -> int:
    from hierseq.bench.signals_long import run_long_signals_bench

    out = "runs/bench/signals_long" if args.out == "runs/bench/signals" else args.out
    options = [("--seeds", args.seeds), ("--tasks", args.tasks), ("--models", args.models), ("--threads", args.threads)]
    command = " ".join(
        ["hierseq bench signals --long", *(["--quick"] if args.quick else [])]
        + [f"{flag} {value}" for flag, value in options if value is not None]
        + ([f"--out {out}"] if out != "runs/bench/signals_long" else [])
    )
    run_long_signals_bench(
        out_dir=out,
        quick=args.quick,
        seeds=_split_list(args.seeds, int) or (0, 1, 2),
        tasks=_split_list(args.tasks),
        models=_split_list(args.models),
        threads=args.threads,
        command=command,
    )
    return 0


def cmd_bench_recon(args: argparse.Namespace) -> int:
    from hierseq.bench.recon import run_recon_bench

    run_recon_bench(
        out_dir=args.out,
        quick=not args.full,
        seeds=_split_list(args.seeds, int) or (0,),
        steps=args.steps,
        lengths=_split_list(args.lengths, int) or None,
        threads=args.threads,
        skip_speed=args.skip_speed,
        tasks=_split_list(args.tasks) or ("bytes", "signal"),
    )
    return 0


# ---------------------------------------------------------------------------- parser
def _threads_and_out(p: argparse.ArgumentParser, out: str, func: Any) -> None:
    """The options every training benchmark shares, and its handler."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=out, help="output directory")
    p.set_defaults(func=func)


def _numeric_options(p: argparse.ArgumentParser, helps: dict[str, str] | None = None, **defaults: float) -> None:
    """One ``--flag`` per keyword, typed by its default: ``seq_len=64`` adds ``--seq-len`` (int, 64)."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(default), default=default, help=(helps or {}).get(name))


def _list_options(p: argparse.ArgumentParser, **helps: str) -> None:
    """One comma-separated ``--flag`` per keyword: ``seeds="seeds (default 0)"`` adds ``--seeds``."""
    for name, text in helps.items():
        p.add_argument("--" + name.replace("_", "-"), help=f"comma-separated {text}")


TOP_EPILOG = (
    "Errors end in one line on stderr, `hierseq: error: ARGUMENT=VALUE: RULE`, with exit code 2 for bad input "
    "and 1 for a run that failed (a write into the output folder, a non-finite loss); 130 after Ctrl-C. "
    "HIERSEQ_DEBUG=1 shows the traceback instead."
)

TRAIN_EPILOG = (
    "An --out folder that already holds a run (train_config.yaml, metrics.jsonl, loss.png, final/, checkpoint/) "
    "is refused unless --resume continues it or --overwrite replaces it. Nothing is written before the whole run "
    "is validated (config, paths, data, model, checkpoint), so a refused or invalid run leaves the folder as it "
    "was. Ctrl-C stops after the current step and saves (--resume continues); a second Ctrl-C aborts."
)


TOKENIZER_HELP = (
    "bytes, bpe:VOCAB_SIZE (a byte-level BPE trained on the training split, offline, deterministic) or "
    "hf:PATH_OR_NAME (a tokenizer.json, a folder holding one, or a Hugging Face hub name); subwords need pip "
    "install 'hierseq[hf]'. The tokenizer sets vocab_size and is saved with the model"
)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hierseq", description="Hierarchical sequence models, measured honestly.", epilog=TOP_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    sub.add_parser("list", help="registered models").set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters and config of a model")
    p.add_argument("model", help="registered model name (see `hierseq list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (d_model=128)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train any model on its task (YAML config + overrides)", epilog=TRAIN_EPILOG)
    p.add_argument("--config", help="YAML file of TrainConfig fields (see configs/)")
    p.add_argument("--model", help="registered model name (overrides the config; default: transformer)")
    p.add_argument(
        "--data",
        help="text file or folder, ~ expanded (default: the embedded Austen corpus). A file is split by position "
        "90/5/5; a folder's *.txt/*.md/*.text files by file from 4 files on (the last ~5%% each, at least one, "
        "to val and test), else joined and split by position. Or hf:DATASET[:CONFIG][@SPLIT]: a Hugging Face "
        "dataset (hub name, or a local .parquet/.jsonl/.json/.txt/.csv file or folder) through `datasets` (pip "
        "install 'hierseq[data]'). The run records the absolute path.",
    )
    p.add_argument("--tokenizer", help=TOKENIZER_HELP + " (default: the config's, else bytes)")
    p.add_argument("--out", help="output directory (default: the config's out_dir, else runs/train)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its checkpoint/ (bit-exact with unchanged settings). Changed lr, "
        "warmup_steps, min_lr_ratio, schedule_steps, max_steps, weight_decay, beta1, beta2, grad_clip (and "
        "the eval/log/save settings) apply from the resumed step on, are logged, and are recorded in "
        "train_config.yaml and metrics.jsonl; model, task, data, tokenizer, seq_len, batch_size, loader and seed "
        "must match (the run's saved tokenizer is read, never trained again)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in OUT: its run files are removed once the new run is validated (other "
        "files stay); without it (or --resume) such an OUT is refused",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a TrainConfig field (lr=3e-4), a model field (model.d_model=128) or a task option "
        "(task.n_pairs=8)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss and bits per byte of a saved causal LM (with its saved tokenizer)")
    p.add_argument("model_dir", help="a hierseq.save or save_pretrained directory, or a training run directory")
    p.add_argument(
        "--data",
        help="text file or folder, or hf:DATASET[:CONFIG][@SPLIT] (default: the corpus the run recorded, for a "
        "run directory; else the embedded Austen corpus); the command prints which corpus it read",
    )
    p.add_argument("--split", choices=["train", "val", "test"], default="val", help="the split to score")
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help=f"window length (default: the run's seq_len, else {DEFAULT_EVAL_SEQ_LEN})",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument(
        "--max-batches", type=positive_int, default=None, help="score at most this many batches (default: all)"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a saved causal LM")
    p.add_argument("model_dir", help="a hierseq.save or save_pretrained directory, or a training run directory")
    p.add_argument("--prompt", default="It is a truth universally acknowledged", help="text to continue")
    _numeric_options(
        p,
        {
            "max_new_tokens": "tokens to generate (bytes, for a byte-level model)",
            "temperature": "sampling temperature; 0 = greedy",
            "top_p": "nucleus sampling: keep the most probable tokens up to this mass, in (0, 1]",
            "seed": "seed of the sampler",
        },
        max_new_tokens=200,
        temperature=0.8,
        top_p=0.95,
        seed=0,
    )
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most probable tokens (default: all)")
    p.set_defaults(func=cmd_generate)

    demo_help = (
        "train every causal LM (or --models) on the embedded corpus at matched parameters and budget, time "
        "a speed curve, sample the best model; writes OUT/report.md (make demo)"
    )
    p = sub.add_parser(
        "demo",
        help=demo_help,
        description=f"{demo_help[0].upper()}{demo_help[1:]}. About 12 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--models", help="comma-separated causal LMs or variants (default: every causal LM)")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (JSON + Markdown + plot under runs/)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)

    p = bench_sub.add_parser("lm", help="every causal LM on the corpus at matched parameters and budget")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 10 minutes on 2 CPU cores (default)")
    size.add_argument(
        "--standard",
        action="store_true",
        help="about 40 minutes on 2 CPU cores: three seeds, mean ± std, learning curves, an equal wall-clock column",
    )
    size.add_argument("--full", action="store_true", help="larger models, longer, three seeds")
    p.add_argument("--models", help="comma-separated registry names (default: every causal LM)")
    p.add_argument(
        "--data", help="text file or folder, or hf:DATASET[:CONFIG][@SPLIT] (default: the embedded Austen corpus)"
    )
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help=TOKENIZER_HELP + "; one tokenizer for every model, bits per byte comparable across tokenizers",
    )
    p.add_argument("--seeds", help="comma-separated seeds (default: the size's seeds)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--out", help="output directory (default: runs/bench/lm; --standard / --full: runs/bench/lm_standard / lm_full)"
    )
    p.set_defaults(func=cmd_bench_lm)

    p = bench_sub.add_parser(
        "extrapolate", help="every causal LM trained at 256 tokens, bits/byte by position out to 8192"
    )
    p.add_argument("--models", help="comma-separated registry names (default: every causal LM)")
    p.add_argument("--data", help="text file or folder (default: the embedded Austen corpus)")
    _numeric_options(
        p,
        {"eval_len": "tokens per scored window", "windows": "validation windows scored", "seed": "training seed"},
        eval_len=8192,
        windows=16,
        seed=0,
    )
    _threads_and_out(p, "runs/bench/extrapolate", cmd_bench_extrapolate)

    p = bench_sub.add_parser("recall", help="multi-query associative recall (MQAR) accuracy vs width")
    _list_options(
        p,
        models="causal LMs or variants (default: hamt,linear_attn,transformer; --sweep: every causal LM)",
        widths="d_model values (default 64; --sweep: 16,32,64)",
        lrs="learning rates to sweep (default 1e-3,3e-3; --sweep: 3e-3)",
        seeds="seeds (default 0; --sweep: 0,1,2)",
    )
    recall_helps = {
        "seq_len": "sequence length",
        "vocab_size": "vocabulary size",
        "steps": "training steps per run",
        "n_layers": "layers per model",
        "n_pairs": "key-value pairs per sequence",
        "batch_size": "sequences per training step",
        "stop_at": "stop a run early once its accuracy reaches this",
    }
    _numeric_options(p, recall_helps, seq_len=64, n_pairs=4, vocab_size=256, n_layers=2, batch_size=64)
    # No argparse defaults: --sweep has its own (every causal LM, widths 16,32,64, 3 seeds, shorter runs).
    p.add_argument("--steps", type=int, help="training steps per run (default 1000; --sweep: 300)")
    p.add_argument(
        "--stop-at", type=float, help="stop a run early once its accuracy reaches this (default 1.0; --sweep: 0.99)"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="accuracy against state size for every causal LM (default) over widths 16,32,64 and seeds 0,1,2, "
        "with a Pareto plot; resumable (default out: runs/bench/recall_sweep)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="output directory (default: runs/bench/recall; --sweep: runs/bench/recall_sweep)")
    p.set_defaults(func=cmd_bench_recall)

    p = bench_sub.add_parser("signals", help="HiSS vs flat models on synthetic sensor tasks (MSE)")
    p.add_argument("--quick", action="store_true", help="smoke size: seconds, numbers meaningless")
    p.add_argument(
        "--long",
        action="store_true",
        help="the long, high-rate tasks (imu9_odometry, tactile_drift; 2,000-step sequences at 100 Hz), equal "
        "steps and equal wall-clock, with cost per 1k steps (default out: runs/bench/signals_long)",
    )
    _list_options(p, seeds="seeds (default 0,1,2)", tasks="tasks (default: all)", models="model kinds (default: all)")
    _threads_and_out(p, "runs/bench/signals", cmd_bench_signals)

    p = bench_sub.add_parser("recon", help="HAMA vs flat masked autoencoder: reconstruction and speed")
    p.add_argument("--full", action="store_true", help="longer training (default: quick)")
    _list_options(
        p,
        seeds="seeds (default 0)",
        tasks="tasks: bytes,signal (default both)",
        lengths="sequence lengths of the speed part (default 1024..16384)",
    )
    p.add_argument("--steps", type=int, help="training steps per run (default: the size's)")
    p.add_argument("--skip-speed", action="store_true", help="skip the speed part")
    _threads_and_out(p, "runs/bench/recon", cmd_bench_recon)

    p = bench_sub.add_parser("speed", help="time and memory vs sequence length")
    p.add_argument("--out", default="runs/bench/speed", help="output directory")
    p.add_argument(
        "--models",
        help="comma-separated registry names or variants NAME:KEY=VALUE[+KEY=VALUE] "
        "(e.g. tree,tree:sibling_mode=exact); default: every causal LM",
    )
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 512..32768)")
    speed_helps = {
        "time_budget": "seconds per model before stopping it",
        "repeats": "timed repeats per length",
        "d_model": "model width",
        "n_layers": "layers per model",
        "batch_size": "sequences per batch",
    }
    _numeric_options(p, speed_helps, repeats=3, time_budget=60.0, d_model=256, n_layers=4, batch_size=1)
    p.add_argument(
        "--gen-contexts",
        default="1024,4096,16384",
        help="comma-separated context lengths for the cached generation cost per new token ('' or 0: skip)",
    )
    p.add_argument("--gen-tokens", type=int, default=64, help="timed cached steps per generation context")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also time the PyPI peers (x-transformers, mambapy, h-transformer-1d, torch-hd) at the same shapes "
        "(pip install 'hierseq[peers]')",
    )
    p.set_defaults(func=cmd_bench_speed)
    return parser


def _run(argv: list[str] | None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The ``hierseq`` command; returns the exit code (errors: one line on stderr, see :func:`run_entry_point`)."""
    return run_entry_point(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
