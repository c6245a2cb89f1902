"""k-bit weights and activations whose scales are powers of two.

On integer-only devices a power-of-two scale turns dequantization into a bit
shift. Three quantizers, each reachable by name through an entry point
(``pyproject.toml``):

- ``kbit_pow2`` (weights): the scale is the smallest power of two not below
  ``max |W_i| / L``, so no code saturates. Fixed, nothing learned.
- ``kbit_pow2_learned`` (weights): the exponent of each row's scale is a parameter
  trained with the model. The example of a learned quantizer: it overrides only
  ``quantize_codes`` and returns a scale computed from its own parameter.
- ``act_pow2`` (activations): a layer's input with a power-of-two step fixed on the
  calibration batch. The example of an activation quantizer plugin.
"""
import torch
from torch import nn

from sqdist.plugin import ActivationQuantizer, Quantizer


def _check_bits(name, bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} bits={bits!r}; allowed: an integer from 2 to 8")
    return bits


class KBitPow2(Quantizer):
    """Symmetric k-bit, ``L = 2^(k-1) - 1`` levels each side, scale ``2^ceil(log2(max|W_i| / L))``."""

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = _check_bits("kbit_pow2", bits)

    def quantize_codes(self, w):
        levels = 2 ** (self.bits - 1) - 1
        raw = w.abs().amax(dim=1).float() / levels
        scale = torch.where(raw > 0, torch.exp2(torch.ceil(torch.log2(raw.clamp(min=1e-30)))), torch.ones_like(raw))
        codes = torch.clamp(torch.round(w.float() / scale[:, None]), -levels, levels)
        return codes.to(w.dtype), scale.to(w.dtype)

    def config(self):
        return {"bits": self.bits}


class LearnedKBitPow2(Quantizer):
    """Symmetric k-bit with a learned power-of-two scale per row, ``scale_i = 2^round(t_i)``.

    How a learned method plugs in: ``t`` (one exponent per row) is an ``nn.Parameter`` of
    the quantizer, so it sits in the model's parameters and the optimizer. Only
    ``quantize_codes`` is defined; ``Quantizer.fake_quantize`` then treats the codes as
    straight-through constants and keeps the scale differentiable, so ``t`` gets
    ``dL/dt = sum_j dL/dQ_ij * codes_ij * scale_i * ln 2`` (the rounding of ``t`` is
    straight through). ``calibrate`` starts ``t`` at ``kbit_pow2``'s exponent (until then the
    quantizer is ``kbit_pow2``).
    """

    def __init__(self, bits: int = 4):
        super().__init__()
        self.bits = _check_bits("kbit_pow2_learned", bits)
        self.t = nn.Parameter(torch.zeros(0))  # (rows,), sized by calibrate() from the layer's weight

    def calibrate(self, weight):
        self.t = nn.Parameter(self._fixed_exponent(weight.detach().reshape(weight.shape[0], -1)))

    def _fixed_exponent(self, w):
        raw = w.abs().amax(dim=1).float() / (2 ** (self.bits - 1) - 1)
        return torch.where(raw > 0, torch.ceil(torch.log2(raw.clamp(min=1e-30))), torch.zeros_like(raw))

    def quantize_codes(self, w):
        levels = 2 ** (self.bits - 1) - 1
        t = self.t if self.t.numel() == w.shape[0] else self._fixed_exponent(w.detach())  # not calibrated: kbit_pow2
        exponent = t + (torch.round(t) - t).detach()  # integer value, gradient 1
        scale = torch.exp2(exponent)
        codes = torch.clamp(torch.round(w.detach().float() / scale.detach()[:, None]), -levels, levels)
        return codes.to(w.dtype), scale.to(w.dtype)

    def config(self):
        return {"bits": self.bits}


class ActPow2(ActivationQuantizer):
    """Uniform activations with a power-of-two step fixed at calibration: the smallest ``2^e``
    with ``max |x| <= 2^e * qmax`` on the calibration batch. Nothing is learned; training
    is straight through (gradient 1)."""

    def __init__(self, bits: int = 8, signed="auto"):
        super().__init__(bits, signed)
        self.register_buffer("step", torch.tensor([1.0]))

    def levels(self, signed):
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if signed else (0, 2 ** self.bits - 1)

    def scale(self):
        return self.step

    def init_from(self, x):
        raw = float(x.abs().amax()) / self.qmax
        self.step.fill_(2.0 ** torch.tensor(raw).log2().ceil().item() if raw > 0 else 1.0)

    def fake_quantize(self, x):
        q = torch.clamp(torch.round(x / self.step), self.qmin, self.qmax) * self.step
        return q + (x - x.detach())
