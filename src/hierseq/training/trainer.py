"""The one training loop, for every model kind: AdamW + warmup/cosine, clipping, accumulation, periodic
eval, atomic pickle-free checkpoints with bit-exact resume, the NaN stop, metrics.jsonl + loss.png, a
progress bar, and DDP under ``torchrun``.

What differs between model kinds - data, the loss of a micro-batch, metrics - is a task adapter
(:mod:`hierseq.training.tasks`, chosen by ``TrainConfig.task``). Models are reached only through the
registry (``hierseq.build_model``), so every registered model of a kind trains with the same loop, data,
budget and metrics.

Batch semantics: ``batch_size`` is the GLOBAL number of sequences per optimiser step. Under DDP each of
the W ranks takes its B / W rows of the same global batch (every task's batch source draws the global
batch and keeps its rows), and each rank splits its rows into ``grad_accum`` micro-batches. Micro-losses
are divided by ``grad_accum`` and DDP averages gradients over ranks, so the update equals that of one
process on the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import RunStopped, config_error
from ..registry import build_config, build_model, count_parameters
from ..serialization import WEIGHTS_NAME, atomic_write, load_state_exact
from .checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, save_final
from .config import TrainConfig
from .metrics import LossPlotter, MetricsWriter, read_metrics
from .run_dir import (
    TRAIN_CONFIG_NAME,
    check_out_dir,
    clear_run_files,
    existing_run_files,
    prepare_out_dir,
    same_data,
)
from .tasks import task_class
from .tasks.base import resolve_options
from .tasks.lm import evaluate

__all__ = ["TrainConfig", "build_optimizer", "build_scheduler", "evaluate", "lr_factor", "train"]

# Fields whose change would make a resumed run a different experiment (other data, shapes or model).
RESUME_MUST_MATCH = ("model", "task", "seq_len", "batch_size", "loader", "seed", "data", "tokenizer")
# Fields a resume may change without it being news (how the run is watched, not what it does).
RESUME_QUIET = ("resume", "progress", "device", "out_dir", "model_config", "task_options")


# =============================================================================================== parts
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on norms, biases and embeddings.

    1-D parameters (norm scales, biases) and ``nn.Embedding`` weights get no decay: decaying them
    shrinks scales/token vectors without regularising anything useful. A tied LM head shares the
    embedding's Parameter object, so it is classified (and optimised) once, as an embedding."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() already yields shared parameters once
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of ``lr`` for optimiser step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps`` (constant after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.schedule_steps or cfg.max_steps

    # A plain function (not a callable object) so LambdaLR's state_dict stores no schedule parameters:
    # the schedule always comes from the current config.
    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, total, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# =============================================================================================== distributed
@dataclass
class DistEnv:
    """Process layout: a single process, or one rank of a ``torchrun`` group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def setup(cls, device: str) -> DistEnv:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise config_error("device", device, "CUDA is not available on this machine")
        if world_size <= 1:
            return cls(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"), False)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not torch_dist.is_initialized()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if owns:
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, dev, owns)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), on CPU."""
        if not self.distributed:
            return [t.cpu()]
        comm = t.to(self.device)
        parts = [torch.empty_like(comm) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, comm)
        return [p.cpu() for p in parts]

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def teardown(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# =============================================================================================== loop
def _print(message: str) -> None:
    print(message, flush=True)


def train(cfg: TrainConfig, log: Callable[[str], None] | None = _print, overwrite: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.task``; returns ``{"out_dir", "task", "step", "val", "val_loss",
    "val_<metric>" for every validation metric, "test" (the test metrics, or None), "tokens_per_s",
    "n_params", "stopped_reason", "tokens", "train_loss", "elapsed_s"}`` (+ ``"best_step"`` with
    ``keep_best``). ``tokens`` counts sequence positions (bytes or subword tokens, MQAR tokens, signal
    steps).

    Everything is validated (config, ``out_dir``, data, model, the checkpoint to resume) before anything
    is written. An ``out_dir`` that already holds a run is continued with ``cfg.resume``; otherwise it is
    replaced when ``overwrite`` (its run files are removed once the new run has been validated, so the
    folder never mixes two runs) and refused when not (``hierseq train`` refuses unless --overwrite).

    ``stopped_reason`` is "max_steps", "max_time", "target" (the task's early stop, e.g. MQAR
    ``stop_at``) or "interrupted" (Ctrl-C in a single process: the run stops after the current step and
    saves, so --resume continues it; a second Ctrl-C aborts). A non-finite loss raises
    :class:`~hierseq.config.RunStopped` without writing anything over the last good checkpoint. ``log``
    receives the progress lines (rank 0 only; None: silent)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    env = DistEnv.setup(cfg.device)
    try:
        return _Trainer(cfg, env, log, overwrite).run()
    finally:
        env.teardown()


class _Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, log: Callable[[str], None] | None, overwrite: bool) -> None:
        self.cfg, self.env, self._log = cfg, env, log
        self.overwrite = overwrite
        self.out_dir = Path(cfg.out_dir)
        self.pbar = None
        self.task = task_class(cfg.task)(cfg)
        self.parts = self.task.loss_parts
        self.resume_history: list[dict[str, Any]] = []  # every resume that changed a field: {"step", "changed"}
        self.resume_changes: dict[str, list[Any]] = {}  # this session's: field -> [checkpoint's, now]
        self.interrupted = False
        self.resumed = False
        self.created_dirs: list[Path] = []

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if not self.env.is_main or self._log is None:
            return
        if self.pbar is not None:
            self.pbar.write(message)
        else:
            self._log(message)

    def _fresh_acc(self) -> dict[str, float]:
        return {"loss": 0.0, **{p: 0.0 for p in self.parts}, "steps": 0, "tokens": 0, "time": 0.0}

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        per_rank = env.world_size * cfg.grad_accum
        if cfg.batch_size % per_rank:
            raise config_error(
                "batch_size",
                cfg.batch_size,
                f"must be divisible by world_size * grad_accum = {env.world_size} * {cfg.grad_accum}",
            )
        self.micro_batch = cfg.batch_size // per_rank
        # Where the run goes, and what happens to a run already there: decided before anything is loaded
        # or written (every rank checks, so every rank fails alike and rank 0 reports it once).
        check_out_dir(self.out_dir)
        resume_from = find_checkpoint(self.out_dir) if cfg.resume else None
        replaced = prepare_out_dir(self.out_dir, cfg.resume, resume_from is not None, self.overwrite)
        resume_state = None
        if resume_from is not None:  # a resume that cannot match fails before any data is read
            resume_state = load_trainer_state(resume_from)
            self._check_resume_config(resume_state, resume_from)
        # Data (and its tokenizer; a resumed run's from its checkpoint): its errors come before any model.
        self.task.resume_from = resume_from
        self.task.setup(env.rank, env.world_size, env.device)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        overrides = {**cfg.model_overrides(), **self.task.data_model_config()}
        self.model = build_model(cfg.model, **overrides).to(env.device)
        self.task.check_model(self.model)
        self.task.prepare_model(self.model)
        self.model.train()
        self.n_params = count_parameters(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        if env.distributed:
            # Ranks get different dropout masks, as rows of one big batch would.
            torch.manual_seed(cfg.seed + 1 + env.rank)

        self.step, self.tokens, self.prior_elapsed = 0, 0, 0.0
        self.log_acc = self._fresh_acc()
        self.best: dict[str, Any] | None = None  # keep_best: {"step", "metrics", "weights" (CPU)}
        self.last_checkpoint: Path | None = None
        if cfg.resume and resume_from is None:
            self.log(f"resume: no checkpoint in {str(self.out_dir)!r}; starting from scratch")
        if resume_from is not None:
            self._restore(resume_from, resume_state)
            self.resumed = True

        self.ddp_model: nn.Module = self.model
        if env.distributed:
            ids = [env.local_rank] if env.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        # The run is valid: only now is anything written.
        if env.is_main:
            if replaced:
                clear_run_files(self.out_dir, replaced)
                self.log(f"overwrite: removed the previous run's {', '.join(replaced)} from {str(self.out_dir)!r}")
            # The folders this run creates (out_dir and missing parents), removed again if it saves nothing.
            self.created_dirs = [d for d in (self.out_dir, *self.out_dir.parents) if not d.exists()]
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                # A resumed run's train_config.yaml still describes its checkpoint: it is rewritten with
                # the checkpoint it goes with (see _save), so a resumed session that fails changes neither.
                self._write_train_config()
            self.metrics = MetricsWriter(self.out_dir, self.step if resume_from is not None else None)
            self.plotter = LossPlotter(self.out_dir, self.log, ylabel=f"loss ({self.task.loss_unit})")

    def _write_train_config(self) -> None:
        """``train_config.yaml``: the run's TrainConfig (``hierseq train --config`` reads it), headed by a
        YAML comment per resume that changed a field (the fields below are the latest values)."""
        lines = []
        for entry in self.resume_history:
            changed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in entry["changed"].items())
            lines.append(f"# resumed at step {entry['step']} with {changed}\n")
        text = "".join(lines) + self.cfg.to_yaml()
        atomic_write(self.out_dir / TRAIN_CONFIG_NAME, lambda p: Path(p).write_text(text))

    def _check_resume_config(self, state: dict[str, Any], directory: Path) -> None:
        """Refuse to resume a checkpoint of another experiment: the fields of :data:`RESUME_MUST_MATCH` and the
        task options must be the checkpoint's."""
        cfg = self.cfg
        saved = self._saved_config(state)
        for key in RESUME_MUST_MATCH:
            # Data: the same corpus, compared as resolved paths (see run_dir.same_data).
            same = same_data(saved.get(key), cfg.data) if key == "data" else saved.get(key) == getattr(cfg, key)
            if not same:
                raise ValueError(
                    f"resume: {key}={getattr(cfg, key)!r} differs from the checkpoint's {saved.get(key)!r} in "
                    f"{str(directory)!r}; use the same value, or start a new run (another --out, or --overwrite)"
                )
        task = type(self.task)
        if resolve_options(task.name, task.options, saved["task_options"]) != self.task.opts:
            raise ValueError(
                f"resume: task_options={cfg.task_options!r} differ from the checkpoint's {saved['task_options']!r} "
                f"in {str(directory)!r}; use the same options or a new out_dir"
            )

    @staticmethod
    def _saved_config(state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's TrainConfig, with the defaults of fields older checkpoints lack (they trained lm
        tasks on bytes)."""
        return {"task": "lm", "task_options": {}, "tokenizer": "bytes", **state["train_config"]}

    def _restore(self, directory: Path, state: dict[str, Any]) -> None:
        cfg, env = self.cfg, self.env
        saved = self._saved_config(state)
        task = type(self.task)
        saved_opts = resolve_options(task.name, task.options, saved["task_options"])
        implied = task.implied_model_config(cfg, saved_opts)
        # The data's fields (a tokenizer's vocab_size) are the checkpoint's too: the tokenizer was read from it.
        saved_overrides = {**implied, **saved["model_config"], **self.task.data_model_config()}
        saved_model = build_config(saved["model"], **saved_overrides).to_dict()
        if saved_model != self.model.config.to_dict():
            raise ValueError(
                f"resume: model_config={cfg.model_config!r} builds a different model than the checkpoint's "
                f"{saved['model_config']!r} in {str(directory)!r}"
            )
        from safetensors.torch import load_file

        load_state_exact(self.model, load_file(str(directory / WEIGHTS_NAME), device=str(env.device)), str(directory))
        self.optimizer.load_state_dict(state["optimizer"])
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)
        self.scheduler.load_state_dict(sched)
        self._apply_hyperparameters()
        self.task.source.load_state_dict(state["loader"])
        # RNG: each rank continues its own stream (same world size), else the closest one we have.
        rng = state["rng"]
        torch.set_rng_state(rng["cpu"][env.rank % len(rng["cpu"])])
        if env.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][env.rank % len(rng["cuda"])], env.device)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.prior_elapsed = float(state["elapsed_s"])
        self.log_acc = dict(state["log_acc"])
        self.best = state.get("best")
        self.last_checkpoint = directory
        task_state = state["task"] if "task" in state else {"tbptt_caches": state.get("tbptt_caches")}
        self.task.load_state_dict(task_state, self.log, env.distributed)
        self.log(f"resumed from {str(directory)!r} at step {self.step} ({self.tokens} tokens)")
        self.resume_history = list(state.get("resume_history") or [])
        current = cfg.to_dict()
        self.resume_changes = {
            key: [saved[key], current[key]]
            for key in current
            if key in saved and key not in RESUME_MUST_MATCH + RESUME_QUIET and saved[key] != current[key]
        }
        if self.resume_changes:
            self.resume_history.append({"step": self.step, "changed": dict(self.resume_changes)})
            changed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.resume_changes.items())
            applied = (
                f"applied from step {self.step + 1} on (lr there: {self.optimizer.param_groups[0]['lr']:.4g})"
                if self.step < cfg.max_steps
                else "recorded"
            )
            self.log(f"resume: changed {changed}; {applied}")
        if self.step >= cfg.max_steps:
            self.log(
                f"resume: the checkpoint is at step {self.step} and max_steps={cfg.max_steps}: nothing to train; "
                "evaluating and saving its weights again"
            )

    def _apply_hyperparameters(self) -> None:
        """After loading a checkpoint: the optimiser and schedule hyperparameters of the *current* config.

        ``load_state_dict`` brings back the checkpoint's ``lr`` / ``initial_lr`` / betas / weight decay in
        every parameter group and the scheduler's ``base_lrs``; left alone, a changed ``lr`` (or beta, or
        weight decay) would be recorded but not used. The schedule's shape (warmup, cosine length,
        min_lr_ratio) already comes from the current config through the scheduler's function. With an
        unchanged config every value equals the restored one, so the resumed trajectory stays bit-exact."""
        cfg = self.cfg
        groups = self.optimizer.param_groups
        for group, decay in zip(groups, (cfg.weight_decay, 0.0)):  # the groups of build_optimizer
            group["betas"] = (cfg.beta1, cfg.beta2)
            group["weight_decay"] = decay
            group["initial_lr"] = cfg.lr
        self.scheduler.base_lrs = [cfg.lr for _ in groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in groups:
            group["lr"] = cfg.lr * factor  # what LambdaLR computes for this step
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def _save(self) -> None:
        """Checkpoint (all ranks take part in gathering RNG states; rank 0 writes)."""
        env = self.env
        rng_cpu = env.all_gather(torch.get_rng_state())
        rng_cuda = env.all_gather(torch.cuda.get_rng_state(env.device)) if env.device.type == "cuda" else []
        if env.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "elapsed_s": self.elapsed(),
                "world_size": env.world_size,
                "train_config": self.cfg.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "loader": self.task.source.state_dict(),
                "rng": {"cpu": rng_cpu, "cuda": rng_cuda},
                "log_acc": dict(self.log_acc),
                "task": self.task.state_dict(),
                "best": self.best,
                "resume_history": self.resume_history,
            }
            self.last_checkpoint = save_checkpoint(self.out_dir, self.model, state)
            self._write_train_config()  # describes the checkpoint just written
        else:
            self.last_checkpoint = self.out_dir / "checkpoint"
        self.saved_step = self.step
        env.barrier()  # nobody races ahead (or exits) before the checkpoint exists

    def elapsed(self) -> float:
        return self.prior_elapsed + (time.perf_counter() - self.session_start)

    # ------------------------------------------------------------------ one optimiser step
    def _train_step(self) -> tuple[list[float], bool]:
        """One optimiser step over the global batch; returns ([loss, *loss_parts], stop_requested)."""
        cfg, env = self.cfg, self.env
        batch = self.task.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        n_terms = 1 + len(self.parts)
        sums = torch.zeros(n_terms + 1, dtype=torch.float64, device=env.device)  # loss, parts, stop flag
        for k in range(cfg.grad_accum):
            rows = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            micro = tuple(t[rows].to(env.device, non_blocking=True) for t in batch)
            # Gradients are all-reduced only on the last micro-step.
            sync = env.distributed and k < cfg.grad_accum - 1
            with self.ddp_model.no_sync() if sync else contextlib.nullcontext():
                out = self.task.forward(self.ddp_model, micro, k)
                (out.loss / cfg.grad_accum).backward()
            sums[:n_terms] += torch.stack([out.loss.detach(), *(p.detach() for p in out.parts)]).double()
        sums[:n_terms] /= cfg.grad_accum
        if cfg.max_time_s > 0 and time.perf_counter() - self.session_start >= cfg.max_time_s:
            sums[n_terms] = 1.0
        env.all_sum(sums)  # one collective: mean losses for logging + any rank's stop request
        sums[:n_terms] /= env.world_size
        losses = sums[:n_terms].tolist()
        if not all(math.isfinite(v) for v in losses):
            named = ", ".join(f"{n}={v}" for n, v in zip(("loss", *self.parts), losses))
            self._fail(f"non-finite loss at step {self.step + 1} ({named})")
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not math.isfinite(float(norm)):
                self._fail(f"non-finite gradient norm at step {self.step + 1} (loss={losses[0]})")
        self.optimizer.step()
        self.scheduler.step()
        return losses, bool(sums[n_terms] > 0)

    def _fail(self, what: str) -> None:
        if self.pbar is not None:
            self.pbar.leave = False  # the error is the last thing on the terminal, in one line
            self.pbar.close()
            self.pbar = None
        where = (
            f"last good checkpoint at {str(self.last_checkpoint)!r} (step {self.saved_step}; --resume continues it)"
            if self.last_checkpoint is not None
            else "this run saved no checkpoint yet, so its files are removed"
        )
        raise RunStopped(
            f"{what}: training stopped and nothing was saved over the last good state; {where}. "
            "Try a lower lr, a smaller grad_clip or more warmup_steps."
        )

    # ------------------------------------------------------------------ Ctrl-C
    def _catch_interrupts(self) -> Callable[[], None]:
        """In a single process on the main thread, the first Ctrl-C asks the loop to stop after the
        current step (then the run evaluates and saves as at max_steps, so --resume continues it); a
        second one aborts at once. Returns the function that restores the previous handler."""
        if self.env.distributed or threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            self.log(f"interrupt: stopping after step {self.step + 1} and saving (Ctrl-C again aborts)")

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------------ events
    def _event(self, val: dict[str, float] | None) -> dict[str, Any]:
        acc = self.log_acc
        n = max(acc["steps"], 1)
        event: dict[str, Any] = {
            "event": "eval" if val is not None else "train",
            "step": self.step,
            "tokens": self.tokens,
            "lr": self.scheduler.get_last_lr()[0],
            **{name: acc[name] / n if acc["steps"] else None for name in ("loss", *self.parts)},
            "tokens_per_s": acc["tokens"] / acc["time"] if acc["time"] > 0 else None,
            "elapsed_s": self.elapsed(),
        }
        if val is not None:
            event.update({f"val_{k}": v for k, v in val.items()})
        if event["loss"] is not None:
            self.last_train_loss = event["loss"]
        self.log_acc = self._fresh_acc()
        return event

    def _evaluate(self) -> dict[str, float]:
        # Every rank evaluates the same data with the same weights: identical numbers everywhere, no extra
        # collective, and the same keep_best / early-stop decisions on all ranks.
        val = self.task.evaluate(self.model, "val")
        if self.cfg.keep_best and (self.best is None or val["loss"] < self.best["metrics"]["loss"]):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = {"step": self.step, "metrics": dict(val), "weights": weights}
        return val

    def _write_event(self, val: dict[str, float] | None) -> dict[str, Any]:
        event = self._event(val)  # on every rank, so the accumulators stay in step
        # A resumed run with nothing left to train evaluates the step its checkpoint already logged.
        if self.env.is_main and not (val is not None and self.step in self.metrics.eval_steps):
            self.metrics.write(event)
        return event

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        self.session_start = time.perf_counter()
        self._setup()
        try:
            return self._run()
        except BaseException:
            self._discard_unsaved_run()
            raise

    def _discard_unsaved_run(self) -> None:
        """A new run that fails before its first checkpoint leaves nothing behind: the files it wrote go,
        and so do the folders this run created. (A resumed run keeps its checkpoint and the
        metrics up to it; a run with a checkpoint keeps it for --resume.)"""
        if not self.env.is_main or self.resumed or self.last_checkpoint is not None:
            return
        clear_run_files(self.out_dir, existing_run_files(self.out_dir))
        for folder in self.created_dirs:  # innermost first
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()

    def _run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.saved_step = self.step if self.last_checkpoint is not None else -1
        self.last_train_loss: float | None = None
        self.log(
            f"training {cfg.model} ({self.n_params:,} parameters) on {self.task.description} "
            f"[{env.world_size} process(es), {env.device}] -> {str(self.out_dir)!r}"
        )
        if self.task.details:
            self.log(f"data: {self.task.details}")
        if cfg.warmup_steps >= cfg.max_steps:  # the run ends inside the linear warmup
            peak = lr_factor(cfg.max_steps - 1, cfg.warmup_steps, cfg.schedule_steps or cfg.max_steps, 0.0)
            self.log(
                f"warning: warmup_steps={cfg.warmup_steps} >= max_steps={cfg.max_steps}: the learning rate never "
                f"leaves warmup and peaks at {peak:.3g} * lr; use fewer warmup_steps"
            )
        if env.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        session_tokens, session_train_time = 0, 0.0
        last_val: dict[str, float] | None = None
        val_step = -1
        stopped_reason = "max_steps"
        tokens_per_step = self.task.positions_per_step()
        restore_interrupts = self._catch_interrupts()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                losses, stop = self._train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                self.tokens += tokens_per_step
                session_tokens += tokens_per_step
                session_train_time += dt
                acc = self.log_acc
                for name, v in zip(("loss", *self.parts), losses):
                    acc[name] += v
                acc["steps"] += 1
                acc["tokens"] += tokens_per_step
                acc["time"] += dt
                if self.pbar is not None:
                    self.pbar.update(1)
                do_eval = cfg.eval_every > 0 and self.step % cfg.eval_every == 0
                do_log = self.step % cfg.log_every == 0
                val = None
                if do_eval:
                    val = last_val = self._evaluate()
                    val_step = self.step
                if do_log or do_eval:
                    event = self._write_event(val)
                    if self.pbar is not None:
                        self.pbar.set_postfix(loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_s']:.0f}")
                    if val is not None and env.is_main:
                        self.log(f"step {self.step}: val {self.task.describe(val)}")
                        self.plotter.plot(read_metrics(self.metrics.path))
                if stop:
                    stopped_reason = "max_time"
                    break
                if self.interrupted:
                    stopped_reason = "interrupted"
                    break
                if val is not None and self.task.should_stop(val):
                    stopped_reason = "target"
                    break
                if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self._save()
        finally:
            restore_interrupts()
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None

        if val_step != self.step or last_val is None:
            last_val = self._evaluate()
            self._write_event(last_val)
        if self.saved_step != self.step:
            self._save()  # the last weights, so a resumed run continues from them
        final_val, model_step = last_val, self.step
        if cfg.keep_best and self.best is not None:
            final_val, model_step = self.best["metrics"], self.best["step"]
            self.model.load_state_dict(self.best["weights"])
        test = self.task.evaluate(self.model, "test") if self.task.has_test else None
        if env.is_main:
            if test is not None:
                tested = {f"test_{k}": v for k, v in test.items()}
                self.metrics.write({"event": "test", "step": self.step, "model_step": model_step, **tested})
            save_final(self.out_dir, self.model)
            self._write_train_config()
            self.plotter.plot(read_metrics(self.metrics.path))
            weights = f" (weights of step {model_step}, the best val loss)" if cfg.keep_best else ""
            tested = f", test {self.task.describe(test)}" if test is not None else ""
            self.log(f"done ({stopped_reason}): step {self.step}, val {self.task.describe(final_val)}{tested}{weights}")
        env.barrier()
        result = {
            "out_dir": str(self.out_dir),
            "task": cfg.task,
            "step": self.step,
            "val": final_val,
            **{f"val_{k}": v for k, v in final_val.items()},
            "test": test,
            "tokens_per_s": session_tokens / session_train_time if session_train_time > 0 else 0.0,
            "n_params": self.n_params,
            "stopped_reason": stopped_reason,
            "tokens": self.tokens,
            "train_loss": self.last_train_loss,
            "elapsed_s": self.elapsed(),
        }
        if cfg.keep_best:
            result["best_step"] = model_step
        return result
