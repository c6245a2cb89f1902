"""Run and checkpoint folders: rebuild a trained SQ model from one (:func:`load_run`) and write
its packed file (:func:`export_run`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .deployable import _sq_layers
from .format import ExportError, _load_safetensors, _load_strict, _one_line, check_keep_fp_bits
from .packed import export_model


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
    if src.is_file():
        raise ExportError(f"{src}: a file, not a run or checkpoint folder; pass a run folder (its final/ is used), "
                          f"a checkpoint folder, or the model.safetensors inside one (--check reads an export)")
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


def load_run(source: str | os.PathLike, force: bool = False, allow_float: bool = False) -> tuple[nn.Module, dict]:
    """The trained SQ model of a run or checkpoint folder, in eval mode, and what its ``meta.json`` says.

    Refuses (:class:`ExportError`) a full-precision run unless ``allow_float`` (then the plain timm
    model is returned, ``meta["enabled"]`` False), and one whose SQ ratio is below 1 unless ``force``. The returned dict holds ``model_name``, ``model_kwargs``, ``ratio``,
    ``sq``, ``checkpoint`` (the folder) and ``config`` (the run's ``config.yaml`` as a dict,
    or None when the run folder has none).
    """
    import timm

    from ..nn import QuantConfig, quantize_model
    from ..sq import SQConfig

    ckpt = resolve_checkpoint(source)
    meta = _read_meta(ckpt)
    if not meta["enabled"] and not allow_float:
        raise ExportError(f"{meta['path']}: quant.enabled is false (a full-precision run): there is nothing to pack")
    if meta["enabled"] and meta["ratio"] < 1.0 and not force:
        raise ExportError(f"{meta['path']}: sq.ratio={meta['ratio']:g} < 1.0, so training had not reached the "
                          f"fully quantized stage and the exported model differs from the trained one; "
                          f"finish training or pass --force")
    try:
        model = timm.create_model(meta["model_name"], **{**meta["model_kwargs"], "pretrained": False})
    except Exception as exc:  # unknown name or kwargs: timm raises several types
        raise ExportError(f"{meta['path']}: timm.create_model({meta['model_name']!r}, **{meta['model_kwargs']}) "
                          f"failed: {_one_line(exc)}") from None
    if not meta["enabled"]:
        return _load_weights(model, ckpt), {**meta, "ratio": 0.0, "checkpoint": ckpt, "config": _run_config(ckpt)}
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
                          f"of {meta['model_name']} that the model calls (sqdist leaves a layer whose weight the model "
                          f"reads directly full precision)")
    if meta["activations"] and list(sq.activation_quantizers) != list(meta["activations"].get("layers", [])):
        raise ExportError(f"{meta['path']}: quant.activations.layers does not match the layers whose input "
                          f"{meta['model_name']} quantizes ({list(sq.activation_quantizers)[:3]}...)")
    return _load_weights(model, ckpt), {**meta, "ratio": float(meta["ratio"]), "checkpoint": ckpt, "config": _run_config(ckpt)}


def _load_weights(model: nn.Module, ckpt: Path) -> nn.Module:
    weights = ckpt / "model.safetensors"
    _load_strict(model, _load_safetensors(weights), str(weights))
    return model.eval()


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
