"""Log-linear attention (Guo et al., "Log-Linear Attention", ICLR 2026) as a token mixer.

Per head, with the ops of ``ops/loglinear_attention.py``::

    q, k, v  = conv(in_proj(x)) split; q, k L2-normalised per head   # the short causal conv front end
    lam_t    = softplus(level_proj(x_t))                 # [H, n_levels]: one weight per Fenwick level
    log a_t  = -exp(A_log) * softplus(gate_proj(x_t) + dt_bias)      # [H], <= 0 (gated only)
    o_t      = sum_{s <= t} lam_t[level(t, s)] a_{s+1} ... a_t (q_t . k_s) v_s
    y        = out_proj(RMSNorm_head(o))

The prefix of every token is cut Fenwick-tree style into O(log L) buckets and each bucket is one
(decayed) linear-attention state with its own data-dependent weight: between linear attention
(n_levels = 1, one state) and softmax attention (one state per token). Training is O(L log L)
(:func:`~hierseq.ops.loglinear_attention.loglinear_attention_chunked`); decoding keeps one state per set
bit of the position, O(log L) floats and time per token (:class:`LogLinearState`).

Initialisation: ``A_log`` and ``dt_bias`` as in Mamba-2 (A uniform in [1, 16], dt log-uniform in
[1e-3, 1e-1]); the level-weight bias makes every lam start at 1, so an untrained layer weighs all levels
alike (gated linear attention) and training learns which distances matter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_divisible, config_error
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.norms import RMSNorm
from ..modules.state import LayerState
from ..ops.loglinear_attention import (
    loglinear_attention_chunked,
    loglinear_attention_reference,
    loglinear_continue,
    loglinear_state,
)
from .base import Mixer, MixerConfig, init_decay_rates, register_mixer

# softplus(_UNIT_BIAS) == 1: the initial weight of every level.
_UNIT_BIAS = math.log(math.e - 1.0)
KERNELS = ("chunked", "reference")


@dataclasses.dataclass
class LogLinearState(LayerState):
    """Decoding state of a :class:`LogLinearAttention` layer after ``length`` tokens.

    ``conv``: [B, C, K - 1] the conv window; ``slots``: [B, H, bit_length(length), dk, dv], slot m the
    state of the level-m Fenwick node the next token reads (zeros where bit m of ``length`` is 0), all
    decayed to the last token seen."""

    conv: torch.Tensor
    slots: torch.Tensor
    length: int = 0


@dataclasses.dataclass
class LogLinearMixerConfig(MixerConfig):
    """n_heads: heads (value width d_model / n_heads each). key_dim: query/key size per head (0 = head
    width). n_levels: level weights per head; Fenwick levels from n_levels - 1 on share the last one
    (level l >= 1 is a bucket of 2**(l-1) tokens, so 12 levels separate distances up to 2048).
    chunk_size: intra-chunk block of the parallel path, a power of two (speed only, not the result).
    conv_kernel: short causal conv on q/k/v (1 = none across time). gated: a data-dependent decay
    (Mamba-2 style) on top of the level weights. kernel: "chunked" (the O(L log L) training path) or
    "reference" (the O(L^2) masked form it equals: to benchmark the crossover, not to train with)."""

    n_heads: int = 4
    key_dim: int = 0
    n_levels: int = 12
    chunk_size: int = 64
    conv_kernel: int = 4
    gated: bool = True
    kernel: str = "chunked"

    positive_ints = ("n_heads", "n_levels", "chunk_size", "conv_kernel")
    nonneg_ints = ("key_dim",)
    flags = ("gated",)
    #: the other mode, run through the whole conformance suite like a model of its own.
    conformance_variants: ClassVar[tuple[dict[str, object], ...]] = ({"gated": False},)

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_divisible("d_model", d_model, "n_heads", self.n_heads)
        check_choice("kernel", self.kernel, KERNELS)
        if self.chunk_size & (self.chunk_size - 1):
            raise config_error("chunk_size", self.chunk_size, "must be a power of two")


@register_mixer("loglinear", config=LogLinearMixerConfig)
class LogLinearAttention(Mixer):
    """x: [B, L, D] -> [B, L, D]; state: :class:`LogLinearState` (O(log L) floats)."""

    def __init__(self, d_model: int, cfg: LogLinearMixerConfig) -> None:
        super().__init__(d_model, cfg)
        self.heads, self.head_dim = cfg.n_heads, d_model // cfg.n_heads
        self.key_dim = cfg.key_dim or self.head_dim
        self.n_levels = cfg.n_levels
        self.qk_width = cfg.n_heads * self.key_dim
        self.in_proj = nn.Linear(d_model, 2 * self.qk_width + d_model, bias=False)
        self.conv = CausalDepthwiseConv1d(2 * self.qk_width + d_model, cfg.conv_kernel)
        self.level_proj = nn.Linear(d_model, cfg.n_heads * cfg.n_levels, bias=True)
        if cfg.gated:
            self.gate_proj = nn.Linear(d_model, cfg.n_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(cfg.n_heads))
            self.dt_bias = nn.Parameter(torch.empty(cfg.n_heads))
        self.norm = RMSNorm(self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """Level weights start at 1; A and dt as in Mamba-2 (the shell's init would zero them)."""
        with torch.no_grad():
            nn.init.constant_(self.level_proj.bias, _UNIT_BIAS)
            if self.cfg.gated:
                init_decay_rates(self.A_log, self.dt_bias)

    def state_size(self, seq_len: int) -> int:
        """One [dk, dv] state per head and per bit of ``seq_len`` (O(log L)), plus the conv window."""
        slots = seq_len.bit_length() * self.heads * self.key_dim * self.head_dim
        return slots + self.conv.channels * self.conv.state_len

    def _project(
        self, x: torch.Tensor, qkv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: [B, L, D] (for the level weights and gate), qkv: [B, L, 2 H dk + D] (after the conv) ->
        q, k [B, H, L, dk] (unit norm), v [B, H, L, dv], level weights [B, H, L, n_levels], log decay
        [B, H, L] or None."""
        q, k, v = qkv.split((self.qk_width, self.qk_width, self.d_model), dim=-1)
        q = F.normalize(q.unflatten(-1, (self.heads, self.key_dim)), dim=-1).transpose(1, 2)
        k = F.normalize(k.unflatten(-1, (self.heads, self.key_dim)), dim=-1).transpose(1, 2)
        v = v.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        lam = F.softplus(self.level_proj(x)).unflatten(-1, (self.heads, self.n_levels)).transpose(1, 2)
        log_decay = None
        if self.cfg.gated:
            dt = F.softplus(self.gate_proj(x) + self.dt_bias)  # [B, L, H]
            log_decay = (-torch.exp(self.A_log) * dt).transpose(1, 2)
        return q, k, v, lam, log_decay

    def forward(
        self, x: torch.Tensor, state: LogLinearState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, LogLinearState | None, None]:
        assert x.dim() == 3 and x.shape[-1] == self.d_model, f"x {tuple(x.shape)}: need [B, L, {self.d_model}]"
        keep = use_cache or state is not None
        conv_state = None if state is None else state.conv
        qkv, conv_state = self.conv(self.in_proj(x), conv_state, return_state=True)
        q, k, v, lam, log_decay = self._project(x, qkv)
        slots = None
        if state is None and self.cfg.kernel == "reference":
            out = loglinear_attention_reference(q, k, v, lam, log_decay)
            if keep:
                slots = loglinear_state(k, v, log_decay)
        elif state is None:
            out = loglinear_attention_chunked(q, k, v, lam, log_decay, self.cfg.chunk_size)
            if keep:
                slots = loglinear_state(k, v, log_decay)
        else:
            out, slots = loglinear_continue(q, k, v, lam, log_decay, state.slots, state.length, self.cfg.chunk_size)
        y = self.out_proj(self.norm(out.transpose(1, 2)).flatten(-2))
        if not keep:
            return y, None, None
        length = x.shape[1] + (0 if state is None else state.length)
        if state is None:
            return y, LogLinearState(conv_state, slots, length), None
        state.conv, state.slots, state.length = conv_state, slots, length  # advanced in place
        return y, state, None
