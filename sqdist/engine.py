"""The distributed engine: one Accelerate ``Accelerator`` built from the recipe.

``engine.name=ddp`` (default) is plain data parallelism; on a machine without
CUDA the processes use the CPU and gloo.
"""
from __future__ import annotations

import torch

from .config import RecipeError


def make_accelerator(recipe: dict):
    from accelerate import Accelerator

    eng = recipe["engine"]
    if eng["name"] != "ddp":
        raise RecipeError(f"engine.name={eng['name']!r}: allowed: ddp")
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=eng["mixed_precision"],
        gradient_accumulation_steps=eng["grad_accum"],
    )
