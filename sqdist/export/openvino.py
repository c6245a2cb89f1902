"""Export a trained SQ model to OpenVINO IR (``OUT.xml`` + ``OUT.bin``), checked in OpenVINO.

Command line (through :mod:`sqdist.export`)::

    python -m sqdist.export RUN_DIR OUT.xml --activations int8   # integer kernels in OpenVINO's CPU plugin
    python -m sqdist.export RUN_DIR OUT.xml                      # float activations, as trained

Python::

    info = export_openvino(model, "out.xml", input_size=(3, 224, 224), activations="int8", calibration=batches)

The IR is the same deployable network as the ONNX export (:func:`sqdist.export.onnx_writer.deployable`):
the ONNX graph is written at opset :data:`OPENVINO_OPSET` (INT4 weight initializers; OpenVINO's ONNX reader
refuses the INT2 of opset 25 with "Unsupported type") and converted by ``openvino.convert_model``, which
turns each ``QuantizeLinear -> DequantizeLinear`` pair into a ``FakeQuantize`` (an 8-bit integer
kernel's input or output) and each weight's codes into an int8 constant. :func:`store_narrow_constants`
then stores ternary and binary codes in 2 bits (``u2``, offset 2: OpenVINO has no i2) and other codes
in [-8, 7] in 4 bits (``i4``), each read through ``Convert(i8)``: OpenVINO folds those constant
subgraphs when it compiles, so its low-precision transformations see the same int8 weights and the
convolutions run on u8 x i8 (``runtimePrecision`` of the compiled model, :func:`runtime_precisions`);
the ``.bin`` holds 2 bits a ternary code.

The check (:func:`check_against_openvino`) holds OpenVINO to the converted network by the rule of the
onnxruntime check (:func:`sqdist.export.onnx_check.check_against_torch`): torch computes each
quantization from OpenVINO's codes of the one before (read at every ``FakeQuantize``,
:func:`openvino_codes`) and its codes must be OpenVINO's up to rounding ties; the converted network is
held to the trained model one rounding at a time (:func:`sqdist.export.parity.check_rounding`, run by
:func:`~sqdist.export.onnx_writer.export_onnx`). OpenVINO runs a default ``compile_model`` on the CPU
(what a user gets) with float32 as the inference precision for the float parts (the CPU plugin's
default is bf16 on CPUs that have it, which moves a float network's logits by ~1e-2; the integer
kernels are the same either way).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .format import ExportError, _one_line, check_keep_fp_bits
from .int8 import check_activations
from .onnx_check import TOLERANCE, _reference_logits, hold_to_forced_codes
from .parity import LOGITS_TOLERANCE
from .qdq import forced_ties

OPENVINO_OPSET = 21  # INT4 initializers; OpenVINO 2026.4's ONNX reader does not read opset 25's INT2
PLAIN_FACTOR = 2.0  # see check_against_openvino
CHECK_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def require_openvino():
    """The ``openvino`` module, or an :class:`ExportError` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ExportError("OpenVINO export (an .xml output) needs the openvino package: "
                          "pip install 'sqdist[openvino]'") from None
    return openvino


def store_narrow_constants(ov_model) -> tuple[int, int]:
    """Store every int8 ``Constant`` of ``ov_model`` (weight codes) in fewer bits: codes in [-2, 1] (ternary,
    binary) as ``u2`` fields of ``code + 2`` read through ``Convert(i8) - 2``, other codes in [-8, 7] as ``i4``
    read through ``Convert(i8)``. OpenVINO folds these constant subgraphs back to the int8 constant when it
    compiles, before its low-precision transformations. Returns ``(2-bit, 4-bit)`` constants converted."""
    import numpy as np
    import openvino as ov
    from openvino import opset13

    two = four = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_output_element_type(0) != ov.Type.i8:
            continue
        codes = op.get_data()
        if codes.size == 0 or codes.min() < -8 or codes.max() > 7:
            continue
        if codes.min() >= -2 and codes.max() <= 1:  # OpenVINO has no i2: u2 with an offset
            fields = opset13.constant((codes.astype(np.int16) + 2).astype(np.uint8), dtype=ov.Type.u2)
            narrow = opset13.subtract(opset13.convert(fields, ov.Type.i8), opset13.constant(np.int8(2)))
            two += 1
        else:
            narrow = opset13.convert(opset13.constant(codes.astype(np.int8), dtype=ov.Type.i4), ov.Type.i8)
            four += 1
        narrow.set_friendly_name(op.get_friendly_name())
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(narrow.output(0))
    return two, four


