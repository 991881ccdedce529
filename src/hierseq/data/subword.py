"""Subword tokenizers through HF ``tokenizers`` (the optional ``hf`` extra; ``import hierseq`` never needs it).

* :func:`train_bpe`: a byte-level BPE (GPT-2's pre-tokenisation and byte alphabet, so every text encodes and
  decodes back exactly) trained on a training split, offline. Training draws nothing at random: the same
  text and ``vocab_size`` give the same ``tokenizer.json`` byte for byte, so there is no seed to set.
* :func:`load_hf_tokenizer`: an existing ``tokenizer.json``, a folder holding one, or a hub name (fetched
  where the machine is online; a one-line error where it is not).

Long texts are cut into pieces of about :data:`CHUNK_CHARS` characters at line ends and encoded as a batch
(in parallel, without one huge encoding in memory); the cut is a fixed function of the text, so training
and encoding are deterministic. :meth:`SubwordTokenizer.encode_with_bytes` also returns, per token, the UTF-8
bytes of the original text it covers (from the tokenizer's character offsets), which is what bits per byte
divide by.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import config_error, import_extra
from .hub import hub_offline, written_as_path
from .tokenizer import HF_PREFIX, SPEC_KEY, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, ids_to_list

#: Characters per encoded piece of a long text (cut at the last line end before it, where there is one).
CHUNK_CHARS = 1 << 20
#: Pairs seen once are not merged: a merge that only memorises one spot of the training text.
BPE_MIN_FREQUENCY = 2
#: Tokens already shown that a streamed decode keeps in front of the new ones (their spacing and bytes).
STREAM_CONTEXT = 8


def import_tokenizers(what: str) -> Any:
    """The ``tokenizers`` module, or a one-line error naming ``what`` needed it and the extra that brings it."""
    return import_extra("tokenizers", "hf", f"{what}: subword tokenizers (HF tokenizers)")


class SubwordTokenizer:
    """A ``tokenizers.Tokenizer`` with hierseq's tokenizer interface (see :mod:`hierseq.data.tokenizer`).

    spec: where it came from (``bpe:4096``, ``hf:/abs/tokenizer.json``, ``hf:gpt2``); vocab_size: its number
    of tokens, added tokens included."""

    def __init__(self, backend: Any, spec: str) -> None:
        self.backend = backend
        self.spec = spec
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str | Path, spec: str) -> SubwordTokenizer:
        """Read a ``tokenizer.json`` (a one-line error when it is not one)."""
        tokenizers = import_tokenizers(f"tokenizer={spec!r}")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)), spec)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(
                f"{TOKENIZER_FILE}: {str(path)!r} is not a readable tokenizer file ({_first_line(e)})"
            ) from None

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> torch.Tensor:
        """text -> LongTensor [N] of token ids (no special tokens added)."""
        ids, _ = self.encode_with_bytes(text)
        return ids.long()

    def encode_with_bytes(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """text -> (ids [N] int32, byte_counts [N] int32): the ids, and for each token the UTF-8 bytes of
        ``text`` it covers. The counts sum to ``len(text.encode())``: text no token covers (what a tokenizer
        drops) goes to the next token, and after the last token to the last one. Tokens that cover one
        character together (bytes of an emoji split over two tokens) give it to the first of them."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        chunks = split_text(text)
        encodings = self.backend.encode_batch(chunks, add_special_tokens=False) if chunks else []
        ids, ends, base = [], [], 0
        for chunk, encoding in zip(chunks, encodings):
            char_ends = _utf8_char_ends(chunk)
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            ids.append(np.asarray(encoding.ids, dtype=np.int32))
            ends.append(base + char_ends[offsets[:, 1]])
            base += int(char_ends[-1])
        if not ids:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        end = np.maximum.accumulate(np.concatenate(ends))  # where each token's text ends, in bytes
        counts = np.diff(end, prepend=0)
        if len(counts):
            counts[-1] += base - end[-1]
        return torch.from_numpy(np.concatenate(ids)), torch.from_numpy(counts.astype(np.int32))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """ids [N] -> text (a byte-level BPE gives U+FFFD for a character whose bytes are cut off)."""
        values = ids_to_list(ids)
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"ids: token id {bad[0]} out of range: ids must be in [0, {self.vocab_size})")
        return self.backend.decode(values, skip_special_tokens=False)

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> Callable[[int], str]:
        """A function taking the generated ids one at a time and returning the new text ready to print. A
        token's text can depend on its neighbours (a leading space, one character's bytes over two tokens), so
        the tokens not shown yet are decoded behind the last :data:`STREAM_CONTEXT` shown ones (prompt
        included) and the text past those is returned; while it ends in an unfinished character (U+FFFD), up
        to 3 tokens are held back. Each step costs the same however long the text grows."""
        ids = [int(i) for i in prompt_ids]
        shown = len(ids)  # ids[:shown] are on the screen

        def push(token: int) -> str:
            nonlocal shown
            ids.append(int(token))
            context = ids[max(0, shown - STREAM_CONTEXT) : shown]
            text = self.decode(context + ids[shown:])
            if text.endswith("\ufffd") and len(ids) - shown < 4:
                return ""
            shown = len(ids)
            return text[len(self.decode(context)) :]

        return push

    # ------------------------------------------------------------------ files
    def files(self) -> dict[str, str]:
        """``tokenizer.json`` and a ``tokenizer_config.json`` telling ``AutoTokenizer`` to read it as is (no
        space clean-up, so its decoding equals ours), marked with the spec it came from."""
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            SPEC_KEY: self.spec,
        }
        return {TOKENIZER_FILE: self.to_json(), TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2) + "\n"}

    def to_json(self) -> str:
        return self.backend.to_str(pretty=True)

    def __repr__(self) -> str:
        return f"SubwordTokenizer(spec={self.spec!r}, vocab_size={self.vocab_size})"


