"""HiSS: Hierarchical State Space Models for continuous sequence-to-sequence tasks (Bhirangi et al. 2024).

The sequence x [B, T, D_in] is cut into chunks of C steps. A low-level model runs on every chunk
independently (its state starts from zero in each chunk) - all chunks in one batched call on
[B * n, C, d_low]; the last step of each chunk is that chunk's feature; a causal high-level model runs
over the n chunk features; a linear head gives one prediction per chunk: [B, n, D_out]. Low and high
level are each one of ``mamba``, ``lstm``, ``transformer`` (causal).

**A length T that is not a multiple of C** (the seed's TODO). Prediction k is the one made when chunk k
has finished, i.e. after input step (k + 1) * C - 1. ``remainder="drop"`` (default, the contract
``[B, T // C, D_out]``): the last T % C steps finish no chunk and produce no prediction (a streaming
caller keeps them buffered until the chunk completes). ``remainder="partial"``: they form one more,
shorter chunk whose feature is the low-level output at its last available step, giving ceil(T / C)
predictions; in streaming that prediction comes from ``flush()`` at the end of the stream.

Also here, so the comparison is one file: ``flat_regressor``, the flat control (mamba / lstm /
transformer over all T steps, read out at the last step of every chunk), so every model's prediction k
sees exactly inputs 0 .. (k + 1) * C - 1. The seed's API (``LowLevelMamba``, ``HSSS``) is in
``compat/hiss.py``.

Streaming: ``model.stream(batch)`` returns a :class:`ChunkStream`; ``push(x_piece)`` takes any number of
new steps and returns the predictions of the chunks that finished ([B, k, D_out], k >= 0), equal to
the batch forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig, check_choice, check_nonneg_int, check_positive_int, config_error
from ..mixers.attention import Attention, AttentionMixerConfig
from ..mixers.base import MixerConfig, get_mixer, resolve_mixer_config
from ..mixers.mamba import Mamba, MambaMixerConfig
from ..modules.norms import make_norm
from ..modules.stack import MixerStack
from ..outputs import SeqRegressionOutput
from ..registry import register
from ..validation import check_features

#: the recurrent controls, built from their registered mixers (:func:`recurrent_control_backbone`).
RECURRENT_CONTROLS = ("gated_deltanet", "mamba2")
LEVEL_KINDS = ("mamba", "lstm", "transformer", *RECURRENT_CONTROLS)
REMAINDER_POLICIES = ("drop", "partial")


# ------------------------------------------------------------------------------------------ losses
def masked_mse(prediction: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the unmasked targets. prediction, targets: [B, n, D_out]; mask: [B, n]
    bool (True = this target exists) or None. Returns a scalar (0 when nothing is unmasked)."""
    err = (prediction - targets).pow(2)
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).unsqueeze(-1).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def check_targets(
    targets: torch.Tensor | None, mask: torch.Tensor | None, n_pred: int, x: torch.Tensor, d_out: int
) -> None:
    """targets must be [B, n_pred, d_out] float; target_mask [B, n_pred] (bool or 0/1)."""
    if targets is None:
        if mask is not None:
            raise ValueError("target_mask: given without targets")
        return
    expected = (x.shape[0], n_pred, d_out)
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != expected:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: shape={shape}: must be [batch, n_chunks, d_out] = {list(expected)}")
    if not targets.is_floating_point():
        raise TypeError(f"targets: dtype={targets.dtype}: must be a floating-point tensor")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"target_mask: shape={shape}: must be [batch, n_chunks] = {list(expected[:2])}")


# --------------------------------------------------------------------------------------- backbones
def check_mamba_fields(cfg: object, prefix: str = "") -> None:
    """Validate the SSM fields of a HiSS config (names optionally prefixed, e.g. 'low_')."""
    for name in ("d_state", "d_conv", "expand"):
        check_positive_int(prefix + name, getattr(cfg, prefix + name))
    dt_rank = getattr(cfg, prefix + "dt_rank", 0)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 0:
        raise config_error(prefix + "dt_rank", dt_rank, "must be 0 (auto: ceil(d_model/16)) or a positive integer")


