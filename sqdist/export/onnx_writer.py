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

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._version import __version__
from .deployable import _sq_layers, check_ratio, deployable_layers
from .format import ExportError, _one_line, check_keep_fp_bits
from .qdq import InputQuantizer, WeightFromCodes, _quantize_input_hook
from .run import load_run

OPSET = 17  # per-axis DequantizeLinear needs 13; LayerNormalization (ViT) is a single node from 17
INPUT, OUTPUT = "input", "logits"
TOLERANCE = 1e-4  # onnxruntime against torch, relative to max(1, max |logit|)


def deployable(model: nn.Module, keep_fp_bits: int = 32) -> nn.Module:
    """A float32 CPU copy of SQ ``model`` in eval mode, built for export; ``model`` is left as it is.

    Each SQ layer becomes its plain class again (``nn.Conv2d``, ``nn.Linear``, ...) with its
    weight parametrized as :class:`~sqdist.export.qdq.WeightFromCodes` (the int8 codes times the
    per-row scale of its :class:`~sqdist.export.deployable.DeployableLayer`) and, when that says its
    input is quantized, an :class:`~sqdist.export.qdq.InputQuantizer` on its input. With
    ``keep_fp_bits=8`` the full-precision Conv/Linear layers get their 8-bit per-row codes too.
    """
    from ..nn import SQ_CLASSES

    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    plain = {sq_cls: base for base, sq_cls in SQ_CLASSES.items()}
    layers = _sq_layers(model)
    controllers = {name: layer.__dict__.get("_sq") for name, layer in layers.items()}
    try:  # the controller (generators, selector state) is not part of the network
        for layer in layers.values():
            layer._sq = None
        net = copy.deepcopy(model)
    finally:
        for name, layer in layers.items():
            layer._sq = controllers[name]
    net = net.cpu().float().eval()
    for m in net.modules():  # timm attention: the TorchScript exporter cannot trace F.scaled_dot_product_attention
        if isinstance(getattr(m, "fused_attn", None), bool):  # as EVA calls it; the explicit softmax(q k^T) v traces
            m.fused_attn = False
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
                layer.register_forward_pre_hook(_quantize_input_hook)
    return net


# ---------------------------------------------------------------- export
def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'sqdist[onnx]'") from None
    return onnx


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


def _graph_summary(graph) -> dict:
    inits = {t.name: t for t in graph.initializer}
    int8 = 3  # onnx.TensorProto.INT8
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    return {
        "int8_weights": sum(1 for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == int8),
        "qdq_inputs": sum(1 for n in graph.node if n.op_type == "QuantizeLinear"),
    }


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


