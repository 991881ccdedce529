"""HAMT: a Holographic Associative Memory Transformer that recalls by content (seed ``002_695ec01f11c2bdd6``).

Each block replaces self-attention with a holographic memory of ``num_slots`` vectors of size
``hcm_dim`` per layer (its whole state: O(1) in the context length). Token t

* projects a key, a query and a value (after a short causal depthwise convolution, so the key can be
  "the previous token" and the value "this token", the classic associative-recall circuit);
* writes ``bind(key_t, value_t)`` into every slot s with weight ``w^s_t = g_t * r^s_t`` (a sigmoid write
  gate times a softmax write router over slots, both from content) after decaying the slot by a
  data-dependent forget factor ``a^s_t`` in (0, 1):

      M^s_t = a^s_t * M^s_{t-1} + w^s_t * bind(key_t, value_t)          (never renormalised)

* reads ``unbind(sum_s c^s_t M^s_t, query_t)`` with read-mixing weights c_t (a softmax over slots),
  RMS-normalises the read-out, applies an output gate silu(W x_t) and projects back to d_model.

Because unbinding is linear in the memory and the query is shared by the slots, mixing the slots first
and unbinding once is exact. The slot memory is then a gated linear recurrence with scalar (per-slot)
decays, computed two ways that agree to float tolerance:

* :func:`slot_memory_chunked` (training, prefill): within chunks of ``chunk_size`` tokens a causal
  [C, C] mixing matrix built from *differences* of cumulative log-decays (each exp argument <= 0, so
  nothing overflows) times the bound vectors (one batched matmul); across chunks the carried state
  by a linear scan over chunk totals (as in gated linear attention / Mamba-2). No loop over tokens.
* :func:`slot_memory_step` (generation): one token, cost independent of the context length.
* :func:`slot_memory_reference`: the recurrence above as a loop over time, for tests.

What the seed got wrong and this file fixes (see ``specs/hamt.md``): keys are a function of content,
not random vectors redrawn per call (so recall works and eval is deterministic); slots are addressable
through the routers instead of identical moving averages; the memory is not renormalised each step;
there is a parallel training form; generation steps the recurrent state instead of re-running the
prefix; and the auxiliary loss measures *retention* (reading back values written earlier in the chunk
from the chunk's final state) instead of rewarding overwriting.

Seed API: :class:`HAMTConfig` takes the seed's field names and :class:`HAMTModel` (the registered
``hamt`` model) accepts either config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    BaseConfig,
    check_choice,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..layers.causal_conv import CausalDepthwiseConv1d
from ..layers.init import init_residual_scaled_
from ..layers.mlp import make_mlp
from ..layers.norms import RMSNorm, make_norm
from ..layers.scan import linear_scan
from ..layers.state_cache import LayerStateCache
from ..layers.vsa import BINDINGS, KEY_TYPES, bind, make_key, unbind
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels

__all__ = [
    "HAMTCache",
    "HAMTConfig",
    "HAMTLMConfig",
    "HAMTModel",
    "slot_memory_chunked",
    "slot_memory_reference",
    "slot_memory_step",
]


# ============================================================================ the slot memory op
def _check_slot_memory_inputs(
    bound: torch.Tensor, write: torch.Tensor, log_decay: torch.Tensor, read: torch.Tensor, state: torch.Tensor | None
) -> None:
    if bound.dim() != 3:
        raise ValueError(f"bound shape {tuple(bound.shape)}: expected [B, L, M]")
    batch, length, _ = bound.shape
    for name, t in (("write", write), ("log_decay", log_decay), ("read", read)):
        if t.dim() != 3 or t.shape[:2] != (batch, length) or t.shape[2] != write.shape[2]:
            raise ValueError(f"{name} shape {tuple(t.shape)}: expected [B, L, S] = [{batch}, {length}, S]")
    if state is not None and tuple(state.shape) != (batch, write.shape[2], bound.shape[2]):
        raise ValueError(f"state shape {tuple(state.shape)}: expected [B, S, M]")


def slot_memory_reference(
    bound: torch.Tensor,
    write: torch.Tensor,
    log_decay: torch.Tensor,
    read: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, a loop over time.

    bound: [B, L, M] bound key-value vectors; write, log_decay (<= 0), read: [B, L, S]; state: [B, S, M]
    or None (zeros). M^s_t = exp(log_decay^s_t) M^s_{t-1} + write^s_t bound_t; out_t = sum_s read^s_t M^s_t.
    Returns (out [B, L, M], final state [B, S, M]).
    """
    _check_slot_memory_inputs(bound, write, log_decay, read, state)
    batch, length, dim = bound.shape
    memory = bound.new_zeros(batch, write.shape[2], dim) if state is None else state
    outputs = []
    for t in range(length):
        out_t, memory = slot_memory_step(bound[:, t], write[:, t], log_decay[:, t], read[:, t], memory)
        outputs.append(out_t)
    return torch.stack(outputs, dim=1), memory


