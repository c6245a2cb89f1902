"""Preemption: notice Slurm's warning signal, checkpoint, requeue.

The sbatch script from :mod:`sqdist.slurm` asks Slurm to send SIGUSR1 to every
training process some minutes before the time limit (``--signal=USR1@secs``),
and Slurm sends SIGTERM when it preempts or cancels a job. Training uses this
module as::

    handler = preempt.install()          # at start, on every rank
    ...
    if all_reduce(handler.requested):    # each step, so all ranks agree
        save_checkpoint()
        if rank == 0:
            preempt.requeue()            # scontrol requeue $SLURM_JOB_ID
        sys.exit(0)

The requeued job runs the same script again with ``train.resume=auto`` and
continues from the checkpoint. The signal handlers only set a flag: doing real
work inside a handler would interrupt a collective half-way on one rank.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Remembers whether a preemption signal arrived. Made by :func:`install`."""

    def __init__(self, signals: tuple[int, ...]):
        self.signals = tuple(signals)
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        """True once any of :attr:`signals` was delivered to this process."""
        return self.received is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def uninstall(self) -> None:
        """Restore the default action of the signals (for tests and reuse)."""
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)


def install(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> PreemptionHandler:
    """Install handlers for ``signals`` (default SIGUSR1, SIGTERM) that only set a flag.

    Call from the main thread (Python's rule for signal handlers). Returns the
    handler; poll ``handler.requested``.
    """
    handler = PreemptionHandler(signals)
    for sig in handler.signals:
        signal.signal(sig, handler._on_signal)
    return handler


def under_slurm() -> bool:
    """True inside a Slurm job (``SLURM_JOB_ID`` is set)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def requeue() -> bool:
    """Ask Slurm to requeue this job. Call on rank 0 only, after the checkpoint is written.

    Every rank then exits with code 0 and Slurm starts the job again (same id,
    ``--open-mode=append`` log, ``SLURM_RESTART_COUNT`` one higher).

    In a job from :mod:`sqdist.slurm` (``SQDIST_REQUEUE_FILE`` is set) this
    writes that file and the batch script runs ``scontrol requeue`` once srun
    has returned: requeueing a running job makes Slurm SIGTERM the launchers
    while the ranks are still shutting down. Elsewhere under Slurm it runs
    ``scontrol requeue $SLURM_JOB_ID`` at once. Returns False, doing nothing,
    outside Slurm or on a rank other than 0. Raises RuntimeError if scontrol
    refuses (e.g. the job was submitted with ``--no-requeue``).
    """
    if not under_slurm() or _rank() != 0:
        return False
    job_id = os.environ["SLURM_JOB_ID"]
    marker = os.environ.get("SQDIST_REQUEUE_FILE")
    if marker:
        Path(marker).write_text(f"{job_id}\n")
        print(f"[sqdist] requeue of Slurm job {job_id} requested (batch script requeues after exit)",
              file=sys.stderr, flush=True)
        return True
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
    print(f"[sqdist] requeued Slurm job {job_id}", file=sys.stderr, flush=True)
    return True


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
