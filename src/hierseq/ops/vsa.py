"""Vector-symbolic binding: bind a key to a value, superpose many bound pairs, unbind with a key.

Two bindings, both linear in the value and in the memory, so superposition and unbinding commute:

* ``"elementwise"`` (MAP / bipolar binding): ``bind(k, v) = k * v``; ``unbind(m, q) = q * m``.
  For keys with |k_i| = 1 (bipolar or "unitary") unbinding with the same key is exact.
* ``"circular"`` (Plate's Holographic Reduced Representations): ``bind(k, v) = k ⊛ v``, the circular
  convolution ``(k ⊛ v)_i = sum_j k_j v_{(i - j) mod D}``; ``unbind(m, q) = q ⋆ m``, the circular
  correlation ``(q ⋆ m)_i = sum_j q_j m_{(i + j) mod D}``. Both are computed with the real FFT in
  O(D log D); for keys whose spectrum has modulus 1 ("unitary") correlation inverts convolution exactly.

Keys are made from raw projections [..., D] by :func:`make_key`:

* ``"bipolar"``: sign(x) with a straight-through gradient (through tanh), scaled for the binding;
* ``"unitary"``: every coefficient of the binding's transform set to modulus 1 (entries for
  elementwise, Fourier coefficients for circular), a smooth map, so unbind(bind(k, v), k) == v;
* ``"l2"``: x / ||x||, scaled for the binding.

"Scaled for the binding" means the key leaves a value's norm unchanged on average: entries of size 1
(norm sqrt(D)) for elementwise binding, norm 1 (Fourier coefficients of size 1) for circular binding.

Every fast op here has a plain ``*_reference`` next to it written from the definition; the tests check
that they agree.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BINDINGS = ("elementwise", "circular")
KEY_TYPES = ("bipolar", "unitary", "l2")

#: keeps |x| and |FFT(x)| away from zero when dividing by them.
_EPS = 1e-6


def _check_binding(binding: str) -> None:
    if binding not in BINDINGS:
        raise ValueError(f"binding={binding!r}: must be one of {list(BINDINGS)}")


def _check_pair(binding: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> bool:
    """Validate a bind / unbind call; True for the elementwise binding."""
    _check_binding(binding)
    _check_same_last_dim(a, b, a_name, b_name)
    return binding == "elementwise"


def _check_same_last_dim(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} shape {tuple(a.shape)} and {b_name} shape {tuple(b.shape)}: last dims must be equal"
        )


# ------------------------------------------------------------------------------ circular convolution
def circular_convolution(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a ⊛ b)_i = sum_j a_j b_{(i - j) mod D} by real FFT. a, b: [..., D] (broadcast) -> [..., D]."""
    _check_same_last_dim(a, b, "a", "b")
    dim = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a, dim=-1) * torch.fft.rfft(b, dim=-1), n=dim, dim=-1)


