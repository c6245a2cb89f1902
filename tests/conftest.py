"""Shared fixtures of the sqdist test suite (keep small; add what several files need)."""
import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, for draws a test wants to reproduce."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch seed (random weights, inputs)."""
    torch.manual_seed(0)
