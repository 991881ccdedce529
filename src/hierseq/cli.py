"""The ``hierseq`` command: list, info, train, eval, generate, demo, bench.

Bad input (unknown model, bad override, missing path, invalid value) ends in a one-line
``hierseq: error: ...`` on stderr and a non-zero exit code; set HIERSEQ_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_USAGE = 2


def build_train_config(args: argparse.Namespace):
    """The run's :class:`~hierseq.training.TrainConfig` (any model kind) from (YAML file) <- (--model,
    --data, --out, --resume flags) <- (--set overrides, :mod:`hierseq.training.overrides`)."""
    from hierseq.training.config import TrainConfig, load_yaml_mapping
    from hierseq.training.overrides import apply_overrides

    data: dict[str, Any] = load_yaml_mapping(args.config) if args.config else {}
    for key, value in (("model", args.model), ("data", args.data), ("out_dir", args.out)):
        if value:
            data[key] = value
    if args.resume:
        data["resume"] = True
    cfg = TrainConfig.from_dict(apply_overrides(data, args.set or []))
    if cfg.data is not None and not Path(cfg.data).exists():
        raise FileNotFoundError(f"data={cfg.data!r}: no such file or directory")
    return cfg


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
    print("config:")
    print(yaml.safe_dump(model.config.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  ").join(["  ", ""]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hierseq.training import train
    from hierseq.training.tasks import task_class

    cfg = build_train_config(args)
    result = train(cfg)
    task = task_class(cfg.task)(cfg)
    tested = f", test {task.describe(result['test'])}" if result["test"] is not None else ""
    print(
        f"done: step {result['step']}, val {task.describe(result['val'])}{tested}, "
        f"{result['tokens_per_s']:.0f} tokens/s -> {result['out_dir']}"
    )
    return 0


def _load_model_dir(path: str):
    import hierseq

    p = Path(path)
    if (p / "final" / "config.json").is_file():  # a training run directory
        p = p / "final"
    elif (p / "checkpoint" / "config.json").is_file():
        p = p / "checkpoint"
    return hierseq.load(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from hierseq.data.corpora import load_corpus
    from hierseq.training import evaluate

    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"data={args.data!r}: no such file or directory")
    model = _load_model_dir(args.model_dir)
    corpus = load_corpus(args.data)
    tokens = getattr(corpus, args.split)
    result = evaluate(model, tokens, args.seq_len, args.batch_size, args.max_batches)
    print(f"{args.split}: loss {result['loss']:.4f} nats, {result['bpb']:.4f} bits/byte over {result['tokens']} tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import hierseq
    from hierseq.data.tokenizer import ByteTokenizer

    model = _load_model_dir(args.model_dir)
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt)
    if prompt.numel() == 0:
        raise ValueError("--prompt '': must contain at least one character")
    print(args.prompt, end="", flush=True)
    pending: list[int] = []

    def stream(step: int, tokens: torch.Tensor) -> None:
        # Bytes of one UTF-8 character can arrive over several steps: print only what decodes.
        pending.append(int(tokens[0]))
        try:
            text = bytes(pending).decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) < 4:
                return
            text = bytes(pending).decode("utf-8", errors="replace")
        print(text, end="", flush=True)
        pending.clear()

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

    run_lm_bench(
        out_dir=args.out,
        size="full" if args.full else "quick",
        models=_split_list(args.models),
        data=args.data,
        seeds=_split_list(args.seeds, int),
    )
    return 0


def cmd_bench_recall(args: argparse.Namespace) -> int:
    from hierseq.bench.recall import run_recall_bench

    kwargs = dict(
        out_dir=args.out,
        seq_len=args.seq_len,
        n_pairs=args.n_pairs,
        vocab_size=args.vocab_size,
        steps=args.steps,
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        stop_at=args.stop_at,
        threads=args.threads,
    )
    for key, text, cast in (
        ("models", args.models, str),
        ("widths", args.widths, int),
        ("lrs", args.lrs, float),
        ("seeds", args.seeds, int),
    ):
        values = _split_list(text, cast)
        if values:
            kwargs[key] = values
    run_recall_bench(**kwargs)
    return 0


def cmd_bench_signals(args: argparse.Namespace) -> int:
    from hierseq.bench.signals import run_signals_bench

    run_signals_bench(
        out_dir=args.out,
        quick=args.quick,
        seeds=_split_list(args.seeds, int) or (0, 1, 2),
        tasks=_split_list(args.tasks),
        models=_split_list(args.models),
        threads=args.threads,
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
    p.add_argument("--out", default=out)
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hierseq", description="Hierarchical sequence models, measured honestly.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="registered models").set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters and config of a model")
    p.add_argument("model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train any model on its task (YAML config + overrides)")
    p.add_argument("--config", help="YAML file of TrainConfig fields (see configs/)")
    p.add_argument("--model", help="registered model name (overrides the config)")
    p.add_argument("--data", help="text file or folder (default: the embedded Austen corpus)")
    p.add_argument("--out", help="output directory (default from config: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a TrainConfig field (lr=3e-4), a model field (model.d_model=128) or a task option "
        "(task.n_pairs=8)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss and bits per byte of a saved model")
    p.add_argument("model_dir", help="a hierseq.save directory or a training run directory")
    p.add_argument("--data", help="text file or folder (default: the embedded Austen corpus)")
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a saved model")
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    _numeric_options(p, max_new_tokens=200, temperature=0.8, top_p=0.95, seed=0)
    p.add_argument("--top-k", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="train the control on the embedded corpus and report (make demo)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--models", help="comma-separated causal LMs or variants (default: every causal LM)")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks (JSON + Markdown + plot under runs/)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)

    p = bench_sub.add_parser("lm", help="every causal LM on the corpus at matched parameters and budget")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 10 minutes on 2 CPU cores (default)")
    size.add_argument("--full", action="store_true", help="larger models, longer, three seeds")
    p.add_argument("--models", help="comma-separated registry names (default: every causal LM)")
    p.add_argument("--data", help="text file or folder (default: the embedded Austen corpus)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the size's seeds)")
    p.add_argument("--out", default="runs/bench/lm")
    p.set_defaults(func=cmd_bench_lm)

    p = bench_sub.add_parser("recall", help="multi-query associative recall (MQAR) accuracy vs width")
    _list_options(
        p,
        models="causal LMs or variants (default: hamt,linear_attn,transformer)",
        widths="d_model values (default 64)",
        lrs="learning rates to sweep (default 1e-3,3e-3)",
        seeds="seeds (default 0)",
    )
    recall_helps = {
        "n_pairs": "key-value pairs per sequence",
        "batch_size": "sequences per training step",
        "stop_at": "stop a run early once its accuracy reaches this",
    }
    _numeric_options(
        p, recall_helps, seq_len=64, n_pairs=4, vocab_size=256, steps=1000, n_layers=2, batch_size=64, stop_at=1.0
    )
    _threads_and_out(p, "runs/bench/recall", cmd_bench_recall)

    p = bench_sub.add_parser("signals", help="HiSS vs flat models on synthetic sensor tasks (MSE)")
    p.add_argument("--quick", action="store_true", help="smoke size: seconds, numbers meaningless")
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
    p.add_argument("--skip-speed", action="store_true")
    _threads_and_out(p, "runs/bench/recon", cmd_bench_recon)

    p = bench_sub.add_parser("speed", help="time and memory vs sequence length")
    p.add_argument("--out", default="runs/bench/speed")
    p.add_argument(
        "--models",
        help="comma-separated registry names or variants NAME:KEY=VALUE[+KEY=VALUE] "
        "(e.g. tree,tree:sibling_mode=exact); default: every causal LM",
    )
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 512..32768)")
    speed_helps = {"time_budget": "seconds per model before stopping it"}
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


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("HIERSEQ_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hierseq: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hierseq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
