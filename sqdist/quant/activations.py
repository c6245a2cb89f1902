"""Activation quantizers: LSQ and PACT on the input of every quantized layer.

An activation quantizer fake-quantizes one layer's input per tensor: the value is
``scale * code`` with an integer ``code`` in ``[qmin, qmax]``, the gradient a
straight-through rule of the method. It is a module of its own, paired with any
weight quantizer (``QuantConfig(quantizer="kbit", activations="lsq")``, in a recipe
``quant.activations: {name: lsq, bits: 2}``), registered like weight quantizers::

    from sqdist import ActivationQuantizer, register_activation_quantizer

    @register_activation_quantizer("my_act")
    class MyAct(ActivationQuantizer): ...

or from a package through the entry point group ``sqdist.activation_quantizers``.

Signed or unsigned is decided per layer by :meth:`ActivationQuantizer.calibrate` from
the first batch it sees (``signed="auto"``): an input with no negative value (after
a ReLU) is unsigned, ``[0, 2^b - 1]``; otherwise signed. Every rank must calibrate on
the same batch, or the replicas start from different step sizes:
:func:`calibrate_activations` does it for a model, and ``sqdist.train`` calls it on
rank 0's first training batch before training (every rank reads that batch).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .hooks import QuantizerHooks
from .steps import initial_step, positive_step
from .weights import lsq_quantize
from .registry import register_activation_quantizer

class ActivationQuantizer(QuantizerHooks, nn.Module):
    """Base class of activation quantizers (per tensor).

    A subclass sets :attr:`qmin`/:attr:`qmax` through :meth:`levels`, implements
    :meth:`fake_quantize` (training value and gradient) and :meth:`scale` (the step of one
    code), and may set learned state from data in :meth:`init_from`. ``forward`` in
    training mode with gradients on is ``fake_quantize``; otherwise it is the exact value
    ``clamp(round(x / scale), qmin, qmax) * scale``, which :meth:`activation_qparams`
    describes for export (ONNX ``QuantizeLinear``/``DequantizeLinear``, the packed format).

    Args:
        bits: 2..8.
        signed: ``"auto"`` (decided by :meth:`calibrate`: signed when the batch has a
            negative value), True or False.

    Attributes:
        weight_decay: whether the optimizer's weight decay applies to this quantizer's
            parameters (``sqdist.train``; timm leaves scalars undecayed otherwise).
    """

    quantizer_name: str = "?"
    weight_decay: bool = False

    def __init__(self, bits: int = 4, signed: str | bool = "auto"):
        super().__init__()
        name = type(self).quantizer_name
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"{name} bits={bits!r}; allowed: an integer from 2 to 8")
        if not (signed is True or signed is False or signed == "auto"):
            raise ValueError(f"{name} signed={signed!r}; allowed: 'auto', true, false")
        self.bits, self.signed_mode = bits, signed
        # the state is these buffers (checkpoints, exports, and DDP's broadcast of rank 0's buffers);
        # _signed/_calibrated read them. Shape (1,), not 0-d: DeepSpeed cannot broadcast 0-d tensors over gloo
        self._flag_reads: dict[str, tuple] = {}
        self.register_buffer("signed", torch.tensor([signed is True]))
        self.register_buffer("calibrated", torch.tensor([False]))
        self.observing = False  # set by calibrate_activations: observe the input, pass it unchanged

    # ------------------------------------------------------------ what a subclass defines
    def levels(self, signed: bool) -> tuple[int, int]:
        """``(qmin, qmax)``, the integer codes for a signed or unsigned input."""
        raise NotImplementedError

    def scale(self) -> Tensor:
        """The step between two codes, shape (1,)."""
        raise NotImplementedError

    def fake_quantize(self, x: Tensor) -> Tensor:
        """Training forward: quantized ``x`` (any shape, dim 0 = batch) with the method's gradients."""
        raise NotImplementedError

    def init_from(self, x: Tensor) -> None:
        """Set learned state from a batch of inputs (``qmin``/``qmax`` already decided); no-op here."""

    # ------------------------------------------------------------ shared
    @property
    def _signed(self) -> bool:
        """Signed input (the ``signed`` buffer)."""
        return self._flag("signed")

    @_signed.setter
    def _signed(self, value: bool) -> None:
        self.signed.fill_(bool(value))

    @property
    def _calibrated(self) -> bool:
        """Calibrated (the ``calibrated`` buffer)."""
        return self._flag("calibrated")

    @_calibrated.setter
    def _calibrated(self, value: bool) -> None:
        self.calibrated.fill_(bool(value))

    def _flag(self, name: str) -> bool:
        """The value of the one-element bool buffer ``name``, read again only when the tensor changed
        (another tensor, another storage, or its version counter moved: an in-place write such as
        ``fill_``, ``load_state_dict`` or DDP's broadcast at construction): reading a CUDA tensor is a
        device sync, and this runs in every forward."""
        buffer = self._buffers[name]
        if torch.compiler.is_compiling() and name in self._flag_reads:
            # under torch.compile: the value the last eager read saw, a constant the graph is guarded on (a read
            # of the buffer would be data-dependent control flow; prime_flags reads it before compiling)
            return self._flag_reads[name][3]
        key = (buffer, buffer.data_ptr(), buffer._version)
        seen = self._flag_reads.get(name)
        if seen is None or seen[0] is not buffer or seen[1:] != key[1:]:
            seen = (*key, bool(buffer))
            self._flag_reads[name] = seen
        return seen[3]

    @property
    def qmin(self) -> int:
        return self.levels(self._signed)[0]

    @property
    def qmax(self) -> int:
        return self.levels(self._signed)[1]

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Decide signed/unsigned (``signed="auto"``) and initialize from ``x``, one batch of inputs."""
        if self.signed_mode == "auto":
            self._signed = bool((x < 0).any())
        self.init_from(x.detach())
        self._calibrated = True

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (any shape, dim 0 = batch) quantized per tensor."""
        if self.observing:
            self.calibrate(x)
            return x
        if not self._calibrated:
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise RuntimeError("sqdist: activation quantizer not calibrated; under data parallelism call "
                                   "sqdist.calibrate_activations(model, x) with the same batch on every rank "
                                   "before training (sqdist.train does)")
            self.calibrate(x)  # one process: the first batch it sees
        if self.training and torch.is_grad_enabled():
            return self.fake_quantize(x).to(x.dtype)
        s = self.scale().to(torch.float32)
        return (torch.clamp(torch.round(x.float() / s), self.qmin, self.qmax) * s).to(x.dtype)

    def activation_qparams(self) -> tuple[float, int, int, int]:
        """``(scale, zero_point, qmin, qmax)`` of the eval forward, for export (zero point 0)."""
        return float(self.scale().detach().float()), 0, self.qmin, self.qmax

    def config(self) -> dict:
        """The parameters that rebuild this quantizer with ``create_activation_quantizer``."""
        return {"bits": self.bits, "signed": self.signed_mode}

    def extra_repr(self) -> str:
        decided = "" if self.signed_mode != "auto" or not self._calibrated else f" ({'signed' if self._signed else 'unsigned'})"
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + decided


