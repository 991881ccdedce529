"""Tree attention decoder: the Hierarchical Attention Decoder seed, made causal and sub-quadratic.

The seed (``seeds/001_c8a0c20e923d48c4.txt``, studied in ``specs/tree.md``) splits the sequence into
leaf chunks with causal attention inside each, then lets right siblings attend to left siblings level by
level up a binary tree. Its code leaked the future (reversed mask), dropped the right child's own
content (no residual), and was quadratic in practice. This model keeps the idea and fixes each defect:

* the mixer (:class:`hierseq.layers.tree_attention.TreeAttention`) gives each token its leaf (causal)
  plus the whole left sibling at every level where it is in a right child, under one softmax, so the
  prefix is covered exactly once and nothing later is visible;
* ``sibling_mode="exact"`` keeps every left-sibling token (equal to dense causal attention, O(L^2));
  ``sibling_mode="summary"`` compresses each left sibling to ``n_summary`` mean-pooled tokens, so the
  whole model is O(L log L) in time and memory;
* the leaf size is fixed and the tree grows with the input (``ceil(log2(L / leaf_size))`` levels), so
  any length works, with rotary positions instead of a fixed-length sinusoidal table;
* pre-norm blocks (attention + MLP, each with a residual, so left and right children both keep their
  content), a final norm and a tied head;
* cached decoding whose per-token cost is O(leaf + levels * n_summary) in summary mode.

:class:`Decoder` is the seed's constructor and call convention on top of :class:`TreeLM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import (
    BaseConfig,
    check_choice,
    check_divisible,
    check_positive_float,
    check_positive_int,
    config_error,
)
from ..layers.init import init_residual_scaled_
from ..layers.mlp import make_mlp
from ..layers.norms import make_norm
from ..layers.tree_attention import SIBLING_MODES, TreeAttention, TreeAttentionCache
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels


@dataclass
class TreeConfig(BaseConfig):
    """Shared fields, then the tree's own.

    leaf_size: tokens per leaf chunk (causal attention inside it); the number of tree levels follows
    from the input length. sibling_mode: "summary" (O(L log L)) or "exact" (every left-sibling token,
    O(L^2)). n_summary: summary tokens per left sibling in summary mode; must divide leaf_size (ignored
    in exact mode, still validated so that switching modes cannot produce an invalid config).
    dropout applies to the embeddings, the residual branches and the MLP, not to attention
    probabilities (the summary softmax is over few keys; dropping one would drop a whole sibling).
    """

    n_heads: int = 4
    leaf_size: int = 32
    sibling_mode: str = "summary"
    n_summary: int = 8
    mlp: str = "swiglu"
    mlp_hidden: int = 0  # 0 = SwiGLU width with the parameters of a 4x GELU MLP
    norm: str = "rmsnorm"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict:
        # leaf 8 makes the conformance lengths (45, 80 tokens) span 6-10 leaves and 3-4 tree levels.
        return {**super().small_overrides(), "n_heads": 2, "leaf_size": 8, "n_summary": 4}

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_heads", self.n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        if (self.d_model // self.n_heads) % 2:
            raise config_error(
                "n_heads",
                self.n_heads,
                f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE",
            )
        check_positive_int("leaf_size", self.leaf_size)
        check_choice("sibling_mode", self.sibling_mode, SIBLING_MODES)
        check_positive_int("n_summary", self.n_summary)
        if self.leaf_size % self.n_summary:
            raise config_error("n_summary", self.n_summary, f"must divide leaf_size={self.leaf_size}")
        check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise config_error("mlp_hidden", self.mlp_hidden, "must be 0 (auto) or a positive integer")
        check_positive_float("rope_base", self.rope_base)
        check_positive_float("init_std", self.init_std)


class TreeBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). x: [B, L, D] -> [B, L, D]."""

    def __init__(self, cfg: TreeConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model)
        self.attn = TreeAttention(
            cfg.d_model, cfg.n_heads, cfg.leaf_size, cfg.sibling_mode, cfg.n_summary, cfg.rope_base
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_hidden or None, cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: TreeAttentionCache | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cache))
        return x + self.mlp(self.mlp_norm(x))


class TreeCache:
    """Decoding state: one :class:`TreeAttentionCache` per layer; ``length`` tokens seen so far."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [TreeAttentionCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)


@register("tree", config=TreeConfig, kind="causal_lm")
class TreeLM(nn.Module):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, lm_loss, aux_loss=0, cache)."""

    def __init__(self, config: TreeConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TreeBlock(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        # GPT-2 style, as in the transformer control.
        init_residual_scaled_(
            self,
            self.config.n_layers,
            self.config.init_std,
            ("attn.out.weight", "mlp.down.weight", "mlp.fc_out.weight"),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: TreeCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None and not isinstance(cache, TreeCache):
            raise TypeError(f"cache: expected a TreeCache from a previous call, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = TreeCache(self.config.n_layers)
        x = self.drop(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.final_norm(x))
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=logits.new_zeros(()), cache=cache)


class Decoder(TreeLM):
    """The seed's API: ``Decoder(vocab_size, sequence_length, heads, d_model, levels)``.

    ``model(input_ids)`` returns logits [B, L, V]; ``model(input_ids, training=False)`` returns
    probabilities [B, L, V] (softmax over the vocabulary; the module's train/eval mode is not changed).

    Mapping onto :class:`TreeConfig`: the seed cuts ``sequence_length`` into ``2**levels`` leaves, so
    ``leaf_size = ceil(sequence_length / 2**levels)``; the sibling attention is "exact" as the seed
    describes; LayerNorm and a 4x GELU MLP as in its decoder block; ``n_layers=2`` for its two
    hierarchical-attention layers. Unlike the seed, inputs longer than ``sequence_length`` also work
    (the tree grows), and ``hierseq.save`` / ``hierseq.load`` treat it as a ``tree`` model.
    """

    def __init__(
        self,
        vocab_size: int,
        sequence_length: int,
        heads: int,
        d_model: int,
        levels: int,
        dropout: float = 0.0,
        n_layers: int = 2,
    ) -> None:
        check_positive_int("sequence_length", sequence_length)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise config_error("levels", levels, "must be a non-negative integer")
        if levels > math.log2(sequence_length):
            raise ValueError(f"levels={levels} needs sequence_length >= {2**levels}, got {sequence_length}")
        leaf_size = -(-sequence_length // 2**levels)
        config = TreeConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            dropout=dropout,
            n_heads=heads,
            leaf_size=leaf_size,
            sibling_mode="exact",
            n_summary=math.gcd(leaf_size, 8),
            mlp="gelu",
            norm="layernorm",
        )
        super().__init__(config)
        self.sequence_length = sequence_length
        self.levels = levels

    def forward(self, input_ids: torch.Tensor, training: bool = True) -> torch.Tensor:  # type: ignore[override]
        logits = super().forward(input_ids).logits
        return logits if training else torch.softmax(logits.float(), dim=-1)
