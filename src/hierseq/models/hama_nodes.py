"""HAMA's parallel node autoencoders: N transformer stacks with separate weights, run over all windows of
a layer in one batched call (window ``w`` served by node ``w mod N``, see :mod:`hierseq.ops.node_linear`).

Every weight has a leading node axis (``shared=True`` makes it 1: all windows use the same weights).
Each projection is one :func:`~hierseq.ops.node_linear.node_linear` bmm; attention runs inside every
window as one ``scaled_dot_product_attention`` over [B * W, H, S, Dh]. Init follows the library's
(:mod:`hierseq.modules.stack`): weights ~ N(0, 1 / sqrt(3 fan_in)), biases 0, norms at identity, the
two residual projections of each block scaled by 1 / sqrt(2 depth); every node draws its own values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.mlp import swiglu_hidden
from ..ops.node_linear import node_linear, node_of_window


class NodeLinear(nn.Module):
    """x [B, W, S, D_in] -> [B, W, S, D_out] with weight [N, D_in, D_out] per node."""

    def __init__(self, nodes: int, d_in: int, d_out: int, bias: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nodes, d_in, d_out) * (scale / math.sqrt(3 * d_in)))
        self.bias = nn.Parameter(torch.zeros(nodes, d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return node_linear(x, self.weight, self.bias)


class NodeNorm(nn.Module):
    """LayerNorm or RMSNorm over D with a per-node gain (and bias for LayerNorm). x: [B, W, S, D]."""

    def __init__(self, kind: str, nodes: int, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.kind, self.eps, self.nodes = kind, eps, nodes
        self.weight = nn.Parameter(torch.ones(nodes, d_model))
        self.bias = nn.Parameter(torch.zeros(nodes, d_model)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node = node_of_window(x.shape[1], self.nodes, x.device)
        if self.kind == "layernorm":
            y = F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight[node][:, None]
            return y + self.bias[node][:, None]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight[node][:, None]


class NodeBlock(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x)), inside every window.

    x: [B, W, S, D]; key_valid: [B, W, S] bool (False = never attended to) or None -> [B, W, S, D]."""

    def __init__(self, nodes: int, d_model: int, n_heads: int, depth: int, dropout: float, mlp: str, norm: str) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model}: must be divisible by n_heads={n_heads}")
        residual = (2 * depth) ** -0.5
        self.n_heads, self.dropout, self.mlp_kind = n_heads, dropout, mlp
        self.attn_norm = NodeNorm(norm, nodes, d_model)
        self.qkv = NodeLinear(nodes, d_model, 3 * d_model)
        self.attn_out = NodeLinear(nodes, d_model, d_model, scale=residual)
        self.mlp_norm = NodeNorm(norm, nodes, d_model)
        hidden = swiglu_hidden(d_model) if mlp == "swiglu" else 4 * d_model
        self.fc_in = NodeLinear(nodes, d_model, 2 * hidden if mlp == "swiglu" else hidden, bias=mlp != "swiglu")
        self.fc_out = NodeLinear(nodes, hidden, d_model, bias=mlp != "swiglu", scale=residual)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, W, S, D = x.shape
        H = self.n_heads
        qkv = self.qkv(self.attn_norm(x)).reshape(B * W, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B * W, H, S, Dh]
        mask = None if key_valid is None else key_valid.reshape(B * W, 1, 1, S)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.resid_dropout(self.attn_out(y.transpose(1, 2).reshape(B, W, S, D)))
        h = self.fc_in(self.mlp_norm(x))
        if self.mlp_kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return x + self.resid_dropout(self.fc_out(h))


class NodeTransformer(nn.Module):
    """``depth`` :class:`NodeBlock` s and a final norm, separate weights per node.

    x: [B, W, S, D] (window w served by node w mod ``nodes``); key_valid: [B, W, S] or None -> same."""

    def __init__(
        self,
        nodes: int,
        d_model: int,
        n_heads: int,
        depth: int,
        dropout: float = 0.0,
        mlp: str = "gelu",
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.nodes = nodes
        self.blocks = nn.ModuleList(NodeBlock(nodes, d_model, n_heads, depth, dropout, mlp, norm) for _ in range(depth))
        self.final_norm = NodeNorm(norm, nodes, d_model)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_valid)
        return self.final_norm(x)
