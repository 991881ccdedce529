"""Data: tokenizers (bytes by default, or subwords), text corpora (embedded Austen, user files, Hugging Face
datasets) and seeded batch loaders."""

from .corpora import SPLIT, Corpus, load_corpus
from .loaders import RandomWindowLoader, StreamLoader, eval_windows
from .tokenizer import (
    ByteTokenizer,
    TokenizedSplit,
    attach_tokenizer,
    build_tokenizer,
    check_tokenizer_spec,
    tokenize_split,
    tokenizer_of,
)

__all__ = [
    "SPLIT",
    "ByteTokenizer",
    "Corpus",
    "RandomWindowLoader",
    "StreamLoader",
    "TokenizedSplit",
    "attach_tokenizer",
    "build_tokenizer",
    "check_tokenizer_spec",
    "eval_windows",
    "load_corpus",
    "tokenize_split",
    "tokenizer_of",
]
