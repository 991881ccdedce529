"""The training loop for causal LMs: AdamW + warmup/cosine, clipping, accumulation, TBPTT, periodic eval,
atomic pickle-free checkpoints with bit-exact resume, and DDP under ``torchrun``.

Models are reached only through the registry (``hierseq.build_model``), so every registered causal LM
trains with the same loop, data, budget and metrics.

Batch semantics: ``batch_size`` is the GLOBAL number of sequences per optimiser step. Under DDP each of
the W ranks takes its B / W rows of the same global batch (see :mod:`hierseq.data.loaders`), and each
rank splits its rows into ``grad_accum`` micro-batches. Micro-losses are divided by ``grad_accum`` and DDP
averages gradients over ranks, so the update equals that of one process on the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import config_error
from ..data.corpora import load_corpus
from ..data.loaders import RandomWindowLoader, StreamLoader, eval_windows
from ..losses import nats_to_bits
from ..modules.state import DecodingState
from ..registry import build_config, build_model, count_parameters, get_entry
from ..serialization import WEIGHTS_NAME, load_state_exact
from ..serialization import save as save_model
from .checkpoint import find_checkpoint, load_trainer_state, save_checkpoint
from .metrics import LossPlotter, MetricsWriter, read_metrics

# Fields whose change would make a resumed run a different experiment (other data, shapes or model).
RESUME_MUST_MATCH = ("model", "seq_len", "batch_size", "loader", "seed", "data")


# =============================================================================================== config
@dataclass
class TrainConfig:
    """Everything a training run needs; validated on construction (``ValueError("name=value: rule")``)."""

    model: str = "transformer"  # registry name
    model_config: dict = field(default_factory=dict)  # overrides of the model config fields
    data: str | None = None  # None = embedded Austen; else a text file or folder
    seq_len: int = 256
    batch_size: int = 16  # GLOBAL sequences per optimiser step (split over DDP ranks and micro-steps)
    grad_accum: int = 1
    max_steps: int = 1000
    max_time_s: float = 0.0  # 0 = no limit; else stop cleanly (final eval + save) after this wall time
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 200  # 0 = only at the end
    out_dir: str = "runs/train"
    seed: int = 0
    loader: str = "random"  # "random" | "stream"
    tbptt: bool = False  # stream loader + carry the model's cache (detached) across batches
    resume: bool = False
    progress: bool = True  # tqdm bar with loss and tokens/s
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    schedule_steps: int = 0  # length of the warmup+cosine schedule; 0 = max_steps. Set it to stop a run
    # early (max_steps < schedule_steps) and later extend it with resume on the same schedule.

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    # ------------------------------------------------------------------ validation
    def _coerce(self) -> None:
        """YAML 1.1 reads ``1e-3`` as a string and ``2`` as an int: accept both for float fields."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and not isinstance(value, bool):
                if isinstance(value, int):
                    setattr(self, f.name, float(value))
                elif isinstance(value, str):
                    try:
                        setattr(self, f.name, float(value))
                    except ValueError:
                        pass  # validate() names the field
        if isinstance(self.data, Path):
            self.data = str(self.data)
        if isinstance(self.out_dir, Path):
            self.out_dir = str(self.out_dir)

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise config_error("model", self.model, "must be a registered model name")
        entry = get_entry(self.model)  # unknown name -> the registry's ValueError listing the models
        if entry.kind != "causal_lm":
            raise config_error("model", self.model, f"is a {entry.kind} model; the trainer trains causal_lm models")
        if not isinstance(self.model_config, dict):
            raise config_error("model_config", self.model_config, "must be a mapping of model config fields")
        build_config(self.model, **self.model_config)  # names the bad model field and its rule
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise config_error("data", self.data, "must be null (embedded corpus) or a file/folder path")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "schedule_steps"):
            _check_int(name, getattr(self, name), 0)
        if self.batch_size % self.grad_accum:
            raise config_error("batch_size", self.batch_size, f"must be divisible by grad_accum={self.grad_accum}")
        _check_float("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_float("max_time_s", self.max_time_s, 0.0, math.inf)
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_float("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_float("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_float("grad_clip", self.grad_clip, 0.0, math.inf)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise config_error("out_dir", self.out_dir, "must be a non-empty path")
        if self.loader not in ("random", "stream"):
            raise config_error("loader", self.loader, "must be one of ['random', 'stream']")
        for name in ("tbptt", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, getattr(self, name), "must be true or false")
        if self.tbptt and self.loader != "stream":
            raise config_error("tbptt", self.tbptt, "needs loader='stream' (carried state must see contiguous text)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise config_error("device", self.device, "must be one of ['auto', 'cpu', 'cuda']")

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise config_error("config", type(data).__name__, "must be a mapping of TrainConfig fields")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise config_error(
                unknown[0], data[unknown[0]], f"unknown TrainConfig field; known fields: {cls.field_names()}"
            )
        data = dict(data)
        if data.get("model_config") is None:
            data.pop("model_config", None)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config={str(path)!r}: no such file")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise config_error("config", str(path), "top level must be a mapping of TrainConfig fields")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **overrides})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = "must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}"
        raise config_error(name, value, rule)


def _check_float(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low}", f"{high}" + (")" if high_open else "]")
        raise config_error(name, value, f"must be a number in {lo}, {hi}")


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None
) -> dict[str, float]:
    """Mean next-token loss of ``model`` over deterministic windows of ``tokens`` ([N] ids).

    Returns ``{"loss": nats per token, "bpb": bits per byte (= per token for bytes), "tokens": count}``.
    Uses the LM loss alone (no auxiliary loss), runs in eval mode without gradients, and restores the
    model's previous train/eval mode."""
    model = _unwrap(model)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    try:
        for input_ids, labels in eval_windows(tokens, batch_size, seq_len, max_batches):
            out = model(input_ids.to(device), labels=labels.to(device))
            lm_loss = out.lm_loss if out.lm_loss is not None else out.loss
            n = int((labels != -100).sum())
            total += float(lm_loss) * n  # weight by tokens: the last batch may be smaller
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "bpb": nats_to_bits(loss), "tokens": count}


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
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data``; returns ``{"out_dir", "step", "val_loss", "val_bpb",
    "tokens_per_s", "n_params", "stopped_reason", "tokens", "train_loss", "elapsed_s"}``.

    ``stopped_reason`` is "max_steps" or "max_time". A non-finite loss raises ``RuntimeError`` without
    writing anything over the last good checkpoint."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    env = DistEnv.setup(cfg.device)
    try:
        return _Trainer(cfg, env).run()
    finally:
        env.teardown()


