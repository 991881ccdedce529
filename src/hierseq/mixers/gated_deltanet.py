"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025) as a token mixer: the delta-rule control.

Per head h, with the ops of ``ops/delta_rule.py``::

    q, k, v   = silu(conv(in_proj(x))) split; q, k L2-normalised        # the short causal conv front end
    beta_t    = sigmoid(b_t)                                             # write strength, [H]
    log a_t   = -exp(A_log) * softplus(a_t + dt_bias)                    # decay, [H], <= 0 (Mamba-2 style)
    S_t       = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T    # S: [dk, dv]
    o_t       = S_t^T q_t
    y         = out_proj(RMSNorm_head(o) * silu(gate_t))                  # the gated output

The delta rule replaces the value stored under k_t instead of adding to it, so an associative memory of
dk x dv floats per head recalls far better than the additive state of linear attention of the same
size; the decay lets it forget. Training runs the chunked WY/UT form (matrix multiplies inside chunks, a
pairwise scan over chunks, a hand-written memory-lean backward); decoding is the O(1) recurrent step.

Initialisation: A uniform in [``a_min``, ``a_max``] = [1, 16] and dt log-uniform in [1e-3, 1e-1] as in
Mamba-2 (initial half-lives ln 2 / (A dt) from under one token to about 700, most below 50). A narrower
[1, 2] (longer initial memories) was tried on MQAR (L=64, K=4, width 64, lr 3e-3): better on a 1000-step
schedule (0.967 / 0.474 against 0.035 / 0.227, seeds 0, 1) but worse on the 2000-step one (0.437 against
0.987, seed 0), so the default stays Mamba-2's. The norm weight is 1. State: conv window plus
the memory [B, H, dk, dv] (:class:`~hierseq.modules.state.RecurrentState`), constant in the length.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_divisible
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.norms import GatedRMSNorm
from ..modules.state import RecurrentState
from ..ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_reference, gated_delta_rule_step
from .base import Mixer, MixerConfig, init_decay_rates, register_mixer

KERNELS = ("chunked", "reference")


@dataclasses.dataclass
class GatedDeltaNetMixerConfig(MixerConfig):
    """n_heads: heads (value width d_model / n_heads each). key_dim: query/key size per head (0 = head
    width). conv_kernel: short causal conv on q/k/v (1 = none across time). chunk_size: tokens per chunk
    of the parallel path (speed only, not the result). kernel: "chunked" (the training path) or
    "reference" (the loop over tokens it equals: for checking, not training). a_min / a_max: the range
    the decay rate A is drawn from at initialisation (see the module docstring)."""

    n_heads: int = 4
    key_dim: int = 0
    conv_kernel: int = 4
    chunk_size: int = 64
    kernel: str = "chunked"
    a_min: float = 1.0
    a_max: float = 16.0

    positive_ints = ("n_heads", "conv_kernel", "chunk_size")
    nonneg_ints = ("key_dim",)
    positive_floats = ("a_min", "a_max")
    ordered = (("a_min", "a_max"),)

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_divisible("d_model", d_model, "n_heads", self.n_heads)
        check_choice("kernel", self.kernel, KERNELS)


@register_mixer("gated_deltanet", config=GatedDeltaNetMixerConfig)
class GatedDeltaNet(Mixer):
    """x: [B, L, D] -> [B, L, D]; state: :class:`~hierseq.modules.state.RecurrentState` (conv window,
    memory [B, H, dk, dv])."""

    def __init__(self, d_model: int, cfg: GatedDeltaNetMixerConfig) -> None:
        super().__init__(d_model, cfg)
        self.heads, self.head_dim = cfg.n_heads, d_model // cfg.n_heads
        self.key_dim = cfg.key_dim or self.head_dim
        self.qk_width = cfg.n_heads * self.key_dim
        conv_width = 2 * self.qk_width + d_model
        # q, k, v (through the conv), then beta and decay logits [H] each, then the output gate [D].
        self.in_proj = nn.Linear(d_model, conv_width + 2 * cfg.n_heads + d_model, bias=False)
        self.conv = CausalDepthwiseConv1d(conv_width, cfg.conv_kernel, activation="silu")
        self.A_log = nn.Parameter(torch.empty(cfg.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(cfg.n_heads))
        self.norm = GatedRMSNorm(self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """A and dt as in Mamba-2 (the shell's generic init would zero them)."""
        init_decay_rates(self.A_log, self.dt_bias, (self.cfg.a_min, self.cfg.a_max))

    def state_size(self, seq_len: int) -> int:
        """H * dk * dv plus the conv window, whatever the length."""
        return self.heads * self.key_dim * self.head_dim + self.conv.channels * self.conv.state_len

    def _heads(
        self, qkv: torch.Tensor, rest: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: [..., 2 H dk + D] (after the conv and its SiLU), rest: [..., 2 H + D] -> q, k [..., H, dk]
        (unit norm, or raw when not ``normalize``: the chunked op normalises them itself), v [..., H, dv],
        beta, log decay [..., H], gate [..., H, dv]."""
        q, k, v = qkv.split((self.qk_width, self.qk_width, self.d_model), dim=-1)
        q, k = (t.unflatten(-1, (self.heads, self.key_dim)) for t in (q, k))
        if normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        b, a, gate = rest.split((self.heads, self.heads, self.d_model), dim=-1)
        log_decay = -torch.exp(self.A_log) * F.softplus(a + self.dt_bias)
        heads = (self.heads, self.head_dim)
        return q, k, v.unflatten(-1, heads), torch.sigmoid(b), log_decay, gate.unflatten(-1, heads)

    def _output(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o, gate: [..., H, dv] -> [..., D]."""
        return self.out_proj(self.norm(o, gate).flatten(-2))

    def forward(
        self, x: torch.Tensor, state: RecurrentState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, RecurrentState | None, None]:
        assert x.dim() == 3 and x.shape[-1] == self.d_model, f"x {tuple(x.shape)}: need [B, L, {self.d_model}]"
        keep = use_cache or state is not None
        conv_state, memory = (None, None) if state is None else (state.conv, state.memory)
        projected = self.in_proj(x)
        conv_in, rest = projected.split((self.conv.channels, projected.shape[-1] - self.conv.channels), dim=-1)
        if state is not None and x.shape[1] == 1:
            qkv_t, conv_state = self.conv.step(conv_in[:, 0], conv_state)
            q, k, v, beta, log_decay, gate = self._heads(qkv_t, rest[:, 0])
            o, memory = gated_delta_rule_step(q, k, v, beta, log_decay, memory)
            return self._output(o, gate).unsqueeze(1), RecurrentState(conv_state, memory), None
        qkv, conv_state = self.conv(conv_in, conv_state, return_state=True)
        chunked = self.cfg.kernel == "chunked"
        q, k, v, beta, log_decay, gate = self._heads(qkv, rest, normalize=not chunked)
        args = (
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            beta.transpose(1, 2),
            log_decay.transpose(1, 2),
        )
        if chunked:
            o, memory = gated_delta_rule_chunked(*args, memory, self.cfg.chunk_size, normalize_qk=True)
        else:
            o, memory = gated_delta_rule_reference(*args, memory)
        y = self._output(o.transpose(1, 2), gate)
        return y, (RecurrentState(conv_state, memory) if keep else None), None
