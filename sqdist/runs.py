"""Run and checkpoint folders, the one owner of ``meta.json``.

A run folder (``runs/<name>/``) holds ``config.yaml`` (the recipe), ``checkpoints/step-N/`` and,
once training has finished, ``final/``; a checkpoint folder holds ``model.safetensors`` and
``meta.json``: what rebuilding the model needs (:class:`RunMeta`). Training writes it through
:func:`write_meta`; export, compress and ptq read it through :func:`read_meta` and find the folder
with :func:`resolve_checkpoint`. Nothing else opens ``meta.json``.

``meta.json``::

    {"model": {"name": timm name, "kwargs": {...}},
     "quant": {"enabled": bool, "name": quantizer, "params": {...}, "layers": [...],
               "activations": {"name": ..., **config, "layers": [...]} or {}, "bits": "W2A32"},
     "sq": {"ratio": float, "stage": int}, "sqdist_version": "0.1.0"}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .files import ExportError, load_safetensors, load_strict, one_line

META = "meta.json"


@dataclass(frozen=True)
class RunMeta:
    """What a checkpoint's ``meta.json`` says. ``quantizer`` is the weight quantizer's registry name
    (``quant.name`` in the file and the recipe); ``sq`` the SQ state as written (``ratio``, ``stage``)."""

    model_name: str
    model_kwargs: dict
    enabled: bool
    quantizer: str | None = None
    params: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    activations: dict = field(default_factory=dict)
    bits: str | None = None
    sq: dict = field(default_factory=dict)
    sqdist_version: str | None = None
    path: Path | None = None  # the meta.json read; None for one built in memory

    @property
    def ratio(self) -> float:
        """The SQ ratio the weights were last trained at (1.0: fully quantized)."""
        return self.sq.get("ratio", 0.0)

    def to_json(self) -> dict:
        """The ``meta.json`` content (key order as written since the first format)."""
        return {
            "model": {"name": self.model_name, "kwargs": self.model_kwargs},
            "quant": {"enabled": self.enabled, "name": self.quantizer, "params": self.params, "layers": self.layers,
                      "activations": self.activations, "bits": self.bits},
            "sq": self.sq,
            "sqdist_version": self.sqdist_version,
        }

    @classmethod
    def from_json(cls, meta: dict, path: Path | str = META) -> "RunMeta":
        """Check and read a ``meta.json`` content; a missing key or a wrong type: :class:`ExportError`."""
        def get(dotted: str, kind: type | tuple):
            node = meta
            for part in dotted.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ExportError(f"{path}: key {dotted!r} missing")
                node = node[part]
            if not isinstance(node, kind) or (kind is not bool and isinstance(node, bool)):
                names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ExportError(f"{path}: {dotted}={node!r}; allowed: a {names}")
            return node

        out = dict(model_name=get("model.name", str), model_kwargs=get("model.kwargs", dict),
                   enabled=get("quant.enabled", bool), sq=meta.get("sq") or {},
                   sqdist_version=meta.get("sqdist_version"), path=Path(path))
        if out["enabled"]:
            out.update(quantizer=get("quant.name", str), params=get("quant.params", dict),
                       layers=get("quant.layers", list), activations=meta["quant"].get("activations") or {},
                       bits=meta["quant"].get("bits"))
            get("sq.ratio", (int, float))
            if not isinstance(out["activations"], dict):
                raise ExportError(f"{path}: quant.activations={out['activations']!r}; allowed: a dict")
            if out["quantizer"] == "kbit" and "scale" not in out["params"]:
                out["params"] = {**out["params"], "scale": "max"}  # runs from before kbit had a scale choice
        return cls(**out)


def write_meta(folder: str | os.PathLike, meta: RunMeta | dict) -> Path:
    """Write ``folder/meta.json`` (under a temporary name, renamed into place)."""
    path = Path(folder) / META
    tmp = path.with_name(META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta.to_json() if isinstance(meta, RunMeta) else meta, f, indent=1)
    os.replace(tmp, path)
    return path


def read_meta(ckpt: str | os.PathLike) -> RunMeta:
    """The :class:`RunMeta` of checkpoint folder ``ckpt``; missing, not JSON or malformed: :class:`ExportError`."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: not found; pass a run folder or a checkpoint folder holding "
                          f"model.safetensors and meta.json") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: not a JSON object")
    return RunMeta.from_json(meta, path)


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
    if (src / META).exists():
        return src
    if (src / "final").is_dir():
        return src / "final"
    hint = ""
    latest = src / "checkpoints" / "latest"
    if latest.is_file():
        hint = f"; training has not finished: pass a checkpoint, e.g. {src / 'checkpoints' / latest.read_text().strip()}"
    raise ExportError(f"{src}: neither a checkpoint folder (meta.json) nor a run folder with final/{hint}")


def config_path(ckpt: str | os.PathLike) -> Path | None:
    """The run's ``config.yaml`` beside ``RUN/final`` or ``RUN/checkpoints/step-N``; None if absent."""
    ckpt = Path(ckpt)
    return next((p for p in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml") if p.is_file()), None)


def read_config(ckpt: str | os.PathLike) -> dict | None:
    """The recipe the run was trained with (``RUN/config.yaml``) as a dict; None if absent or not a mapping."""
    import yaml

    path = config_path(ckpt)
    if path is None:
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ExportError(f"{path}: not valid YAML ({one_line(exc)[:200]})") from None
    return config if isinstance(config, dict) else None


def run_recipe(ckpt: str | os.PathLike, meta: RunMeta, overrides: list[str]) -> dict:
    """The run's recipe (``config.yaml``, or the defaults when there is none) with ``overrides``, its
    model set to what the checkpoint's weights are."""
    from .config import load_recipe

    path = config_path(ckpt)
    recipe = load_recipe(str(path) if path else None, overrides)
    recipe["model"] = {"name": meta.model_name, "kwargs": meta.model_kwargs}
    return recipe


def load_weights(ckpt: str | os.PathLike, meta: RunMeta, error: type[ExportError] = ExportError):
    """The plain timm model of ``meta`` holding the checkpoint's ``model.safetensors``, in eval mode
    (a full-precision run's network; an SQ run's needs its layers quantized first: :func:`sqdist.export.load_run`).
    An unknown model or a state that does not match: ``error`` (one line)."""
    import timm

    try:
        model = timm.create_model(meta.model_name, **{**meta.model_kwargs, "pretrained": False})
    except Exception as exc:  # unknown name or kwargs: timm raises several types
        raise error(f"{meta.path}: timm.create_model({meta.model_name!r}, **{meta.model_kwargs}) "
                    f"failed: {one_line(exc)}") from None
    weights = Path(ckpt) / "model.safetensors"
    load_strict(model, load_safetensors(weights), str(weights))
    return model.eval()
