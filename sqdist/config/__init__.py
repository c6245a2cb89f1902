"""Recipes: YAML + ``key=value`` overrides -> one validated, nested dict.

Every key a recipe may hold is in ``DEFAULTS`` (:mod:`sqdist.config.keys`), with its default and so
its type; anything else is an error that names the key, the value and what
is allowed. :class:`RecipeError` carries that one line; the CLI prints it and
exits with code 2.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any

import yaml

from .keys import CHOICES, DEFAULTS, NULLABLE, RANGES  # noqa: F401 - the tables, re-exported


class RecipeError(ValueError):
    """A recipe problem, as one line naming the key, the value and what is allowed."""


def _type_name(t) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}[t]


def _describe_range(kind: type, low, high, closed) -> str:
    what = "an integer" if kind is int else "a number"
    if high is None:
        return f"{what} {'>=' if closed[0] else '>'} {low}"
    if kind is int and closed == (True, True):
        return f"{what} from {low} to {high}"
    return f"{what} in {'[' if closed[0] else '('}{low}, {high}{']' if closed[1] else ')'}"


def _check_type(key: str, value: Any, default: Any) -> Any:
    if default is None:
        want = NULLABLE[key]
        if value is None or isinstance(value, want):
            return value
        raise RecipeError(f"{key}={value!r}: expected {_type_name(want)} or null")
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise RecipeError(f"{key}={value!r}: expected {_type_name(want)}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``; the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.epochs=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set(recipe: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in DEFAULTS:
        raise RecipeError(f"unknown recipe key {key!r}; sections: {', '.join(DEFAULTS)}")
    section, name = parts[0], ".".join(parts[1:])
    if len(parts) > 2 and parts[1] in ("kwargs", "params", "activations"):  # free-form: model.kwargs.drop_rate=0.1
        recipe[section].setdefault(parts[1], {})[".".join(parts[2:])] = value
        return
    fixed = DEFAULTS[section].get(parts[1])
    if isinstance(fixed, dict) and fixed and (len(parts) > 2 or isinstance(value, dict)):  # train.distill.weight=0.9
        items = {".".join(parts[2:]): value}.items() if len(parts) > 2 else value.items()
        for sub, item in items:
            if sub not in fixed:
                raise RecipeError(f"unknown recipe key '{section}.{parts[1]}.{sub}'; allowed in {section}.{parts[1]}: "
                                  f"{', '.join(fixed)}")
            recipe[section][parts[1]][sub] = item
        return
    if name not in DEFAULTS[section]:
        close = difflib.get_close_matches(name, DEFAULTS[section], n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise RecipeError(f"unknown recipe key {key!r}{hint}; allowed in {section}: {', '.join(DEFAULTS[section])}")
    recipe[section][name] = value


def load_recipe(path: str | None, overrides: list[str] = ()) -> dict:
    """Read ``path`` (YAML), apply ``overrides``, fill defaults, validate. Raises RecipeError."""
    recipe = copy.deepcopy(DEFAULTS)
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"recipe {path!r}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {path!r}: not UTF-8 text (byte {exc.start}); expected a YAML file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecipeError(f"recipe {path!r}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {path!r}: expected a mapping of sections ({', '.join(DEFAULTS)})")
        for section, values in loaded.items():
            if section not in DEFAULTS:
                raise RecipeError(f"unknown recipe section {section!r}; allowed: {', '.join(DEFAULTS)}")
            if not isinstance(values, dict):
                raise RecipeError(f"{section}={values!r}: expected a mapping of keys")
            for name, value in values.items():
                _set(recipe, f"{section}.{name}", value)
    overridden = []
    for text in overrides:
        key, value = parse_override(text)
        _set(recipe, key, value)
        overridden.append((key, value))
    validate(recipe)
    if recipe["quant"]["enabled"] is False:  # a quant/sq override would silently train full precision
        for key, value in overridden:
            if key.split(".")[0] in ("quant", "sq") and key != "quant.enabled":
                raise RecipeError(f"{key}={value!r}: has no effect, quant.enabled=false in this recipe (it trains "
                                  "full precision); add quant.enabled=true to quantize")
    if recipe["run"]["dir"] is None:
        stem = os.path.splitext(os.path.basename(path))[0] if path else "run"
        recipe["run"]["dir"] = os.path.join("runs", stem)
    return recipe


def validate(recipe: dict) -> None:
    """Types, choices, ranges, and names that must exist (model, quantizer, data folder)."""
    for section, values in DEFAULTS.items():
        for name, default in values.items():
            key = f"{section}.{name}"
            recipe[section][name] = _check_type(key, recipe[section][name], default)
            allowed = CHOICES.get(key)
            if allowed and recipe[section][name] not in allowed:
                raise RecipeError(f"{key}={recipe[section][name]!r}: allowed: {', '.join(allowed)}")
    for key, (low, high, closed) in RANGES.items():
        section, name = key.split(".")
        value = recipe[section][name]
        below = value < low if closed[0] else value <= low
        above = high is not None and (value > high if closed[1] else value >= high)
        if below or above:
            raise RecipeError(f"{key}={value!r}: expected {_describe_range(type(DEFAULTS[section][name]), low, high, closed)}")
    ratios = recipe["sq"]["ratios"]
    if not ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1 for r in ratios):
        raise RecipeError(f"sq.ratios={ratios!r}: expected a non-empty list of numbers in [0, 1]")
    milestones = recipe["sched"]["milestones"]
    if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1 for m in milestones):
        raise RecipeError(f"sched.milestones={milestones!r}: expected a list of fractions in [0, 1]")
    sq = recipe["sq"]
    if sq["variant"] == "authors" and sq["probability"] != "linear":
        raise RecipeError(f"sq.probability={sq['probability']!r}: sq.variant=authors draws the rows that stay full "
                          "precision with probability proportional to the error and has no probability rule; "
                          "allowed with it: linear (the default), or sq.variant=paper")
    _validate_finite_quant_params(recipe)
    _validate_distill(recipe["train"]["distill"])
    _validate_num_classes(recipe)
    _validate_names(recipe)
    _validate_split_fractions(recipe)


def _validate_finite_quant_params(recipe: dict) -> None:
    """Every number among ``quant.params`` and ``quant.activations`` is finite: an inf or nan step,
    clipping value or scale trains to NaN (PACT with alpha=.inf ended at 10% and exit 0)."""
    import math

    q = recipe["quant"]
    for section in ("params", "activations"):
        for name, value in q[section].items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise RecipeError(f"quant.{section}.{name}={value!r}: expected a finite number")


def _validate_distill(cfg: dict) -> None:
    """Teacher a folder name or null, weight in [0, 1], temperature > 0 (the teacher is read when training starts)."""
    if cfg["teacher"] is not None and (not isinstance(cfg["teacher"], str) or not cfg["teacher"]):
        raise RecipeError(f"train.distill.teacher={cfg['teacher']!r}: expected a run or checkpoint folder, or null")
    for name, ok, what in (("weight", lambda v: 0 <= v <= 1, "a number in [0, 1]"), ("temperature", lambda v: v > 0, "a number > 0")):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value) or value == float("inf"):
            raise RecipeError(f"train.distill.{name}={value!r}: expected {what}")
        cfg[name] = float(value)


def _validate_num_classes(recipe: dict) -> None:
    """``model.kwargs.num_classes``, when set: an integer >= 1, for digits and fashion_mnist at least their 10 classes
    (timm builds a model for -1 or 0 too, which then trains to nothing)."""
    if "num_classes" not in recipe["model"]["kwargs"]:
        return
    value = recipe["model"]["kwargs"]["num_classes"]
    low = DIGITS_CLASSES if recipe["data"]["name"] in ("digits", "fashion_mnist") else 1  # both have 10 classes
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        why = f" (data.name={recipe['data']['name']} has {DIGITS_CLASSES} classes)" if low > 1 else ""
        raise RecipeError(f"model.kwargs.num_classes={value!r}: expected an integer >= {low}{why}")


DIGITS_CLASSES = 10


def check_split_fraction(key: str, fraction: float, labels) -> None:
    """Refuse a stratified split fraction that leaves a class out of one part (RecipeError, one line).

    ``labels``: the class of every sample of the set being split. scikit-learn's stratified split
    takes ``h = ceil(fraction * n)`` samples out and keeps ``n - h``; when each part has at least
    ``ceil(n / c)`` samples (``c`` the smallest class's count), its allocation gives every class at
    least one sample in both parts. The allowed range follows from ``n`` and ``c``.
    """
    import math
    from collections import Counter

    counts = Counter(int(v) for v in labels)
    n, smallest = sum(counts.values()), min(counts.values())
    need = math.ceil(n / smallest)  # samples per part that guarantee one of every class
    held = math.ceil(fraction * n)
    if need <= held <= n - need:
        return
    where = f"{len(counts)} classes in {n} samples, the smallest with {smallest}"
    if 2 * need > n:
        raise RecipeError(f"{key}={fraction!r}: no split keeps every class in both parts ({where})")
    low, high = math.ceil(need / n * 1e4) / 1e4, math.floor((n - need) / n * 1e4) / 1e4
    off = " (or 0: no holdout)" if key == "data.holdout_fraction" else ""
    raise RecipeError(f"{key}={fraction!r}: splits {n} samples into {held} and {n - held}; each part needs every "
                      f"class ({where}); allowed: a number from {low} to {high}{off}")


def _validate_split_fractions(recipe: dict) -> None:
    """The digits split (``data.test_fraction``, then ``data.holdout_fraction`` of the training part)
    leaves every class in every part. Other data sets are checked when their labels are read
    (:func:`sqdist.data.hold_out`)."""
    data = recipe["data"]
    if data["name"] != "digits":
        return
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    check_split_fraction("data.test_fraction", data["test_fraction"], labels)
    if data["holdout_fraction"]:
        train_idx, _ = train_test_split(range(len(labels)), test_size=data["test_fraction"], random_state=0,
                                        stratify=labels)  # the split load_digits_split makes
        check_split_fraction("data.holdout_fraction", data["holdout_fraction"], labels[train_idx])


def _validate_names(recipe: dict) -> None:
    import timm

    from ..quant.registry import create_quantizer, list_quantizers

    name = recipe["model"]["name"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise RecipeError(f"model.name={name!r}: not a timm model (see timm.list_models()){hint}")
    from timm.optim import list_optimizers

    opt = recipe["optim"]["name"]
    if opt not in list_optimizers():
        close = difflib.get_close_matches(opt, list_optimizers(), n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise RecipeError(f"optim.name={opt!r}: not a timm optimizer (see timm.optim.list_optimizers()){hint}")
    q = recipe["quant"]
    if q["enabled"]:
        if q["name"] not in list_quantizers():
            raise RecipeError(f"quant.name={q['name']!r}: allowed: {', '.join(list_quantizers())}")
        try:
            quantizer = create_quantizer(q["name"], **q["params"])
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"quant.params={q['params']!r}: {exc}") from None
        from ..nn import check_sq_ratios

        try:
            check_sq_ratios(quantizer, q["name"], recipe["sq"]["ratios"])
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        _validate_activations(q["activations"])
    data = recipe["data"]
    if data["name"] == "fashion_mnist":
        _validate_fashion_mnist(data)
    elif data["augment"]:
        raise RecipeError(f"data.augment=true: data.name={data['name']!r} has no such option (digits: no augmentation; "
                          "folder: timm's training transform, always); allowed with data.name=fashion_mnist")
    if data["name"] == "folder":
        root = data["root"]
        if root is None:
            raise RecipeError("data.root=None: data.name=folder needs a folder holding train/ and val/")
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise RecipeError(f"data.root={root!r}: missing folder {os.path.join(root, split)!r} (expected ImageNet layout: train/ and val/ with one sub-folder per class)")
    resume = recipe["train"]["resume"]
    if resume not in ("none", "auto") and not os.path.isdir(resume):
        raise RecipeError(f"train.resume={resume!r}: allowed: none, auto, or an existing checkpoint folder")
    cfg = recipe["engine"]["config"]
    if cfg is not None and not os.path.isfile(cfg):
        raise RecipeError(f"engine.config={cfg!r}: no such DeepSpeed JSON file")


# data.name=fashion_mnist: Debian's dataset-fashion-mnist installs the four idx files there (read by sqdist.data)
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_files(root: str) -> list[str]:
    """The four idx files under ``root``, train images and labels first."""
    return [os.path.join(root, name) for split in ("train", "test") for name in FASHION_MNIST_FILES[split]]


def _validate_fashion_mnist(data: dict) -> None:
    """``data.root`` (default: where Debian's package puts the files) holds the four idx files."""
    root = data["root"] = data["root"] or FASHION_MNIST_ROOT
    missing = "no such folder" if not os.path.isdir(root) else next(
        (f"missing file {path!r}" for path in fashion_mnist_files(root) if not os.path.isfile(path)), None)
    if missing:
        raise RecipeError(f"data.root={root!r}: {missing} (data.name=fashion_mnist reads its idx files there); Debian's "
                          f"package dataset-fashion-mnist installs them into {FASHION_MNIST_ROOT}: "
                          "apt-get install dataset-fashion-mnist")


def _validate_activations(act: dict) -> None:
    from ..quant.registry import create_activation_quantizer, list_activation_quantizers

    if not act:
        return
    names = ", ".join(list_activation_quantizers())
    name = act.get("name")
    if name is None:
        raise RecipeError(f"quant.activations={act!r}: missing 'name'; allowed names: {names} (or {{}} for weights only)")
    if name not in list_activation_quantizers():
        raise RecipeError(f"quant.activations.name={name!r}: allowed: {names}")
    try:
        create_activation_quantizer(name, **{k: v for k, v in act.items() if k != "name"})
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"quant.activations={act!r}: {exc}") from None


def bits_label(recipe: dict) -> str:
    """Bits of weights and activations, ``W<w>A<a>`` (32 for full precision): ``W1A32``, ``W2A2``, ``W32A32``."""
    from ..quant.registry import create_activation_quantizer, create_quantizer

    q = recipe["quant"]
    if not q["enabled"]:
        return "W32A32"
    w_bits = create_quantizer(q["name"], **q["params"]).bits
    act = dict(q["activations"])
    a_bits = create_activation_quantizer(act.pop("name"), **act).bits if act else 32
    return f"W{w_bits}A{a_bits}"


def dump_recipe(recipe: dict, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
