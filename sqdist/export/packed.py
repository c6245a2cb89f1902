"""The packed writer: a quantized model -> one safetensors file of packed codes and per-row scales.

The file layout is described in :mod:`sqdist.export.format`; the layers written are the model's
:func:`~sqdist.export.deployable.deployable_layers`.
"""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from ..version import __version__
from .bits import pack_codes, pack_indexed
from .deployable import _sq_layers, aliases, check_ratio, deployable_layers
from .format import (FORMAT, FORMAT_VERSION, INPUTS_VERSION, LEVELS_VERSION, ExportError, _crc32, _dtype_name,
                     _save_atomic, check_keep_fp_bits)


def export_model(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None,
                 model_kwargs: dict | None = None, sq_ratio: float | None = None, force: bool = False,
                 sq: dict | None = None, keep_fp_bits: int = 32) -> dict:
    """Write ``model``'s SQ layers as packed codes + scales and everything else as is.

    Args:
        model: a model prepared by :func:`sqdist.quantize_model` (its SQ layers are packed).
        path: the ``.safetensors`` file to write (replaced atomically).
        model_name, model_kwargs: what ``timm.create_model`` needs to rebuild the
            architecture; ``model_name`` defaults to ``model.pretrained_cfg["architecture"]``.
        sq_ratio: the SQ ratio the model was trained at; default: the layers' controller.
        force: export even when ``sq_ratio < 1`` (the packed model then differs from the
            hybrid one the last training stage used).
        sq: extra SQ state recorded in the metadata (e.g. ``{"ratio": 1.0, "stage": 3}``).
        keep_fp_bits: how the layers left full precision
            (:func:`~sqdist.export.deployable.full_precision_layers`) are stored: 32 (default)
            as they are, 8 as per-row symmetric 8-bit codes + scales
            (:func:`~sqdist.export.deployable.int8_rows`; about 4x smaller, the logits move slightly).

    Returns:
        ``{"path", "bytes", "layers", "quantizer", "bits", "fp_layers", "keep_fp_bits"}``
        (``fp_layers``: how many full-precision layers were stored at 8 bits).
    """
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    sq_ratio = check_ratio(model, sq_ratio, force)
    layers = _sq_layers(model)
    first = next(iter(layers.values()))
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not model_name:
            raise ExportError("model_name is required (the model has no pretrained_cfg['architecture'])")
    qname, qparams = first.quantizer.quantizer_name, first.quantizer.config()
    for name, layer in layers.items():
        if (layer.quantizer.quantizer_name, layer.quantizer.config()) != (qname, qparams):
            raise ExportError(f"layer {name} uses quantizer {layer.quantizer.quantizer_name} "
                              f"{layer.quantizer.config()}, others {qname} {qparams}; export needs one quantizer")

    described = deployable_layers(model, keep_fp_bits)
    fp_layers = [name for name, d in described.items() if d.quantizer is None]
    packed_keys = {f"{name}.weight" for name in described}
    tensors: dict[str, Tensor] = {}
    # a quantizer's own state (learned steps, SLB's 2^b logits per weight) is folded into the codes, scales and
    # input scales below; the loader ignores it, so it is not written
    # a module reached under several names (coat's shared positional-encoding convs) is one layer: its other
    # names' weights and quantizer state are not written either (the loader copies the layer to them)
    names = aliases(model)
    packed_keys |= {f"{alias}.weight" for name in described for alias in names.get(name, [])}
    quantizer_state = tuple(f"{alias}.{part}." for name in layers for alias in [name, *names.get(name, [])]
                            for part in ("quantizer", "input_quantizer"))
    for key, value in model.state_dict().items():
        if key not in packed_keys and not key.startswith(quantizer_state):
            tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
    packed_meta: dict[str, dict] = {}
    for name in layers:
        d = described[name]
        tensors[f"{name}.weight.packed"] = (pack_codes(d.codes, d.bits) if d.levels is None
                                            else pack_indexed(d.codes, d.levels, d.bits))
        tensors[f"{name}.weight.scale"] = d.scale.contiguous().clone()
        packed_meta[name] = {"shape": list(d.codes.shape), "bits": d.bits, "dtype": _dtype_name(d.scale.dtype),
                             **({"levels": d.levels} if d.levels is not None else {})}
    inputs = {name: d.input for name, d in described.items() if d.input is not None}
    for name, (scale, zero_point, qmin, qmax) in inputs.items():
        tensors[f"{name}.input.scale"] = torch.tensor(scale, dtype=torch.float32)
    for name in fp_layers:
        d = described[name]
        tensors[f"{name}.weight.packed"] = pack_codes(d.codes, 8)
        tensors[f"{name}.weight.scale"] = d.scale.contiguous().clone()
        packed_meta[name] = {"shape": list(d.codes.shape), "bits": 8, "dtype": _dtype_name(d.scale.dtype)}

    version = (LEVELS_VERSION if any("levels" in v for v in packed_meta.values())
               else INPUTS_VERSION if inputs else FORMAT_VERSION)
    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(version),
            "sqdist_version": __version__,
            "model": json.dumps({"name": model_name, "kwargs": dict(model_kwargs or {})}),
            "quantizer": json.dumps({"name": qname, "params": qparams}),
            "sq": json.dumps({"ratio": float(sq_ratio), **(sq or {})}),
            "layers": json.dumps(list(layers)),
            "fp_layers": json.dumps(fp_layers),
            "packed": json.dumps(packed_meta),
            **({"inputs": json.dumps({n: {"zero_point": zp, "qmin": lo, "qmax": hi}
                                      for n, (_, zp, lo, hi) in inputs.items()}),
                "activations": json.dumps(_activation_config(layers) if inputs else {})}
               if inputs or version == LEVELS_VERSION else {}),
            "crc32": json.dumps({k: _crc32(t) for k, t in tensors.items()}),
        }
    except TypeError as exc:
        raise ExportError(f"model_kwargs or quantizer config cannot be stored as JSON: {exc}") from None
    path = _save_atomic(tensors, path, metadata)
    return {"path": str(path), "bytes": path.stat().st_size, "layers": len(layers), "quantizer": qname,
            "bits": sorted({packed_meta[n]["bits"] for n in layers}), "fp_layers": len(fp_layers),
            "keep_fp_bits": keep_fp_bits, "inputs": len(inputs)}


def _activation_config(layers: dict[str, nn.Module]) -> dict:
    acts = [layer.input_quantizer for layer in layers.values() if getattr(layer, "input_quantizer", None) is not None]
    return {"name": acts[0].quantizer_name, "params": acts[0].config()} if acts else {}
