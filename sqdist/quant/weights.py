"""Weight quantizers: BWN, TWN and symmetric k-bit, per output row.

Every quantizer maps a weight seen as a matrix ``(m, n)`` (row ``i`` is output
channel ``i`` flattened) to integer ``codes`` ``(m, n)`` and a per-row ``scale``
``(m,)``; the quantized weight is ``Q = scale[:, None] * codes``. The pure-PyTorch
functions ``*_reference`` below are the ground truth that the fused kernels in
``csrc/`` are tested against. A quantizer may learn (k-bit's ``scale="lsq"``):
see :class:`Quantizer` for how learned state is trained.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .kbit_mse import (MSE_GRID, kbit_codes_at_ratio, kbit_mse_ratio, kbit_mse_reference,  # noqa: F401 (public here)
                       kbit_values_at_ratio)
from .lsq import (grad_scale, lsq_quantize, lsq_quantize_reference, round_pass,  # noqa: F401 (public here)
                  straight_through)
from .hooks import QuantizerHooks
from .registry import register_quantizer
from .steps import initial_step, positive_step


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
class Quantizer(QuantizerHooks, nn.Module):
    """Base class of weight quantizers.

    Subclasses implement :meth:`quantize_codes`; everything else follows: :meth:`quantize`
    (``Q`` without gradient: SQ's selection error, export), :meth:`error`, and the training
    forward :meth:`forward` / :meth:`hybrid`.

    **Learned state.** A quantizer is a ``Module``: ``quantize_model`` makes it the layer's
    submodule ``quantizer``, so its ``nn.Parameter`` s are in ``model.parameters()``, the
    optimizer, DDP's and DeepSpeed's gradient reductions and the checkpoints, under
    ``<layer>.quantizer.<name>``. As soon as one of them requires a gradient, the training
    forward is :meth:`fake_quantize`, whose default makes the *codes* straight-through
    constants and the *scale* differentiable::

        Q = codes.detach() * scale[:, None] + (W - W.detach())

    (the value is ``codes * scale``; ``W`` gets its gradient unchanged, plus what flows
    through ``scale`` if the scale depends on ``W``). So the minimal learned method only
    overrides ``quantize_codes`` and returns a scale computed from its own parameter;
    that parameter then gets its gradient. A method with a gradient rule of its own (LSQ:
    the step size sees the rounding error, the weight gradient is zero where clipped)
    overrides :meth:`fake_quantize` as well. Initial values that depend on the weight
    are set in :meth:`calibrate` (called once per layer by ``quantize_model``; a
    checkpoint's values replace them on resume). SQ works as for BWN/TWN: the selection
    error comes from ``quantize`` with the current parameters, and the hybrid weight takes
    its quantized rows from ``fake_quantize`` (the parameters learn from those rows only).

    Without trainable parameters nothing of the quantizer is in the graph (``W`` gets a
    pure straight-through gradient), and the compiled op computes it where one does
    (:meth:`fused_spec`). A layer's *input* is quantized by an activation quantizer
    (:mod:`sqdist.quant.activations`), a separate module; :meth:`quantize_input` is for a method
    whose input rule belongs to its weight rule.

    **Model hook (optional).** A quantizer whose method spans its model's layers (a regularizer
    on the model's average width) or needs a per-layer value that is the same in every
    process (a seed) may define ``on_model_quantized(name, layers)``: ``quantize_model`` calls
    it once, after all layers are quantized and calibrated, on every weight and activation
    quantizer that has it, with the layer's name and the model's SQ layers ``{name: layer}``
    in module order (``SQController.layers``). No registry outside the model is needed, so
    two models in one process never see each other. A quantizer that keeps references to
    other quantizers must not register them as submodules (they would appear twice in
    ``state_dict``): a plain tuple attribute is not tracked by ``nn.Module``, and
    ``copy.deepcopy`` of the whole model maps it onto the copies.

    Attributes:
        bits: bits per weight in the packed export format.
    """

    bits: int = 32
    quantizer_name: str = "?"
    #: False for a quantizer whose quantized weight does not depend on the layer's weight after
    #: :meth:`calibrate` (SLB: learned logits over levels *are* the weight). ``quantize_model`` then
    #: freezes the layer's weight (``requires_grad=False``: no gradient, not in the optimizer, so
    #: DDP and ZeRO see no unused parameter) and refuses SQ ratios below 1 (no full-precision row to keep).
    uses_weight: bool = True

    def quantize_codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (m, n) -> (``codes`` (m, n) integer-valued, ``scale`` (m,))."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (m, n) -> (``Q`` (m, n), ``scale`` (m,)), no gradient."""
        with torch.no_grad():
            codes, scale = self.quantize_codes(w)
            return codes * scale[:, None], scale

    def fake_quantize(self, w: Tensor) -> Tensor:
        """Training forward of a quantizer with trainable parameters: ``w`` (m, n) -> ``Q`` (m, n).

        Default: codes straight through, scale differentiable (see the class docstring).
        """
        codes, scale = self.quantize_codes(w)
        return codes.detach() * scale[:, None] + (w - w.detach())

    @property
    def learns(self) -> bool:
        """True when the quantizer has a parameter that requires a gradient."""
        return any(p.requires_grad for p in self.parameters())

    def error(self, w: Tensor, granularity: str = "channel") -> Tensor:
        """Normalized L1 quantization error of ``w`` (m, n): (m,) or (m, n)."""
        with torch.no_grad():
            fused = self._fused([w], error=granularity)
        if fused is not None:
            return fused.errors[0]
        q, _ = self.quantize(w)
        return quantization_error(w, q, granularity)

    def forward(self, weight: Tensor) -> Tensor:
        """Quantized ``weight`` (any shape, dim 0 = rows); gradient straight through to ``weight``
        and, when the quantizer learns, to its parameters (:meth:`fake_quantize`)."""
        fused = self._fused_hybrid(weight, None)
        if fused is not None:
            return fused
        w2d = weight.reshape(weight.shape[0], -1)
        if torch.is_grad_enabled() and self.learns:
            return self.fake_quantize(w2d).reshape(weight.shape)
        q, _ = self.quantize(w2d)
        return straight_through(weight, q.reshape(weight.shape))  # exactly Q; the gradient to W is 1

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
        """Parameters of the fused SQ op (C++ on the CPU, Triton on CUDA) that computes this quantizer, or None."""
        return None

    # what a subclass may redefine and still be what the fused op computes: nothing of these
    _FUSED_METHODS = ("quantize_codes", "quantize", "fake_quantize", "error", "forward", "hybrid")

    def _spec(self) -> dict | None:
        """``fused_spec()`` when the compiled op computes exactly this class, else None.

        The class that defines ``fused_spec`` vouches for its own math; a subclass that
        redefines any method on the quantize/error/forward path is not that math any more,
        so it always runs its own code (whatever ``SQDIST_KERNELS`` says). Nor is a quantizer
        with trainable parameters: the op has no gradient for them.
        """
        cls = type(self)
        owner = next((c for c in cls.__mro__ if "fused_spec" in c.__dict__), None)
        if owner is None or owner is Quantizer:
            return None
        if any(getattr(cls, name) is not getattr(owner, name) for name in self._FUSED_METHODS):
            return None
        if self.learns:
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
        """Optional: set learned state from the layer's weight (any shape, dim 0 = rows) before
        training; ``quantize_model`` calls it once per layer (no-op here)."""

    def quantize_input(self, x: Tensor) -> Tensor:
        """Optional quantization of the layer's input that belongs to this weight rule; identity here.

        Plain activation quantization is a separate module (``quant.activations``,
        :mod:`sqdist.quant.activations`), paired with any weight quantizer.
        """
        return x

    def config(self) -> dict:
        """The parameters that rebuild this quantizer with ``create_quantizer``."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def layer_errors(quantizers: list[Quantizer], weights: list[Tensor], granularity: str = "channel") -> list[Tensor]:
    """``quantizers[i].error(weights[i], granularity)`` for every layer, (m,) or (m, n) each.

    Layers whose quantizers the fused op implements with the same parameters share one
    call (one OpenMP loop on the CPU; on a GPU one Triton launch per layer); the others use their own ``error``.
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
    """Symmetric uniform k-bit weights: codes in ``[-L, L]``, ``L = 2^(k-1) - 1``, ``Q = scale * codes``.

    Args:
        bits: 2..8.
        scale: how the scale is chosen.

            - ``"mse"`` (default): per row, the scale with the least ``||W_i - Q_i||_2``,
              found by a short grid search (:func:`kbit_mse_reference`); never worse than
              ``max`` in that error, and at 2 bits far better (``max`` zeroes every weight
              below half the row maximum). In training the search runs every
              ``search_every`` optimizer steps (see below).
            - ``"max"``: per row ``max |W_i| / L``: no weight is clipped; the compiled op
              computes it (fast path).
            - ``"lsq"``: one learned step size per layer (LSQ, Esser et al., ICLR 2020),
              initialized to ``2 mean|W| / sqrt(L)``, with gradient scale
              ``1 / sqrt(numel(W) * L)``; ``Q = round(clip(W / s, -L, L)) * s``. The levels
              are k-bit's symmetric ones (what the packed format stores); LSQ's paper gives
              signed data one more negative level (``-2^(k-1)``). The step used is
              ``max(|step|, STEP_FLOOR)`` (:func:`positive_step`); a zero weight starts it at 1.
        search_every: ``scale="mse"`` in training mode, once the trainer reports the step
            (``set_progress``): the search runs at every step that is a multiple of
            ``search_every`` (and at :meth:`calibrate`); in between, each row keeps the ratio
            ``a_i`` it found (its scale over ``max |W_i| / L``) and the scale follows the row
            maximum, ``a_i max |W_i| / L`` (:func:`kbit_codes_at_ratio`): an approximation of the
            search on weights that moved by fewer than ``search_every`` steps. 1: the search every
            step (:func:`kbit_mse_reference` exactly). Outside training (evaluation, export, a
            quantizer used on its own) the search runs on every call. The ratios are the buffer
            ``mse_ratio`` (in checkpoints, so a resumed run continues exactly).
    """

    SCALES = ("mse", "max", "lsq")

    def __init__(self, bits: int = 4, scale: str = "mse", search_every: int = 16):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"kbit bits={bits!r}; allowed: an integer from 2 to 8")
        if scale not in self.SCALES:
            raise ValueError(f"kbit scale={scale!r}; allowed: {', '.join(repr(v) for v in self.SCALES)}")
        if isinstance(search_every, bool) or not isinstance(search_every, int) or search_every < 1:
            raise ValueError(f"kbit search_every={search_every!r}; allowed: an integer >= 1")
        self.bits, self.scale, self.search_every = bits, scale, search_every
        self.levels = 2 ** (bits - 1) - 1
        if scale == "lsq":
            self.step = nn.Parameter(torch.tensor([1.0]))  # (1,), set from the weight by calibrate()
        self._step = self._searched_at = None  # scale="mse": the trainer's step, the step of the last search
        self._search_driven = self._search_due = False  # set_progress was called; a search is due in the next forward
        self._restored = False  # scale="mse": ratios loaded from a checkpoint, not searched in this process

    def quantize_codes(self, w):
        if self.scale == "lsq":
            step = positive_step(self.step).to(w.dtype)
            codes = torch.clamp(torch.round(w / step), -self.levels, self.levels)
            return codes, step.expand(w.shape[0])
        if self.scale == "mse":
            return self._mse_codes(w)
        fused = self._fused([w], codes=True, scales=True)
        return (fused.codes[0], fused.scales[0]) if fused is not None else kbit_reference(w, self.bits)

    def fake_quantize(self, w):
        if self.scale != "lsq":
            return super().fake_quantize(w)
        return lsq_quantize(w, positive_step(self.step), -self.levels, self.levels, 1.0 / math.sqrt(w.numel() * self.levels))

    def quantize(self, w):
        if self.scale != "mse" or type(self).quantize_codes is not KBit.quantize_codes:  # a subclass's codes rule
            return super().quantize(w)
        with torch.no_grad():  # Q in one pass a row at the row's ratio (kbit_values_at_ratio)
            return kbit_values_at_ratio(w, self._mse_ratio(w), self.bits)

    def _mse_codes(self, w):
        """``scale="mse"``: the codes at :meth:`_mse_ratio`."""
        return kbit_codes_at_ratio(w, self._mse_ratio(w), self.bits)

    def _mse_ratio(self, w):
        """``scale="mse"``: the rows' ratios; searched now, or between two searches the last ones (class docstring)."""
        ratio = getattr(self, "mse_ratio", None)
        if not self.training or not self._search_driven or ratio is None or ratio.shape != (w.shape[0],):
            return kbit_mse_ratio(w.detach(), self.bits)
        if self._search_due:  # decided by set_progress: a compiled forward reads one flag, not the step number
            with torch.no_grad():
                ratio.copy_(kbit_mse_ratio(w.detach(), self.bits))
            self._search_due = False
        return ratio

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """The trainer's hook, before every optimizer step: ``scale="mse"`` searches at multiples of ``search_every``
        (and at the first step reported, unless the ratios come from a checkpoint), in the next training forward."""
        self._step, self._search_driven = step, True
        if self._searched_at != step and (step % self.search_every == 0 or self._searched_at is None and not self._restored):
            self._search_due, self._searched_at = True, step

    def calibrate(self, weight):
        if self.scale == "lsq":
            with torch.no_grad():
                self.step.fill_(initial_step(2 * weight.abs().float().mean() / math.sqrt(self.levels)))
        if self.scale == "mse":
            with torch.no_grad():
                w2d = weight.detach().reshape(weight.shape[0], -1)
                self.register_buffer("mse_ratio", kbit_mse_ratio(w2d, self.bits))
            self._restored = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "mse_ratio"
        if key in missing_keys:  # a checkpoint written before the ratios were kept: search at the next step
            missing_keys.remove(key)
            self._restored = False
        elif key in state_dict:
            self._restored = True  # resumed: the checkpoint's ratios stand until the next multiple of search_every

    def fused_spec(self):
        return {"kind": "kbit", "bits": self.bits} if self.scale == "max" else None

    def config(self):
        if self.scale == "mse":
            return {"bits": self.bits, "scale": self.scale, "search_every": self.search_every}
        return {"bits": self.bits, "scale": self.scale}
