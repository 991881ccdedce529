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
   :func:`hierseq.layers.simplex.nash_weights`). Scales with no complete token yet get weight 0.
6. **Output projection** (the seed had none), then the usual pre-norm residual + MLP.

aux_loss (per layer, averaged over layers): a load-balancing term on the aggregation weights,
``S * sum_s mean_t(w_s)^2 - 1``: 0 when the scales are used equally on average, S - 1 when one scale
takes everything. It depends on the scoring parameters (and, for ``nash``, on the attention outputs),
unlike the seed's L1 norm of simplex weights, which is the constant 1. The LM adds
``aux_loss_weight * aux_loss``.

Parameters per block over a standard pre-norm block of the same width and MLP: the per-scale Q/K,
2 D^2 (S - 1), plus D (k + 1) for the conv, (S - 1) D (r + 1) for the downsampling and D S + S for the
aggregation scores (see :func:`extra_parameters_over_standard_block`).

Cached decoding keeps, per layer: the conv's last inputs, for each scale the tokens of the finer scale
not yet merged into a coarse token, the coarse tokens' keys/values (only the last ``window - 1`` in
windowed mode, so per-token cost and memory do not grow with context), and the newest coarse output,
which upsampling reads until the next coarse token is complete. It reproduces the full forward.

Seed-compatible names: :class:`MAHATransformer` (returns ``(hidden, aux_loss)``) and
:class:`MAHABlock` (a drop-in pre-norm block). ``causal=False`` gives the non-causal encoder variant:
centred conv, ceil-length decomposition, unmasked (or symmetric-window) attention, nearest upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    BaseConfig,
    check_choice,
    check_divisible,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..layers.attention import KVCache, causal_mask_with_offset
from ..layers.mlp import make_mlp
from ..layers.norms import make_norm
from ..layers.positional import RotaryEmbedding
from ..layers.simplex import nash_weights, sparsemax
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels

ATTENTION_MODES = ("windowed", "full")
AGGREGATIONS = ("convex", "nash")


# ------------------------------------------------------------------------------------------ config
@dataclass
class MAHAConfig(BaseConfig):
    """MAHA language model / encoder configuration. Shared fields first, then MAHA's own."""

    n_heads: int = 4
    n_scales: int = 3
    downsample: int = 4  # r: stride and kernel of the strided conv between neighbouring scales
    attention: str = "windowed"  # "windowed" (linear in length) or "full" (quadratic, as the seed)
    window: int = 64  # windowed mode: keys per query, counted in the query's own scale
    aggregation: str = "convex"  # "convex" (sparsemax) or "nash" (best-response dynamics)
    nash_iters: int = 6  # best-response steps; the map contracts by >= 2x per step
    nash_temperature: float = 1.0  # multiplier (>= 1) of the scale-aware temperature 2 * n_scales
    conv_kernel: int = 3
    conv_dilation: int = 2
    causal: bool = True  # False: the non-causal encoder variant (MAHATransformer / MAHABlock only)
    aux_loss_weight: float = 0.01
    mlp: str = "swiglu"
    mlp_hidden: int = 0  # 0 = SwiGLU width with the parameters of a 4x GELU MLP
    norm: str = "rmsnorm"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        # window 8 and r = 2 so that short test sequences (33-80 tokens) cross many windows at every
        # scale and reach the coarsest scale (needs r^(S-1) = 4 tokens).
        return {**super().small_overrides(), "n_heads": 2, "n_scales": 3, "downsample": 2, "window": 8}

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_heads", self.n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        if (self.d_model // self.n_heads) % 2:
            raise config_error(
                "n_heads", self.n_heads, f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even (RoPE)"
            )
        check_positive_int("n_scales", self.n_scales)
        check_positive_int("downsample", self.downsample)
        if self.n_scales > 1 and self.downsample < 2:
            raise config_error("downsample", self.downsample, "must be >= 2 when n_scales > 1")
        check_choice("attention", self.attention, ATTENTION_MODES)
        check_positive_int("window", self.window)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_positive_int("nash_iters", self.nash_iters)
        if isinstance(self.nash_temperature, bool) or not isinstance(self.nash_temperature, (int, float)):
            raise config_error("nash_temperature", self.nash_temperature, "must be a number >= 1")
        if self.nash_temperature < 1.0:
            raise config_error(
                "nash_temperature", self.nash_temperature, "must be >= 1 (keeps best responses a contraction)"
            )
        check_positive_int("conv_kernel", self.conv_kernel)
        check_positive_int("conv_dilation", self.conv_dilation)
        if not isinstance(self.causal, bool):
            raise config_error("causal", self.causal, "must be true or false")
        if not self.causal and self.conv_kernel % 2 == 0:
            raise config_error("conv_kernel", self.conv_kernel, "must be odd for the centred (causal=False) conv")
        if isinstance(self.aux_loss_weight, bool) or not isinstance(self.aux_loss_weight, (int, float)):
            raise config_error("aux_loss_weight", self.aux_loss_weight, "must be a number >= 0")
        if self.aux_loss_weight < 0:
            raise config_error("aux_loss_weight", self.aux_loss_weight, "must be >= 0")
        check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise config_error("mlp_hidden", self.mlp_hidden, "must be 0 (auto) or a positive integer")
        check_positive_float("rope_base", self.rope_base)
        check_positive_float("init_std", self.init_std)


