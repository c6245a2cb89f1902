"""The deployable float network: an SQ model turned back into plain timm/torch layers whose weights are
their integer codes times per-row scales (and, with 8-bit activations, the integer layers onnxruntime
runs), built from the :class:`~sqdist.export.deployable.DeployableLayer` descriptions. What the ONNX
writer (:mod:`sqdist.export.onnx_writer`) traces and what its checks compare with.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
import torch.nn.functional as F

from .deployable import deployable_layers, model_copy, unfuse_attention
from .format import ExportError, check_keep_fp_bits
from .int8 import NotInteger, check_activations, integer_deployable, integer_layer_names
from .qdq import InputQuantizer, WeightFromCodes, _quantize_input_hook


def deployable(model: nn.Module, keep_fp_bits: int = 32, activations: str = "float",
               calibration: list[Tensor] | None = None) -> nn.Module:
    """A float32 CPU copy of SQ ``model`` in eval mode, built for export; ``model`` is left as it is.

    Each SQ layer becomes its plain class again (``nn.Conv2d``, ``nn.Linear``, ...) with its
    weight parametrized as :class:`~sqdist.export.qdq.WeightFromCodes` (the int8 codes times the
    per-row scale of its :class:`~sqdist.export.deployable.DeployableLayer`) and, when that says its
    input is quantized, an :class:`~sqdist.export.qdq.InputQuantizer` on its input. With
    ``keep_fp_bits=8`` the full-precision Conv/Linear layers get their 8-bit per-row codes too.
    With ``activations="int8"`` the layers with integer weights then become
    :class:`~sqdist.export.int8.IntegerLayer` s calibrated on ``calibration`` (model inputs):
    the network onnxruntime runs as integer kernels (:mod:`sqdist.export.int8`).
    """
    from ..nn import SQ_CLASSES

    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    plain = {sq_cls: base for base, sq_cls in SQ_CLASSES.items()}
    net = model_copy(model).cpu().float().eval()
    unfuse_attention(net)
    described = deployable_layers(net, keep_fp_bits)  # before SQ layers turn plain
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name, d in described.items():
            layer = modules[name]
            if d.quantizer is not None:  # an SQ layer: back to its plain class
                layer.__class__ = plain[type(layer)]
                del layer.quantizer
                for attr in ("sq_mask", "sq_name", "_sq", "_sq_mask_step", "input_quantizer"):
                    layer.__dict__.pop(attr, None)
                layer._modules.pop("input_quantizer", None)  # the training module; InputQuantizer replaces it
            parametrize.register_parametrization(layer, "weight", WeightFromCodes(d.codes, d.scale))
            if d.input is not None:
                layer.input_quantizer = InputQuantizer(*d.input)
            if isinstance(layer, nn.Linear):  # quantizes its input itself, after flattening
                layer.forward = types.MethodType(_linear_as_gemm, layer)
            elif d.input is not None:
                layer.register_forward_pre_hook(_quantize_input_hook)
    if check_activations(activations) == "int8":
        if any(isinstance(m, InputQuantizer) for m in net.modules()):
            raise ExportError("activations='int8' calibrates 8-bit inputs for a model trained with float "
                              "activations; this one quantizes its inputs itself (its own scales are exported "
                              "with activations='float')")
        batches = [b.detach().cpu().float() for b in (calibration or [])]
        base, layers, kept_float = net, integer_layer_names(net), []
        while True:  # a layer that cannot be an integer kernel stays float (a mixed graph, as quantize_static's)
            try:
                net = integer_deployable(copy.deepcopy(base), batches, layers)
                break
            except NotInteger as exc:
                layers, kept_float = layers - {exc.layer}, kept_float + [exc.layer]
        net.float_layers = kept_float
    return net


def _linear_as_gemm(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` on the rows of ``x`` flattened to 2-D, so that the graph holds ``Gemm``, not ``MatMul``.

    onnxruntime's CPU provider fuses ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` and
    by default runs it on int8-quantized activations (accuracy level 4): a default session then
    moves a ViT's logits by ~4e-3. It does not fuse ``DequantizeLinear -> Gemm``.
    """
    quantize = getattr(layer, "input_quantizer", None)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if quantize is not None:  # after the Reshape: a Q/DQ pair before one confuses onnxruntime's QDQ propagation
        rows = quantize(rows)
    y = F.linear(rows, layer.weight, layer.bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], -1)
