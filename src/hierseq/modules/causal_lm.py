"""THE causal-LM shell: token embedding, a :class:`~hierseq.modules.stack.MixerStack`, a tied head, input
checks, the loss with aux, and the decoding state. Every causal LM in hierseq is this class over its
mixers, so two models in a benchmark row differ in the mixer and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import LMConfig
from ..losses import causal_lm_loss
from ..outputs import CausalLMOutput
from ..validation import check_input_ids, check_labels
from .stack import MixerStack
from .state import DecodingState


class CausalLM(MixerStack):
    """input_ids: [B, L] -> CausalLMOutput(logits [B, L, V], loss, lm_loss, aux_loss, cache).

    ``make_mixer(i)`` builds layer i's mixer (the signature of ``mixers/base.py``). ``cache`` follows the
    rule of ``modules/state.py``: a given :class:`DecodingState` is advanced in place and returned;
    ``use_cache=True`` without one starts a new one. ``loss = lm_loss + aux_loss_weight * aux_loss``.
    """

    def __init__(self, config: LMConfig, make_mixer: Callable[[int], nn.Module]) -> None:
        super().__init__(make_mixer=make_mixer, reset=False, **config.stack_kwargs())
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def shell_modules(self) -> list[nn.Module]:
        """Embedding, the stack's norms and MLPs, the head: everything outside the mixers."""
        return [self.embed, *super().shell_modules(), self.lm_head]

    def _check_cache(self, cache: Any, batch: int) -> None:
        if not isinstance(cache, DecodingState):
            raise TypeError(f"cache: expected a DecodingState from a previous call, got {type(cache).__name__}")
        if len(cache.layers) != self.config.n_layers:
            raise ValueError(f"cache: has {len(cache.layers)} layers, the model has n_layers={self.config.n_layers}")
        rows = cache.batch_size()
        if rows is not None and rows != batch:
            raise ValueError(f"cache: batch={rows}: must match input_ids batch {batch}")

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: DecodingState | None = None,
        use_cache: bool = False,
        check_inputs: bool = True,
    ) -> CausalLMOutput:
        """input_ids: [B, L] long; labels: [B, L] next-token targets (-100 ignored). ``check_inputs=False``
        skips the token-range check (a host sync), for callers that checked once, e.g. a decode loop."""
        if check_inputs:
            input_ids = check_input_ids(input_ids, self.config.vocab_size)
            check_labels(labels, input_ids, self.config.vocab_size)
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        need_aux = labels is not None and self.config.aux_loss_weight > 0
        h, cache, aux_loss = super().forward(self.drop(self.embed(input_ids)), cache, use_cache, need_aux)
        logits = self.lm_head(h)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss + self.config.aux_loss_weight * aux_loss if need_aux else lm_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, cache=cache)

    def forward_hidden(
        self, x: torch.Tensor, cache: DecodingState | None = None, use_cache: bool = False
    ) -> torch.Tensor:
        """The stack alone on continuous inputs x: [B, L, D] -> h [B, L, D] (for peers and probes)."""
        return MixerStack.forward(self, x, cache, use_cache)[0]
