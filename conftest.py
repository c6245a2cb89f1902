"""Shared fixtures of the sqdist test suite (tests/ and plugins/*/tests/; keep small; add what several files need)."""
import os

import pytest
import torch

# Without a GPU the Triton kernels (tests marked ``triton``) run in Triton's interpreter. ``triton.jit``
# reads TRITON_INTERPRET when it decorates a kernel, so it is set here, before any test module imports
# sqdist's kernels. Nothing else changes: the interpreter serves CPU tensors only where SQDIST_KERNELS=triton
# asks for it (``auto`` keeps the C++ ops on the CPU), and torch reads the variable only for
# inductor's GPU kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, for draws a test wants to reproduce."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch seed (random weights, inputs)."""
    torch.manual_seed(0)
