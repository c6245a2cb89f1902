"""Shared fixtures of the sqdist test suite (keep small; add what several files need). plugins/conftest.py
hands them to the plugins' tests too."""
import os
import socket
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]  # the repository


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    return _free_port()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: small convolutions run faster, and much faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def launch_two():
    """``launch_two(worker, *args, env=None, timeout=600)``: run ``tests/workers/<worker>`` in two CPU processes
    through ``accelerate launch`` (a real gloo process group, a free rendezvous port) from the repository root;
    asserts it exits 0 and returns the ``subprocess.CompletedProcess``. ``env`` adds to the environment."""
    def launch(worker: str, *args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(ROOT / "tests" / "workers" / worker), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**os.environ, **(env or {})})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    return launch
