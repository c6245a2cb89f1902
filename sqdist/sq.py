"""Stochastic Quantization selection (Dong et al., BMVC 2017).

error -> probability -> roulette without replacement -> mask. The selector owns
the ratio schedule; each layer's draw at a step comes from a generator seeded by
(seed, step, layer), so ranks that hold the same weights and the same seed draw
the same masks with no collective, in any order (all layers at once under DDP,
layer by layer inside the forward under ZeRO-3 and FSDP2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

PROBABILITIES = ("constant", "linear", "sigmoid", "softmax")
GRANULARITIES = ("channel", "element")
VARIANTS = ("paper", "authors")
SCHEDULE_UNITS = ("epoch", "step")
EPS = 1e-7


def selection_probability(error: Tensor, rule: str = "linear", eps: float = EPS) -> Tensor:
    """``p_i = f(x_i) / sum_j f(x_j)`` with ``x_i = 1 / (e_i + eps)`` (1-D ``error``)."""
    x = 1.0 / (error.double() + eps)
    if rule == "constant":
        f = torch.ones_like(x)
    elif rule == "linear":
        f = x
    elif rule == "sigmoid":
        f = torch.sigmoid(x)
    elif rule == "softmax":
        return torch.softmax(x, dim=0)
    else:
        raise ValueError(f"sq.probability={rule!r}; allowed: {', '.join(PROBABILITIES)}")
    return f / f.sum()


def roulette(p: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``k`` draws without replacement from weights ``p`` (1-D).

    Same distribution as ``torch.multinomial(p, k, replacement=False)``: each
    draw picks ``i`` with probability ``p_i`` renormalized over the rows not yet
    drawn. Above multinomial's 2^24 categories this uses the Gumbel-top-k form
    of the same sequential draw.
    """
    n = p.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=p.device)
    if k >= n:
        return torch.arange(n, device=p.device)
    if n <= 2**24:
        p32 = p.float()
        # multinomial ranks zero-probability rows in index order, not at random
        if bool((p32 > 0).all()):
            return torch.multinomial(p32, k, replacement=False, generator=generator)
    # Gumbel-top-k in float64: keeps the small p that float32 rounds to 0 (softmax of a
    # wide range of 1/e); rows with p = 0 even in float64 come last, in random order
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=p.device).clamp_(min=1e-300)
    keys = torch.log(p.double().clamp(min=torch.finfo(torch.float64).tiny)) - torch.log(-torch.log(u))
    return torch.topk(keys, k).indices


def select(error: Tensor, ratio: float, rule: str = "linear", variant: str = "paper",
           generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask (shape of ``error``): True where the weight is quantized.

    ``paper``: draw ``round(ratio * m)`` rows to quantize with ``p = f(1/(e+eps))``.
    ``authors``: draw the ``m - round(ratio * m)`` rows that stay full precision,
    with probability proportional to the error (the SQ authors' Caffe code).
    """
    flat = error.reshape(-1)
    m = flat.numel()
    n_q = int(round(ratio * m))  # Python rounds half to even, like the design's round()
    mask = torch.zeros(m, dtype=torch.bool, device=flat.device)
    if variant == "paper":
        mask[roulette(selection_probability(flat, rule), n_q, generator)] = True
    elif variant == "authors":
        # rows with zero error can still be drawn; an infinite error (a zero weight BWN makes
        # nonzero) is the most likely to stay full precision, without overflowing the sum
        p = flat.double().nan_to_num(posinf=torch.finfo(torch.float64).max / (m + 1)) + EPS
        mask[:] = True
        mask[roulette(p / p.sum(), m - n_q, generator)] = False
    else:
        raise ValueError(f"sq.variant={variant!r}; allowed: {', '.join(VARIANTS)}")
    return mask.reshape(error.shape)


@dataclass(frozen=True)
class SQConfig:
    """How SQ selects: the ratio schedule, the probability rule, the granularity.

    ``ratios[s]`` is the fraction quantized in stage ``s``; a stage lasts ``stage_length``
    units (``epoch`` or ``step``), and the last stage lasts to the end of training.
    """

    ratios: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
    stage_length: int = 1
    unit: str = "epoch"
    probability: str = "linear"
    granularity: str = "channel"
    variant: str = "paper"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if not self.ratios or any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"sq.ratios={list(self.ratios)!r}; allowed: a non-empty list of numbers in [0, 1]")
        for key, value, allowed in (("probability", self.probability, PROBABILITIES),
                                    ("granularity", self.granularity, GRANULARITIES),
                                    ("variant", self.variant, VARIANTS), ("unit", self.unit, SCHEDULE_UNITS)):
            if value not in allowed:
                raise ValueError(f"sq.{key}={value!r}; allowed: {', '.join(allowed)}")
        if isinstance(self.stage_length, bool) or not isinstance(self.stage_length, int) or self.stage_length < 1:
            raise ValueError(f"sq.stage_length={self.stage_length!r}; allowed: an integer >= 1")


class SQSelector:
    """Draws SQ masks and tracks the ratio schedule.

    ``advance(unit)`` is called once per finished step and once per finished epoch;
    only the configured unit moves the schedule. The mask of layer ``layer`` at step
    ``step`` is drawn with :func:`draw_generator` ``(config.seed, step, layer)``: a
    function of those three numbers and the error alone, so the state to save is the
    position in the schedule.
    """

    def __init__(self, config: SQConfig = SQConfig()):
        self.config = config
        self.units_done = 0
        self.step = 0

    @property
    def units_done(self) -> int:
        return self._units_done

    @units_done.setter
    def units_done(self, value: int) -> None:
        # the stage is kept, not derived at each read: a compiled forward reads the ratio, and torch.compile
        # guards on every number it reads, so a derived stage recompiled the model at every unit (each epoch)
        self._units_done = value
        self._stage = min(value // self.config.stage_length, len(self.config.ratios) - 1)

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def ratio(self) -> float:
        return self.config.ratios[self.stage]

    def advance(self, unit: str = "step") -> bool:
        """Count one finished ``unit``; True when this starts a new stage."""
        if unit == "step":
            self.step += 1
        if unit != self.config.unit:
            return False
        before = self.stage
        self.units_done += 1
        return self.stage != before

    def draw(self, error: Tensor, layer: int = 0) -> Tensor:
        """A mask for layer number ``layer``'s ``error`` at the current ratio and step (True = quantized)."""
        ratio = self.ratio
        if ratio >= 1.0:
            return torch.ones(error.shape, dtype=torch.bool, device=error.device)
        if ratio <= 0.0:
            return torch.zeros(error.shape, dtype=torch.bool, device=error.device)
        generator = draw_generator(self.config.seed, self.step, layer)
        cpu_mask = select(error.detach().cpu(), ratio, self.config.probability, self.config.variant, generator)
        return cpu_mask.to(error.device)

    def state_dict(self) -> dict:
        return {"units_done": self.units_done, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints of sqdist <= 0.4 also hold "rng", the state of one generator for all draws: unused now
        self.units_done = int(state["units_done"])
        self.step = int(state["step"])


_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that spreads nearby inputs apart."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def draw_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """The CPU generator of one layer's draw at one step, the same on every rank for the same numbers.

    Seeded from (seed, step, layer) alone (no state carried between draws): ranks holding the
    same weights need no collective to agree, and the order of the draws does not matter.
    """
    key = _mix64(_mix64(_mix64(int(seed) & _MASK64) ^ (int(step) & _MASK64)) ^ (int(layer) & _MASK64))
    return torch.Generator().manual_seed(key & (2**63 - 1))
