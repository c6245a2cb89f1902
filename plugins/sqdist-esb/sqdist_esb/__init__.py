"""ESB: Elastic Significant Bit quantization (Gong et al., IEEE TPDS 2022, arXiv 2109.03513).

Values with ``m + 1`` significant bits: for ``b`` bits and ``m`` "linear" bits the level set is
``{0} ∪ ±{k 2^-m} ∪ ±{2^n (1 + j 2^-m)}`` (``k = 1 .. 2^m - 1``, ``j = 0 .. 2^m - 1``,
``n = 0, 1, ...``), the ``2^b - 1`` smallest such values, times a per-row scale ``s``. ``b = 4,
m = 1`` gives ``s {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}``; ``m = 0`` powers of two; ``m >= b - 2``
a uniform grid. The scale is ``s = alpha std(W_i)``; ``alpha`` is fitted per row to the weights
by least squares (never worse than the authors' fixed table, which is a candidate).

Two quantizers, reachable by name through entry points: ``esb`` (weights, straight-through
gradient to ``W``) and ``esb`` in ``sqdist.activation_quantizers`` (a layer's input on the same
level set with a learned step, LSQ-style). The reference code is the authors'
``autoqnn/quantizers/esb.py`` (GongCheng1919/autoqnn-pytorch); the README next to this package
lists where this one differs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from sqdist.plugin import (ActivationQuantizer, Quantizer, QuantizerError, grad_scale, kernel_backend, kernel_mode,
                           plugin_kernel, positive_step)

# The authors' fixed alpha (autoqnn esb.py ``alpha_list``): ALPHA_TABLE[b - 2][m], None where they have none
ALPHA_TABLE = [[1.2240],
               [0.5181, 1.3015],
               [0.0381, 0.4871, 1.4136],
               [None, 0.0391, 0.4828, 1.5460],
               [None, None, 0.0406, 0.4997, 1.6878],
               [None, None, None, 0.0409, 0.5247, 1.8324],
               [None, None, None, None, 0.0412, 0.5527, 1.9757]]
FIT_GRID = (32, 16)  # candidate scales a * max|W_i| / top level: a = 1/32 .. 1.25 coarse, then 17 finer ones


def esb_levels(bits: int, linear_bits: int) -> list[float]:
    """The ``2^(bits-1) - 1`` positive ESB levels, increasing (in units of the scale ``s``)."""
    m, count = linear_bits, 2 ** (bits - 1) - 1
    pos = [k / 2 ** m for k in range(1, 2 ** m)]
    n = 0
    while len(pos) < count:
        pos += [2 ** n * (1 + j / 2 ** m) for j in range(2 ** m)]
        n += 1
    return pos[:count]


def esb_code_levels(bits: int, linear_bits: int) -> list[int]:
    """All ``2^bits - 1`` integer codes, sorted: the levels times ``2^linear_bits``."""
    pos = [int(round(v * 2 ** linear_bits)) for v in esb_levels(bits, linear_bits)]
    return [-c for c in reversed(pos)] + [0] + pos


def table_alpha(bits: int, linear_bits: int) -> float | None:
    """The authors' fixed ``alpha`` for ``(bits, linear_bits)``, or None where their table has none."""
    row = ALPHA_TABLE[bits - 2] if 0 <= bits - 2 < len(ALPHA_TABLE) else []
    return row[linear_bits] if linear_bits < len(row) else None