class StackBackbone(MixerStack):
    """The shared block stack on features. x: [B, L, d] -> [B, L, d]; state: a DecodingState (recurrent
    for Mamba; a KV cache growing with the steps seen for attention), advanced in place."""

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> Any:  # type: ignore[override]
        h, state, _ = super().forward(x, state, use_cache=return_state)
        return (h, state) if return_state else h


def mamba_stack(d_model: int, n_layers: int, mamba: MambaMixerConfig, norm: str = "rmsnorm") -> StackBackbone:
    """Mamba blocks (no MLP, as in the reference) + final norm."""
    return StackBackbone(d_model, n_layers, lambda i: Mamba(d_model, mamba), mlp="none", norm=norm)


def mamba_backbone(d_model: int, n_layers: int, spec: Any) -> StackBackbone:
    """Mamba blocks on features; ``spec`` carries d_state, d_conv, expand, dt_rank, norm (and scan)."""
    cfg = MambaMixerConfig(
        d_state=spec.d_state,
        d_conv=spec.d_conv,
        expand=spec.expand,
        dt_rank=spec.dt_rank,
        scan=getattr(spec, "scan", "fast"),
    )
    return mamba_stack(d_model, n_layers, cfg, spec.norm)


class LSTMBackbone(nn.Module):
    """Stacked LSTM + final norm. x: [B, L, d] -> [B, L, d]; state: (h, c), each [n_layers, B, d]."""

    def __init__(self, d_model: int, n_layers: int, spec: Any) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)
        self.norm = make_norm(spec.norm, d_model)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> Any:
        y, new_state = self.lstm(x, state)
        y = self.norm(y)
        return (y, new_state) if return_state else y


def transformer_backbone(d_model: int, n_layers: int, spec: Any) -> StackBackbone:
    """Causal pre-norm attention blocks (RoPE, SwiGLU) + final norm."""
    cfg = AttentionMixerConfig(n_heads=spec.n_heads)
    cfg.check(d_model)
    return StackBackbone(d_model, n_layers, lambda i: Attention(d_model, cfg), mlp="swiglu", norm=spec.norm)


def recurrent_control_config(kind: str, spec: Any) -> MixerConfig:
    """The mixer config of a ``gated_deltanet`` or ``mamba2`` level, sized for the small widths of the
    signal tasks: ``n_heads`` heads for Gated DeltaNet; Mamba-2 with ``d_state``, ``d_conv``, ``expand``
    and heads of 16 channels (its LM default of 64 would leave a 20k-parameter model one head)."""
    if kind == "gated_deltanet":
        return resolve_mixer_config(kind, None, {"n_heads": spec.n_heads})
    return resolve_mixer_config(
        kind, None, {"d_state": spec.d_state, "d_conv": spec.d_conv, "expand": spec.expand, "headdim": 16}
    )


def recurrent_control_backbone(kind: str, d_model: int, n_layers: int, spec: Any) -> StackBackbone:
    """Gated DeltaNet blocks with a SwiGLU MLP, or Mamba-2 blocks without one, as in their LMs."""
    cfg = recurrent_control_config(kind, spec)
    cfg.check(d_model)
    mixer = get_mixer(kind)
    mlp = "swiglu" if kind == "gated_deltanet" else "none"
    return StackBackbone(d_model, n_layers, lambda i: mixer(d_model, cfg), mlp=mlp, norm=spec.norm)


def make_backbone(kind: str, d_model: int, n_layers: int, spec: Any) -> nn.Module:
    """One level: ``kind`` in :data:`LEVEL_KINDS`; ``spec`` carries d_state, d_conv, expand, dt_rank,
    n_heads, norm."""
    check_choice("level", kind, LEVEL_KINDS)
    if kind in RECURRENT_CONTROLS:
        return recurrent_control_backbone(kind, d_model, n_layers, spec)
    return {"mamba": mamba_backbone, "lstm": LSTMBackbone, "transformer": transformer_backbone}[kind](
        d_model, n_layers, spec
    )


# -------------------------------------------------------------------------------------- chunking
def num_predictions(length: int, chunk_size: int, remainder: str) -> int:
    """How many chunk predictions a sequence of ``length`` steps gives (see the module docstring)."""
    full, tail = divmod(length, chunk_size)
    return full + (1 if tail and remainder == "partial" else 0)


