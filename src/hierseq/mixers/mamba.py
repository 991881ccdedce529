"""The Mamba (selective SSM) mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan, gated.

x: [B, L, d_model] -> [B, L, d_model], with d_inner = expand * d_model channels inside::

    x_in, z  = in_proj(x).chunk(2)                     # [B, L, d_inner] each
    x_c      = silu(conv1d_causal(x_in))              # short local mixing
    dt, B, C = x_proj(x_c) split (dt_rank, N, N)      # selective (input-dependent) parameters
    delta    = softplus(dt_proj(dt))                   # [B, L, d_inner], bias holds the dt init
    y        = selective_scan(x_c, delta, A=-exp(A_log), B, C, D)
    out      = out_proj(y * silu(z))

Initialisation follows the reference (Gu & Dao 2023): dt_proj bias = inverse softplus of dt drawn
log-uniformly in [dt_min, dt_max] (floored at dt_init_floor), dt_proj weight uniform (or constant)
at dt_rank^-0.5 * dt_scale, A_log = log(1..N) per channel, D = 1.

The linear layers other than out_proj keep torch's default init, as in the reference (the shell's
generic init is undone for them in :meth:`Mamba.reset_special_parameters`); out_proj is the residual
projection the shell scales by depth.

Decoding state per mixer: :class:`MambaState` (conv [B, d_inner, d_conv - 1], ssm [B, d_inner, N]): O(1)
in the sequence length.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_bool, check_choice, check_positive_float, check_positive_int, config_error
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.state import LayerState
from ..ops.selective_scan import selective_scan, selective_scan_reference, selective_scan_step
from .base import Mixer, MixerConfig, register_mixer


@dataclasses.dataclass
class MambaState(LayerState):
    """Recurrent state of one mixer. conv: [B, d_inner, d_conv - 1]; ssm: [B, d_inner, d_state]."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclasses.dataclass
class MambaMixerConfig(MixerConfig):
    """Selective-SSM options. ``dt_rank=0`` means ceil(d_model / 16); ``scan`` picks the fast parallel
    scan or the sequential reference (for checking only)."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    bias: bool = False
    conv_bias: bool = True
    scan: str = "fast"

    def check(self, d_model: int) -> None:
        for name in ("d_state", "d_conv", "expand"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 0:
            raise config_error("dt_rank", self.dt_rank, "must be 0 (auto: ceil(d_model/16)) or a positive integer")
        for name in ("dt_min", "dt_max", "dt_scale", "dt_init_floor"):
            check_positive_float(name, getattr(self, name))
        if self.dt_min > self.dt_max:
            raise config_error("dt_min", self.dt_min, f"must be <= dt_max={self.dt_max!r}")
        check_choice("dt_init", self.dt_init, ("random", "constant"))
        check_bool("bias", self.bias)
        check_bool("conv_bias", self.conv_bias)
        check_choice("scan", self.scan, ("fast", "reference"))


@register_mixer("mamba", config=MambaMixerConfig)
class Mamba(Mixer):
    """Selective SSM mixer. x: [B, L, d_model] -> [B, L, d_model]; state: :class:`MambaState`.

    A one-token call with a state runs the O(1) recurrent step; longer calls the parallel scan from the
    carried state.
    """

    def __init__(self, d_model: int, cfg: MambaMixerConfig | None = None) -> None:
        cfg = cfg if cfg is not None else MambaMixerConfig()
        cfg.check(d_model)
        super().__init__(d_model, cfg)
        self.d_state = cfg.d_state
        self.d_inner = cfg.expand * d_model
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=cfg.bias)
        self.conv = CausalDepthwiseConv1d(self.d_inner, cfg.d_conv, bias=cfg.conv_bias, activation="silu")
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        self.reset_ssm_parameters()

    def reset_special_parameters(self) -> None:
        """The reference init: torch defaults for in_proj / x_proj, and the SSM's own (dt, A, D)."""
        self.in_proj.reset_parameters()
        self.x_proj.reset_parameters()
        if self.in_proj.bias is not None:
            nn.init.zeros_(self.in_proj.bias)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """dt_proj, A_log and D as in the reference (Gu & Dao 2023)."""
        cfg = self.cfg
        std = self.dt_rank**-0.5 * cfg.dt_scale
        with torch.no_grad():
            if cfg.dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            u = torch.rand(self.d_inner)
            dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            # softplus(bias) == dt: inverse softplus is dt + log(1 - exp(-dt)).
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # A = -exp(A_log) = -(1, 2, ..., N) for every channel: a spread of time scales.
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
            self.D.fill_(1.0)

    def state_size(self, seq_len: int) -> int:
        return self.d_inner * (self.d_state + self.conv.state_len)

    def initial_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``batch`` rows (nothing seen yet)."""
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.A_log.dtype
        conv = self.conv.initial_state(batch, device=device, dtype=dtype)
        return MambaState(conv, torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype))

    def _ssm_params(self, x_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_c: [..., d_inner] -> delta [..., d_inner], B [..., N], C [..., N]."""
        dt, B, C = self.x_proj(x_c).split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(
        self, x: torch.Tensor, state: MambaState | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, MambaState | None, None]:
        """x: [B, L, d_model]; state: the state after earlier tokens (None = start of sequence).
        Returns (y [B, L, d_model], the state after x (None unless a state or use_cache), None)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch, length, {self.d_model}]")
        keep = use_cache or state is not None
        if x.shape[1] == 1 and state is not None:
            y, new_state = self.step(x[:, 0], state)
            return y.unsqueeze(1), new_state, None
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        x_c, conv_state = self.conv(x_in, state.conv if state is not None else None, return_state=True)
        delta, B, C = self._ssm_params(x_c)
        A = -torch.exp(self.A_log.float())
        scan_fn = selective_scan if self.cfg.scan == "fast" else selective_scan_reference
        h0 = state.ssm if state is not None else None
        y, last = scan_fn(x_c, delta, A, B, C, self.D, h0=h0, return_last_state=True)
        out = self.out_proj(y * F.silu(z))
        return out, (MambaState(conv_state, last) if keep else None), None

    def step(self, x_t: torch.Tensor, state: MambaState | None) -> tuple[torch.Tensor, MambaState]:
        """One token in O(1): x_t [B, d_model], state (or None) -> (y_t [B, d_model], new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0], x_t.device, x_t.dtype)
        x_in, z = self.in_proj(x_t).chunk(2, dim=-1)
        x_c, conv_state = self.conv.step(x_in, state.conv)
        delta, B, C = self._ssm_params(x_c)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_scan_step(x_c, delta, A, B, C, self.D, state.ssm)
        return self.out_proj(y * F.silu(z)), MambaState(conv_state, ssm_state)
