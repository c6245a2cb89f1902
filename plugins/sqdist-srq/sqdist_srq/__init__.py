"""Semi-Relaxed Quantization (SRQ) with DropBits, and learned per-layer bit widths.

Lee, Yun, Hwang, Yang, *Semi-Relaxed Quantization with DropBits* (arXiv 1911.12990), on
Relaxed Quantization (RQ, Louizos et al., arXiv 1810.01875). Two quantizers, each reachable
by name through an entry point (``pyproject.toml``):

- ``srq`` (weights, :class:`SRQWeight`): one learned grid step ``alpha`` and noise scale
  ``sigma`` per layer; optionally DropBits and a learned bit width per layer.
- ``srq`` (activations, :class:`SRQActivation`): the same rule on a layer's input.

In units of the grid step ``s`` (``u = x / s``, ``tau = sigma / s``) a grid code ``i`` in
``[qmin, qmax]`` has the RQ probability (logistic noise on ``x``, the interval of width ``s``
around ``i``, normalized over the grid)::

    pi_i ∝ sigmoid((i + 1/2 - u) / tau) - sigmoid((i - 1/2 - u) / tau)

and SRQ's multi-class straight-through estimator takes the code of highest probability
forward (``argmax pi = clamp(round(u), qmin, qmax)``: equal intervals of a symmetric unimodal
density) and differentiates through ``pi`` backward::

    y = s * (c + E - stopgrad(E)),  c = argmax_i pi_i,  E = sum_i i * pi_i

so ``alpha``, ``sigma`` and ``x`` get gradients through ``pi`` (``alpha`` also through ``s * c``).
Training runs the windowed estimator of :mod:`sqdist_srq.fast` (a hand-written backward over the
codes near the mode, fused in a CPU kernel); ``srq_codes`` / ``_srq_reference`` are the full-grid
reference it is tested against (``SQDIST_KERNELS=reference`` trains on it).
See README.md for DropBits, the learned widths and what was chosen where the paper was not read.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor, nn

from sqdist.plugin import ActivationQuantizer, Quantizer, QuantizerHooks, grad_scale, initial_step, positive_step

from . import draws, fast
from .draws import drop_counts  # noqa: F401 (public: DropBits' counts)
from .fast import TAU_FLOOR, Level  # tau = sigma / s is floored: sigma = 0 gives a one-hot pi, not a division by 0


# ---------------------------------------------------------------- the estimator
def srq_logits(u: Tensor, tau: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """``log pi_i`` up to a constant per element, for the codes ``qmin..qmax``: shape ``(*u.shape, n)``.

    With ``a = (1/2 - d)/tau``, ``b = (-1/2 - d)/tau`` (``d = |i - u|``: the logistic is symmetric),
    ``sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a))`` and ``b - a = -1/tau``
    is the same for every code, so ``log pi_i = logsigmoid(a) + logsigmoid(-b) + const``: no
    difference of two sigmoids, no underflow however far ``u`` is from the grid."""
    codes = torch.arange(qmin, qmax + 1, dtype=u.dtype, device=u.device)
    d = (codes - u.unsqueeze(-1)).abs()
    return nn.functional.logsigmoid((0.5 - d) / tau) + nn.functional.logsigmoid((0.5 + d) / tau)


def srq_probabilities(u: Tensor, tau: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """RQ's categorical ``pi`` over the codes ``qmin..qmax`` for ``u = x / s`` (any shape) and
    ``tau = sigma / s``: shape ``(*u.shape, qmax - qmin + 1)``, each row summing to 1. Far outside
    the grid ``pi`` no longer depends on ``u`` (the noise mass that lands in the grid, a geometric
    tail toward the nearest end): ``x`` gets no gradient there, like LSQ's clipping."""
    return torch.softmax(srq_logits(u, tau, qmin, qmax), dim=-1)


