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
"""

from __future__ import annotations

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
NOT_INSTALLED = f"not installed: {PEERS_HINT}"

Step = Callable[[], None]


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
class Peer:
    """``make(shape) -> (our step, their step, our params, their params)``; a step runs one forward +
    backward. ``ours`` is the registry name of the matching model (``None``: not a registry model)."""

    name: str
    package: str
    module: str
    ours: str | None
    ours_label: str
    compared: str
    make: Callable[[PeerShape], tuple[Step, Step, int, int]]


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
        raise ValueError(f"--peers: none of {packages} is installed; {PEERS_HINT}")
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
    not installed or was skipped."""
    rows: list[dict] = []
    notes: list[dict] = []
    for peer in peers:
        head = {"peer": peer.name, "package": peer.package, "ours": peer.ours_label, "compared": peer.compared}
        error = import_error(peer)
        if error:
            notes.append({**head, "status": NOT_INSTALLED, "import_error": error})
            continue
        if peer.ours is not None and peer.ours not in configs:
            notes.append({**head, "status": f"skipped: {peer.ours} is not among the benchmarked models"})
            continue
        config = configs.get(peer.ours, {})

        def measure(length: int, peer: Peer = peer, config: dict = config) -> dict:
            shape = PeerShape(batch_size, length, d_model, config, device, seed)
            try:
                ours, theirs, ours_params, peer_params = peer.make(shape)
            except UnsupportedShape as e:
                return {"status": f"unsupported: {e}"}
            all_times = time_alternated({"ours": ours, "peer": theirs}, repeats, device)
            times = {k: statistics.median(t) for k, t in all_times.items()}
            return {
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
