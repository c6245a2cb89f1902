"""SRQ's per-step random draws (DropBits' counts, a learned width's per-element widths) as one custom op.

A quantizer's draws come from a ``torch.Generator`` seeded with ``hash((run_seed, seed, step, salt, call))``
(:class:`sqdist_srq._Stochastic`). Those five numbers live in an int64 tensor, the quantizer's *key*
(``KEY_FIELDS``, with ``total``: the run's step count, for the linear DropBits schedule), written outside the
forward (``set_run_seed``, ``set_progress``, ``on_model_quantized``) and read by :func:`draw` inside it. So
``torch.compile`` traces the forward whole: the op is opaque to dynamo (a generator is an object it cannot
trace), the key is an input of the graph (no Python number for dynamo to guard on: no recompilation when the
step changes), and the op counts the call in the key itself (``mutates_args``). Inside the op the numbers are
read back as Python ints and the generator is built, seeded and drawn from exactly as before the op existed:
the same draws, eager or compiled (``plugins/sqdist-srq/tests/test_draws.py`` holds them to the former code).
The key is a plain CPU tensor attribute, not a buffer: no state_dict key, not cast by ``.half()``, not
moved to the GPU (reading it there would sync), not broadcast by DDP.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .fast import random_widths

KEY_FIELDS = ("run_seed", "seed", "step", "salt", "calls", "total")
CALLS = KEY_FIELDS.index("calls")


def new_key() -> Tensor:
    return torch.zeros(len(KEY_FIELDS), dtype=torch.int64)


def generator(device, run_seed: int, seed: int, step: int, salt: int, calls: int) -> torch.Generator:
    """The generator of one forward's draws (the seeding is part of what a run trains on: never change it)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((run_seed, seed, step, salt, calls)) & (2 ** 63 - 1))
    return g


def scheduled_drop_prob(drop_prob: float, linear: bool, step: int, total: int) -> float:
    """DropBits' ``p`` at ``step``: ``drop_prob``, or (``linear``) ``drop_prob * (1 - step / total)``."""
    if linear and total > 0:
        return drop_prob * max(0.0, 1.0 - step / total)
    return drop_prob


def drop_counts(shape, p: float, limit: int, generator: torch.Generator, device) -> Tensor:
    """DropBits: how many low bits each element drops, ``P(j >= k) = p^k`` (truncated at ``limit``);
    all 0 (nothing drawn) at ``p = 0``."""
    if p <= 0:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    u = torch.rand(shape, generator=generator, device=device).clamp_(min=1e-12)
    return torch.floor(torch.log(u) / math.log(p)).clamp_(0, limit).to(torch.int64)


def draw_eager(like: Tensor, key: Tensor, f: Optional[Tensor], lo: Optional[Tensor], drop_prob: float, linear: bool,
               drop_limit: int) -> tuple[Tensor, Tensor]:
    """One forward's draws for a tensor of ``like``'s shape and device, from one generator (:func:`generator`
    on ``key``; ``key[CALLS]`` is then incremented): with ``f`` and ``lo`` (one-element tensors) the learned
    widths first (``fast.random_widths``, uint8), then with ``drop_prob > 0`` DropBits' counts (int64, at the
    scheduled ``p``, at most ``drop_limit``). What is not asked for is an empty tensor."""
    run_seed, seed, step, salt, calls, total = key.tolist()
    g = generator(like.device, run_seed, seed, step, salt, calls)
    key[CALLS] += 1
    widths = like.new_empty(0, dtype=torch.uint8)
    if f is not None:
        widths = random_widths(like.shape, float(f), int(lo), g, like.device)
    drop = like.new_empty(0, dtype=torch.int64)
    if drop_prob > 0:
        drop = drop_counts(like.shape, scheduled_drop_prob(drop_prob, linear, step, total), drop_limit, g,
                           like.device)
    return widths, drop


# the op (what a traced forward calls); eager calls draw_eager itself, without the op's dispatch (~20 us a call)
draw = torch.library.custom_op("sqdist_srq::draw", mutates_args=("key",))(draw_eager)


@draw.register_fake
def _(like, key, f, lo, drop_prob, linear, drop_limit):
    widths = like.new_empty(like.shape if f is not None else (0,), dtype=torch.uint8)
    return widths, like.new_empty(like.shape if drop_prob > 0 else (0,), dtype=torch.int64)
