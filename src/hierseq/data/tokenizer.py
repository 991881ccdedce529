"""Tokenizers: bytes (the default: V = 256, no vocabulary file) or subwords (:mod:`.subword`), named by a spec.

Specs (``hierseq train --tokenizer``, ``TrainConfig.tokenizer``, ``hierseq bench lm --tokenizer``):

* ``bytes``: one token per UTF-8 byte;
* ``bpe:<vocab_size>``: a byte-level BPE trained with HF ``tokenizers`` on the training split;
* ``hf:<path-or-name>``: an existing ``tokenizer.json``, a folder holding one, or a hub name.

A subword tokenizer travels with its model: :func:`attach_tokenizer` gives a model its tokenizer,
``hierseq.save`` writes it beside the weights (:func:`tokenizer_files`: ``tokenizer.json`` and the
``tokenizer_config.json`` that ``AutoTokenizer`` reads), ``hierseq.load`` attaches it again
(:func:`load_saved_tokenizer`) and :func:`tokenizer_of` returns it (the byte tokenizer for a model without
one). Bits per byte stay comparable across tokenizers because a tokenized split keeps, for every token, the
UTF-8 bytes of the text it stands for (:class:`TokenizedSplit`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import config_error
from .hub import HUB_NAME, written_as_path

BYTES = "bytes"
BPE_PREFIX = "bpe:"
HF_PREFIX = "hf:"
#: A byte-level BPE starts from the 256 byte tokens; it needs at least one merge to be more than bytes.
MIN_BPE_VOCAB = 257
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
#: The key of ``tokenizer_config.json`` that marks files hierseq wrote (and holds the spec they came from).
SPEC_KEY = "hierseq_tokenizer"
SPEC_RULE = (
    "must be 'bytes', 'bpe:<vocab_size>' (a byte-level BPE trained on the training split) or "
    "'hf:<path-or-name>' (a tokenizer.json, a folder holding one, or a Hugging Face hub name)"
)


class Tokenizer(Protocol):
    """What hierseq asks of a tokenizer (:class:`ByteTokenizer`, :class:`~hierseq.data.subword.SubwordTokenizer`)."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str: ...

    def stream_decoder(self, prompt_ids: Sequence[int]) -> Callable[[int], str]: ...

    def files(self) -> dict[str, str]: ...


class ByteTokenizer:
    """Text <-> UTF-8 byte ids. Loss per token is therefore loss per byte (bits per byte = nats / ln 2)."""

    spec: str = BYTES
    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """text -> LongTensor [N] of byte values in [0, 256), N = len(text.encode('utf-8'))."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        data = text.encode("utf-8")
        if not data:
            return torch.zeros(0, dtype=torch.long)
        # frombuffer shares the (read-only) bytes; .long() copies, so the result is writable and owned.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """ids [N] (any integer dtype, or a list) -> text. Invalid UTF-8 (e.g. a sequence cut inside a
        multi-byte character, as sampling can produce) becomes U+FFFD instead of raising."""
        values = ids_to_list(ids)
        bad = [v for v in values if not 0 <= int(v) < 256]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} out of range: byte ids must be in [0, 256)")
        return bytes(int(v) for v in values).decode("utf-8", errors="replace")

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> Callable[[int], str]:
        """A function taking the generated ids one at a time and returning the text ready to print ('' while
        the bytes of one UTF-8 character are still arriving; after 4 bytes that never decode, the
        replacement character). Each byte's text does not depend on the prompt."""
        pending = bytearray()

        def push(token: int) -> str:
            pending.append(int(token))
            try:
                text = bytes(pending).decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    return ""
                text = bytes(pending).decode("utf-8", errors="replace")
            pending.clear()
            return text

        return push

    def files(self) -> dict[str, str]:
        """Bytes need no vocabulary file."""
        return {}


