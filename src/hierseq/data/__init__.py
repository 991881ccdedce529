"""Data: byte tokenizer, text corpora (embedded Austen + user files) and seeded batch loaders."""

from .corpora import SPLIT, Corpus, load_corpus
from .loaders import RandomWindowLoader, StreamLoader, eval_windows
from .tokenizer import ByteTokenizer

__all__ = [
    "SPLIT",
    "ByteTokenizer",
    "Corpus",
    "RandomWindowLoader",
    "StreamLoader",
    "eval_windows",
    "load_corpus",
]