def circular_correlation(q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(q ⋆ m)_i = sum_j q_j m_{(i + j) mod D} by real FFT. q, m: [..., D] (broadcast) -> [..., D].

    The approximate inverse of circular convolution: q ⋆ (q ⊛ v) ≈ v, exactly v when |FFT(q)| = 1."""
    _check_same_last_dim(q, m, "q", "m")
    dim = q.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(q, dim=-1).conj() * torch.fft.rfft(m, dim=-1), n=dim, dim=-1)


def _circular_index(dim: int, sign: int, device: torch.device) -> torch.Tensor:
    """[D, D] table idx[i, j] = (i + sign * j) mod D."""
    i = torch.arange(dim, device=device)[:, None]
    j = torch.arange(dim, device=device)[None, :]
    return (i + sign * j) % dim


def circular_convolution_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition, O(D^2): out[..., i] = sum_j a[..., j] * b[..., (i - j) mod D]."""
    _check_same_last_dim(a, b, "a", "b")
    a, b = torch.broadcast_tensors(a, b)
    idx = _circular_index(a.shape[-1], -1, a.device)
    return (a[..., None, :] * b[..., idx]).sum(-1)


def circular_correlation_reference(q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The definition, O(D^2): out[..., i] = sum_j q[..., j] * m[..., (i + j) mod D]."""
    _check_same_last_dim(q, m, "q", "m")
    q, m = torch.broadcast_tensors(q, m)
    idx = _circular_index(q.shape[-1], 1, q.device)
    return (q[..., None, :] * m[..., idx]).sum(-1)


# --------------------------------------------------------------------------------- bind / unbind
def bind(key: torch.Tensor, value: torch.Tensor, binding: str = "elementwise") -> torch.Tensor:
    """Bind ``key`` to ``value``. key, value: [..., D] (broadcast) -> bound [..., D]."""
    if _check_pair(binding, key, value, "key", "value"):
        return key * value
    return circular_convolution(key, value)


def unbind(memory: torch.Tensor, query: torch.Tensor, binding: str = "elementwise") -> torch.Tensor:
    """Read from ``memory`` (a superposition of bound pairs) the value bound to ``query``.

    memory, query: [..., D] (broadcast) -> value estimate [..., D]. Linear in ``memory``, so unbinding a
    sum of bound pairs is the sum of the unbound pairs: the addressed value plus crosstalk noise."""
    if _check_pair(binding, memory, query, "memory", "query"):
        return query * memory
    return circular_correlation(query, memory)


def bind_reference(key: torch.Tensor, value: torch.Tensor, binding: str = "elementwise") -> torch.Tensor:
    """:func:`bind` from the definitions (O(D^2) sums for the circular binding)."""
    _check_binding(binding)
    return key * value if binding == "elementwise" else circular_convolution_reference(key, value)


def unbind_reference(memory: torch.Tensor, query: torch.Tensor, binding: str = "elementwise") -> torch.Tensor:
    """:func:`unbind` from the definitions (O(D^2) sums for the circular binding)."""
    _check_binding(binding)
    return query * memory if binding == "elementwise" else circular_correlation_reference(query, memory)


# ---------------------------------------------------------------------------------------- keys
class _SignStraightThrough(torch.autograd.Function):
    """Forward sign(x) in {-1, +1} (0 -> +1); backward the derivative of tanh(x). Saves only x, where
    ``tanh(x) + (sign(x) - tanh(x)).detach()`` would keep three key-sized tensors per call alive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1.0 - torch.tanh(x).square())


def bipolar(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} (0 maps to +1) with the gradient of tanh(x) (straight-through). [..., D].

    The forward value is the hard sign; the backward pass uses d tanh(x) / dx, so the projection
    producing x still learns."""
    return _SignStraightThrough.apply(x)


def bipolar_reference(x: torch.Tensor) -> torch.Tensor:
    """:func:`bipolar` written with autograd's detach trick: the same values and gradients."""
    soft = torch.tanh(x)
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return soft + (hard - soft).detach()


def unitary_elementwise(x: torch.Tensor) -> torch.Tensor:
    """x_i / |x_i| smoothed: x / sqrt(x^2 + eps). Entries of modulus ~1 (exactly 1 as |x_i| >> eps)."""
    return x * torch.rsqrt(x.square() + _EPS)


def unitary_fourier(x: torch.Tensor) -> torch.Tensor:
    """The real vector whose every real-FFT coefficient is FFT(x)_f / |FFT(x)_f|. [..., D] -> [..., D].

    Such a key has norm 1 and circular correlation with it inverts circular convolution with it exactly.
    """
    dim = x.shape[-1]
    spectrum = torch.fft.rfft(x, dim=-1)
    # |z| computed from real and imaginary parts with eps inside the sqrt, so the gradient stays finite.
    modulus = torch.sqrt(spectrum.real.square() + spectrum.imag.square() + _EPS)
    return torch.fft.irfft(spectrum / modulus, n=dim, dim=-1)


def make_key(x: torch.Tensor, key_type: str = "bipolar", binding: str = "elementwise") -> torch.Tensor:
    """Turn a raw projection x: [..., D] into a key [..., D] of the given type, scaled for ``binding``
    so that binding leaves a value's norm unchanged (exactly for bipolar/unitary elementwise keys and
    unitary circular keys, on average otherwise)."""
    _check_binding(binding)
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type={key_type!r}: must be one of {list(KEY_TYPES)}")
    dim = x.shape[-1]
    if key_type == "unitary":
        return unitary_elementwise(x) if binding == "elementwise" else unitary_fourier(x)
    if key_type == "bipolar":
        key = bipolar(x)  # norm sqrt(D)
        return key if binding == "elementwise" else key / math.sqrt(dim)
    key = x * torch.rsqrt(x.square().sum(-1, keepdim=True) + _EPS)  # norm 1
    return key * math.sqrt(dim) if binding == "elementwise" else key


def identity_key(dim: int, binding: str = "elementwise", **tensor_kwargs: Any) -> torch.Tensor:
    """The key that binds as the identity, bind(e, v) = v = unbind(v, e): [D] ones for elementwise
    binding, the unit impulse (1, 0, ..., 0) for circular convolution (its spectrum is all ones)."""
    _check_binding(binding)
    if binding == "elementwise":
        return torch.ones(dim, **tensor_kwargs)
    impulse = torch.zeros(dim, **tensor_kwargs)
    impulse[0] = 1.0
    return impulse


def blend_key(key: torch.Tensor, strength: torch.Tensor, binding: str = "elementwise") -> torch.Tensor:
    """strength * key + (1 - strength) * the identity key. key: [..., D]; strength: a scalar tensor.

    At strength 0 binding is the identity (the memory stores values as they are); at 1 the key is
    used as made by :func:`make_key`. Learned, it lets a memory start as a plain slot memory and bind
    as far as binding helps."""
    identity = identity_key(key.shape[-1], binding, dtype=key.dtype, device=key.device)
    return torch.lerp(identity, key, strength)


def superposition_recall(
    dim: int,
    n_pairs: int,
    n_candidates: int = 64,
    binding: str = "circular",
    key_type: str = "bipolar",
    trials: int = 16,
    seed: int = 0,
) -> float:
    """Fraction of correct clean-up lookups from a memory holding ``n_pairs`` superposed random pairs.

    Values are drawn from a codebook of ``n_candidates`` random Gaussian vectors; each stored pair is
    unbound with its key and matched to the codebook by dot product. Shows HRR capacity: recall falls
    as n_pairs / dim grows (Plate: reliable up to roughly dim / 30 pairs for ~64 candidates).
    """
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for _ in range(trials):
        codebook = torch.randn(n_candidates, dim, generator=gen) / math.sqrt(dim)
        value_ids = torch.randint(0, n_candidates, (n_pairs,), generator=gen)
        keys = make_key(torch.randn(n_pairs, dim, generator=gen), key_type, binding)
        memory = bind(keys, codebook[value_ids], binding).sum(0)
        retrieved = unbind(memory, keys, binding)  # [n_pairs, D]
        correct += int((retrieved @ codebook.T).argmax(-1).eq(value_ids).sum())
    return correct / (trials * n_pairs)
