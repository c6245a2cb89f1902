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

import torch
from torch import Tensor, nn

from ..calibration import SUPPORTED, input_rows, output_error  # noqa: F401 (re-exported)
from ..calibration import candidate_layers as _candidate_layers, execution_order as _execution_order
from .pq import reconstruct


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
def candidate_layers(model: nn.Module) -> tuple[list[str], str | None, set[str]]:
    """:func:`sqdist.calibration.candidate_layers`, compressed layers included."""
    return _candidate_layers(model, also=is_compressed)


def execution_order(model: nn.Module, names: list[str], x: Tensor) -> list[str]:
    """:func:`sqdist.calibration.execution_order`, a compressed layer's forward trusted."""
    return _execution_order(model, names, x, trusted=is_compressed)


# ---------------------------------------------------------------- layer inputs
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