class _Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.out_dir = Path(cfg.out_dir)
        self.pbar = None
        self.restored_caches: list[Any] | None = None  # TBPTT state read back by _restore

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if not self.env.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(message)
        else:
            print(message, flush=True)

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
        self.corpus = load_corpus(cfg.data, min_split_len=cfg.seq_len + 1)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.model = build_model(cfg.model, **cfg.model_config).to(env.device)
        refusal = getattr(self.model, "tbptt_refusal", lambda: None)() if cfg.tbptt else None
        if refusal:
            raise config_error("tbptt", cfg.tbptt, f"{cfg.model} cannot carry its state across segments: {refusal}")
        self.model.train()
        self.n_params = count_parameters(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        if cfg.loader == "stream":
            self.loader: RandomWindowLoader | StreamLoader = StreamLoader(
                self.corpus.train, cfg.batch_size, cfg.seq_len, env.rank, env.world_size
            )
        else:
            self.loader = RandomWindowLoader(
                self.corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, env.rank, env.world_size
            )
        if env.distributed:
            # Ranks get different dropout masks, as rows of one big batch would.
            torch.manual_seed(cfg.seed + 1 + env.rank)

        self.step, self.tokens, self.prior_elapsed = 0, 0, 0.0
        self.log_acc = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        self.last_checkpoint: Path | None = None
        resume_from = find_checkpoint(self.out_dir) if cfg.resume else None
        if cfg.resume and resume_from is None:
            self.log(f"resume: no checkpoint in {str(self.out_dir)!r}; starting from scratch")
        elif not cfg.resume and find_checkpoint(self.out_dir) is not None:
            self.log(f"note: {str(self.out_dir)!r} holds a checkpoint; it will be overwritten (resume=false)")
        if resume_from is not None:
            self._restore(resume_from)

        self.ddp_model: nn.Module = self.model
        if env.distributed:
            ids = [env.local_rank] if env.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out_dir / "train_config.yaml")
            self.metrics = MetricsWriter(self.out_dir, self.step if resume_from is not None else None)
            self.plotter = LossPlotter(self.out_dir, self.log)

    def _restore(self, directory: Path) -> None:
        cfg, env = self.cfg, self.env
        state = load_trainer_state(directory)
        saved = state["train_config"]
        for key in RESUME_MUST_MATCH:
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"resume: {key}={getattr(cfg, key)!r} differs from the checkpoint's {saved.get(key)!r} in "
                    f"{str(directory)!r}; use the same value or a new out_dir"
                )
        saved_model = build_config(saved["model"], **saved["model_config"]).to_dict()
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
        self.loader.load_state_dict(state["loader"])
        # RNG: each rank continues its own stream (same world size), else the closest one we have.
        rng = state["rng"]
        torch.set_rng_state(rng["cpu"][env.rank % len(rng["cpu"])])
        if env.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][env.rank % len(rng["cuda"])], env.device)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.prior_elapsed = float(state["elapsed_s"])
        self.log_acc = dict(state["log_acc"])
        self.last_checkpoint = directory
        if cfg.tbptt:
            self.restored_caches = self._restore_caches(state.get("tbptt_caches"))
        self.log(f"resumed from {str(directory)!r} at step {self.step} ({self.tokens} tokens)")

    def _cache_states(self) -> list[Any] | None:
        """The carried TBPTT state of every micro-batch as plain tensors (None entries: nothing carried
        yet), or None when there is none to save or the model's cache cannot be written down."""
        if not self.cfg.tbptt or self.env.distributed:
            return None  # under DDP every rank carries its own streams; rank 0 writes the checkpoint alone
        return [None if c is None else c.state_dict() for c in self.caches]

    def _restore_caches(self, saved: list[Any] | None) -> list[Any] | None:
        """The carried TBPTT state of a checkpoint, rebuilt as :class:`DecodingState` s; None (with a
        logged reason) when it cannot be, so the state restarts empty and the run says so."""
        reason = None
        if self.env.distributed:
            reason = "it is not checkpointed under DDP"
        elif saved is None:
            reason = "the checkpoint holds none"
        elif len(saved) != self.cfg.grad_accum:
            reason = f"the checkpoint holds {len(saved)} micro-batch states, grad_accum={self.cfg.grad_accum}"
        if reason is not None:
            self.log(f"resume with tbptt: the carried recurrent state restarts empty ({reason})")
            return None
        self.log("resume with tbptt: the carried recurrent state is restored from the checkpoint")
        return [None if s is None else DecodingState.from_state_dict(s, self.env.device) for s in saved]

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
                "loader": self.loader.state_dict(),
                "rng": {"cpu": rng_cpu, "cuda": rng_cuda},
                "log_acc": dict(self.log_acc),
                "tbptt_caches": self._cache_states(),
            }
            self.last_checkpoint = save_checkpoint(self.out_dir, self.model, state)
        else:
            self.last_checkpoint = self.out_dir / "checkpoint"
        self.saved_step = self.step
        env.barrier()  # nobody races ahead (or exits) before the checkpoint exists

    def elapsed(self) -> float:
        return self.prior_elapsed + (time.perf_counter() - self.session_start)

    # ------------------------------------------------------------------ one optimiser step
    def _train_step(self) -> tuple[list[float], bool]:
        """One optimiser step over the global batch; returns ([loss, lm_loss, aux_loss], stop_requested)."""
        cfg, env = self.cfg, self.env
        if isinstance(self.loader, StreamLoader):
            input_ids, labels, reset = self.loader.next_batch()
            if reset:
                self.caches = [None] * cfg.grad_accum
        else:
            input_ids, labels = self.loader.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, lm_loss, aux_loss, stop flag
        for k in range(cfg.grad_accum):
            rows = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            x = input_ids[rows].to(env.device, non_blocking=True)
            y = labels[rows].to(env.device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step.
            sync = env.distributed and k < cfg.grad_accum - 1
            with self.ddp_model.no_sync() if sync else contextlib.nullcontext():
                if cfg.tbptt:
                    out = self.ddp_model(x, labels=y, cache=self.caches[k], use_cache=True)
                    self.caches[k] = out.cache.detach()  # TBPTT: cut the graph at the batch boundary
                else:
                    out = self.ddp_model(x, labels=y)
                (out.loss / cfg.grad_accum).backward()
            lm = out.lm_loss if out.lm_loss is not None else out.loss
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
            sums[:3] += torch.stack([out.loss.detach(), lm.detach(), aux.detach().to(lm.device)]).double()
        sums[:3] /= cfg.grad_accum
        if cfg.max_time_s > 0 and time.perf_counter() - self.session_start >= cfg.max_time_s:
            sums[3] = 1.0
        env.all_sum(sums)  # one collective: mean losses for logging + any rank's stop request
        sums[:3] /= env.world_size
        losses = sums[:3].tolist()
        if not all(math.isfinite(v) for v in losses):
            self._fail(f"non-finite loss at step {self.step + 1} (loss={losses[0]}, lm_loss={losses[1]})")
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not math.isfinite(float(norm)):
                self._fail(f"non-finite gradient norm at step {self.step + 1} (loss={losses[0]})")
        self.optimizer.step()
        self.scheduler.step()
        return losses, bool(sums[3] > 0)

    def _fail(self, what: str) -> None:
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        where = (
            f"last good checkpoint at {str(self.last_checkpoint)!r} (step {self.saved_step})"
            if self.last_checkpoint is not None
            else "no checkpoint was saved yet"
        )
        raise RuntimeError(
            f"{what}: training stopped and nothing was saved over the last good state; {where}. "
            "Try a lower lr, a smaller grad_clip or more warmup_steps."
        )

    # ------------------------------------------------------------------ events
    def _event(self, val: dict[str, float] | None) -> dict[str, Any]:
        acc = self.log_acc
        n = max(acc["steps"], 1)
        event: dict[str, Any] = {
            "event": "eval" if val is not None else "train",
            "step": self.step,
            "tokens": self.tokens,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": acc["loss"] / n if acc["steps"] else None,
            "lm_loss": acc["lm_loss"] / n if acc["steps"] else None,
            "aux_loss": acc["aux_loss"] / n if acc["steps"] else None,
            "tokens_per_s": acc["tokens"] / acc["time"] if acc["time"] > 0 else None,
            "elapsed_s": self.elapsed(),
        }
        if val is not None:
            event["val_loss"], event["val_bpb"] = val["loss"], val["bpb"]
        if event["loss"] is not None:
            self.last_train_loss = event["loss"]
        self.log_acc = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        return event

    def _evaluate(self) -> dict[str, float]:
        # Every rank evaluates the same windows with the same weights: identical numbers everywhere,
        # no extra collective, and the result dict agrees on all ranks.
        return evaluate(self.model, self.corpus.val, self.cfg.seq_len, self.eval_batch_size, self.cfg.eval_batches)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.session_start = time.perf_counter()
        self._setup()
        # The eval batch is the global batch on every rank, so eval sees the same windows for any world size.
        self.eval_batch_size = cfg.batch_size
        self.saved_step = self.step if self.last_checkpoint is not None else -1
        self.caches: list[Any] = self.restored_caches or [None] * cfg.grad_accum
        self.last_train_loss: float | None = None
        if env.is_main:
            self.log(
                f"training {cfg.model} ({self.n_params:,} parameters) on {self.corpus.name} "
                f"[{env.world_size} process(es), {env.device}] -> {str(self.out_dir)!r}"
            )
        if env.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        session_tokens, session_train_time = 0, 0.0
        last_val: dict[str, float] | None = None
        val_step = -1
        stopped_reason = "max_steps"
        tokens_per_step = cfg.batch_size * cfg.seq_len
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
                for name, v in zip(("loss", "lm_loss", "aux_loss"), losses):
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
                if (do_log or do_eval) and env.is_main:
                    event = self._event(val)
                    self.metrics.write(event)
                    if self.pbar is not None:
                        self.pbar.set_postfix(loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_s']:.0f}")
                    if val is not None:
                        self.log(f"step {self.step}: val loss {val['loss']:.4f} nats, {val['bpb']:.4f} bits/byte")
                        self.plotter.plot(read_metrics(self.metrics.path))
                elif do_log or do_eval:
                    self._event(val)  # keep the accumulators in step on every rank
                if stop:
                    stopped_reason = "max_time"
                    break
                if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self._save()
        finally:
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None

        if val_step != self.step or last_val is None:
            last_val = self._evaluate()
            if env.is_main:
                self.metrics.write(self._event(last_val))
            else:
                self._event(last_val)
        if self.saved_step != self.step:
            self._save()
        if env.is_main:
            save_model(self.model, self.out_dir / "final")
            self.cfg.to_yaml(self.out_dir / "train_config.yaml")
            self.plotter.plot(read_metrics(self.metrics.path))
            self.log(
                f"done ({stopped_reason}): step {self.step}, val loss {last_val['loss']:.4f} nats, "
                f"{last_val['bpb']:.4f} bits/byte"
            )
        env.barrier()
        return {
            "out_dir": str(self.out_dir),
            "step": self.step,
            "val_loss": last_val["loss"],
            "val_bpb": last_val["bpb"],
            "tokens_per_s": session_tokens / session_train_time if session_train_time > 0 else 0.0,
            "n_params": self.n_params,
            "stopped_reason": stopped_reason,
            "tokens": self.tokens,
            "train_loss": self.last_train_loss,
            "elapsed_s": self.elapsed(),
        }
