"""CausalDepthwiseConv1d: definition, causality, and step / prefill state equal to the full pass; the same
with ``dilation=`` (against grouped F.conv1d, values and gradients), and ``centred`` against a padded F.conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hierseq.modules.causal_conv import ACTIVATIONS, CausalDepthwiseConv1d

ATOL = 1e-6


def make_layer_and_input(channels=5, kernel_size=4, length=12, batch=2, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = CausalDepthwiseConv1d(channels, kernel_size, bias=bias)
    x = torch.randn(batch, length, channels)
    return layer, x


def hand_conv(layer: CausalDepthwiseConv1d, x: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = bias[c] + sum_k weight[c, 0, k] * x[b, t - (K - 1) + k, c], zero before t = 0."""
    batch, length, channels = x.shape
    kernel = layer.kernel_size
    y = torch.zeros_like(x)
    for t in range(length):
        for k in range(kernel):
            source = t - (kernel - 1) + k
            if source >= 0:
                y[:, t] += layer.weight[:, 0, k] * x[:, source]
    if layer.bias is not None:
        y += layer.bias
    return y


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_hand_definition(kernel_size, bias):
    layer, x = make_layer_and_input(kernel_size=kernel_size, bias=bias)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, hand_conv(layer, x), atol=ATOL, rtol=0)


