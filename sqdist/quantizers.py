"""Weight quantizers: BWN, TWN and symmetric k-bit, per output row.

Every quantizer maps a weight seen as a matrix ``(m, n)`` (row ``i`` is output
channel ``i`` flattened) to integer ``codes`` ``(m, n)`` and a per-row ``scale``
``(m,)``; the quantized weight is ``Q = scale[:, None] * codes``. The pure-PyTorch
functions ``*_reference`` below are the ground truth that the fused kernels in
``csrc/`` are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_quantizer


# ---------------------------------------------------------------- references
def bwn_reference(w: Tensor) -> tuple[Tensor, Tensor]:
    """BWN on ``w`` (m, n): ``codes = sign(w)`` (0 counts as +1), ``scale = mean |w_i|``."""
    scale = w.abs().mean(dim=1)
    codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    return codes, scale


def twn_threshold(w: Tensor, delta: float = 0.7, threshold: str = "row") -> Tensor:
    """TWN threshold per row, shape (m, 1).

    ``row``: ``delta * mean |w_i|`` (the paper). ``layer``: ``delta * mean |w - mean w|``
    over the whole layer, the same for every row (the SQ authors' Caffe code).
    """
    if threshold == "row":
        return delta * w.abs().mean(dim=1, keepdim=True)
    return (delta * (w - w.mean()).abs().mean()).expand(w.shape[0], 1)


def twn_reference(w: Tensor, delta: float = 0.7, threshold: str = "row") -> tuple[Tensor, Tensor]:
    """TWN on ``w`` (m, n): codes in {-1, 0, 1}; ``scale_i`` = mean |w_ij| over |w_ij| > t_i."""
    keep = w.abs() > twn_threshold(w, delta, threshold)
    kept = keep.sum(dim=1)
    scale = (w.abs() * keep).sum(dim=1) / kept.clamp(min=1)
    codes = torch.sign(w) * keep
    return codes.to(w.dtype), scale.to(w.dtype)


def kbit_reference(w: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """Symmetric uniform k-bit: ``L = 2^(k-1) - 1`` levels each side, ``scale_i = max |w_i| / L``."""
    levels = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / safe[:, None]), -levels, levels)
    return codes.to(w.dtype), scale.to(w.dtype)


def quantization_error(w: Tensor, q: Tensor, granularity: str = "channel") -> Tensor:
    """Normalized L1 error of ``q`` against ``w`` (both (m, n)).

    ``channel``: ``e_i = ||w_i - q_i||_1 / ||w_i||_1``, shape (m,).
    ``element``: ``e_ij = |w_ij - q_ij| / |w_ij|``, shape (m, n). Where the
    denominator is zero the error is 0 if ``q`` is zero there too (represented
    exactly) and ``inf`` otherwise (BWN maps a zero weight to ``+a``: the
    worst, not the best, candidate for quantization).
    """
    diff = (w - q).abs().float()
    ref = w.abs().float()
    if granularity == "channel":
        diff, ref = diff.sum(dim=1), ref.sum(dim=1)
    at_zero = torch.where(diff > 0, torch.full_like(diff, float("inf")), torch.zeros_like(diff))
    return torch.where(ref > 0, diff / ref.clamp(min=torch.finfo(torch.float32).tiny), at_zero)


# ---------------------------------------------------------------- modules
class Quantizer(nn.Module):
    """Base class of weight quantizers.

    Subclasses implement :meth:`quantize_codes`; everything else follows. A quantizer is a
    ``Module`` so that it may hold learnable state of its own (registered parameters
    are trained with the model) and may override :meth:`calibrate` or :meth:`quantize_input`
    (activation quantization; identity by default).

    Attributes:
        bits: bits per weight in the packed export format.
    """

    bits: int = 32
    quantizer_name: str = "?"

    def quantize_codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (m, n) -> (``codes`` (m, n) integer-valued, ``scale`` (m,))."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (m, n) -> (``Q`` (m, n), ``scale`` (m,)), no gradient."""
        with torch.no_grad():
            codes, scale = self.quantize_codes(w)
            return codes * scale[:, None], scale

    def error(self, w: Tensor, granularity: str = "channel") -> Tensor:
        """Normalized L1 quantization error of ``w`` (m, n): (m,) or (m, n)."""
        with torch.no_grad():
            fused = self._fused([w], error=granularity)
        if fused is not None:
            return fused.errors[0]
        q, _ = self.quantize(w)
        return quantization_error(w, q, granularity)

    def forward(self, weight: Tensor) -> Tensor:
        """Quantized ``weight`` (any shape, dim 0 = rows); gradient passes straight through."""
        fused = self._fused_hybrid(weight, None)
        if fused is not None:
            return fused
        w2d = weight.reshape(weight.shape[0], -1)
        q, _ = self.quantize(w2d)
        return weight + (q.reshape(weight.shape) - weight).detach()

    def hybrid(self, weight: Tensor, mask: Tensor | None = None) -> Tensor:
        """SQ hybrid weight ``where(mask, q(W), W)`` (any shape, dim 0 = rows), straight through.

        ``mask``: None (all quantized), bool (rows,) per channel, or one flag per element
        (the weight's shape or (rows, rest)).
        """
        fused = self._fused_hybrid(weight, mask)
        if fused is not None:
            return fused
        quantized = self(weight)
        if mask is None:
            return quantized
        mask = mask.view(-1, *([1] * (weight.dim() - 1))) if mask.dim() == 1 else mask.reshape(weight.shape)
        return torch.where(mask, quantized, weight)

    def fused_spec(self) -> dict | None:
        """Parameters of the compiled SQ op (csrc/) that computes this quantizer, or None."""
        return None

    # what a subclass may redefine and still be what the fused op computes: nothing of these
    _FUSED_METHODS = ("quantize_codes", "quantize", "error", "forward", "hybrid")

    def _spec(self) -> dict | None:
        """``fused_spec()`` when the compiled op computes exactly this class, else None.

        The class that defines ``fused_spec`` vouches for its own math; a subclass that
        redefines any method on the quantize/error/forward path is not that math any more,
        so it always runs its own code (whatever ``SQDIST_KERNELS`` says).
        """
        cls = type(self)
        owner = next((c for c in cls.__mro__ if "fused_spec" in c.__dict__), None)
        if owner is None or owner is Quantizer:
            return None
        if any(getattr(cls, name) is not getattr(owner, name) for name in self._FUSED_METHODS):
            return None
        return self.fused_spec()

    def _fused(self, ws, **outputs):
        spec = self._spec()
        if spec is None:
            return None
        from . import kernels

        return kernels.quantize_many(ws, **spec, **outputs)

    def _fused_hybrid(self, weight, mask):
        spec = self._spec()
        if spec is None:
            return None
        from . import kernels

        return kernels.hybrid_weight(weight, mask=mask, **spec)

    def calibrate(self, weight: Tensor) -> None:
        """Optional: set internal state from a weight before training (no-op here)."""

    def quantize_input(self, x: Tensor) -> Tensor:
        """Optional activation quantization; identity for weight-only quantizers."""
        return x

    def config(self) -> dict:
        """The parameters that rebuild this quantizer with ``create_quantizer``."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def layer_errors(quantizers: list[Quantizer], weights: list[Tensor], granularity: str = "channel") -> list[Tensor]:
    """``quantizers[i].error(weights[i], granularity)`` for every layer, (m,) or (m, n) each.

    Layers whose quantizers the compiled op implements with the same parameters share one
    call (one launch on a GPU for all of them); the others use their own ``error``.
    """
    out: list[Tensor | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(quantizers):
        spec = q._spec()
        if spec is not None:
            groups.setdefault(tuple(sorted(spec.items())), []).append(i)
    from . import kernels

    with torch.no_grad():
        for key, idx in groups.items():
            fused = kernels.quantize_many([weights[i] for i in idx], **dict(key), error=granularity)
            if fused is not None:
                for i, e in zip(idx, fused.errors):
                    out[i] = e
    return [e if e is not None else q.error(w, granularity) for q, w, e in zip(quantizers, weights, out)]


@register_quantizer("bwn")
class BWN(Quantizer):
    """Binary weights: ``Q_i = a_i sign(W_i)``, ``a_i = mean |W_i|`` (Rastegari et al.)."""

    bits = 1

    def quantize_codes(self, w):
        fused = self._fused([w], codes=True, scales=True)
        return (fused.codes[0], fused.scales[0]) if fused is not None else bwn_reference(w)

    def fused_spec(self):
        return {"kind": "bwn"}


@register_quantizer("twn")
class TWN(Quantizer):
    """Ternary weights (Li et al.): ``Q_ij = a_i sign(W_ij)`` where ``|W_ij| > t_i``, else 0.

    Args:
        delta: threshold factor (0.7 in the paper).
        threshold: ``"row"`` (``t_i = delta * mean |W_i|``, the paper) or ``"layer"``
            (``t = delta * mean |W - mean W|`` over the layer, the SQ authors' code).
    """

    bits = 2

    def __init__(self, delta: float = 0.7, threshold: str = "row"):
        super().__init__()
        if threshold not in ("row", "layer"):
            raise ValueError(f"twn threshold={threshold!r}; allowed: 'row', 'layer'")
        if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 2:
            raise ValueError(f"twn delta={delta!r}; allowed: a number in (0, 2)")
        self.delta, self.threshold = float(delta), threshold

    def quantize_codes(self, w):
        fused = self._fused([w], codes=True, scales=True)
        if fused is not None:
            return fused.codes[0], fused.scales[0]
        return twn_reference(w, self.delta, self.threshold)

    def fused_spec(self):
        return {"kind": "twn", "delta": self.delta, "threshold": self.threshold}

    def config(self):
        return {"delta": self.delta, "threshold": self.threshold}


@register_quantizer("kbit")
class KBit(Quantizer):
    """Symmetric uniform k-bit weights, ``2^(k-1) - 1`` positive levels, per-row scale.

    Args:
        bits: 2..8.
    """

    def __init__(self, bits: int = 4):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"kbit bits={bits!r}; allowed: an integer from 2 to 8")
        self.bits = bits

    def quantize_codes(self, w):
        fused = self._fused([w], codes=True, scales=True)
        return (fused.codes[0], fused.scales[0]) if fused is not None else kbit_reference(w, self.bits)

    def fused_spec(self):
        return {"kind": "kbit", "bits": self.bits}

    def config(self):
        return {"bits": self.bits}
