"""The control: a standard pre-norm causal Transformer LM (RoPE, SwiGLU, tied embeddings).

Every hierarchical model in hierseq is measured against this one, so it uses the fast path
(fused QKV, SDPA with ``is_causal``) rather than a hand-written attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import BaseConfig, check_choice, check_divisible, check_positive_float, check_positive_int
from ..layers.attention import CausalSelfAttention, KVCache
from ..layers.init import init_residual_scaled_
from ..layers.mlp import make_mlp
from ..layers.norms import make_norm
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..registry import register
from ..validation import check_input_ids, check_labels


@dataclass
class TransformerConfig(BaseConfig):
    n_heads: int = 4
    mlp: str = "swiglu"
    mlp_hidden: int = 0  # 0 = SwiGLU width with the parameters of a 4x GELU MLP
    norm: str = "rmsnorm"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def small_overrides(cls) -> dict:
        return {**super().small_overrides(), "n_heads": 2}

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_heads", self.n_heads)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"n_heads={self.n_heads}: head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE"
            )
        check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden={self.mlp_hidden!r}: must be 0 (auto) or a positive integer")
        check_positive_float("rope_base", self.rope_base)
        check_positive_float("init_std", self.init_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). x: [B, L, D]."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, rotary=True, rope_base=cfg.rope_base)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_hidden or None, cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cache))
        return x + self.mlp(self.mlp_norm(x))


class TransformerCache:
    """Decoding state: one :class:`KVCache` per layer; ``length`` tokens seen so far."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [KVCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)


@register("transformer", config=TransformerConfig, kind="causal_lm")
class TransformerLM(nn.Module):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, aux_loss=0, cache)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
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
            ("attn.out.weight", "mlp.down.weight", "mlp.fc_out.weight"),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: TransformerCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        input_ids = check_input_ids(input_ids, self.config.vocab_size)
        check_labels(labels, input_ids, self.config.vocab_size)
        if use_cache and cache is None:
            cache = TransformerCache(self.config.n_layers)
        x = self.drop(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.final_norm(x))
        zero = logits.new_zeros(())
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=zero, cache=cache)