def fit_pool_windows(onnx_path: str | os.PathLike) -> int:
    """Shrink each ``AveragePool`` window that is wider than its input (a ResNet-D shortcut's 2x2 pool on a
    1x1 map: an 8x8 input) to the input, in the ONNX file at ``onnx_path``; returns how many.

    onnxruntime and torch pool such a map (``ceil_mode``, padding not counted) to the mean of the
    elements the window covers; OpenVINO refuses the node. With no padding, padding not counted and the
    window cut to the input on each such axis, the output has the same size (one window) and value.
    """
    import math

    import onnx
    from onnx import helper, shape_inference

    model = onnx.load(str(onnx_path))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(model).graph.value_info}
    fitted = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dims = shapes.get(node.input[0], [None])[2:]
        kernel, strides = list(attrs.get("kernel_shape", [])), list(attrs.get("strides", [1] * len(dims)))
        if (node.op_type != "AveragePool" or attrs.get("count_include_pad", 0) or any(attrs.get("pads", []))
                or len(dims) != len(kernel) or None in dims or all(k <= d for k, d in zip(kernel, dims))):
            continue
        rounding = math.ceil if attrs.get("ceil_mode", 0) else math.floor
        if any(rounding((d - k) / s) + 1 != 1 for k, d, s in zip(kernel, dims, strides) if k > d):
            continue  # more than one window on that axis: not this case
        for attr in node.attribute:
            if attr.name == "kernel_shape":
                attr.ints[:] = [min(k, d) for k, d in zip(kernel, dims)]
        fitted += 1
    if fitted:
        onnx.save(model, str(onnx_path))
    return fitted


def onnx_to_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> dict:
    """Convert an sqdist ONNX export (opset <= 21) to OpenVINO IR at ``xml_path`` (+ ``.bin``), with
    2- and 4-bit codes stored in 2 and 4 bits (:func:`store_narrow_constants`); both files replaced
    atomically. Returns ``{"path", "bin", "bytes", "int2_weights", "int4_weights"}`` (``bytes``: both files)."""
    ov = require_openvino()
    xml_path = Path(xml_path)
    fit_pool_windows(onnx_path)
    try:
        ov_model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises its own types
        raise ExportError(f"{onnx_path}: openvino.convert_model cannot read it ({_one_line(exc)[:300]})") from None
    int2, int4 = store_narrow_constants(ov_model)
    with tempfile.TemporaryDirectory(dir=xml_path.parent) as tmp:
        staged = Path(tmp) / xml_path.name
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(staged, xml_path)
    bin_path = xml_path.with_suffix(".bin")
    return {"path": str(xml_path), "bin": str(bin_path), "bytes": xml_path.stat().st_size + bin_path.stat().st_size,
            "int2_weights": int2, "int4_weights": int4}


def compile_ir(path: str | os.PathLike, config: dict | None = None, threads: int | None = None):
    """``openvino.Core().compile_model`` of the IR at ``path`` on the CPU (``config`` added; ``threads``:
    ``INFERENCE_NUM_THREADS``)."""
    ov = require_openvino()
    config = dict(config or {})
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(path), "CPU", config)


def runtime_precisions(compiled) -> dict[str, dict[str, int]]:
    """``{layer type: {runtime precision: count}}`` of a compiled model's executed graph (OpenVINO's
    ``get_runtime_model()``: ``Convolution: {"u8": 20}`` is an integer kernel, ``f32`` a float one)."""
    out: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind, precision = str(info["layerType"].astype(str)), str(info["runtimePrecision"].astype(str))
        out.setdefault(kind, {}).setdefault(precision, 0)
        out[kind][precision] += 1
    return out