def srq_codes(x: Tensor, step: Tensor, sigma: Tensor, qmin: int, qmax: int,
              offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Reference: ``(c, E)`` in units of ``step`` on the grid ``step * (i + offset)``: ``c = argmax pi =
    clamp(round(x / step - offset), qmin, qmax)`` (no gradient) and ``E = sum_i i pi_i`` (differentiable
    in ``x``, ``step`` and ``sigma``), ``pi`` over the full grid. Computed in float32 at least (a bfloat16
    or float16 input: ``pi``'s logits and softmax would lose too much)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    step, sigma = step.to(dtype), sigma.to(dtype)
    u = x.to(dtype) / step - offset
    c = torch.clamp(torch.round(u.detach()), qmin, qmax)
    pi = srq_probabilities(u, sigma.abs() / step + TAU_FLOOR, qmin, qmax)
    e = (pi * torch.arange(qmin, qmax + 1, dtype=pi.dtype, device=pi.device)).sum(dim=-1)
    return c, e


def _srq_reference(x: Tensor, step: Tensor, sigma: Tensor, qmin: int, qmax: int, offset: float = 0.0) -> Tensor:
    """The full-grid reference of SRQ's straight-through output: value ``step * (c + offset)`` (a grid
    point), gradient through ``pi`` (a ``(numel, qmax - qmin + 1)`` tensor; the ground truth of the
    fast path, ``SQDIST_KERNELS=reference``)."""
    c, e = srq_codes(x, step, sigma, qmin, qmax, offset)
    return (step.to(e.dtype) * (c + offset + (e - e.detach()))).to(x.dtype)


def srq_value(x: Tensor, step: Tensor, sigma: Tensor, qmin: int, qmax: int, offset: float = 0.0) -> Tensor:
    """SRQ's straight-through output on the grid ``step * (i + offset)``, ``i`` in ``[qmin, qmax]``:
    value ``step * (c + offset)``, gradient through ``pi`` (``step``, ``sigma``: ``(1,)``). The fast path
    (window of codes, compiled kernel on the CPU) unless ``SQDIST_KERNELS=reference``."""
    if fast.mode() == "reference":
        return _srq_reference(x, step, sigma, qmin, qmax, offset)
    return fast.srq_grid(x, step, sigma, [Level(1.0, qmin, qmax, offset)])


def name_salt(name: str) -> int:
    """A quantizer's salt from its module name (CRC32: the same in every process, unlike ``hash(str)``)."""
    return zlib.crc32(name.encode())


# ---------------------------------------------------------------- shared: reproducible draws
class _Stochastic(QuantizerHooks):
    """Per-step randomness of one quantizer: a generator seeded from ``(run_seed, seed, step, salt, call)``.

    ``run_seed`` is the run's ``train.seed`` (the trainer's ``set_run_seed`` hook; 0 for a quantizer
    used on its own), ``seed`` the quantizer's parameter (default 0, mixed in), ``salt`` the CRC32 of
    the quantizer's module name in its model (``<layer>.quantizer``, ``<layer>.input_quantizer``), set
    by ``quantize_model``'s ``on_model_quantized`` hook (0 for a quantizer used on its own), ``step``
    comes from the trainer's ``set_progress`` and ``call`` counts forwards since then (micro-batches
    of one step differ). So every rank draws the same DropBits masks (``train.seed``, not the
    ``seed + rank`` of the global RNG), a resumed run draws what the uninterrupted one did, runs
    that differ in ``train.seed`` draw different masks, and a model draws the same whatever ran
    before it in the process.
    """

    def _init_stochastic(self, seed: int, drop_prob: float, drop_schedule: str):
        self._key = draws.new_key()  # (run_seed, seed, step, salt, calls, total): what the draws are seeded from
        self.seed = seed
        self.drop_prob, self.drop_schedule = float(drop_prob), drop_schedule

    def current_drop_prob(self) -> float:
        """DropBits' ``p`` at this step: ``drop_prob``, or with ``drop_schedule="linear"``
        ``drop_prob * (1 - step / total_steps)`` (the last steps train the grid that is evaluated)."""
        return draws.scheduled_drop_prob(self.drop_prob, self.drop_schedule == "linear", self._step, self._total)

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self._step, self._total, self._calls = int(step), int(total_steps), 0

    def set_run_seed(self, seed: int) -> None:
        """The trainer's hook: the run's ``train.seed`` (the same on every rank), DropBits' seed."""
        self._run_seed = int(seed)

    def _draw(self, like: Tensor, f: Tensor | None = None, lo: Tensor | None = None,
              drop_limit: int = 0) -> tuple[Tensor, Tensor]:
        """This forward's draws (``draws.draw``: one custom op, traced whole by ``torch.compile``; eager runs
        its Python function ``draws.draw_eager`` directly)."""
        fn = draws.draw if torch.compiler.is_compiling() else draws.draw_eager
        return fn(like.detach(), self._key, None if f is None else f.detach(), lo, self.drop_prob,
                  self.drop_schedule == "linear", drop_limit)


def _key_field(name: str) -> property:
    i = draws.KEY_FIELDS.index(name)

    def get(self) -> int:
        return int(self._key[i])

    def set(self, value: int) -> None:
        self._key[i] = int(value)

    return property(get, set, doc=f"``{name}`` of the draws' key (an int64 tensor read inside the forward).")


for _name, _attr in (("run_seed", "_run_seed"), ("seed", "seed"), ("step", "_step"), ("salt", "_salt"),
                     ("calls", "_calls"), ("total", "_total")):
    setattr(_Stochastic, _attr, _key_field(_name))


def _check(name: str, key: str, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"{name} {key}={value!r}; allowed: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


DROP_SCHEDULES = ("constant", "linear")


def _check_common(name, bits, drop_prob, drop_min_bits, sigma_init, seed, drop_schedule, min_bits=2):
    _check(name, "drop_schedule", drop_schedule, drop_schedule in DROP_SCHEDULES,
           ", ".join(repr(v) for v in DROP_SCHEDULES))
    _check(name, "bits", bits, _is_int(bits) and min_bits <= bits <= 8, f"an integer from {min_bits} to 8")
    _check(name, "drop_prob", drop_prob, _is_number(drop_prob) and 0 <= drop_prob < 1, "a number in [0, 1)")
    _check(name, "drop_min_bits", drop_min_bits, _is_int(drop_min_bits) and 1 <= drop_min_bits <= bits,
           f"an integer from 1 to bits ({bits})")
    _check(name, "sigma_init", sigma_init, _is_number(sigma_init) and sigma_init > 0, "a number > 0 (sigma / alpha)")
    _check(name, "seed", seed, _is_int(seed) and seed >= 0, "an integer >= 0")


class ClampInward(torch.autograd.Function):
    """``clamp(b, lo, hi)`` whose gradient is 1, except that outside ``[lo, hi]`` a gradient that
    would move ``b`` further out is 0: a learned width cannot drift away from its range (and then
    take many steps to come back), yet is never stuck outside it."""

    @staticmethod
    def forward(ctx, b, lo, hi):
        ctx.save_for_backward(b)
        ctx.lo, ctx.hi = lo, hi
        return b.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (b,) = ctx.saved_tensors
        outward = ((b < ctx.lo) & (grad > 0)) | ((b > ctx.hi) & (grad < 0))  # a descent step moves by -grad
        return torch.where(outward, torch.zeros_like(grad), grad), None, None


# ---------------------------------------------------------------- weights
class SRQWeight(Quantizer, _Stochastic):
    """SRQ weights: grid ``alpha * i``, ``i`` in ``[-2^(b-1), 2^(b-1) - 1]``, one ``alpha`` and
    ``sigma`` per layer (``(1,)`` parameters, ``<layer>.quantizer.alpha`` / ``.sigma``).

    Args:
        bits: the grid's bit width ``B`` (2..8); with ``learn_bits`` the widest a layer may get.
        drop_prob: DropBits' ``p`` (0: off). In training each weight drops ``j`` low bits with
            ``P(j >= k) = p^k``: it is quantized on the grid of ``w - j`` bits (same range, step
            ``alpha * 2^(B - w + j)``). Never below ``drop_min_bits``.
        drop_min_bits: the narrowest grid DropBits may leave (1..bits).
        drop_schedule: ``"constant"`` (``p`` throughout) or ``"linear"`` (``p`` decays to 0 at the last step).
        learn_bits: learn the layer's width in ``[min_bits, bits]`` (parameter ``soft_bits``, see README).
        min_bits: the narrowest learned width (2..bits-1).
        bit_reg: the regularizer's weight ``lambda`` (>= 0).
        target_bits: the target average width, weighted by the layers' weight counts.
        sigma_init: ``sigma`` starts at ``sigma_init * alpha`` (1/3).
        seed: mixed with the run's ``train.seed`` into DropBits' and the width's per-step draws (see ``_Stochastic``).

    ``min_bits``, ``bit_reg`` and ``target_bits`` other than their defaults need ``learn_bits``.
    ``bits`` is the layer's current integer width (``bits`` itself without ``learn_bits``).
    The learned-width layers of one model form a group (``quantize_model``'s
    ``on_model_quantized`` hook); the regularizer is over the group only.
    """

    def __init__(self, bits: int = 2, drop_prob: float = 0.0, drop_min_bits: int = 1, drop_schedule: str = "constant",
                 learn_bits: bool = False, min_bits: int = 2, bit_reg: float = 0.0, target_bits: float | None = None,
                 sigma_init: float = 1 / 3, seed: int = 0):
        super().__init__()
        name = "srq"
        _check_common(name, bits, drop_prob, drop_min_bits, sigma_init, seed, drop_schedule)
        _check(name, "learn_bits", learn_bits, isinstance(learn_bits, bool), "true or false")
        if not learn_bits:  # these would be ignored: refuse rather than train something else than asked
            for key, value, default in (("min_bits", min_bits, 2), ("bit_reg", bit_reg, 0.0), ("target_bits", target_bits, None)):
                if value != default or (default is None) != (value is None):
                    raise ValueError(f"{name} {key}={value!r} needs learn_bits=true; allowed with learn_bits=false: "
                                     f"{default!r} (the default)")
        if learn_bits:
            _check(name, "min_bits", min_bits, _is_int(min_bits) and 2 <= min_bits < bits,
                   f"an integer from 2 to bits - 1 ({bits - 1}) (learn_bits needs bits >= 3)")
            _check(name, "bit_reg", bit_reg, _is_number(bit_reg) and bit_reg >= 0, "a number >= 0")
            _check(name, "target_bits", target_bits,
                   target_bits is None and bit_reg == 0 or _is_number(target_bits) and min_bits <= target_bits <= bits,
                   f"a number from min_bits ({min_bits}) to bits ({bits}) (required when bit_reg > 0)")
        self.max_bits, self.drop_min_bits = bits, drop_min_bits
        self.learn_bits, self.min_bits = learn_bits, min_bits
        self.bit_reg = float(bit_reg) if learn_bits else 0.0
        self.target_bits = None if target_bits is None or not learn_bits else float(target_bits)
        self.sigma_init = float(sigma_init)
        self._init_stochastic(seed, drop_prob, drop_schedule)
        self.alpha = nn.Parameter(torch.tensor([1.0]))  # (1,): the grid step at ``bits``; set by calibrate()
        self.sigma = nn.Parameter(torch.tensor([self.sigma_init]))  # (1,): logistic noise scale
        if learn_bits:
            self.soft_bits = nn.Parameter(torch.tensor([float(bits)]))  # (1,): the width, relaxed
        self.numel = 0  # the layer's weight count, from calibrate (the regularizer's weighting)
        self._group = (self,)  # the learned-width SRQ layers of this model, set by on_model_quantized (a plain
        # tuple, not submodules: nn.Module does not track it, state_dict has each quantizer once)

    # ------------------------------------------------------------ the grid at a width
    def _range(self, width: int) -> tuple[int, int]:
        return -(2 ** (width - 1)), 2 ** (width - 1) - 1

    def _clamped_bits(self) -> Tensor:
        return ClampInward.apply(self.soft_bits, float(self.min_bits), float(self.max_bits))

    @property
    def bits(self) -> int:
        """The current integer width (what export packs and summary.json reports)."""
        if not self.learn_bits:
            return self.max_bits
        return int(math.floor(float(self.soft_bits.detach().clamp(self.min_bits, self.max_bits)) + 0.5))

    def code_levels(self) -> list[int]:
        lo, hi = self._range(self.bits)  # RQ's grid is not the symmetric range: export stores indices into it
        return list(range(lo, hi + 1))

    def quantize_codes(self, w):
        width = self.bits
        step = (positive_step(self.alpha) * 2.0 ** (self.max_bits - width)).to(w.dtype)
        lo, hi = self._range(width)
        codes = torch.clamp(torch.round(w / step), lo, hi)
        return codes, step.expand(w.shape[0])

    def calibrate(self, weight):
        w = weight.detach().float().reshape(-1)
        self.numel = w.numel()
        with torch.no_grad():
            self.alpha.fill_(_mse_step(w, *self._range(self.max_bits)))
            self.sigma.fill_(self.sigma_init * float(self.alpha))

    def on_model_quantized(self, name: str, layers: dict) -> None:
        """``quantize_model``'s hook: the DropBits salt from the module name, and the group of this
        model's learned-width SRQ layers (module order; the first returns the regularizer)."""
        self._salt = name_salt(f"{name}.quantizer")
        if self.learn_bits:
            self._group = tuple(layer.quantizer for layer in layers.values()
                                if isinstance(layer.quantizer, SRQWeight) and layer.quantizer.learn_bits)

    # ------------------------------------------------------------ training
    def _levels(self) -> list[Level]:
        """The grids an element may train on, by index: ``v`` (1..B) the ``v``-bit grid of export
        (codes ``[-2^(v-1), 2^(v-1) - 1]``), ``9 + v`` the symmetric ``v``-bit grid DropBits leaves
        (points ``(k + 1/2)`` for the same codes), both of step ``alpha * 2^(B - v)``: points of the
        ``B``-bit grid, ``2^v`` levels, the dropped one symmetric around 0 (no bias for a symmetric input)."""
        table = [Level(1.0, 0, 0)] * 18
        for v in range(1, self.max_bits + 1):
            lo, hi = self._range(v)
            table[v] = Level(2.0 ** (self.max_bits - v), lo, hi)
            table[9 + v] = Level(2.0 ** (self.max_bits - v), lo, hi, 0.5)
        return table

    def fake_quantize(self, w):
        g = 1.0 / math.sqrt(w.numel() * (2 ** (self.max_bits - 1)))  # LSQ's gradient scale, for alpha and sigma
        alpha, sigma = grad_scale(positive_step(self.alpha), g).to(w.dtype), grad_scale(self.sigma, g).to(w.dtype)
        levels = self._levels()
        if not self.training:
            return _quantize(w, alpha, sigma, [levels[self.bits]])
        f, soft, width, lo = None, None, None, None
        if self.learn_bits:
            b = self._clamped_bits()
            lo = torch.clamp(torch.floor(b.detach()), max=self.max_bits - 1)  # (1,): an integer, in b's dtype
            f = b - lo  # in [0, 1]: the probability that an element trains at lo + 1 bits
            soft = torch.cat([lo, lo + 1]).long()  # the width's gradient: d/df of (1 - f) y_lo + f y_hi, values fixed
        if lo is None and self.drop_prob == 0:
            return _quantize(w, alpha, sigma, [levels[self.max_bits]])
        # uint8: the index of an integer grid, as it is; lo + 1 with probability f (fast.random_widths)
        width, drop = self._draw(w, f, lo, self.max_bits)
        width = None if lo is None else width
        if self.drop_prob > 0:  # DropBits on (its scheduled p may have decayed to 0: then nothing is dropped)
            width = torch.full(w.shape, self.max_bits, dtype=torch.int64, device=w.device) if width is None \
                else width.long()
            kept = torch.maximum(width - drop, torch.clamp(width, max=self.drop_min_bits))
            index = kept + 9 * (kept < width)
        else:
            index = width
        return _quantize(w, alpha, sigma, levels, index, f, soft)

    # ------------------------------------------------------------ trainer hooks
    def expected_bits(self) -> Tensor:
        """The width in training, ``E[width] = soft_bits`` clamped to ``[min_bits, bits]`` (1,)."""
        return self._clamped_bits() if self.learn_bits else torch.tensor([float(self.max_bits)])

    def _average(self, soft: bool = True):
        """The group's weight-count weighted mean width: of ``E[width]`` (a differentiable (1,)
        tensor) or, ``soft=False``, of the integer widths (a float)."""
        members = [q for q in self._group if q.numel]
        total = sum(q.numel for q in members)
        if soft:
            return sum(q.numel * q.expected_bits() for q in members) / total
        return sum(q.numel * q.bits for q in members) / total

    def regularization(self):
        """``bit_reg * max(0, avg - target_bits)``, ``avg`` the weight-count weighted mean of
        ``E[width]`` over this model's learned-width layers, returned whole by the group's first
        layer (None from the others): computed once per micro-batch, no host sync, and every
        layer's ``soft_bits`` gets ``bit_reg * n_l / N`` while ``avg > target_bits``."""
        if not (self.learn_bits and self.bit_reg > 0 and self.training and self.numel) or self._group[0] is not self:
            return None
        return self.bit_reg * torch.relu(self._average() - self.target_bits).sum()

    def metrics(self):
        out = {"bits": float(self.bits)}
        if self.learn_bits:
            out["soft_bits"] = float(self.soft_bits.detach())
            if self._group[0] is self and self.numel:  # the model's averages, once (the group's first layer)
                out["avg_bits"] = float(self._average(soft=False))
                out["avg_soft_bits"] = float(self._average().detach())
        return out

    def config(self):
        return {"bits": self.max_bits, "drop_prob": self.drop_prob, "drop_min_bits": self.drop_min_bits,
                "drop_schedule": self.drop_schedule, "learn_bits": self.learn_bits, "min_bits": self.min_bits,
                "bit_reg": self.bit_reg, "target_bits": self.target_bits, "sigma_init": self.sigma_init,
                "seed": self.seed}


def _mse_step(w: Tensor, qmin: int, qmax: int, candidates: int = 64) -> float:
    """The grid step with the least ``||w - Q||_2`` over ``t * max|w| / qmax``, ``t`` in (0, 1]."""
    top = float(w.abs().max())
    if top == 0:
        return 1.0
    steps = torch.linspace(1.0 / candidates, 1.0, candidates, dtype=w.dtype) * top / max(qmax, 1)
    errors = [float((torch.clamp(torch.round(w / s), qmin, qmax) * s - w).square().sum()) for s in steps]
    return float(steps[min(range(len(errors)), key=errors.__getitem__)])


# ---------------------------------------------------------------- activations
class SRQActivation(ActivationQuantizer, _Stochastic):
    """SRQ on a layer's input, per tensor: codes ``[-2^(b-1), 2^(b-1) - 1]`` (signed) or
    ``[0, 2^b - 1]`` (unsigned), step ``alpha`` and noise ``sigma`` learned (``(1,)`` each).

    ``alpha`` starts at LSQ's ``2 mean|x| / sqrt(qmax)`` on the calibration batch, ``sigma`` at
    ``sigma_init * alpha``. DropBits as for weights (``drop_prob``, ``drop_min_bits``, ``drop_schedule``). The eval
    forward is ``clamp(round(x / alpha), qmin, qmax) * alpha``, SRQ's argmax, which export stores.
    """

    def __init__(self, bits: int = 2, signed: str | bool = "auto", drop_prob: float = 0.0, drop_min_bits: int = 1,
                 drop_schedule: str = "constant", sigma_init: float = 1 / 3, seed: int = 0):
        _check_common("srq", bits, drop_prob, drop_min_bits, sigma_init, seed, drop_schedule)
        super().__init__(bits, signed)
        self.drop_min_bits, self.sigma_init = drop_min_bits, float(sigma_init)
        self._init_stochastic(seed, drop_prob, drop_schedule)
        self.alpha = nn.Parameter(torch.tensor([1.0]))
        self.sigma = nn.Parameter(torch.tensor([self.sigma_init]))

    def on_model_quantized(self, name: str, layers: dict) -> None:
        """``quantize_model``'s hook: the DropBits salt from the module name."""
        self._salt = name_salt(f"{name}.input_quantizer")

    def levels(self, signed):
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if signed else (0, 2 ** self.bits - 1)

    def scale(self):
        return positive_step(self.alpha)

    def init_from(self, x):
        self.alpha.fill_(initial_step(2 * float(x.abs().float().mean()) / math.sqrt(self.qmax)))
        self.sigma.fill_(self.sigma_init * float(self.alpha))

    def _levels(self) -> list[Level]:
        """By DropBits' count ``j`` of dropped bits: the ``(bits - j)``-bit grid of step ``alpha * 2^j``,
        for signed inputs the symmetric one (points ``(k + 1/2)``, as for weights), for unsigned
        inputs ``[0, 2^(bits - j) - 1]`` (0, where a ReLU puts most inputs, stays a point)."""
        table = [Level(1.0, self.qmin, self.qmax)]
        for j in range(1, self.bits):
            lo, hi = _sub_range(self.bits - j, self._signed)
            table.append(Level(2.0 ** j, lo, hi, 0.5 if self._signed else 0.0))
        return table

    def fake_quantize(self, x):
        features = x[0].numel() if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(features * self.qmax)
        alpha, sigma = grad_scale(positive_step(self.alpha), g).to(x.dtype), grad_scale(self.sigma, g).to(x.dtype)
        levels = self._levels()
        if self.drop_prob == 0 or not self.training:  # DropBits off (its scheduled p may decay to 0: then on, dropping nothing)
            return _quantize(x, alpha, sigma, levels[:1])
        drop = self._draw(x, drop_limit=self.bits - self.drop_min_bits)[1]
        return _quantize(x, alpha, sigma, levels, drop)

    def config(self):
        return {**super().config(), "drop_prob": self.drop_prob, "drop_min_bits": self.drop_min_bits,
                "drop_schedule": self.drop_schedule, "sigma_init": self.sigma_init, "seed": self.seed}


def _sub_range(width: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2 ** width - 1)


def _quantize(x: Tensor, alpha: Tensor, sigma: Tensor, levels: list[Level], index: Tensor | None = None,
              f: Tensor | None = None, soft: Tensor | None = None) -> Tensor:
    """Each element of ``x`` on its level (``fast.srq_grid``), or ``SQDIST_KERNELS=reference``:
    each level's full-grid reference output, selected per element (the ground truth)."""
    if fast.mode() != "reference":
        return fast.srq_grid(x, alpha, sigma, levels, index, f, soft)

    def value(i: int) -> Tensor:
        lv = levels[i]
        return _srq_reference(x, alpha * lv.mult, sigma, lv.qmin, lv.qmax, lv.offset)

    if index is None:
        y = value(0)
    else:
        y = torch.zeros_like(x)
        for i in torch.unique(index).tolist():
            y = torch.where(index == i, value(i), y)
    if soft is not None:
        soft = [int(v) for v in (soft.tolist() if isinstance(soft, Tensor) else soft)]
        s = ((1 - f) * value(soft[0]).detach() + f * value(soft[1]).detach()).to(x.dtype)
        y = y + (s - s.detach())
    return y