def exact_session_options():
    """onnxruntime ``SessionOptions`` under which the graph computes the trained network's logits.

    onnxruntime's CPU provider fuses ``DequantizeLinear -> MatMul`` (the Linear layers of a
    transformer's blocks) into ``MatMulNBits`` and by default (accuracy level 4) computes
    those with int8-quantized activations: faster, but the logits move (about 1e-2 on a small
    ViT). Level 1 keeps float32 activations. Conv and Gemm are not affected.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def run_onnxruntime(path: str | os.PathLike, x: Tensor) -> Tensor | None:
    """Logits of the ONNX file at ``path`` for ``x`` on onnxruntime's CPU provider with
    :func:`exact_session_options` (None if onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        session = ort.InferenceSession(str(path), exact_session_options(), providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT], {INPUT: x.detach().cpu().float().numpy()})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot run it ({_one_line(exc)[:300]})") from None
    return torch.from_numpy(logits)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                keep_fp_bits: int = 32, sq_ratio: float | None = None, force: bool = False,
                metadata: dict | None = None, opset: int = OPSET, check: bool = True) -> dict:
    """Write SQ ``model`` as an ONNX graph of int8 weight codes + ``DequantizeLinear`` (see the module doc).

    Args:
        model: a model prepared by :func:`sqdist.quantize_model` (not changed here).
        path: the ``.onnx`` file to write (replaced atomically).
        input_size: ``(C, H, W)`` of the traced input; default :func:`default_input_size`.
            The batch dimension is dynamic.
        keep_fp_bits: 32 keeps the full-precision layers as float initializers, 8 stores them
            as int8 per-row codes with their own ``DequantizeLinear``.
        sq_ratio, force: as in :func:`sqdist.export.export_model` (refused below 1 unless ``force``).
        metadata: extra ``metadata_props`` of the ONNX model (values JSON-encoded).
        opset: ONNX opset (13 or higher: per-axis ``DequantizeLinear``).
        check: run the written file in onnxruntime (when installed) on a batch of 3 and
            compare its logits with the torch eval forward (the SQ model itself; the exported
            network with ``keep_fp_bits=8`` or a model off the CPU); a difference above
            ``1e-4 * max(1, max |logit|)`` is an :class:`ExportError` and the file is removed.

    Returns:
        ``{"path", "bytes", "opset", "input", "int8_weights", "qdq_inputs", "max_abs_diff"}``
        (``max_abs_diff`` None when not checked).
    """
    onnx = _require_onnx()
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    sq_ratio = check_ratio(model, sq_ratio, force)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ExportError(f"opset={opset!r}; allowed: an integer >= 13 (per-axis DequantizeLinear)")
    net = deployable(model, keep_fp_bits)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise ExportError(f"input_size={input_size!r}; allowed: three positive integers (C, H, W)")
    traced = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (traced,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; the user needs the one line
        tmp.unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export failed for input size {input_size}: {_one_line(exc)[:300]}") from None

    graph_model = onnx.load(str(tmp))
    _tidy(graph_model.graph)
    quantizer = next(iter(_sq_layers(model).values())).quantizer
    props = {
        "sqdist_version": __version__,
        "model": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "quantizer": {"name": getattr(quantizer, "quantizer_name", "?"), "params": quantizer.config()},
        "sq": {"ratio": sq_ratio},
        "keep_fp_bits": keep_fp_bits,
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
    info = {"path": str(path), "bytes": path.stat().st_size, "opset": opset,
            "input": ["batch", *input_size], **_graph_summary(graph_model.graph), "max_abs_diff": None}
    if check:
        x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))  # not the traced batch size
        on_cpu = all(t.device.type == "cpu" for t in model.parameters())
        reference = _reference_logits(model if keep_fp_bits == 32 and on_cpu else net, x)
        logits = run_onnxruntime(path, x)
        if logits is not None:
            if logits.shape != reference.shape:
                path.unlink()
                raise ExportError(f"{path}: onnxruntime gives logits of shape {tuple(logits.shape)}, torch "
                                  f"{tuple(reference.shape)} (removed)")
            diff = float((logits - reference).abs().max())
            if not diff <= TOLERANCE * max(1.0, float(reference.abs().max())):
                path.unlink()
                raise ExportError(f"{path}: onnxruntime logits differ from torch's by {diff:.3g} (removed)")
            info["max_abs_diff"] = diff
    return info


@torch.no_grad()
def _reference_logits(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x).float()
    finally:
        model.train(was_training)


def export_run_onnx(source: str | os.PathLike, out: str | os.PathLike, force: bool = False, keep_fp_bits: int = 32,
                    input_size: tuple[int, int, int] | None = None) -> dict:
    """Rebuild the trained model of a run or checkpoint folder and :func:`export_onnx` it.

    The input size defaults to the run's recipe (``data.image_size``, RUN/config.yaml).
    """
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    _require_onnx()
    model, meta = load_run(source, force)
    if input_size is None:
        input_size = default_input_size(model, meta["config"])
    extra = {"model": {"name": meta["model_name"], "kwargs": meta["model_kwargs"]}, "sq": {**meta["sq"],
             "ratio": meta["ratio"]}, "source": str(meta["checkpoint"])}
    return export_onnx(model, out, input_size=input_size, keep_fp_bits=keep_fp_bits, sq_ratio=meta["ratio"],
                       force=force, metadata=extra)


def check_onnx(path: str | os.PathLike) -> dict:
    """Verify an ONNX export: the ONNX checker, then onnxruntime runs it on a random batch of 2.

    Returns ``{"opset", "input", "int8_weights", "qdq_inputs"}``; problems are :class:`ExportError`.
    """
    onnx = _require_onnx()
    path = str(path)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    try:
        graph_model = onnx.load(path)
        onnx.checker.check_model(graph_model)
    except Exception as exc:  # protobuf decode errors and checker errors have several types
        raise ExportError(f"{path}: not a valid ONNX model, truncated or corrupted ({_one_line(exc)[:300]})") from None
    inputs = [i for i in graph_model.graph.input if i.name == INPUT]
    if not inputs:
        raise ExportError(f"{path}: no graph input named {INPUT!r}; not an sqdist ONNX export")
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise ExportError(f"{path}: input shape {dims}; expected (batch, C, ...) with fixed C, ...")
    x = torch.randn(2, *dims[1:], generator=torch.Generator().manual_seed(0))
    logits = run_onnxruntime(path, x)
    if logits is None:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install 'sqdist[onnx]'")
    if logits.shape[0] != 2 or not bool(torch.isfinite(logits).all()):
        raise ExportError(f"{path}: onnxruntime gives logits of shape {tuple(logits.shape)} for a batch of 2, "
                          f"finite: {bool(torch.isfinite(logits).all())}")
    opset = next((o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "input": dims, **_graph_summary(graph_model.graph)}
