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

Decoding state per mixer: (conv_state [B, d_inner, d_conv - 1], ssm_state [B, d_inner, N]): O(1) in
the sequence length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import CausalDepthwiseConv1d
from .selective_scan import selective_scan, selective_scan_reference, selective_scan_step


class MambaState(NamedTuple):
    """Recurrent state of one mixer. conv: [B, d_inner, d_conv - 1]; ssm: [B, d_inner, d_state]."""

    conv: torch.Tensor
    ssm: torch.Tensor


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


class MambaMixer(nn.Module):
    """Selective SSM mixer. x: [B, L, d_model] -> [B, L, d_model].

    ``scan="fast"`` uses the parallel in-place scan (training, prefill); ``"reference"`` the sequential
    loop (slow; for checking). ``dt_rank=0`` means ceil(d_model / 16).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        scan: str = "fast",
    ) -> None:
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("d_state", d_state)
        _check_int("d_conv", d_conv)
        _check_int("expand", expand)
        _check_int("dt_rank", dt_rank, minimum=0)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min={dt_min!r}: must satisfy 0 < dt_min <= dt_max={dt_max!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init={dt_init!r}: must be one of ['random', 'constant']")
        if not dt_scale > 0:
            raise ValueError(f"dt_scale={dt_scale!r}: must be > 0")
        if scan not in ("fast", "reference"):
            raise ValueError(f"scan={scan!r}: must be one of ['fast', 'reference']")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan = scan

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv = CausalDepthwiseConv1d(self.d_inner, d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._dt_init = (dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """The reference SSM initialisation (dt_proj, A_log, D); linear layers keep torch defaults."""
        dt_min, dt_max, dt_init, dt_scale, floor = self._dt_init
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            u = torch.rand(self.d_inner)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
            # softplus(bias) == dt: inverse softplus is dt + log(1 - exp(-dt)).
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # A = -exp(A_log) = -(1, 2, ..., N) for every channel: a spread of time scales.
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
            self.D.fill_(1.0)

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
        self, x: torch.Tensor, state: MambaState | None = None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MambaState]:
        """x: [B, L, d_model]; state: the state after earlier tokens (None = start of sequence).
        Returns y [B, L, d_model] and, with ``return_state``, the state after x."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch, length, {self.d_model}]")
        if x.shape[1] == 1 and state is not None:
            y, new_state = self.step(x[:, 0], state)
            y = y.unsqueeze(1)
            return (y, new_state) if return_state else y
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        conv_out = self.conv(x_in, state.conv if state is not None else None, return_state=return_state)
        if return_state:
            conv_out, conv_state = conv_out
        x_c = F.silu(conv_out)
        delta, B, C = self._ssm_params(x_c)
        A = -torch.exp(self.A_log.float())
        scan_fn = selective_scan if self.scan == "fast" else selective_scan_reference
        h0 = state.ssm if state is not None else None
        y, last = scan_fn(x_c, delta, A, B, C, self.D, h0=h0, return_last_state=True)
        out = self.out_proj(y * F.silu(z))
        return (out, MambaState(conv_state, last)) if return_state else out

    def step(self, x_t: torch.Tensor, state: MambaState | None) -> tuple[torch.Tensor, MambaState]:
        """One token in O(1): x_t [B, d_model], state (or None) -> (y_t [B, d_model], new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0], x_t.device, x_t.dtype)
        x_in, z = self.in_proj(x_t).chunk(2, dim=-1)
        conv_out, conv_state = self.conv.step(x_in, state.conv)
        x_c = F.silu(conv_out)
        delta, B, C = self._ssm_params(x_c)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_scan_step(x_c, delta, A, B, C, self.D, state.ssm)
        return self.out_proj(y * F.silu(z)), MambaState(conv_state, ssm_state)
