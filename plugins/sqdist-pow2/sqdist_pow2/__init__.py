"""k-bit weights whose per-row scale is a power of two.

On integer-only devices a power-of-two scale turns dequantization into a bit
shift. The scale is the smallest power of two not below ``max |W_i| / L``,
so no code saturates.
"""
import torch
from sqdist import Quantizer


class KBitPow2(Quantizer):
    """Symmetric k-bit, ``L = 2^(k-1) - 1`` levels each side, scale ``2^ceil(log2(max|W_i| / L))``."""

    def __init__(self, bits: int = 4):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"kbit_pow2 bits={bits!r}; allowed: an integer from 2 to 8")
        self.bits = bits

    def quantize_codes(self, w):
        levels = 2 ** (self.bits - 1) - 1
        raw = w.abs().amax(dim=1).float() / levels
        scale = torch.where(raw > 0, torch.exp2(torch.ceil(torch.log2(raw.clamp(min=1e-30)))), torch.ones_like(raw))
        codes = torch.clamp(torch.round(w.float() / scale[:, None]), -levels, levels)
        return codes.to(w.dtype), scale.to(w.dtype)

    def config(self):
        return {"bits": self.bits}