def slot_memory_step(
    bound_t: torch.Tensor,
    write_t: torch.Tensor,
    log_decay_t: torch.Tensor,
    read_t: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. bound_t: [B, M]; write_t, log_decay_t, read_t: [B, S]; state: [B, S, M] or None.
    Returns (out_t [B, M], new state [B, S, M])."""
    contribution = write_t.unsqueeze(-1) * bound_t.unsqueeze(1)  # [B, S, M]
    if state is None:
        new_state = contribution
    else:
        new_state = log_decay_t.exp().unsqueeze(-1) * state + contribution
    out_t = torch.einsum("bs,bsm->bm", read_t, new_state)
    return out_t, new_state


def slot_memory_chunked(
    bound: torch.Tensor,
    write: torch.Tensor,
    log_decay: torch.Tensor,
    read: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """:func:`slot_memory_reference` without a loop over tokens. Same arguments and results; with
    ``return_chunk_states`` also the state at the end of every chunk [B, n_chunks, S, M] (the tail
    chunk's entry is the final state).

    Within a chunk (positions t, j relative to its start, cum^s = cumulative log-decay inside it):
        out_t = sum_s read^s_t [exp(cum^s_t) M^s_start + sum_{j<=t} exp(cum^s_t - cum^s_j) write^s_j bound_j]
    The second term is a [C, C] matrix (summed over slots) times the chunk's bound vectors. Every
    exponent is a difference cum_t - cum_j with j <= t (or cum_t itself), hence <= 0: no overflow and no
    1/decay blow-up however long the chunk or strong the decay.
    """
    _check_slot_memory_inputs(bound, write, log_decay, read, state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer")
    batch, length, dim = bound.shape
    slots = write.shape[2]
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Padding writes nothing and does not decay (log_decay 0), so the final state is unchanged.
        bound, write, log_decay, read = (F.pad(t, (0, 0, 0, pad)) for t in (bound, write, log_decay, read))
    bound = bound.reshape(batch, n_chunks, chunk, dim)
    write, log_decay, read = (t.reshape(batch, n_chunks, chunk, slots) for t in (write, log_decay, read))

    cum = log_decay.cumsum(dim=2)  # [B, n, C, S], non-increasing along the chunk
    # Intra-chunk mixing matrix A[t, j] = sum_s read^s_t exp(cum^s_t - cum^s_j) write^s_j for j <= t.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=bound.device).tril()
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # [B, n, C(t), C(j), S]
    # Mask before exp: the entries with j > t are positive and could overflow; -inf gives 0 and 0 grad.
    decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
    mixing = (decay * read.unsqueeze(3) * write.unsqueeze(2)).sum(-1)  # [B, n, C, C]
    out = mixing @ bound  # [B, n, C, M]

    # Each chunk's own contribution to the state at its end, from a zero start.
    to_end = (cum[:, :, -1:] - cum).exp() * write  # [B, n, C, S]
    local_end = torch.einsum("bncs,bncm->bnsm", to_end, bound)
    chunk_decay = cum[:, :, -1].exp().unsqueeze(-1).expand(batch, n_chunks, slots, dim)
    chunk_end = linear_scan(chunk_decay.contiguous(), local_end, state)  # [B, n, S, M]
    start = bound.new_zeros(batch, 1, slots, dim) if state is None else state.unsqueeze(1)
    entering = torch.cat((start, chunk_end[:, :-1]), dim=1)  # state at each chunk's start
    out = out + torch.einsum("bncs,bnsm->bncm", read * cum.exp(), entering)

    out = out.reshape(batch, n_chunks * chunk, dim)[:, :length]
    if return_chunk_states:
        return out, chunk_end[:, -1], chunk_end
    return out, chunk_end[:, -1]


# ===================================================================== short causal convolution
# ================================================================================== configs
@dataclass
class HAMTLMConfig(BaseConfig):
    """Config of the registered ``hamt`` causal LM (shared field names; see :class:`HAMTConfig` for the
    seed's names).

    hcm_dim: size M of each memory slot (0 = 2 * d_model). num_slots: S slots per layer; state per layer
    is S * M floats plus the conv window. binding: "elementwise" or "circular" (FFT). key_type:
    "bipolar", "unitary" or "l2" (see ``layers/vsa.py``). use_gating: data-dependent write gate and
    decay (False: always write, a learned constant decay per slot). decay_rate: per-token retention of
    the fastest slot at init; slot s starts at decay_rate ** (2 ** -s), so slots span time scales.
    aux_loss_weight: weight of the retention loss in ``loss``. conv_kernel: width of the short causal
    conv on q/k/v. chunk_size: chunk length of the parallel path (speed only, not the result).
    """

    hcm_dim: int = 0
    num_slots: int = 4
    binding: str = "elementwise"
    key_type: str = "bipolar"
    use_gating: bool = True
    decay_rate: float = 0.95
    aux_loss_weight: float = 0.01
    conv_kernel: int = 4
    chunk_size: int = 32
    mlp: str = "swiglu"
    mlp_hidden: int = 0
    norm: str = "rmsnorm"
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        # chunk_size 16 so the conformance lengths (45, 80) cross several chunk boundaries.
        return {**super().small_overrides(), "hcm_dim": 32, "num_slots": 2, "chunk_size": 16}

    @property
    def memory_dim(self) -> int:
        """M, the resolved slot size."""
        return self.hcm_dim or 2 * self.d_model

    def validate(self) -> None:
        super().validate()
        check_nonneg_int("hcm_dim", self.hcm_dim)
        check_positive_int("num_slots", self.num_slots)
        check_choice("binding", self.binding, BINDINGS)
        check_choice("key_type", self.key_type, KEY_TYPES)
        check_choice("use_gating", self.use_gating, (True, False))
        if isinstance(self.decay_rate, bool) or not isinstance(self.decay_rate, (int, float)):
            raise config_error("decay_rate", self.decay_rate, "must be a number in (0, 1)")
        if not 0.0 < self.decay_rate < 1.0:
            raise config_error("decay_rate", self.decay_rate, "must be in (0, 1) (per-token retention)")
        if isinstance(self.aux_loss_weight, bool) or not isinstance(self.aux_loss_weight, (int, float)):
            raise config_error("aux_loss_weight", self.aux_loss_weight, "must be a number >= 0")
        if self.aux_loss_weight < 0:
            raise config_error("aux_loss_weight", self.aux_loss_weight, "must be >= 0")
        check_positive_int("conv_kernel", self.conv_kernel)
        check_positive_int("chunk_size", self.chunk_size)
        check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        check_nonneg_int("mlp_hidden", self.mlp_hidden)
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))
        check_positive_float("init_std", self.init_std)


_SEED_BINDINGS = {
    "elementwise": "elementwise",
    "bipolar": "elementwise",
    "circular": "circular",
    "circular_conv": "circular",
    "circular_convolution": "circular",
    "hrr": "circular",
}


@dataclass
class HAMTConfig:
    """The seed's configuration, by the seed's field names; :meth:`to_model_config` maps it onto
    :class:`HAMTLMConfig` (hidden_dim -> d_model, num_layers -> n_layers, binding_type -> binding, ...).

    decay_rate is the per-token retention factor (memory *= decay_rate) of the fastest slot at init.
    ``max_seq_len`` and ``bptt_horizon`` are accepted for compatibility: the model has no length limit,
    and the truncated-BPTT horizon is the trainer's ``seq_len`` with ``tbptt: true``.
    The README's demo size is ``HAMTConfig(hidden_dim=256, hcm_dim=1024, num_layers=4, num_slots=8)``.
    """

    vocab_size: int = 256
    hidden_dim: int = 512
    hcm_dim: int = 2048
    num_layers: int = 8
    num_slots: int = 8
    binding_type: str = "elementwise"
    key_type: str = "bipolar"
    use_gating: bool = True
    decay_rate: float = 0.95
    aux_loss_weight: float = 0.01
    dropout: float = 0.0
    max_seq_len: int = 2048
    bptt_horizon: int = 512
    chunk_size: int = 32
    conv_kernel: int = 4

    def __post_init__(self) -> None:
        if self.binding_type not in _SEED_BINDINGS:
            raise config_error("binding_type", self.binding_type, f"must be one of {sorted(_SEED_BINDINGS)}")
        check_positive_int("max_seq_len", self.max_seq_len)
        check_positive_int("bptt_horizon", self.bptt_horizon)
        self.to_model_config()  # validates every mapped field with the model's own rules

    def to_model_config(self) -> HAMTLMConfig:
        return HAMTLMConfig(
            vocab_size=self.vocab_size,
            d_model=self.hidden_dim,
            n_layers=self.num_layers,
            dropout=self.dropout,
            hcm_dim=self.hcm_dim,
            num_slots=self.num_slots,
            binding=_SEED_BINDINGS[self.binding_type],
            key_type=self.key_type,
            use_gating=self.use_gating,
            decay_rate=self.decay_rate,
            aux_loss_weight=self.aux_loss_weight,
            conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size,
        )


# ==================================================================================== the cache
class HAMTCache(LayerStateCache):
    """Recurrent decoding / TBPTT state: per layer (conv window [B, 3M, K-1], memory [B, S, M]), or None
    for a layer that has seen nothing yet. Its size does not depend on how many tokens were seen."""


# ============================================================================== mixer and blocks
class HolographicMemoryMixer(nn.Module):
    """The attention replacement. x: [B, L, D] -> [B, L, D], with optional carried layer state."""

    def __init__(self, cfg: HAMTLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, m, s = cfg.d_model, cfg.memory_dim, cfg.num_slots
        self.memory_dim, self.num_slots = m, s
        self.in_proj = nn.Linear(d, 3 * m, bias=False)  # raw query, key, value
        self.conv = CausalDepthwiseConv1d(3 * m, cfg.conv_kernel)
        self.write_router = nn.Linear(m, s)  # from the raw key: where a pair is stored
        self.read_router = nn.Linear(m, s)  # from the raw query: which slots a read mixes
        # Per-slot decay offsets; with gating, x_t adds a data-dependent part and sets the write gate.
        self.decay_bias = nn.Parameter(torch.zeros(s))
        self.gate_proj = nn.Linear(d, s + 1) if cfg.use_gating else None
        self.read_norm = RMSNorm(m)
        self.out_gate = nn.Linear(d, m, bias=False)
        self.out_proj = nn.Linear(m, d, bias=False)

    def reset_special_parameters(self) -> None:
        """Inits the generic init (normal weights, zero biases) must not override."""
        self.conv.reset_parameters()
        with torch.no_grad():  # a shared conv bias would add one common direction to every value and key
            self.conv.bias.zero_()
        # Slot s forgets -log(decay_rate) * 2^-s per token at init: time scales 1/(1-r), 2/(1-r), ...
        forget = -math.log(self.cfg.decay_rate) * 0.5 ** torch.arange(self.num_slots, dtype=torch.float32)
        with torch.no_grad():
            self.decay_bias.copy_(torch.log(torch.expm1(forget)))  # softplus^-1
            if self.gate_proj is not None:
                self.gate_proj.bias[-1] = 2.0  # write gate sigmoid(2) ~ 0.88: write by default

    def _features(self, qkv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv: [..., 3M] after the conv; x: [..., D] the block input at the same positions.
        Returns query, key, value [..., M] and write, log_decay, read [..., S]."""
        q_raw, k_raw, value = qkv.split(self.memory_dim, dim=-1)
        query = make_key(q_raw, self.cfg.key_type, self.cfg.binding)
        key = make_key(k_raw, self.cfg.key_type, self.cfg.binding)
        route = self.write_router(k_raw).softmax(-1)
        read = self.read_router(q_raw).softmax(-1)
        if self.gate_proj is not None:
            gates = self.gate_proj(x)
            log_decay = -F.softplus(gates[..., :-1] + self.decay_bias)
            write = torch.sigmoid(gates[..., -1:]) * route
        else:
            log_decay = -F.softplus(self.decay_bias).expand_as(route)
            write = route
        return query, key, value, write, log_decay, read

    def _output(self, memory_read: torch.Tensor, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unbind the slot-mixed memory [..., M] with the query, normalise, gate, project -> [..., D]."""
        value_estimate = unbind(memory_read, query, self.cfg.binding)
        return self.out_proj(self.read_norm(value_estimate) * F.silu(self.out_gate(x)))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None, want_aux: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """x: [B, L, D]; state: (conv [B, 3M, K-1], memory [B, S, M]) or None.
        Returns (y [B, L, D], new state, retention loss (scalar) or None)."""
        conv_state, memory = (None, None) if state is None else state
        if state is not None and x.shape[1] == 1:
            return self._step(x, conv_state, memory, want_aux)
        qkv, conv_state = self.conv(self.in_proj(x), conv_state, return_state=True)
        query, key, value, write, log_decay, read = self._features(qkv, x)
        bound = bind(key, value, self.cfg.binding)
        mixed, memory, chunk_states = slot_memory_chunked(
            bound, write, log_decay, read, memory, self.cfg.chunk_size, return_chunk_states=True
        )
        aux = self._retention_loss(key, value, write, chunk_states) if want_aux else None
        return self._output(mixed, query, x), (conv_state, memory), aux

    def _step(
        self, x: torch.Tensor, conv_state: torch.Tensor, memory: torch.Tensor, want_aux: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """One token with carried state: x [B, 1, D]; cost independent of how many tokens came before."""
        x_t = x[:, 0]
        qkv_t, conv_state = self.conv.step(self.in_proj(x_t), conv_state)
        query, key, value, write, log_decay, read = self._features(qkv_t, x_t)
        mixed, memory = slot_memory_step(bind(key, value, self.cfg.binding), write, log_decay, read, memory)
        aux = self._retention_loss(key[:, None], value[:, None], write[:, None], memory[:, None]) if want_aux else None
        return self._output(mixed, query, x_t).unsqueeze(1), (conv_state, memory), aux

    def _retention_loss(
        self, key: torch.Tensor, value: torch.Tensor, write: torch.Tensor, chunk_states: torch.Tensor
    ) -> torch.Tensor:
        """How well the state at the end of each chunk still returns the values written in that chunk.

        key, value: [B, L, M]; write: [B, L, S]; chunk_states: [B, n, S, M] (end of each chunk of the
        parallel path's chunking). For every position j, read the chunk-end state through j's own
        write routing, unbind with key_j and compare with value_j: mean (1 - cosine). Overwriting or
        forgetting raises it; unlike the seed's loss, rewriting everything cannot lower it.
        """
        batch, length, dim = value.shape
        n_chunks = chunk_states.shape[1]
        chunk = -(-length // n_chunks)
        pad = n_chunks * chunk - length
        key, value, write = (F.pad(t, (0, 0, 0, pad)) for t in (key, value, write))
        key, value = (t.reshape(batch, n_chunks, chunk, dim) for t in (key, value))
        write = write.reshape(batch, n_chunks, chunk, -1)
        route = write / write.sum(-1, keepdim=True).clamp_min(1e-6)  # routing, without the write gate
        memory = torch.einsum("bncs,bnsm->bncm", route, chunk_states)
        recalled = unbind(memory, key, self.cfg.binding)
        cos = F.cosine_similarity(recalled, value, dim=-1, eps=1e-6).reshape(batch, -1)[:, :length]
        return (1.0 - cos).mean()


class HAMTBlock(nn.Module):
    """Pre-norm block: x + memory(norm(x)), then x + mlp(norm(x)). x: [B, L, D]."""

    def __init__(self, cfg: HAMTLMConfig) -> None:
        super().__init__()
        self.mixer_norm = make_norm(cfg.norm, cfg.d_model)
        self.mixer = HolographicMemoryMixer(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_hidden or None, cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None, want_aux: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        h, state, aux = self.mixer(self.mixer_norm(x), state, want_aux)
        x = x + self.resid_dropout(h)
        return x + self.mlp(self.mlp_norm(x)), state, aux


# ==================================================================================== the model
@register("hamt", config=HAMTLMConfig, kind="causal_lm")
class HAMTModel(nn.Module):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, lm_loss, aux_loss, cache).

    ``config`` may be a :class:`HAMTLMConfig` or the seed-style :class:`HAMTConfig` (converted; the
    model's ``config`` is always the :class:`HAMTLMConfig`). With ``use_cache=True`` (or a ``cache``)
    the returned :class:`HAMTCache` carries the recurrent state; a one-token call with a cache runs the
    recurrent step, longer calls the chunked-parallel path from the carried state.
    """

    #: the recurrent state it returns; the trainer rebuilds a checkpointed TBPTT state with it.
    cache_class = HAMTCache

    def __init__(self, config: HAMTLMConfig | HAMTConfig) -> None:
        super().__init__()
        if isinstance(config, HAMTConfig):
            config = config.to_model_config()
        if not isinstance(config, HAMTLMConfig):
            raise TypeError(f"config: expected HAMTLMConfig or HAMTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(HAMTBlock(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        init_residual_scaled_(
            self,
            self.config.n_layers,
            self.config.init_std,
            ("mixer.out_proj.weight", "mlp.down.weight", "mlp.fc_out.weight"),
        )
        for block in self.blocks:
            block.mixer.reset_special_parameters()

    def state_size(self) -> int:
        """Floats of recurrent state per layer and batch row: memory S * M plus the conv window
        3M * (K - 1). Independent of the context length."""
        m = self.config.memory_dim
        return self.config.num_slots * m + 3 * m * (self.config.conv_kernel - 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: HAMTCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None and not isinstance(cache, HAMTCache):
            raise TypeError(f"cache: expected a HAMTCache (from a previous call), got {type(cache).__name__}")
        if cache is not None and len(cache.layers) != self.config.n_layers:
            raise ValueError(f"cache: has {len(cache.layers)} layers, model has n_layers={self.config.n_layers}")
        # The retention loss costs a pass over the chunk states: skipped when it has no weight.
        want_aux = labels is not None and self.config.aux_loss_weight > 0
        new_cache = HAMTCache(self.config.n_layers) if (use_cache or cache is not None) else None
        x = self.drop(self.embed(input_ids))
        aux_terms = []
        for i, block in enumerate(self.blocks):
            x, state, aux = block(x, cache.layers[i] if cache is not None else None, want_aux)
            if new_cache is not None:
                new_cache.layers[i] = state
            if aux is not None:
                aux_terms.append(aux)
        if new_cache is not None:
            new_cache.length = (cache.length if cache is not None else 0) + input_ids.shape[1]
        logits = self.lm_head(self.final_norm(x))
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else logits.new_zeros(())
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss + self.config.aux_loss_weight * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, cache=new_cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """Seed-compatible shortcut for :func:`hierseq.generate` (recurrent, O(1) memory per token)."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens, **sampling)
