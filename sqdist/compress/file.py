"""The compressed file: indices + codebooks + the rest in fp32, as safetensors.

For a compressed layer ``L`` with weight of shape ``(C_out, ...)``, ``n`` subvectors of
length ``d`` and a codebook of ``K`` centroids:

- ``L.codebook``: float16 ``(K, d)``;
- ``L.indices``: uint8 ``(ceil(n * b / 8),)``, the centroid index of every subvector
  (in :func:`sqdist.compress.pq.subvectors` order), ``b = ceil(log2 K)`` bits each,
  least significant bit first, packed densely.

Every other ``state_dict`` entry (the stem conv, biases, norm weights and BatchNorm running
statistics) is stored as it is. The safetensors metadata (JSON strings) holds ``format``
(``sqdist-pq``), ``format_version``, ``sqdist_version``, ``model`` (timm name and kwargs),
``layers`` (per compressed layer, in compression order: shape, block, codebook, bits),
``compress`` (the settings and the source run), ``results`` (accuracies, when known) and
``crc32`` per tensor (the checked I/O of :mod:`sqdist.files`).

:func:`load_compressed` rebuilds a plain timm model holding ``codebook[indices]`` as
ordinary weights: its logits equal the compressed network's. :func:`load_pq_model`
rebuilds it with compressed layers instead, to fine-tune further.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .. import bitpack
from ..files import ExportError, crc32, json_field, load_strict, one_line, save_atomic
from .layers import compress_layer_, compressed_layers
from .pq import index_bits, reconstruct

FORMAT = "sqdist-pq"
FORMAT_VERSION = 1


class CompressError(ExportError):
    """A compression or load failed for a reason the user can fix; the message is one line."""


# ---------------------------------------------------------------- index packing
def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """Pack ``indices`` (n,) of values in ``[0, 2^bits)`` into uint8 ``(ceil(n * bits / 8),)``, LSB first
    (:func:`sqdist.bitpack.pack`)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits}; allowed: 1 to 16")
    idx = indices.detach().reshape(-1).cpu().to(torch.int32)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << bits):
        raise ValueError(f"an index does not fit {bits} bits")
    return bitpack.pack(idx, bits)


