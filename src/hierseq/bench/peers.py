"""Peer implementations from PyPI timed next to ours (``hierseq bench speed --peers``).

Each peer is built at the same width, depth, heads and length as the matching hierseq model of the
speed run, fed the same input, and forward + backward is timed in the same process, alternating ours
and theirs so machine load hits both alike (median of the repeats). The reported ratio is ours/theirs
(below 1: ours is faster). All peers come with ``pip install 'hierseq[peers]'``:

* ``x-transformers`` ``TransformerWrapper(Decoder(...))`` vs our ``transformer``: rotary on the whole
  head, RMSNorm, SwiGLU of our hidden width, SDPA attention, vocab 256, tied embeddings; the loss is the
  same cross-entropy on the logits [B, L, V] for both.
* ``mambapy`` ``Mamba`` vs the backbone of our ``mamba`` (mambapy has no embedding or head): both on
  float features [B, L, D], loss mean(y^2).
* ``h-transformer-1d`` ``HTransformer1D(causal=True)`` vs our ``tree`` (hierarchical attention), block
  size = our ``leaf_size``; it needs L = leaf_size * 2^k with k >= 1, other lengths are recorded as
  unsupported.
* ``torch-hd`` HRR (circular convolution) and MAP (elementwise) binding vs ``hierseq.ops.vsa``:
  unbind(bind(k, v), k) on k, v [B, L, D], loss mean(y^2). torch-hd imports pandas and requests at
  import time (its datasets module): installed with its dependencies it works, with ``--no-deps`` alone
  it does not import and is reported as not installed.

Two more come with ``pip install 'hierseq[hf]'`` (``transformers``); both are compared at the op level,
with the shapes of our model at the speed run's width (``d_model`` 256: 4 heads of dk = dv = 64 for
``gated_deltanet``; 8 heads of P = 64, N = 64, one group for ``mamba2``), batch and length, chunk size
ours for both, and the loss sum(out * W_out) + sum(final state * W_state) with fixed random weights:

* ``transformers`` ``torch_chunk_gated_delta_rule`` (Qwen3-Next) vs our
  :func:`~hierseq.ops.delta_rule.gated_delta_rule_chunked`. HF takes [B, L, H, d] (ours [B, H, L, d]:
  transposed views), ``g`` = our log alpha, and scales q by dk^-0.5 inside; ours does not, so our q is
  scaled by dk^-0.5 in our step. q, k are unit-norm for both and HF's in-kernel L2 norm is off: on, it
  would leave the values as they are (to 5e-7) but not d q, d k, which its Jacobian projects onto the
  tangent plane (our mixer normalises before the op, outside what is compared).
* ``transformers`` ``mamba2_chunk_scan`` (the SSD of ``Mamba2Mixer``) vs our
  :func:`~hierseq.ops.ssd.ssd_chunked`: the same layouts (x [B, L, H, P], dt [B, L, H], A [H], B, C
  [B, L, G, N], D [H], final state [B, H, P, N]); dt is passed positive with HF's dt_bias and softplus
  off (ours takes dt after the softplus).

HF routes both through a dispatcher that would call ``fla`` / ``mamba_ssm`` kernels when those are
installed; the peers call the function under it (``inspect.unwrap``): always HF's pure-PyTorch path, which
computes in float32 whatever the input dtype. Before timing, each HF peer checks at a small length
(:data:`CHECK_LENGTH`) that outputs, final states and every input gradient equal ours: max |ours - HF| /
max(1, max |ours|) per tensor within :data:`CHECK_TOLERANCE` (the scale matters for gradients of
hundreds, e.g. SSD's d dt, where float32 rounding alone is 1e-4 absolute); a peer that differs is not
timed and its row says so. A row's ``max_abs_diff`` is the largest plain difference over those tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import causal_lm_loss
from ..registry import build_model, count_parameters
from .sweep import budgeted_sweep, time_alternated

PEERS_HINT = "pip install hierseq[peers]"
HF_HINT = "pip install hierseq[hf]"
NOT_INSTALLED = f"not installed: {PEERS_HINT}"
#: the length (or the run's length, if shorter) at which the HF peers are checked against ours
CHECK_LENGTH = 160
#: largest allowed max |ours - peer| / max(1, max |ours|) over outputs, final state and input gradients
CHECK_TOLERANCE = 1e-4

Step = Callable[[], None]
#: an op in our layout: input tensors -> (output, final state)
Op = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class UnsupportedShape(ValueError):
    """The peer cannot run at this shape (e.g. a length its design excludes)."""


@dataclass(frozen=True)
class PeerShape:
    """What one timing point needs: the batch and length, and the speed run's overrides (width, depth,
    heads) of the matching hierseq model; ``d_model`` is the vector width for the binding peers."""

    batch: int
    length: int
    d_model: int
    config: dict
    device: torch.device
    seed: int = 0


@dataclass(frozen=True)
class Agreement:
    """How far a peer's results are from ours: ``max_abs_diff`` the largest |ours - peer| over outputs,
    final state and input gradients; ``max_scaled_diff`` the largest of those per tensor divided by
    max(1, max |ours|) of that tensor, and ``worst`` the tensor it is at; ``length`` the checked length."""

    max_abs_diff: float
    max_scaled_diff: float
    worst: str
    length: int
    tolerance: float = CHECK_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_scaled_diff <= self.tolerance  # False for NaN

    def row(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_scaled_diff": self.max_scaled_diff,
            "max_diff_at": self.worst,
            "check_length": self.length,
        }


@dataclass(frozen=True)
class Peer:
    """``make(shape) -> (our step, their step, our params, their params)``; a step runs one forward +
    backward. ``ours`` is the registry name of the matching model (``None``: not a registry model).
    ``check(shape)``, where given, runs before ``make`` and returns an :class:`Agreement` of ours and
    theirs: a peer that disagrees is not timed. ``hint``: how to install the peer's package."""

    name: str
    package: str
    module: str
    ours: str | None
    ours_label: str
    compared: str
    make: Callable[[PeerShape], tuple[Step, Step, int, int]]
    check: Callable[[PeerShape], Agreement] | None = None
    hint: str = PEERS_HINT


