"""GELUMLP, SwiGLU, swiglu_hidden and make_mlp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hierseq.modules.mlp import GELUMLP, SwiGLU, make_mlp, swiglu_hidden


def test_swiglu_hidden_rounds_up_to_multiple():
    assert swiglu_hidden(64) == 192  # int(64 * 8 / 3) = 170 -> 192
    assert swiglu_hidden(96) == 256  # 256 exactly
    assert swiglu_hidden(10, multiple_of=8) == 32  # 26 -> 32


def test_gelu_mlp_shape_and_formula():
    torch.manual_seed(0)
    mlp = GELUMLP(12).eval()
    assert mlp.fc_in.out_features == 48
    x = torch.randn(2, 3, 5, 12)
    y = mlp(x)
    assert y.shape == x.shape
    expected = F.gelu(x @ mlp.fc_in.weight.T + mlp.fc_in.bias) @ mlp.out_proj.weight.T + mlp.out_proj.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_swiglu_shape_and_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(16, hidden=24).eval()
    x = torch.randn(3, 7, 16)
    y = mlp(x)
    assert y.shape == x.shape
    w_gate, w_up = mlp.gate_up.weight[:24], mlp.gate_up.weight[24:]
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.out_proj.weight.T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert SwiGLU(64).hidden == swiglu_hidden(64)


def test_dropout_is_identity_in_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for mlp in (SwiGLU(8, dropout=0.5), GELUMLP(8, dropout=0.5)):
        mlp.eval()
        assert torch.equal(mlp(x), mlp(x))


def test_make_mlp_kinds_and_error():
    swiglu = make_mlp("swiglu", 8, hidden=40)
    assert isinstance(swiglu, SwiGLU) and swiglu.hidden == 40
    gelu = make_mlp("gelu", 8)
    assert isinstance(gelu, GELUMLP) and gelu.fc_in.out_features == 32
    with pytest.raises(ValueError, match="mlp='relu'"):
        make_mlp("relu", 8)
