"""Rebuild a trained SQ model from a run or checkpoint folder (:func:`load_run`) and write its packed
file (:func:`export_run`). The folders and ``meta.json`` belong to :mod:`sqdist.runs`."""
from __future__ import annotations

import os

from torch import nn

from ..runs import read_config, read_meta, resolve_checkpoint  # noqa: F401 - resolve_checkpoint re-exported
from .deployable import _sq_layers
from .format import ExportError, _load_safetensors, _load_strict, _one_line, check_keep_fp_bits
from .packed import export_model


def load_run(source: str | os.PathLike, force: bool = False) -> tuple[nn.Module, dict]:
    """The trained SQ model of a run or checkpoint folder, in eval mode, and what its ``meta.json`` says.

    Refuses (:class:`ExportError`) a full-precision run, and one whose SQ ratio is below 1
    unless ``force``. The returned dict holds ``model_name``, ``model_kwargs``, ``ratio``,
    ``sq``, ``checkpoint`` (the folder) and ``config`` (the run's ``config.yaml`` as a dict,
    or None when the run folder has none).
    """
    import timm

    from ..nn import QuantConfig, quantize_model
    from ..sq import SQConfig

    ckpt = resolve_checkpoint(source)
    run = read_meta(ckpt)
    meta = {"path": run.path, "model_name": run.model_name, "model_kwargs": run.model_kwargs, "enabled": run.enabled,
            "sq": run.sq, "quantizer": run.quantizer, "params": run.params, "layers": run.layers,
            "ratio": run.ratio, "activations": run.activations}
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
                          f"of {meta['model_name']} that the model calls (sqdist leaves a layer whose weight the model "
                          f"reads directly full precision)")
    if meta["activations"] and list(sq.activation_quantizers) != list(meta["activations"].get("layers", [])):
        raise ExportError(f"{meta['path']}: quant.activations.layers does not match the layers whose input "
                          f"{meta['model_name']} quantizes ({list(sq.activation_quantizers)[:3]}...)")
    weights = ckpt / "model.safetensors"
    _load_strict(model, _load_safetensors(weights), str(weights))
    model.eval()
    return model, {**meta, "ratio": float(meta["ratio"]), "checkpoint": ckpt, "config": read_config(ckpt)}


def export_run(source: str | os.PathLike, out: str | os.PathLike, force: bool = False, keep_fp_bits: int = 32) -> dict:
    """Rebuild the trained model from a run or checkpoint folder and :func:`export_model` it."""
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    model, meta = load_run(source, force)
    return export_model(model, out, model_name=meta["model_name"], model_kwargs=meta["model_kwargs"],
                        sq_ratio=meta["ratio"], force=force, sq=meta["sq"], keep_fp_bits=keep_fp_bits)