def check_bits(owner: str, bits, linear_bits, max_code: int = 127) -> None:
    """``bits`` 2..8, ``linear_bits`` 0..bits-1, and the largest integer code within ``max_code``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{owner} bits={bits!r}; allowed: an integer from 2 to 8")
    if isinstance(linear_bits, bool) or not isinstance(linear_bits, int) or not 0 <= linear_bits <= bits - 1:
        raise ValueError(f"{owner} linear_bits={linear_bits!r}; allowed: an integer from 0 to bits - 1 = {bits - 1}")
    top = esb_code_levels(bits, linear_bits)[-1]
    if top > max_code:
        ok = [m for m in range(bits) if esb_code_levels(bits, m)[-1] <= max_code]
        raise ValueError(f"{owner} linear_bits={linear_bits!r}: with bits={bits} the largest level is {top} / "
                         f"2^{linear_bits}, beyond an int8 code; allowed with bits={bits}: linear_bits in {ok}")


def project(v: Tensor, levels: Tensor) -> Tensor:
    """Each entry of ``v`` (any shape) to the nearest of ``{0, ±levels}`` (``levels`` positive, increasing)."""
    grid = torch.cat([levels.new_zeros(1), levels])
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.sign(v) * grid[torch.bucketize(v.abs().contiguous(), mids, out_int32=True)]


def esb_fit_scale(w: Tensor, levels: Tensor, extra: Tensor | None = None, grid: tuple[int, int] = FIT_GRID) -> Tensor:
    """Per row of ``w`` (m, n), the scale ``s`` (m,) with the least ``||w_i - s P(w_i / s)||_2``.

    Candidates ``a max|w_i| / levels[-1]``: ``a = 1/G .. 1.25`` (``G = grid[0]``), then
    ``grid[1] + 1`` values spaced ``1/(G grid[1])`` around the best; ``extra`` (m,), e.g. the
    authors' ``alpha std(w_i)``, is a candidate too, so the fit is never worse than it.
    """
    wf = w.float()
    top = wf.abs().amax(dim=1) / levels[-1]
    safe = torch.where(top > 0, top, torch.ones_like(top))
    coarse, fine = grid
    a = torch.arange(1, int(1.25 * coarse) + 1, dtype=torch.float32, device=w.device) / coarse
    cands = safe[:, None] * a
    best = _best(wf, cands, levels)
    steps = torch.arange(-(fine // 2), fine // 2 + 1, dtype=torch.float32, device=w.device) / (coarse * fine)
    around = best[:, None] + safe[:, None] * steps
    cands = torch.cat([best[:, None], around.clamp(min=1e-30)], dim=1)
    if extra is not None:
        cands = torch.cat([extra.float()[:, None].clamp(min=1e-30), cands], dim=1)  # first: ties keep it
    s = _best(wf, cands, levels)
    return torch.where(top > 0, s, torch.zeros_like(s))


def esb_round(v: Tensor, linear_bits: int, top: float) -> Tensor:
    """Each entry of ``v`` (float32) to the nearest of ``{0, ±esb_levels}`` by arithmetic, what
    :func:`project` finds by search (the same values but on exact midpoints below 1, where ``a + 1``
    rounds first).

    The level set is "``m + 1`` significant bits": from 1 up, each binade ``[2^n, 2^(n+1))`` holds
    ``2^m`` evenly spaced levels, so the nearest level is ``|v|`` with its float mantissa rounded to
    ``m`` bits (an integer add and mask on the float's bits; a carry moves to the next binade);
    below 1 the levels ``k 2^-m`` continue the spacing of ``[1, 2)``, so ``|v| + 1`` is rounded
    there and 1 taken off; then the top level caps it. A midpoint rounds down, as in :func:`project`.
    Four passes in place instead of a binary search and a gather.
    """
    a = v.float().abs()
    small = (a < 1).float()
    a.add_(small)
    bits = a.view(torch.int32)
    bits.add_((1 << (22 - linear_bits)) - 1).bitwise_and_(~((1 << (23 - linear_bits)) - 1))
    return a.sub_(small).clamp_(max=top).copysign_(v)


WARM_SPAN, WARM_COUNT = 0.08, 17  # a refresh: 17 scales from 0.92 to 1.08 times the previous one
# the offsets d of a refresh as Python numbers (torch.linspace's float32 values), read once here: a compiled
# forward cannot read a tensor into Python (.tolist() is a graph break)
WARM_OFFSETS = tuple(torch.linspace(-WARM_SPAN, WARM_SPAN, WARM_COUNT).tolist())


def esb_refit_scale(w: Tensor, levels: Tensor, previous: Tensor, linear_bits: int, span: float = WARM_SPAN,
                    count: int = WARM_COUNT, top: float | None = None) -> Tensor:
    """Per row of ``w`` (m, n), the scale of least squared error among ``previous (1 + d)``,
    ``d`` = ``count`` values evenly spaced in ``[-span, span]`` (the search warm-started from
    ``previous`` (m,); ``previous`` itself first, so it is kept on a tie and the result is never
    worse than it). Rows with ``previous = 0`` are searched from scratch (:func:`esb_fit_scale`).
    The levels are looked up by :func:`esb_round`. ``top``: ``levels[-1]`` as a number (read from ``levels``
    when None; a compiled forward passes it, reading a tensor is a graph break there).
    """
    wf = w.float()
    prev = previous.float().to(w.device)
    safe = torch.where(prev > 0, prev, torch.ones_like(prev))
    d = WARM_OFFSETS if (span, count) == (WARM_SPAN, WARM_COUNT) else torch.linspace(-span, span, count).tolist()
    top = float(levels[-1]) if top is None else top
    best_s, best_e = safe, None
    for f in (0.0, *d):
        s = safe * (1 + f)
        e = (esb_round(wf / s[:, None], linear_bits, top).mul_(s[:, None]).sub_(wf)).square_().sum(dim=1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    cold = prev <= 0
    # compiled: no branch on a tensor's value; the cold search for every row, where() keeps it for cold rows only
    if torch.compiler.is_compiling() or bool(cold.any()):
        best_s = torch.where(cold, esb_fit_scale(w, levels), best_s)
    return torch.where(wf.abs().amax(dim=1) > 0, best_s, torch.zeros_like(best_s))


# the compiled CPU form of esb_codes_refined (esb_cpu.cpp), built on first use; None where it cannot be
kernel, kernel_available = plugin_kernel(Path(__file__).with_name("esb_cpu.cpp"), __name__)


# The kernel as a custom op: torch.compile keeps it whole in the graph (the pybind11 function would stop it)
@torch.library.custom_op("sqdist_esb::refined", mutates_args=())
def refined_op(w: Tensor, scale: Tensor, linear_bits: int, top: float, values: bool) -> tuple[Tensor, Tensor]:
    """``esb_cpu.cpp``'s ``refined``: ``(c or c * s, s)`` for ``w`` (m, n) float32, ``scale`` (m,)."""
    out, s = kernel().refined(w, scale, linear_bits, top, values)
    return out, s


@refined_op.register_fake
def _(w, scale, linear_bits, top, values):
    return w.new_empty(w.shape), w.new_empty(w.shape[:1])


def esb_codes_refined(w: Tensor, levels: Tensor, scale: Tensor, linear_bits: int,
                      values: bool = False, top: float | None = None) -> tuple[Tensor, Tensor]:
    """``(c, s)``: ``c`` (m, n) the levels of ``w_i / scale_i`` (:func:`esb_round`), and per row
    the scale ``s`` (m,) of least ``||w_i - s c_i||_2`` for those levels (closed form
    ``<w_i, c_i> / <c_i, c_i>``; ``scale_i`` where ``c_i = 0``). Never a larger error than ``scale``.
    ``values``: ``c * s[:, None]`` (the quantized weight) instead of ``c``. On the CPU (float32 weights,
    ``SQDIST_KERNELS`` auto or cpu) the compiled ``esb_cpu.cpp`` (two passes a row), on CUDA its Triton twin
    (``esb_triton.py``), else :func:`esb_codes_refined_reference`: the same levels, and the same scales except
    where the two summation orders (both in double, about 1e-13 relative apart) round across a float32 boundary.
    ``top``: ``levels[-1]`` as a number (read from ``levels`` when None)."""
    top = float(levels[-1]) if top is None else top
    if (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and kernel_mode() in ("auto", "cpu")
            and kernel_available()):
        return refined_op(w.detach(), scale.detach(), linear_bits, top, values)
    if w.dtype == torch.float32 and w.dim() == 2 and kernel_backend(w) == "triton":
        from .esb_triton import refined

        return refined(w.detach(), scale.detach(), linear_bits, top, values)
    c, s = esb_codes_refined_reference(w, levels, scale, linear_bits, top)
    return (c * s[:, None] if values else c), s


def esb_codes_refined_reference(w: Tensor, levels: Tensor, scale: Tensor, linear_bits: int,
                                top: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`esb_codes_refined` in PyTorch (``values=False``)."""
    wf = w.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    c = esb_round(wf / safe[:, None], linear_bits, float(levels[-1]) if top is None else top)
    c.mul_((scale > 0)[:, None])
    # the sums in double (the kernel's): s exact to float32; (m, n) float64 temporaries on every device
    num = (wf.double() * c).sum(dim=1).float()
    den = c.double().square().sum(dim=1).float()
    return c, torch.where(den > 0, num / den.clamp(min=1e-30), scale.float())


def _best(w: Tensor, cands: Tensor, levels: Tensor) -> Tensor:
    """Per row, the candidate scale ``cands[i, j]`` with the least squared error (first on a tie)."""
    chunk = max(1, (1 << 20) // max(w.numel(), 1))  # temporaries of ~4 MB
    errors = []
    lv = levels.to(w.device)
    for j in range(0, cands.shape[1], chunk):
        s = cands[:, j:j + chunk].T[:, :, None]  # (c, m, 1)
        errors.append((project(w / s, lv) * s - w).square().sum(dim=2).T)  # (m, c)
    return cands.gather(1, torch.cat(errors, dim=1).argmin(dim=1, keepdim=True)).squeeze(1)


def _alpha_option(owner, alpha, bits, linear_bits):
    if alpha in ("fit", "table"):
        if alpha == "table" and table_alpha(bits, linear_bits) is None:
            raise ValueError(f"{owner} alpha='table': the authors' table has no entry for bits={bits}, "
                             f"linear_bits={linear_bits}; allowed: 'fit' or a number > 0")
        return alpha
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
        return float(alpha)
    raise ValueError(f"{owner} alpha={alpha!r}; allowed: 'fit', 'table' or a number > 0")


def esb_quantize_reference(w: Tensor, levels: Tensor, extra: Tensor | None = None) -> Tensor:
    """The every-step reference: ``s_i P(w_i / s_i)`` with ``s`` searched from scratch (:func:`esb_fit_scale`)."""
    s = esb_fit_scale(w, levels, extra)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = project(w.float() / safe[:, None], levels) * s[:, None]
    return torch.where(s[:, None] > 0, q, torch.zeros_like(q))


class ESB(Quantizer):
    """ESB weights: per row ``Q_i = s_i P(W_i / s_i)``, ``P`` the nearest of ``{0, ±esb_levels}``.

    Export: integer codes (levels times ``2^linear_bits``, :meth:`code_levels`), scale
    ``s_i / 2^linear_bits``. Nothing is learned; the training forward is straight through
    (``dQ/dW = 1``), so SQ applies as for TWN.

    **The fitted scale** (``alpha="fit"``) is searched (:func:`esb_fit_scale`, the table's scale
    among the candidates) when the quantizer first sees the layer's weight (``calibrate``), on
    the first quantization of each SQ stage, and then every ``search_every`` optimizer steps
    (the step comes from the ``set_progress`` hook of ``sqdist.train``; without it there is no
    periodic search): warm-started, 17 scales within 8% of the last one
    (:func:`esb_refit_scale`). It is kept in the buffer ``fitted_scale`` (checkpointed, so a
    resumed run continues exactly). At every quantization the levels are those of ``W / s``
    for the kept ``s``, and the scale is then refitted to the current ``W`` in closed form
    (:func:`esb_codes_refined`): never a larger error than the kept scale. ``search_every=1``
    is the reference: a search from scratch at every quantization, no refinement.

    Args:
        bits: 2..8 (``2^bits - 1`` levels).
        linear_bits: ``m``, 0..bits-1 (``m + 1`` significant bits); the largest code must fit int8.
        alpha: ``"fit"`` (default): ``s_i`` of least squared error for row ``i``, as above;
            ``"table"``: the authors' fixed ``alpha std(W_i)``; a number: that ``alpha`` times
            ``std(W_i)`` (both recomputed at every quantization: they cost one pass).
        search_every: steps between two searches of the fitted scale (1: every quantization).
    """

    def __init__(self, bits: int = 4, linear_bits: int = 1, alpha: float | str = "fit", search_every: int = 16):
        super().__init__()
        check_bits("esb", bits, linear_bits)
        if isinstance(search_every, bool) or not isinstance(search_every, int) or search_every < 1:
            raise ValueError(f"esb search_every={search_every!r}; allowed: an integer >= 1")
        self.bits, self.linear_bits, self.search_every = bits, linear_bits, search_every
        self.alpha = _alpha_option("esb", alpha, bits, linear_bits)
        self.register_buffer("levels", torch.tensor(esb_levels(bits, linear_bits)), persistent=False)
        self._top = esb_levels(bits, linear_bits)[-1]  # levels[-1] as a number (a compiled forward reads no tensor)
        # (rows,): the last searched scale; (2,): (step, SQ stage) of that search, -1 where none
        self.register_buffer("fitted_scale", torch.zeros(0))
        self.register_buffer("searched_at", torch.tensor([-1, -1]))
        self._step: int | None = None
        self._driven = False  # set_progress was called (a bool: a compiled forward is guarded on it, not on the step)
        self._search_due: str | None = None  # "cold" / "warm": set_progress decided a search for the next quantization
        self._layer: tuple = ()  # (the SQ layer,): a plain tuple, not a submodule

    # ------------------------------------------------------------ hooks (sqdist.train, quantize_model)
    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Decides here, outside any compiled graph, whether the next quantization searches (a new SQ stage: from
        scratch; a multiple of ``search_every``: warm-started), and records the search in ``searched_at``; the
        forward reads one flag, not the step number (a compiled forward then has one graph per flag value)."""
        self._step, self._driven = step, True
        searched_step, searched_stage = (int(v) for v in self.searched_at.tolist())
        stage = self._stage()
        if searched_stage != stage:  # a new SQ stage: the weights may move far (a restarted schedule)
            self._search_due = "cold"
        elif step != searched_step and step % self.search_every == 0 and self._search_due is None:
            self._search_due = "warm"
        else:
            return
        self._record(step, stage)

    def on_model_quantized(self, name: str, layers: dict) -> None:
        self._layer = (layers[name],)

    def calibrate(self, weight: Tensor) -> None:
        if self.alpha == "fit":
            self._search(weight.detach().reshape(weight.shape[0], -1), None)
            self._record(-1 if self._step is None else self._step, self._stage())
            self._search_due = None

    # ------------------------------------------------------------ the scale
    def _table_std(self, w: Tensor) -> tuple[float | None, Tensor]:
        std = w.float().std(dim=1, unbiased=False) if w.shape[1] > 1 else w.float().abs()[:, 0]
        return table_alpha(self.bits, self.linear_bits), std

    def _stage(self) -> int:
        ctl = getattr(self._layer[0], "_sq", None) if self._layer else None
        return -1 if ctl is None else int(ctl.stage)

    def _record(self, step: int, stage: int) -> None:
        self.searched_at = torch.tensor([step, stage], device=self.searched_at.device)

    @torch.no_grad()
    def _search(self, w: Tensor, previous: Tensor | None) -> Tensor:
        """Search the scale of ``w`` (from scratch, or warm-started from ``previous``) and keep it in
        ``fitted_scale`` (in place where it has the rows already: a compiled forward writes its buffer)."""
        if previous is None:
            table, std = self._table_std(w)
            s = esb_fit_scale(w, self.levels, None if table is None else table * std)
        else:
            s = esb_refit_scale(w, self.levels, previous, self.linear_bits, top=self._top)
        if self.fitted_scale.shape == s.shape and self.fitted_scale.device == s.device:
            self.fitted_scale.copy_(s)
        else:
            self.fitted_scale = s.float()
        return self.fitted_scale

    def fitted(self, w: Tensor) -> Tensor:
        """The kept scale (rows,) for ``w`` (m, n), searched first when a search is due.

        Only a quantizer that belongs to a layer (``quantize_model``) or is driven by
        ``set_progress`` keeps its scale: a free-standing one, which may be handed the weights of
        one layer after another (post-training quantization does), searches at every call.
        """
        kept = bool(self._layer) or self._driven
        if self.search_every == 1 or not kept or self.fitted_scale.shape != (w.shape[0],):
            if not self._driven and not torch.compiler.is_compiling():
                self._record(-1, self._stage())
            self._search_due = None
            return self._search(w, None)
        if not self._driven:  # no set_progress (quantize_model without the trainer): a new SQ stage searches
            if int(self.searched_at[1]) != self._stage():
                self._record(-1, self._stage())
                return self._search(w, None)
            return self.fitted_scale.to(w.device)
        due, self._search_due = self._search_due, None  # decided by set_progress
        if due is not None:
            return self._search(w, None if due == "cold" else self.fitted_scale.to(w.device))
        return self.fitted_scale.to(w.device)

    def scale(self, w: Tensor) -> Tensor:
        """Per-row scale ``s`` (m,) of ``w`` (m, n), in level units (as :meth:`quantize` uses it)."""
        return self._levels_and_scale(w)[1]

    def _levels_and_scale(self, w: Tensor, values: bool = False) -> tuple[Tensor, Tensor]:
        """``(c, s)``: ``c`` (m, n) the levels of ``w`` in units of ``s`` (m,): ``Q = c s``; ``values``:
        ``(Q, s)`` (between two searches the kernel writes ``Q`` in its second pass)."""
        w = w.detach()
        if self.alpha == "fit" and self.search_every > 1:
            return esb_codes_refined(w, self.levels, self.fitted(w), self.linear_bits, values, top=self._top)
        if self.alpha == "fit":
            s = self.fitted(w)
        else:
            table, std = self._table_std(w)
            s = (table if self.alpha == "table" else self.alpha) * std
        safe = torch.where(s > 0, s, torch.ones_like(s))
        c = project(w.float() / safe[:, None], self.levels)
        c = torch.where(s[:, None] > 0, c, torch.zeros_like(c))
        return (c * s[:, None] if values else c), s

    def quantize_codes(self, w):
        with torch.no_grad():
            c, s = self._levels_and_scale(w)
            codes = (c * 2 ** self.linear_bits).round()
        return codes.to(w.dtype), (s / 2 ** self.linear_bits).to(w.dtype)

    def quantize(self, w):
        """``(Q, scale)``: ``Q = c s`` equals ``codes * scale`` exactly (powers of two apart)."""
        with torch.no_grad():
            q, s = self._levels_and_scale(w, values=True)
            return q.to(w.dtype), (s / 2 ** self.linear_bits).to(w.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "fitted_scale"
        if key in state_dict:  # its shape is the layer's rows, unknown before calibrate
            self.fitted_scale = torch.empty_like(state_dict[key], device=self.fitted_scale.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in ("fitted_scale", "searched_at"):  # a run saved before the scale was kept: search again
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
                self.fitted_scale = torch.zeros(0, device=self.fitted_scale.device)

    def code_levels(self) -> list[int]:
        return esb_code_levels(self.bits, self.linear_bits)

    def config(self):
        return {"bits": self.bits, "linear_bits": self.linear_bits, "alpha": self.alpha,
                "search_every": self.search_every}


class ESBActivation(ActivationQuantizer):
    """A layer's input on the ESB level set, with a learned step ``s`` (one per layer), LSQ-style.

    ``x_q = s P(clip(x / s, lo, hi))``, ``P`` the nearest ESB level: unsigned (after a ReLU)
    ``{0} ∪ the 2^bits - 1 smallest positive ESB values``, signed ``{0, ±esb_levels}``. Gradients
    as LSQ's: ``dx_q/dx = 1`` inside ``[lo, hi]``, 0 outside; ``dx_q/ds = P(v) - v`` inside and the
    bound outside, times ``1 / sqrt(N hi)``. ``s`` starts at the least-squares scale on the
    calibration batch (:func:`esb_fit_scale` on the batch as one row). The eval forward is the
    same projection. Export: refused (the packed format and ONNX hold uniform inputs only).

    Args:
        bits: 2..8; linear_bits: 0..bits-1 (the largest code must fit uint8 unsigned, int8 signed).
    """

    def __init__(self, bits: int = 4, linear_bits: int = 1, signed: str | bool = "auto"):
        super().__init__(bits, signed)
        check_bits("esb activations", bits, linear_bits)
        top = esb_code_levels(bits + 1, linear_bits)[-1]  # unsigned: the 2^bits - 1 smallest positive levels
        if top > 255:
            ok = [m for m in range(bits) if esb_code_levels(bits + 1, m)[-1] <= 255]
            raise ValueError(f"esb activations linear_bits={linear_bits!r}: with bits={bits} the largest unsigned "
                             f"level is {top} / 2^{linear_bits}, beyond a uint8 code; allowed with bits={bits}: "
                             f"linear_bits in {ok}")
        self.linear_bits = linear_bits
        self.step = nn.Parameter(torch.tensor([1.0]))
        self.register_buffer("unsigned_levels", torch.tensor(esb_levels(bits + 1, linear_bits)), persistent=False)
        self.register_buffer("signed_levels", torch.tensor(esb_levels(bits, linear_bits)), persistent=False)
        # the top levels as numbers, unsigned and signed (a compiled forward reads no tensor into Python)
        self._tops = (esb_levels(bits + 1, linear_bits)[-1], esb_levels(bits, linear_bits)[-1])

    def _levels(self) -> Tensor:
        return self.signed_levels if self._signed else self.unsigned_levels

    def _top(self) -> float:
        return self._tops[1] if self._signed else self._tops[0]

    def levels(self, signed):
        top = (esb_levels(self.bits, self.linear_bits) if signed else esb_levels(self.bits + 1, self.linear_bits))[-1]
        code = int(round(top * 2 ** self.linear_bits))
        return (-code, code) if signed else (0, code)

    def scale(self):
        return positive_step(self.step)

    def init_from(self, x):
        flat = x.detach().float().reshape(1, -1)
        s = esb_fit_scale(flat, self._levels().to(flat.device))
        self.step.fill_(float(s[0]) if float(s[0]) > 0 else 1.0)

    def _project(self, x: Tensor, step: Tensor) -> Tensor:
        levels, top = self._levels().to(x.device), self._top()
        lo = -top if self._signed else 0.0
        v = x / step
        inside = (v > lo) & (v < top)
        v = torch.where(inside, v, v.detach().clamp(lo, top))
        return (project(v.detach(), levels) - v).detach() + v  # projection straight through

    def fake_quantize(self, x):
        features = x[0].numel() if x.dim() > 1 else x.numel()
        # the step is |step|: an SGD step across 0 would otherwise send every input of an unsigned
        # layer to 0 (3 of 10 digits W4A4 seeds went dead before this)
        s = grad_scale(positive_step(self.step), 1.0 / math.sqrt(features * self._top()))
        return self._project(x, s) * s

    def forward(self, x):
        if self.observing or (self.training and torch.is_grad_enabled()) or not self._calibrated:
            return super().forward(x)
        with torch.no_grad():
            s = positive_step(self.step.float())
            return (self._project(x.float(), s) * s).to(x.dtype)

    def activation_qparams(self):
        raise QuantizerError("esb activations are non-uniform; the packed format and ONNX hold uniform "
                          "quantized inputs only; allowed: export with a uniform activation quantizer (lsq, pact)")

    def config(self):
        return {**super().config(), "linear_bits": self.linear_bits}