def chunk_last_features(x: torch.Tensor, chunk_size: int, remainder: str, low_level) -> torch.Tensor:
    """Run ``low_level`` on every chunk at once and keep each chunk's last step.

    x: [B, T, D]; low_level: [B * n, C, D] -> [B * n, C, F] (state reset per chunk, since every chunk
    is its own batch row). Returns [B, n, F] with n = :func:`num_predictions`. For a partial last chunk
    the input is zero-padded after its end - the low level is causal, so padding cannot reach the
    feature, which is read at the chunk's last real step.
    """
    batch, length, _ = x.shape
    n = num_predictions(length, chunk_size, remainder)
    if n == 0:
        raise ValueError(
            f"x: length T={length} < chunk_size={chunk_size}: no chunk finishes, so there is nothing to predict "
            f"(use remainder='partial' to predict from a shorter chunk)"
        )
    span = n * chunk_size
    x = F.pad(x, (0, 0, 0, span - length)) if span > length else x[:, :span]
    low = low_level(x.reshape(batch * n, chunk_size, x.shape[-1]))
    low = low.reshape(batch, n, chunk_size, low.shape[-1])
    last_step = torch.full((n,), chunk_size - 1, dtype=torch.long, device=x.device)
    if span > length:
        last_step[-1] = length - (n - 1) * chunk_size - 1
    return low[:, torch.arange(n, device=x.device), last_step]


