"""Run logging: ``metrics.jsonl`` (one JSON object per log / eval event) and the ``loss.png`` curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All events of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class MetricsWriter:
    """Appends events to ``out_dir/metrics.jsonl``.

    On resume, events after the checkpoint step (written by the interrupted run after its last save) and
    the end-of-run test events are dropped first, so the file reads as one uninterrupted run.
    ``eval_steps`` are the steps that have an evaluation event (so an evaluation is never logged twice for
    one step)."""

    def __init__(self, out_dir: str | Path, resume_step: int | None) -> None:
        self.path = Path(out_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is not None:
            kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step and e.get("event") != "test"]
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        self.eval_steps = {e.get("step") for e in kept if e.get("event") == "eval"}

    def write(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if event.get("event") == "eval":
            self.eval_steps.add(event.get("step"))


class LossPlotter:
    """Writes ``loss.png`` (train loss and val loss vs step) with matplotlib's object API (no pyplot, so
    no global backend change). Without matplotlib only the plot is skipped, and that is said once."""

    def __init__(self, out_dir: str | Path, log=print, ylabel: str = "loss (nats / byte)") -> None:
        self.path = Path(out_dir) / PLOT_NAME
        self.log = log
        self.ylabel = ylabel
        self._warned = False

    def plot(self, events: list[dict[str, Any]]) -> bool:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned:
                self.log("matplotlib is not installed: skipping loss.png (metrics.jsonl has the numbers)")
                self._warned = True
            return False
        train = [(e["step"], e["loss"]) for e in events if _finite(e.get("loss"))]
        val = [(e["step"], e["val_loss"]) for e in events if _finite(e.get("val_loss"))]
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(self.ylabel)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        fig.tight_layout()
        tmp = self.path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        tmp.replace(self.path)
        return True


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
