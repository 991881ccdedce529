"""RMSNorm, LayerNorm and make_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.modules.norms import LayerNorm, RMSNorm, make_norm


def test_rmsnorm_output_has_unit_rms_and_is_scaled_by_weight():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = 5.0 * torch.randn(3, 7, 16) + 2.0
    y = norm(x)
    assert y.shape == x.shape
    rms = y.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(3, 7), atol=1e-5, rtol=0)
    # Direction is kept: y is a positive multiple of x.
    torch.testing.assert_close(y, x / x.pow(2).mean(-1, keepdim=True).sqrt(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(16.0))
    torch.testing.assert_close(norm(x), y * torch.arange(16.0), atol=1e-5, rtol=1e-5)


def test_rmsnorm_zero_input_gives_zero_not_nan():
    y = RMSNorm(8)(torch.zeros(2, 8))
    assert torch.equal(y, torch.zeros(2, 8))


def test_rmsnorm_bf16_input_uses_fp32_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 64).to(torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    # Exactly the fp32 computation on the same bf16 values, rounded once at the end.
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    assert torch.equal(y, expected)


def test_rmsnorm_fp16_large_values_do_not_overflow():
    # 1000**2 = 1e6 overflows fp16 (max 65504); fp32 statistics keep the result exact.
    x = torch.full((2, 8), 1000.0, dtype=torch.float16)
    y = RMSNorm(8).to(torch.float16)(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.ones(2, 8, dtype=torch.float16))


def test_layernorm_zero_mean_unit_variance_and_matches_functional():
    torch.manual_seed(0)
    norm = LayerNorm(32)
    x = 3.0 * torch.randn(5, 32) - 1.0
    y = norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    torch.testing.assert_close(norm(x), F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5))


def test_layernorm_without_bias_has_no_bias_parameter():
    norm = LayerNorm(8, bias=False)
    assert norm.bias is None
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_make_norm_kinds_and_error():
    assert isinstance(make_norm("rmsnorm", 4), RMSNorm)
    layer_norm = make_norm("layernorm", 4)
    assert isinstance(layer_norm, LayerNorm) and layer_norm.normalized_shape == (4,)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        make_norm("batchnorm", 4)


def test_gated_rmsnorm_equals_rmsnorm_times_silu_gate_in_values_and_gradients():
    from hierseq.modules.norms import GatedRMSNorm

    torch.manual_seed(0)
    fused, plain = GatedRMSNorm(8), RMSNorm(8)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(fused.weight)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    fused.double(), plain.double()
    y, y_ref = fused(x, gate), plain(x) * F.silu(gate)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.forward_reference(x, gate), y_ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y * weights).sum(), (x, gate, fused.weight))
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), (x, gate, plain.weight))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
