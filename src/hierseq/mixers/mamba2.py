"""The Mamba-2 mixer (Dao & Gu 2024): one projection, a causal conv, the SSD scan, a gated RMSNorm.

x: [B, L, d_model] -> [B, L, d_model], with d_inner = expand * d_model = H * P (H heads of headdim P),
G groups of B / C (G divides H) and state size N::

    z, xBC, dt = in_proj(x) split (d_inner, d_inner + 2 G N, H)
    xBC        = silu(conv1d_causal(xBC))                       # short local mixing
    x, B, C    = xBC split (d_inner -> [H, P], G N -> [G, N], G N -> [G, N])
    dt         = softplus(dt + dt_bias)                         # [B, L, H]: one step size per head
    y          = ssd(x, dt, A = -exp(A_log), B, C) + D x        # [B, L, H, P], ops/ssd.py
    out        = out_proj(rmsnorm_G(y * silu(z)) * norm_weight)

Unlike Mamba, the decay exp(dt A) is one scalar per head, which makes the scan a chunked matmul form
(:func:`~hierseq.ops.ssd.ssd_chunked`). The gated RMSNorm normalises each group's d_inner / G channels
on its own (the reference's ``group_size``; over all of d_inner when G = 1), after the gate (the
reference's ``norm_before_gate=False``).

Training memory: the conv applies its SiLU inside (``activation="silu"``, recomputed in backward), the
SSD keeps one state per chunk, and the gate, norm and out_proj are one function that keeps only y, z and
the inverse RMS; at 16k tokens the 4-layer d_model-256 LM then peaks at ~1.2 GB in training.

Initialisation follows the reference: dt_bias = inverse softplus of dt drawn log-uniformly in
[dt_min, dt_max] (floored at dt_init_floor), A_log = log of A drawn uniformly in [a_min, a_max] per head,
D = 1, norm weight 1; in_proj keeps torch's default init (undone by the shell's generic init, so
:meth:`Mamba2.reset_special_parameters` restores it, as the Mamba mixer does); out_proj is the residual
projection the shell scales by depth.

Decoding state per mixer: :class:`Mamba2State` (conv [B, d_inner + 2 G N, d_conv - 1], ssm [B, H, P, N]):
O(1) in the sequence length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_divisible
from ..modules.causal_conv import CausalDepthwiseConv1d
from ..modules.state import LayerState
from ..ops.ssd import ssd_chunked, ssd_reference, ssd_step
from .base import Mixer, MixerConfig, init_decay_rates, register_mixer

KERNELS = ("chunked", "reference")
_NORM_EPS = 1e-5


@dataclasses.dataclass
class Mamba2State(LayerState):
    """Recurrent state of one mixer. conv: [B, d_inner + 2 G N, d_conv - 1]; ssm: [B, H, P, N]."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclasses.dataclass
