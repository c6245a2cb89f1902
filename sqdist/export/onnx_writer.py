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
import copy
import json
import os
import tempfile
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..version import __version__
from .deployable import _sq_layers, check_ratio, deployable_layers, model_copy, unfuse_attention
from .format import ExportError, _one_line, check_keep_fp_bits
from .int8 import NotInteger, check_activations, integer_deployable, integer_layer_names
from .parity import check_rounding, cpu_has_vnni, full_precision_weights, wide_weight_codes
from .onnx_check import (INPUT, OUTPUT, TOLERANCE, _graph_summary, _require_onnx, _top1,  # noqa: F401
                         check_against_torch, check_onnx, exact_session_options, onnxruntime_codes, run_onnxruntime)
from .qdq import InputQuantizer, WeightFromCodes, _quantize_input_hook
from .run import load_run

OPSET = 25  # INT2 (ternary, binary) and INT4 (<= 4 bits) initializers; 17 stores every code as int8
INT4_OPSET = 21
INT2_OPSET = 25  # INT2 initializers (ternary and binary codes)
TRACE_OPSET = 17  # what torch.onnx's TorchScript exporter writes (it stops at 20); onnx's version converter goes on


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


def store_int4(graph, int2: bool = False) -> int:
    """Store every int8 weight-code initializer whose codes fit in [-8, 7] (every layer of 4 bits or
    fewer) as an INT4 initializer, or with ``int2`` those that fit in [-2, 1] (ternary, binary) as
    INT2, read through ``Cast(to=INT8)`` into its ``DequantizeLinear``.

    The Cast runs once, when onnxruntime folds constants at load, so the graph keeps the
    ``DequantizeLinear(int8) -> Conv`` pattern that its integer kernels fuse (a ``DequantizeLinear``
    of INT4 itself is not fused: the convolution would run in float). INT4 needs opset 21, INT2
    opset 25. Returns how many initializers were converted.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    converted = []
    for node in graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else None
        if name not in inits or inits[name].data_type != onnx.TensorProto.INT8 or len(readers[name]) != 1:
            continue
        codes = numpy_helper.to_array(inits[name])
        if codes.size == 0 or codes.min() < -8 or codes.max() > 7:
            continue
        bits = 2 if int2 and codes.min() >= -2 and codes.max() <= 1 else 4
        per_byte = 8 // bits
        fields = (codes.reshape(-1).astype(np.int8) & (2 ** bits - 1)).astype(np.uint8)
        fields = np.concatenate([fields, np.zeros(-fields.size % per_byte, np.uint8)]).reshape(-1, per_byte)
        packed = np.zeros(len(fields), np.uint8)
        for j in range(per_byte):  # the first code in the lowest bits
            packed |= fields[:, j] << (bits * j)
        kind = onnx.TensorProto.INT2 if bits == 2 else onnx.TensorProto.INT4
        inits[name].CopyFrom(onnx.TensorProto(name=name, data_type=kind, dims=codes.shape, raw_data=packed.tobytes()))
        node.input[0] = f"{name}.int8"
        converted.append(onnx.helper.make_node("Cast", [name], [node.input[0]], to=onnx.TensorProto.INT8,
                                               name=f"{name}.cast"))
    for i, cast in enumerate(converted):
        graph.node.insert(i, cast)
    return len(converted)


def _tidy(graph) -> None:
    """Drop Identity nodes (the exporter's aliases of initializers) and name the codes, scales
    and zero points of a layer ``L`` ``L.weight.codes`` etc. (not ``L.parametrizations.weight.0.codes``)."""
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            graph.node.remove(node)
    renamed = {}
    for init in graph.initializer:
        tidy = init.name.replace(".parametrizations.weight.0.", ".weight.")
        if tidy != init.name:
            renamed[init.name] = tidy
            init.name = tidy
    for node in graph.node:
        for i, name in enumerate(node.input):
            source = alias.get(name, name)
            source = renamed.get(source, source)
            if source != name:
                node.input[i] = source


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
    _tidy(graph_model.graph)
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


def export_run_onnx(source: str | os.PathLike, out: str | os.PathLike, force: bool = False, keep_fp_bits: int = 32,
                    input_size: tuple[int, int, int] | None = None, activations: str = "float",
                    calib_batches: int = 8, opset: int = OPSET) -> dict:
    """Rebuild the trained model of a run or checkpoint folder and :func:`export_onnx` it.

    The input size defaults to the run's recipe (``data.image_size``, RUN/config.yaml). With
    ``activations="int8"`` the ranges are calibrated on ``calib_batches`` batches of the run's
    training data (its recipe's ``data``, ``data.batch_size`` each, a fixed shuffle), and the
    result adds ``top1_onnx`` (onnxruntime, default session) and ``top1_model`` (the run's model
    in torch) on the run's evaluation split, in percent.
    """
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    activations = check_activations(activations)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ExportError(f"calib_batches={calib_batches!r}; allowed: an integer >= 1")
    _require_onnx()
    model, meta = load_run(source, force)
    if input_size is None:
        input_size = default_input_size(model, meta["config"])
    extra = {"model": {"name": meta["model_name"], "kwargs": meta["model_kwargs"]}, "sq": {**meta["sq"],
             "ratio": meta["ratio"]}, "source": str(meta["checkpoint"])}
    calibration, evaluation = None, None
    if activations == "int8":
        calibration, evaluation = _run_data(meta, calib_batches)
    info = export_onnx(model, out, input_size=input_size, keep_fp_bits=keep_fp_bits, sq_ratio=meta["ratio"],
                       force=force, metadata=extra, activations=activations, calibration=calibration, opset=opset)
    if evaluation is not None:
        info.update(_top1(model, info["path"], evaluation, int(meta["config"]["data"]["batch_size"])))
    return info


def _run_data(meta: dict, calib_batches: int):
    """(calibration batches from the run's training split, its evaluation set) from the run's recipe.

    The calibration images are read as the evaluation reads them (no augmentation, the evaluation
    transform: :func:`sqdist.data.eval_view`), a fixed subset (seed 0): two exports of one run are equal.
    """
    from ..data import build_datasets, eval_view

    config = meta["config"]
    if not config or "data" not in config:
        raise ExportError(f"{meta['checkpoint']}: no config.yaml with a data section next to the checkpoint; "
                          f"activations='int8' calibrates on the run's training data")
    try:
        train, evaluation = build_datasets(config)
    except Exception as exc:  # a missing data.root and the like
        raise ExportError(f"{meta['checkpoint']}: the run's data cannot be loaded ({_one_line(exc)[:200]})") from None
    view = eval_view(train, evaluation)
    batch = int(config["data"]["batch_size"])
    order = torch.randperm(len(view), generator=torch.Generator().manual_seed(0))[: calib_batches * batch]
    calibration = [torch.stack([view[int(i)][0] for i in chunk]) for chunk in order.split(batch)]
    return calibration, evaluation
