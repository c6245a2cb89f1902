"""Calibration shared by the post-training walks (:mod:`sqdist.compress`, :mod:`sqdist.ptq`): which
layers a walk visits and in what order, the rows a layer multiplies by its weight, the calibration
chunks every rank agrees on, and a layer's relative output error on them.

The PTQ-specific statistics (cached activations, Hessians) live in :mod:`sqdist.ptq.calib`, the
product-quantization Gram matrices in :mod:`sqdist.compress.layers`, the int8 range observer of an
ONNX export in :mod:`sqdist.export.int8`: each builds on the pieces here.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import stem_and_classifier, stem_layer

SUPPORTED = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------- which layers, in which order
def _standard_forward(module: nn.Module, x: Tensor) -> Tensor:
    """What a plain Conv2d/Linear with ``module``'s weight and settings computes on ``x``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    return nn.Conv2d._conv_forward(module, x, module.weight, module.bias)


def candidate_layers(model: nn.Module, also=None) -> tuple[list[str], str | None, set[str]]:
    """(Conv2d/Linear layers in module order, the stem conv, the classifier layers).

    The stem and classifier are the ones timm's ``pretrained_cfg`` names (else the first and
    last layer), as :func:`sqdist.quantize_model` finds them. ``also(module)``: True for a module that
    counts as such a layer too (compress: a layer already compressed).
    """
    layers = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED) or (also is not None and also(m))]
    stem = stem_layer(model, layers)
    return layers, stem, stem_and_classifier(model, layers) - {stem}


@torch.no_grad()
def execution_order(model: nn.Module, names: list[str], x: Tensor, trusted=None) -> list[str]:
    """``names`` in the order their modules first run in ``model(x)``.

    Dropped: modules that never run, and, with a warning, those whose forward computes
    something else than a plain Conv2d/Linear with their weight (timm's ``Conv2dSame`` pads
    in its forward: its unfolded input would not be what the weight multiplies). ``trusted(module)``:
    True for a module not checked (compress: a compressed layer, whose forward is its own).
    """
    modules = dict(model.named_modules())
    order: list[str] = []
    differs: list[str] = []

    def seen(module, args, output, name):
        if name in order:
            return
        order.append(name)
        base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        if not (trusted is not None and trusted(module)) and type(module).forward is not base.forward:
            expected = _standard_forward(module, args[0])
            if expected.shape != output.shape or not torch.allclose(expected, output, rtol=1e-4, atol=1e-5):
                differs.append(name)

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen(m, a, o, n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if differs:
        warnings.warn("sqdist.compress: left uncompressed (their forward is not a plain Conv2d/Linear): "
                      + ", ".join(f"{n} ({type(modules[n]).__name__})" for n in differs))
    return [n for n in order if n not in differs]


# ---------------------------------------------------------------- layer inputs and errors
def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer multiplies by its weight: (B, R, C_in * kh * kw) for a Conv2d
    (im2col: R output positions, columns ordered (c_in, kh, kw) as the weight's rows), or
    (B, R, in_features) for a Linear (R: every position of the middle dimensions)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    elif isinstance(padding, str):  # "same" pads the extra row/column at the end, "valid" none
        pads = []
        for k, dil in zip(reversed(kernel), reversed(dilation)):
            total = dil * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2)


def calibration_chunks(dataset, n_images: int, chunk: int, seed: int) -> list[list[int]]:
    """The calibration batches of every rank: ``n_images`` training images drawn with ``seed``,
    cut into chunks of ``chunk``; rank ``r`` of ``w`` forwards chunks ``r, r + w, ...``. A chunk
    is the same whatever the number of ranks, and so are its Gram matrices: 1 and N
    processes fit the same codebooks."""
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    return [picks[i:i + chunk] for i in range(0, len(picks), chunk)]


def output_error(weight: Tensor, approx: Tensor, group_grams: Tensor) -> float:
    """Relative output error ``||X (W - W^)||^2 / ||X W||^2`` of a layer over the calibration inputs.

    ``weight``, ``approx``: (C_out, ...); ``group_grams``: (groups, D_g, D_g) from
    :func:`input_statistics`. 0 when the layer's outputs are all zero.
    """
    groups = group_grams.shape[0]
    w = weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)   # (g, C_out/g, D_g)
    dw = w - approx.detach().double().reshape(w.shape)

    def energy(m: Tensor) -> float:
        return float((torch.bmm(m, group_grams) * m).sum())

    base = energy(w)
    return energy(dw) / base if base > 0 else 0.0