def openvino_codes(path: str | os.PathLike, x: Tensor, config: dict | None = None) -> tuple[Tensor, list[Tensor]]:
    """Logits of the IR at ``path`` for ``x`` (CPU, ``config``) with every ``FakeQuantize``'s output read
    (an 8-bit quantization: the graph's ``QuantizeLinear -> DequantizeLinear``), and the codes each
    produced, in graph order: ``round((y - output_low) / step)`` in [0, levels - 1] (the ONNX codes,
    their zero point included).

    Reading those outputs makes them results of the compiled model, which changes how OpenVINO fuses
    the kernels around them (the order of its sums, hence which way a rounding tie falls), not what
    they compute: :func:`check_against_openvino` compares the plain compile with this one.
    """
    import numpy as np

    ov = require_openvino()
    core = ov.Core()
    ov_model = core.read_model(str(path))
    quantizers = [op for op in ov_model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    names, bounds = [], []
    for k, op in enumerate(quantizers):
        low, high = (op.input_value(i).get_node().get_data() for i in (3, 4))
        bounds.append((np.asarray(low, np.float64), np.asarray(high, np.float64), op.get_attributes()["levels"]))
        if not op.output(0).get_names():
            op.output(0).set_names({f"sqdist.fake_quantize.{k}"})
        names.append(op.output(0).get_any_name())
    if quantizers:
        ov_model.add_outputs([op.output(0) for op in quantizers])
    results = core.compile_model(ov_model, "CPU", dict(config or {}))(x.detach().cpu().float().numpy())
    codes = []
    for name, (low, high, levels) in zip(names, bounds):
        step = (high - low) / (levels - 1)
        codes.append(torch.from_numpy(np.round((results[name].astype(np.float64) - low) / step).astype(np.float32)))
    return torch.from_numpy(results[0]), codes


@torch.no_grad()
def check_against_openvino(path: str | os.PathLike, net: nn.Module, x: Tensor, model: nn.Module | None = None,
                           same_network: bool = True) -> dict:
    """Compare OpenVINO's logits of the IR at ``path`` with the converted network ``net`` in torch and
    with the trained ``model`` on ``x``: the rule of :func:`sqdist.export.onnx_check.check_against_torch`.

    With ``same_network`` (float activations, float stem and classifier) ``net``'s logits must equal the
    model's within ``TOLERANCE * max(1, max |logit|)``. OpenVINO against ``net``: each quantization is
    computed in torch from OpenVINO's codes of the one before (:func:`openvino_codes`); its codes must be
    OpenVINO's except at a rounding tie and at most :data:`~sqdist.export.onnx_check.FLIP_SHARE` of one
    quantization's one step off elsewhere, none more than one step; then the logits within
    ``TOLERANCE * max(1, max |logit|)`` (:func:`sqdist.export.onnx_check.hold_to_forced_codes`).

    Returns ``{"max_abs_diff", "tie_flips", "near_flips", "max_abs_diff_model", "model_rel_error",
    "model_agreement"}``; a failure is an :class:`ExportError`.
    """
    net.eval()
    reference = net(x).float()
    scale = max(1.0, float(reference.abs().max()))
    trained = _reference_logits(model, x) if model is not None else None
    model_diff = rel_error = agreement = None
    if trained is not None and same_network:
        model_diff = float((trained - reference).abs().max())
        if not model_diff <= TOLERANCE * scale:
            raise ExportError(f"{path}: the exported network's torch logits differ from the model's by "
                              f"{model_diff:.3g}")
    try:
        read, codes = openvino_codes(path, x, CHECK_CONFIG)
        logits = torch.from_numpy(compile_ir(path, CHECK_CONFIG)(x.detach().cpu().float().numpy())[0])
    except ExportError:
        raise
    except Exception as exc:  # OpenVINO raises its own types
        raise ExportError(f"{path}: OpenVINO cannot run it ({_one_line(exc)[:300]})") from None
    if logits.shape != reference.shape or read.shape != reference.shape:
        raise ExportError(f"{path}: OpenVINO gives logits of shape {tuple(logits.shape)}, torch "
                          f"{tuple(reference.shape)}")
    with forced_ties(codes) as record:
        forced = net(x).float()
    if record.calls != len(codes) or record.unmatched:
        raise ExportError(f"{path}: OpenVINO's {len(codes)} FakeQuantize outputs do not line up with the "
                          f"{record.calls} quantizations of the converted network ({record.unmatched} of "
                          f"another shape)")
    diff = hold_to_forced_codes(path, "OpenVINO", record, read, forced, scale)
    # the plain compile fuses the kernels whose outputs were read above (a residual add into its convolution), so
    # its rounding ties fall otherwise and move later codes by a step: another int8 computation of the network,
    # held to the trained model as the checked one is (at most PLAIN_FACTOR times as far, or LOGITS_TOLERANCE)
    plain_error = float((logits - read).norm() / read.norm().clamp_min(1e-12))
    if same_network or trained is None:
        distance, allowed = plain_error, (TOLERANCE if same_network else PLAIN_FACTOR * LOGITS_TOLERANCE)
    else:
        distance = float((logits - trained).norm() / trained.norm().clamp_min(1e-12))
        allowed = max(LOGITS_TOLERANCE, PLAIN_FACTOR * float((read - trained).norm() / trained.norm()))
    if not distance <= allowed:
        raise ExportError(f"{path}: OpenVINO's plain compile gives logits {distance:.3g} off (relative) the "
                          f"{'checked compile' if same_network or trained is None else 'trained model'} "
                          f"(tolerance {allowed:.3g}: {PLAIN_FACTOR}x what 8-bit rounding costs in the compile "
                          f"whose codes were checked)")
    if trained is not None:
        rel_error = float((logits - trained).norm() / trained.norm().clamp_min(1e-12))
        agreement = float((logits.argmax(-1) == trained.argmax(-1)).float().mean())
    return {"max_abs_diff": diff, "tie_flips": record.flipped, "near_flips": record.near,
            "plain_compile_rel_error": plain_error, "max_abs_diff_model": model_diff,
            "model_rel_error": rel_error, "model_agreement": agreement}


def export_openvino(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                    keep_fp_bits: int = 32, sq_ratio: float | None = None, force: bool = False,
                    metadata: dict | None = None, check: bool = True, activations: str = "float",
                    calibration: list[Tensor] | None = None) -> dict:
    """Write SQ ``model`` as OpenVINO IR at ``path`` (``.xml``, with its ``.bin``; see the module doc).

    The arguments are :func:`sqdist.export.export_onnx`'s (without ``opset``: :data:`OPENVINO_OPSET`).
    With ``check`` the ONNX export's own checks run (the converted network held to ``model``), then
    :func:`check_against_openvino`; a failure is an :class:`ExportError` and nothing is left at ``path``.

    Returns ``{"path", "bin", "bytes", "int2_weights", "int4_weights", "activations", "input", "float_layers",
    "runtime_precisions", "integer_convolutions", "float_convolutions", ...}`` with the check's entries
    (:func:`check_against_openvino`; None when not checked).
    """
    from .onnx_writer import check_batch, default_input_size, deployable, export_onnx

    require_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"out={str(path)!r}; allowed: an OpenVINO IR path ending in .xml (its weights go "
                          f"to the .bin beside it)")
    if not path.parent.is_dir():
        raise ExportError(f"out={str(path)!r}: folder {path.parent} does not exist; create it or write elsewhere")
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    activations = check_activations(activations)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        info = export_onnx(model, onnx_path, input_size=input_size, keep_fp_bits=keep_fp_bits, sq_ratio=sq_ratio,
                           force=force, metadata=metadata, opset=OPENVINO_OPSET, check=check,
                           activations=activations, calibration=calibration)
        written = onnx_to_openvino(onnx_path, path)
    out = {**written, "activations": activations, "input": info["input"], "float_layers": info["float_layers"],
           "onnx_int4_weights": info["int4_weights"], "onnx_int8_weights": info["int8_weights"],
           "rounding_worst_share": info.get("rounding_worst_share"), "max_abs_diff": None, "tie_flips": None,
           "near_flips": None, "max_abs_diff_model": None, "model_rel_error": None, "model_agreement": None}
    if check:
        try:
            net = deployable(model, keep_fp_bits, activations, calibration)
            x = check_batch(calibration if activations == "int8" else None, input_size)
            same = keep_fp_bits == 32 and activations == "float" and all(
                t.device.type == "cpu" for t in model.parameters())
            out.update(check_against_openvino(path, net, x, model, same_network=same))
        except ExportError:
            remove_ir(path)
            raise
    precisions = runtime_precisions(compile_ir(path, CHECK_CONFIG))
    out["runtime_precisions"] = precisions
    out["integer_convolutions"] = sum(n for p, n in precisions.get("Convolution", {}).items() if p in ("u8", "i8"))
    out["float_convolutions"] = sum(n for p, n in precisions.get("Convolution", {}).items() if p not in ("u8", "i8"))
    return out


