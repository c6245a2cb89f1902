"""Checkpoints that survive a crash at any instant.

Layout (one folder per checkpoint, written under a temporary name and renamed
into place only when complete; ``latest`` is replaced atomically after)::

    RUN/checkpoints/step-0000120/
        model.safetensors     model state_dict (rank 0; replicas are identical)
        optimizer.pt          optimizer state_dict (torch.load(weights_only=True))
        state-rank{r}.pt      per rank: train position, SQ selector, RNG states (Python, numpy,
                              torch, CUDA), the fp16 GradScaler
        meta.json             model/quantizer description (what export needs)
    RUN/checkpoints/latest    "step-0000120"
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from .. import dist as sqdist_dist
from ..runs import write_meta


def _barrier():
    if sqdist_dist.is_distributed():
        torch.distributed.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state_dict(state: dict, path: str) -> None:
    """A model state_dict as safetensors (contiguous copies; tied tensors stored twice)."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, path)


def save_checkpoint(run_dir: str, step: int, *, model_state: dict, optimizer_state: dict | None,
                    rank_state: dict, meta: dict, rank: int = 0, write_extra=None) -> str:
    """Write checkpoint ``step`` (every rank calls this; collective when distributed).

    ``write_extra(folder)``, if given, runs on every rank before the folder is
    renamed into place (the engine's own sharded state, e.g. DeepSpeed's).
    """
    root = os.path.join(run_dir, "checkpoints")
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save(rank_state, os.path.join(tmp, f"state-rank{rank}.pt"))
    if write_extra is not None:
        write_extra(tmp)
    if rank == 0:
        save_state_dict(model_state, os.path.join(tmp, "model.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        write_meta(tmp, meta)
    _barrier()
    if rank == 0:
        if os.path.exists(final):  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), name)
    _barrier()
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder ``checkpoints/latest`` names, or None."""
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isdir(path) else None


def load_checkpoint(path: str, rank: int = 0, weights: bool = True) -> dict:
    """``{"model", "optimizer", "rank_state", "meta"}`` from a checkpoint folder (safe formats only).

    ``weights=False`` skips the model and optimizer files (``None`` for both): under
    DeepSpeed every rank restores its own shards instead of reading the whole model.
    """
    state_file = os.path.join(path, f"state-rank{rank}.pt")
    if not os.path.isfile(state_file):  # resuming on more ranks than saved: start from rank 0's position
        state_file = os.path.join(path, "state-rank0.pt")
    opt = os.path.join(path, "optimizer.pt")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return {
        "model": load_file(os.path.join(path, "model.safetensors")) if weights else None,
        "optimizer": torch.load(opt, weights_only=True) if weights and os.path.isfile(opt) else None,
        "rank_state": torch.load(state_file, weights_only=True),
        "meta": meta,
    }