def ids_to_list(ids: torch.Tensor | Sequence[int]) -> list[int]:
    """ids [N] (a rank-1 tensor or a sequence) -> a list of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids: shape={tuple(ids.shape)}: must have rank 1 [length]")
        return ids.tolist()
    return [int(v) for v in ids]


# ---------------------------------------------------------------------------------------------- specs
def check_tokenizer_spec(spec: Any, name: str = "tokenizer") -> str:
    """``spec`` checked (one-line ``ValueError`` naming ``name``) and made canonical: a local ``hf:`` path
    becomes absolute (``~`` expanded), so a run's record names the file whatever the working directory. Paths
    are only checked to exist when the tokenizer is loaded (a resumed run reads its own saved copy)."""
    if not isinstance(spec, str) or not spec:
        raise config_error(name, spec, SPEC_RULE)
    if spec == BYTES:
        return spec
    if spec.startswith(BPE_PREFIX):
        size = spec[len(BPE_PREFIX) :]
        if not size.isdigit() or int(size) < MIN_BPE_VOCAB:
            raise config_error(
                name, spec, f"bpe:<vocab_size> needs an integer vocab_size >= {MIN_BPE_VOCAB} (256 bytes + merges)"
            )
        return f"{BPE_PREFIX}{int(size)}"
    if spec.startswith(HF_PREFIX):
        source = spec[len(HF_PREFIX) :]
        if not source:
            raise config_error(name, spec, SPEC_RULE)
        if written_as_path(source, (".json",)):
            return HF_PREFIX + str(Path(source).expanduser().resolve())
        if not HUB_NAME.match(source):
            raise config_error(name, spec, "is neither an existing path nor a Hugging Face hub name (owner/name)")
        return spec
    raise config_error(name, spec, SPEC_RULE)


def bpe_vocab_size(spec: str) -> int | None:
    """The vocab_size of a ``bpe:<vocab_size>`` spec (None for other specs)."""
    return int(spec[len(BPE_PREFIX) :]) if spec.startswith(BPE_PREFIX) else None


def build_tokenizer(spec: str, train_text: bytes | torch.Tensor) -> Tokenizer:
    """The tokenizer a (canonical) spec names: bytes; a BPE trained on ``train_text`` (the training split's
    UTF-8 bytes); or an existing one. Subwords need the ``hf`` extra (HF ``tokenizers``)."""
    if spec == BYTES:
        return ByteTokenizer()
    from . import subword

    vocab = bpe_vocab_size(spec)
    if vocab is not None:
        data = train_text if isinstance(train_text, bytes) else bytes(train_text.numpy())
        return subword.trained_bpe(data, vocab, spec)
    return subword.load_hf_tokenizer(spec)


# --------------------------------------------------------------------------------------- tokenized text
@dataclass
class TokenizedSplit:
    """One split as tokens. ids: [N] token ids; byte_counts: [N] int32, the UTF-8 bytes of text each token
    stands for (they sum to ``n_bytes``), or None for bytes (one byte per token, ``ids`` is the text itself)."""

    ids: torch.Tensor
    byte_counts: torch.Tensor | None
    n_bytes: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_byte(self) -> float:
        return len(self.ids) / max(self.n_bytes, 1)


def tokenize_split(data: torch.Tensor, tokenizer: Tokenizer) -> TokenizedSplit:
    """A split's UTF-8 bytes (uint8 [N]) as tokens. Bytes: the tensor itself, untouched (no copy, no
    count). Subwords: the text decoded (invalid UTF-8 becomes U+FFFD, whose 3 bytes are then counted) and
    encoded with per-token byte counts."""
    if isinstance(tokenizer, ByteTokenizer):
        return TokenizedSplit(data, None, len(data))
    ids, counts = tokenizer.encode_with_bytes(bytes(data.numpy()).decode("utf-8", errors="replace"))
    return TokenizedSplit(ids, counts, int(counts.sum()))


# ------------------------------------------------------------------------------------------ on a model
def attach_tokenizer(model: Any, tokenizer: Tokenizer) -> None:
    """Give ``model`` its tokenizer (``model.tokenizer``), which ``hierseq.save`` writes beside the weights.
    A subword tokenizer must have exactly the model's ``vocab_size`` (one-line error otherwise)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size != vocab:
        raise config_error(
            "vocab_size", vocab, f"the tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens: they must match"
        )
    model.tokenizer = tokenizer


def tokenizer_of(model: Any) -> Tokenizer:
    """The tokenizer ``model`` carries (:func:`attach_tokenizer`, ``hierseq.load``); a model without one reads
    bytes, the library's default."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if tokenizer is not None else ByteTokenizer()


def tokenizer_files(model: Any) -> dict[str, str]:
    """{file name: text} of the tokenizer ``model`` carries (empty for bytes, or none)."""
    return tokenizer_of(model).files()


def stale_tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files hierseq wrote into ``directory`` (marked by :data:`SPEC_KEY`): a byte-level model
    saved there removes them, so a folder never pairs a model with another model's tokenizer. Tokenizer
    files without the mark (a user's own) are never touched."""
    config = directory / TOKENIZER_CONFIG_FILE
    if not config.is_file():
        return []
    try:
        ours = SPEC_KEY in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [p for p in (directory / TOKENIZER_FILE, config) if ours and p.is_file()]


def load_saved_tokenizer(directory: Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer saved in a model folder (None: there is no ``tokenizer.json``, the model reads bytes).
    Its size must be the model's ``vocab_size`` from config.json (one-line error otherwise)."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    from .subword import SubwordTokenizer

    spec = _recorded_spec(directory) or HF_PREFIX + str(path)
    tokenizer = SubwordTokenizer.from_file(path, spec)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"{TOKENIZER_FILE}: has {tokenizer.vocab_size} tokens, the model's vocab_size in config.json is "
            f"{vocab_size}: the files in {str(directory)!r} do not belong together"
        )
    return tokenizer


def _recorded_spec(directory: Path) -> str | None:
    try:
        spec = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text()).get(SPEC_KEY)
    except (OSError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return spec if isinstance(spec, str) else None