class Mamba2MixerConfig(MixerConfig):
    """SSD options. d_state: N; headdim: P (d_inner = expand * d_model must be a multiple of it); ngroups:
    groups of heads sharing B and C (must divide the head count); chunk_size: block of the chunked scan
    (speed and memory only, not the result); dt_min / dt_max / dt_init_floor: the dt_bias init;
    a_min / a_max: the range A = -exp(A_log) is drawn from; kernel: "chunked" (training and prefill) or
    "reference" (the loop over time, for checking only)."""

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_min: float = 1.0
    a_max: float = 16.0
    kernel: str = "chunked"

    positive_ints = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
    positive_floats = ("dt_min", "dt_max", "dt_init_floor", "a_min", "a_max")
    ordered = (("dt_min", "dt_max"), ("a_min", "a_max"))

    def check(self, d_model: int) -> None:
        super().check(d_model)
        check_divisible("d_inner", self.expand * d_model, "headdim", self.headdim)
        check_divisible("n_heads", self.expand * d_model // self.headdim, "ngroups", self.ngroups)
        check_choice("kernel", self.kernel, KERNELS)


def _group_dot(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_s t[..., g, s] w[g, s]: [..., G, S] x [G, S] -> [..., G], one matrix-vector product per group
    (a broadcast product would allocate a tensor of t's size)."""
    return torch.stack([t[..., g, :] @ w[g] for g in range(w.shape[0])], dim=-1)


class _GatedNormOutFn(torch.autograd.Function):
    """out_proj(rmsnorm_G(y * silu(z)) * norm_weight): y, z [..., G, S] (S = d_inner / G), norm_weight
    [G, S], out_weight [d_model, G S] -> [..., d_model].

    One function so that backward keeps only y, z and the [..., G] inverse RMS, and recomputes the rest:
    autograd through the pieces would also keep silu(z), the gated and the normalised products and
    out_proj's input (four more [B, L, d_inner] tensors per layer); at long lengths training memory is
    mostly such activations. Backward works in four reused buffers for the same reason."""

    @staticmethod
    def forward(ctx: Any, y, z, norm_weight, out_weight):  # type: ignore[override]
        gated = F.silu(z).mul_(y)
        inv_rms = torch.rsqrt(_rowdot_last(gated).div_(y.shape[-1]).add_(_NORM_EPS)).unsqueeze(-1)
        ctx.save_for_backward(y, z, norm_weight, out_weight, inv_rms)
        return F.linear(gated.mul_(inv_rms).mul_(norm_weight).flatten(-2), out_weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        y, z, norm_weight, out_weight, inv_rms = ctx.saved_tensors
        grad = (grad_out @ out_weight).view(y.shape)  # d(normed * norm_weight)
        sig = torch.sigmoid(z)
        normed = torch.mul(z, sig).mul_(y).mul_(inv_rms)  # the unit-RMS gated product
        # out_proj's input is normed * norm_weight: scale the columns after the product, not before.
        grad_out_weight = (grad_out.flatten(0, -2).T @ normed.flatten(0, -3).flatten(-2)).mul_(norm_weight.flatten())
        prod = grad * normed
        grad_norm_weight = prod.flatten(0, -3).sum(0)
        # d/dg of normed = g * inv_rms(g), per group: (dn - normed * mean(dn * normed)) * inv_rms.
        mean = _group_dot(prod, norm_weight).div_(y.shape[-1]).unsqueeze(-1)
        grad.mul_(norm_weight).sub_(normed.mul_(mean)).mul_(inv_rms)  # now d(y * silu(z))
        grad_y = torch.mul(z, sig, out=prod).mul_(grad)
        # silu'(z) = sig (1 + z - z sig), built in the normed buffer.
        grad_z = torch.mul(z, sig, out=normed).neg_().add_(z).add_(1.0).mul_(sig).mul_(y).mul_(grad)
        return grad_y, grad_z, grad_norm_weight, grad_out_weight


def _rowdot_last(t: torch.Tensor) -> torch.Tensor:
    """sum(t * t, -1) as a batched matmul (no product tensor of t's size): [..., S] -> [...]."""
    return (t.unsqueeze(-2) @ t.unsqueeze(-1)).squeeze(-1).squeeze(-1)


@register_mixer("mamba2", config=Mamba2MixerConfig)
class Mamba2(Mixer):
    """SSD mixer. x: [B, L, d_model] -> [B, L, d_model]; state: :class:`Mamba2State`.

    A one-token call with a state runs the O(1) recurrent step; longer calls (prefill, continuation) the
    chunked scan from the carried state.
    """

    def __init__(self, d_model: int, cfg: Mamba2MixerConfig | None = None) -> None:
        cfg = cfg if cfg is not None else Mamba2MixerConfig()
        cfg.check(d_model)
        super().__init__(d_model, cfg)
        self.d_inner = cfg.expand * d_model
        self.headdim, self.d_state, self.ngroups = cfg.headdim, cfg.d_state, cfg.ngroups
        self.n_heads = self.d_inner // cfg.headdim
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv = CausalDepthwiseConv1d(self.conv_dim, cfg.d_conv, activation="silu")
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """The reference init: torch's default for in_proj, then dt_bias, A_log, D and the norm weight."""
        cfg = self.cfg
        self.in_proj.reset_parameters()
        init_decay_rates(self.A_log, self.dt_bias, (cfg.a_min, cfg.a_max), (cfg.dt_min, cfg.dt_max), cfg.dt_init_floor)
        with torch.no_grad():
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def state_size(self, seq_len: int) -> int:
        """The conv window plus one [P, N] state per head, whatever the length."""
        return self.conv.channels * self.conv.state_len + self.n_heads * self.headdim * self.d_state

    def initial_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        """Zero state for ``batch`` rows (nothing seen yet)."""
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.A_log.dtype
        conv = self.conv.initial_state(batch, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype)
        return Mamba2State(conv, ssm)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [..., d_model] -> z [..., d_inner], xBC [..., conv_dim], dt (before softplus) [..., H].

        Three products with row blocks of in_proj.weight rather than one split: z is then a tensor of its
        own (the gate keeps it for backward; a view would keep the whole joint output alive), and backward
        adds three [..., d_model] input gradients instead of concatenating [..., 2 d_inner + ...] ones."""
        z_rows, xbc_rows = self.d_inner, self.d_inner + self.conv_dim
        weight = self.in_proj.weight
        return F.linear(x, weight[:z_rows]), F.linear(x, weight[z_rows:xbc_rows]), F.linear(x, weight[xbc_rows:])

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xBC after the conv and SiLU [..., conv_dim] -> x [..., H, P], B, C [..., G, N]."""
        groups_width = self.ngroups * self.d_state
        x, B, C = xbc.split((self.d_inner, groups_width, groups_width), dim=-1)
        group_shape = (self.ngroups, self.d_state)
        return x.unflatten(-1, (self.n_heads, self.headdim)), B.unflatten(-1, group_shape), C.unflatten(-1, group_shape)

    def _gate_and_project(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: [..., d_inner] -> out_proj(rmsnorm_G(y * silu(z)) * norm_weight): [..., d_model]."""
        group_shape = (self.ngroups, self.d_inner // self.ngroups)
        return _GatedNormOutFn.apply(
            y.unflatten(-1, group_shape),
            z.unflatten(-1, group_shape),
            self.norm_weight.view(group_shape),
            self.out_proj.weight,
        )

    def forward(
        self, x: torch.Tensor, state: Mamba2State | None = None, use_cache: bool = False, need_aux: bool = False
    ) -> tuple[torch.Tensor, Mamba2State | None, None]:
        """x: [B, L, d_model]; state: the state after earlier tokens (None = start of sequence).
        Returns (y [B, L, d_model], the state after x (None unless a state or use_cache), None)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: shape={tuple(x.shape)}: must be [batch, length, {self.d_model}]")
        keep = use_cache or state is not None
        if x.shape[1] == 1 and state is not None:
            y, new_state = self.step(x[:, 0], state)
            return y.unsqueeze(1), new_state, None
        z, xbc, dt = self._project(x)
        xbc, conv_state = self.conv(xbc, state.conv if state is not None else None, return_state=True)
        xs, B, C = self._split(xbc)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        h0 = state.ssm if state is not None else None
        if self.cfg.kernel == "chunked":
            y, last = ssd_chunked(xs, dt, A, B, C, self.D, h0, chunk_size=self.cfg.chunk_size)
        else:
            y, last = ssd_reference(xs, dt, A, B, C, self.D, h0)
        out = self._gate_and_project(y.flatten(-2), z)
        return out, (Mamba2State(conv_state, last) if keep else None), None

    def step(self, x_t: torch.Tensor, state: Mamba2State | None) -> tuple[torch.Tensor, Mamba2State]:
        """One token in O(1): x_t [B, d_model], state (or None) -> (y_t [B, d_model], new state)."""
        if state is None:
            state = self.initial_state(x_t.shape[0], x_t.device, x_t.dtype)
        z, xbc, dt = self._project(x_t)
        xbc, conv_state = self.conv.step(xbc, state.conv)
        xs, B, C = self._split(xbc)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ssd_step(xs, dt, A, B, C, self.D, state.ssm)
        return self._gate_and_project(y.flatten(-2), z), Mamba2State(conv_state, ssm_state)
