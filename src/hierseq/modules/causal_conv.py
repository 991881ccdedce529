"""Causal depthwise 1-D convolution with a recurrent step API (the short conv in front of Mamba's SSM,
and MAHA's dilated conv).

Full-sequence path: left-pad by ``(kernel_size - 1) * dilation`` and sum K shifted multiply-adds, so
output t sees inputs t - (kernel_size - 1) * dilation, ..., t - dilation, t only. ``forward_reference``
computes the same with one grouped ``F.conv1d``; on CPU the backward of that grouped conv is ~30x
slower at thousands of channels (18 s vs 0.6 s at [1, 1024, 3072]), so the shifted form is the one
models run; a test keeps the two equal. The shifted form has its own backward
(:class:`_ShiftedDepthwiseConv`): K in-place multiply-adds into one gradient buffer instead of
autograd's zero-filled buffer per shifted slice, and nothing saved but the input and the state.
``activation="silu"`` applies SiLU inside (the front end of Mamba and the delta-rule mixers), which
backward recomputes from the input instead of storing the pre-activation.

Generation path: keep the last ``(kernel_size - 1) * dilation`` inputs as the state and compute one
output per call, which gives exactly the same numbers as the full pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


ACTIVATIONS = ("none", "silu")


def _padded(x: torch.Tensor, state: torch.Tensor | None, state_len: int) -> torch.Tensor:
    """x: [B, L, C] with the state_len preceding inputs (state [B, C, state_len], or zeros) prepended."""
    if state is None:
        return F.pad(x, (0, 0, state_len, 0))
    return torch.cat((state.transpose(1, 2).to(x.dtype), x), dim=1)


def _shifted_sum(padded: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """sum_k padded[:, t + k d] * taps[:, k] (+ bias): K whole-tensor fused multiply-adds."""
    kernel = taps.shape[1]
    length = padded.shape[1] - (kernel - 1) * dilation
    y = padded[:, :length] * taps[:, 0]
    for k in range(1, kernel):
        y.addcmul_(padded[:, k * dilation : k * dilation + length], taps[:, k])
    if bias is not None:
        y.add_(bias)
    return y


def _grad_input(grad_y: torch.Tensor, taps: torch.Tensor, dilation: int) -> torch.Tensor:
    """d loss / d x for y = _shifted_sum(padded(x)): x[:, i] feeds y[:, i + s] through the tap k with
    shift s = (K - 1 - k) d. grad_y: [B, L, C], taps: [C, K] -> [B, L, C]; the last tap (shift 0)
    writes the buffer, so no zero fill."""
    kernel, length = taps.shape[1], grad_y.shape[1]
    grad_x = grad_y * taps[:, kernel - 1]
    for k in range(kernel - 1):
        shift = (kernel - 1 - k) * dilation
        if shift < length:
            grad_x[:, : length - shift].addcmul_(grad_y[:, shift:], taps[:, k])
    return grad_x


def _grad_state(grad_y: torch.Tensor, taps: torch.Tensor, dilation: int) -> torch.Tensor:
    """d loss / d state [B, S, C] (time-major, S = (K - 1) d): padded position j < S feeds y[:, j - k d]
    through tap k. Touches only the first S outputs' gradients."""
    kernel, length = taps.shape[1], grad_y.shape[1]
    state_len = (kernel - 1) * dilation
    grad = grad_y.new_zeros(grad_y.shape[0], state_len, grad_y.shape[2])
    for k in range(kernel - 1):
        n = min(state_len - k * dilation, length)
        if n > 0:
            grad[:, k * dilation : k * dilation + n].addcmul_(grad_y[:, :n], taps[:, k])
    return grad


