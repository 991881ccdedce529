"""HAMA's masking decision: which tokens of every segment are hidden from the node encoders.

``learned``: a small scorer (norm -> depthwise convolution over the sequence, so a token's score sees
its neighbourhood -> GELU -> Linear to one logit) defines, in every segment, a categorical distribution
``softmax(logits)`` over its tokens. While training the hidden set is *sampled* from it without
replacement (Gumbel top-k: the n_hide tokens with the largest ``logit + Gumbel noise``); in eval it is
the n_hide largest logits (deterministic). The decision gets a learning signal by REINFORCE
(AdaMAE, Bandara et al. 2023): :func:`reinforce_loss` weights ``log softmax(logits)`` of every hidden
token by its reconstruction error minus the mean error of the hidden tokens of its row (a baseline
that lowers the variance), so the policy moves towards hiding tokens that are hard to reconstruct
(``reward="adversarial"``, AdaMAE's choice) or easy ones (``"cooperative"``). Like AdaMAE the set's
log-probability is approximated by the sum of its tokens' log-probabilities.

``random``: uniform noise instead of logits (fresh every training call; in eval a fixed pattern drawn
from ``mask_seed`` that depends only on the position, so results are deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.norms import make_norm

MASK_STRATEGIES = ("learned", "random")
MASK_REWARDS = ("adversarial", "cooperative")


class TokenMasker(nn.Module):
    """``forward(h [B, L, D], seg_pos [W, S], seg_valid [W, S], n_hide [W], seq_index [L])`` ->
    (hidden [B, L] bool,
    log_prob [B, L] float or None): exactly ``n_hide[w]`` tokens of segment w are hidden in every row;
    ``log_prob`` is log softmax(logits) within the segment at hidden tokens (0 elsewhere), only when
    training with the learned strategy (the REINFORCE term needs it). seg_pos: position of every
    segment slot (clamped in padding); seq_index: the slot w * S + s of every position."""

    def __init__(self, d_model: int, strategy: str, mask_seed: int, norm: str = "layernorm", kernel: int = 9) -> None:
        super().__init__()
        self.strategy, self.mask_seed = strategy, mask_seed
        # Built only for the learned strategy, so every parameter of a model gets a gradient.
        if strategy == "learned":
            self.norm = make_norm(norm, d_model)
            self.context = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
            self.logit = nn.Linear(d_model, 1)

    @property
    def uses_scorer(self) -> bool:
        # ``strategy`` may be switched to "random" after construction (HAMA.masking), e.g. to evaluate
        # a model trained with learned masks on random masks.
        return self.strategy == "learned" and hasattr(self, "logit")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, L, D] -> [B, L] (higher = more likely hidden)."""
        ctx = self.context(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.logit(F.gelu(ctx)).squeeze(-1)

    def forward(
        self,
        h: torch.Tensor,
        seg_pos: torch.Tensor,
        seg_valid: torch.Tensor,
        n_hide: torch.Tensor,
        seq_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, _ = h.shape
        W, S = seg_pos.shape
        log_prob = None
        if self.uses_scorer:
            logits = self.logits(h)[:, seg_pos].masked_fill(~seg_valid, float("-inf"))  # [B, W, S]
            keys = logits.detach()
            if self.training:
                u = torch.rand_like(keys).clamp_(1e-9, 1 - 1e-9)
                keys = keys - torch.log(-torch.log(u))
        elif self.training:
            keys = torch.rand(B, W, S, device=h.device)
        else:
            gen = torch.Generator().manual_seed(self.mask_seed)
            keys = torch.rand(1, W, S, generator=gen).to(h.device).expand(B, W, S)
        keys = keys.masked_fill(~seg_valid, float("-inf"))
        rank = keys.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = first to be hidden
        hide = (rank < n_hide[:, None]) & seg_valid  # [B, W, S]
        # Segments partition the sequence, so [B, W * S] -> [B, L] is one gather by seq_index.
        hidden = hide.reshape(B, W * S)[:, seq_index]
        if self.uses_scorer and self.training:
            lp = torch.log_softmax(logits, dim=-1).masked_fill(~hide, 0.0)
            log_prob = lp.reshape(B, W * S)[:, seq_index]
        return hidden, log_prob


def reinforce_loss(
    log_prob: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, error: torch.Tensor, reward: str
) -> torch.Tensor:
    """The REINFORCE surrogate of one learned masking layer: a scalar whose gradient is the policy
    gradient estimate.

    log_prob, hidden, positions: [B, L_i] (log-probability of every hidden token, the hidden flags,
    and every token's position in the model input); error: [B, L] per-position reconstruction error.
    The reward of a hidden token is the error at its position minus the mean over the row's hidden
    tokens (baseline); the surrogate is -mean(log_prob * advantage) for ``"adversarial"`` (ascent on
    the expected error of the hidden tokens) and +mean(...) for ``"cooperative"``."""
    sign = -1.0 if reward == "adversarial" else 1.0
    r = error.detach().gather(1, positions)
    count = hidden.sum(1, keepdim=True).clamp(min=1)
    baseline = (r * hidden).sum(1, keepdim=True) / count
    advantage = (r - baseline) * hidden
    return sign * ((log_prob * advantage).sum(1) / count.squeeze(1)).mean()
