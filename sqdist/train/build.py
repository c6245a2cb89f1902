"""The pieces a training run is built from: the model, the LR schedule, the optimizer's
parameter groups, the RNG state of a checkpoint, and the quantizer hooks the loop calls."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from ..version import __version__
from ..config import RecipeError, bits_label
from ..nn import QuantConfig, SQController, quantize_model
from ..runs import RunMeta
from ..quant.activations import ActivationQuantizer
from ..quant.weights import Quantizer
from ..sq import SQConfig


# ---------------------------------------------------------------- building blocks
def build_model(recipe: dict, rank: int = 0) -> tuple[torch.nn.Module, SQController | None]:
    """timm model from the recipe, with SQ layers when ``quant.enabled``."""
    import timm

    model = timm.create_model(recipe["model"]["name"], pretrained=False, **recipe["model"]["kwargs"])
    q = recipe["quant"]
    if not q["enabled"]:
        return model, None
    s = recipe["sq"]
    sq_config = SQConfig(ratios=tuple(s["ratios"]), stage_length=s["stage_length"], unit=s["unit"],
                         probability=s["probability"], granularity=s["granularity"], variant=s["variant"],
                         seed=s["seed"] + (0 if s["broadcast"] else rank))  # the same draws on every rank
    act = dict(q["activations"])
    try:
        controller = quantize_model(model, QuantConfig(
            quantizer=q["name"], params=dict(q["params"]), include=tuple(q["include"]), exclude=tuple(q["exclude"]),
            keep_stem_and_classifier=q["keep_stem_and_classifier"], sq=sq_config, broadcast=s["broadcast"],
            draw_in_forward=draws_in_forward(recipe["engine"]),
            activations=act.pop("name", None), activation_params=act))
    except ValueError as exc:
        if "no layer matched" not in str(exc):
            raise
        kept = " (the stem and classifier stay full precision: quant.keep_stem_and_classifier)" \
            if q["keep_stem_and_classifier"] else ""
        raise RecipeError(f"quant.include={q['include']!r} quant.exclude={q['exclude']!r}: no Conv/Linear layer of "
                          f"{recipe['model']['name']} matches{kept}; allowed: patterns that leave at least one layer, "
                          "or quant.enabled=false") from None
    return model, controller


def draws_in_forward(engine: dict) -> bool:
    """Whether SQ layers draw their masks inside their forward: under ZeRO-3 and FSDP2 the full
    weight exists only there (between forwards a rank holds a shard)."""
    return engine["name"] == "fsdp2" or (engine["name"] == "deepspeed" and engine["zero_stage"] == 3)


def model_meta(recipe: dict, controller: SQController | None, trained: tuple[int, float] | None = None) -> dict:
    """What export and evaluation need to rebuild the model from a checkpoint: the ``meta.json``
    content (:class:`sqdist.runs.RunMeta`).

    ``trained``: (stage, ratio) of the last step the weights were trained at; the SQ
    ratio recorded is that one, not the ratio of a stage about to begin.
    """
    q = recipe["quant"]
    stage, ratio = trained if trained is not None else ((controller.stage, controller.ratio) if controller else (0, 0.0))
    params, activations = q["params"], {}
    if controller is not None:  # as built, defaults included: a later default cannot change what a run means
        params = {**q["params"], **next(iter(controller.layers.values())).quantizer.config()}
        acts = controller.activation_quantizers
        if acts:
            first = next(iter(acts.values()))
            activations = {"name": first.quantizer_name, **first.config(), "layers": list(acts)}
    return RunMeta(model_name=recipe["model"]["name"], model_kwargs=recipe["model"]["kwargs"],
                   enabled=controller is not None, quantizer=q["name"], params=params,
                   layers=list(controller.layers) if controller else [], activations=activations,
                   bits=bits_label(recipe), sq={"ratio": ratio if controller else 0.0, "stage": stage if controller else 0},
                   sqdist_version=__version__).to_json()


def lr_factor(step: int, recipe: dict, steps_per_epoch: int, total_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (a pure function: resume needs no scheduler state).

    With ``sq.restart_per_stage`` the schedule restarts at each SQ stage, as in
    the SQ authors' code where every stage is a full training run.
    """
    sched, sq = recipe["sched"], recipe["sq"]
    start, span = 0, total_steps
    if recipe["quant"]["enabled"] and sq["restart_per_stage"]:
        stage_steps = sq["stage_length"] * (steps_per_epoch if sq["unit"] == "epoch" else 1)
        stage = min(step // stage_steps, len(sq["ratios"]) - 1)
        start = stage * stage_steps
        span = stage_steps if stage < len(sq["ratios"]) - 1 else max(total_steps - start, 1)
    local = step - start
    if sched["warmup_steps"] and local < sched["warmup_steps"]:
        return (local + 1) / sched["warmup_steps"]
    progress = min(local / max(span, 1), 1.0)
    if sched["name"] == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched["name"] == "step":
        return sched["gamma"] ** sum(progress >= m for m in sched["milestones"])
    return 1.0


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's parameter groups (no weight decay on biases, norms and scalars), except that the
    parameters of activation quantizers whose method decays them (``weight_decay = True``,
    PACT: the paper's L2 regularization of alpha) are in the decayed group."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay,
                                       no_weight_decay_list=getattr(model, "no_weight_decay", lambda: set())())
    wanted = {id(p) for m in model.modules() if isinstance(m, ActivationQuantizer) and m.weight_decay
              for p in m.parameters(recurse=False) if p.requires_grad}
    moved = [p for g in groups if g["weight_decay"] == 0 for p in g["params"] if id(p) in wanted]
    if not moved or not weight_decay:
        return groups
    for g in groups:
        if g["weight_decay"] == 0:
            g["params"] = [p for p in g["params"] if id(p) not in wanted]
    decayed = next((g for g in groups if g["weight_decay"] == weight_decay), None)
    if decayed is None:
        decayed = {"params": [], "weight_decay": weight_decay}
        groups.append(decayed)
    decayed["params"] += moved
    return [g for g in groups if g["params"]]


def reset_optimizer_state(optimizer) -> None:
    """Forget momentum / Adam moments: the next SQ stage starts as a fresh run.

    The torch optimizer sits under one or two wrappers (Accelerate's; under DeepSpeed
    also the ZeRO optimizer, whose inner optimizer holds the fp32 partitions and their state).
    """
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    optimizer.state.clear()




def rng_state() -> dict:
    """Every RNG stream a step may draw from (Python, numpy, torch, CUDA), as Accelerate's
    ``save_state`` keeps them, but in types ``torch.load(weights_only=True)`` reads back."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:  # absent in checkpoints of sqdist 0.1.0
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- quantizer hooks
# The hooks the trainer calls on every weight and activation quantizer module are the methods of
# sqdist.quant.hooks.QuantizerHooks (a base of both; no-ops by default, a docstring each).
# ``bits`` (an int, possibly changing during training) is read at the end of the run:
# summary.json gets ``layer_bits`` {layer: bits} and ``avg_weight_bits`` (weighted by the
# number of weights) for every quantized run.
HOOK_BN_BATCHES = 50  # batches for a hook's BN re-estimation when train.bn_recalibrate is 0 (not 1: too noisy)


def quantizer_modules(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every weight and activation quantizer in ``net``, in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (Quantizer, ActivationQuantizer))]


def call_hooks(run: "Run", hook: str, *args) -> list:
    """``module.hook(*args)`` for every quantizer module that defines ``hook``; their results."""
    return [getattr(m, hook)(*args) for _, m in run.quantizers if hasattr(m, hook)]


def layer_bits(sq: SQController) -> dict:
    """``{"layer_bits": {layer: bits}, "avg_weight_bits": mean bits weighted by weights}``."""
    bits = {name: int(layer.quantizer.bits) for name, layer in sq.layers.items()}
    # the full size: under ZeRO-3 a weight is a shard between forwards (numel() 0), DeepSpeed keeps its size in ds_numel
    sizes = {name: int(getattr(layer.weight, "ds_numel", layer.weight.numel())) for name, layer in sq.layers.items()}
    total = sum(sizes.values())
    avg = sum(bits[n] * sizes[n] for n in bits) / total if total else 0.0
    return {"layer_bits": bits, "avg_weight_bits": round(avg, 4)}
