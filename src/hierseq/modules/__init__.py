"""Shared building blocks. Nothing here imports from ``hierseq.models``."""
