"""Compressed layers and what the walk over a network needs from them.

:func:`compress_layer_` turns an ``nn.Conv2d`` / ``nn.Linear`` into a product-quantized
layer *in place*: the module keeps its name, place, bias and forward; its ``weight``
Parameter is replaced by ``codebook`` (a Parameter, (K, d)) and ``indices`` (a buffer,
(n,)), and ``module.weight`` becomes ``codebook[indices]`` reshaped, built on every read.
So any timm model keeps working, and fine-tuning trains the centroids.

:func:`input_statistics` collects, for one layer, the Gram matrices of its unfolded
inputs on calibration images (what :func:`sqdist.compress.pq.fit_codebook` needs) by
running the network up to that layer only.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pq import reconstruct

SUPPORTED = (nn.Conv2d, nn.Linear)


class _CentroidMeanGrad(torch.autograd.Function):
    """Identity forward; backward divides each centroid's gradient by its number of subvectors.

    ``codebook[indices]`` sums the gradients of the subvectors that share a centroid;
    the paper's fine-tuning averages them instead.
    """

    @staticmethod
    def forward(ctx, codebook: Tensor, inv_counts: Tensor) -> Tensor:
        ctx.save_for_backward(inv_counts)
        return codebook.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv_counts,) = ctx.saved_tensors
        return grad * inv_counts[:, None], None


class PQLayer:
    """Mixin of the compressed layers: ``weight`` is ``codebook[indices]`` reshaped to ``weight_shape``."""

    codebook: nn.Parameter
    indices: Tensor
    weight_shape: tuple[int, ...]

    @property
    def weight(self) -> Tensor:
        codebook = self.codebook
        if torch.is_grad_enabled() and codebook.requires_grad:
            codebook = _CentroidMeanGrad.apply(codebook, self.inv_counts)
        return reconstruct(codebook, self.indices, self.weight_shape)


_PQ_CLASSES: dict[type, type] = {}


def _pq_class(cls: type) -> type:
    if cls not in _PQ_CLASSES:
        _PQ_CLASSES[cls] = type(f"PQ{cls.__name__}", (PQLayer, cls), {"__module__": __name__})
    return _PQ_CLASSES[cls]


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, PQLayer)


def compress_layer_(module: nn.Module, codebook: Tensor, indices: Tensor) -> nn.Module:
    """Make ``module`` (Conv2d/Linear, or already compressed) use ``codebook`` (K, d) and ``indices`` (n,).

    ``n * d`` must equal the weight's numel. The codebook becomes a float32 Parameter on the
    module's device; the indices an int64 buffer. Returns ``module`` (same object).
    """
    if is_compressed(module):
        shape, device = module.weight_shape, module.codebook.device
        del module.codebook
    else:
        if not isinstance(module, SUPPORTED):
            raise TypeError(f"{type(module).__name__} is not a Conv2d or Linear")
        shape, device = tuple(module.weight.shape), module.weight.device
        del module._parameters["weight"]
        module.__class__ = _pq_class(type(module))
    k, d = codebook.shape
    if indices.dim() != 1 or indices.numel() * d != math.prod(shape):
        raise ValueError(f"indices of shape {tuple(indices.shape)} with subvectors of length {d} do not make "
                         f"a weight of shape {shape}")
    module.weight_shape = shape
    module.codebook = nn.Parameter(codebook.detach().to(device=device, dtype=torch.float32).clone())
    module.register_buffer("indices", indices.detach().to(device=device, dtype=torch.long).clone())
    counts = torch.bincount(module.indices, minlength=k).clamp_min(1)
    module.register_buffer("inv_counts", 1.0 / counts.float(), persistent=False)
    return module


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_compressed(m)}


@torch.no_grad()
def round_codebooks_(model: nn.Module) -> None:
    """Round every codebook to float16 values (what the file stores), kept in float32."""
    for m in compressed_layers(model).values():
        m.codebook.copy_(m.codebook.half().float())


# ---------------------------------------------------------------- which layers
def _standard_forward(module: nn.Module, x: Tensor) -> Tensor:
    """What a plain Conv2d/Linear with ``module``'s weight and settings computes on ``x``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    return nn.Conv2d._conv_forward(module, x, module.weight, module.bias)


def candidate_layers(model: nn.Module) -> tuple[list[str], str | None, set[str]]:
    """(Conv2d/Linear layers in module order, the stem conv, the classifier layers).

    The stem and classifier are the ones timm's ``pretrained_cfg`` names (else the first and
    last layer), as :func:`sqdist.quantize_model` finds them.
    """
    from ..nn import _stem, _stem_and_classifier

    layers = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED) or is_compressed(m)]
    stem = _stem(model, layers)
    return layers, stem, _stem_and_classifier(model, layers) - {stem}


@torch.no_grad()
def execution_order(model: nn.Module, names: list[str], x: Tensor) -> list[str]:
    """``names`` in the order their modules first run in ``model(x)``.

    Dropped: modules that never run, and, with a warning, those whose forward computes
    something else than a plain Conv2d/Linear with their weight (timm's ``Conv2dSame`` pads
    in its forward: its unfolded input would not be what the weight multiplies).
    """
    modules = dict(model.named_modules())
    order: list[str] = []
    differs: list[str] = []

    def seen(module, args, output, name):
        if name in order:
            return
        order.append(name)
        base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        if not is_compressed(module) and type(module).forward is not base.forward:
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


# ---------------------------------------------------------------- layer inputs
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


class _Stop(Exception):
    """Raised by the statistics hook: nothing after the layer needs to run."""


@torch.no_grad()
def input_statistics(model: nn.Module, module: nn.Module, batches, d: int, device) -> tuple[Tensor, Tensor, int]:
    """Gram matrices of ``module``'s inputs over ``batches`` (each an image tensor (B, ...)).

    The model runs in eval mode and stops after the layer's input is seen (first call).

    Returns:
        block_grams: (N, d, d) float64, per image ``sum over its rows and d-blocks of x_b x_b^T``
            (the ``X~^T X~`` of that image; :func:`sqdist.compress.pq.fit_codebook`'s ``grams``).
        group_grams: (groups, D_g, D_g) float64, ``X_g^T X_g`` summed over all images, one per
            conv group (1 for a Linear): the exact output error of a weight change ``dW`` is
            ``sum_g trace(dW_g H_g dW_g^T)`` (:func:`output_error`).
        images: N.
    """
    groups = getattr(module, "groups", 1)
    per_image: list[Tensor] = []
    full: list[Tensor] = []

    def hook(_m, args):
        rows = input_rows(module, args[0].float())               # (B, R, D_total)
        b, r, width = rows.shape
        # bound the (B, R*blocks, d) intermediate to ~64M values
        step = max(1, (1 << 26) // max(1, r * width))
        for start in range(0, b, step):
            part = rows[start:start + step]
            blocks = part.reshape(part.shape[0], -1, d)
            per_image.append(torch.einsum("bri,brj->bij", blocks, blocks).double())
            grouped = part.reshape(-1, groups, width // groups)
            full.append(torch.einsum("ngi,ngj->gij", grouped, grouped).double())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            try:
                model(x.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    if not per_image:
        width = math.prod(module.weight_shape[1:]) if is_compressed(module) else module.weight[0].numel()
        return (torch.zeros(0, d, d, dtype=torch.float64, device=device),
                torch.zeros(groups, width, width, dtype=torch.float64, device=device), 0)
    block_grams = torch.cat(per_image)
    return block_grams, torch.stack(full).sum(0), block_grams.shape[0]


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
