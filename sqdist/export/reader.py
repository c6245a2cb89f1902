"""The packed reader: a file of any readable format version -> a dequantized state dict and its
metadata (:func:`read_packed`), or a plain timm model (:func:`load_quantized`).

Version 1 files have no ``fp_layers``, versions 1-2 no quantized ``inputs``, versions 1-3 no
codebooks (``levels``); see :mod:`sqdist.export.format`.
"""
from __future__ import annotations

import math
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .bits import unpack_codes, unpack_indexed
from .deployable import aliases
from .format import (_DTYPES, FORMAT, LEVELS_VERSION, READABLE_VERSIONS, ExportError, _crc32, _json_field, _load_strict,
                     _one_line)


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Read an export: (dequantized ``state_dict``, decoded metadata).

    The state dict has the model's own keys; a packed layer's ``weight`` is
    ``scale[:, None] * codes`` reshaped to its stored shape. Quantizer state
    (``<layer>.quantizer.*``, ``<layer>.input_quantizer.*``) is dropped: the float model has no
    quantizers; ``meta["inputs"]`` holds each quantized input's scale, zero point, qmin and qmax.
    Every problem raises :class:`ExportError` with one line naming ``path``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ExportError(f"{path}: not an sqdist packed export (metadata format="
                                  f"{metadata.get('format')!r}; expected {FORMAT!r}); write one with python -m sqdist.export")
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: cannot be read as safetensors, truncated or corrupted ({_one_line(exc)})") from None
    readable = {str(v): v for v in READABLE_VERSIONS}
    version = readable.get(metadata.get("format_version"))
    if version is None:
        raise ExportError(f"{path}: format_version={metadata.get('format_version')!r}; this sqdist reads "
                          f"{', '.join(readable)}")
    kinds = {"model": dict, "quantizer": dict, "sq": dict, "layers": list, "packed": dict, "crc32": dict}
    if version >= 2:
        kinds["fp_layers"] = list
    if version >= 3:
        kinds.update(inputs=dict, activations=dict)
    meta = {k: _json_field(metadata, k, path) for k in kinds}
    for key, kind in kinds.items():
        if not isinstance(meta[key], kind):
            raise ExportError(f"{path}: metadata field {key!r} is a {type(meta[key]).__name__}; expected a {kind.__name__}")
    meta.setdefault("fp_layers", [])  # version 1: full-precision layers always stored as they are
    meta.setdefault("inputs", {})  # versions 1, 2: no quantized inputs
    for key in ("layers", "fp_layers"):
        if not all(isinstance(name, str) for name in meta[key]):
            raise ExportError(f"{path}: metadata field {key!r} must list layer names (strings); corrupted")
    meta["format_version"] = version
    meta["sqdist_version"] = metadata.get("sqdist_version")
    crcs = meta["crc32"]
    if set(crcs) != set(raw):
        extra = sorted(set(raw) ^ set(crcs))
        raise ExportError(f"{path}: tensor list does not match the recorded checksums (e.g. {extra[0]!r}; corrupted)")
    for key, t in raw.items():
        if _crc32(t) != crcs[key]:
            raise ExportError(f"{path}: tensor {key!r} fails its CRC32 check (corrupted data)")

    state: dict[str, Tensor] = {}
    layers = meta["layers"]
    for name in [*layers, *meta["fp_layers"]]:
        info = meta["packed"].get(name)
        packed, scale = raw.pop(f"{name}.weight.packed", None), raw.pop(f"{name}.weight.scale", None)
        if info is None or packed is None or scale is None:
            raise ExportError(f"{path}: packed layer {name!r} is incomplete (metadata, codes or scale missing)")
        try:
            shape, bits, dtype = [int(s) for s in info["shape"]], info["bits"], _DTYPES[info["dtype"]]
            numel = math.prod(shape)
            levels = info.get("levels")
            if levels is not None and (version < LEVELS_VERSION or not isinstance(levels, list) or not levels
                                       or not all(isinstance(v, int) and -128 <= v <= 127 for v in levels)
                                       or len(levels) > 2 ** bits):
                raise ValueError(f"levels={levels!r}: expected at most 2^{bits} integers in [-128, 127]")
            codes = unpack_codes(packed, bits, numel) if levels is None else unpack_indexed(packed, levels, bits, numel)
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{path}: layer {name!r}: {_one_line(exc)}") from None
        if tuple(scale.shape) != (shape[0],):
            raise ExportError(f"{path}: layer {name!r}: scale has shape {tuple(scale.shape)}; expected ({shape[0]},)")
        state[f"{name}.weight"] = (codes.to(dtype).view(shape[0], -1) * scale.to(dtype)[:, None]).reshape(shape)
    for name, info in meta["inputs"].items():
        scale = raw.pop(f"{name}.input.scale", None)
        try:
            zero_point, qmin, qmax = (int(info[k]) for k in ("zero_point", "qmin", "qmax"))
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{path}: inputs of layer {name!r}: {info!r}; expected zero_point, qmin, qmax") from None
        if name not in layers or scale is None or scale.numel() != 1 or not float(scale) > 0 \
                or not qmin <= zero_point <= qmax:
            raise ExportError(f"{path}: quantized input of layer {name!r} is incomplete or invalid "
                              f"(scale {None if scale is None else scale.tolist()}, qmin {qmin}, qmax {qmax})")
        info.update(scale=float(scale), zero_point=zero_point, qmin=qmin, qmax=qmax)
    prefixes = tuple(f"{name}.{part}." for name in layers for part in ("quantizer", "input_quantizer"))
    state.update({k: v for k, v in raw.items() if not k.startswith(prefixes)})
    return state, meta


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exported model as a plain timm model holding the dequantized weights.

    ``timm.create_model(name, **kwargs)`` from the metadata, its Conv/Linear weights set
    to ``Q = scale[:, None] * codes`` (plain ``nn.Conv2d`` / ``nn.Linear``: a deployable
    float model). Returned in eval mode on ``device``; its logits match the trained SQ
    model's eval (fully quantized) logits, exactly when the full-precision layers were
    stored as they are (``keep_fp_bits=32``); with ``keep_fp_bits=8`` those layers hold
    their 8-bit dequantized weights. A layer whose input was quantized (version 3) gets that
    quantization back as its submodule ``input_quantizer`` (fixed scale, run by a forward pre-hook).
    """
    import timm

    state, meta = read_packed(path)
    model_info = meta["model"]
    if not isinstance(model_info, dict) or not isinstance(model_info.get("name"), str) \
            or not isinstance(model_info.get("kwargs"), dict):
        raise ExportError(f"{path}: metadata field 'model' must be {{\"name\": str, \"kwargs\": dict}}")
    try:
        model = timm.create_model(model_info["name"], **{**model_info["kwargs"], "pretrained": False})
    except Exception as exc:  # unknown name or kwargs: timm raises several types
        raise ExportError(f"{path}: timm.create_model({model_info['name']!r}, **{model_info['kwargs']}) "
                          f"failed: {_one_line(exc)}") from None
    for first, others in aliases(model).items():  # a module under several names: its state under each
        for key in [k for k in state if k.startswith(first + ".")]:
            for other in others:
                state.setdefault(other + key[len(first):], state[key])
    _load_strict(model, state, str(path))
    if meta["inputs"]:
        from .qdq import InputQuantizer, _quantize_input_hook

        modules = dict(model.named_modules())
        for name, info in meta["inputs"].items():
            layer = modules.get(name)
            if layer is None:
                raise ExportError(f"{path}: quantized input of layer {name!r}, which {model_info['name']} does not have")
            layer.input_quantizer = InputQuantizer(info["scale"], info["zero_point"], info["qmin"], info["qmax"])
            layer.register_forward_pre_hook(_quantize_input_hook)
    return model.to(device).eval()
