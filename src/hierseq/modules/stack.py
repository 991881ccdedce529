"""A stack of pre-norm blocks over swappable mixers, with a final norm: the body of every causal LM (and of
HiSS's levels), with the one init of the library.

Init (one scheme, by role): every ``nn.Linear`` / ``nn.Embedding`` weight ~ N(0, init_std)
(``init_std=0``: fan-in scaled, std = 1 / sqrt(3 fan_in), the spread of torch's default, which small
continuous-input models need), biases 0, norms at identity; the two residual output projections of
each block (``block.mixer.out_proj`` and ``block.mlp.out_proj``, found by attribute, not by parameter
name) get that std / sqrt(2 n_layers), so the residual stream's variance does not grow with depth;
then each mixer's own
``reset_special_parameters()`` (conv taps, decay rates, dt, ...). Everything outside the mixers is drawn
from a generator of its own, seeded once from the global RNG before any mixer is built, so two stacks
built under the same seed have identical norms and MLPs whatever their mixers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .block import Block
from .mlp import make_mlp
from .norms import LayerNorm, RMSNorm, make_norm
from .state import DecodingState


class MixerStack(nn.Module):
    """x: [B, L, D] -> (h [B, L, D], state, aux): ``n_layers`` blocks ``Block(mixer, mlp, norm)`` and a
    final norm. ``make_mixer(i)`` builds layer i's mixer (called after the shell's seed is drawn); ``reset``:
    apply the init now (a subclass that adds shell modules passes False and resets afterwards)."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        make_mixer: Callable[[int], nn.Module],
        mlp: str = "swiglu",
        mlp_hidden: int = 0,
        norm: str = "rmsnorm",
        dropout: float = 0.0,
        init_std: float = 0.0,
        reset: bool = True,
    ) -> None:
        super().__init__()
        # Drawn before anything else from the global RNG: seeded builds stay reproducible, and the
        # shell's values do not depend on how many random numbers the mixers consume.
        self._shell_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.d_model, self.n_layers, self.init_std = d_model, n_layers, init_std
        self.blocks = nn.ModuleList(
            Block(
                make_mixer(i),
                make_mlp(mlp, d_model, mlp_hidden or None, dropout),
                lambda: make_norm(norm, d_model),
                dropout,
            )
            for i in range(n_layers)
        )
        self.final_norm = make_norm(norm, d_model)
        if reset:  # a subclass that adds shell modules resets once they exist
            self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def shell_modules(self) -> list[nn.Module]:
        """Everything outside the mixers, in a fixed order: per block (norms, MLP), then the final norm."""
        parts: list[nn.Module] = []
        for block in self.blocks:
            parts += [m for m in (block.mixer_norm, block.mlp_norm, block.mlp) if m is not None]
        return parts + [self.final_norm]

    def reset_parameters(self) -> None:
        depth_scale = (2 * self.n_layers) ** -0.5
        gen = torch.Generator().manual_seed(self._shell_seed)
        residual = {id(b.mlp.out_proj) for b in self.blocks if b.mlp is not None}
        residual |= {id(b.mixer.out_proj) for b in self.blocks}
        with torch.no_grad():
            for part in self.shell_modules():
                for module in part.modules():
                    init_module_(module, self.init_std, gen, depth_scale if id(module) in residual else 1.0)
            for block in self.blocks:
                for module in block.mixer.modules():
                    init_module_(module, self.init_std, None, depth_scale if id(module) in residual else 1.0)
                block.mixer.reset_special_parameters()

    # ------------------------------------------------------------------------------------ properties
    @property
    def mixers(self) -> list[nn.Module]:
        return [b.mixer for b in self.blocks]

    def state_floats(self, seq_len: int) -> int:
        """Floats of decoding state per batch row after ``seq_len`` tokens, over all layers."""
        return sum(m.state_size(seq_len) for m in self.mixers)

    def tbptt_refusal(self) -> str | None:
        """Why this stack cannot carry its state across truncated-BPTT segments (None: it can)."""
        for i, m in enumerate(self.mixers):
            reason = m.tbptt_refusal()
            if reason:
                return f"layer {i} ({m.name}): {reason}"
        return None

    def new_state(self) -> DecodingState:
        return DecodingState(self.n_layers)

    # -------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        cache: DecodingState | None = None,
        use_cache: bool = False,
        need_aux: bool = False,
        **mixer_kwargs: Any,
    ) -> tuple[torch.Tensor, DecodingState | None, torch.Tensor]:
        """x: [B, L, D] -> (h [B, L, D], cache, aux scalar: the mean of the mixers' aux losses, or 0).
        A given ``cache`` is advanced in place; ``use_cache`` without one starts one. ``mixer_kwargs``
        go to every mixer (e.g. an encoder's ``key_valid`` mask)."""
        assert x.dim() == 3 and x.shape[-1] == self.d_model, f"x: {tuple(x.shape)}"
        keep = use_cache or cache is not None
        if keep and cache is None:
            cache = self.new_state()
        aux_terms = []
        for i, block in enumerate(self.blocks):
            x, state, aux = block(x, cache.layers[i] if keep else None, keep, need_aux, **mixer_kwargs)
            if keep:
                cache.layers[i] = state
            if aux is not None:
                aux_terms.append(aux)
        if keep:
            cache.length += x.shape[1]
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else x.new_zeros(())
        return self.final_norm(x), cache, aux_loss


def init_module_(module: nn.Module, std: float, gen: torch.Generator | None, scale: float = 1.0) -> None:
    """The generic init of one module: Linear / Embedding weights ~ N(0, scale * std) (``std=0``: the
    fan-in std 1 / sqrt(3 fan_in)), sampled on the CPU generator ``gen`` or the global one, then copied
    (the same values on every device); biases 0; norms at identity. Other modules keep their own init."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if module.weight.is_meta:  # shape-only builds (parameter counting) have nothing to fill
            return
        fan_in = module.weight.shape[1] if isinstance(module, nn.Linear) else 1
        std = scale * (std or (3 * fan_in) ** -0.5)
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen, device="cpu") * std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm)):
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
