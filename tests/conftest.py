"""Suite-wide settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite runs many tiny ops: on a 2-core CI machine (often shared) two intra-op threads spin
    against each other and cost more than the arithmetic, so every test runs with one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
