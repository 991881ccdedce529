"""HAMA: a hierarchical masked autoencoder built from parallel node autoencoders.

Seed ``000_dba8f4646a0b80aa`` (see ``specs/hama.md``) describes a stack of layers; in each layer the
sequence is split ("fission") between several parallel nodes, every node is a small transformer
autoencoder that hides some of its tokens ("learned, adaptive masking"), and the node outputs are
recombined by attention ("fusion"); higher layers have fewer nodes and longer partitions. This module
keeps the seed's public API, configuration routes and encode/decode length arithmetic, and makes each
part do what its name says. Per hierarchy layer i (N_i nodes, partition length P_i, n_mask_i):

* **Segments and windows** (:class:`WindowGeometry`). The layer input [B, L, D] is cut into W
  contiguous *segments* that partition it; segment w is owned by node ``w mod N`` and read through a
  *window* of P positions containing it. Rule: if N * P <= L, the segments are the windows
  w*P .. w*P + P - 1 (W = ceil(L / P), the last one padded), so every node serves every N-th window.
  If N * P > L (the seed's fission gives every node P tokens, N * P in all), there are
  W = max(1, min(N, floor(L / (n_mask + 1)))) segments of near-equal length (floor / ceil of L / W),
  one per node, each read through the window
  of min(P, L) positions centred on it (clamped to the sequence): windows overlap, and a node sees its
  neighbours' visible tokens as context. Every segment of s tokens hides min(n_mask, s - 1) of them.
* **Nodes** (:mod:`hierseq.models.hama_nodes`). Every node has its own encoder and decoder weights
  (``share_nodes=True``: one set for all, told apart by a node embedding); all windows of all nodes
  run in one batched call per projection (:func:`hierseq.ops.node_linear.node_linear`).
* **Masking before the encoder** (:mod:`hierseq.models.hama_masking`). A scorer defines a categorical
  distribution over the tokens of every segment; the hidden set is sampled from it while training
  (Gumbel top-k) and its top-k in eval; the decision learns by REINFORCE on the reconstruction error
  (AdaMAE style), passed to the loss as ``aux_loss``. ``mask_strategy="random"`` masks uniformly.
  The encoder sees only the visible tokens of its window. ``mask_ratio`` sets layer 0's count to the
  MAE-style fraction of P_0 (50-75%); n_mask_i of higher layers drops latents (compression).
* **Fusion across windows** (:class:`FusionModule`). After the node encoders, ``fusion_tokens`` global
  tokens read a summary (mean latent + window position) of every window by attention, and every latent
  reads the global tokens back (Perceiver / Set-Transformer "induced points"): each latent then depends
  on every visible input of the layer, at cost O(W * G + L * G), linear in L. On the way down, each
  segment's decoder reads the latents of its ``decoder_context`` neighbouring segments on either side
  as well as its own, and positional output queries (mask token + position in the segment) give one
  reconstruction per position (Perceiver-IO style).

Length arithmetic (the seed's): encoding layer i keeps max(s - n_mask_i, 1) tokens of every segment of
s tokens. With the README configuration (nodes 8/4/2, partitions 64/128/256, n_mask 4, L = 512) layer
0 has 8 windows of 64 and layers 1, 2 are in the overlapping regime (4 * 128 > 480, 2 * 256 > 464) with
4 and 2 segments, so the lengths are 512 -> 480 -> 464 -> 456 exactly as in the seed (L - N_i * m_i).
Any length >= 1 works.

Cost: encoders run on P_i - n_mask_i (at most) slots per window, decoders on (2c + 1) K + S slots per
segment (K kept latents, S positions), fusion on G global tokens: linear in L for fixed P_i.

Deviations from the seed: fission partitions by position instead of input-independent learned queries
(which cost N * P * L scores, i.e. L^2 for the README configuration); masking happens before the
encoder with a mask token at decode (MAE) rather than zeroing the lowest-norm latents after it;
higher-layer masking (compression) learns by the cooperative reward (drop what is cheapest to
reconstruct) while layer 0 uses ``mask_reward``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    MaskedAEConfig,
    check_bool,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..losses import masked_reconstruction_loss
from ..modules.encoder import make_input_embedding
from ..modules.mlp import GELUMLP
from ..modules.norms import make_norm
from ..modules.positional import SinusoidalPositionalEncoding, sinusoidal_table
from ..ops.node_linear import node_of_window
from ..outputs import MaskedAEOutput
from ..registry import register
from ..validation import check_features
from .hama_masking import MASK_REWARDS, MASK_STRATEGIES, TokenMasker, reinforce_loss
from .hama_nodes import NodeTransformer

# Defaults of the scaling-factor route, used for every factor the caller leaves out.
SCALING_DEFAULTS: dict[str, float] = {
    "initial_num_nodes": 8,
    "initial_partition_length": 32,
    "initial_n_mask": 4,
    "num_nodes_scaling_factor": 0.5,
    "partition_length_scaling_factor": 2.0,
    "n_mask_scaling_factor": 1.0,
}
SCALING_FIELDS = tuple(SCALING_DEFAULTS)
LIST_FIELDS = ("nodes_per_layer", "partition_lengths", "n_masks")


# ============================================================================================= config
@dataclass
class HAMAConfig(MaskedAEConfig):
    """HAMA configuration. The hierarchy is given by *either* the scaling factors (layer i gets
    ``max(1, floor(initial * factor**i))`` nodes / partition length / masked tokens) *or* the three
    explicit per-layer lists, never both; unset scaling fields take :data:`SCALING_DEFAULTS`.
    ``mask_ratio`` (optional) replaces layer 0's n_mask by round(mask_ratio * P_0)."""

    n_layers: int = 2  # hierarchy layers (seed: num_layers)
    transformer_layers: int = 2  # encoder and decoder depth of every node autoencoder
    initial_num_nodes: int | None = None
    initial_partition_length: int | None = None
    initial_n_mask: int | None = None
    num_nodes_scaling_factor: float | None = None
    partition_length_scaling_factor: float | None = None
    n_mask_scaling_factor: float | None = None
    nodes_per_layer: tuple[int, ...] | None = None
    partition_lengths: tuple[int, ...] | None = None
    n_masks: tuple[int, ...] | None = None
    mask_ratio: float | None = None  # layer 0 hides round(mask_ratio * P_0) of every window
    mask_strategy: str = "learned"  # "learned" (categorical policy, REINFORCE) or "random"
    mask_reward: str = "adversarial"  # layer 0's policy: hide hard tokens (AdaMAE) or "cooperative"
    mask_loss_weight: float = 1.0  # weight of the REINFORCE term in the loss
    share_nodes: bool = False  # one set of node weights for all nodes of a layer
    fusion_tokens: int = 8  # global tokens of the cross-window fusion (0 = no fusion)
    decoder_context: int = 1  # neighbouring segments on either side each decoder reads

    def __post_init__(self) -> None:
        # JSON / YAML give lists; keep tuples so configs compare equal after a round trip.
        for name in LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        super().__post_init__()

    @classmethod
    def small_overrides(cls) -> dict[str, Any]:
        return {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "transformer_layers": 1,
            "nodes_per_layer": (4, 2),
            "partition_lengths": (8, 16),
            "n_masks": (2, 2),
            "fusion_tokens": 4,
        }

    def validate(self) -> None:
        super().validate()
        check_positive_int("transformer_layers", self.transformer_layers)
        check_choice("mask_strategy", self.mask_strategy, MASK_STRATEGIES)
        check_choice("mask_reward", self.mask_reward, MASK_REWARDS)
        check_nonneg_float("mask_loss_weight", self.mask_loss_weight)
        check_bool("share_nodes", self.share_nodes)
        check_nonneg_int("fusion_tokens", self.fusion_tokens)
        check_nonneg_int("decoder_context", self.decoder_context)
        if self.mask_ratio is not None:
            bad = isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float))
            if bad or not 0.0 < self.mask_ratio < 1.0:
                raise config_error("mask_ratio", self.mask_ratio, "must be null or a number in (0, 1)")
        self.layer_plan()  # validates the hierarchy

    def layer_plan(self) -> list[tuple[int, int, int]]:
        """(nodes, partition_length, n_mask) for every hierarchy layer, after validating the route."""
        lists = {name: getattr(self, name) for name in LIST_FIELDS}
        scaling = {name: getattr(self, name) for name in SCALING_FIELDS}
        given_lists = [n for n, v in lists.items() if v is not None]
        given_scaling = [n for n, v in scaling.items() if v is not None]
        if given_lists and given_scaling:
            raise config_error(
                given_scaling[0],
                scaling[given_scaling[0]],
                f"scaling factors and explicit lists ({given_lists[0]}) cannot be mixed: use one route",
            )
        if given_lists:
            missing = [n for n in LIST_FIELDS if lists[n] is None]
            if missing:
                raise config_error(missing[0], None, f"explicit configuration needs all of {list(LIST_FIELDS)}")
            for name, values in lists.items():
                if not isinstance(values, (tuple, list)) or len(values) != self.n_layers:
                    raise config_error(name, values, f"must be a list of n_layers={self.n_layers} positive integers")
                for i, v in enumerate(values):
                    # Layers above the first may mask nothing (they then only add context).
                    low = 0 if name == "n_masks" and i > 0 else 1
                    if isinstance(v, bool) or not isinstance(v, int) or v < low:
                        rule = "every entry must be a positive integer" + (
                            " (n_masks[1:] may be 0)" if low == 0 else ""
                        )
                        raise config_error(name, values, rule)
            plan = list(zip(lists["nodes_per_layer"], lists["partition_lengths"], lists["n_masks"]))
        else:
            s = {n: (SCALING_DEFAULTS[n] if v is None else v) for n, v in scaling.items()}
            for name in ("initial_num_nodes", "initial_partition_length", "initial_n_mask"):
                check_positive_int(name, s[name])
            for name in ("num_nodes_scaling_factor", "partition_length_scaling_factor", "n_mask_scaling_factor"):
                check_positive_float(name, s[name])
            plan = [
                (
                    max(1, math.floor(s["initial_num_nodes"] * s["num_nodes_scaling_factor"] ** i)),
                    max(1, math.floor(s["initial_partition_length"] * s["partition_length_scaling_factor"] ** i)),
                    max(1, math.floor(s["initial_n_mask"] * s["n_mask_scaling_factor"] ** i)),
                )
                for i in range(self.n_layers)
            ]
        if self.mask_ratio is not None:
            nodes, p, _ = plan[0]
            plan[0] = (nodes, p, min(max(round(self.mask_ratio * p), 1), p - 1))
        for i, (_, p, m) in enumerate(plan):
            if m >= p:
                raise config_error(
                    "n_masks" if given_lists else "initial_n_mask",
                    m,
                    f"layer {i} masks {m} of partition_length={p} tokens: every window must keep at least one",
                )
        return plan


