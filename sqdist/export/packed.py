"""Export packed low-bit weights to safetensors (or ONNX), and load them back as a float model.

Command line::

    python -m sqdist.export RUN_DIR OUT.safetensors            # uses RUN_DIR/final
    python -m sqdist.export RUN_DIR/checkpoints/step-000123 OUT.safetensors
    python -m sqdist.export ... --force                        # also when SQ ratio < 1
    python -m sqdist.export ... --keep-fp-bits 8               # full-precision layers at 8 bits
    python -m sqdist.export RUN_DIR OUT.onnx                   # ONNX (sqdist.onnx_export), checked by onnxruntime
    python -m sqdist.export --check OUT.safetensors            # read back and verify (also OUT.onnx)

Python::

    export_model(model, "out.safetensors", model_name="resnet18", model_kwargs={"num_classes": 10})
    model = load_quantized("out.safetensors")   # plain timm model holding Q = scale * codes

File layout. For a quantized layer ``L`` with weight of shape ``(m, ...)``:

- ``L.weight.packed``: uint8, the codes of the flattened weight, ``bits`` bits each,
  least significant bit first, packed densely (``ceil(numel * bits / 8)`` bytes).
  A code ``c`` is stored as ``c > 0`` when ``bits == 1`` (codes are +-1), else as
  ``c + L_max`` with ``L_max = 2^(bits-1) - 1`` (codes lie in ``[-L_max, L_max]``).
- A quantizer whose codes are not the symmetric range (a codebook of integer codes:
  SLB's ``{-3, -1, 1, 3}``, ESB's non-uniform levels, an asymmetric grid) defines
  ``code_levels()``: the sorted list of at most ``2^bits`` distinct integer codes it emits
  (int8 range). Its layer then stores each code's *index* in that list (``bits`` bits, same
  packing) and the list in ``packed[L]["levels"]`` (version 4, written only when a layer has one).
- ``L.weight.scale``: ``(m,)`` per-row scales, the weight's dtype; ``Q = scale[:, None] * codes``.
- ``L.input.scale``: float32 scalar, when the layer's input is quantized (an activation
  quantizer, ``quant.activations``): the input is ``clamp(round(x / scale), qmin, qmax) * scale``
  (zero point 0), ``qmin``/``qmax`` in the metadata field ``inputs`` (version 3).

With ``keep_fp_bits=8`` the layers kept at full precision (the other Conv/Linear
weights: stem, classifier, layers the recipe excludes) are stored the same way at 8 bits,
per-row symmetric (``scale_i = max |W_i| / 127``, codes in ``[-127, 127]``).

Every other ``state_dict`` entry (biases, full-precision layers at the default
``keep_fp_bits=32``, BatchNorm buffers) is stored as it is. The safetensors metadata (all
strings, JSON-encoded) holds ``format``, ``format_version``, ``sqdist_version``, ``model``
(timm name and kwargs), ``quantizer`` (name and ``config()``), ``sq``, ``layers`` (the
quantized layer names, in order), ``fp_layers`` (the full-precision layers stored at 8 bits,
in order; version 2), ``packed`` (per packed layer: shape, bits, dtype), ``inputs`` (per layer
whose input is quantized: zero_point, qmin, qmax; version 3, written only when there is one,
with ``activations``: the activation quantizer's name and ``config()``) and ``crc32`` (per
tensor, to catch corrupted bytes). Version 1 and 2 files still load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT = "sqdist-packed"
FORMAT_VERSION = 2  # 2: adds fp_layers (full-precision layers stored at 8 bits)
INPUTS_VERSION = 3  # 3: adds inputs (quantized layer inputs); written only by files that have them
LEVELS_VERSION = 4  # 4: adds packed[L]["levels"] (codes stored as indices into a codebook)
READABLE_VERSIONS = (1, 2, 3, 4)
MAX_BITS = 8
KEEP_FP_BITS = (8, 32)  # how the layers left full precision are stored: 8-bit per-row codes, or as they are
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ExportError(ValueError):
    """An export or load failed for a reason the user can fix; the message is one line."""


# ---------------------------------------------------------------- packing
def code_offset(bits: int) -> int:
    """``L_max = 2^(bits-1) - 1``: codes lie in ``[-L_max, L_max]`` (``{-1, +1}`` when ``bits == 1``)."""
    return 2 ** (bits - 1) - 1 if bits > 1 else 1


def _check_bits(bits, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ExportError(f"{where}: bits={bits!r}; allowed: an integer from 1 to {MAX_BITS}")
    return bits


def code_levels(quantizer, bits: int, where: str) -> list[int] | None:
    """The quantizer's codebook (``code_levels()``), checked: sorted distinct ints in int8, at most
    ``2^bits`` of them; None when it has none (codes are the symmetric range of ``bits``)."""
    fn = getattr(quantizer, "code_levels", None)
    if fn is None:
        return None
    levels = fn()
    ok = (isinstance(levels, (list, tuple)) and 0 < len(levels) <= 2 ** bits
          and all(isinstance(v, int) and not isinstance(v, bool) and -128 <= v <= 127 for v in levels)
          and list(levels) == sorted(set(levels)))
    if not ok:
        raise ExportError(f"{where}: code_levels()={levels!r}; allowed: sorted distinct integers in [-128, 127], "
                          f"at most 2^{bits} of them")
    return list(levels)


def checked_codes(codes: Tensor, bits: int, where: str, levels: list[int] | None = None) -> Tensor:
    """``codes`` as int8 on the CPU, after checking they are integers that fit ``bits``.

    ``bits == 1``: codes must be +-1; otherwise in ``[-L_max, L_max]`` (:func:`code_offset`).
    With a codebook ``levels`` (:func:`code_levels`), every code must be one of them.
    """
    c = codes.detach().cpu()
    if c.is_floating_point():
        if not bool(torch.isfinite(c).all()) or not torch.equal(c, torch.round(c)):
            raise ExportError(f"{where}: codes are not integer-valued")
    else:
        c = c.long()  # abs() of int8 -128 would wrap
    limit = code_offset(bits)
    if levels is not None:
        bad = ~torch.isin(c.long(), torch.tensor(levels, dtype=torch.long))
        allowed = f"the quantizer's code_levels() {levels}"
    elif bits == 1:
        bad = (c != 1) & (c != -1)
        allowed = "-1 or +1"
    else:
        bad = c.abs() > limit
        allowed = f"integers in [{-limit}, {limit}]"
    if bool(bad.any()):
        raise ExportError(f"{where}: code {int(c[bad][0])} does not fit {bits} bit(s); allowed: {allowed}")
    return c.to(torch.int8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer-valued ``codes`` (any shape, numel n) into uint8 ``(ceil(n * bits / 8),)``.

    ``bits == 1``: codes must be +-1, stored as ``code > 0``. Otherwise codes must lie in
    ``[-L_max, L_max]`` (see :func:`code_offset`) and are stored as ``code + L_max``.
    Fields are written least significant bit first along the flattened tensor.
    """
    _check_bits(bits, "pack_codes")
    c = checked_codes(codes, bits, "pack_codes").reshape(-1)
    limit = code_offset(bits)
    fields = (c > 0).to(torch.uint8) if bits == 1 else (c.to(torch.int16) + limit).to(torch.uint8)  # range checked
    return pack_fields(fields, bits)


