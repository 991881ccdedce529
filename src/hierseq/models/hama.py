"""HAMA: a hierarchical masked autoencoder built from parallel window autoencoders.

Seed ``000_dba8f4646a0b80aa`` (see ``specs/hama.md``) describes a stack of layers; in each layer the
sequence is split ("fission") into node windows, every node is a small transformer autoencoder that
hides its least important tokens, and the node outputs are recombined ("fusion"). Its code could not
reconstruct anything (identical output at every position), masked after encoding with a fixed
heuristic and hid an O(L^2) cost. This module keeps the seed's public API, configuration routes and
encode/decode length arithmetic, and makes each part do what its name says:

* **Fission** (:class:`FissionModule`) cuts the layer input [B, L_i, D] into W_i = ceil(L_i / P_i)
  contiguous windows of partition length P_i (the last one padded), adds the sinusoidal position of
  every token inside its window and the embedding of the node that owns the window (window w belongs
  to node w mod N_i). All windows of all nodes go through the node autoencoder as one batch.
* **Masking before the encoder** (:class:`BabyAutoencoder`): an importance scorer rates every token;
  the n_mask_i lowest-rated tokens of each window are dropped *before* the encoder (MAE style), so the
  encoder never sees them. The scorer learns through a straight-through gate on the kept tokens, with
  Gumbel noise while training (Gumbel top-k); ``mask_strategy="random"`` masks uniformly instead.
  n_mask_i per layer is the masking schedule ("progressive" masking).
* **Fusion** (:class:`FusionModule`): on the way down, every position of a window is queried by a
  learned mask token plus its position (Perceiver-IO style output queries); the decoder attends from
  these queries to the window's latents, so each output position gets its own reconstruction.

Length arithmetic (the seed's): encoding layer i keeps P_i - n_mask_i tokens of every full window, so
the sequence shortens by W_i * n_mask_i; decoding restores it. With the README configuration
(nodes 8/4/2, partitions 64/128/256, n_mask 4, L = 512 = 8 * 64) W_i equals the node count, so the
lengths are 512 -> 480 -> 464 -> 456 exactly as in the seed. A window that is only partly filled
(the last one, when P_i does not divide L_i) drops min(n_mask_i, r - 1) of its r tokens, so any
length >= 1 works.

Cost: every layer runs attention inside windows of P_i (encoder) and P_i + (P_i - n_mask_i)
(decoder) tokens, so time and memory grow linearly in L for fixed partition lengths.

Design choice: the nodes of a layer share the autoencoder weights and differ by a learned node
embedding. N_i separate autoencoders would multiply the parameters by N_i with nothing in the seed to
show it helps, and sharing is what lets every window go through one batched call.
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
    check_choice,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..losses import masked_reconstruction_loss
from ..modules.encoder import Encoder, make_input_embedding
from ..modules.norms import make_norm
from ..modules.positional import SinusoidalPositionalEncoding
from ..outputs import MaskedAEOutput
from ..registry import register
from ..validation import check_features

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
    explicit per-layer lists, never both; unset scaling fields take :data:`SCALING_DEFAULTS`."""

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
    mask_strategy: str = "learned"  # "learned" (scored, Gumbel top-k, straight-through) or "random"
    gumbel_scale: float = 1.0  # scale of the Gumbel noise added to the scores while training (learned)

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
        }

    def validate(self) -> None:
        super().validate()
        check_positive_int("transformer_layers", self.transformer_layers)
        check_choice("mask_strategy", self.mask_strategy, ("learned", "random"))
        if isinstance(self.gumbel_scale, bool) or not isinstance(self.gumbel_scale, (int, float)):
            raise config_error("gumbel_scale", self.gumbel_scale, "must be a number >= 0")
        if self.gumbel_scale < 0:
            raise config_error("gumbel_scale", self.gumbel_scale, "must be a number >= 0")
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
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                        raise config_error(name, values, "every entry must be a positive integer")
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
        for i, (_, p, m) in enumerate(plan):
            if m >= p:
                raise config_error(
                    "n_masks" if given_lists else "initial_n_mask",
                    m,
                    f"layer {i} masks {m} of partition_length={p} tokens: every window must keep at least one",
                )
        return plan


