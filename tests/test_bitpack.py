"""The one bit packer (sqdist.bitpack) held to a plain-Python reference, and the three formats that
use it (SQ mask broadcast, packed export codes, compressed-file indices) held to it byte for byte."""
from __future__ import annotations

import pytest
import torch

from sqdist import bitpack
from sqdist.compress.file import pack_indices, unpack_indices
from sqdist.dist import pack_bits, unpack_bits
from sqdist.export import ExportError
from sqdist.export.bits import pack_fields, unpack_fields


def reference_pack(fields: list[int], bits: int) -> bytes:
    """Field i's bit j is stream bit i * bits + j; stream bit k is bit k % 8 of byte k // 8."""
    out = bytearray((len(fields) * bits + 7) // 8)
    for i, value in enumerate(fields):
        for j in range(bits):
            if value >> j & 1:
                k = i * bits + j
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


def test_a_small_case_by_hand():
    # 1, 2, 3 at 2 bits: stream 10 01 11 (+ padding) -> byte 0b00111001
    assert bitpack.pack(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    assert bitpack.pack(torch.tensor([True, False, True, True, False, False, False, False, True]), 1).tolist() == [13, 1]


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_matches_the_reference_and_unpacks(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        fields = torch.randint(0, 1 << bits, (n,), generator=gen)
        packed = bitpack.pack(fields, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == bitpack.packed_size(n, bits)
        assert bytes(packed.tolist()) == reference_pack(fields.tolist(), bits), (bits, n)
        assert torch.equal(bitpack.unpack(packed, bits, n).long(), fields)
        assert not bitpack.padding_set(packed, bits, n)


def test_the_three_formats_write_the_packers_bytes():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(77, generator=gen) > 0.5
    assert torch.equal(pack_bits(mask), bitpack.pack(mask, 1))
    assert torch.equal(unpack_bits(pack_bits(mask), 77), mask)
    for bits in (1, 2, 3, 4, 8):
        fields = torch.randint(0, 1 << bits, (53,), generator=gen).to(torch.uint8)
        assert bytes(pack_fields(fields, bits).tolist()) == reference_pack(fields.tolist(), bits)
        assert torch.equal(unpack_fields(pack_fields(fields, bits), bits, 53), fields)
    for bits in (5, 8, 12, 16):
        indices = torch.randint(0, 1 << bits, (41,), generator=gen)
        assert bytes(pack_indices(indices, bits).tolist()) == reference_pack(indices.tolist(), bits)
        assert torch.equal(unpack_indices(pack_indices(indices, bits), bits, 41), indices)


def test_corrupted_padding_and_sizes_are_refused():
    packed = pack_fields(torch.tensor([3, 1, 2], dtype=torch.uint8), 2)  # 6 bits used, 2 padding bits
    with pytest.raises(ExportError, match="padding bits are set"):
        unpack_fields(packed | 0b11000000, 2, 3)
    with pytest.raises(ExportError, match="expected uint8 of 1 bytes"):
        unpack_fields(torch.zeros(2, dtype=torch.uint8), 2, 3)
    with pytest.raises(ValueError, match="allowed: 1 to 16"):
        bitpack.pack(torch.zeros(3, dtype=torch.long), 17)
