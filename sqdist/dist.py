"""Distributed helpers: one SQ mask everywhere.

Ranks draw the same masks from generators seeded by (seed, step, layer) (see
:mod:`sqdist.sq`); with ``SQDIST_DEBUG=1`` :func:`check_masks_agree` holds every
rank's masks to rank 0's. :func:`broadcast_masks` sends rank 0's masks to every
rank, all layers packed to bits in a single collective. Packing,
the collective and unpacking all run on the collective's device (the GPU under
NCCL), so a step adds no device->host round trip and no host sync of its own.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from . import bitpack


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pack_bits(mask: Tensor) -> Tensor:
    """Flat bool tensor -> uint8 tensor of ceil(n / 8) bytes (little-endian bits), on ``mask``'s device
    (:func:`sqdist.bitpack.pack` at 1 bit)."""
    return bitpack.pack(mask, 1)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor, on ``packed``'s device."""
    return bitpack.unpack(packed, 1, n).bool()


def _collective_device(like: torch.device) -> torch.device:
    """Where the broadcast runs: CUDA under NCCL (unless gloo also serves ``like``, a CPU device), else the CPU."""
    backend = str(dist.get_backend()).lower()  # "nccl", "gloo", or e.g. "cpu:gloo,cuda:nccl"
    if "nccl" in backend and (like.type == "cuda" or "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def masks_to(masks: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """``masks`` on ``device`` in one copy: one concatenation, one transfer, the results views of it.

    A copy up to a GPU does not wait for the GPU (host memory is staged before the call
    returns); a copy down to the host waits, as it must before the host reads it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if all(m.device == device for m in masks):
        return list(masks)
    up = device.type == "cuda"
    if any(m.device != masks[0].device for m in masks):
        return [m.to(device, non_blocking=up) for m in masks]
    flat = torch.cat([m.reshape(-1) for m in masks]).to(device, non_blocking=up)
    return [part.view(m.shape) for part, m in zip(flat.split([m.numel() for m in masks]), masks)]


def broadcast_masks(masks: list[Tensor], src: int = 0, device: torch.device | str | None = None) -> list[Tensor]:
    """Make every rank's masks equal to rank ``src``'s, in ONE broadcast.

    ``masks`` are bool tensors of any shapes, the same shapes on every rank.
    Returns new tensors on ``device``, or by default each on its input's
    device. Without a process group of more than one rank nothing is sent
    (the masks only move to ``device`` when it is given).

    The masks are packed 8 to a byte on the collective's device and unpacked
    there: masks that already live there (CUDA masks under NCCL) never touch
    the host, and host masks go up in one copy that does not wait for the GPU.
    Only results asked for on the host come back down (a copy that must wait).
    """
    if not masks:
        return masks
    if not is_distributed():
        return masks if device is None else masks_to(masks, device)
    sizes = [m.numel() for m in masks]
    where = _collective_device(masks[0].device)
    same = all(m.device == masks[0].device for m in masks)
    flat = torch.cat([m.reshape(-1) for m in (masks if same else masks_to(masks, where))])
    (flat,) = masks_to([flat], where)  # one copy up (none when the masks live there)
    packed = pack_bits(flat)
    dist.broadcast(packed, src=src)
    flat = unpack_bits(packed, sum(sizes))
    if device is None and same:
        device = masks[0].device
    if device is not None:  # one copy for all (none when the collective's device is the one asked for)
        (flat,) = masks_to([flat], device)
        return [part.view(m.shape) for part, m in zip(flat.split(sizes), masks)]
    return [part.view(m.shape).to(m.device) for part, m in zip(flat.split(sizes), masks)]


# ---------------------------------------------------------------- collectives of the post-training walks
# (compress and ptq): no-ops in a single process, so the same code runs under 1 and N ranks.
def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks, in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` with rank ``src``'s, in place; returns ``t``."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def average_gradients(params: list) -> None:
    """Every rank's gradients become the mean over the ranks (one collective; a missing gradient counts as 0)."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad = part.view_as(p).clone()


def broadcast_state_(model: torch.nn.Module) -> None:
    """Make every floating-point parameter and buffer rank 0's (BN statistics drift per rank in training)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                dist.broadcast(t.data, src=0)


def debug_checks() -> bool:
    """True when ``SQDIST_DEBUG`` is set (to anything but 0): run the checks that cost a collective."""
    return os.environ.get("SQDIST_DEBUG", "0") not in ("", "0")


def check_masks_agree(masks: list[Tensor], names: list[str]) -> None:
    """Hold this rank's ``masks`` to rank 0's (one broadcast, one all-reduce; a no-op without a group).

    Raises RuntimeError on every rank, naming the first layer of ``names`` where some rank's
    mask differs from rank 0's (ranks that drew from different seeds or different weights).
    """
    if not masks or not is_distributed():
        return
    reference = broadcast_masks(masks)
    differs = [not torch.equal(mine, ref) for mine, ref in zip(masks, reference)]
    first = differs.index(True) if any(differs) else len(masks)
    flag = torch.tensor([first], dtype=torch.int64, device=_collective_device(masks[0].device))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag) < len(masks):
        raise RuntimeError(f"SQDIST_DEBUG: a rank's SQ mask differs from rank 0's at layer {names[int(flag)]!r} "
                           "(ranks drew from different seeds or different weights)")
