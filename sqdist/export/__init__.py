"""Export a trained SQ model: packed low-bit safetensors or ONNX, and load a packed file back.

Command line::

    python -m sqdist.export RUN_DIR OUT.safetensors            # uses RUN_DIR/final
    python -m sqdist.export RUN_DIR OUT.onnx                   # ONNX, checked by onnxruntime
    python -m sqdist.export RUN_DIR OUT.onnx --activations int8   # integer kernels in onnxruntime
    python -m sqdist.export --check OUT.safetensors            # read back and verify (also OUT.onnx)

Python::

    export_model(model, "out.safetensors", model_name="resnet18", model_kwargs={"num_classes": 10})
    model = load_quantized("out.safetensors")   # plain timm model holding Q = scale * codes

Modules: :mod:`~sqdist.export.deployable` (:class:`DeployableLayer`: codes, scales, levels and
input quantization of one layer, what both writers consume), :mod:`~sqdist.export.bits` (bit
packing), :mod:`~sqdist.export.format` (the file format), :mod:`~sqdist.export.packed` (the
packed writer), :mod:`~sqdist.export.reader` (the packed reader, every format version),
:mod:`~sqdist.export.qdq` (the modules of a deployable float model),
:mod:`~sqdist.export.network` (the deployable float network), :mod:`~sqdist.export.onnx_graph` (graph passes),
:mod:`~sqdist.export.onnx_writer` (ONNX), :mod:`~sqdist.export.openvino` (OpenVINO IR), :mod:`~sqdist.export.int8`
(8-bit activations: the network onnxruntime runs as integer kernels), :mod:`~sqdist.export.run` (run folders and their
data: the command line's side),
:mod:`~sqdist.export.cli` (the command line).
"""
from .format import (FORMAT, FORMAT_VERSION, INPUTS_VERSION, KEEP_FP_BITS, LEVELS_VERSION, MAX_BITS,
                     READABLE_VERSIONS, ExportError, check_keep_fp_bits)
from .bits import (checked_codes, code_levels, code_offset, pack_codes, pack_fields, pack_indexed, unpack_codes,
                   unpack_fields, unpack_indexed)
from .deployable import (DeployableLayer, activation_qdq, check_ratio, deployable_layers, full_precision_layers,
                         int8_rows)
from .packed import export_model
from .reader import load_quantized, read_packed
from .onnx_writer import OPSET, check_onnx, exact_session_options, export_onnx
from .run import export_run, export_run_onnx, export_run_openvino, load_run, resolve_checkpoint
from .openvino import check_openvino, export_openvino
from .cli import main

__all__ = [
    "FORMAT", "FORMAT_VERSION", "INPUTS_VERSION", "KEEP_FP_BITS", "LEVELS_VERSION", "MAX_BITS", "READABLE_VERSIONS",
    "ExportError", "check_keep_fp_bits",
    "checked_codes", "code_levels", "code_offset", "pack_codes", "pack_fields", "pack_indexed", "unpack_codes",
    "unpack_fields", "unpack_indexed",
    "DeployableLayer", "activation_qdq", "check_ratio", "deployable_layers", "full_precision_layers", "int8_rows",
    "export_model", "load_quantized", "read_packed", "export_run", "load_run", "resolve_checkpoint",
    "OPSET", "check_onnx", "exact_session_options", "export_onnx", "export_run_onnx",
    "check_openvino", "export_openvino", "export_run_openvino", "main",
]
