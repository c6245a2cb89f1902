"""Distributed helpers: one SQ mask everywhere.

Every rank draws masks with its own generator; :func:`broadcast_masks` replaces
them with rank 0's, all layers packed to bits in a single collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pack_bits(mask: Tensor) -> Tensor:
    """Flat bool tensor -> uint8 tensor of ceil(n / 8) bytes (little-endian bits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n]


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_masks(masks: list[Tensor], src: int = 0) -> list[Tensor]:
    """Make every rank's masks equal to rank ``src``'s, in ONE broadcast.

    ``masks`` are bool tensors of any shapes, the same shapes on every rank.
    Returns new tensors on the devices of the inputs. A no-op without a
    process group of more than one rank.
    """
    if not masks or not is_distributed():
        return masks
    sizes = [m.numel() for m in masks]
    packed = pack_bits(torch.cat([m.reshape(-1).cpu() for m in masks])).to(_collective_device())
    dist.broadcast(packed, src=src)
    flat = unpack_bits(packed.cpu(), sum(sizes))
    return [part.reshape(m.shape).to(m.device) for part, m in zip(flat.split(sizes), masks)]
