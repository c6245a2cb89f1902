"""The command line's side of export, the only one that knows run folders and datasets: rebuild a
trained SQ model from a run or checkpoint folder (:func:`load_run`), write its packed file
(:func:`export_run`) or its ONNX graph (:func:`export_run_onnx`, 8-bit activations calibrated on the
run's data: :func:`run_data`). The writers take a model and tensors; the folders and ``meta.json``
belong to :mod:`sqdist.runs`."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..runs import read_config, read_meta, resolve_checkpoint  # noqa: F401 - resolve_checkpoint re-exported
from .deployable import _sq_layers
from .format import ExportError, _load_safetensors, _load_strict, _one_line, check_keep_fp_bits
from .int8 import check_activations
from .onnx_check import _require_onnx, _top1
from .onnx_writer import OPSET, default_input_size, export_onnx
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


def export_run_onnx(source: str | os.PathLike, out: str | os.PathLike, force: bool = False, keep_fp_bits: int = 32,
                    input_size: tuple[int, int, int] | None = None, activations: str = "float",
                    calib_batches: int = 8, opset: int = OPSET) -> dict:
    """Rebuild the trained model of a run or checkpoint folder and :func:`export_onnx` it.

    The input size defaults to the run's recipe (``data.image_size``, RUN/config.yaml). With
    ``activations="int8"`` the ranges are calibrated on ``calib_batches`` batches of the run's
    training data (its recipe's ``data``, ``data.batch_size`` each, a fixed shuffle), and the
    result adds ``top1_onnx`` (onnxruntime, default session) and ``top1_model`` (the run's model
    in torch) on the run's evaluation split, in percent.
    """
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    activations = check_activations(activations)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ExportError(f"calib_batches={calib_batches!r}; allowed: an integer >= 1")
    _require_onnx()
    model, meta = load_run(source, force)
    if input_size is None:
        input_size = default_input_size(model, meta["config"])
    extra = {"model": {"name": meta["model_name"], "kwargs": meta["model_kwargs"]}, "sq": {**meta["sq"],
             "ratio": meta["ratio"]}, "source": str(meta["checkpoint"])}
    calibration, evaluation = None, None
    if activations == "int8":
        calibration, evaluation = run_data(meta, calib_batches)
    info = export_onnx(model, out, input_size=input_size, keep_fp_bits=keep_fp_bits, sq_ratio=meta["ratio"],
                       force=force, metadata=extra, activations=activations, calibration=calibration, opset=opset)
    if evaluation is not None:
        info.update(_top1(model, info["path"], evaluation, int(meta["config"]["data"]["batch_size"])))
    return info


def run_data(meta: dict, calib_batches: int):
    """(calibration batches from the run's training split, its evaluation set) from the run's recipe.

    The calibration images are read as the evaluation reads them (no augmentation, the evaluation
    transform: :func:`sqdist.data.eval_view`), a fixed subset (seed 0): two exports of one run are equal.
    """
    from ..data import build_datasets, eval_view

    config = meta["config"]
    if not config or "data" not in config:
        raise ExportError(f"{meta['checkpoint']}: no config.yaml with a data section next to the checkpoint; "
                          f"activations='int8' calibrates on the run's training data")
    try:
        train, evaluation = build_datasets(config)
    except Exception as exc:  # a missing data.root and the like
        raise ExportError(f"{meta['checkpoint']}: the run's data cannot be loaded ({_one_line(exc)[:200]})") from None
    view = eval_view(train, evaluation)
    batch = int(config["data"]["batch_size"])
    order = torch.randperm(len(view), generator=torch.Generator().manual_seed(0))[: calib_batches * batch]
    calibration = [torch.stack([view[int(i)][0] for i in chunk]) for chunk in order.split(batch)]
    return calibration, evaluation


def export_run_openvino(source: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                        keep_fp_bits: int = 32, input_size: tuple[int, int, int] | None = None,
                        activations: str = "float", calib_batches: int = 8) -> dict:
    """Rebuild the trained model of a run or checkpoint folder and :func:`export_openvino` it; as
    :func:`sqdist.export.export_run_onnx`, with ``activations="int8"`` calibrated on the run's training
    data and the result's ``top1_openvino``, ``top1_model`` and ``agreement`` on its evaluation split."""
    from .openvino import export_openvino, require_openvino, top1_openvino

    require_openvino()
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    activations = check_activations(activations)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ExportError(f"calib_batches={calib_batches!r}; allowed: an integer >= 1")
    model, meta = load_run(source, force)
    if input_size is None:
        input_size = default_input_size(model, meta["config"])
    extra = {"model": {"name": meta["model_name"], "kwargs": meta["model_kwargs"]},
             "sq": {**meta["sq"], "ratio": meta["ratio"]}, "source": str(meta["checkpoint"])}
    calibration = evaluation = None
    if activations == "int8":
        calibration, evaluation = run_data(meta, calib_batches)
    info = export_openvino(model, out, input_size=input_size, keep_fp_bits=keep_fp_bits, sq_ratio=meta["ratio"],
                           force=force, metadata=extra, activations=activations, calibration=calibration)
    if evaluation is not None:
        info.update(top1_openvino(model, info["path"], evaluation, int(meta["config"]["data"]["batch_size"])))
    return info
