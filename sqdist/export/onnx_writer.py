"""Export a trained SQ model to ONNX, checked by onnxruntime.

Command line (through :mod:`sqdist.export`)::

    python -m sqdist.export RUN_DIR OUT.onnx                     # or --format onnx
    python -m sqdist.export RUN_DIR OUT.onnx --keep-fp-bits 8    # stem/classifier as int8 too
    python -m sqdist.export RUN_DIR OUT.onnx --input-size 3,224,224
    python -m sqdist.export --check OUT.onnx

Python::

    info = export_onnx(model, "out.onnx", input_size=(3, 32, 32))   # model from sqdist.quantize_model

The graph is the model in eval mode, opset :data:`OPSET`, input ``input`` of shape
``(batch, C, H, W)`` with a dynamic batch (H and W fixed at the traced size), output
``logits``. Each quantized layer's weight is an int8 initializer of its integer codes
feeding ``DequantizeLinear(codes, scale, zero_point=0, axis=0)`` (one scale per output
row), so the Conv/Gemm/MatMul sees ``W = scale[:, None] * codes``, the weight the
trained model evaluates with. A quantizer that also quantizes the layer's input declares
it through ``activation_qparams()`` (see :func:`activation_qdq`); the graph then holds
``QuantizeLinear`` -> (``Clip`` below 8 bits) -> ``DequantizeLinear`` on that input (QCDQ).
The full-precision layers are float initializers (``keep_fp_bits=32``) or int8 per-row
codes like the quantized ones (``keep_fp_bits=8``). BatchNorm stays a node of its own
after a dequantized weight (a runtime may fold it).

The exporter is torch.onnx's TorchScript-based one (``dynamo=False``): it needs neither
``onnxscript`` nor network access and exports a small model in about a second. After
writing, onnxruntime (when installed) runs the file on a batch of a size other than the
traced one and its logits are compared with the torch model's.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..version import __version__
from .deployable import _sq_layers, check_ratio
from .format import ExportError, _one_line, check_keep_fp_bits
from .int8 import check_activations
from .network import deployable
from .onnx_graph import store_int4, tidy
from .parity import check_rounding, cpu_has_vnni, full_precision_weights, wide_weight_codes
from .onnx_check import (INPUT, OUTPUT, TOLERANCE, _graph_summary, _require_onnx, _top1,  # noqa: F401
                         check_against_torch, check_onnx, exact_session_options, onnxruntime_codes, run_onnxruntime)

OPSET = 25  # INT2 (ternary, binary) and INT4 (<= 4 bits) initializers; 17 stores every code as int8
INT4_OPSET = 21
INT2_OPSET = 25  # INT2 initializers (ternary and binary codes)
TRACE_OPSET = 17  # what torch.onnx's TorchScript exporter writes (it stops at 20); onnx's version converter goes on


@contextlib.contextmanager
def _quiet():
    """Nothing written to the process's stdout and stderr reaches them (torch.onnx's C++ side prints a
    whole TorchScript graph beside the error it raises); the Python error still carries the message."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def check_batch(calibration: list[Tensor] | None, input_size: tuple[int, int, int], size: int = 16) -> Tensor:
    """What the export check runs: up to ``size`` calibration images (8-bit activations are calibrated
    on that distribution: random noise would saturate them), else 3 random ones; never the traced
    batch size, so that the dynamic batch is checked too."""
    images = torch.cat([b.detach().cpu().float() for b in calibration]) if calibration else None
    if images is None or images.shape[1:] != tuple(input_size) or len(images) < 3:
        return torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))
    images = images[:size]
    return images if len(images) != 2 else images[:1]