def pack_indexed(codes: Tensor, levels: list[int], bits: int) -> Tensor:
    """Pack ``codes`` (each one of ``levels``) as their indices into ``levels``, ``bits`` bits each."""
    _check_bits(bits, "pack_indexed")
    c = checked_codes(codes, bits, "pack_indexed", levels).reshape(-1).long()
    table = torch.tensor(levels, dtype=torch.long)
    return pack_fields(torch.searchsorted(table, c).to(torch.uint8), bits)


def unpack_indexed(packed: Tensor, levels: list[int], bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_indexed`: int8 codes ``(numel,)``."""
    fields = unpack_fields(packed, bits, numel)
    if bool((fields >= len(levels)).any()):
        raise ExportError(f"packed codes: an index exceeds the {len(levels)} code levels (corrupted data)")
    return torch.tensor(levels, dtype=torch.int8)[fields.long()]


def pack_fields(fields: Tensor, bits: int) -> Tensor:
    """uint8 ``fields`` (n,), each below ``2^bits``, packed densely, least significant bit first."""
    if bits == 8:
        return fields.contiguous()
    planes = (fields[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1  # (n, bits), LSB first
    stream = planes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for j in range(8):
        out |= stream[:, j] << j
    return out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(ceil(numel * bits / 8),)`` -> int8 codes ``(numel,)``.

    Raises :class:`ExportError` when the byte count is wrong or a field holds a value no
    code maps to (a corrupted file).
    """
    _check_bits(bits, "unpack_codes")
    fields = unpack_fields(packed, bits, numel)
    limit = code_offset(bits)
    if bits == 1:
        return fields.to(torch.int8) * 2 - 1
    if bool((fields > 2 * limit).any()):
        raise ExportError(f"packed codes: a {bits}-bit field exceeds {2 * limit} (corrupted data)")
    return (fields.to(torch.int16) - limit).to(torch.int8)


def unpack_fields(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_fields`: uint8 ``(numel,)``; checks the byte count and the padding."""
    expected = math.ceil(numel * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ExportError(f"packed codes: expected uint8 of {expected} bytes for {numel} x {bits} bits, "
                          f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if bits == 8:
        fields = packed
    else:
        stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
        if bool(stream[numel * bits:].any()):
            raise ExportError("packed codes: padding bits are set (corrupted data)")
        planes = stream[: numel * bits].view(numel, bits)
        fields = torch.zeros(numel, dtype=torch.uint8)
        for j in range(bits):
            fields |= planes[:, j] << j
    return fields


# ---------------------------------------------------------------- export
def _sq_layers(model: nn.Module) -> dict[str, nn.Module]:
    from .nn import SQLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, SQLayer)}


def full_precision_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Conv/Linear layers that are not quantized (stem, classifier, excluded layers), by name."""
    from .nn import SQ_CLASSES, SQLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, tuple(SQ_CLASSES)) and not isinstance(m, SQLayer)
            and isinstance(getattr(m, "weight", None), Tensor) and m.weight.is_floating_point()}


