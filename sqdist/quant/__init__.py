"""Quantizers: the registries, the weight quantizers, the activation quantizers, the fused kernels.

- :mod:`sqdist.quant.registry`: quantizers by name (``register_quantizer``, ``create_quantizer``, ...);
- :mod:`sqdist.quant.weights`: weight quantizers (BWN, TWN, k-bit) and their PyTorch references;
- :mod:`sqdist.quant.activations`: activation quantizers (LSQ, PACT) on a quantized layer's input;
- :mod:`sqdist.quant.steps`: learned step sizes and clipping values, positive and finite by construction;
- :mod:`sqdist.quant.kernels`: the fused compiled SQ ops, chosen by ``SQDIST_KERNELS``.

Importing this package registers the built-in quantizers.
"""
from .registry import (create_activation_quantizer, create_quantizer, list_activation_quantizers, list_quantizers,
                       register_activation_quantizer, register_quantizer)
from .weights import BWN, TWN, KBit, Quantizer, layer_errors, quantization_error
from .activations import LSQ, PACT, ActivationQuantizer, calibrate_activations

__all__ = [
    "create_activation_quantizer", "create_quantizer", "list_activation_quantizers", "list_quantizers",
    "register_activation_quantizer", "register_quantizer",
    "BWN", "TWN", "KBit", "Quantizer", "layer_errors", "quantization_error",
    "ActivationQuantizer", "LSQ", "PACT", "calibrate_activations",
]
