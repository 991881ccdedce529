"""HAMT: a Holographic Associative Memory Transformer that recalls by content (seed ``002_695ec01f11c2bdd6``).

Each block replaces self-attention with a holographic memory of ``num_slots`` vectors of size
``hcm_dim`` per layer (its whole state: O(1) in the context length). Token t

* projects a key, a query and a value (after a short causal depthwise convolution, so the key can be
  "the previous token" and the value "this token", the classic associative-recall circuit), and binds
  the value to the key: b_t = bind(key_t, value_t) (elementwise with bipolar keys, or circular
  convolution); the keys are blended with the identity key by a learned binding strength (see
  ``binding_init``), so a layer can start as a plain slot memory and learn how far to bind;
* writes b_t into the slots, routed by content, with a data-dependent decay; two writes:

  - ``write="delta"`` (default), the correcting write. With the unit write route r_t over the S slots,
    the write strength beta_t in (0, 1) and the decay a_t in (0, 1]::

        M_t = a_t (M_{t-1} - beta_t r_t r_t^T M_{t-1}) + beta_t r_t b_t^T        M: [S, M]

    what the slots returned under the route r_t is replaced by the new pair instead of added to, so S
    slots keep up to S routes apart and a repeated key overwrites its old value. This is the gated
    delta rule with the route as the key and the bound pair as the value; it runs on
    ``ops/delta_rule.py`` (chunked WY form for training, one-token step for generation).
  - ``write="additive"``, superposition only: M^s_t = a^s_t M^s_{t-1} + g_t r^s_t b_t with a sigmoid
    write gate g, a softmax route r and one decay per slot (slots span time scales); it runs on
    ``ops/slot_memory.py`` (chunked with differences of cumulative log-decays, so nothing overflows).

* reads ``unbind(sum_s c^s_t M^s_t, query_t)`` with read weights c_t over the slots (a softmax for the
  additive write, a unit vector for the delta write), RMS-normalises the read-out, applies an output
  gate silu(W x_t) and projects back to d_model.

Because unbinding is linear in the memory and the query is shared by the slots, mixing the slots first
and unbinding once is exact, so both writes are linear recurrences with a chunked training form and a
one-token step that agree to float tolerance, and neither loops over tokens in training.

What the seed got wrong and this file fixes (see ``specs/hamt.md``): keys are a function of content,
not random vectors redrawn per call (so recall works and eval is deterministic); slots are addressable
through the routers instead of identical moving averages; the memory is not renormalised each step;
there is a parallel training form; generation steps the recurrent state instead of re-running the
prefix; and the auxiliary loss measures *retention* (reading back values written earlier from a later
state: the chunk's end for the additive write, the end of the input for the delta write) instead of
rewarding overwriting. What ours adds for recall (the recurrent-controls issue): random holographic
keys at init scramble every read, which kept the seed's design at chance on MQAR at L=128, K=8; the
learned binding strength starting at 0 and the delta write let it learn (``README.md``, MQAR).

The seed's API (``HAMTConfig``, ``HAMTModel``) is in ``compat/hamt.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_bool, check_choice, check_nonneg_int, check_positive_int, config_error
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.norms import RMSNorm
from ..modules.state import RecurrentState
from ..ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_step
from ..ops.slot_memory import slot_memory_chunked, slot_memory_step
from ..ops.vsa import BINDINGS, KEY_TYPES, bind, blend_key, make_key, unbind
from .base import Mixer, MixerConfig, register_mixer

WRITES = ("delta", "additive")


@dataclasses.dataclass
class HAMTMixerConfig(MixerConfig):
    """hcm_dim: size M of each memory slot (0 = d_model). num_slots: S slots per layer; state per layer
    is S * M floats plus the conv window. write: "delta" (the correcting write: what the slots return
    under this pair's route is replaced by the new bound pair, so a memory of S slots keeps up to S
    routes apart, see the module docstring) or "additive" (superpose only, with a softmax route).
    binding: "elementwise" or "circular" (FFT). key_type: "bipolar", "unitary" or "l2" (see
    ``ops/vsa.py``). binding_init: the binding strength lambda at init, learned per layer: queries and
    keys are lambda * key + (1 - lambda) * the identity key (which binds as the identity), so 0 starts as
    a plain slot memory and learns how far to bind, 1 binds with the made keys from the start (random
    keys at init scramble every read, and MQAR then never leaves chance). use_gating: data-dependent
    write gate and decay (False: always write, a learned constant decay). decay_rate: per-token
    retention at init; additive: of the fastest slot, slot s starts at decay_rate ** (2 ** -s), so
    slots span time scales; delta: the one decay starts at decay_rate ** (1/8). conv_kernel: width of
    the short causal conv on q/k/v. chunk_size: chunk length of the parallel path (speed only, not the
    result).
    """

    hcm_dim: int = 0
    num_slots: int = 16
    write: str = "delta"
    binding: str = "elementwise"
    key_type: str = "bipolar"
    binding_init: float = 0.0
    use_gating: bool = True
    decay_rate: float = 0.95
    conv_kernel: int = 4
    chunk_size: int = 32

    #: the other writes and keys, each run through the whole conformance suite like a model of its own.
    conformance_variants: ClassVar[tuple[dict[str, object], ...]] = (
        {"write": "additive"},
        {"write": "additive", "binding_init": 1.0},
    )

    def check(self, d_model: int) -> None:
        check_nonneg_int("hcm_dim", self.hcm_dim)
        check_positive_int("num_slots", self.num_slots)
        check_choice("binding", self.binding, BINDINGS)
        check_choice("key_type", self.key_type, KEY_TYPES)
        check_bool("use_gating", self.use_gating)
        if isinstance(self.decay_rate, bool) or not isinstance(self.decay_rate, (int, float)):
            raise config_error("decay_rate", self.decay_rate, "must be a number in (0, 1)")
        if not 0.0 < self.decay_rate < 1.0:
            raise config_error("decay_rate", self.decay_rate, "must be in (0, 1) (per-token retention)")
        check_positive_int("conv_kernel", self.conv_kernel)
        check_positive_int("chunk_size", self.chunk_size)
        check_choice("write", self.write, WRITES)
        if isinstance(self.binding_init, bool) or not isinstance(self.binding_init, (int, float)):
            raise config_error("binding_init", self.binding_init, "must be a number in [0, 1]")
        if not 0.0 <= self.binding_init <= 1.0:
            raise config_error("binding_init", self.binding_init, "must be in [0, 1] (a blend of keys)")


@register_mixer("hamt", config=HAMTMixerConfig)
class HolographicMemoryMixer(Mixer):
    """The attention replacement. x: [B, L, D] -> [B, L, D]; state: :class:`RecurrentState`
    (conv window [B, 3M, K-1], memory [B, S, M]); aux: the retention loss."""

    def __init__(self, d_model: int, cfg: HAMTMixerConfig) -> None:
        super().__init__(d_model, cfg)
        d, m, s = d_model, cfg.hcm_dim or d_model, cfg.num_slots
        self.memory_dim, self.num_slots = m, s
        self.in_proj = nn.Linear(d, 3 * m, bias=False)  # raw query, key, value
        self.conv = CausalDepthwiseConv1d(3 * m, cfg.conv_kernel)
        self.write_router = nn.Linear(m, s)  # from the raw key: where a pair is stored
        self.read_router = nn.Linear(m, s)  # from the raw query: which slots a read mixes
        # Per-slot decay offsets; with gating, x_t adds a data-dependent part and sets the write gate.
        self.delta = cfg.write == "delta"
        n_decays = 1 if self.delta else s  # the delta write has one decay for the whole memory
        self.decay_bias = nn.Parameter(torch.zeros(n_decays))
        self.gate_proj = nn.Linear(d, n_decays + 1) if cfg.use_gating else None
        self.bind_strength = nn.Parameter(torch.empty(()))
        self.read_norm = RMSNorm(m)
        self.out_gate = nn.Linear(d, m, bias=False)
        self.out_proj = nn.Linear(m, d, bias=False)
        self.reset_special_parameters()  # a mixer built alone starts as it does inside the shell

    def reset_special_parameters(self) -> None:
        """Inits the generic init (normal weights, zero biases) must not override."""
        self.conv.reset_parameters()
        with torch.no_grad():
            self.bind_strength.fill_(self.cfg.binding_init)
        with torch.no_grad():  # a shared conv bias would add one common direction to every value and key
            self.conv.bias.zero_()
        # Slot s forgets -log(decay_rate) * 2^-s per token at init: time scales 1/(1-r), 2/(1-r), ...
        # The delta write's single decay starts at decay_rate ** (1/8): a half-life of ~108 tokens at 0.95.
        rates = torch.full((1,), 0.125) if self.delta else 0.5 ** torch.arange(self.num_slots, dtype=torch.float32)
        forget = -math.log(self.cfg.decay_rate) * rates
        with torch.no_grad():
            self.decay_bias.copy_(torch.log(torch.expm1(forget)))  # softplus^-1
            if self.gate_proj is not None:
                self.gate_proj.bias[-1] = 2.0  # write gate sigmoid(2) ~ 0.88: write by default

    def _features(self, qkv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv: [..., 3M] after the conv; x: [..., D] the block input at the same positions.

        Returns query, key, value [..., M], then for the additive write: write, log_decay, read [..., S]
        (write = gate * softmax route); for the delta write: the raw write route and read route [..., S]
        (the delta rule L2-normalises them) and beta, log_decay [..., 1]."""
        q_raw, k_raw, value = qkv.split(self.memory_dim, dim=-1)
        query, key = (
            blend_key(make_key(raw, self.cfg.key_type, self.cfg.binding), self.bind_strength, self.cfg.binding)
            for raw in (q_raw, k_raw)
        )
        if self.delta:
            return (query, key, value, self.write_router(k_raw), self.read_router(q_raw), *self._delta_gates(x))
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

    def _delta_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., D] -> the delta write's strength beta in (0, 1] and log decay <= 0, each [..., 1]."""
        if self.gate_proj is None:
            return torch.ones_like(x[..., :1]), -F.softplus(self.decay_bias).expand_as(x[..., :1])
        decay_logit, write_logit = self.gate_proj(x).split(1, dim=-1)
        return torch.sigmoid(write_logit), -F.softplus(decay_logit + self.decay_bias)

    def _output(self, memory_read: torch.Tensor, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unbind the slot-mixed memory [..., M] with the query, normalise, gate, project -> [..., D]."""
        value_estimate = unbind(memory_read, query, self.cfg.binding)
        return self.out_proj(self.read_norm(value_estimate) * F.silu(self.out_gate(x)))

    def state_size(self, seq_len: int) -> int:
        """Memory S * M plus the conv window 3M * (K - 1), whatever the length."""
        return self.num_slots * self.memory_dim + self.conv.channels * self.conv.state_len

    def forward(
        self, x: torch.Tensor, state: RecurrentState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, RecurrentState | None, torch.Tensor | None]:
        """x: [B, L, D]; state: the state after earlier tokens, or None.
        Returns (y [B, L, D], the state after x (None unless a state or use_cache), retention loss or None)."""
        y, (conv_state, memory), aux = self._forward(x, state, need_aux)
        return y, (RecurrentState(conv_state, memory) if use_cache or state is not None else None), aux

    def _forward(
        self, x: torch.Tensor, state: RecurrentState | None, want_aux: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        conv_state, memory = (None, None) if state is None else (state.conv, state.memory)
        if state is not None and x.shape[1] == 1:
            return self._step(x, conv_state, memory, want_aux)
        qkv, conv_state = self.conv(self.in_proj(x), conv_state, return_state=True)
        features = self._features(qkv, x)
        query, key, value = features[:3]
        bound = bind(key, value, self.cfg.binding)
        if self.delta:
            route, read, beta, log_decay = (t.unsqueeze(1) for t in features[3:])  # one head: [B, 1, L, .]
            heads_memory = None if memory is None else memory.unsqueeze(1)
            mixed, heads_memory = gated_delta_rule_chunked(
                read,
                route,
                bound.unsqueeze(1),
                beta[..., 0],
                log_decay[..., 0],
                heads_memory,
                self.cfg.chunk_size,
                True,
            )
            mixed, memory = mixed[:, 0], heads_memory[:, 0]
            aux = self._delta_retention_loss(key, value, features[3], memory) if want_aux else None
        else:
            write, log_decay, read = features[3:]
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
        features = self._features(qkv_t, x_t)
        query, key, value = features[:3]
        bound = bind(key, value, self.cfg.binding)
        if self.delta:
            route, read = (F.normalize(t, dim=-1).unsqueeze(1) for t in features[3:5])  # [B, 1, S]
            beta, log_decay = features[5], features[6]  # [B, 1]: the one head
            mixed, heads_memory = gated_delta_rule_step(
                read, route, bound.unsqueeze(1), beta, log_decay, memory.unsqueeze(1)
            )
            mixed, memory = mixed[:, 0], heads_memory[:, 0]
            aux = None
            if want_aux:
                aux = self._delta_retention_loss(key[:, None], value[:, None], features[3][:, None], memory)
        else:
            write, log_decay, read = features[3:]
            mixed, memory = slot_memory_step(bound, write, log_decay, read, memory)
            aux = None
            if want_aux:
                aux = self._retention_loss(key[:, None], value[:, None], write[:, None], memory[:, None])
        return self._output(mixed, query, x_t).unsqueeze(1), (conv_state, memory), aux

    def _delta_retention_loss(
        self, key: torch.Tensor, value: torch.Tensor, route: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """The retention loss of the delta write: how well the memory after the whole input [B, S, M]
        still returns each position's value [B, L, M] through its own write route [B, L, S] and key:
        mean (1 - cosine). Overwriting a pair that is still needed raises it."""
        slots = torch.einsum("bls,bsm->blm", F.normalize(route, dim=-1), memory)
        recalled = unbind(slots, key, self.cfg.binding)
        return (1.0 - F.cosine_similarity(recalled, value, dim=-1, eps=1e-6)).mean()

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
