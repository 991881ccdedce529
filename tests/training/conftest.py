"""Fixtures for the trainer tests (helpers live in trainer_helpers.py, a unique module name)."""

from trainer_helpers import tiny_rnn  # noqa: F401  (registers the fixture for this folder)
