"""``train.compile=true``: the model compiled with ``torch.compile``, in place.

:func:`compile_model` compiles the network's forward in place (``nn.Module.compile``): no
``OptimizedModule`` wrapper, so the module, its ``state_dict`` keys (no ``_orig_mod.`` prefix), the
optimizer's parameters and the engine's wrapper (DDP) stay what they were; checkpoints and
``final/model.safetensors`` are the same files an eager run writes. Evaluation and BatchNorm
re-estimation run eager (:func:`eager`): they would each cost a compilation of their own for a few
batches. :func:`unwrap_compiled` gives the module under a ``torch.compile(model)`` wrapper, for
callers handed one. See ``docs/compile.md``.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import RecipeError
from ..quant.activations import read_flags


def check_recipe(tcfg: dict) -> None:
    """Refuse (one line) ``train.compile_mode`` set with a backend that has no modes, or without ``train.compile``."""
    if tcfg["compile_mode"] != "default" and (tcfg["compile_backend"] != "inductor" or not tcfg["compile"]):
        why = "train.compile=false" if not tcfg["compile"] else f"train.compile_backend={tcfg['compile_backend']!r}"
        raise RecipeError(f"train.compile_mode={tcfg['compile_mode']!r}: has no effect with {why}; allowed: a mode "
                          "with train.compile=true train.compile_backend=inductor, or default")


def compile_model(net: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> torch.nn.Module:
    """Compile ``net``'s forward in place with ``torch.compile`` (``mode`` for inductor only); returns ``net``.

    Call it after the activation quantizers are calibrated and a checkpoint is loaded: their
    ``signed``/``calibrated`` flags are read here, once, and the compiled graph is guarded on them.
    """
    from ..quant import kernels

    read_flags(net)
    kernels.preload(net.parameters())  # a kernel library loaded inside the trace would split the graph for good
    net.compile(backend=backend, **inductor_options(net, mode, backend))
    return net


def inductor_options(net: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> dict:
    """``torch.compile``'s keyword arguments for ``mode``: ``{"options": ...}`` (the mode's own options,
    ``torch._inductor.list_mode_options``) with, for a model on the CPU, inductor's layout optimization off.

    That optimization turns every convolution channels-last. On the CPU it then copies each quantized weight
    (made in the graph every step, contiguous) into channels-last in the forward and again in the backward:
    resnet18's 512x512x3x3 weights took 4 ms a copy at one thread, and the compiled TWN step was 0.89x of eager
    with it against 1.07x without (``benchmarks/results/compile_speed.md``). On CUDA the mode is left as it is."""
    if backend != "inductor":
        return {}
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    if not on_cpu:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), "layout_optimization": False}}


def is_compiled(net: torch.nn.Module) -> bool:
    """True when ``net``'s forward is compiled in place (:func:`compile_model`) or ``net`` is a ``torch.compile`` wrapper."""
    return getattr(net, "_compiled_call_impl", None) is not None or hasattr(net, "_orig_mod")


def unwrap_compiled(net: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile(net)`` wrapper (its ``_orig_mod``), else ``net`` itself."""
    return getattr(net, "_orig_mod", net)


def eager():
    """A context in which compiled modules run their eager forward (``torch.compiler.set_stance("force_eager")``)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
