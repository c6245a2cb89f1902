"""onnxruntime's side of an ONNX export: run a file, read the codes it chose, compare with torch.

:func:`check_against_torch` is the check every :func:`sqdist.export.export_onnx` runs after
writing (a default ``onnxruntime.InferenceSession``, rounding ties forced, see
:func:`sqdist.export.qdq.forced_ties`); :func:`check_onnx` verifies a file on its own
(``python -m sqdist.export --check OUT.onnx``).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .format import ExportError, _one_line
from .qdq import forced_ties

INPUT, OUTPUT = "input", "logits"
TOLERANCE = 1e-4  # onnxruntime against torch, relative to max(1, max |logit|)
FLIP_SHARE = 0.01  # at most this share of one quantization's codes may be one step off away from a tie


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'sqdist[onnx]'") from None
    return onnx


def _graph_summary(graph) -> dict:
    import onnx

    inits = {t.name: t for t in graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    kinds = [inits[cast_of.get(n.input[0], n.input[0])].data_type for n in dq
             if cast_of.get(n.input[0], n.input[0]) in inits]
    return {
        "int8_weights": kinds.count(onnx.TensorProto.INT8),
        "int4_weights": kinds.count(onnx.TensorProto.INT4),
        "int2_weights": kinds.count(onnx.TensorProto.INT2),
        "qdq_inputs": sum(1 for n in graph.node if n.op_type == "QuantizeLinear"),
    }


def exact_session_options():
    """onnxruntime ``SessionOptions`` that keep ``MatMulNBits`` (a fused ``DequantizeLinear -> MatMul``
    of block-quantized weights) on float32 activations (accuracy level 1).

    Not needed for sqdist's graphs: their per-row (axis 0) ``DequantizeLinear`` is not fused into
    ``MatMulNBits``, and the export check runs a default session. Kept for graphs that are.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def run_onnxruntime(path: str | os.PathLike, x: Tensor) -> Tensor | None:
    """Logits of the ONNX file at ``path`` for ``x`` in a default onnxruntime session on the CPU
    provider (what a user creates); None if onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT], {INPUT: x.detach().cpu().float().numpy()})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot run it ({_one_line(exc)[:300]})") from None
    return torch.from_numpy(logits)


def onnxruntime_codes(path: str | os.PathLike, x: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """Run the ONNX file at ``path`` on ``x`` in a default onnxruntime session (CPU); return its logits
    and, for each ``QuantizeLinear`` of the file (in graph order), the codes it produced (as float,
    in the file's zero point, NCHW), or None where they cannot be read.

    Where onnxruntime fused the node into an integer kernel (``QLinearConv``, ``QLinearAdd``, ...:
    the one whose output scale is the node's), the codes are that kernel's output: every tie it
    decided can then be forced, not only those of the nodes left standing (a flip there reaches the
    next layer as a value a few hundredths of a step off, which no tie window explains).

    The codes come from the session's own optimized graph (saved by onnxruntime) with those
    nodes' outputs added as graph outputs and run without further optimization, so they are the
    codes of the graph the default session runs; its logits must equal the session's. Where
    onnxruntime moved a ``QuantizeLinear`` across a ``Transpose`` or ``Reshape`` (its QDQ
    propagation; the moved node gets another name, e.g. after a ``LayerNorm2d``), the codes are
    read at the input of the node's own ``DequantizeLinear``, which keeps its name and sees them
    in the written layout.
    """
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    def constants(graph) -> dict:
        values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        return values

    written = onnx.load(str(path))
    quantizers = [n for n in written.graph.node if n.op_type == "QuantizeLinear"]
    readers = {}
    for node in written.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def paired_dequantize(node):  # QuantizeLinear -> [Clip] -> DequantizeLinear, as the export writes it
        after = readers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Clip":
            after = readers.get(after[0].output[0], [])
        return after[0].name if len(after) == 1 and after[0].op_type == "DequantizeLinear" else None

    written_values = constants(written.graph)
    feed = {INPUT: x.detach().cpu().float().numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3  # its note that the saved graph is specific to this CPU
        (logits,) = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run([OUTPUT], feed)
        optimized = onnx.load(options.optimized_model_filepath)
        for node in optimized.graph.node:  # a saved Q/DQ propagated past a Reshape can keep output_dtype=INT8
            if node.op_type == "QuantizeLinear" and len(node.input) == 3:  # next to a uint8 zero point
                kept = [a for a in node.attribute if a.name != "output_dtype"]
                del node.attribute[:]
                node.attribute.extend(kept)
        values = constants(optimized.graph)
        last = _channels_last(optimized.graph, {n.name for n in written.graph.node if n.op_type == "Transpose"})
        alive = {n.name: n for n in optimized.graph.node if n.op_type == "QuantizeLinear"}
        dequantizers = {n.name: n for n in optimized.graph.node if n.op_type == "DequantizeLinear"}
        outputs, shifts = [], []
        fused = [n for n in optimized.graph.node if n.op_type in _FUSED_OUTPUT]
        producer = {o: n for n in written.graph.node for o in n.output}
        taken: set[int] = set()

        def fused_into(node):
            """The integer kernel whose output is this QuantizeLinear's codes: the one onnxruntime made of the
            node that computed its input (named after it: "<name>", "<name>_token_N"), with its y_scale."""
            source = producer.get(node.input[0])
            while source is not None and source.op_type in ("Relu", "Clip") and source.input[0] in producer:
                source = producer[source.input[0]]
            if source is None or not source.name:
                return None, None
            for k, f in enumerate(fused):
                i, j = _FUSED_OUTPUT[f.op_type]
                if (k not in taken and len(f.input) > j and f.input[i] == node.input[1]
                        and (f.name == source.name or f.name.startswith(source.name + "_token"))):
                    taken.add(k)
                    return f.output[0], f.input[j]
            return None, None

        for node in quantizers:
            mine, codes_name, zero_point_name = alive.get(node.name), None, None
            if mine is not None:
                codes_name = mine.output[0]
            else:  # moved by QDQ propagation: the codes its DequantizeLinear reads
                mine = dequantizers.get(paired_dequantize(node))
                codes_name = mine.input[0] if mine is not None else None
            if mine is not None and len(mine.input) >= 3:
                zero_point_name = mine.input[2]
            elif mine is None and len(node.input) >= 3:
                codes_name, zero_point_name = fused_into(node)
            if codes_name is None or zero_point_name not in values or len(node.input) < 3:
                outputs.append(None)
                continue
            zero_point = values[zero_point_name]
            optimized.graph.output.append(helper.make_tensor_value_info(
                codes_name, helper.np_dtype_to_tensor_dtype(zero_point.dtype), None))
            outputs.append(codes_name)
            # onnxruntime may turn int8 codes into uint8 ones (+128); back to the file's zero point
            shifts.append(int(written_values[node.input[2]].reshape(-1)[0]) - int(zero_point.reshape(-1)[0]))
        instrumented = os.path.join(tmp, "instrumented.onnx")
        onnx.save(optimized, instrumented)
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain.log_severity_level = 3
        names = [OUTPUT] + [o for o in outputs if o is not None]
        results = dict(zip(names, ort.InferenceSession(instrumented, plain, providers=["CPUExecutionProvider"])
                           .run(names, feed)))
    if not np.array_equal(results[OUTPUT], logits):
        raise ExportError(f"{path}: onnxruntime's saved optimized graph does not reproduce its session's logits "
                          f"(max difference {float(np.abs(results[OUTPUT] - logits).max()):.3g})")
    shift = iter(shifts)
    codes = [None if o is None else torch.from_numpy(results[o].astype(np.float32) + next(shift)) for o in outputs]
    codes = [c.movedim(-1, 1) if c is not None and o in last and c.dim() >= 3 else c for c, o in zip(codes, outputs)]
    return torch.from_numpy(logits), codes


# onnxruntime's integer kernels that fuse a QuantizeLinear: the positions of their output scale and zero point
_FUSED_OUTPUT = {"QLinearConv": (6, 7), "QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearMatMul": (6, 7),
                 "QGemm": (7, 8), "QLinearAveragePool": (3, 4), "QLinearGlobalAveragePool": (3, 4),
                 "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4), "QLinearSoftmax": (3, 4)}

# element by element: the output has the layout of the inputs (onnxruntime's layout transformer keeps
# such ops between two channels-last convolutions in NHWC)
_ELEMENTWISE = {"QuantizeLinear", "DequantizeLinear", "Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh",
                "Mul", "Add", "Sub", "Div", "Erf", "Gelu", "FastGelu", "QuickGelu", "LeakyRelu", "Identity", "Cast",
                "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                # and ops onnxruntime's transpose optimizer keeps in the layout it is handed (axes rewritten)
                "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "Concat", "Pad", "Slice", "Resize",
                "QLinearConcat", "QLinearReduceMean"}


def _channels_last(graph, model_transposes: set[str] = frozenset()) -> set[str]:
    """The tensors of onnxruntime's optimized ``graph`` held channels last (NHWC): outputs of its
    ``channels_last`` kernels (``QLinearConv``, ``NhwcMaxPool``, ...), of a ``Transpose`` to that
    layout that onnxruntime inserted (not one of ``model_transposes``, the written graph's own: a
    ViT's tokens), and of element-wise ops reading one."""
    import onnx

    last: set[str] = set()
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        data = [i for i in node.input if i]
        if node.op_type == "Transpose":
            perm = list(attrs.get("perm", []))
            rank = len(perm)
            if (rank >= 3 and perm == [0, *range(2, rank), 1] and data[0] not in last  # NCHW -> NHWC
                    and node.name not in model_transposes):
                last.add(node.output[0])
        elif "channels_last" in attrs:
            if attrs["channels_last"]:
                last.update(node.output)
        elif node.op_type.startswith("Nhwc"):
            last.update(node.output)
        elif node.op_type in _ELEMENTWISE and any(i in last for i in data):
            last.update(node.output)
    return last


@torch.no_grad()
def check_against_torch(path: str | os.PathLike, net: nn.Module, x: Tensor, model: nn.Module | None = None,
                        same_network: bool = True) -> dict | None:
    """Compare the logits of a default onnxruntime session on the file at ``path`` with the trained
    ``model`` and with the deployable network ``net`` (what :func:`export_onnx` traced) in torch, on ``x``.

    Against the trained model (the user's network, when given): with ``same_network`` (float
    activations as trained, full-precision layers as floats) its eval logits must equal ``net``'s
    within the tolerance below. Otherwise (8-bit activations, 8-bit stem and classifier) the
    export rounds more than the model: :func:`sqdist.export.parity.check_rounding` holds ``net`` to the model, and
    this reports ``model_rel_error`` (``||ort - model|| / ||model||``) and ``model_agreement``
    (share of equal argmax), what that rounding costs on ``x``.

    onnxruntime against ``net``: torch computes each quantization of ``net`` from onnxruntime's codes
    of the one before (every ``QuantizeLinear`` whose codes can be read, fused ones included:
    :func:`onnxruntime_codes`, :func:`~sqdist.export.qdq.forced_ties`) and its codes must be
    onnxruntime's, except a value within ``sqdist.export.qdq.TIE_WINDOW`` of a rounding tie
    (``x / scale = k + 1/2`` up to float noise), which lands on either side in two runtimes that
    sum in different orders, and at most :data:`FLIP_SHARE` of one quantization's codes one step off elsewhere
    (onnxruntime's float softmax, GELU and LayerNorm move a value by a few hundredths of a step);
    none more than one step off. The logits must then agree within
    ``TOLERANCE * max(1, max |logit|)``. A wrong scale or zero point moves codes by whole steps.

    Returns ``{"max_abs_diff", "tie_flips", "near_flips", "max_abs_diff_model", "model_rel_error",
    "model_agreement"}`` (``tie_flips``: codes onnxruntime decided the other way at a tie,
    ``near_flips``: one step off away from one; the
    model's entries None without ``model``), None when onnxruntime is not installed; a failure is
    an :class:`ExportError`.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    net.eval()
    reference = net(x).float()
    scale = max(1.0, float(reference.abs().max()))
    model_diff = rel_error = agreement = None
    trained = _reference_logits(model, x) if model is not None else None
    if trained is not None and same_network:
        model_diff = float((trained - reference).abs().max())
        if not model_diff <= TOLERANCE * scale:
            raise ExportError(f"{path}: the exported network's torch logits differ from the model's by "
                              f"{model_diff:.3g} (removed)")
    try:
        logits, codes = onnxruntime_codes(path, x)
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot run it ({_one_line(exc)[:300]}) (removed)") from None
    if logits.shape != reference.shape:
        raise ExportError(f"{path}: onnxruntime gives logits of shape {tuple(logits.shape)}, torch "
                          f"{tuple(reference.shape)} (removed)")
    if trained is not None:
        rel_error = float((logits - trained).norm() / trained.norm().clamp_min(1e-12))
        agreement = float((logits.argmax(-1) == trained.argmax(-1)).float().mean())
    with forced_ties(codes) as record:
        forced = net(x).float()
    if record.calls != len(codes):  # the torch quantizations do not line up with the graph's: compare as is
        forced, record.flipped, record.near, record.far = reference, None, None, 0
    if record.unmatched:
        raise ExportError(f"{path}: {record.unmatched} of onnxruntime's code tensors do not have the shape of torch's "
                          f"(read in another layout, or from another node) (removed)")
    diff = hold_to_forced_codes(path, "onnxruntime", record, logits, forced, scale, " (removed)")
    return {"max_abs_diff": diff, "tie_flips": record.flipped, "near_flips": record.near,
            "max_abs_diff_model": model_diff,
            "model_rel_error": rel_error, "model_agreement": agreement}


def hold_to_forced_codes(path, runtime: str, record, logits: Tensor, forced: Tensor, scale: float,
                         suffix: str = "") -> float:
    """The rule both runtime checks end with, once torch has computed each quantization from the runtime's
    codes of the one before (``record``: :func:`sqdist.export.qdq.forced_ties`'s, ``forced``: torch's logits so
    computed): no code more than one step off, at most :data:`FLIP_SHARE` of one quantization's one step off
    away from a rounding tie, then the runtime's ``logits`` within ``TOLERANCE * scale`` of ``forced``.
    Returns their largest absolute difference; a failure is an :class:`ExportError` ending in ``suffix``."""
    if record.far or record.worst_near > FLIP_SHARE:
        raise ExportError(f"{path}: {runtime}'s codes differ from torch's computed from the same inputs: "
                          f"{record.far} by more than one step, up to {100 * record.worst_near:.2f}% of one "
                          f"quantization's by one step away from a rounding tie (allowed: none, and "
                          f"{100 * FLIP_SHARE:g}%){suffix}")
    diff = float((logits - forced).abs().max())
    if not diff <= TOLERANCE * scale:
        raise ExportError(f"{path}: {runtime}'s logits differ from torch's by {diff:.3g} (tolerance "
                          f"{TOLERANCE * scale:.3g}; {record.flipped} codes decided the other way at a rounding tie)"
                          f"{suffix}")
    return diff


@torch.no_grad()
def _reference_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's eval logits on ``x``, on the CPU (the model's own device runs it), its attention
    computed as the export traces it (timm's ``fused_attn`` off: ``softmax(q k^T) v``, not the fused
    kernel, whose other order of sums decides activation rounding ties otherwise, by CPU)."""
    was_training = model.training
    device = next((p.device for p in model.parameters()), x.device)
    from .deployable import unfuse_attention

    model.eval()
    fused = unfuse_attention(model)
    try:
        return model(x.to(device)).float().cpu()
    finally:
        for m in fused:
            m.fused_attn = True
        model.train(was_training)


@torch.no_grad()
def _top1(model: nn.Module, path: str, evaluation, batch_size: int) -> dict:
    """Top-1 (percent) of the ONNX file (default onnxruntime session) and of ``model`` on ``evaluation``,
    and ``agreement``: the percent of examples on which the two predict the same class."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    loader = torch.utils.data.DataLoader(evaluation, batch_size=batch_size)
    right_onnx = right_model = same = total = 0
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for x, y in loader:
        (logits,) = session.run([OUTPUT], {INPUT: x.float().numpy()})
        theirs, ours = torch.from_numpy(logits).argmax(1), model(x.to(device)).argmax(1).cpu()
        right_onnx += int((theirs == y).sum())
        right_model += int((ours == y).sum())
        same += int((theirs == ours).sum())
        total += len(y)
    return {"top1_onnx": 100.0 * right_onnx / total, "top1_model": 100.0 * right_model / total,
            "agreement": 100.0 * same / total, "eval_examples": total}


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