def extra_parameters_over_standard_block(cfg: MAHAConfig) -> dict[str, int]:
    """Parameters a MAHA block has beyond a standard pre-norm block (Q, K, V, O + the same MLP/norms).

    Returns the parts and their ``total``: per-scale Q/K 2 D^2 (S - 1); conv D (k + 1); downsampling
    (S - 1) D (r + 1); aggregation scores D S + S.
    """
    d, s = cfg.d_model, cfg.n_scales
    parts = {
        "per_scale_qk": 2 * d * d * (s - 1),
        "conv": d * (cfg.conv_kernel + 1),
        "downsample": (s - 1) * d * (cfg.downsample + 1),
        "aggregation": d * s + s,
    }
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------- state / cache
class MAHALayerState:
    """Decoding state of one :class:`MultiscaleAttention` layer (see the module docstring).

    Per scale s (lists of length S): ``pending[s]`` [B, p < r, D] scale-(s-1) tokens not yet merged
    (unused for s = 0); ``counts[s]`` coarse tokens made so far; ``last_output[s]`` [B, 1, D] output of
    the newest coarse token (None before the first); ``keys``/``values`` [B, H, <= window - 1, Dh]
    (windowed) or a :class:`KVCache` (full). ``conv`` [B, (k - 1) dilation, D] last conv inputs.
    """

    def __init__(self, n_scales: int) -> None:
        self.length = 0
        self.conv: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = [None] * n_scales
        self.counts = [0] * n_scales
        self.last_output: list[torch.Tensor | None] = [None] * n_scales
        self.keys: list[Any] = [None] * n_scales
        self.values: list[torch.Tensor | None] = [None] * n_scales

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished rows)."""

        def pick(t: Any) -> Any:
            return t.index_select(0, index) if isinstance(t, torch.Tensor) else t

        self.conv = pick(self.conv)
        self.pending = [pick(t) for t in self.pending]
        self.last_output = [pick(t) for t in self.last_output]
        for s, k in enumerate(self.keys):
            if isinstance(k, KVCache):
                k.reorder(index)
            else:
                self.keys[s], self.values[s] = pick(k), pick(self.values[s])


class MAHACache:
    """Decoding state of a MAHA stack: one :class:`MAHALayerState` per layer."""

    def __init__(self, n_layers: int, n_scales: int) -> None:
        self.layers = [MAHALayerState(n_scales) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)


# ---------------------------------------------------------------------------------------- attention
def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    n_prefix: int = 0,
    causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Sliding-window attention on a blocked layout: one SDPA call, no loop over tokens or windows.

    q: [B, H, M, Dh] queries; k, v: [B, H, n_prefix + M, Dh], the first ``n_prefix`` (< window) being
    cached keys that precede the queries. Causal: query i attends keys at offsets [i - window + 1, i];
    non-causal (n_prefix must be 0): offsets [i - window + 1, i + window - 1]. Returns [B, H, M, Dh].

    Queries are cut into blocks of ``window``; block b needs keys from its own block and the previous
    one (and the next one, non-causal): overlapping key blocks are taken with ``unfold``, so the work is
    O(M * window) instead of O(M^2).
    """
    B, H, M, Dh = q.shape
    w = window
    if n_prefix >= w or (not causal and n_prefix):
        raise ValueError(f"n_prefix={n_prefix}: must be < window={w} (and 0 when not causal)")
    n_blocks = -(-M // w)
    lookahead = 0 if causal else 1
    n_spans = 2 + lookahead  # key blocks per query block: previous, own (, next)
    span = n_spans * w
    front = w - n_prefix  # left padding so that query block b's keys start at padded block b
    back = (n_blocks + 1 + lookahead) * w - front - n_prefix - M

    def key_blocks(x: torch.Tensor) -> torch.Tensor:
        # [B, H, n_prefix + M, Dh] -> [B * nb, H, span, Dh]: block b = padded blocks b .. b + n_spans - 1.
        # Concatenating shifted views (rather than unfold) keeps backward to cheap slice copies.
        blocks = F.pad(x, (0, 0, front, back)).view(B, H, n_blocks + n_spans - 1, w, Dh).transpose(1, 2)
        shifted = [blocks[:, i : i + n_blocks] for i in range(n_spans)]
        return torch.cat(shifted, dim=3).reshape(B * n_blocks, H, span, Dh)

    # 4-D [B * nb, H, w, Dh] layout: SDPA's fused CPU kernel takes it (5-D inputs fall back to math).
    q_blocks = F.pad(q, (0, 0, 0, n_blocks * w - M)).view(B, H, n_blocks, w, Dh).transpose(1, 2)
    q_blocks = q_blocks.reshape(B * n_blocks, H, w, Dh)
    a = torch.arange(w, device=q.device).unsqueeze(1)  # query offset inside its block
    c = torch.arange(span, device=q.device).unsqueeze(0)  # key slot inside the block's span
    offset = c - w - a  # key position minus query position
    allowed = (offset <= 0) & (offset > -w) if causal else offset.abs() < w  # [w, span]
    slot = torch.arange(n_blocks, device=q.device).unsqueeze(1) * w + c  # padded key index [nb, span]
    real = (slot >= front) & (slot < front + n_prefix + M)
    mask = (allowed.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # [nb, 1, w, span]
    if B > 1:
        mask = mask.repeat(B, 1, 1, 1)
    y = F.scaled_dot_product_attention(q_blocks, key_blocks(k), key_blocks(v), attn_mask=mask, dropout_p=dropout_p)
    y = y.view(B, n_blocks, H, w, Dh).transpose(1, 2).reshape(B, H, n_blocks * w, Dh)
    return y[:, :, :M]


def causal_source_index(positions: torch.Tensor, stride: int) -> torch.Tensor:
    """Index of the coarse token base position t may read: the newest one whose whole window
    [j R, (j + 1) R - 1] has ended by t, i.e. j = floor((t + 1) / R) - 1 (-1: none yet).

    positions: [L] long base positions; stride R = r^s. Returns [L] long."""
    return (positions + 1) // stride - 1


def upsample_causal(table: torch.Tensor, positions: torch.Tensor, stride: int, first: int) -> torch.Tensor:
    """Causal upsampling of coarse outputs to base positions.

    table: [B, 1 + n, D], row 0 the output of coarse token ``first - 1`` (zeros when first = 0) and rows
    1.. those of coarse tokens first .. first + n - 1; positions: [L] base positions, all of whose
    source tokens (:func:`causal_source_index`) lie in first - 1 .. first + n - 1. Returns [B, L, D].
    """
    return table[:, causal_source_index(positions, stride) - first + 1]


class DilatedConv(nn.Module):
    """Depthwise dilated conv. x: [B, L, D] -> [B, L, D]. Causal: left padding only, with a state
    [B, (k - 1) dilation, D] of previous inputs for decoding; otherwise centred (k odd)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, causal: bool) -> None:
        super().__init__()
        self.kernel_size, self.dilation, self.causal = kernel_size, dilation, causal
        self.context = (kernel_size - 1) * dilation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -(kernel_size**-0.5), kernel_size**-0.5)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (y [B, L, D], new state [B, context, D] or None when not causal)."""
        channels_first = x.transpose(1, 2)
        groups = x.shape[-1]
        if not self.causal:
            pad = self.context // 2
            y = F.conv1d(channels_first, self.weight, self.bias, padding=pad, dilation=self.dilation, groups=groups)
            return y.transpose(1, 2), None
        if state is None:
            padded = F.pad(channels_first, (self.context, 0))
        else:
            padded = torch.cat((state.transpose(1, 2), channels_first), dim=-1)
        y = F.conv1d(padded, self.weight, self.bias, dilation=self.dilation, groups=groups)
        new_state = padded[..., padded.shape[-1] - self.context :].transpose(1, 2)
        return y.transpose(1, 2), new_state


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


class MultiscaleAttention(nn.Module):
    """The MAHA mixer. h: [B, L, D] -> (y [B, L, D], aux_loss scalar); see the module docstring.

    ``state`` (a :class:`MAHALayerState`, causal only) continues from earlier calls and is updated in
    place; None means an empty past.
    """

    def __init__(self, cfg: MAHAConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.n_scales, self.factor = cfg.n_scales, cfg.downsample
        self.conv = DilatedConv(d, cfg.conv_kernel, cfg.conv_dilation, cfg.causal)
        self.downsample = nn.ModuleList(StridedDownsample(d, cfg.downsample) for _ in range(cfg.n_scales - 1))
        self.qk = nn.ModuleList(nn.Linear(d, 2 * d, bias=False) for _ in range(cfg.n_scales))
        self.value = nn.Linear(d, d, bias=False)  # shared by every scale
        self.out = nn.Linear(d, d, bias=False)
        self.scores = nn.Linear(d, cfg.n_scales)  # per-token aggregation scores / Nash priors
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_base)

    # ------------------------------------------------------------------ one scale's attention
    def _attend(self, s: int, x: torch.Tensor, state: MAHALayerState, record: bool) -> torch.Tensor:
        """Attention of the new tokens x: [B, n, D] of scale s over that scale's (cached) past."""
        B, n, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k = self.qk[s](x).view(B, n, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, Dh]
        v = self.value(x).view(B, n, H, Dh).transpose(1, 2)
        past = state.counts[s]
        q, k = self.rotary(q, k, past)
        dropout_p = self.cfg.dropout if self.training else 0.0
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
                    state.keys[s] = KVCache()
                k, v = state.keys[s].append(k, v)
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            elif n == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                mask = causal_mask_with_offset(n, k.shape[2], x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, n, D)

    # ---------------------------------------------------------------------------- forward
    def forward(
        self, h: torch.Tensor, state: MAHALayerState | None = None, return_weights: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Returns (y [B, L, D], aux_loss scalar) and, with ``return_weights``, the scale weights [B, L, S]."""
        B, L, D = h.shape
        causal = self.cfg.causal
        record = state is not None
        if state is None:
            state = MAHALayerState(self.n_scales)
        elif not causal:
            raise ValueError("state: decoding state needs causal=True")
        conv_out, conv_state = self.conv(h, state.conv)
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
        usage = weights.mean(dim=(0, 1))  # [S]
        aux = self.n_scales * usage.pow(2).sum() - 1.0
        if return_weights:
            return self.out(mixed), aux, weights
        return self.out(mixed), aux


# ------------------------------------------------------------------------------------------ blocks
class MAHABlock(nn.Module):
    """Pre-norm block: x + out(MAHA(norm(x))), then x + mlp(norm(x)). x: [B, L, D] -> [B, L, D].

    Drop-in usage, seed names: ``MAHABlock(d_model, num_heads, num_scales, aggregation_strategy)``;
    any other :class:`MAHAConfig` field can be passed by keyword (e.g. ``attention="full"``,
    ``causal=False``), or a whole ``config=``. ``forward(x)`` returns y; with ``return_aux=True`` it
    returns ``(y, aux_loss)``; ``state`` continues cached decoding (causal only).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 4,
        num_scales: int = 3,
        aggregation_strategy: str = "convex",
        *,
        config: MAHAConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if config is None:
            config = MAHAConfig(
                d_model=d_model, n_heads=num_heads, n_scales=num_scales, aggregation=aggregation_strategy, **overrides
            )
        self.config = config
        self.attn_norm = make_norm(config.norm, config.d_model)
        self.attn = MultiscaleAttention(config)
        self.mlp_norm = make_norm(config.norm, config.d_model)
        self.mlp = make_mlp(config.mlp, config.d_model, config.mlp_hidden or None, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, state: MAHALayerState | None = None, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.config.d_model or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch >= 1, length >= 1, {self.config.d_model}]")
        mixed, aux = self.attn(self.attn_norm(x), state)
        x = x + self.resid_dropout(mixed)
        x = x + self.mlp(self.mlp_norm(x))
        return (x, aux) if return_aux else x


class MAHAStack(nn.Module):
    """Embedding + MAHA blocks + final norm: input_ids [B, L] -> (hidden [B, L, D], aux_loss scalar,
    the mean of the blocks' aux losses). Positions are rotary, so there is no length limit."""

    def __init__(self, config: MAHAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(MAHABlock(config=config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config.norm, config.d_model)

    def forward(self, input_ids: torch.Tensor, cache: MAHACache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(self.embed(input_ids))
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, cache.layers[i] if cache is not None else None, return_aux=True)
            aux = aux + block_aux
        return self.final_norm(x), aux / len(self.blocks)


def _init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init for linear and embedding weights; residual-output projections scaled by depth.
    The conv and downsampling keep their own init (uniform / average pooling)."""
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            scale = (2 * n_layers) ** -0.5 if name.endswith(("attn.out", "mlp.down", "mlp.fc_out")) else 1.0
            nn.init.normal_(sub.weight, mean=0.0, std=std * scale)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


# ------------------------------------------------------------------------------------------ models
@register("maha", config=MAHAConfig, kind="causal_lm")
class MAHALM(nn.Module):
    """Causal MAHA language model. input_ids [B, L] -> CausalLMOutput(logits [B, L, V], loss,
    lm_loss, aux_loss, cache); loss = lm_loss + aux_loss_weight * aux_loss."""

    def __init__(self, config: MAHAConfig) -> None:
        super().__init__()
        if not config.causal:
            raise config_error(
                "causal",
                config.causal,
                "the maha language model must be causal; use MAHATransformer(causal=False) for the encoder",
            )
        self.config = config
        self.model = MAHAStack(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        _init_weights(self, config.init_std, config.n_layers)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: MAHACache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None and not isinstance(cache, MAHACache):
            raise TypeError(f"cache: expected a MAHACache from a previous call, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = MAHACache(self.config.n_layers, self.config.n_scales)
        hidden, aux = self.model(input_ids, cache)
        logits = self.lm_head(hidden)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss + self.config.aux_loss_weight * aux
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux, cache=cache)


class MAHATransformer(nn.Module):
    """The seed's API: ``output, aux_loss = model(input_ids)`` with output [B, N, d_model].

    ``MAHATransformer(vocab_size, max_len, d_model, num_heads, num_scales, aggregation_strategy)``;
    further :class:`MAHAConfig` fields by keyword (``num_layers`` maps to ``n_layers``; ``causal=False``
    is the encoder variant). ``max_len`` is kept for compatibility and validated, but it is not a
    limit: positions are rotary, so longer inputs work (the seed's learned table crashed on them).
    """

    def __init__(
        self,
        vocab_size: int = 30000,
        max_len: int = 4096,
        d_model: int = 768,
        num_heads: int = 12,
        num_scales: int = 4,
        aggregation_strategy: str = "convex",
        num_layers: int = 4,
        **overrides: Any,
    ) -> None:
        super().__init__()
        check_positive_int("max_len", max_len)
        self.max_len = max_len
        self.config = MAHAConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            n_heads=num_heads,
            n_scales=num_scales,
            aggregation=aggregation_strategy,
            n_layers=num_layers,
            **overrides,
        )
        self.model = MAHAStack(self.config)
        _init_weights(self, self.config.init_std, self.config.n_layers)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        return self.model(input_ids)


__all__ = [
    "MAHABlock",
    "MAHACache",
    "MAHAConfig",
    "MAHALM",
    "MAHATransformer",
    "MultiscaleAttention",
    "upsample_causal",
    "banded_attention",
    "causal_source_index",
    "extra_parameters_over_standard_block",
]