class _ShiftedDepthwiseConv(torch.autograd.Function):
    """y[:, t] = act(sum_k padded[:, t + k d] * taps[:, k] + bias), padded = the state then x.

    x: [B, L, C]; state: [B, C, (K-1) d] or None (zeros); taps: [C, K]; bias: [C] or None; d: the
    dilation; silu: whether act is SiLU (else the identity) -> y: [B, L, C]. Saves x and the state as
    given (no padded copy) and rebuilds the padding, and the pre-activation, in backward: a SiLU after
    the conv then costs no stored activation of its own."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        state: torch.Tensor | None,
        taps: torch.Tensor,
        bias: torch.Tensor | None,
        dilation: int,
        silu: bool,
    ) -> torch.Tensor:
        ctx.state_len = (taps.shape[1] - 1) * dilation
        y = _shifted_sum(_padded(x, state, ctx.state_len), taps, bias, dilation)
        ctx.save_for_backward(x, state, taps, bias)
        ctx.dilation, ctx.silu = dilation, silu
        return F.silu(y, inplace=True) if silu else y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, state, taps, bias = ctx.saved_tensors
        kernel, d = taps.shape[1], ctx.dilation
        length = grad_y.shape[1]
        padded = _padded(x, state, ctx.state_len) if ctx.silu or ctx.needs_input_grad[2] else None
        if ctx.silu:  # one fused kernel for grad * silu'(pre), with pre rebuilt from the saved input
            grad_y = torch.ops.aten.silu_backward(grad_y, _shifted_sum(padded, taps, bias, d))
        grad_x = grad_state = grad_taps = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad_y, taps, d)
        if state is not None and ctx.needs_input_grad[1]:
            grad_state = _grad_state(grad_y, taps, d).transpose(1, 2).to(state.dtype)
        if ctx.needs_input_grad[2]:
            grad_taps = torch.stack(
                [(grad_y * padded[:, k * d : k * d + length]).sum((0, 1)) for k in range(kernel)], dim=1
            )
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum((0, 1))
        return grad_x, grad_state, grad_taps, grad_bias, None, None


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise (one filter per channel) causal convolution. x: [B, L, C] -> [B, L, C].

    Parameters have the shapes of ``nn.Conv1d(C, C, K, groups=C)``: ``weight`` [C, 1, K], ``bias`` [C],
    so weights can be copied to and from a grouped ``nn.Conv1d`` one to one.

    ``dilation`` d spaces the taps: output t sees inputs t - (K - 1) d, ..., t - d, t.
    State: [B, C, (K - 1) d], the last (K - 1) d inputs in time order (oldest first), zeros before the
    start. :meth:`centred` is the same filter centred on t (K odd), for non-causal encoders.
    """

    def __init__(
        self, channels: int, kernel_size: int, bias: bool = True, dilation: int = 1, activation: str = "none"
    ) -> None:
        super().__init__()
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        _check_positive_int("dilation", dilation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: must be one of {list(ACTIVATIONS)}")
        self.activation = activation
        self.channels = channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Conv1d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = K here.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def state_len(self) -> int:
        """Number of past inputs the layer remembers: (kernel_size - 1) * dilation."""
        return (self.kernel_size - 1) * self.dilation

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"bias={self.bias is not None}" + (f", activation={self.activation}" if self.activation != "none" else "")
        )

    def initial_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Zero state [batch, C, (K - 1) d] (nothing seen yet); device/dtype default to the weight's."""
        _check_positive_int("batch", batch)
        return torch.zeros(
            batch,
            self.channels,
            self.state_len,
            device=device if device is not None else self.weight.device,
            dtype=dtype if dtype is not None else self.weight.dtype,
        )

    def _check_state(self, state: torch.Tensor, batch: int) -> None:
        expected = (batch, self.channels, self.state_len)
        if state.dim() != 3 or tuple(state.shape) != expected:
            raise ValueError(f"state shape {tuple(state.shape)}: expected [B, C, state_len] = {list(expected)}")

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Convolve a whole sequence.

        x: [B, L, C]; state: optional [B, C, state_len] inputs that precede x (from ``initial_state``, a
        previous ``forward(..., return_state=True)`` or ``step``); None means zeros.
        Returns y: [B, L, C], and with ``return_state`` also the new state [B, C, state_len] (the last state_len
        inputs, including those from ``state`` when L < state_len) to continue with ``step`` or ``forward``.
        """
        if x.dim() != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x shape {tuple(x.shape)}: expected [B, L, C] with C={self.channels}")
        if state is not None:
            self._check_state(state, x.shape[0])
        taps = self.weight[:, 0, :]  # [C, K]; tap K-1 multiplies the current input
        y = _ShiftedDepthwiseConv.apply(x, state, taps, self.bias, self.dilation, self.activation == "silu")
        if not return_state:
            return y
        return y, self._next_state(x, state)

    def _next_state(self, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The last state_len inputs after x [B, L, C] (from ``state`` too when L < state_len): [B, C, state_len]."""
        if x.shape[1] >= self.state_len:  # slice by start index: for K = 1, [-0:] would keep everything
            return x[:, x.shape[1] - self.state_len :].transpose(1, 2)
        padded = _padded(x, state, self.state_len)
        return padded[:, padded.shape[1] - self.state_len :].transpose(1, 2)

    def forward_reference(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The definition, as one grouped ``F.conv1d``: x [B, L, C] -> y [B, L, C] (same as ``forward``)."""
        if state is not None:
            self._check_state(state, x.shape[0])
        padded = _padded(x, state, self.state_len).transpose(1, 2)  # [B, C, K-1+L]: conv1d wants channels first
        y = F.conv1d(padded, self.weight, self.bias, dilation=self.dilation, groups=self.channels).transpose(1, 2)
        return F.silu(y) if self.activation == "silu" else y

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """The filter centred on each position (zeros past both ends). x: [B, L, C] -> [B, L, C]; the same
        as ``F.conv1d`` with padding (K - 1) d / 2. Needs (K - 1) d even (K odd, or d even): otherwise
        the taps have no centre (ValueError).

        A causal conv over x with (K - 1) d / 2 zeros appended, read (K - 1) d / 2 steps later."""
        if self.state_len % 2:
            raise ValueError(
                f"centred: (kernel_size - 1) * dilation = ({self.kernel_size} - 1) * {self.dilation} is odd, "
                "so the taps have no centre; use an odd kernel_size or an even dilation"
            )
        half = self.state_len // 2
        return self.forward(F.pad(x, (0, 0, 0, half)))[:, half:]

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation step. x_t: [B, C], state: [B, C, (K-1) d] -> (y_t [B, C], new state, same shape)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.channels:
            raise ValueError(f"x_t shape {tuple(x_t.shape)}: expected [B, C] with C={self.channels}")
        self._check_state(state, x_t.shape[0])
        window = torch.cat((state.to(x_t.dtype), x_t.unsqueeze(-1)), dim=-1)  # [B, C, (K-1) d + 1], oldest first
        # conv1d is a cross-correlation: y_t = sum_k weight[c, 0, k] * window[c, k d].
        y_t = (window[..., :: self.dilation] * self.weight.squeeze(1)).sum(-1)
        if self.bias is not None:
            y_t = y_t + self.bias
        return (F.silu(y_t) if self.activation == "silu" else y_t), window[..., 1:]
