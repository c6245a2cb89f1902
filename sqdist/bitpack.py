"""The one bit packer: unsigned fields of 1 to 16 bits, densely in uint8, least significant bit first.

Field ``i`` occupies bits ``i * bits ... (i + 1) * bits - 1`` of the stream, its own least significant
bit first; stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``; the last byte is zero-padded. Every
sqdist format that stores bits uses this layout: SQ masks broadcast between ranks (:mod:`sqdist.dist`,
1 bit, on the collective's device), the packed export's codes (:mod:`sqdist.export.bits`) and the
compressed file's centroid indices (:mod:`sqdist.compress.file`).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

MAX_BITS = 16


@functools.lru_cache(maxsize=None)
def _shifts(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # made once per device, so packing never copies a constant from the host
    return torch.arange(n, dtype=dtype, device=device)


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` fields of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return math.ceil(n * bits / 8)


def pack(fields: Tensor, bits: int) -> Tensor:
    """Integer (or bool) ``fields`` of any shape, each in ``[0, 2^bits)``, -> uint8 ``(packed_size(n, bits),)``
    on their device. Values are not checked here: the caller's format does that."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}; allowed: 1 to {MAX_BITS}")
    flat = fields.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8).contiguous()
    if bits == 1:
        stream = flat.to(torch.uint8)
    else:
        wide = torch.uint8 if bits < 8 else torch.int32
        stream = (flat.to(wide)[:, None] >> _shifts(bits, wide, flat.device)).bitwise_and(1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return stream.view(-1, 8).bitwise_left_shift(_shifts(8, torch.uint8, stream.device)).sum(dim=1, dtype=torch.uint8)


def bit_stream(packed: Tensor) -> Tensor:
    """The bits of uint8 ``packed`` as a uint8 0/1 tensor ``(8 * len(packed),)``, stream order."""
    return packed.reshape(-1, 1).bitwise_right_shift(_shifts(8, torch.uint8, packed.device)).bitwise_and(1).reshape(-1)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``n`` fields, int64 ``(n,)`` on ``packed``'s device (uint8 0/1 when
    ``bits == 1``). The byte count is the caller's to check (:func:`packed_size`)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}; allowed: 1 to {MAX_BITS}")
    if bits == 8:
        return packed.reshape(-1)[:n].long()
    stream = bit_stream(packed)
    if bits == 1:
        return stream[:n]
    planes = stream[: n * bits].view(n, bits).long()
    return (planes << _shifts(bits, torch.long, planes.device)).sum(dim=1)


def padding_set(packed: Tensor, bits: int, n: int) -> bool:
    """Whether a bit after the ``n`` fields is set (a corrupted file: :func:`pack` writes zeros there)."""
    return bool(bit_stream(packed)[n * bits:].any())