@register_activation_quantizer("lsq")
class LSQ(ActivationQuantizer):
    """Learned step size quantization (Esser et al., ICLR 2020, arXiv 1902.08153).

    ``x_q = round(clip(x / s, -Q_N, Q_P)) * s`` with a learned step ``s``: unsigned
    ``Q_N = 0, Q_P = 2^b - 1``; signed ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1``. ``s`` starts
    at ``2 mean|x| / sqrt(Q_P)`` on the calibration batch; its gradient (the paper's
    ``round(x/s) - x/s`` inside the range, ``-Q_N`` / ``Q_P`` outside) is scaled by
    ``g = 1 / sqrt(N * Q_P)`` with ``N`` the number of features of one example
    (``x[0].numel()``, the paper's N_F; independent of the per-process batch). The step used is
    ``max(|step|, STEP_FLOOR)`` (:func:`sqdist.quant.steps.positive_step`): an SGD step across 0
    would otherwise leave the layer dead or NaN; an all-zero calibration batch starts it at 1.
    """

    def __init__(self, bits: int = 4, signed: str | bool = "auto"):
        super().__init__(bits, signed)
        self.step = nn.Parameter(torch.tensor([1.0]))  # (1,): one step for the layer

    def levels(self, signed):
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if signed else (0, 2 ** self.bits - 1)

    def scale(self):
        return positive_step(self.step)

    def init_from(self, x):
        self.step.fill_(initial_step(2 * x.abs().float().mean() / math.sqrt(self.qmax)))

    def fake_quantize(self, x):
        features = x[0].numel() if x.dim() > 1 else x.numel()
        return lsq_quantize(x, positive_step(self.step), self.qmin, self.qmax, 1.0 / math.sqrt(features * self.qmax))