# ------------------------------------------------------------------------------------------ HiSS
@dataclass
class ChunkedRegressionConfig(BaseConfig):
    """Fields shared by HiSS and its flat control. ``vocab_size`` (a shared field) is unused: inputs are
    continuous. Mamba fields apply to whichever level is a Mamba; ``n_heads`` to a Transformer level."""

    d_model: int = 64
    n_layers: int = 1
    d_in: int = 6
    d_out: int = 2
    chunk_size: int = 10
    n_heads: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    norm: str = "rmsnorm"
    remainder: str = "drop"

    @classmethod
    def small_overrides(cls) -> dict:
        return {"d_model": 16, "n_layers": 1, "d_in": 3, "d_out": 2, "chunk_size": 4, "d_state": 4}

    def validate(self) -> None:
        super().validate()
        for name in ("d_in", "d_out", "chunk_size", "n_heads"):
            check_positive_int(name, getattr(self, name))
        check_mamba_fields(self)
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("remainder", self.remainder, REMAINDER_POLICIES)

    def check_level(self, field_name: str, kind: str, width: int) -> None:
        check_choice(field_name, kind, LEVEL_KINDS)
        if kind in RECURRENT_CONTROLS:
            recurrent_control_config(kind, self).check(width)
        if kind == "transformer" and (width % self.n_heads or (width // self.n_heads) % 2):
            raise config_error(
                "n_heads", self.n_heads, f"a transformer {field_name} of width {width} needs an even head dim"
            )


@dataclass
class HiSSConfig(ChunkedRegressionConfig):
    """HiSS regressor. ``d_model`` / ``n_layers`` size the high level; ``d_low`` (0 = d_model) and
    ``n_low_layers`` the low level."""

    low_level: str = "mamba"
    high_level: str = "mamba"
    d_low: int = 0
    n_low_layers: int = 1

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_low_layers", self.n_low_layers)
        check_nonneg_int("d_low", self.d_low)
        self.check_level("low_level", self.low_level, self.d_low or self.d_model)
        self.check_level("high_level", self.high_level, self.d_model)


class ChunkStream:
    """Streaming inference for a chunked regressor: ``push`` new steps, get the finished chunks' predictions.

    Created by ``model.stream(batch)``. Runs under ``torch.no_grad``. Predictions equal those of the
    batch forward over the concatenation of everything pushed.
    """

    def __init__(self, model: nn.Module, batch: int) -> None:
        self.model = model
        self.batch = batch
        self.steps_seen = 0
        self.finished = False
        self._state: Any = model.initial_stream_state(batch)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, t, D_in] (t >= 1) -> predictions [B, k, D_out] of the k chunks that finished."""
        if self.finished:
            raise RuntimeError("stream: flush() ended this stream; start a new one with model.stream(batch)")
        x = check_features(x, self.model.config.d_in)
        if x.shape[0] != self.batch:
            raise ValueError(f"x: batch={x.shape[0]}: this stream was opened for batch {self.batch}")
        with torch.no_grad():
            pred, self._state = self.model.stream_step(x, self._state, self.steps_seen)
        self.steps_seen += x.shape[1]
        return pred

    def flush(self) -> torch.Tensor:
        """End the stream. With ``remainder="partial"`` returns the prediction of an unfinished last chunk
        ([B, 1, D_out]); otherwise (or when nothing is pending) [B, 0, D_out]."""
        self.finished = True
        with torch.no_grad():
            return self.model.stream_flush(self._state, self.steps_seen)


class ChunkedRegressor(nn.Module):
    """What HiSS and its flat control share: the input / target checks, the masked-MSE output, streaming."""

    config: ChunkedRegressionConfig

    def num_predictions(self, length: int) -> int:
        return num_predictions(length, self.config.chunk_size, self.config.remainder)

    def _checked(
        self, x: torch.Tensor, targets: torch.Tensor | None, target_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """x checked as [B, T, d_in] float, and n, the number of predictions (targets checked against it)."""
        x = check_features(x, self.config.d_in)
        n = self.num_predictions(x.shape[1])
        if n == 0:
            raise ValueError(
                f"x: length T={x.shape[1]} < chunk_size={self.config.chunk_size}: no chunk finishes, so there is "
                "nothing to predict (remainder='partial' predicts from a shorter chunk)"
            )
        check_targets(targets, target_mask, n, x, self.config.d_out)
        return x, n

    @staticmethod
    def _output(
        prediction: torch.Tensor, targets: torch.Tensor | None, target_mask: torch.Tensor | None
    ) -> SeqRegressionOutput:
        loss = masked_mse(prediction, targets, target_mask) if targets is not None else None
        return SeqRegressionOutput(prediction=prediction, loss=loss)

    def stream(self, batch: int) -> ChunkStream:
        """A streaming session for ``batch`` rows (see :class:`ChunkStream`)."""
        check_positive_int("batch", batch)
        return ChunkStream(self, batch)


@register("hiss", config=HiSSConfig, kind="seq_regression")
class HiSS(ChunkedRegressor):
    """x: [B, T, D_in] -> SeqRegressionOutput(prediction [B, n, D_out], loss), n = T // C ('drop')."""

    def __init__(self, config: HiSSConfig) -> None:
        super().__init__()
        self.config = config
        d_low = config.d_low or config.d_model
        self.in_proj = nn.Linear(config.d_in, d_low)
        self.low = make_backbone(config.low_level, d_low, config.n_low_layers, config)
        self.fuse = nn.Linear(d_low, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.high = make_backbone(config.high_level, config.d_model, config.n_layers, config)
        self.head = nn.Linear(config.d_model, config.d_out)

    def _low_level(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks: [B * n, C, D_in] -> [B * n, C, d_low]."""
        return self.low(self.in_proj(chunks))

    def chunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D_in] -> per-chunk features [B, n, d_model] (input to the high level)."""
        feats = chunk_last_features(x, self.config.chunk_size, self.config.remainder, self._low_level)
        return self.drop(self.fuse(feats))

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, target_mask: torch.Tensor | None = None
    ) -> SeqRegressionOutput:
        """x: [B, T, D_in]; targets: [B, n, D_out]; target_mask: [B, n] (True = target present)."""
        x, _ = self._checked(x, targets, target_mask)
        return self._output(self.head(self.high(self.chunk_features(x))), targets, target_mask)

    # ----------------------------------------------------------------------------- streaming
    def initial_stream_state(self, batch: int) -> dict:
        return {"pending": None, "high": None}

    def _high_step(self, feats: torch.Tensor, state: dict) -> torch.Tensor:
        out, state["high"] = self.high(feats, state["high"], return_state=True)
        return self.head(out)

    def stream_step(self, x: torch.Tensor, state: dict, steps_seen: int) -> tuple[torch.Tensor, dict]:
        """Buffer x; run every chunk that is now complete. x: [B, t, D_in] -> ([B, k, D_out], state)."""
        pending = x if state["pending"] is None else torch.cat((state["pending"], x), dim=1)
        k = pending.shape[1] // self.config.chunk_size
        done = k * self.config.chunk_size
        state["pending"] = pending[:, done:]
        if k == 0:
            return x.new_zeros(x.shape[0], 0, self.config.d_out), state
        feats = self.drop(
            self.fuse(chunk_last_features(pending[:, :done], self.config.chunk_size, "drop", self._low_level))
        )
        return self._high_step(feats, state), state

    def stream_flush(self, state: dict, steps_seen: int) -> torch.Tensor:
        pending = state["pending"]
        if self.config.remainder != "partial" or pending is None or pending.shape[1] == 0:
            batch = pending.shape[0] if pending is not None else 1
            return self.head.weight.new_zeros(batch, 0, self.config.d_out)
        feats = self.fuse(self._low_level(pending)[:, -1:])
        return self._high_step(feats, state)


# ------------------------------------------------------------------------------- flat control
@dataclass
class FlatRegressorConfig(ChunkedRegressionConfig):
    """Flat control for HiSS: one model over all T steps, read out at the last step of every chunk."""

    n_layers: int = 2
    backbone: str = "mamba"

    def validate(self) -> None:
        super().validate()
        self.check_level("backbone", self.backbone, self.d_model)


@register("flat_regressor", config=FlatRegressorConfig, kind="seq_regression")
class FlatRegressor(ChunkedRegressor):
    """x: [B, T, D_in] -> SeqRegressionOutput(prediction [B, n, D_out], loss): the backbone's output at
    steps C-1, 2C-1, ... (and at T-1 for a partial last chunk with remainder='partial')."""

    def __init__(self, config: FlatRegressorConfig) -> None:
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.d_in, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.backbone = make_backbone(config.backbone, config.d_model, config.n_layers, config)
        self.head = nn.Linear(config.d_model, config.d_out)

    def _readout_steps(self, start: int, length: int, include_partial: bool) -> torch.Tensor:
        """Indices (relative to ``start``) of the steps in [start, start + length) that end a chunk."""
        c = self.config.chunk_size
        ends = torch.arange(start, start + length)
        keep = (ends + 1) % c == 0
        if include_partial:
            keep[-1] = True
        return (ends[keep] - start).long()

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, target_mask: torch.Tensor | None = None
    ) -> SeqRegressionOutput:
        """x: [B, T, D_in]; targets: [B, n, D_out]; target_mask: [B, n] (True = target present)."""
        x, n = self._checked(x, targets, target_mask)
        length, c = x.shape[1], self.config.chunk_size
        # Steps after the last chunk end cannot influence any prediction: do not run them.
        used = min(length, n * c)
        h = self.backbone(self.drop(self.in_proj(x[:, :used])))
        steps = self._readout_steps(0, used, include_partial=used % c != 0)
        return self._output(self.head(h[:, steps.to(h.device)]), targets, target_mask)

    def initial_stream_state(self, batch: int) -> dict:
        return {"backbone": None, "last": None}

    def stream_step(self, x: torch.Tensor, state: dict, steps_seen: int) -> tuple[torch.Tensor, dict]:
        h, state["backbone"] = self.backbone(self.in_proj(x), state["backbone"], return_state=True)
        steps = self._readout_steps(steps_seen, x.shape[1], include_partial=False)
        end = steps_seen + x.shape[1]
        # A step after the last chunk end is only needed by flush() (remainder='partial').
        state["last"] = None if end % self.config.chunk_size == 0 else h[:, -1:]
        return self.head(h[:, steps.to(h.device)]), state

    def stream_flush(self, state: dict, steps_seen: int) -> torch.Tensor:
        last = state["last"]
        if self.config.remainder != "partial" or last is None:
            batch = last.shape[0] if last is not None else 1
            return self.head.weight.new_zeros(batch, 0, self.config.d_out)
        return self.head(last)