def remove_ir(path: str | os.PathLike) -> None:
    """Remove an IR's ``.xml`` and ``.bin``."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.with_suffix(".bin").unlink(missing_ok=True)


@torch.no_grad()
def top1_openvino(model: nn.Module, path: str | os.PathLike, evaluation, batch_size: int) -> dict:
    """Top-1 (percent) of the IR in OpenVINO (CPU, float32 float parts) and of ``model`` on
    ``evaluation``, and ``agreement``: the percent of examples on which the two predict the same class."""
    compiled = compile_ir(path, CHECK_CONFIG)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=batch_size)
    right_ov = right_model = same = total = 0
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x, y in loader:
        theirs = torch.from_numpy(compiled(x.float().numpy())[0]).argmax(1)
        ours = model(x.to(device)).argmax(1).cpu()
        right_ov += int((theirs == y).sum())
        right_model += int((ours == y).sum())
        same += int((theirs == ours).sum())
        total += len(y)
    return {"top1_openvino": 100.0 * right_ov / total, "top1_model": 100.0 * right_model / total,
            "agreement": 100.0 * same / total, "eval_examples": total}


def check_openvino(path: str | os.PathLike) -> dict:
    """Verify an IR on its own (``python -m sqdist.export --check OUT.xml``): OpenVINO reads and compiles
    it and runs a random batch of 2 to finite logits. Returns ``{"input", "int2_weights", "int4_weights",
    "integer_convolutions", "float_convolutions"}``; problems are :class:`ExportError`."""
    import numpy as np

    ov = require_openvino()
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise ExportError(f"{path}: no such IR (the .xml and the .bin beside it)")
    try:
        ov_model = ov.Core().read_model(str(path))
        dims = [d.get_length() if d.is_static else "batch" for d in ov_model.input(0).get_partial_shape()]
        compiled = compile_ir(path, CHECK_CONFIG)
        x = np.random.default_rng(0).standard_normal((2, *dims[1:])).astype(np.float32)
        logits = compiled(x)[0]
    except Exception as exc:  # OpenVINO raises its own types
        raise ExportError(f"{path}: OpenVINO cannot read or run it ({_one_line(exc)[:300]})") from None
    if logits.shape[0] != 2 or not np.isfinite(logits).all():
        raise ExportError(f"{path}: OpenVINO gives logits of shape {tuple(logits.shape)} for a batch of 2, finite: "
                          f"{bool(np.isfinite(logits).all())}")
    precisions = runtime_precisions(compiled).get("Convolution", {})
    kinds = [op.get_output_element_type(0) for op in ov_model.get_ops() if op.get_type_name() == "Constant"]
    return {"input": dims, "int2_weights": kinds.count(ov.Type.u2), "int4_weights": kinds.count(ov.Type.i4),
            "integer_convolutions": sum(n for p, n in precisions.items() if p in ("u8", "i8")),
            "float_convolutions": sum(n for p, n in precisions.items() if p not in ("u8", "i8"))}
