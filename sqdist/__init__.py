"""sqdist: low-bit networks trained with Stochastic Quantization, at cluster scale."""
from .version import __version__
from .quant.weights import BWN, TWN, KBit, Quantizer, quantization_error
from .quant.registry import (create_activation_quantizer, create_quantizer, list_activation_quantizers,
                             list_quantizers, register_activation_quantizer, register_quantizer)
from .quant.activations import LSQ, PACT, ActivationQuantizer, calibrate_activations
from .sq import SQConfig, SQSelector, select, selection_probability
from .nn import QuantConfig, SQController, quantize_model

__all__ = [
    "BWN", "TWN", "KBit", "Quantizer", "quantization_error",
    "create_quantizer", "list_quantizers", "register_quantizer",
    "ActivationQuantizer", "LSQ", "PACT", "calibrate_activations",
    "create_activation_quantizer", "list_activation_quantizers", "register_activation_quantizer",
    "SQConfig", "SQSelector", "select", "selection_probability",
    "QuantConfig", "SQController", "quantize_model", "export_model", "load_quantized", "__version__",
]


def __getattr__(name):  # lazy: `import sqdist` does not load the export code (safetensors, the file format)
    if name in ("export_model", "load_quantized"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'sqdist' has no attribute {name!r}")