@register_activation_quantizer("pact")
class PACT(ActivationQuantizer):
    """Parameterized clipping activation (Choi et al., 2018, arXiv 1805.06085).

    ``y = clip(x, 0, alpha)``, ``y_q = round(y / d) * d`` with ``d = alpha / (2^b - 1)``; the
    rounding is straight through, so ``dy_q/dx = 1`` on ``[0, alpha)`` and 0 elsewhere,
    ``dy_q/dalpha = 1`` where ``x >= alpha`` and 0 elsewhere. ``alpha`` starts at ``alpha``
    (10, the paper's initial value) and takes the optimizer's weight decay (the paper's L2
    regularization of alpha, with the weights' decay). Few inputs reach 10, so alpha moves
    by those few (their summed gradients can be large) and by the weight decay; an SGD step
    can carry it across 0, so the clipping value used is ``|alpha|`` (a negative alpha would
    clip every input to a negative constant: the layer goes dead). On a short schedule
    ``alpha="calibrate"`` starts it where LSQ starts its range: ``Q_P * 2 mean|x| / sqrt(Q_P)`` on the calibration
    batch (``Q_P`` the top code). The paper defines PACT after a
    ReLU; for a signed input sqdist clips symmetrically, ``clip(x, -alpha, alpha)`` with codes
    ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` and ``dy_q/dalpha = -1`` where ``x <= -alpha``.
    """

    weight_decay = True

    def __init__(self, bits: int = 4, signed: str | bool = "auto", alpha: float | str = 10.0):
        super().__init__(bits, signed)
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
        if not (number and 0 < alpha < math.inf or alpha == "calibrate"):
            raise ValueError(f"pact alpha={alpha!r}; allowed: a finite number > 0 or 'calibrate'")
        self.alpha_init = float(alpha) if number else alpha
        start = self.alpha_init if number else 10.0  # "calibrate": set by init_from
        self.alpha = nn.Parameter(torch.tensor([start]))  # (1,): one clipping value for the layer

    def levels(self, signed):
        return (-(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1) if signed else (0, 2 ** self.bits - 1)

    def scale(self):
        return positive_step(self.alpha) / self.qmax

    def init_from(self, x):
        if self.alpha_init == "calibrate":
            self.alpha.fill_(initial_step(2 * x.abs().float().mean() * math.sqrt(self.qmax)))

    def fake_quantize(self, x):
        # the clipping value is |alpha| (floored, positive_step): an SGD step that crosses 0 would otherwise clip every
        # input to a negative constant (seen with alpha=10 at lr 0.05: the layer went dead)
        alpha = positive_step(self.alpha).to(x.dtype)
        low = -alpha if self._signed else torch.zeros_like(alpha)
        y = torch.where(x >= alpha, alpha, torch.where(x <= low, low, x))  # d/dalpha: 1 above, -1 below (signed)
        step = (alpha / self.qmax).detach()
        return y + (torch.round(y.detach() / step) * step - y.detach())  # rounding straight through

    def config(self):
        return {**super().config(), "alpha": self.alpha_init}


@torch.no_grad()
def calibrate_activations(model: nn.Module, x: Tensor) -> int:
    """Calibrate every activation quantizer of ``model`` on one batch ``x`` (model input, dim 0 = batch).

    One forward with BatchNorm on batch statistics (its running statistics are put back
    after) and every other module in eval mode (no dropout); the quantizers see the
    full-precision inputs of their layers and pass them on unchanged. Returns how many
    quantizers were calibrated. Under data parallelism call it with the same ``x`` on
    every rank.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    if not quantizers:
        return 0
    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    model.eval()
    for m in bns:
        m.train()
    for q in quantizers:
        q.observing = True
    try:
        model(x)
    finally:
        for q in quantizers:
            q.observing = False
        for m, buffers in zip(bns, saved):
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        for m, mode in modes.items():
            m.training = mode
    missing = [q for q in quantizers if not q._calibrated]
    if missing:
        raise RuntimeError(f"sqdist: {len(missing)} activation quantizer(s) saw no input in the calibration forward")
    return len(quantizers)


def read_flags(model: nn.Module) -> int:
    """Read every activation quantizer's ``signed``/``calibrated`` flags once, eagerly: a model compiled
    afterwards (``torch.compile``) sees them as constants and recompiles if they change, instead of
    reading a buffer inside the graph. Returns how many quantizers were read."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for q in quantizers:
        q._signed, q._calibrated  # noqa: B018 - the reads fill the cache that a compiled forward uses
    return len(quantizers)