def split_text(text: str, size: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``size`` (default :data:`CHUNK_CHARS`) characters, each ending at its last
    line end where it has one (a fixed function of the text). Empty text gives no piece."""
    size = size or CHUNK_CHARS
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _utf8_char_ends(text: str) -> np.ndarray:
    """[len(text) + 1] int64: the UTF-8 byte offset at which each character boundary lies (0 first)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(widths)])


# ---------------------------------------------------------------------------------------- training
def train_bpe(text: str, vocab_size: int, spec: str | None = None) -> SubwordTokenizer:
    """A byte-level BPE of exactly ``vocab_size`` tokens (256 bytes + merges) trained on ``text``, offline.

    Refused in one line when the text allows fewer tokens (pairs seen at least :data:`BPE_MIN_FREQUENCY`
    times run out before ``vocab_size``)."""
    spec = spec or f"bpe:{vocab_size}"
    tokenizers = import_tokenizers(f"tokenizer={spec!r}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    # GPT-2's pre-tokenisation without a prefix space: the text is encoded exactly as written.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=BPE_MIN_FREQUENCY,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        special_tokens=[],
    )
    backend.train_from_iterator(split_text(text), trainer=trainer)
    tokenizer = SubwordTokenizer(backend, spec)
    if tokenizer.vocab_size < vocab_size:
        raise config_error(
            "tokenizer",
            spec,
            f"the training split ({len(text.encode('utf-8')):,} bytes) allows only {tokenizer.vocab_size} tokens "
            f"(256 bytes + merges of pairs seen at least {BPE_MIN_FREQUENCY} times); use bpe:{tokenizer.vocab_size} "
            "or less, or more text",
        )
    return tokenizer


#: Trained tokenizers of this process, as JSON: (sha256 of the training bytes, vocab_size, spec) -> JSON.
_BPE_CACHE: dict[tuple[str, int, str], str] = {}
_BPE_CACHE_SIZE = 4


def trained_bpe(train_bytes: bytes, vocab_size: int, spec: str) -> SubwordTokenizer:
    """:func:`train_bpe` on a training split's UTF-8 bytes, remembered per process: runs on the same split (a
    benchmark's models, a test's runs) share one training instead of repeating an identical one. Each call
    gets its own tokenizer object, rebuilt from the remembered JSON."""
    key = (hashlib.sha256(train_bytes).hexdigest(), vocab_size, spec)
    if key not in _BPE_CACHE:
        _BPE_CACHE[key] = train_bpe(train_bytes.decode("utf-8", errors="replace"), vocab_size, spec).to_json()
        while len(_BPE_CACHE) > _BPE_CACHE_SIZE:
            _BPE_CACHE.pop(next(iter(_BPE_CACHE)))
    tokenizers = import_tokenizers(f"tokenizer={spec!r}")
    return SubwordTokenizer(tokenizers.Tokenizer.from_str(_BPE_CACHE[key]), spec)


# ---------------------------------------------------------------------------------------- existing ones
def load_hf_tokenizer(spec: str) -> SubwordTokenizer:
    """The tokenizer of an ``hf:`` spec (canonical, see :func:`~hierseq.data.tokenizer.check_tokenizer_spec`):
    a ``tokenizer.json``, a folder holding one, or a hub name."""
    source = spec[len(HF_PREFIX) :]
    if written_as_path(source, (".json",)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer={spec!r}: no such file or directory")
        if path.is_dir():
            if not (path / TOKENIZER_FILE).is_file():
                raise FileNotFoundError(
                    f"tokenizer={spec!r}: the folder holds no {TOKENIZER_FILE} (a folder needs the file "
                    "transformers' fast tokenizers save)"
                )
            path = path / TOKENIZER_FILE
        return SubwordTokenizer.from_file(path, spec)
    return SubwordTokenizer.from_file(_download(spec, source), spec)


def _download(spec: str, repo_id: str) -> str:
    """The cached path of the hub repository's ``tokenizer.json``, fetched where the machine is online."""
    import_tokenizers(f"tokenizer={spec!r}")  # huggingface_hub comes with tokenizers
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    try:
        return hf_hub_download(repo_id=repo_id, filename=TOKENIZER_FILE, local_files_only=offline)
    except Exception as e:  # huggingface_hub's errors (offline, not found, HTTP) share no useful base class
        if offline:
            rule = (
                f"is a Hugging Face hub name, the hub is offline (HF_HUB_OFFLINE is set) and its {TOKENIZER_FILE} "
                "is not in the local cache; pass a local tokenizer.json or folder"
            )
        else:
            rule = f"could not be fetched from the Hugging Face hub ({type(e).__name__}: {_first_line(e)})"
        raise config_error("tokenizer", spec, rule) from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
