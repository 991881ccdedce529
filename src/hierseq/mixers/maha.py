"""MAHA: Multiscale Aggregated Hierarchical Attention, made causal, sub-quadratic and honest.

Seed: ``seeds/003_11ba979d3d03c1d8.txt``; what the original code does wrong and what this one must do
instead: ``specs/maha.md``. One attention layer (:class:`MultiscaleAttention`) does, for x: [B, L, D]:

1. **Dilated conv** (depthwise, kernel ``conv_kernel``, dilation ``conv_dilation``): causal = padded on
   the left only. u = h + silu(conv(h)): the residual keeps the token itself in the attention path.
2. **Hierarchical decomposition**: scale 0 is u; scale s is a depthwise strided convolution (kernel =
   stride = ``downsample`` = r) of scale s-1. Coarse token j of scale s therefore summarises exactly
   the base positions [j R, (j + 1) R - 1] with R = r^s, and only *complete* windows are made, so a
   coarse token never contains a position later than the last one it covers.
3. **Attention at every scale**: per-scale query/key projections, one value projection shared by all
   scales, rotary positions counted in the scale's own tokens, causal within the scale. ``full``
   attends over the whole causal past; ``windowed`` over the last ``window`` tokens *of that scale*,
   so scale s reaches ``window * r^s`` base positions back at cost O(L * window) per scale.
4. **Causal upsampling**: base position t reads the output of the newest coarse token whose window
   has ended, j = floor((t + 1) / R) - 1 (nothing before the first window ends). The seed's nearest
   upsampling let position t read a token covering up to R - 1 future positions.
5. **Aggregation per token** over the S upsampled outputs, with weights on the simplex:
   ``convex`` = sparsemax of learned scores (the Euclidean projection, a true convex problem solved
   exactly); ``nash`` = contractive logit best-response dynamics of the scales (see
   :func:`hierseq.ops.simplex.nash_weights`). Scales with no complete token yet get weight 0.
6. **Output projection** ``out_proj`` (the seed had none); the shell adds the residual and the MLP.

aux (per layer; the shell averages over layers): a load-balancing term on the aggregation weights,
``S * sum_s mean_t(w_s)^2 - 1``: 0 when the scales are used equally on average, S - 1 when one scale
takes everything. It depends on the scoring parameters (and, for ``nash``, on the attention outputs),
unlike the seed's L1 norm of simplex weights, which is the constant 1. The LM adds
``aux_loss_weight * aux_loss``; the mixer computes it only when asked (``need_aux``).

Parameters per block over a standard pre-norm block of the same width and MLP: the per-scale Q/K,
2 D^2 (S - 1), plus D (k + 1) for the conv, (S - 1) D (r + 1) for the downsampling and D S + S for the
aggregation scores (see :func:`extra_parameters_over_standard_block`).

Cached decoding keeps, per layer: the conv's last inputs, for each scale the tokens of the finer scale
not yet merged into a coarse token, the coarse tokens' keys/values (only the last ``window - 1`` in
windowed mode, so per-token cost and memory do not grow with context), and the newest coarse output,
which upsampling reads until the next coarse token is complete. It reproduces the full forward.

``causal=False`` gives the non-causal encoder variant (the seed's ``MAHATransformer`` in ``compat/maha.py``):
centred conv, ceil-length decomposition, unmasked (or symmetric-window) attention, nearest upsampling.
The banded attention and the causal up-sampling maps are ops (``ops/banded_attention.py``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, config_error
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.positional import RotaryEmbedding
from ..modules.state import LayerState
from ..ops.banded_attention import banded_attention, causal_source_index, upsample_causal
from ..ops.simplex import nash_weights, sparsemax
from .attention import KVState, RotaryHeadsConfig, cached_causal_attention
from .base import Mixer, register_mixer

ATTENTION_MODES = ("windowed", "full")
AGGREGATIONS = ("convex", "nash")


@dataclasses.dataclass
class MAHAMixerConfig(RotaryHeadsConfig):
    """n_scales: S; downsample: r, stride and kernel of the strided conv between neighbouring scales;
    attention: "windowed" (linear in length) or "full" (quadratic, as the seed); window: keys per query
    in windowed mode, counted in the query's own scale; aggregation: "convex" (sparsemax) or "nash"
    (best-response dynamics), nash_iters steps at nash_temperature (>= 1) times the scale-aware
    temperature 2 S; conv_kernel / conv_dilation: the dilated conv; causal: False gives the non-causal
    encoder variant (compat only); attn_dropout: on attention probabilities."""

    n_scales: int = 3
    downsample: int = 4
    attention: str = "windowed"
    window: int = 64
    aggregation: str = "convex"
    nash_iters: int = 6
    nash_temperature: float = 1.0
    conv_kernel: int = 3
    conv_dilation: int = 2
    causal: bool = True
    attn_dropout: float = 0.0

    positive_ints = ("n_scales", "downsample", "window", "nash_iters", "conv_kernel", "conv_dilation")
    probabilities = ("attn_dropout",)
    flags = ("causal",)

    def check(self, d_model: int) -> None:
        super().check(d_model)
        if self.n_scales > 1 and self.downsample < 2:
            raise config_error("downsample", self.downsample, "must be >= 2 when n_scales > 1")
        check_choice("attention", self.attention, ATTENTION_MODES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if isinstance(self.nash_temperature, bool) or not isinstance(self.nash_temperature, (int, float)):
            raise config_error("nash_temperature", self.nash_temperature, "must be a number >= 1")
        if self.nash_temperature < 1.0:
            raise config_error(
                "nash_temperature", self.nash_temperature, "must be >= 1 (keeps best responses a contraction)"
            )
        if not self.causal and self.conv_kernel % 2 == 0:
            raise config_error("conv_kernel", self.conv_kernel, "must be odd for the centred (causal=False) conv")


@dataclasses.dataclass
class MAHAState(LayerState):
    """Decoding state of one :class:`MultiscaleAttention` layer (see the module docstring).

    Per scale s (lists of length S): ``pending[s]`` [B, p < r, D] scale-(s-1) tokens not yet merged
    (unused for s = 0); ``counts[s]`` coarse tokens made so far; ``last_output[s]`` [B, 1, D] output of
    the newest coarse token (None before the first); ``keys``/``values`` [B, H, <= window - 1, Dh]
    (windowed) or a :class:`KVState` (full). ``conv`` [B, D, (k - 1) dilation] last conv inputs.
    """

    length: int = 0
    conv: torch.Tensor | None = None
    pending: list = dataclasses.field(default_factory=list)
    counts: list = dataclasses.field(default_factory=list)
    last_output: list = dataclasses.field(default_factory=list)
    keys: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, n_scales: int) -> MAHAState:
        return cls(
            pending=[None] * n_scales,
            counts=[0] * n_scales,
            last_output=[None] * n_scales,
            keys=[None] * n_scales,
            values=[None] * n_scales,
        )


def extra_parameters_over_standard_block(cfg: MAHAMixerConfig, d_model: int) -> dict[str, int]:
    """Parameters a MAHA block has beyond a standard pre-norm block (Q, K, V, O + the same MLP/norms).

    Returns the parts and their ``total``: per-scale Q/K 2 D^2 (S - 1); conv D (k + 1); downsampling
    (S - 1) D (r + 1); aggregation scores D S + S.
    """
    d, s = d_model, cfg.n_scales
    parts = {
        "per_scale_qk": 2 * d * d * (s - 1),
        "conv": d * (cfg.conv_kernel + 1),
        "downsample": (s - 1) * d * (cfg.downsample + 1),
        "aggregation": d * s + s,
    }
    parts["total"] = sum(parts.values())
    return parts


class StridedDownsample(nn.Module):
    """Depthwise strided conv, kernel = stride = r: x [B, n, D] -> [B, n // r, D] (causal: complete
    windows only) or [B, ceil(n / r), D] (non-causal: the tail zero-padded). Initialised as average
    pooling, so at initialisation coarse tokens are window means."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.full((factor, channels), 1.0 / factor))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, complete_only: bool = True) -> torch.Tensor:
        B, n, D = x.shape
        r = self.factor
        if complete_only:
            x = x[:, : (n // r) * r]
        else:
            x = F.pad(x, (0, 0, 0, (-n) % r))
        windows = x.reshape(B, x.shape[1] // r, r, D)
        # Elementwise multiply-add: an einsum here becomes a batched matmul with inner size r.
        return (windows * self.weight).sum(dim=2) + self.bias


@register_mixer("maha", config=MAHAMixerConfig)
class MultiscaleAttention(Mixer):
    """The MAHA mixer. h: [B, L, D] -> (y [B, L, D], state, aux scalar); see the module docstring.

    ``state`` (a :class:`MAHAState`, causal only) continues from earlier calls and is advanced in
    place; None means an empty past.
    """

    def __init__(self, d_model: int, cfg: MAHAMixerConfig) -> None:
        super().__init__(d_model, cfg)
        d = d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.n_scales, self.factor = cfg.n_scales, cfg.downsample
        self.conv = CausalDepthwiseConv1d(d, cfg.conv_kernel, dilation=cfg.conv_dilation)
        self.downsample = nn.ModuleList(StridedDownsample(d, cfg.downsample) for _ in range(cfg.n_scales - 1))
        self.qk = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(cfg.n_scales))
        self.value = nn.Linear(d, d, bias=False)  # shared by every scale
        self.out_proj = nn.Linear(d, d, bias=False)
        self.scores = nn.Linear(d, cfg.n_scales)  # per-token aggregation scores / Nash priors
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)
        self.reset_special_parameters()  # a mixer used alone (MAHABlock) starts as in a stack

    # ------------------------------------------------------------------ one scale's attention
    def _attend(self, s: int, x: torch.Tensor, state: MAHAState, record: bool) -> torch.Tensor:
        """Attention of the new tokens x: [B, n, D] of scale s over that scale's (cached) past."""
        B, n, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k = self.qk[s](x).view(B, n, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, Dh]
        v = self.value(x).view(B, n, H, Dh).transpose(1, 2)
        past = state.counts[s]
        q, k = self.rotary(q, k, past)
        dropout_p = self.cfg.attn_dropout if self.training else 0.0
        if self.cfg.attention == "windowed":
            w = self.cfg.window
            if state.keys[s] is not None:
                k = torch.cat((state.keys[s], k), dim=2)
                v = torch.cat((state.values[s], v), dim=2)
            n_prefix = k.shape[2] - n
            y = banded_attention(q, k, v, w, n_prefix, self.cfg.causal, dropout_p)
            if record:  # only the last window - 1 keys can be seen by later queries
                keep = max(0, k.shape[2] - (w - 1))
                state.keys[s], state.values[s] = k[:, :, keep:], v[:, :, keep:]
        elif not self.cfg.causal:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            if record:
                if state.keys[s] is None:
                    state.keys[s] = KVState()
                k, v = state.keys[s].append(k, v)
            y = cached_causal_attention(q, k, v, past, dropout_p)
        return y.transpose(1, 2).reshape(B, n, D)

    # ---------------------------------------------------------------------------- forward
    def reset_special_parameters(self) -> None:
        with torch.no_grad():  # the conv starts unbiased, as the seed's
            self.conv.bias.zero_()

    def tbptt_refusal(self) -> str | None:
        if self.cfg.attention == "full":
            return "attention='full' keeps every coarse key, so its state grows without bound; use 'windowed'"
        return None

    def state_size(self, seq_len: int) -> int:
        D, r, w = self.d_model, self.factor, self.cfg.window
        keys = sum(
            min(seq_len // r**s, w - 1 if self.cfg.attention == "windowed" else seq_len) for s in range(self.n_scales)
        )
        return 2 * D * keys + D * (self.conv.state_len + self.n_scales * r)

    def forward(
        self, h: torch.Tensor, state: MAHAState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, MAHAState | None, torch.Tensor | None]:
        y, state, aux, _ = self.forward_with_weights(h, state, use_cache, need_aux)
        return y, state, aux

    def forward_with_weights(
        self, h: torch.Tensor, state: MAHAState | None = None, use_cache: bool = False, need_aux: bool = True
    ) -> tuple[torch.Tensor, MAHAState | None, torch.Tensor | None, torch.Tensor]:
        """:meth:`forward` that also returns the aggregation weights over the scales [B, L, S]."""
        B, L, D = h.shape
        causal = self.cfg.causal
        if state is None and use_cache:
            state = MAHAState.empty(self.n_scales)
        record = state is not None
        if state is None:
            state = MAHAState.empty(self.n_scales)
        elif not causal:
            raise ValueError("state: decoding state needs causal=True")
        if causal:
            conv_out, conv_state = self.conv(h, state.conv, return_state=True)
        else:
            conv_out, conv_state = self.conv.centred(h), None
        u = h + F.silu(conv_out)  # [B, L, D]
        start = state.length
        t = torch.arange(start, start + L, device=h.device)  # base positions of the new tokens
        upsampled, available = [], []
        x = u  # new tokens of the current scale
        for s in range(self.n_scales):
            R = self.factor**s
            if s > 0:
                if causal:
                    # Finer tokens left over from earlier calls complete their window first.
                    if state.pending[s] is not None:
                        x = torch.cat((state.pending[s], x), dim=1)
                    n_complete = (x.shape[1] // self.factor) * self.factor
                    if record:
                        state.pending[s] = x[:, n_complete:]
                    x = self.downsample[s - 1](x, complete_only=True)
                else:
                    x = self.downsample[s - 1](x, complete_only=False)
            n_new = x.shape[1]
            out = self._attend(s, x, state, record) if n_new else x  # [B, n_new, D]
            if causal:
                # Row 0 is the newest output from before this call (zeros if none), then the new ones.
                previous = state.last_output[s]
                if previous is None:
                    previous = out.new_zeros(B, 1, D)
                table = torch.cat((previous, out), dim=1)
                upsampled.append(upsample_causal(table, t, R, state.counts[s]))
                available.append(causal_source_index(t, R) >= 0)
                if record:
                    state.last_output[s] = table[:, -1:]
                    state.counts[s] += n_new
            else:
                upsampled.append(out[:, t // R])  # nearest: the coarse token covering t
                available.append(torch.ones_like(t, dtype=torch.bool))
        if record:
            state.conv = conv_state
            state.length += L
        candidates = torch.stack(upsampled, dim=2)  # [B, L, S, D]
        mask = torch.stack(available, dim=-1).expand(B, L, self.n_scales)  # [B, L, S]
        prior = self.scores(u)  # [B, L, S]
        if self.cfg.aggregation == "convex":
            weights = sparsemax(prior, mask)
        else:
            weights = nash_weights(prior, candidates, self.cfg.nash_iters, self.cfg.nash_temperature, mask)
        mixed = (weights.unsqueeze(-1) * candidates).sum(dim=2)  # [B, L, D]
        aux = None
        if need_aux:
            usage = weights.mean(dim=(0, 1))  # [S]
            aux = self.n_scales * usage.pow(2).sum() - 1.0
        return self.out_proj(mixed), (state if record else None), aux, weights
