"""MAHA: Multiscale Aggregated Hierarchical Attention, made causal, sub-quadratic, full-reach and honest.

Seed: ``seeds/003_11ba979d3d03c1d8.txt``; what the original code does wrong and what this one must do
instead: ``specs/maha.md`` (and its revised requirements, the MAHA issue). One attention layer
(:class:`MultiscaleAttention`) does, for h: [B, L, D]:

1. **Dilated conv** (depthwise, kernel ``conv_kernel``, dilation ``conv_dilation``, no bias): causal =
   padded on the left only. u = h + silu(conv(h)): the residual keeps the token itself in the path.
2. **Hierarchical decomposition**: level 0 is u; level l is the depthwise strided convolution (kernel =
   stride = ``downsample`` = r, one filter shared by every level: a self-similar pyramid) of level
   l - 1. Coarse token j of level l summarises exactly the base positions [j R, (j + 1) R - 1] with
   R = r^l, and only *complete* windows are made, so a coarse token never contains a later position.
3. **Attention per scale**, with one query/key projection and one value projection shared by all
   scales (``per_scale_qk=True``: a query/key projection per scale), rotary positions counted in the
   scale's own tokens. The S = ``n_scales`` scales are the S candidates of the aggregation:

   * scales 0 .. S - 2: causal attention at levels 0 .. S - 2; ``windowed`` over the last ``window``
     tokens *of that level* (reach window * r^l), ``full`` over the whole causal past;
   * scale S - 1, the **reach pyramid** (windowed mode): the queries of level S - 1 attend in one
     softmax to the last ``window`` tokens of level S - 1 and of every coarser level S - 1 + m
     (m = 1, 2, ...) that the finer one does not already cover: level m is used by query j iff
     floor((j + 1) / r^(m - 1)) > window. The levels grow with the length until the coarsest one
     in use holds at most ``window`` tokens, i.e. until its window reaches position 0 (with
     window >= r - 1, which the config requires, the windows of consecutive levels also leave no
     gap). Rotary position of a coarse key: the index of the last level-(S - 1) token it covers,
     (i + 1) r^m - 1. In ``full`` mode scale S - 1 is plain full attention at level S - 1.

4. **Causal upsampling**: base position t reads the output of the newest token of scale l whose window
   has ended, j = floor((t + 1) / R) - 1 (nothing before the first window ends: the scale is masked).
5. **Aggregation per token** over the S upsampled outputs O_1..O_S (value space, before ``out_proj``),
   with weights on the simplex, all from the scores s = ``scores``(u) [S]:

   * ``convex``: the exact solution of the QP over the simplex (``ops/simplex_qp.py``)
     w* = argmin_w 1/2 ||sum_l w_l O^_l - t^||^2 / D + lam/2 ||w||^2 - s.w, with target
     t = g * v (the token's own shared-V value, gated per channel by ``target_gain``), the candidates
     and the target divided by one per-token RMS (so the fit term is O(1) at any width and scale),
     and lam = 1e-3 + softplus(.) learned from ``convex_ridge`` (or fixed: ``learn_strengths=False``).
     The weights depend on the scale outputs through Q = O^ O^T / D + lam I and c = O^ t^ / D + s.
   * ``nash``: the unique Nash equilibrium of the redundancy game (``ops/redundancy_game.py``): a
     scale's payoff is its relevance s_l, minus gamma times its cosine redundancy with the mixture of
     the OTHER scales, minus crowding tau * w_l; certified by its epsilon-Nash gap (<= 1e-4, checked
     in the tests). tau = 1e-3 + softplus(.) from ``nash_crowding``, gamma = tau * 0.98 sigmoid(.)
     from ``nash_redundancy``, so 0 <= gamma < tau (uniqueness) holds for every parameter value.
     Without interaction (gamma = 0) the equilibrium is the prior sparsemax(s / tau).
   * ``softmax``: softmax(s), no optimisation (the ablation, same scores and attention).

   Both solvers run in their sync-free mode: a fixed amount of work, nothing read back from the
   device, exact for S <= 4 by face enumeration of every row (S <= 8 allowed; above 4 a measured
   3 S + 2 step budget, see ``ops/simplex_qp.py``). Masked (not yet available) scales get weight 0.
6. **Output projection** ``out_proj``; the shell adds the residual and the MLP.

aux (per layer; the shell averages over layers): a load-balancing term on the aggregation weights,
``S * sum_s mean_t(w_s)^2 - 1``: 0 when the scales are used equally on average, S - 1 when one scale
takes everything; the LM adds ``aux_loss_weight * aux_loss``; computed only when asked (``need_aux``).

**Cost** per layer at length L (windowed, w = window, r = downsample, R = r^(S - 1)): building the
pyramid O(L D) (geometric); scales 0 .. S - 2 O(L w D r / (r - 1)) (banded attention, 2 w keys per
query); the reach pyramid O((L / R) w D (M + 2)), M + 1 <= log_r(L / (R w)) + 2 levels per query
(2 w keys at level S - 1, w + w / r^m + 1 at level S - 1 + m); the aggregation O(L (S^2 D + 2^S S^3))
(the QP's Gram matrix, one batched solve of its 2^S - 1 faces). In all
O(L w D + (L / R) w D log L) = O(L log L), O(L) at every practical length (the log term carries
1 / R). Memory is linear in L. Reach: the whole context, in every layer. Decoding state: per level
the last w keys and values and < r pending tokens, for log_r(T) + 2 levels: O(w D log T), not O(T).
``full``: O(L^2 D), the comparison mode.

**Parameters** (see :func:`parameter_report`): shared Q/K 2 D H d_qk, shared V D^2, out_proj D^2, conv
D k, the shared downsampling D r, scores D S + S, and for ``convex`` D + 1, for ``nash`` 2. A
standard block's attention is 4 D^2. By default (``qk_head_dim=0``) the query/key head width d_qk is
the largest even width <= D / H that keeps the block within the standard block's parameters (the
reserve is the same for every aggregation, so their attention is identical); at D = 128 or 256 with 4
heads that is 2 below the head width. ``per_scale_qk=True`` with the automatic width gives low-rank
per-scale Q/K within the budget; an explicit ``qk_head_dim`` above the fitting width exceeds it, which
:func:`parameter_report` and ``hierseq info`` (through the LM config's ``describe()``) say.

``causal=False`` gives the non-causal encoder variant (the seed's ``MAHATransformer`` in
``compat/maha.py``): centred conv, ceil-length decomposition, symmetric windows (or unmasked attention),
nearest upsampling; its pyramid uses every level down to one holding at most ``window`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_nonneg_float, config_error
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.positional import RotaryEmbedding
from ..modules.state import LayerState
from ..ops.banded_attention import banded_attention, causal_source_index, upsample_causal
from ..ops.redundancy_game import redundancy_game_equilibrium
from ..ops.simplex_qp import mixture_qp_weights
from .attention import RotaryHeadsConfig, causal_mask_with_offset
from .base import Mixer, register_mixer

ATTENTION_MODES = ("windowed", "full")
AGGREGATIONS = ("convex", "nash", "softmax")
#: the aggregation solves a problem over the scales per token; the solver is exact and cheap up to here.
MAX_SCALES = 8
#: learned redundancy stays below this fraction of the crowding: 0 <= gamma < tau (a unique equilibrium).
REDUNDANCY_RATIO_MAX = 0.98
#: floor of the learned ridge (convex) and crowding (nash): keeps the problems strongly convex.
STRENGTH_FLOOR = 1e-3


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclasses.dataclass
class MAHAMixerConfig(RotaryHeadsConfig):
    """n_scales: S (<= 8), the candidates of the aggregation; downsample: r, stride and kernel of the
    strided conv between neighbouring levels; attention: "windowed" (O(L log L), full reach through
    the pyramid) or "full" (quadratic, as the seed); window: keys per query in windowed mode, counted
    in the query's own level; aggregation: "convex" (simplex QP), "nash" (redundancy game) or
    "softmax" (the ablation); qk_head_dim: query/key width per head (0 = the widest even width that
    keeps the block within a standard block's parameters); per_scale_qk: a query/key projection per
    scale (the seed's; with qk_head_dim 0 they are narrower to fit the budget); convex_ridge: lam of
    the QP; nash_redundancy / nash_crowding: gamma and tau of the game (0 <= gamma < tau);
    learn_strengths: lam, gamma and tau are learned from these initial values (else fixed);
    conv_kernel / conv_dilation: the dilated conv; causal: False gives the non-causal encoder
    variant (compat only); attn_dropout: on attention probabilities."""

    n_scales: int = 3
    downsample: int = 4
    attention: str = "windowed"
    window: int = 64
    aggregation: str = "convex"
    qk_head_dim: int = 0
    per_scale_qk: bool = False
    convex_ridge: float = 1.0
    nash_redundancy: float = 0.5
    nash_crowding: float = 1.0
    learn_strengths: bool = True
    conv_kernel: int = 3
    conv_dilation: int = 2
    causal: bool = True
    attn_dropout: float = 0.0

    positive_ints = ("n_scales", "downsample", "window", "conv_kernel", "conv_dilation")
    nonneg_ints = ("qk_head_dim",)
    positive_floats = ("convex_ridge", "nash_crowding")
    probabilities = ("attn_dropout",)
    flags = ("causal", "per_scale_qk", "learn_strengths")

    #: the other modes the conformance suite runs (the default is windowed + convex).
    conformance_variants: ClassVar[tuple[dict[str, object], ...]] = (
        {"aggregation": "nash"},
        {"aggregation": "softmax"},
        {"attention": "full"},
        {"attention": "full", "aggregation": "nash"},
        {"per_scale_qk": True},
    )

    def check(self, d_model: int) -> None:
        super().check(d_model)
        if self.n_scales > MAX_SCALES:
            raise config_error("n_scales", self.n_scales, f"must be <= {MAX_SCALES} (one QP over the scales per token)")
        check_choice("attention", self.attention, ATTENTION_MODES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.downsample < 2 and (self.n_scales > 1 or self.attention == "windowed"):
            raise config_error(
                "downsample", self.downsample, "must be >= 2 (the stride between levels; windowed builds a pyramid)"
            )
        if self.attention == "windowed" and self.window < self.downsample - 1:
            raise config_error(
                "window", self.window, f"must be >= downsample - 1 = {self.downsample - 1} (the pyramid leaves no gap)"
            )
        check_nonneg_float("nash_redundancy", self.nash_redundancy)
        ratio = REDUNDANCY_RATIO_MAX if self.learn_strengths else 1.0
        if not self.nash_redundancy < ratio * self.nash_crowding:
            raise config_error(
                "nash_redundancy",
                self.nash_redundancy,
                f"must be < {ratio:g} * nash_crowding={self.nash_crowding} (a unique equilibrium needs it)",
            )
        if self.qk_head_dim % 2:
            raise config_error("qk_head_dim", self.qk_head_dim, "must be even (rotary positions rotate pairs)")
        if not self.causal and self.conv_kernel % 2 == 0:
            raise config_error("conv_kernel", self.conv_kernel, "must be odd for the centred (causal=False) conv")
        resolve_qk_head_dim(self, d_model)  # raises when the automatic width cannot fit


# ------------------------------------------------------------------------------------ parameters
def has_downsample(cfg: MAHAMixerConfig) -> bool:
    """The strided conv exists when there is a coarser level: S > 1, or the windowed reach pyramid."""
    return cfg.n_scales > 1 or cfg.attention == "windowed"


def _aggregation_parameters(aggregation: str, learn: bool, d_model: int) -> int:
    if aggregation == "convex":
        return d_model + int(learn)  # target gain [D], ridge
    if aggregation == "nash":
        return 2 * int(learn)  # redundancy, crowding
    return 0


def mixer_parameter_parts(cfg: MAHAMixerConfig, d_model: int, qk_head_dim: int) -> dict[str, int]:
    """Parameters of one MAHA mixer by part (``total`` included) at query/key head width ``qk_head_dim``."""
    d, s = d_model, cfg.n_scales
    parts = {
        "query_key": (s if cfg.per_scale_qk else 1) * 2 * d * cfg.n_heads * qk_head_dim,
        "value": d * d,
        "out_proj": d * d,
        "conv": d * cfg.conv_kernel,
        "downsample": d * cfg.downsample if has_downsample(cfg) else 0,
        "scores": d * s + s,
        "aggregation": _aggregation_parameters(cfg.aggregation, cfg.learn_strengths, d),
    }
    parts["total"] = sum(parts.values())
    return parts


def standard_attention_parameters(d_model: int) -> int:
    """The token mixer of a standard pre-norm block: Q, K, V, O without bias (``mixers/attention.py``)."""
    return 4 * d_model * d_model


def _fits(cfg: MAHAMixerConfig, d_model: int, width: int) -> bool:
    """The block fits the budget at this width whatever the aggregation (the reserve is the largest one)."""
    parts = mixer_parameter_parts(cfg, d_model, width)
    reserve = max(_aggregation_parameters(a, cfg.learn_strengths, d_model) for a in AGGREGATIONS)
    return parts["total"] - parts["aggregation"] + reserve <= standard_attention_parameters(d_model)


def resolve_qk_head_dim(cfg: MAHAMixerConfig, d_model: int) -> int:
    """The query/key head width: ``qk_head_dim``, or (0) the widest even width <= d_model / n_heads that
    keeps the mixer within a standard attention's 4 D^2 parameters. Raises ValueError when none does."""
    if cfg.qk_head_dim:
        return cfg.qk_head_dim
    head = d_model // cfg.n_heads
    for width in range(head - head % 2, 1, -2):
        if _fits(cfg, d_model, width):
            return width
    raise config_error(
        "qk_head_dim",
        cfg.qk_head_dim,
        f"automatic: no even query/key head width >= 2 keeps a MAHA block at d_model={d_model}, n_heads={cfg.n_heads} "
        "within a standard block's parameters; set qk_head_dim explicitly (the block then exceeds the budget)",
    )


def parameter_report(cfg: MAHAMixerConfig, d_model: int) -> dict[str, Any]:
    """The mixer's parameters against a standard block's attention, at the same width: ``maha``,
    ``standard``, ``difference`` (maha - standard, per block; the MLP and norms are the same),
    ``within_budget``, ``qk_head_dim`` / ``head_dim``, ``parts`` and, when over budget, ``why``."""
    width = resolve_qk_head_dim(cfg, d_model)
    parts = mixer_parameter_parts(cfg, d_model, width)
    standard = standard_attention_parameters(d_model)
    report: dict[str, Any] = {
        "maha": parts["total"],
        "standard": standard,
        "difference": parts["total"] - standard,
        "within_budget": parts["total"] <= standard,
        "qk_head_dim": width,
        "head_dim": d_model // cfg.n_heads,
        "parts": parts,
    }
    if not report["within_budget"]:
        flags = [f"qk_head_dim={cfg.qk_head_dim}"] if cfg.qk_head_dim else []
        flags += ["per_scale_qk=True"] if cfg.per_scale_qk else []
        report["why"] = ", ".join(flags) or "the configuration"
    return report


def describe_parameters(cfg: MAHAMixerConfig, d_model: int) -> list[str]:
    """Lines for ``hierseq info``: the block's parameters against a standard transformer block's."""
    r = parameter_report(cfg, d_model)
    width = f"query/key head width {r['qk_head_dim']} of {r['head_dim']}"
    width += " (automatic: the widest that fits the budget)" if not cfg.qk_head_dim else " (set)"
    if r["within_budget"]:
        verdict = f"within the budget ({r['difference']:+,})"
    else:
        verdict = f"EXCEEDS a standard transformer block by {r['difference']:,} parameters per block ({r['why']})"
    return [
        f"parameter budget: mixer {r['maha']:,} vs {r['standard']:,} for a standard transformer block's "
        f"attention at d_model={d_model} (same MLP and norms): {verdict}",
        f"  {width}; query/key {'per scale' if cfg.per_scale_qk else 'shared by the scales'}, value shared",
    ]


# ----------------------------------------------------------------------------------------- state
@dataclasses.dataclass
class MAHAState(LayerState):
    """Decoding state of one :class:`MultiscaleAttention` layer (see the module docstring).

    Per level l (lists that grow with the levels): ``pending[l]`` [B, p < r, D] level-(l-1) tokens not
    yet merged (None for l = 0); ``counts[l]`` tokens of level l made so far; ``keys`` / ``values``
    [B, H, n, d_qk] / [B, H, n, Dh]: the last window - 1 (levels < S) or window (pyramid levels >= S)
    tokens' keys and values in windowed mode, all of them for the S scales in full mode. Per scale s
    (length S): ``last_output[s]`` [B, 1, D] the newest output of scale s (None before the first),
    which upsampling reads until its next token is complete. ``conv`` [B, D, (k - 1) dilation].
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
        state = cls(last_output=[None] * n_scales)
        state.ensure_levels(n_scales)
        return state

    def ensure_levels(self, n_levels: int) -> None:
        """Grow the per-level lists to ``n_levels`` (a new level starts empty)."""
        while len(self.counts) < n_levels:
            self.pending.append(None)
            self.counts.append(0)
            self.keys.append(None)
            self.values.append(None)


# ------------------------------------------------------------------------------ attention kernels
def _banded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, n_prefix: int, causal: bool, dropout_p: float
) -> torch.Tensor:
    """:func:`banded_attention` with query/key width d_qk != value width Dh: q and k (or v) are zero-padded
    to a common width and q rescaled by sqrt(E / d_qk), so the scores are q.k / sqrt(d_qk) exactly."""
    dk, dv = q.shape[-1], v.shape[-1]
    width = max(dk, dv)
    if dk != width:
        q = F.pad(q * math.sqrt(width / dk), (0, width - dk))
        k = F.pad(k, (0, width - dk))
    if dv != width:
        v = F.pad(v, (0, width - dv))
    return banded_attention(q, k, v, window, n_prefix, causal, dropout_p)[..., :dv]


def _full(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int, causal: bool, dropout_p: float
) -> torch.Tensor:
    """Full (causal: over the whole past; queries are the last n of the keys) attention, scale 1/sqrt(d_qk)."""
    scale = q.shape[-1] ** -0.5
    if not causal or q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if n_past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    mask = causal_mask_with_offset(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


@dataclasses.dataclass
class PyramidLevel:
    """Keys / values of one level of the reach pyramid for :func:`pyramid_window_attention`: k
    [B, H, n, d_qk] and v [B, H, n, Dh] hold that level's tokens ``first`` .. ``first + n - 1``;
    ``group``: how many query-level tokens one of its tokens spans (r^m); ``active``: bool [n_queries]
    (None = all), which queries use this level."""

    k: torch.Tensor
    v: torch.Tensor
    first: int
    group: int
    active: torch.Tensor | None = None


def pyramid_window_attention(
    q: torch.Tensor,
    first: int,
    levels: list[PyramidLevel],
    window: int,
    causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """One softmax over a window of keys at each of several levels, in O(n (window + 1) levels) work.

    q: [B, H, n, d_qk] queries, the tokens ``first`` .. ``first + n - 1`` of the query level. For a level
    whose tokens span g query tokens, let a(j) = floor((j + 1) / g) be the number of its tokens complete
    when query j ends (causal); query j attends its tokens a(j) - window .. a(j) - 1 (those >= 0 and
    held). Non-causal: a(j) = floor(j / g), tokens a(j) - window + 1 .. a(j) + window - 1. Level 0
    with g = 1 is plain sliding-window attention. Returns [B, H, n, Dh].

    Layout: queries in blocks of b = min(window, n); a block needs at most window + (b - 1) // g + 1
    consecutive keys per level, gathered once per block, so memory is O(n (window + b / g)) per level
    (the banded layout of ``ops/banded_attention.py`` generalised to any stride); no loop over tokens.
    """
    B, H, n, dk = q.shape
    device = q.device
    shift, low, span = (1, -window, window) if causal else (0, 1 - window, 2 * window - 1)
    block = max(1, min(window, n))
    n_blocks = -(-n // block)
    padded = n_blocks * block
    q_blocks = F.pad(q, (0, 0, 0, padded - n)).view(B, H, n_blocks, block, dk) * dk**-0.5
    query = first + torch.arange(padded, device=device).view(n_blocks, block)  # query-level index
    real = (query < first + n).view(-1)
    scores, gathered = [], []
    for level in levels:
        g, n_keys = level.group, level.k.shape[2]
        if n_keys == 0:
            continue  # a level with nothing held adds no key
        width = span + (block - 1) // g + 1
        a = torch.div(query + shift, g, rounding_mode="floor")  # [nb, b]
        key = (a[:, :1] + low) + torch.arange(width, device=device)  # [nb, width] level index
        offset = key[:, None, :] - a[:, :, None]  # [nb, b, width]
        allowed = (offset >= low) & (offset < low + span)
        allowed &= ((key >= max(level.first, 0)) & (key < level.first + n_keys))[:, None, :]
        if level.active is not None:
            active = F.pad(level.active, (0, padded - n)).view(n_blocks, block)
            allowed &= active[:, :, None]
        allowed |= ~real.view(n_blocks, block, 1)  # padding queries see everything: no all-masked rows
        local = (key - level.first).clamp(0, max(n_keys - 1, 0)).view(-1)
        k = level.k.index_select(2, local).view(B, H, n_blocks, width, dk)
        v = level.v.index_select(2, local).view(B, H, n_blocks, width, level.v.shape[-1])
        s = torch.einsum("bhiqd,bhikd->bhiqk", q_blocks, k)
        scores.append(s.masked_fill(~allowed, float("-inf")))
        gathered.append(v)
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    out = 0
    for p, v in zip(probs.split([s.shape[-1] for s in scores], dim=-1), gathered):
        out = out + torch.einsum("bhiqk,bhikd->bhiqd", p, v)
    return out.reshape(B, H, padded, -1)[:, :, :n]


# ----------------------------------------------------------------------------------- the mixer
class StridedDownsample(nn.Module):
    """Depthwise strided conv without bias, kernel = stride = r: x [B, n, D] -> [B, n // r, D] (causal:
    complete windows only) or [B, ceil(n / r), D] (non-causal: the tail zero-padded). Initialised as
    average pooling, so at initialisation coarse tokens are window means."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.full((factor, channels), 1.0 / factor))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0 / self.factor)

    def forward(self, x: torch.Tensor, complete_only: bool = True) -> torch.Tensor:
        B, n, D = x.shape
        r = self.factor
        if complete_only:
            x = x[:, : (n // r) * r]
        else:
            x = F.pad(x, (0, 0, 0, (-n) % r))
        windows = x.reshape(B, x.shape[1] // r, r, D)
        # Elementwise multiply-add: an einsum here becomes a batched matmul with inner size r.
        return (windows * self.weight).sum(dim=2)


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
        self.qk_dim = resolve_qk_head_dim(cfg, d)
        self.n_scales, self.factor = cfg.n_scales, cfg.downsample
        self.pyramid = cfg.attention == "windowed"
        self.conv = CausalDepthwiseConv1d(d, cfg.conv_kernel, bias=False, dilation=cfg.conv_dilation)
        self.downsample = StridedDownsample(d, cfg.downsample) if has_downsample(cfg) else None
        qk_width = 2 * self.n_heads * self.qk_dim
        if cfg.per_scale_qk:
            self.qk = nn.ModuleList(nn.Linear(d, qk_width, bias=False) for _ in range(cfg.n_scales))
        else:
            self.qk = nn.Linear(d, qk_width, bias=False)  # shared by every scale
        self.value = nn.Linear(d, d, bias=False)  # shared by every scale
        self.out_proj = nn.Linear(d, d, bias=False)
        self.scores = nn.Linear(d, cfg.n_scales)  # per-token scores / relevances of the scales
        if cfg.aggregation == "convex":
            self.target_gain = nn.Parameter(torch.ones(d))
            if cfg.learn_strengths:
                self.ridge = nn.Parameter(torch.zeros(()))
        elif cfg.aggregation == "nash" and cfg.learn_strengths:
            self.crowding = nn.Parameter(torch.zeros(()))
            self.redundancy = nn.Parameter(torch.zeros(()))
        self.rotary = RotaryEmbedding(self.qk_dim, cfg.rope_base)
        self.reset_special_parameters()  # a mixer used alone (MAHABlock) starts as in a stack

    def reset_special_parameters(self) -> None:
        cfg = self.cfg
        with torch.no_grad():
            if self.downsample is not None:
                self.downsample.reset_parameters()
            if cfg.aggregation == "convex":
                self.target_gain.fill_(1.0)
                if cfg.learn_strengths:
                    self.ridge.fill_(_inverse_softplus(max(cfg.convex_ridge - STRENGTH_FLOOR, 1e-6)))
            elif cfg.aggregation == "nash" and cfg.learn_strengths:
                tau = max(cfg.nash_crowding - STRENGTH_FLOOR, STRENGTH_FLOOR)
                self.crowding.fill_(_inverse_softplus(tau))
                self.redundancy.fill_(_logit(cfg.nash_redundancy / (REDUNDANCY_RATIO_MAX * cfg.nash_crowding)))

    # ----------------------------------------------------------------------- aggregation strengths
    def ridge_value(self) -> torch.Tensor | float:
        """lam of the convex QP: 1e-3 + softplus(.) (learned) or ``convex_ridge``."""
        if self.cfg.learn_strengths:
            return STRENGTH_FLOOR + F.softplus(self.ridge)
        return float(self.cfg.convex_ridge)

    def game_strengths(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(gamma, tau) of the redundancy game: 0 <= gamma < tau by construction when learned."""
        if not self.cfg.learn_strengths:
            return float(self.cfg.nash_redundancy), float(self.cfg.nash_crowding)
        tau = STRENGTH_FLOOR + F.softplus(self.crowding)
        return tau * REDUNDANCY_RATIO_MAX * torch.sigmoid(self.redundancy), tau

    # -------------------------------------------------------------------------------- projections
    def _qk_weight(self, scale: int) -> torch.Tensor:
        return self.qk[scale].weight if self.cfg.per_scale_qk else self.qk.weight

    def _project(
        self, scale: int, x: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [B, H, n, d_qk] and v [B, H, n, Dh] of the tokens x [B, n, D] of a scale (v: given values)."""
        B, n, _ = x.shape
        H = self.n_heads
        q, k = F.linear(x, self._qk_weight(scale)).view(B, n, 2, H, self.qk_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.value(x) if v is None else v
        return q, k, v.view(B, n, H, self.head_dim).transpose(1, 2)

    def _project_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of pyramid tokens (keys only: the top scale's key projection)."""
        B, n, _ = x.shape
        H = self.n_heads
        weight = self._qk_weight(self.n_scales - 1)[H * self.qk_dim :]
        k = F.linear(x, weight).view(B, n, H, self.qk_dim).transpose(1, 2)
        return k, self.value(x).view(B, n, H, self.head_dim).transpose(1, 2)

    # ------------------------------------------------------------------------- one scale's attention
    def _attend(self, s: int, x: torch.Tensor, state: MAHAState, record: bool, v: torch.Tensor | None) -> torch.Tensor:
        """Attention of the new tokens x [B, n, D] of level s (< S - 1, or any scale in full mode) over
        that level's (cached) past -> [B, n, D]."""
        B, n, D = x.shape
        q, k, v = self._project(s, x, v)
        past = state.counts[s]
        q, k = self.rotary(q, k, past)
        if state.keys[s] is not None:
            k = torch.cat((state.keys[s], k), dim=2)
            v = torch.cat((state.values[s], v), dim=2)
        dropout_p = self.cfg.attn_dropout if self.training else 0.0
        if self.cfg.attention == "windowed":
            w = self.cfg.window
            y = _banded(q, k, v, w, k.shape[2] - n, self.cfg.causal, dropout_p)
            keep = max(0, k.shape[2] - (w - 1))  # only the last window - 1 keys can be seen later
        else:
            y = _full(q, k, v, k.shape[2] - n, self.cfg.causal, dropout_p)
            keep = 0
        if record:
            state.keys[s], state.values[s] = k[:, :, keep:], v[:, :, keep:]
        return y.transpose(1, 2).reshape(B, n, D)

    def _level_keys(self, level: int, x: torch.Tensor, state: MAHAState) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of a pyramid level above S - 1: the cached ones, then those of its new tokens x [B, n, D],
        rotated at their last base position in level-(S - 1) units ((i + 1) r^m - 1)."""
        k, v = self._project_keys(x)
        group, made = self.factor ** (level - self.n_scales + 1), state.counts[level]
        positions = (made + 1 + torch.arange(k.shape[2], device=x.device)) * group - 1
        k = self.rotary.rotate(k, positions, (made + k.shape[2]) * group + 1)
        if state.keys[level] is not None:
            k = torch.cat((state.keys[level], k), dim=2)
            v = torch.cat((state.values[level], v), dim=2)
        return k, v

    def _attend_pyramid(
        self, new: list[torch.Tensor], state: MAHAState, record: bool, v: torch.Tensor | None
    ) -> torch.Tensor:
        """Scale S - 1 in windowed mode: the new tokens of level S - 1 attend, in one softmax, to their
        window at level S - 1 and at each coarser level they need (module docstring) -> [B, n, D]."""
        top, w, r, causal = self.n_scales - 1, self.cfg.window, self.factor, self.cfg.causal
        x = new[top]
        B, n, D = x.shape
        first = state.counts[top]
        q, k, v = self._project(top, x, v)
        q, k = self.rotary(q, k, first)
        total = first + n  # level-(S - 1) tokens after this call
        queries = torch.arange(first, total, device=x.device)
        levels = []
        for level in range(top, max(len(new), len(state.counts))):
            m = level - top
            # Query j uses level m >= 1 iff floor((j + 1) / r^(m - 1)) > window; monotone in j and m.
            needed = m == 0 or not causal or total // r ** (m - 1) > w
            if not needed and not record:
                break
            fresh = new[level] if level < len(new) else x.new_zeros(B, 0, D)
            if m == 0:
                kk, vv = k, v
                if state.keys[level] is not None:
                    kk = torch.cat((state.keys[level], kk), dim=2)
                    vv = torch.cat((state.values[level], vv), dim=2)
            else:
                kk, vv = self._level_keys(level, fresh, state)
            if needed and kk.shape[2]:
                active = None
                if m > 0 and causal:
                    active = torch.div(queries + 1, r ** (m - 1), rounding_mode="floor") > w
                held_from = state.counts[level] + fresh.shape[1] - kk.shape[2]
                levels.append(PyramidLevel(kk, vv, held_from, r**m, active))
            if record:  # later queries see at most the last window (window - 1 at level S - 1, plus themselves)
                keep = max(0, kk.shape[2] - (w - 1 if m == 0 else w))
                state.keys[level], state.values[level] = kk[:, :, keep:], vv[:, :, keep:]
        if n == 0:
            return x
        dropout_p = self.cfg.attn_dropout if self.training else 0.0
        y = pyramid_window_attention(q, first, levels, w, causal, dropout_p)
        return y.transpose(1, 2).reshape(B, n, D)

    # -------------------------------------------------------------------------------- the levels
    def _levels(self, u: torch.Tensor, state: MAHAState, record: bool) -> list[torch.Tensor]:
        """The new tokens of every level this call: [u, level 1, level 2, ...]. Levels 0 .. S - 1 always;
        in windowed mode the pyramid continues while a level gets new tokens (causal) or holds more
        than ``window`` tokens (non-causal). Pending finer tokens complete their window first."""
        causal, r, w = self.cfg.causal, self.factor, self.cfg.window
        new = [u]
        level = 1
        while True:
            below = new[level - 1]
            if level >= self.n_scales:
                if not self.pyramid:
                    break
                if causal and below.shape[1] == 0:
                    break  # nothing new below: no new token above either
                if not causal and below.shape[1] <= w:
                    break  # the symmetric window already covers the whole level
            state.ensure_levels(level + 1)
            if causal:
                x = below if state.pending[level] is None else torch.cat((state.pending[level], below), dim=1)
                complete = (x.shape[1] // r) * r
                if record:
                    state.pending[level] = x[:, complete:]
                new.append(self.downsample(x, complete_only=True))
            else:
                new.append(self.downsample(below, complete_only=False))
            level += 1
        return new

    # ---------------------------------------------------------------------------- forward
    def tbptt_refusal(self) -> str | None:
        if self.cfg.attention == "full":
            return "attention='full' keeps every coarse key, so its state grows without bound; use 'windowed'"
        return None

    def state_size(self, seq_len: int) -> int:
        """Floats per batch row held after ``seq_len`` tokens (an upper bound: pending tokens counted at r - 1)."""
        D, r, w, S = self.d_model, self.factor, self.cfg.window, self.n_scales
        per_key = self.n_heads * self.qk_dim + D
        keys, level = 0, 0
        while level < S or (self.pyramid and seq_len // r**level >= 1):
            made = seq_len // r**level
            if not self.pyramid:
                keys += made
            else:
                keys += min(made, w - 1 if level < S else w)
            level += 1
        # pending: < r finer tokens per level above 0, one more level than those holding a token.
        return per_key * keys + D * (self.conv.state_len + (r - 1) * level + S)

    def forward(
        self, h: torch.Tensor, state: MAHAState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, MAHAState | None, torch.Tensor | None]:
        y, state, aux, _ = self.forward_with_weights(h, state, use_cache, need_aux)
        return y, state, aux

    def candidates(
        self, h: torch.Tensor, state: MAHAState | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, MAHAState | None]:
        """The per-scale part of the forward: (outputs [B, L, S, D] upsampled per scale, available bool
        [B, L, S], u [B, L, D] the conv-mixed input, v [B, L, D] its shared-V values, the state)."""
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
        v0 = self.value(u)
        start = state.length
        t = torch.arange(start, start + L, device=h.device)  # base positions of the new tokens
        new = self._levels(u, state, record)
        upsampled, available = [], []
        for s in range(self.n_scales):
            x, R = new[s], self.factor**s
            if self.pyramid and s == self.n_scales - 1:
                out = self._attend_pyramid(new, state, record, v0 if s == 0 else None)
            elif x.shape[1]:
                out = self._attend(s, x, state, record, v0 if s == 0 else None)
            else:
                out = x
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
            else:
                upsampled.append(out[:, t // R])  # nearest: the coarse token covering t
                available.append(torch.ones_like(t, dtype=torch.bool))
        if record:
            for level, x in enumerate(new):
                state.counts[level] += x.shape[1]
            state.conv = conv_state
            state.length += L
        outputs = torch.stack(upsampled, dim=2)  # [B, L, S, D]
        mask = torch.stack(available, dim=-1).expand(B, L, self.n_scales)  # [B, L, S]
        return outputs, mask, u, v0, (state if record else None)

    def aggregate(
        self, outputs: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weights [B, L, S] on the simplex over the scales (module docstring, step 5), and the problem
        they solve: ``scores``; convex: ``outputs`` / ``target`` (normalised, as given to the QP) and
        ``ridge``; nash: ``redundancy``, ``crowding`` and the certificate ``gap`` [B, L]."""
        scores = self.scores(u)
        problem: dict[str, Any] = {"scores": scores}
        aggregation = self.cfg.aggregation
        if aggregation == "convex":
            target = v * self.target_gain
            present = mask.to(outputs.dtype).unsqueeze(-1)
            power = (outputs.pow(2) * present).sum((-2, -1)) + target.pow(2).sum(-1)
            power = power / ((present.sum((-2, -1)) + 1.0) * self.d_model)
            scale = torch.rsqrt(power + 1e-6) / math.sqrt(self.d_model)  # [B, L]
            qp_outputs, qp_target = outputs * scale[..., None, None], target * scale[..., None]
            ridge = self.ridge_value()
            weights = mixture_qp_weights(qp_outputs, qp_target, scores, ridge, mask, sync_free=True)
            problem.update(outputs=qp_outputs, target=qp_target, ridge=ridge)
        elif aggregation == "nash":
            gamma, tau = self.game_strengths()
            weights, gap = redundancy_game_equilibrium(outputs, scores, gamma, tau, mask, sync_free=True)
            problem.update(outputs=outputs, redundancy=gamma, crowding=tau, gap=gap)
        else:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return weights, problem

    def forward_with_weights(
        self, h: torch.Tensor, state: MAHAState | None = None, use_cache: bool = False, need_aux: bool = True
    ) -> tuple[torch.Tensor, MAHAState | None, torch.Tensor | None, torch.Tensor]:
        """:meth:`forward` that also returns the aggregation weights over the scales [B, L, S]."""
        outputs, mask, u, v, state = self.candidates(h, state, use_cache)
        weights, _ = self.aggregate(outputs, mask, u, v)
        mixed = torch.einsum("bls,blsd->bld", weights, outputs)
        aux = None
        if need_aux:
            usage = weights.mean(dim=(0, 1))  # [S]
            aux = self.n_scales * usage.pow(2).sum() - 1.0
        return self.out_proj(mixed), state, aux, weights
