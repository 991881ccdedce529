"""Shared report writing for benchmarks: one JSON with the raw numbers, one Markdown table, the
machine facts next to them (numbers without their machine are not worth quoting)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import config_error
from ..serialization import atomic_write


def machine_facts() -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def code_digest() -> str:
    """A digest of the package source that decides a run's numbers: every ``.py`` file of hierseq except the
    benchmarks and the command line (editing a report must not invalidate the runs it reports)."""
    root = Path(__file__).resolve().parents[1]  # the hierseq package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("bench/") or rel == "cli.py":
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or None outside a git checkout."""
    here = Path(__file__).resolve().parents[1]  # the hierseq package

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        if not commit:
            return None
        # Untracked files count inside the package (a new mixer not yet added is code that ran).
        changed = git("status", "--porcelain", "--untracked-files=no") or git("status", "--porcelain", "--", ".")
        return commit + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _command() -> str:
    """The command line that started this process, as a user would type it."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog == "-c":
        prog = "python -c"
    elif prog == "hierseq" or sys.argv[0].endswith("hierseq/__main__.py"):
        prog = "hierseq"
    return " ".join([prog, shlex.join(sys.argv[1:])]) if sys.argv[1:] else prog


def _load() -> list[float]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(v, 2) for v in load]


# The load and the checkout's commit when a benchmark module first imported this one, i.e. about when the
# benchmark started: the code that ran is the commit at the start (HEAD may move during a long run).
_LOAD_AT_START = _load()
_STARTED = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
_COMMIT_AT_START = _git_commit()


def run_record() -> dict[str, Any]:
    """What a quoted number needs beside it: commit, exact command, thread count and the machine's load
    averages (1, 5 and 15 minutes) when the benchmark started (when its module was first imported in this
    process) and when it finished. A long run's load in between is not sampled."""
    return {
        "commit": _COMMIT_AT_START,
        "commit_at_end": _git_commit(),
        "command": _command(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "started": _STARTED,
        "load_avg_1_5_15_at_start": _LOAD_AT_START,
        "load_avg_1_5_15": _load(),
        "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def record_line(record: dict[str, Any]) -> str:
    """One Markdown line naming a run's conditions (from :func:`run_record`)."""

    def load(key: str) -> str:
        return "/".join(f"{v:.1f}" for v in record[key])

    return (
        f"Recorded {record['started']} - {record['finished']}: commit `{record['commit'] or 'unknown'}`"
        + (
            f" (HEAD at the end: `{record['commit_at_end']}`)"
            if record.get("commit_at_end", record["commit"]) != record["commit"]
            else ""
        )
        + ", command "
        f"`{record['command']}`, {record['threads']} threads on {record['cpus']} CPUs, load average (1/5/15 min) "
        f"{load('load_avg_1_5_15_at_start')} at the start, {load('load_avg_1_5_15')} at the end."
    )


def set_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for a benchmark (None: leave torch's); refuses < 1 with a config error."""
    if threads is None:
        return
    if threads < 1:
        raise config_error("threads", threads, "must be >= 1")
    torch.set_num_threads(threads)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    name: str,
    data: dict[str, Any],
    markdown: str,
    plot: Callable[[Path], None] | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """Write ``name.json`` and ``name.md`` under ``out_dir`` (each replaced atomically), then the figure
    ``name.png`` with ``plot(path)`` when given; ``echo`` prints the Markdown. Both files carry the run's
    record (:func:`run_record`: commit, command, threads, load), ``data["record"]`` and the Markdown's last
    line. Returns ``data``, so a benchmark can end with ``return write_report(...)``."""
    data["record"] = run_record()
    markdown = markdown.rstrip() + "\n\n" + record_line(data["record"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(out / f"{name}.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown.rstrip() + "\n"))
    if plot is not None:
        plot(out / f"{name}.png")
    if echo:
        print(markdown.rstrip(), flush=True)
    return data


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a note) when the plots extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping plots (pip install 'hierseq[plots]')")
        return None
    return plt


def plot_scaling(ax: Any, series: dict[str, list[dict[str, Any]]], x: str, y: str, title: str, xlabel: str) -> None:
    """One log-log panel: per label, ``row[y]`` against ``row[x]`` over its rows with status "ok" (values
    floored at 1e-3 so a zero memory reading stays on a log axis); a legend when any curve was drawn."""
    for label, rows in series.items():
        ok = [r for r in rows if r["status"] == "ok"]
        if ok:
            ax.plot([r[x] for r in ok], [max(r[y], 1e-3) for r in ok], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def parse_model_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """A benchmarked model variant: ``"tree"`` or ``"tree:sibling_mode=exact+n_summary=4"``.

    Returns (label, registry name, config overrides). Values are parsed as YAML scalars. Variants let
    one run measure several modes of a model next to the control in the same process."""
    import yaml

    name, _, rest = spec.partition(":")
    name = name.strip()
    overrides: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split("+"))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"models={spec!r}: a variant must look like NAME:KEY=VALUE[+KEY=VALUE]")
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        overrides[key.strip()] = value
    return spec.strip(), name, overrides


def check_model_specs(specs: list[str], kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Parse variant specs and check every name is a registered model of ``kind``."""
    import hierseq

    known = hierseq.list_models(kind=kind)
    parsed = [parse_model_spec(s) for s in specs]
    for _, name, _ in parsed:
        if name not in known:
            raise ValueError(f"models={name!r}: not a registered {kind} model; choose from {known}")
    return parsed
