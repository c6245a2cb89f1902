"""Graph passes on the ONNX graph torch.onnx writes: weight codes stored as INT4/INT2 initializers
(:func:`store_int4`) and the exporter's aliases and parametrization names tidied (:func:`tidy`)."""
from __future__ import annotations

import torch

from .. import bitpack


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
        fields = (codes.reshape(-1).astype(np.int8) & (2 ** bits - 1)).astype(np.uint8)
        packed = bitpack.pack(torch.from_numpy(fields), bits).numpy()  # the first code in the lowest bits
        kind = onnx.TensorProto.INT2 if bits == 2 else onnx.TensorProto.INT4
        inits[name].CopyFrom(onnx.TensorProto(name=name, data_type=kind, dims=codes.shape, raw_data=packed.tobytes()))
        node.input[0] = f"{name}.int8"
        converted.append(onnx.helper.make_node("Cast", [name], [node.input[0]], to=onnx.TensorProto.INT8,
                                               name=f"{name}.cast"))
    for i, cast in enumerate(converted):
        graph.node.insert(i, cast)
    return len(converted)


def tidy(graph) -> None:
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