def check_keep_fp_bits(value, name: str = "keep_fp_bits") -> int:
    """``value`` if it is an allowed ``keep_fp_bits`` (8 or 32), else :class:`ExportError`."""
    if isinstance(value, str) and value.isdigit():  # from the command line
        value = int(value)
    if isinstance(value, bool) or value not in KEEP_FP_BITS:
        raise ExportError(f"{name}={value!r}; allowed: {' or '.join(map(str, KEEP_FP_BITS))} "
                          f"(8: per-row symmetric 8-bit codes, 32: stored as they are)")
    return int(value)


def int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit per-row symmetric codes of a full-precision weight ``w`` (m, ...).

    Returns (``codes`` int8 (m, n), ``scale`` (m,) in ``w``'s dtype): ``scale_i = max |W_i| / 127``,
    ``codes = round(W / scale)``; the stored weight is ``scale[:, None] * codes``.
    """
    from .quantizers import kbit_reference

    codes, scale = kbit_reference(w.detach().reshape(w.shape[0], -1).float(), bits=8)
    return codes.to(torch.int8), scale.to(w.dtype)


def _crc32(t: Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _save_atomic(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name and rename it into place (a crash leaves no half file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ExportError(f"weight dtype {dtype} is not supported; allowed: {', '.join(_DTYPES)}")


def check_ratio(model: nn.Module, sq_ratio: float | None, force: bool) -> float:
    """The SQ ratio to record (default: the layers' controller); refuses one below 1 unless ``force``."""
    layers = _sq_layers(model)
    if not layers:
        raise ExportError("model has no quantized layers: nothing to pack (call sqdist.quantize_model first)")
    first = next(iter(layers.values()))
    if sq_ratio is None:
        sq_ratio = first._sq.selector.ratio if getattr(first, "_sq", None) is not None else 1.0
    if sq_ratio < 1.0 and not force:
        raise ExportError(f"SQ ratio is {sq_ratio:g} < 1.0: training had not reached the fully quantized "
                          f"stage, so the packed model differs from the trained one; finish training or pass --force")
    return float(sq_ratio)


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
        keep_fp_bits: how the layers left full precision (:func:`full_precision_layers`) are
            stored: 32 (default) as they are, 8 as per-row symmetric 8-bit codes + scales
            (:func:`int8_rows`; about 4x smaller, the logits move slightly).

    Returns:
        ``{"path", "bytes", "layers", "quantizer", "bits", "fp_layers", "keep_fp_bits"}``
        (``fp_layers``: how many full-precision layers were stored at 8 bits).
    """
    from . import __version__

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

    fp_layers = list(full_precision_layers(model)) if keep_fp_bits == 8 else []
    packed_keys = {f"{name}.weight" for name in [*layers, *fp_layers]}
    tensors: dict[str, Tensor] = {}
    # a quantizer's own state (learned steps, SLB's 2^b logits per weight) is folded into the codes, scales and
    # input scales below; the loader ignores it, so it is not written
    quantizer_state = tuple(f"{name}.{part}." for name in layers for part in ("quantizer", "input_quantizer"))
    for key, value in model.state_dict().items():
        if key not in packed_keys and not key.startswith(quantizer_state):
            tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
    packed_meta: dict[str, dict] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            bits = _check_bits(getattr(layer.quantizer, "bits", None), f"quantizer {qname!r} of layer {name}")
            w = layer.weight.detach()
            codes, scale = layer.quantizer.quantize_codes(w.reshape(w.shape[0], -1))
            if tuple(scale.shape) != (w.shape[0],):
                raise ExportError(f"quantizer {qname!r} returned scale of shape {tuple(scale.shape)} for layer "
                                  f"{name}; expected ({w.shape[0]},)")
            levels = code_levels(layer.quantizer, bits, f"layer {name}, quantizer {qname!r}")
            try:
                tensors[f"{name}.weight.packed"] = (pack_codes(codes, bits) if levels is None
                                                    else pack_indexed(codes, levels, bits))
            except ExportError as exc:
                raise ExportError(f"layer {name}, quantizer {qname!r}: {exc}") from None
            tensors[f"{name}.weight.scale"] = scale.detach().to(w.dtype).cpu().contiguous().clone()
            packed_meta[name] = {"shape": list(w.shape), "bits": bits, "dtype": _dtype_name(w.dtype),
                                 **({"levels": levels} if levels is not None else {})}
        inputs = _input_qparams(layers)
        for name, (scale, zero_point, qmin, qmax) in inputs.items():
            tensors[f"{name}.input.scale"] = torch.tensor(scale, dtype=torch.float32)
        modules = dict(model.named_modules())
        for name in fp_layers:
            w = modules[name].weight.detach()
            codes, scale = int8_rows(w)
            tensors[f"{name}.weight.packed"] = pack_codes(codes, 8)
            tensors[f"{name}.weight.scale"] = scale.cpu().contiguous().clone()
            packed_meta[name] = {"shape": list(w.shape), "bits": 8, "dtype": _dtype_name(w.dtype)}

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


def _input_qparams(layers: dict[str, nn.Module]) -> dict[str, tuple[float, int, int, int]]:
    """Per SQ layer whose input is quantized: ``(scale, zero_point, qmin, qmax)``, from its activation
    quantizer (``input_quantizer``) or a weight quantizer that declares one (see
    :func:`sqdist.onnx_export.activation_qdq`)."""
    from .onnx_export import activation_qdq

    out = {}
    for name, layer in layers.items():
        source = getattr(layer, "input_quantizer", None)
        act = activation_qdq(source if source is not None else layer.quantizer, name)
        if act is not None:
            out[name] = act
    return out


def _activation_config(layers: dict[str, nn.Module]) -> dict:
    acts = [layer.input_quantizer for layer in layers.values() if getattr(layer, "input_quantizer", None) is not None]
    return {"name": acts[0].quantizer_name, "params": acts[0].config()} if acts else {}


# ---------------------------------------------------------------- run folders
def _read_meta(ckpt: Path) -> dict:
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{meta_path}: not found; pass a run folder or a checkpoint folder holding "
                          f"model.safetensors and meta.json") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{meta_path}: not valid JSON ({exc})") from None

    def get(dotted: str, kind: type | tuple):
        node = meta
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ExportError(f"{meta_path}: key {dotted!r} missing")
            node = node[part]
        if not isinstance(node, kind) or (kind is not bool and isinstance(node, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ExportError(f"{meta_path}: {dotted}={node!r}; allowed: a {names}")
        return node

    out = {"path": meta_path, "model_name": get("model.name", str), "model_kwargs": get("model.kwargs", dict),
           "enabled": get("quant.enabled", bool), "sq": meta.get("sq") or {}}
    if out["enabled"]:
        out.update(quantizer=get("quant.name", str), params=get("quant.params", dict),
                   layers=get("quant.layers", list), ratio=get("sq.ratio", (int, float)),
                   activations=meta["quant"].get("activations") or {})
        if not isinstance(out["activations"], dict):
            raise ExportError(f"{meta_path}: quant.activations={out['activations']!r}; allowed: a dict")
        if out["quantizer"] == "kbit" and "scale" not in out["params"]:
            out["params"] = {**out["params"], "scale": "max"}  # runs from before kbit had a scale choice
    return out


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint folder (``model.safetensors`` + ``meta.json``) that ``source`` names.

    ``source`` is a run folder (its ``final/`` is used), a checkpoint folder, or the
    ``model.safetensors`` file inside one.
    """
    src = Path(source)
    if src.is_file() and src.name == "model.safetensors":
        return src.parent
    if not src.is_dir():
        raise ExportError(f"{src}: no such run or checkpoint folder")
    if (src / "meta.json").exists():
        return src
    if (src / "final").is_dir():
        return src / "final"
    hint = ""
    latest = src / "checkpoints" / "latest"
    if latest.is_file():
        hint = f"; training has not finished: pass a checkpoint, e.g. {src / 'checkpoints' / latest.read_text().strip()}"
    raise ExportError(f"{src}: neither a checkpoint folder (meta.json) nor a run folder with final/{hint}")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot be read as safetensors, truncated or corrupted ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_strict(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected, got = set(model.state_dict()), set(state)
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ExportError(f"{where}: state does not match the model: missing keys {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected keys {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}") from None
        raise ExportError(f"{where}: state does not match the model ({_one_line(exc)[:300]})") from None


def load_run(source: str | os.PathLike, force: bool = False) -> tuple[nn.Module, dict]:
    """The trained SQ model of a run or checkpoint folder, in eval mode, and what its ``meta.json`` says.

    Refuses (:class:`ExportError`) a full-precision run, and one whose SQ ratio is below 1
    unless ``force``. The returned dict holds ``model_name``, ``model_kwargs``, ``ratio``,
    ``sq``, ``checkpoint`` (the folder) and ``config`` (the run's ``config.yaml`` as a dict,
    or None when the run folder has none).
    """
    import timm

    from .nn import QuantConfig, quantize_model
    from .sq import SQConfig

    ckpt = resolve_checkpoint(source)
    meta = _read_meta(ckpt)
    if not meta["enabled"]:
        raise ExportError(f"{meta['path']}: quant.enabled is false (a full-precision run): there is nothing to pack")
    if meta["ratio"] < 1.0 and not force:
        raise ExportError(f"{meta['path']}: sq.ratio={meta['ratio']:g} < 1.0, so training had not reached the "
                          f"fully quantized stage and the exported model differs from the trained one; "
                          f"finish training or pass --force")
    try:
        model = timm.create_model(meta["model_name"], **{**meta["model_kwargs"], "pretrained": False})
    except Exception as exc:  # unknown name or kwargs: timm raises several types
        raise ExportError(f"{meta['path']}: timm.create_model({meta['model_name']!r}, **{meta['model_kwargs']}) "
                          f"failed: {_one_line(exc)}") from None
    act = {k: v for k, v in meta["activations"].items() if k not in ("name", "layers")}
    try:
        sq = quantize_model(model, QuantConfig(quantizer=meta["quantizer"], params=meta["params"],
                                               include=tuple(meta["layers"]), keep_stem_and_classifier=False,
                                               sq=SQConfig(ratios=(1.0,)),  # evaluated fully quantized
                                               activations=meta["activations"].get("name"), activation_params=act))
    except ValueError as exc:
        raise ExportError(f"{meta['path']}: quant section rejected: {_one_line(exc)}") from None
    missing = sorted(set(meta["layers"]) - set(_sq_layers(model)))
    if missing:
        raise ExportError(f"{meta['path']}: quant.layers names {missing[0]!r}, which is not a Conv/Linear layer "
                          f"of {meta['model_name']}")
    if meta["activations"] and list(sq.activation_quantizers) != list(meta["activations"].get("layers", [])):
        raise ExportError(f"{meta['path']}: quant.activations.layers does not match the layers whose input "
                          f"{meta['model_name']} quantizes ({list(sq.activation_quantizers)[:3]}...)")
    weights = ckpt / "model.safetensors"
    _load_strict(model, _load_safetensors(weights), str(weights))
    model.eval()
    return model, {**meta, "ratio": float(meta["ratio"]), "checkpoint": ckpt, "config": _run_config(ckpt)}


def _run_config(ckpt: Path) -> dict | None:
    """The recipe the run was trained with (RUN/config.yaml), for the input size; None if absent."""
    import yaml

    for folder in (ckpt.parent, ckpt.parent.parent):  # RUN/final, RUN/checkpoints/step-N
        path = folder / "config.yaml"
        if path.is_file():
            try:
                config = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ExportError(f"{path}: not valid YAML ({_one_line(exc)[:200]})") from None
            return config if isinstance(config, dict) else None
    return None


def export_run(source: str | os.PathLike, out: str | os.PathLike, force: bool = False, keep_fp_bits: int = 32) -> dict:
    """Rebuild the trained model from a run or checkpoint folder and :func:`export_model` it."""
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    model, meta = load_run(source, force)
    return export_model(model, out, model_name=meta["model_name"], model_kwargs=meta["model_kwargs"],
                        sq_ratio=meta["ratio"], force=force, sq=meta["sq"], keep_fp_bits=keep_fp_bits)


# ---------------------------------------------------------------- load
def _json_field(metadata: dict, key: str, path: str):
    if key not in metadata:
        raise ExportError(f"{path}: metadata field {key!r} missing (corrupted or not an sqdist export)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ExportError(f"{path}: metadata field {key!r} is not valid JSON (corrupted)") from None


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
    _load_strict(model, state, str(path))
    if meta["inputs"]:
        from .onnx_export import InputQuantizer, _quantize_input_hook

        modules = dict(model.named_modules())
        for name, info in meta["inputs"].items():
            layer = modules.get(name)
            if layer is None:
                raise ExportError(f"{path}: quantized input of layer {name!r}, which {model_info['name']} does not have")
            layer.input_quantizer = InputQuantizer(info["scale"], info["zero_point"], info["qmin"], info["qmax"])
            layer.register_forward_pre_hook(_quantize_input_hook)
    return model.to(device).eval()


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqdist.export",
        description="Write a trained run's quantized layers as packed 1/2/k-bit codes + per-row scales "
                    "(.safetensors), or as an ONNX graph of int8 codes and DequantizeLinear (.onnx).")
    parser.add_argument("source", help="run folder (uses RUN/final), checkpoint folder, or with --check an export file")
    parser.add_argument("out", nargs="?", help="output file: .safetensors or .onnx")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the suffix of out)")
    parser.add_argument("--force", action="store_true", help="export even when the SQ ratio is below 1.0")
    parser.add_argument("--keep-fp-bits", default="32", metavar="{8,32}",
                        help="store the full-precision layers (stem, classifier, excluded layers) as 8-bit "
                             "per-row codes, or as they are (32, the default)")
    parser.add_argument("--input-size", metavar="C,H,W",
                        help="onnx: the input the graph is traced with (default: the run's data.image_size and "
                             "in_chans); the batch size stays dynamic")
    parser.add_argument("--check", action="store_true", help="read an export back, verify it, print a summary")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if args.out is not None:
                parser.error("--check takes one file")
            if (args.format or ("onnx" if args.source.endswith(".onnx") else "safetensors")) == "onnx":
                from .onnx_export import check_onnx

                info = check_onnx(args.source)
                print(f"{args.source}: ok, onnxruntime runs it; opset {info['opset']}, input {_shape(info['input'])}, "
                      f"{info['int8_weights']} int8 weights (DequantizeLinear), {info['qdq_inputs']} quantized "
                      f"inputs, {os.path.getsize(args.source) / 1e6:.2f} MB")
                return 0
            _, meta = read_packed(args.source)
            q = meta["quantizer"]
            fp = f", {len(meta['fp_layers'])} full-precision layers at 8 bits" if meta["fp_layers"] else ""
            fp += f", {len(meta['inputs'])} quantized inputs" if meta["inputs"] else ""
            print(f"{args.source}: ok, {meta['model']['name']} with {len(meta['layers'])} {q['name']} layers "
                  f"{q['params']}{fp}, {os.path.getsize(args.source) / 1e6:.2f} MB")
            return 0
        if args.out is None:
            parser.error("the following arguments are required: out")
        keep_fp_bits = check_keep_fp_bits(args.keep_fp_bits, "--keep-fp-bits")
        if _format_of(args.out, args.format) == "onnx":
            from .onnx_export import export_run_onnx, parse_input_size

            input_size = parse_input_size(args.input_size) if args.input_size is not None else None
            info = export_run_onnx(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits,
                                   input_size=input_size)
            checked = (f"onnxruntime max |logit difference| {info['max_abs_diff']:.2e}"
                       if info["max_abs_diff"] is not None else "not checked: onnxruntime is not installed")
            print(f"wrote {info['path']}: {info['int8_weights']} int8 weights (DequantizeLinear, axis 0), opset "
                  f"{info['opset']}, input {_shape(info['input'])}, {info['bytes'] / 1e6:.2f} MB; {checked}")
            return 0
        if args.input_size is not None:
            raise ExportError(f"--input-size={args.input_size!r}: only ONNX export traces an input; "
                              f"allowed with an .onnx output or --format onnx")
        info = export_run(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits)
    except ExportError as exc:
        print(f"sqdist.export: error: {exc}", file=sys.stderr)
        return 2
    fp = f", {info['fp_layers']} full-precision layers at 8 bits" if info["fp_layers"] else ""
    fp += f", {info['inputs']} quantized inputs" if info["inputs"] else ""
    print(f"wrote {info['path']}: {info['layers']} {info['quantizer']} layers packed at "
          f"{'/'.join(map(str, info['bits']))} bit(s){fp}, {info['bytes'] / 1e6:.2f} MB")
    return 0


FORMATS = ("safetensors", "onnx")


def _shape(dims) -> str:
    return f"({', '.join(map(str, dims))})"


def _format_of(path: str, format: str | None) -> str:
    """The export format: ``format`` when given, else from the suffix of ``path``."""
    if format is not None:
        return format
    for name in FORMATS:
        if path.endswith(f".{name}"):
            return name
    raise ExportError(f"out={path!r}; allowed: a path ending in .safetensors or .onnx, or pass --format "
                      f"{{{','.join(FORMATS)}}}")


if __name__ == "__main__":
    sys.exit(main())