def fwd_bwd_step(module: torch.nn.Module, x: torch.Tensor) -> Step:
    """Forward + backward of a feature-to-feature module: x [B, L, D] -> y [B, L, D], loss mean(y^2)."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).pow(2).mean().backward()

    return step


def _lm_step(module: torch.nn.Module, ids: torch.Tensor) -> Step:
    """Forward + backward of a causal LM on ids [B, L]: next-token cross-entropy on its logits [B, L, V]."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        out = module(ids)
        logits = out if torch.is_tensor(out) else out.logits
        causal_lm_loss(logits[:, :-1], ids[:, 1:]).backward()

    return step


def _random_ids(shape: PeerShape, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(shape.seed)
    return torch.randint(0, vocab, (shape.batch, shape.length), generator=gen).to(shape.device)


def _lm_pair(ours: torch.nn.Module, theirs: torch.nn.Module, shape: PeerShape) -> tuple[Step, Step, int, int]:
    ours, theirs = ours.to(shape.device).train(), theirs.to(shape.device).train()
    ids = _random_ids(shape, ours.config.vocab_size)
    return _lm_step(ours, ids), _lm_step(theirs, ids), count_parameters(ours), count_parameters(theirs)


def _x_transformers(shape: PeerShape) -> tuple[Step, Step, int, int]:
    from x_transformers import Decoder, TransformerWrapper

    from ..modules.mlp import swiglu_hidden

    ours = build_model("transformer", **shape.config)
    c = ours.config
    head_dim = c.d_model // c.n_heads
    theirs = TransformerWrapper(
        num_tokens=c.vocab_size,
        max_seq_len=shape.length,
        use_abs_pos_emb=False,
        tie_embedding=c.tie_embeddings,
        attn_layers=Decoder(
            dim=c.d_model,
            depth=c.n_layers,
            heads=c.n_heads,
            attn_dim_head=head_dim,
            attn_flash=True,
            rotary_pos_emb=True,
            rotary_emb_dim=head_dim,
            use_rmsnorm=True,
            ff_glu=True,
            ff_swish=True,
            ff_no_bias=True,
            ff_mult=(c.mlp_hidden or swiglu_hidden(c.d_model)) / c.d_model,
        ),
    )
    return _lm_pair(ours, theirs, shape)


class LMBackbone(nn.Module):
    """A causal LM's blocks and final norm on features [B, L, D] -> [B, L, D] (``forward_hidden``); its
    parameters are those of the blocks and the norm only, as a peer backbone's are."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.blocks, self.final_norm = lm.blocks, lm.final_norm
        self._forward = lm.forward_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def mambapy_pair(d_model: int, n_layers: int, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(our Mamba backbone, mambapy's ``Mamba``) at the same width, depth and state size; both map float
    features [B, L, D] -> [B, L, D]. Raises ImportError when mambapy is not installed."""
    from mambapy.mamba import Mamba, MambaConfig

    ours = build_model("mamba", d_model=d_model, n_layers=n_layers, **config)
    c = ours.config
    theirs = Mamba(
        MambaConfig(
            d_model=d_model, n_layers=n_layers, d_state=c.d_state, expand_factor=c.expand, d_conv=c.d_conv, pscan=True
        )
    )
    return LMBackbone(ours), theirs


def _mambapy(shape: PeerShape) -> tuple[Step, Step, int, int]:
    ours, theirs = (m.to(shape.device).train() for m in mambapy_pair(**shape.config))
    d = shape.config["d_model"]
    gen = torch.Generator().manual_seed(shape.seed)
    x = torch.randn(shape.batch, shape.length, d, generator=gen).to(shape.device)
    return fwd_bwd_step(ours, x), fwd_bwd_step(theirs, x), count_parameters(ours), count_parameters(theirs)


def _h_transformer_1d(shape: PeerShape) -> tuple[Step, Step, int, int]:
    from h_transformer_1d import HTransformer1D

    ours = build_model("tree", **shape.config)
    c = ours.config
    blocks = shape.length // c.leaf_size
    if shape.length % c.leaf_size or blocks < 2 or not math.log2(blocks).is_integer():
        raise UnsupportedShape(f"length {shape.length} is not leaf_size {c.leaf_size} * 2^k (k >= 1)")
    theirs = HTransformer1D(
        num_tokens=c.vocab_size,
        dim=c.d_model,
        depth=c.n_layers,
        max_seq_len=shape.length,
        causal=True,
        heads=c.n_heads,
        dim_head=c.d_model // c.n_heads,
        block_size=c.leaf_size,
    )
    return _lm_pair(ours, theirs, shape)


def _torchhd(binding: str, tensor_class: str) -> Callable[[PeerShape], tuple[Step, Step, int, int]]:
    def make(shape: PeerShape) -> tuple[Step, Step, int, int]:
        import torchhd

        from ..ops import vsa

        cls = getattr(torchhd, tensor_class)
        gen = torch.Generator().manual_seed(shape.seed)
        k, v = (
            torch.randn(shape.batch, shape.length, shape.d_model, generator=gen).to(shape.device).requires_grad_()
            for _ in range(2)
        )

        def backward(y: torch.Tensor) -> None:
            k.grad = v.grad = None
            y.pow(2).mean().backward()

        def ours() -> None:
            backward(vsa.unbind(vsa.bind(k, v, binding), k, binding))

        def theirs() -> None:
            hk, hv = k.as_subclass(cls), v.as_subclass(cls)
            backward(torchhd.bind(torchhd.bind(hk, hv), torchhd.inverse(hk)).as_subclass(torch.Tensor))

        return ours, theirs, 0, 0

    return make


# ------------------------------------------------------------------ op-level peers (transformers)
def fwd_bwd_results(
    op: Op, inputs: dict[str, torch.Tensor], weights: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``op(*inputs)`` -> (output, final state), then backward of sum(out * W_out) + sum(state * W_state)
    on fresh leaves (``inputs`` stay untouched). Returns the output, the state and every input gradient."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    results = op(*leaves.values())
    _weighted_sum(results, weights).backward()
    found = {"output": results[0].detach(), "final state": results[1].detach()}
    for name, t in leaves.items():
        found[f"d {name}"] = torch.zeros_like(t) if t.grad is None else t.grad
    return found


def agreement(
    ours: Op, theirs: Op, inputs: dict[str, torch.Tensor], weights: Sequence[torch.Tensor], length: int
) -> Agreement:
    """Both ops forward + backward on the same inputs (:func:`fwd_bwd_results`): how far apart their
    outputs, final states and input gradients are. A NaN, or a shape that differs, is infinitely far."""
    a, b = fwd_bwd_results(ours, inputs, weights), fwd_bwd_results(theirs, inputs, weights)
    max_abs, max_scaled, worst = 0.0, -1.0, ""
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or not x.numel():
            diff, scale = (0.0, 1.0) if x.shape == y.shape else (math.inf, 1.0)
        else:
            diff, scale = (x - y).abs().max().item(), max(1.0, x.abs().max().item())
        diff = math.inf if math.isnan(diff) else diff
        scaled = diff / scale if math.isfinite(scale) else math.inf
        max_abs = max(max_abs, diff)
        if scaled > max_scaled:
            max_scaled, worst = scaled, name
    return Agreement(max_abs, max_scaled, worst, length)


def _weighted_sum(results: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    total = (results[0] * weights[0]).sum()
    for r, w in zip(results[1:], weights[1:], strict=True):
        total = total + (r * w).sum()
    return total


def _op_step(op: Op, leaves: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> Step:
    """One forward + backward of ``op`` on the leaves, loss sum(out * W_out) + sum(state * W_state)."""

    def step() -> None:
        for t in leaves:
            t.grad = None
        _weighted_sum(op(*leaves), weights).backward()

    return step


#: (our op, their op, inputs by name, loss weights for output and final state) at one shape and length
OpSetup = tuple[Op, Op, dict[str, torch.Tensor], list[torch.Tensor]]


def _op_peer(setup: Callable[[PeerShape, int], OpSetup]) -> tuple[Callable, Callable]:
    """(make, check) of an op-level peer from ``setup(shape, length)``: ``check`` compares the two at
    min(length, :data:`CHECK_LENGTH`), ``make`` times them at the shape's length on shared leaves."""

    def make(shape: PeerShape) -> tuple[Step, Step, int, int]:
        ours, theirs, inputs, weights = setup(shape, shape.length)
        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        return _op_step(ours, leaves, weights), _op_step(theirs, leaves, weights), 0, 0

    def check(shape: PeerShape) -> Agreement:
        length = min(shape.length, CHECK_LENGTH)
        return agreement(*setup(shape, length), length)

    return make, check


def _mixer_options(config_cls: type, config: dict):
    """A mixer's options from the speed run's overrides of its model (the overrides that are its fields)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in config.items() if k in names})


def _on(device: torch.device, inputs: dict[str, torch.Tensor], weights: list[torch.Tensor]):
    return {k: t.to(device) for k, t in inputs.items()}, [w.to(device) for w in weights]


def _log_uniform(gen: torch.Generator, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
    return torch.empty(shape).uniform_(math.log(low), math.log(high), generator=gen).exp()


def hf_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``torch_chunk_gated_delta_rule`` (Qwen3-Next) in our layout: q, k [B, H, L, dk] unit-norm,
    v [B, H, L, dv], beta and g = log alpha [B, H, L] -> (o [B, H, L, dv], final state [B, H, dk, dv]).
    It scales q by dk^-0.5 inside; its in-kernel L2 norm stays off (q, k are unit vectors already)."""
    from transformers.models.qwen3_next import modeling_qwen3_next

    torch_path = inspect.unwrap(modeling_qwen3_next.torch_chunk_gated_delta_rule)  # not fla's kernel
    o, state = torch_path(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        g=g.transpose(1, 2),
        beta=beta.transpose(1, 2),
        chunk_size=chunk_size,
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.transpose(1, 2), state


def ours_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our :func:`~hierseq.ops.delta_rule.gated_delta_rule_chunked` in HF's convention (q scaled by
    dk^-0.5; our op reads q as given). Arguments and results as :func:`hf_gated_delta_rule`."""
    from ..ops.delta_rule import gated_delta_rule_chunked

    return gated_delta_rule_chunked(q * q.shape[-1] ** -0.5, k, v, beta, g, chunk_size=chunk_size)


def gated_delta_rule_inputs(
    batch: int, heads: int, length: int, key_dim: int, value_dim: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Inputs like our mixer's (unit-norm q, k; v normal; beta in (0, 1); g = log alpha = -A dt with A in
    [1, 16] per head and dt log-uniform in [1e-3, 0.1]) and the loss weights of o and the final state."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.nn.functional.normalize(torch.randn(2, batch, heads, length, key_dim, generator=gen), dim=-1)
    v = torch.randn(batch, heads, length, value_dim, generator=gen)
    beta = torch.rand(batch, heads, length, generator=gen)
    g = -torch.empty(heads, 1).uniform_(1.0, 16.0, generator=gen) * _log_uniform(gen, beta.shape, 1e-3, 0.1)
    weights = [torch.randn(v.shape, generator=gen), torch.randn(batch, heads, key_dim, value_dim, generator=gen)]
    return {"q": q, "k": k, "v": v, "beta": beta, "g": g}, weights


def _gated_delta_rule_setup(shape: PeerShape, length: int) -> OpSetup:
    """Our ``gated_deltanet`` model's shapes: its heads, dk = key_dim (0: the head width), dv = head width."""
    from ..mixers.gated_deltanet import GatedDeltaNetMixerConfig

    cfg = _mixer_options(GatedDeltaNetMixerConfig, shape.config)
    head_dim = shape.config.get("d_model", shape.d_model) // cfg.n_heads
    data = gated_delta_rule_inputs(shape.batch, cfg.n_heads, length, cfg.key_dim or head_dim, head_dim, shape.seed)
    ours = functools.partial(ours_gated_delta_rule, chunk_size=cfg.chunk_size)
    theirs = functools.partial(hf_gated_delta_rule, chunk_size=cfg.chunk_size)
    return ours, theirs, *_on(shape.device, *data)


def hf_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``mamba2_chunk_scan`` (the SSD of ``Mamba2Mixer``), whose layout is ours: x [B, L, H, P], dt
    [B, L, H] positive (its dt_bias and softplus off), A [H] negative, B, C [B, L, G, N], D [H] ->
    (y [B, L, H, P], final state [B, H, P, N])."""
    from transformers.models.mamba2 import modeling_mamba2

    torch_path = inspect.unwrap(modeling_mamba2.mamba2_chunk_scan)  # not mamba_ssm's kernel
    return torch_path(x, dt, A, B, C, chunk_size, D=D, return_final_states=True)


def ours_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our :func:`~hierseq.ops.ssd.ssd_chunked`; arguments and results as :func:`hf_ssd`."""
    from ..ops.ssd import ssd_chunked

    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size)


def ssd_inputs(
    batch: int, length: int, heads: int, headdim: int, groups: int, d_state: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """SSD inputs (x, B, C, D normal; dt log-uniform in [1e-3, 0.1] as our mixer's init gives after the
    softplus; A in [-16, -1]) and the loss weights of y and the final state."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=gen)
    dt = _log_uniform(gen, (batch, length, heads), 1e-3, 0.1)
    A = -torch.empty(heads).uniform_(1.0, 16.0, generator=gen)
    B, C = torch.randn(2, batch, length, groups, d_state, generator=gen)
    D = torch.randn(heads, generator=gen)
    weights = [torch.randn(x.shape, generator=gen), torch.randn(batch, heads, headdim, d_state, generator=gen)]
    return {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D}, weights


def _ssd_setup(shape: PeerShape, length: int) -> OpSetup:
    """Our ``mamba2`` model's shapes: H = expand d_model / headdim heads, P = headdim, G = ngroups, N = d_state."""
    from ..mixers.mamba2 import Mamba2MixerConfig

    cfg = _mixer_options(Mamba2MixerConfig, shape.config)
    heads = cfg.expand * shape.config.get("d_model", shape.d_model) // cfg.headdim
    data = ssd_inputs(shape.batch, length, heads, cfg.headdim, cfg.ngroups, cfg.d_state, shape.seed)
    ours = functools.partial(ours_ssd, chunk_size=cfg.chunk_size)
    theirs = functools.partial(hf_ssd, chunk_size=cfg.chunk_size)
    return ours, theirs, *_on(shape.device, *data)


PEERS: list[Peer] = [
    Peer(
        "x-transformers",
        "x-transformers",
        "x_transformers",
        "transformer",
        "transformer",
        "LM fwd+bwd on ids [B, L]",
        _x_transformers,
    ),
    Peer("mambapy", "mambapy", "mambapy.mamba", "mamba", "mamba (backbone)", "fwd+bwd on [B, L, D] floats", _mambapy),
    Peer(
        "h-transformer-1d",
        "h-transformer-1d",
        "h_transformer_1d",
        "tree",
        "tree",
        "LM fwd+bwd on ids [B, L]",
        _h_transformer_1d,
    ),
    Peer(
        "torch-hd HRR",
        "torch-hd",
        "torchhd",
        None,
        "vsa circular",
        "unbind(bind(k, v), k), k, v [B, L, D]",
        _torchhd("circular", "HRRTensor"),
    ),
    Peer(
        "torch-hd MAP",
        "torch-hd",
        "torchhd",
        None,
        "vsa elementwise",
        "unbind(bind(k, v), k), k, v [B, L, D]",
        _torchhd("elementwise", "MAPTensor"),
    ),
    Peer(
        "hf-gated-delta-rule",
        "transformers",
        "transformers.models.qwen3_next.modeling_qwen3_next",
        "gated_deltanet",
        "gated_delta_rule_chunked",
        "op fwd+bwd, q k [B, H, L, dk] unit, q * dk^-0.5",
        *_op_peer(_gated_delta_rule_setup),
        hint=HF_HINT,
    ),
    Peer(
        "hf-mamba2-ssd",
        "transformers",
        "transformers.models.mamba2.modeling_mamba2",
        "mamba2",
        "ssd_chunked",
        "op fwd+bwd, x [B, L, H, P], dt after softplus",
        *_op_peer(_ssd_setup),
        hint=HF_HINT,
    ),
]


def import_error(peer: Peer) -> str | None:
    """None when the peer's module imports, else the import error (e.g. a missing dependency)."""
    import importlib

    try:
        importlib.import_module(peer.module)
    except ImportError as e:
        return str(e) or type(e).__name__
    return None


def select_peers(peers: bool | Sequence[str]) -> list[Peer]:
    """``True``: every peer; a list: those names (see :data:`PEERS`); ``False`` or empty: none.

    Raises ValueError for an unknown name, and when peers were asked for but none of them imports."""
    if not peers:
        return []
    known = [p.name for p in PEERS]
    if peers is True:
        chosen = list(PEERS)
    else:
        unknown = [n for n in peers if n not in known]
        if unknown:
            raise ValueError(f"peers={unknown[0]!r}: unknown peer; choose from {known}")
        chosen = [p for p in PEERS if p.name in peers]
    if all(import_error(p) for p in chosen):
        packages = sorted({p.package for p in chosen})
        hints = " or ".join(sorted({p.hint for p in chosen}, key=lambda h: h != PEERS_HINT))
        raise ValueError(f"--peers: none of {packages} is installed; {hints}")
    return chosen


def run_peers(
    peers: Sequence[Peer],
    configs: dict[str, dict],
    lengths: Sequence[int],
    d_model: int,
    batch_size: int,
    repeats: int,
    device: torch.device,
    time_budget_s: float,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Time every peer at every length next to its hierseq model.

    ``configs`` maps a registry name to the overrides the speed run built it with; a peer whose model is
    not among them is noted as skipped. Returns ``{"rows": [...], "notes": [...]}``: a row per (peer,
    length) with ``ours_fwd_bwd_ms``, ``peer_fwd_bwd_ms`` and ``ours_over_peer``, a note per peer that is
    not installed or was skipped. A peer with a ``check`` is first compared with ours
    (:class:`Agreement`): its rows carry ``max_abs_diff`` (also shown in ``compared``), and a peer that
    differs gets ``status: "differs ..."`` and is not timed."""
    rows: list[dict] = []
    notes: list[dict] = []
    for peer in peers:
        head = {"peer": peer.name, "package": peer.package, "ours": peer.ours_label, "compared": peer.compared}
        error = import_error(peer)
        if error:
            notes.append({**head, "status": f"not installed: {peer.hint}", "import_error": error})
            continue
        if peer.ours is not None and peer.ours not in configs:
            notes.append({**head, "status": f"skipped: {peer.ours} is not among the benchmarked models"})
            continue
        config = configs.get(peer.ours, {})

        def measure(length: int, peer: Peer = peer, config: dict = config) -> dict:
            shape = PeerShape(batch_size, length, d_model, config, device, seed)
            checked: dict = {}
            try:
                if peer.check is not None:
                    agree = peer.check(shape)
                    diff = f"max abs diff {agree.max_abs_diff:.1e} at L={agree.length}"
                    checked = {"compared": f"{peer.compared}; {diff}", **agree.row()}
                    if not agree.ok:
                        status = (
                            f"differs from ours: {diff}, {agree.worst} off by {agree.max_scaled_diff:.1e} of its "
                            f"scale > {agree.tolerance:g}; not timed"
                        )
                        return {"status": status, **checked}
                ours, theirs, ours_params, peer_params = peer.make(shape)
            except UnsupportedShape as e:
                return {"status": f"unsupported: {e}"}
            all_times = time_alternated({"ours": ours, "peer": theirs}, repeats, device)
            times = {k: statistics.median(t) for k, t in all_times.items()}
            return {
                **checked,
                "status": "ok",
                "ours_fwd_bwd_ms": 1e3 * times["ours"],
                "peer_fwd_bwd_ms": 1e3 * times["peer"],
                "ours_over_peer": times["ours"] / times["peer"],
                "ours_params": ours_params,
                "peer_params": peer_params,
            }

        for row in budgeted_sweep(lengths, measure, time_budget_s, desc=f"peer {peer.name}"):
            rows.append({**head, **row})
    return {"rows": rows, "notes": notes}