def test_matches_nn_conv1d_with_left_padding_and_shares_its_parameter_shapes():
    layer, x = make_layer_and_input(channels=6, kernel_size=3)
    reference = nn.Conv1d(6, 6, 3, groups=6, padding=2)
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        # Symmetric padding then dropping the last K - 1 outputs is the usual causal conv.
        expected = reference(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_causal_perturbing_t_leaves_earlier_outputs_unchanged():
    layer, x = make_layer_and_input(kernel_size=4, length=16)
    t = 9
    perturbed = x.clone()
    perturbed[:, t] += 10.0
    with torch.no_grad():
        y, y_perturbed = layer(x), layer(perturbed)
    torch.testing.assert_close(y_perturbed[:, :t], y[:, :t], atol=0, rtol=0)
    # Outputs t .. t + K - 1 see the change, later ones do not.
    assert (y_perturbed[:, t : t + 4] - y[:, t : t + 4]).abs().amax(dim=(0, 2)).min() > 1e-3
    torch.testing.assert_close(y_perturbed[:, t + 4 :], y[:, t + 4 :], atol=0, rtol=0)


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_step_by_step_equals_full_forward(kernel_size):
    layer, x = make_layer_and_input(kernel_size=kernel_size, length=10)
    with torch.no_grad():
        full = layer(x)
        state = layer.initial_state(x.shape[0])
        assert state.shape == (2, 5, kernel_size - 1)
        assert not state.any()
        outputs = []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            assert y_t.shape == (2, 5)
            outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefill_len", [1, 2, 3, 7])
def test_prefill_state_then_steps_equals_full_forward(prefill_len):
    # prefill_len < K - 1 = 3 exercises the zero-padded state.
    layer, x = make_layer_and_input(kernel_size=4, length=11)
    with torch.no_grad():
        full = layer(x)
        prefill_out, state = layer(x[:, :prefill_len], return_state=True)
        outputs = [prefill_out]
        for t in range(prefill_len, x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            outputs.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=ATOL, rtol=0)


def test_returned_state_is_last_inputs_zero_padded():
    layer, x = make_layer_and_input(channels=3, kernel_size=4, length=2, batch=1)
    with torch.no_grad():
        _, state = layer(x, return_state=True)
    expected = torch.cat((torch.zeros(1, 3, 1), x.transpose(1, 2)), dim=-1)
    torch.testing.assert_close(state, expected, atol=0, rtol=0)
    layer_k1, x1 = make_layer_and_input(kernel_size=1, length=5)
    _, state_k1 = layer_k1(x1, return_state=True)
    assert state_k1.shape == (2, 5, 0)


def test_chunked_forward_with_state_equals_full_forward():
    layer, x = make_layer_and_input(kernel_size=4, length=20)
    with torch.no_grad():
        full = layer(x)
        state = layer.initial_state(x.shape[0])
        pieces = []
        for start, stop in ((0, 5), (5, 6), (6, 14), (14, 20)):
            y, state = layer(x[:, start:stop], state=state, return_state=True)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_gradients_flow_to_input_and_parameters():
    layer, x = make_layer_and_input(kernel_size=3, length=6)
    x.requires_grad_(True)
    layer(x)[:, 2].sum().backward()
    # Output 2 depends on inputs 0..2 only.
    assert x.grad[:, :3].abs().sum() > 0
    assert not x.grad[:, 3:].any()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.bias.grad, torch.full((5,), 2.0))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="channels=0"):
        CausalDepthwiseConv1d(0, 3)
    with pytest.raises(ValueError, match="kernel_size=0"):
        CausalDepthwiseConv1d(4, 0)
    with pytest.raises(ValueError, match="kernel_size=2.5"):
        CausalDepthwiseConv1d(4, 2.5)
    with pytest.raises(ValueError, match="channels=True"):
        CausalDepthwiseConv1d(True, 3)
    layer = CausalDepthwiseConv1d(4, 3)
    with pytest.raises(ValueError, match="x shape"):
        layer(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="x shape"):
        layer(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="state shape"):
        layer(torch.zeros(2, 5, 4), state=torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="x_t shape"):
        layer.step(torch.zeros(2, 3), layer.initial_state(2))
    with pytest.raises(ValueError, match="state shape"):
        layer.step(torch.zeros(2, 4), layer.initial_state(3))


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_shifted_forward_equals_grouped_conv1d_reference_values_and_gradients(kernel_size):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(5, kernel_size)
    x = torch.randn(2, 9, 5, requires_grad=True)
    for state in (None, torch.randn(2, 5, kernel_size - 1, requires_grad=True)):
        y = conv(x, state)
        y_ref = conv.forward_reference(x, state)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        wrt = (x, conv.weight, conv.bias) + ((state,) if state is not None and kernel_size > 1 else ())
        grads = torch.autograd.grad(y.square().sum(), wrt)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), wrt)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_shifted_backward_skips_what_needs_no_gradient():
    # Frozen parameters and a constant input: only the input's gradient, still equal to the reference.
    torch.manual_seed(1)
    conv = CausalDepthwiseConv1d(4, 3).requires_grad_(False)
    x = torch.randn(1, 7, 4, requires_grad=True)
    (g,) = torch.autograd.grad(conv(x).sum(), x)
    (g_ref,) = torch.autograd.grad(conv.forward_reference(x).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    conv.requires_grad_(True)
    y = conv(x.detach())
    y.sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None


# ---------------------------------------------------------------------------------------- dilation
DILATED = [(1, 2), (2, 2), (3, 2), (4, 3), (3, 1), (2, 5)]  # (kernel_size, dilation)


def hand_dilated_conv(layer: CausalDepthwiseConv1d, x: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = bias[c] + sum_k weight[c, 0, k] * x[b, t - (K - 1 - k) d, c], zero before t = 0."""
    kernel, d = layer.kernel_size, layer.dilation
    y = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for k in range(kernel):
            source = t - (kernel - 1 - k) * d
            if source >= 0:
                y[:, t] += layer.weight[:, 0, k] * x[:, source]
    if layer.bias is not None:
        y += layer.bias
    return y


def make_dilated(kernel_size, dilation, channels=5, length=13, batch=2, seed=0):
    torch.manual_seed(seed)
    layer = CausalDepthwiseConv1d(channels, kernel_size, dilation=dilation)
    return layer, torch.randn(batch, length, channels)


@pytest.mark.parametrize(("kernel_size", "dilation"), DILATED)
def test_dilated_forward_matches_hand_definition_and_state_shape(kernel_size, dilation):
    layer, x = make_dilated(kernel_size, dilation)
    assert layer.state_len == (kernel_size - 1) * dilation
    assert layer.initial_state(3).shape == (3, 5, (kernel_size - 1) * dilation)
    assert f"dilation={dilation}" in repr(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hand_dilated_conv(layer, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kernel_size", "dilation"), DILATED)
def test_dilated_forward_equals_grouped_conv1d_reference_values_and_gradients(kernel_size, dilation):
    """forward (the shifted form and its own backward) == forward_reference (grouped F.conv1d with
    dilation), with and without a state, in values and in the gradients of x, weight, bias and state."""
    layer, x = make_dilated(kernel_size, dilation)
    x.requires_grad_(True)
    state_len = (kernel_size - 1) * dilation
    for state in (None, torch.randn(2, 5, state_len, requires_grad=True)):
        y = layer(x, state)
        y_ref = layer.forward_reference(x, state)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        wrt = (x, layer.weight, layer.bias) + ((state,) if state is not None and state_len > 0 else ())
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((y * upstream).sum(), wrt)
        grads_ref = torch.autograd.grad((y_ref * upstream).sum(), wrt)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
        if state is not None and state_len > 0:
            assert grads[-1].abs().sum() > 0  # the state really feeds the first outputs


def test_dilated_conv_alone_is_causal_and_the_centred_conv_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 8, requires_grad=True)
    conv = CausalDepthwiseConv1d(8, 3, dilation=2)
    conv(x)[0, 10].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [6, 8, 10]  # t - 4, t - 2, t: dilation 2, nothing after t
    x.grad = None
    conv.centred(x)[0, 10].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist() == [8, 10, 12]


@pytest.mark.parametrize(("kernel_size", "dilation"), DILATED)
def test_dilated_step_by_step_equals_full_forward(kernel_size, dilation):
    layer, x = make_dilated(kernel_size, dilation)
    with torch.no_grad():
        full = layer(x)
        state = layer.initial_state(x.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            assert state.shape == (2, 5, (kernel_size - 1) * dilation)
            outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kernel_size", "dilation"), DILATED)
@pytest.mark.parametrize("prefill_len", [1, 3, 9])
def test_dilated_prefill_then_steps_and_chunks_equal_full_forward(kernel_size, dilation, prefill_len):
    # prefill_len < (K - 1) d exercises the zero-padded part of the state.
    layer, x = make_dilated(kernel_size, dilation, length=21)
    with torch.no_grad():
        full = layer(x)
        first, state = layer(x[:, :prefill_len], return_state=True)
        pieces = [first]
        for t in range(prefill_len, prefill_len + 3):
            y_t, state = layer.step(x[:, t], state)
            pieces.append(y_t.unsqueeze(1))
        middle, state = layer(x[:, prefill_len + 3 : 17], state=state, return_state=True)
        pieces.append(middle)
        for t in range(17, 21):
            y_t, state = layer.step(x[:, t], state)
            pieces.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    # the state is the last (K - 1) d inputs, oldest first
    n = (kernel_size - 1) * dilation
    torch.testing.assert_close(state, x[:, x.shape[1] - n :].transpose(1, 2), atol=0, rtol=0)


@pytest.mark.parametrize(("kernel_size", "dilation"), [(1, 1), (3, 1), (3, 2), (5, 3), (2, 2), (4, 2)])
def test_centred_equals_centred_conv1d_with_padding(kernel_size, dilation):
    """centred(x) == F.conv1d(x, weight, bias, padding=(K - 1) d / 2, dilation=d, groups=C), values and
    gradients (any (K - 1) d even: odd K, or even K with even dilation)."""
    layer, x = make_dilated(kernel_size, dilation, length=17)
    x.requires_grad_(True)
    y = layer.centred(x)
    pad = (kernel_size - 1) * dilation // 2
    y_ref = F.conv1d(x.transpose(1, 2), layer.weight, layer.bias, padding=pad, dilation=dilation, groups=5)
    y_ref = y_ref.transpose(1, 2)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    wrt = (x, layer.weight, layer.bias)
    grads = torch.autograd.grad((y * upstream).sum(), wrt)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), wrt)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_centred_refuses_a_filter_with_no_centre():
    # (K - 1) d odd: the taps cannot sit symmetrically around t.
    for kernel_size, dilation in ((2, 1), (4, 1), (2, 3)):
        with pytest.raises(ValueError, match="centred"):
            CausalDepthwiseConv1d(4, kernel_size, dilation=dilation).centred(torch.zeros(1, 5, 4))


def test_bad_dilation_raises_value_error():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"dilation={bad!r}"):
            CausalDepthwiseConv1d(4, 3, dilation=bad)


# -------------------------------------------------------------------------------------- activation
@pytest.mark.parametrize(("kernel_size", "dilation"), [(1, 1), (4, 1), (3, 2)])
def test_silu_inside_equals_silu_after_in_values_and_gradients(kernel_size, dilation):
    # The fused SiLU recomputes its pre-activation in backward; it must equal silu(conv(x)) exactly.
    torch.manual_seed(3)
    fused = CausalDepthwiseConv1d(5, kernel_size, dilation=dilation, activation="silu")
    plain = CausalDepthwiseConv1d(5, kernel_size, dilation=dilation)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 11, 5, requires_grad=True)
    state = torch.randn(2, 5, fused.state_len, requires_grad=True)
    for given in (None, state):
        y, y_ref = fused(x, given), F.silu(plain.forward_reference(x, given))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.forward_reference(x, given), y_ref, rtol=1e-5, atol=1e-6)
        wrt = [x, fused.weight, fused.bias] + ([given] if given is not None and fused.state_len else [])
        wrt_ref = [x, plain.weight, plain.bias] + wrt[3:]
        grads = torch.autograd.grad(y.square().sum(), wrt)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), wrt_ref)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # and the recurrent step applies it too
    with torch.no_grad():
        full, carried = fused(x), fused.initial_state(2)
        for t in range(11):
            y_t, carried = fused.step(x[:, t], carried)
            torch.testing.assert_close(y_t, full[:, t], rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation='gelu'"):
        CausalDepthwiseConv1d(4, 3, activation="gelu")


@pytest.mark.parametrize(("kernel_size", "dilation", "length"), [(4, 1, 2), (3, 3, 4), (4, 2, 1), (2, 1, 5)])
def test_backward_with_a_state_longer_than_the_input_equals_the_reference(kernel_size, dilation, length):
    # The input and state gradients are written shift by shift; a state longer than x clips the shifts.
    torch.manual_seed(4)
    for activation in ACTIVATIONS:
        conv = CausalDepthwiseConv1d(3, kernel_size, dilation=dilation, activation=activation)
        x = torch.randn(2, length, 3, requires_grad=True)
        state = torch.randn(2, 3, conv.state_len, requires_grad=True)
        wrt = (x, state, conv.weight, conv.bias)
        grads = torch.autograd.grad(conv(x, state).square().sum(), wrt)
        grads_ref = torch.autograd.grad(conv.forward_reference(x, state).square().sum(), wrt)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