# ============================================================================================= layers
# =========================================================================================== geometry
@dataclass
class WindowGeometry:
    """How one hierarchy layer cuts a length-``length`` sequence. Plain integers plus small [W, *]
    tensors that are the same for every batch row (so rows never influence each other).

    windows: W = ceil(length / P); last_fill: real tokens r in the last window; keep_counts: [W] tokens
    each window keeps (P - m, last one max(r - m, 1)); visible: V = P - m slots per window after masking.
    """

    length: int
    partition_length: int
    n_mask: int
    windows: int
    last_fill: int
    visible: int
    keep_counts: torch.Tensor  # [W] long
    encoded_length: int

    @classmethod
    def of(cls, length: int, partition_length: int, n_mask: int, device: torch.device | None = None) -> WindowGeometry:
        if length < 1:
            raise ValueError(f"length={length}: must be >= 1")
        P, m = partition_length, n_mask
        W = -(-length // P)
        r = length - (W - 1) * P
        keep = torch.full((W,), P - m, dtype=torch.long, device=device)
        keep[-1] = max(r - m, 1) if r < P else P - m
        return cls(length, P, m, W, r, P - m, keep, (W - 1) * (P - m) + int(keep[-1]))

    @staticmethod
    def input_length(encoded_length: int, partition_length: int, n_mask: int) -> int:
        """The input length that encodes to ``encoded_length`` with every window keeping P - m tokens
        except a last one that keeps r - m (r > m). Unique under that rule; inputs whose last window is
        nearly empty (r <= m) cannot be told apart from shorter ones, so decode needs their length."""
        if encoded_length < 1:
            raise ValueError(f"encoded length={encoded_length}: must be >= 1")
        V = partition_length - n_mask
        full = (encoded_length - 1) // V
        return full * partition_length + (encoded_length - full * V) + n_mask

    def token_valid(self) -> torch.Tensor:
        """[W, P] bool: real tokens (False = padding of the last window)."""
        pos = torch.arange(self.windows * self.partition_length, device=self.keep_counts.device)
        return (pos < self.length).view(self.windows, self.partition_length)

    def latent_valid(self) -> torch.Tensor:
        """[W, V] bool: real latents among the V visible slots of every window."""
        slots = torch.arange(self.visible, device=self.keep_counts.device)
        return slots[None, :] < self.keep_counts[:, None]

    def is_ragged(self) -> bool:
        return self.last_fill < self.partition_length


# ========================================================================================= components
class FissionModule(nn.Module):
    """Splits a sequence into node windows. x: [B, L, D] -> windows [B, W, P, D], where window w holds
    positions w*P .. w*P + P - 1 (zero padded past L), plus the sinusoidal encoding of each token's
    position inside its window and the embedding of its node (window w belongs to node w mod N)."""

    def __init__(self, d_model: int, num_nodes: int, partition_length: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.partition_length = partition_length
        self.positional = SinusoidalPositionalEncoding(d_model)
        self.node_embedding = nn.Parameter(torch.randn(num_nodes, d_model) * 0.02)

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        B, L, D = x.shape
        W, P = geometry.windows, self.partition_length
        windows = F.pad(x, (0, 0, 0, W * P - L)).view(B, W, P, D)
        nodes = torch.arange(W, device=x.device) % self.num_nodes
        windows = self.positional(windows) + self.node_embedding[nodes][None, :, None, :]
        return windows


class BabyAutoencoder(nn.Module):
    """One node autoencoder, applied to all windows of a layer in one batched call.

    ``encode``: scores the tokens of every window, drops the n_mask lowest-scored ones *before* the
    encoder, and encodes the P - n_mask kept tokens -> latents [B, W, V, D] and their in-window
    positions [B, W, V]. ``decode``: the decoder attends over [latents; output queries] and returns the
    query outputs [B, W, P, D].
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        transformer_layers: int,
        dropout: float,
        n_mask: int,
        mask_strategy: str = "learned",
        gumbel_scale: float = 1.0,
        mask_seed: int = 0,
        mlp: str = "gelu",
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.d_model, self.n_mask = d_model, n_mask
        self.mask_strategy = mask_strategy
        self.gumbel_scale = gumbel_scale
        self.mask_seed = mask_seed
        # The importance scorer exists only when it is used, so every parameter gets a gradient.
        self.scorer = (
            nn.Sequential(make_norm(norm, d_model), nn.Linear(d_model, 1)) if mask_strategy == "learned" else None
        )
        self.encoder = Encoder(d_model, n_heads, transformer_layers, dropout, mlp, norm)
        self.positional = SinusoidalPositionalEncoding(d_model)
        self.decoder = Encoder(d_model, n_heads, transformer_layers, dropout, mlp, norm)

    # ---------------------------------------------------------------------------------------- masking
    @property
    def uses_scorer(self) -> bool:
        # ``mask_strategy`` may be switched to "random" after construction, e.g. to evaluate a model
        # trained with learned masks on random masks (the bench does).
        return self.scorer is not None and self.mask_strategy == "learned"

    def scores(self, windows: torch.Tensor) -> torch.Tensor:
        """Importance of every token: [B, W, P, D] -> [B, W, P] (higher = kept)."""
        B, W, P, _ = windows.shape
        if self.uses_scorer:
            s = self.scorer(windows).squeeze(-1)
            if self.training and self.gumbel_scale > 0:
                # Gumbel top-k: sampling the kept set in proportion to exp(score) explores masks.
                u = torch.rand_like(s).clamp_(1e-9, 1 - 1e-9)
                s = s - self.gumbel_scale * torch.log(-torch.log(u))
            return s
        if self.training:
            return torch.rand(B, W, P, device=windows.device)
        # Eval: a fixed pattern that depends only on the position, so results are deterministic and
        # batch rows are independent.
        gen = torch.Generator().manual_seed(self.mask_seed)
        return torch.rand(1, W, P, generator=gen).to(windows.device).expand(B, W, P)

    def select(self, scores: torch.Tensor, geometry: WindowGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Which V = P - m slots of each window the encoder sees: [B, W, V] in-window positions in
        increasing order (kept real tokens first, then padding of a ragged last window) and the
        straight-through gate [B, W, V] (exactly 1 in value; carries the scorer's gradient)."""
        B, W, P = scores.shape
        valid = geometry.token_valid()  # [W, P]
        ranked = scores.detach().masked_fill(~valid, float("-inf"))
        order = ranked.argsort(dim=-1, descending=True)
        rank = order.argsort(dim=-1)  # rank of every token inside its window, 0 = most important
        keep = rank < geometry.keep_counts[None, :, None]  # [B, W, P]; the kept are always real tokens
        # A ragged last window fills its remaining visible slots with padding (masked in attention).
        pad_fill = geometry.visible - geometry.keep_counts  # [W]
        pos = torch.arange(P, device=scores.device)
        take_pad = (~valid) & (pos[None, :] < (geometry.last_fill + pad_fill)[:, None])
        chosen = keep | take_pad[None]
        # Stable sort puts the V chosen slots first, in position order.
        idx = chosen.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., : geometry.visible]
        if not self.uses_scorer:
            return idx, scores.new_ones(idx.shape)
        # Straight-through: value 1, gradient of sigmoid(score - window mean) w.r.t. the scorer.
        centre = (scores.detach() * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        soft = torch.sigmoid(scores - centre).gather(-1, idx)
        return idx, 1.0 + soft - soft.detach()

    # ----------------------------------------------------------------------------------- encode/decode
    def encode(self, windows: torch.Tensor, geometry: WindowGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """windows [B, W, P, D] -> (latents [B, W, V, D], kept in-window positions [B, W, V])."""
        B, W, P, D = windows.shape
        idx, gate = self.select(self.scores(windows), geometry)
        visible = windows.gather(2, idx[..., None].expand(B, W, geometry.visible, D)) * gate[..., None]
        key_valid = geometry.latent_valid()[None].expand(B, W, geometry.visible).reshape(B * W, -1)
        latents = self.encoder(visible.reshape(B * W, geometry.visible, D), key_valid if geometry.is_ragged() else None)
        # Stamp every latent with its in-window position again: the decoder's output queries carry the
        # same encoding, so matching a query to the latent of its own position is easy, and z stays
        # self-describing (decode needs no mask indices).
        latents = self.positional(latents.view(B, W, geometry.visible, D), positions=idx)
        return latents, idx

    def decode(self, latents: torch.Tensor, queries: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """latents [B, W, V, D], queries [W, P, D] -> [B, W, P, D]."""
        B, W, V, D = latents.shape
        P = queries.shape[1]
        seq = torch.cat((latents, queries[None].expand(B, W, P, D)), dim=2).reshape(B * W, V + P, D)
        key_valid = None
        if geometry.is_ragged():
            valid = torch.cat((geometry.latent_valid(), geometry.token_valid()), dim=1)  # [W, V + P]
            key_valid = valid[None].expand(B, W, V + P).reshape(B * W, V + P)
        out = self.decoder(seq, key_valid)
        return out.view(B, W, V + P, D)[:, :, V:]


class FusionModule(nn.Module):
    """Recombines node windows into one sequence.

    ``queries``: the positional output queries [W, P, D] (a learned mask token + the sinusoidal
    position inside the window + the node's query embedding), one per output position, so outputs
    differ by position. ``merge_latents`` / ``split_latents``: [B, W, V, D] <-> [B, L', D] (padding of
    the last window dropped / restored). ``merge_outputs``: [B, W, P, D] -> [B, L, D].
    """

    def __init__(self, d_model: int, num_nodes: int, partition_length: int) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.partition_length = partition_length
        self.positional = SinusoidalPositionalEncoding(d_model)
        self.mask_token = nn.Parameter(torch.randn(d_model) * 0.02)
        self.node_queries = nn.Parameter(torch.randn(num_nodes, d_model) * 0.02)

    def queries(self, geometry: WindowGeometry) -> torch.Tensor:
        W, P = geometry.windows, self.partition_length
        nodes = torch.arange(W, device=self.mask_token.device) % self.num_nodes
        base = self.mask_token.expand(W, P, -1) + self.node_queries[nodes][:, None, :]
        return self.positional(base)

    @staticmethod
    def merge_latents(latents: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        B, W, V, D = latents.shape
        return latents.reshape(B, W * V, D)[:, : geometry.encoded_length]

    @staticmethod
    def split_latents(z: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        B, Lz, D = z.shape
        W, V = geometry.windows, geometry.visible
        return F.pad(z, (0, 0, 0, W * V - Lz)).view(B, W, V, D)

    @staticmethod
    def merge_outputs(outputs: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        B, W, P, D = outputs.shape
        return outputs.reshape(B, W * P, D)[:, : geometry.length]


class HAMABlock(nn.Module):
    """One hierarchy layer: fission -> masked node autoencoders -> fusion.

    ``encode(x [B, L, D]) -> (z [B, L', D], kept [B, L'])`` with L' = L - W * n_mask (full windows) and
    ``kept`` the positions in x of the tokens z encodes; ``decode(z [B, L', D], length=L) -> [B, L, D]``.
    """

    def __init__(self, node: BabyAutoencoder, num_nodes: int, partition_length: int) -> None:
        super().__init__()
        n_mask, d_model = node.n_mask, node.d_model
        if n_mask >= partition_length:
            raise ValueError(f"n_mask={n_mask}: must be < partition_length={partition_length}")
        self.num_nodes, self.partition_length, self.n_mask = num_nodes, partition_length, n_mask
        self.fission = FissionModule(d_model, num_nodes, partition_length)
        self.node = node
        self.fusion = FusionModule(d_model, num_nodes, partition_length)

    def geometry(self, length: int, device: torch.device | None = None) -> WindowGeometry:
        return WindowGeometry.of(length, self.partition_length, self.n_mask, device)

    def encoded_length(self, length: int) -> int:
        return self.geometry(length).encoded_length

    def input_length(self, encoded_length: int) -> int:
        return WindowGeometry.input_length(encoded_length, self.partition_length, self.n_mask)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = self.geometry(x.shape[1], x.device)
        latents, idx = self.node.encode(self.fission(x, geometry), geometry)
        z = self.fusion.merge_latents(latents, geometry)
        window_start = torch.arange(geometry.windows, device=x.device)[None, :, None] * self.partition_length
        kept = (idx + window_start).flatten(1)[:, : geometry.encoded_length]
        return z, kept

    def decode(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        length = self.input_length(z.shape[1]) if length is None else length
        geometry = self.geometry(length, z.device)
        if geometry.encoded_length != z.shape[1]:
            raise ValueError(f"z: length {z.shape[1]} does not encode a length-{length} input")
        outputs = self.node.decode(self.fusion.split_latents(z, geometry), self.fusion.queries(geometry), geometry)
        return self.fusion.merge_outputs(outputs, geometry)


# ============================================================================================== model
_SEED_NAMES = {"embedding_dim": "d_model", "num_heads": "n_heads", "num_layers": "n_layers"}


@register("hama", config=HAMAConfig, kind="masked_ae")
class HAMA(nn.Module):
    """Hierarchical masked autoencoder.

    Build with a :class:`HAMAConfig` (``HAMA(config)``, the registry's way) or with the seed's keyword
    arguments (``HAMA(embedding_dim=256, num_heads=8, dropout=0.1, num_layers=3, transformer_layers=2,
    ...)``), which give a continuous model on [B, L, embedding_dim] inputs.

    ``forward(x) -> MaskedAEOutput(reconstruction, loss, mask, aux_loss=0)``:
    x is ids [B, L] (``input_type="tokens"``; reconstruction = logits [B, L, V], loss = cross-entropy)
    or features [B, L, d_input] (``"continuous"``; reconstruction [B, L, d_input], loss = MSE);
    mask [B, L] bool marks the positions hidden from every encoder (the n_mask_0 dropped per layer-0
    window); the loss covers them (``loss_on="masked"``) or every position (``"all"``). Higher layers
    drop further latents (compression); those positions are reconstructed from context.
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
                BabyAutoencoder(
                    D,
                    config.n_heads,
                    config.transformer_layers,
                    config.dropout,
                    n_mask,
                    config.mask_strategy,
                    config.gumbel_scale,
                    config.mask_seed + i,
                    config.mlp,
                    config.norm,
                ),
                nodes,
                partition,
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

    # ------------------------------------------------------------------------------------ checking
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.config.input_type == "tokens" else self.embed(x.to(self.head.weight.dtype))
        return self.drop(h)

    # ------------------------------------------------------------------------------ encode / decode
    def _encode(self, h: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """h [B, L, D] -> (z [B, L_K, D], lengths [L_0..L_K], mask [B, L], positions [B, L_K]).

        mask: True where the input never reached an encoder (dropped by layer 0). Tokens dropped by a
        higher layer are not in it: their input was seen (in context) by the layers below.
        positions: where in x each z token sits."""
        B, L, _ = h.shape
        positions = torch.arange(L, device=h.device).expand(B, L)
        lengths = [L]
        mask = None
        for block in self.blocks:
            h, kept = block.encode(h)
            positions = positions.gather(1, kept)
            lengths.append(h.shape[1])
            if mask is None:
                mask = torch.ones(B, L, dtype=torch.bool, device=h.device).scatter(1, positions, False)
        return h, lengths, mask, positions

    def _decode(self, z: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        h = z
        for block, length in zip(reversed(self.blocks), reversed(lengths[:-1])):
            h = block.decode(h, length)
        return self.head(self.head_norm(h))

    @contextlib.contextmanager
    def masking(self, strategy: str) -> Iterator[None]:
        """Within the block every node masks with ``strategy`` ("learned" or "random") instead of the
        configured one, e.g. to evaluate a learned-mask model on random masks."""
        check_choice("strategy", strategy, ("learned", "random"))
        nodes = [block.node for block in self.blocks]
        saved = [node.mask_strategy for node in nodes]
        for node in nodes:
            node.mask_strategy = strategy
        try:
            yield
        finally:
            for node, kept in zip(nodes, saved):
                node.mask_strategy = kept

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] ids or [B, L, d_input] -> z [B, L_K, d_model] (the kept, encoded tokens)."""
        z, _, _, _ = self._encode(self._embed(self.config.check_input(x)))
        return z

    def decode(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """z [B, L_K, d_model] -> reconstruction [B, L, V] (logits) or [B, L, d_input].

        ``length`` is the original L; by default it is inferred from L_K assuming every window of every
        layer kept more than n_mask tokens (always true when each layer's length is a multiple of its
        partition length, as in the README configuration)."""
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

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> MaskedAEOutput:
        x = self.config.check_input(x)
        z, lengths, mask, _ = self._encode(self._embed(x))
        reconstruction = self._decode(z, lengths)
        loss = masked_reconstruction_loss(reconstruction, x, mask, self.config.input_type, self.config.loss_on)
        return MaskedAEOutput(reconstruction=reconstruction, loss=loss, mask=mask, aux_loss=loss.new_zeros(()))
