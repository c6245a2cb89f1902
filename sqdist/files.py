"""Checked file I/O shared by every writer and reader of sqdist files (packed exports, compressed
files, checkpoints, run folders): safetensors read and written atomically, per-tensor CRC32, strict
state loading and JSON metadata fields, each failure an :class:`ExportError` of one line naming the file.

The file formats themselves live with their owners (:mod:`sqdist.export.format`,
:mod:`sqdist.compress.file`); this module only makes reading and writing them safe.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class ExportError(ValueError):
    """An export or load failed for a reason the user can fix; the message is one line."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs folded), for a command line's error."""
    return " ".join(str(exc).split())


def crc32(t: Tensor) -> int:
    """CRC32 of a CPU tensor's bytes (what a file's metadata records to catch corrupted bytes)."""
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def save_atomic(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name and rename it into place (a crash leaves no half file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: cannot be written ({one_line(exc)})") from None
    return path


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; missing, truncated or corrupted: :class:`ExportError`."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot be read as safetensors, truncated or corrupted ({one_line(exc)})") from None


def load_strict(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch is one :class:`ExportError` line naming
    ``where`` and the first missing and unexpected keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected, got = set(model.state_dict()), set(state)
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ExportError(f"{where}: state does not match the model: missing keys {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected keys {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}") from None
        raise ExportError(f"{where}: state does not match the model ({one_line(exc)[:300]})") from None


def json_field(metadata: dict, key: str, path: str):
    """The JSON-decoded metadata field ``key`` of the file ``path``; missing or invalid: :class:`ExportError`."""
    if key not in metadata:
        raise ExportError(f"{path}: metadata field {key!r} missing (corrupted or not an sqdist export)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ExportError(f"{path}: metadata field {key!r} is not valid JSON (corrupted)") from None