# =========================================================================================== geometry
@dataclass
class WindowGeometry:
    """How one hierarchy layer cuts a length-``length`` sequence into W segments and their windows
    (the rule is in the module docstring). Plain integers plus small index tensors that are the same
    for every batch row (rows never influence each other), all built with tensor ops.

    seg_start / seg_len / keep: [W]; seg_pos, seg_valid: [W, S] (S = longest segment; positions clamped
    in padding); seq_index: [L], the slot w * S + s of every position; win_pos, win_valid: [W, P_w];
    slots: C, encoder slots per window (>= visible tokens of any window); latent_index, latent_valid:
    [W, K] (K = most kept tokens of a segment): where segment w's kept tokens sit in the encoded sequence.
    """

    length: int
    partition_length: int
    n_mask: int
    nodes: int
    overlap: bool
    windows: int
    window_length: int
    segment_length: int
    slots: int
    kept_max: int
    encoded_length: int
    seg_start: torch.Tensor
    keep: torch.Tensor
    seg_pos: torch.Tensor
    seg_valid: torch.Tensor
    seq_index: torch.Tensor
    win_start: torch.Tensor
    win_pos: torch.Tensor
    win_valid: torch.Tensor
    latent_index: torch.Tensor
    latent_valid: torch.Tensor
    z_window: torch.Tensor

    @staticmethod
    def _keep(s: int, m: int) -> int:
        return max(s - m, 1)

    @classmethod
    def plan(cls, length: int, partition_length: int, n_mask: int, nodes: int = 1) -> tuple[bool, int, int, int]:
        """(overlap, W, window length, encoded length), integers only."""
        if length < 1:
            raise ValueError(f"length={length}: must be >= 1")
        L, P, m = length, partition_length, n_mask
        if nodes * P > L:
            # One segment per node, but no segment shorter than m + 1 tokens when L allows it, so each
            # can hide its n_mask tokens.
            W = max(1, min(nodes, L // (m + 1)))
            q, rem = divmod(L, W)
            encoded = rem * cls._keep(q + 1, m) + (W - rem) * cls._keep(q, m)
            return True, W, min(P, L), encoded
        W = -(-L // P)
        r = L - (W - 1) * P
        return False, W, P, (W - 1) * (P - m) + cls._keep(r, m)

    @classmethod
    def of(
        cls, length: int, partition_length: int, n_mask: int, nodes: int = 1, device: torch.device | None = None
    ) -> WindowGeometry:
        overlap, W, Pw, encoded = cls.plan(length, partition_length, n_mask, nodes)
        L, m = length, n_mask
        w = torch.arange(W, device=device)
        if overlap:
            seg_start = (w * L) // W
            seg_len = ((w + 1) * L) // W - seg_start
            win_start = (seg_start + seg_len // 2 - Pw // 2).clamp(0, L - Pw)
        else:
            seg_start = w * Pw
            seg_len = (L - seg_start).clamp(max=Pw)
            win_start = seg_start
        S = -(-L // W) if overlap else Pw
        keep = (seg_len - m).clamp(min=1)
        # Encoder slots: a window's visible tokens are at most its real tokens minus its own hidden ones.
        if overlap:
            q = L // W
            slots = Pw - (q - cls._keep(q, m))
        else:
            r = L - (W - 1) * Pw
            slots = Pw - m if (W > 1 or r == Pw) else cls._keep(r, m)
        slot = torch.arange(S, device=device)
        seg_pos = (seg_start[:, None] + slot).clamp(max=L - 1)
        seg_valid = slot[None, :] < seg_len[:, None]
        pos = torch.arange(L, device=device)
        owner = torch.searchsorted(seg_start, pos, right=True) - 1
        seq_index = owner * S + (pos - seg_start[owner])
        win_raw = win_start[:, None] + torch.arange(Pw, device=device)
        win_valid = win_raw < L
        K = cls._keep(S, m)
        offsets = keep.cumsum(0) - keep
        k = torch.arange(K, device=device)
        latent_index = (offsets[:, None] + k).clamp(max=encoded - 1)
        z_window = torch.repeat_interleave(w, keep, output_size=encoded)
        return cls(
            length=L,
            partition_length=partition_length,
            n_mask=m,
            nodes=nodes,
            overlap=overlap,
            windows=W,
            window_length=Pw,
            segment_length=S,
            slots=slots,
            kept_max=K,
            encoded_length=encoded,
            seg_start=seg_start,
            keep=keep,
            seg_pos=seg_pos,
            seg_valid=seg_valid,
            seq_index=seq_index,
            win_start=win_start,
            win_pos=win_raw.clamp(max=L - 1),
            win_valid=win_valid,
            latent_index=latent_index,
            latent_valid=k[None, :] < keep[:, None],
            z_window=z_window,
        )

    @property
    def n_hide(self) -> torch.Tensor:
        """[W] tokens each segment hides."""
        return self.seg_valid.sum(1) - self.keep

    @classmethod
    def input_length(cls, encoded_length: int, partition_length: int, n_mask: int, nodes: int = 1) -> int:
        """The input length that encodes to ``encoded_length``, assuming every segment kept more than
        n_mask tokens and, when windows overlap, one segment per node (otherwise several lengths can
        encode alike, so decode needs the length). Raises ValueError when no such length exists."""
        if encoded_length < 1:
            raise ValueError(f"encoded length={encoded_length}: must be >= 1")
        P, m = partition_length, n_mask
        V = P - m
        full = (encoded_length - 1) // V
        candidates = [encoded_length + nodes * m, full * P + (encoded_length - full * V) + m]
        for length in candidates:
            overlap, W, _, encoded = cls.plan(length, P, m, nodes)
            shortest = length // W if overlap else length - (W - 1) * P
            if encoded == encoded_length and shortest > m:
                return length
        raise ValueError(f"encoded length={encoded_length}: no input length encodes to it; pass length=")


# ========================================================================================= components
class FissionModule(nn.Module):
    """Gathers the visible tokens of every window for its node's encoder.

    ``forward(h [B, L, D], hidden [B, L], geometry)`` -> (slots [B, W, C, D], slot_pos [B, W, C]
    positions in h, slot_valid [B, W, C]): the visible tokens of window w in position order (then
    padding), each plus the sinusoidal encoding of its position inside the window (and, with shared
    node weights, the embedding of the window's node, so nodes still differ)."""

    def __init__(self, d_model: int, num_nodes: int, shared: bool) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.positional = SinusoidalPositionalEncoding(d_model)
        self.node_embedding = nn.Parameter(torch.randn(num_nodes, d_model) * 0.02) if shared else None

    def forward(
        self, h: torch.Tensor, hidden: torch.Tensor, geometry: WindowGeometry
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = h.shape
        W, C = geometry.windows, geometry.slots
        visible = ~hidden[:, geometry.win_pos] & geometry.win_valid  # [B, W, P_w]
        # Stable sort: the visible tokens first, in position order.
        order = visible.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :C]
        slot_valid = visible.gather(-1, order)
        slot_pos = geometry.win_pos.expand(B, W, -1).gather(-1, order)
        slots = h.gather(1, slot_pos.reshape(B, W * C, 1).expand(B, W * C, D)).view(B, W, C, D)
        slots = self.positional(slots, positions=order)
        if self.node_embedding is not None:
            slots = slots + self.node_embedding[node_of_window(W, self.num_nodes, h.device)][None, :, None, :]
        return slots, slot_pos, slot_valid


class _CrossAttention(nn.Module):
    """queries [B, Q, D] read keys/values [B, K, D] (key_valid [B, K] or None) -> [B, Q, D]."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Q, D = x.shape
        H = self.n_heads
        q = self.q(x).view(B, Q, H, D // H).transpose(1, 2)
        k, v = self.kv(context).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, Q, D))


class FusionModule(nn.Module):
    """Exchanges information across all windows of a layer at linear cost.

    latents [B, W, C, D], valid [B, W, C] -> [B, W, C, D]: G learned global tokens read every window's
    summary (mean of its valid latents + the sinusoidal encoding of the window index), pass an MLP, and
    every latent reads them back (residual). ``tokens=0``: identity (the ablation without fusion)."""

    def __init__(self, d_model: int, n_heads: int, tokens: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.tokens = tokens
        if tokens == 0:
            return
        self.global_queries = nn.Parameter(torch.randn(tokens, d_model) * 0.02)
        self.summary_norm = make_norm(norm, d_model)
        self.gather = _CrossAttention(d_model, n_heads, dropout)
        self.mlp_norm = make_norm(norm, d_model)
        self.mlp = GELUMLP(d_model, dropout=dropout)
        self.latent_norm = make_norm(norm, d_model)
        self.global_norm = make_norm(norm, d_model)
        self.broadcast = _CrossAttention(d_model, n_heads, dropout)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.tokens == 0:
            return latents
        B, W, C, D = latents.shape
        weights = valid.to(latents.dtype)[..., None]
        summary = (latents * weights).sum(2) / weights.sum(2).clamp(min=1)  # [B, W, D]
        summary = summary + sinusoidal_table(torch.arange(W, device=latents.device), D).to(latents.dtype)
        g = self.global_queries.expand(B, -1, -1)
        g = g + self.gather(g, self.summary_norm(summary))
        g = g + self.mlp(self.mlp_norm(g))
        flat = latents.reshape(B, W * C, D)
        flat = flat + self.broadcast(self.latent_norm(flat), self.global_norm(g))
        return flat.view(B, W, C, D)


class HAMABlock(nn.Module):
    """One hierarchy layer: masking -> fission -> node encoders -> fusion; and the node decoders.

    ``encode(h [B, L, D]) -> (z [B, L', D], kept [B, L'], hidden [B, L], log_prob [B, L] or None)``:
    ``kept`` the positions in h of the tokens z encodes, ``hidden`` the tokens no encoder saw,
    ``log_prob`` the masking policy's log-probabilities (training, learned strategy).
    ``decode(z [B, L', D], length=L) -> [B, L, D]``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        transformer_layers: int,
        dropout: float,
        num_nodes: int,
        partition_length: int,
        n_mask: int,
        share_nodes: bool = False,
        fusion_tokens: int = 8,
        decoder_context: int = 1,
        mask_strategy: str = "learned",
        mask_seed: int = 0,
        mlp: str = "gelu",
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if n_mask >= partition_length:
            raise ValueError(f"n_mask={n_mask}: must be < partition_length={partition_length}")
        self.num_nodes, self.partition_length, self.n_mask = num_nodes, partition_length, n_mask
        self.decoder_context = decoder_context
        weights = 1 if share_nodes else num_nodes
        self.masker = TokenMasker(d_model, mask_strategy, mask_seed, norm)
        self.fission = FissionModule(d_model, num_nodes, share_nodes)
        self.encoder = NodeTransformer(weights, d_model, n_heads, transformer_layers, dropout, mlp, norm)
        self.fusion = FusionModule(d_model, n_heads, fusion_tokens, dropout, norm)
        self.positional = SinusoidalPositionalEncoding(d_model)
        self.mask_token = nn.Parameter(torch.randn(d_model) * 0.02)
        self.node_queries = nn.Parameter(torch.randn(num_nodes, d_model) * 0.02) if share_nodes else None
        self.neighbour_embedding = nn.Parameter(torch.randn(2 * decoder_context + 1, d_model) * 0.02)
        self.decoder = NodeTransformer(weights, d_model, n_heads, transformer_layers, dropout, mlp, norm)

    def geometry(self, length: int, device: torch.device | None = None) -> WindowGeometry:
        return WindowGeometry.of(length, self.partition_length, self.n_mask, self.num_nodes, device)

    def encoded_length(self, length: int) -> int:
        return WindowGeometry.plan(length, self.partition_length, self.n_mask, self.num_nodes)[3]

    def input_length(self, encoded_length: int) -> int:
        return WindowGeometry.input_length(encoded_length, self.partition_length, self.n_mask, self.num_nodes)

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, L, D = h.shape
        g = self.geometry(L, h.device)
        hidden, log_prob = self.masker(h, g.seg_pos, g.seg_valid, g.n_hide, g.seq_index)
        slots, slot_pos, slot_valid = self.fission(h, hidden, g)
        latents = self.encoder(slots, slot_valid)
        latents = self.fusion(latents, slot_valid)
        # Segment w's kept tokens are the visible slots of its window from the first one at or after
        # the segment start (its window may begin with visible tokens of the segment before).
        before = (slot_valid & (slot_pos < g.seg_start[None, :, None])).sum(-1)  # [B, W]
        rank = torch.arange(g.encoded_length, device=h.device) - (g.keep.cumsum(0) - g.keep)[g.z_window]
        flat = g.z_window * g.slots + before[:, g.z_window] + rank  # [B, L']
        z = latents.reshape(B, -1, D).gather(1, flat[..., None].expand(-1, -1, D))
        kept = slot_pos.reshape(B, -1).gather(1, flat)
        # Stamp every latent with its position in its segment: the output queries carry the same
        # encoding, so z is self-describing (decode needs no mask indices).
        z = self.positional(z, positions=kept - g.seg_start[g.z_window])
        return z, kept, hidden, log_prob

    def _queries(self, g: WindowGeometry) -> torch.Tensor:
        """[W or 1, S, D]: mask token + position in the segment (+ node query when weights are shared)."""
        q = self.positional(self.mask_token.expand(g.segment_length, -1))[None]
        if self.node_queries is not None:
            q = q + self.node_queries[node_of_window(g.windows, self.num_nodes, q.device)][:, None, :]
        return q

    def decode(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        length = self.input_length(z.shape[1]) if length is None else length
        g = self.geometry(length, z.device)
        if g.encoded_length != z.shape[1]:
            raise ValueError(f"z: length {z.shape[1]} does not encode a length-{length} input")
        B, _, D = z.shape
        W, K, S, c = g.windows, g.kept_max, g.segment_length, self.decoder_context
        own = z[:, g.latent_index]  # [B, W, K, D]
        # Latents of the c segments on either side, tagged by their offset (-c .. c).
        padded = F.pad(own, (0, 0, 0, 0, c, c))  # [B, W + 2c, K, D]
        context = padded.unfold(1, 2 * c + 1, 1).permute(0, 1, 4, 2, 3)  # [B, W, 2c+1, K, D]
        context = (context + self.neighbour_embedding[None, None, :, None, :]).reshape(B, W, (2 * c + 1) * K, D)
        valid = F.pad(g.latent_valid.to(torch.int8), (0, 0, c, c)).unfold(0, 2 * c + 1, 1).permute(0, 2, 1) > 0
        queries = self._queries(g).expand(W, S, D)[None].expand(B, W, S, D)
        if self.n_mask == 0:
            # Nothing was hidden, so segment w's latents sit at its positions 0 .. s_w - 1 in order: each
            # query starts from its own latent (a skip path, as in a U-Net), and the decoder refines it
            # instead of having to find it by attention.
            queries = queries + own
        seq = torch.cat((context, queries), dim=2)
        key_valid = torch.cat((valid.reshape(W, -1), g.seg_valid), dim=1)[None].expand(B, -1, -1)
        out = self.decoder(seq, key_valid)[:, :, -S:]  # [B, W, S, D]
        return out.reshape(B, W * S, D)[:, g.seq_index]


# ============================================================================================== model
_SEED_NAMES = {"embedding_dim": "d_model", "num_heads": "n_heads", "num_layers": "n_layers"}


@register("hama", config=HAMAConfig, kind="masked_ae")
class HAMA(nn.Module):
    """Hierarchical masked autoencoder.

    Build with a :class:`HAMAConfig` (``HAMA(config)``, the registry's way) or with the seed's keyword
    arguments (``HAMA(embedding_dim=256, num_heads=8, dropout=0.1, num_layers=3, transformer_layers=2,
    ...)``), which give a continuous model on [B, L, embedding_dim] inputs.

    ``forward(x) -> MaskedAEOutput(reconstruction, loss, mask, aux_loss)``:
    x is ids [B, L] (``input_type="tokens"``; reconstruction = logits [B, L, V], loss = cross-entropy)
    or features [B, L, d_input] (``"continuous"``; reconstruction [B, L, d_input], loss = MSE);
    mask [B, L] bool marks the positions hidden from every encoder (layer 0's hidden tokens); the
    reconstruction loss covers them (``loss_on="masked"``) or every position (``"all"``). ``aux_loss``
    is the REINFORCE term of the learned masking policy (training only; 0 in eval and for random
    masks); ``loss`` = reconstruction loss + mask_loss_weight * aux_loss. Higher layers drop further
    latents (compression); those positions are reconstructed from context.
    ``encode(x) -> z [B, L_K, d_model]``; ``decode(z, length=None) -> [B, L, V or d_input]``;
    ``forward(x).reconstruction == decode(encode(x), L)`` when masking is deterministic (eval).
    """

    def __init__(self, config: HAMAConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_from_seed_args(**kwargs)
        elif kwargs:
            raise ValueError(f"{next(iter(kwargs))}=...: pass either a HAMAConfig or keyword arguments, not both")
        if not isinstance(config, HAMAConfig):
            raise ValueError(f"config={type(config).__name__}: HAMA needs a HAMAConfig")
        self.config = config
        D, out_dim = config.d_model, config.output_dim
        self.embed = make_input_embedding(config.input_type, config.vocab_size, config.input_dim, D)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            HAMABlock(
                D,
                config.n_heads,
                config.transformer_layers,
                config.dropout,
                nodes,
                partition,
                n_mask,
                config.share_nodes,
                config.fusion_tokens,
                config.decoder_context,
                config.mask_strategy,
                config.mask_seed + i,
                config.mlp,
                config.norm,
            )
            for i, (nodes, partition, n_mask) in enumerate(config.layer_plan())
        )
        self.head_norm = make_norm(config.norm, D)
        self.head = nn.Linear(D, out_dim)

    @staticmethod
    def config_from_seed_args(**kwargs: Any) -> HAMAConfig:
        """The seed's constructor arguments -> HAMAConfig (continuous input of size embedding_dim)."""
        fields = {_SEED_NAMES.get(k, k): v for k, v in kwargs.items()}
        if "embedding_dim" in kwargs:
            fields.setdefault("input_type", "continuous")
        unknown = sorted(set(fields) - set(HAMAConfig.field_names()))
        if unknown:
            raise ValueError(f"{unknown[0]}={fields[unknown[0]]!r}: unknown HAMA argument")
        return HAMAConfig(**fields)

    # ------------------------------------------------------------------------------------- lengths
    def encoded_length(self, length: int) -> int:
        """Length of ``encode`` output for a length-``length`` input."""
        return self.lengths(length)[-1]

    def lengths(self, length: int) -> list[int]:
        """[L_0, L_1, ..., L_K]: the sequence length entering every layer, then the encoded length."""
        out = [length]
        for block in self.blocks:
            out.append(block.encoded_length(out[-1]))
        return out

    # ------------------------------------------------------------------------------ encode / decode
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.config.input_type == "tokens" else self.embed(x.to(self.head.weight.dtype))
        return self.drop(h)

    def _encode(self, h: torch.Tensor) -> tuple[torch.Tensor, list[int], dict[str, list[Any]]]:
        """h [B, L, D] -> (z [B, L_K, D], lengths [L_0..L_K], trace). trace: per layer, ``hidden``
        [B, L_i] flags, ``log_prob`` [B, L_i] (learned masks while training, else None) and ``positions``
        [B, L_i] (where in x every layer-i token sits). trace["hidden"][0] is the model's mask: the inputs that
        never reached an encoder (tokens dropped by a higher layer were seen in context below)."""
        B, L, _ = h.shape
        positions = torch.arange(L, device=h.device).expand(B, L)
        lengths = [L]
        trace: dict[str, list[Any]] = {"hidden": [], "log_prob": [], "positions": []}
        for block in self.blocks:
            h, kept, hidden, log_prob = block.encode(h)
            trace["hidden"].append(hidden)
            trace["positions"].append(positions)
            trace["log_prob"].append(log_prob)
            positions = positions.gather(1, kept)
            lengths.append(h.shape[1])
        return h, lengths, trace

    def _decode(self, z: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = z
        for block, length in zip(reversed(self.blocks), reversed(lengths[:-1])):
            h = block.decode(h, length)
        return self.head(self.head_norm(h))

    @contextlib.contextmanager
    def masking(self, strategy: str) -> Iterator[None]:
        """Within the block every layer masks with ``strategy`` ("learned" or "random") instead of the
        configured one, e.g. to evaluate a learned-mask model on random masks."""
        check_choice("strategy", strategy, MASK_STRATEGIES)
        maskers = [block.masker for block in self.blocks]
        saved = [m.strategy for m in maskers]
        for m in maskers:
            m.strategy = strategy
        try:
            yield
        finally:
            for m, kept in zip(maskers, saved):
                m.strategy = kept

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] ids or [B, L, d_input] -> z [B, L_K, d_model] (the kept, encoded tokens)."""
        z, _, _ = self._encode(self._embed(self.config.check_input(x)))
        return z

    def decode(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """z [B, L_K, d_model] -> reconstruction [B, L, V] (logits) or [B, L, d_input].

        ``length`` is the original L; by default it is inferred from L_K assuming every segment of
        every layer kept more than n_mask tokens (true for the README configuration at L = 512)."""
        z = check_features(z, self.config.d_model, name="z")
        if length is None:
            lengths = [z.shape[1]]
            for block in reversed(self.blocks):
                lengths.append(block.input_length(lengths[-1]))
            lengths.reverse()
        else:
            check_positive_int("length", length)
            lengths = self.lengths(length)
            if lengths[-1] != z.shape[1]:
                raise ValueError(f"length={length}: encodes to {lengths[-1]} tokens, but z has {z.shape[1]}")
        return self._decode(z, lengths)

    def position_error(self, reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, L] reconstruction error of every position (cross-entropy, or MSE over channels), detached."""
        with torch.no_grad():
            if self.config.input_type == "tokens":
                flat = F.cross_entropy(reconstruction.flatten(0, 1).float(), x.flatten(), reduction="none")
                return flat.view(x.shape)
            return (reconstruction.float() - x.float()).pow(2).mean(-1)

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> MaskedAEOutput:
        x = self.config.check_input(x)
        z, lengths, trace = self._encode(self._embed(x))
        reconstruction = self._decode(z, lengths)
        mask = trace["hidden"][0]
        loss = masked_reconstruction_loss(reconstruction, x, mask, self.config.input_type, self.config.loss_on)
        aux = loss.new_zeros(())
        if any(lp is not None for lp in trace["log_prob"]):
            # Layer 0 hides inputs (reward as configured); higher layers compress, so they drop what is
            # cheapest to reconstruct (cooperative reward). A layer that hides nothing adds 0.
            error = self.position_error(reconstruction, x)
            for i, (lp, hidden, pos) in enumerate(zip(trace["log_prob"], trace["hidden"], trace["positions"])):
                reward = self.config.mask_reward if i == 0 else "cooperative"
                aux = aux + reinforce_loss(lp, hidden, pos, error, reward)
            aux = self.config.mask_loss_weight * aux
        return MaskedAEOutput(reconstruction=reconstruction, loss=loss + aux, mask=mask, aux_loss=aux)