def unpack_indices(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_indices`: int64 ``(n,)``. Raises ValueError on a wrong byte count."""
    expected = bitpack.packed_size(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"expected uint8 of {expected} bytes for {n} x {bits} bits, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    return bitpack.unpack(packed, bits, n).long()


# ---------------------------------------------------------------- size
def size_report(model: nn.Module) -> dict:
    """Sizes of ``model`` (with compressed layers) by the paper's accounting, in bytes.

    fp32: every parameter at 4 bytes, each compressed layer counted at its dense size
    (running statistics are not counted, as in the paper). Compressed: ``log2(K) / d`` bits
    per weight of every compressed layer (indices), ``K * d`` float16 values per codebook,
    and the other parameters at 4 bytes.
    """
    layers = compressed_layers(model)
    codebooks = {id(m.codebook) for m in layers.values()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in codebooks)
    dense = sum(math.prod(m.weight_shape) for m in layers.values())
    index_bits_total = sum(math.prod(m.weight_shape) * math.log2(max(m.codebook.shape[0], 1)) / m.codebook.shape[1]
                           for m in layers.values())
    codebook_bytes = sum(m.codebook.numel() * 2 for m in layers.values())
    fp32 = 4 * (other + dense)
    compressed = index_bits_total / 8 + codebook_bytes + 4 * other
    return {"fp32_bytes": fp32, "index_bytes": index_bits_total / 8, "codebook_bytes": codebook_bytes,
            "other_bytes": 4 * other, "compressed_bytes": compressed, "ratio": fp32 / compressed}


# ---------------------------------------------------------------- save
def save_compressed(model: nn.Module, path: str | os.PathLike, *, model_name: str, model_kwargs: dict | None = None,
                    compress: dict | None = None, results: dict | None = None) -> dict:
    """Write ``model`` (with compressed layers, see :func:`sqdist.compress.compress_model`) to ``path``.

    Codebooks are stored as float16 (round them first with
    :func:`sqdist.compress.layers.round_codebooks_` so the file holds the network you
    evaluated); everything else as it is. The file is replaced atomically.

    Returns:
        ``{"path", "bytes", "layers", "accounting"}`` (``accounting``: :func:`size_report`).
    """
    from ..version import __version__

    layers = compressed_layers(model)
    if not layers:
        raise CompressError("model has no compressed layers: nothing to write (run sqdist.compress.compress_model)")
    own = {f"{name}.{key}" for name in layers for key in ("codebook", "indices")}
    tensors: dict[str, Tensor] = {k: v.detach().cpu().contiguous().clone()
                                  for k, v in model.state_dict().items() if k not in own}
    info = {}
    for name, m in layers.items():
        k, d = m.codebook.shape
        bits = index_bits(k)
        tensors[f"{name}.codebook"] = m.codebook.detach().half().cpu().contiguous()
        tensors[f"{name}.indices"] = pack_indices(m.indices, bits)
        info[name] = {"shape": list(m.weight_shape), "block": d, "codebook": k, "bits": bits}
    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "sqdist_version": __version__,
            "model": json.dumps({"name": model_name, "kwargs": dict(model_kwargs or {})}),
            "layers": json.dumps(info),
            "compress": json.dumps(compress or {}),
            "results": json.dumps(results or {}),
            "crc32": json.dumps({k: crc32(t) for k, t in tensors.items()}),
        }
    except TypeError as exc:
        raise CompressError(f"model_kwargs or settings cannot be stored as JSON: {exc}") from None
    path = save_atomic(tensors, path, metadata)
    return {"path": str(path), "bytes": path.stat().st_size, "layers": len(layers), "accounting": size_report(model)}


# ---------------------------------------------------------------- read
def read_compressed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]], dict]:
    """Read and verify a compressed file.

    Returns ``(rest, layers, meta)``: ``rest`` the stored state_dict entries other than the
    compressed weights; ``layers[name] = (codebook (K, d) float32, indices (n,) int64)``
    in compression order; ``meta`` the decoded metadata. Every problem raises
    :class:`CompressError` with one line naming ``path``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CompressError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CompressError(f"{path}: not an sqdist compressed file (metadata format="
                                    f"{metadata.get('format')!r}; expected {FORMAT!r}); write one with "
                                    f"python -m sqdist.compress")
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CompressError(f"{path}: cannot be read as safetensors, truncated or corrupted "
                            f"({one_line(exc)})") from None
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CompressError(f"{path}: format_version={metadata.get('format_version')!r}; "
                            f"this sqdist reads {FORMAT_VERSION}")
    try:
        meta = {k: json_field(metadata, k, path) for k in ("model", "layers", "compress", "results", "crc32")}
    except ExportError as exc:
        raise CompressError(str(exc)) from None
    model_info = meta["model"]
    if not isinstance(model_info, dict) or not isinstance(model_info.get("name"), str) \
            or not isinstance(model_info.get("kwargs"), dict):
        raise CompressError(f"{path}: metadata field 'model' must be {{\"name\": str, \"kwargs\": dict}}")
    if not isinstance(meta["layers"], dict) or not isinstance(meta["crc32"], dict):
        raise CompressError(f"{path}: metadata fields 'layers' and 'crc32' must be mappings (corrupted)")
    if set(meta["crc32"]) != set(raw):
        extra = sorted(set(raw) ^ set(meta["crc32"]))
        raise CompressError(f"{path}: tensor list does not match the recorded checksums (e.g. {extra[0]!r}; corrupted)")
    for key, t in raw.items():
        if crc32(t) != meta["crc32"][key]:
            raise CompressError(f"{path}: tensor {key!r} fails its CRC32 check (corrupted data)")
    layers = {}
    for name, info in meta["layers"].items():
        codebook, packed = raw.pop(f"{name}.codebook", None), raw.pop(f"{name}.indices", None)
        if codebook is None or packed is None:
            raise CompressError(f"{path}: compressed layer {name!r} is incomplete (codebook or indices missing)")
        try:
            shape = [int(s) for s in info["shape"]]
            d, k, bits = int(info["block"]), int(info["codebook"]), int(info["bits"])
            if tuple(codebook.shape) != (k, d) or math.prod(shape) % d:
                raise ValueError(f"codebook of shape {tuple(codebook.shape)} does not match block {d}, "
                                 f"codebook {k}, weight {shape}")
            indices = unpack_indices(packed, bits, math.prod(shape) // d)
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressError(f"{path}: layer {name!r}: {one_line(exc)}") from None
        if indices.numel() and int(indices.max()) >= k:
            raise CompressError(f"{path}: layer {name!r}: an index is {int(indices.max())}, the codebook has {k} "
                                f"centroids (corrupted)")
        layers[name] = (codebook.float(), indices)
    return raw, layers, meta


def _create(meta: dict, path) -> nn.Module:
    import timm

    info = meta["model"]
    try:
        return timm.create_model(info["name"], **{**info["kwargs"], "pretrained": False})
    except Exception as exc:  # unknown name or kwargs: timm raises several types
        raise CompressError(f"{path}: timm.create_model({info['name']!r}, **{info['kwargs']}) failed: "
                            f"{one_line(exc)}") from None


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A plain timm model (ordinary Conv2d/Linear weights ``codebook[indices]``), in eval mode.

    Its logits equal those of the compressed network that was written (same values, same ops).
    """
    rest, layers, meta = read_compressed(path)
    model = _create(meta, path)
    state = dict(rest)
    for name, (codebook, indices) in layers.items():
        shape = tuple(meta["layers"][name]["shape"])
        state[f"{name}.weight"] = reconstruct(codebook, indices, shape)
    try:
        load_strict(model, state, str(path))
    except ExportError as exc:
        raise CompressError(str(exc)) from None
    return model.to(device).eval()


def apply_compressed_(model: nn.Module, path: str | os.PathLike, _read=None) -> dict:
    """Give ``model`` (the architecture the file was written from) the file's compressed layers
    and other tensors, in place; returns the file's metadata. For resuming fine-tuning."""
    rest, layers, meta = _read or read_compressed(path)
    modules = dict(model.named_modules())
    for name, (codebook, indices) in layers.items():
        module = modules.get(name)
        shape = getattr(module, "weight_shape", None) or getattr(getattr(module, "weight", None), "shape", None)
        if shape is None or tuple(shape) != tuple(meta["layers"][name]["shape"]):
            raise CompressError(f"{path}: layer {name!r} of shape {meta['layers'][name]['shape']} is not a layer of "
                                f"this model with that shape (written from another model?)")
        compress_layer_(module, codebook, indices)
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in rest.items()}
    for name, m in compressed_layers(model).items():
        state[f"{name}.codebook"], state[f"{name}.indices"] = m.codebook.detach(), m.indices
    try:
        load_strict(model, state, str(path))
    except ExportError as exc:
        raise CompressError(str(exc)) from None
    return meta


def load_pq_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The timm model of the file with compressed layers (trainable codebooks), in eval mode."""
    read = read_compressed(path)
    model = _create(read[2], path).to(device)
    apply_compressed_(model, path, _read=read)
    return model.eval()