# ---------------------------------------------------------------- export
def default_input_size(model: nn.Module, config: dict | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` to trace ``model`` with: channels of its first conv; H, W from the run's
    ``data.image_size`` (``config``), else the model's own (a ViT's ``patch_embed.img_size``,
    else ``pretrained_cfg["input_size"]``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size") or (3, 224, 224))
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    chans = first_conv.in_channels if first_conv is not None else default[0]
    size = ((config or {}).get("data") or {}).get("image_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return chans, size, size
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        return chans, int(img[0]), int(img[1])
    return chans, int(default[1]), int(default[2])


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``"3,224,224"`` -> ``(3, 224, 224)``; anything else is an :class:`ExportError`."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ExportError(f"--input-size={text!r}; allowed: three positive integers C,H,W, e.g. 3,224,224")
    return tuple(int(p) for p in parts)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                keep_fp_bits: int = 32, sq_ratio: float | None = None, force: bool = False,
                metadata: dict | None = None, opset: int = OPSET, check: bool = True, activations: str = "float",
                calibration: list[Tensor] | None = None) -> dict:
    """Write SQ ``model`` as an ONNX graph of integer weight codes + ``DequantizeLinear`` (see the module doc).

    Args:
        model: a model prepared by :func:`sqdist.quantize_model` (not changed here).
        path: the ``.onnx`` file to write (replaced atomically).
        input_size: ``(C, H, W)`` of the traced input; default :func:`default_input_size`.
            The batch dimension is dynamic.
        keep_fp_bits: 32 keeps the full-precision layers as float initializers, 8 stores them
            as int8 per-row codes with their own ``DequantizeLinear``.
        sq_ratio, force: as in :func:`sqdist.export.export_model` (refused below 1 unless ``force``).
        metadata: extra ``metadata_props`` of the ONNX model (values JSON-encoded).
        opset: ONNX opset: 25 (default) stores ternary/binary codes as INT2 and other codes of
            4 bits or fewer as INT4 initializers (:func:`store_int4`), 21..24 INT4 only, 13..20
            every code as int8.
        check: run the written file in a default onnxruntime session (when installed) on
            :func:`check_batch` and compare it with the trained ``model``: its logits within
            ``1e-4 * max(1, max |logit|)`` of the model's when the export rounds nothing more
            (float activations, ``keep_fp_bits=32``); else the converted network held to the model
            one rounding at a time (:func:`sqdist.export.parity.check_rounding`) and onnxruntime to
            that network, its codes and logits (:func:`check_against_torch`). A failure is an
            :class:`ExportError` and the file is removed.
        activations: ``"float"`` (the inputs as trained: float, or the run's own activation
            quantizers) or ``"int8"``: 8-bit inputs and outputs calibrated on ``calibration`` so
            that onnxruntime runs the layers with integer weights as integer kernels
            (:mod:`sqdist.export.int8`; for a model trained with float activations).
        calibration: model inputs (a list of batches) for ``activations="int8"``.

    Returns:
        ``{"path", "bytes", "opset", "input", "float_layers", "activations", "int8_weights",
        "int4_weights", "qdq_inputs", "max_abs_diff", "tie_flips", "near_flips", "max_abs_diff_model",
        "model_rel_error", "model_agreement"}`` (the check's entries None when not checked; see
        :func:`check_against_torch`), with ``"rounding_worst_share"``, ``"rounding_worst_point"``
        when the converted network was held to the model (:func:`sqdist.export.parity.check_rounding`)
        and ``"wide_weight_codes"``, ``"cpu_vnni"`` with 8-bit activations.
    """
    onnx = _require_onnx()
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    activations = check_activations(activations)
    sq_ratio = check_ratio(model, sq_ratio, force)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= INT2_OPSET:
        raise ExportError(f"opset={opset!r}; allowed: an integer from 13 (per-axis DequantizeLinear) to "
                          f"{INT2_OPSET} (21: INT4 weights, 25: INT2 for ternary/binary)")
    net = deployable(model, keep_fp_bits, activations, calibration)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise ExportError(f"input_size={input_size!r}; allowed: three positive integers (C, H, W)")
    traced = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings(), _quiet():  # the exporter's notes, and the graph it prints when it fails
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (traced,), str(tmp), dynamo=False, opset_version=min(opset, TRACE_OPSET),
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; the user needs the one line
        tmp.unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export failed for input size {input_size}: {_one_line(exc)[:300]}") from None

    graph_model = onnx.load(str(tmp))
    tidy(graph_model.graph)
    try:
        if opset > TRACE_OPSET:
            from onnx import version_converter

            graph_model = version_converter.convert_version(graph_model, opset)
        if opset >= INT4_OPSET:
            store_int4(graph_model.graph, int2=opset >= INT2_OPSET)
    except Exception as exc:  # the converter raises several types
        tmp.unlink(missing_ok=True)
        raise ExportError(f"converting the graph to opset {opset} failed ({_one_line(exc)[:300]}); "
                          f"opset 17 stores int8 codes") from None
    quantizer = next(iter(_sq_layers(model).values())).quantizer
    props = {
        "sqdist_version": __version__,
        "model": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "quantizer": {"name": getattr(quantizer, "quantizer_name", "?"), "params": quantizer.config()},
        "sq": {"ratio": sq_ratio},
        "keep_fp_bits": keep_fp_bits,
        "activations": activations,
        **(metadata or {}),
    }
    for key, value in props.items():
        entry = graph_model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, default=str)
    try:
        onnx.checker.check_model(graph_model)
    except onnx.checker.ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"the exported graph fails the ONNX checker: {_one_line(exc)[:300]}") from None
    onnx.save(graph_model, str(tmp))
    os.replace(tmp, path)
    info = {"path": str(path), "bytes": path.stat().st_size, "opset": opset, "input": ["batch", *input_size],
            "float_layers": list(getattr(net, "float_layers", [])),
            "activations": activations, **_graph_summary(graph_model.graph),
            "max_abs_diff": None, "tie_flips": None, "near_flips": None, "max_abs_diff_model": None,
            "model_rel_error": None, "model_agreement": None}
    if check:
        x = check_batch(calibration if activations == "int8" else None, input_size)
        on_cpu = all(t.device.type == "cpu" for t in model.parameters())
        same_network = keep_fp_bits == 32 and activations == "float" and on_cpu
        try:
            parity = None if same_network else check_rounding(path, model, net, x, full_precision_weights(model,
                                                                                                         keep_fp_bits))
            result = check_against_torch(path, net, x, model, same_network=same_network)
        except ExportError:
            path.unlink(missing_ok=True)
            raise
        if result is not None:
            info.update(result)
        if parity is not None:
            info.update(rounding_worst_share=parity["worst_share"], rounding_worst_point=parity["worst_point"])
    if activations == "int8":
        info["wide_weight_codes"] = wide_weight_codes(net)
        info["cpu_vnni"] = cpu_has_vnni()
    return info
