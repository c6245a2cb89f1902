"""Train a low-bit network with Stochastic Quantization.

    accelerate launch -m sqdist.train recipes/resnet50_twn.yaml data.root=/data/imagenet
    python -m sqdist.train recipes/digits_sq_twn.yaml train.epochs=2

A plain PyTorch loop: every step draws new SQ masks (rank 0's, broadcast),
runs forward/backward on the hybrid weights, steps the optimizer, and
advances the SQ schedule. Each SQ stage ends with a top-1 evaluation and a
checkpoint; ``train.resume=auto`` continues bit-exactly from the latest one.

:func:`train` reads top to bottom: :func:`setup` builds everything (and
restores a checkpoint), then the loop calls :func:`train_step`,
:func:`log_step`, :func:`stage_eval` and :func:`save` by name.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from . import dist as sqdist_dist
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_state_dict
from .activations import ActivationQuantizer, calibrate_activations
from .config import RecipeError, bits_label, dump_recipe, load_recipe
from .data import EpochBatches, build_datasets, eval_batches, loader
from .nn import QuantConfig, SQController, quantize_model
from .quantizers import Quantizer
from .sq import SQConfig
from .tracking import Tracker


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
                         seed=s["seed"] + rank)  # ranks draw differently; the broadcast makes them agree
    act = dict(q["activations"])
    try:
        controller = quantize_model(model, QuantConfig(
            quantizer=q["name"], params=dict(q["params"]), include=tuple(q["include"]), exclude=tuple(q["exclude"]),
            keep_stem_and_classifier=q["keep_stem_and_classifier"], sq=sq_config, broadcast=s["broadcast"],
            draw_in_forward=recipe["engine"]["name"] == "deepspeed" and recipe["engine"]["zero_stage"] == 3,
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


def model_meta(recipe: dict, controller: SQController | None, trained: tuple[int, float] | None = None) -> dict:
    """What export and evaluation need to rebuild the model from a checkpoint.

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
    return {
        "model": {"name": recipe["model"]["name"], "kwargs": recipe["model"]["kwargs"]},
        "quant": {"enabled": controller is not None, "name": q["name"], "params": params,
                  "layers": list(controller.layers) if controller else [], "activations": activations,
                  "bits": bits_label(recipe)},
        "sq": {"ratio": ratio if controller else 0.0, "stage": stage if controller else 0},
        "sqdist_version": __version__,
    }


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


def set_bn_train_only(model: torch.nn.Module) -> None:
    """Train mode for BatchNorm only: SQ layers use their fully quantized weights."""
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()


@torch.no_grad()
def recalibrate_bn(model, dataset, batches, device, n_batches: int, workers: int = 0, seed: int = 0) -> None:
    """Re-estimate BN statistics under the quantized weights (plain average over ``n_batches``).

    Reads only the first ``n_batches`` of ``batches``. Each BN keeps its own momentum.
    Under data parallelism the statistics are then averaged over the ranks (the mean
    over every rank's batches, as one process reading them all would get), so every
    rank evaluates, and rank 0 saves, the same network.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    set_bn_train_only(model)
    try:
        for x, _ in loader(dataset, batches[:n_batches], workers, seed=seed):
            model(x.to(device))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    if sqdist_dist.is_distributed():
        stats = [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
        flat = torch.cat([t.detach().float().reshape(-1) for t in stats])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        for t, part in zip(stats, flat.split([t.numel() for t in stats])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def evaluate(model, dataset, recipe: dict, device, rank: int, world: int) -> float:
    """Top-1 accuracy (%) over the whole test set, summed across ranks.

    Every rank runs the same number of batches (see :func:`sqdist.data.eval_batches`).
    """
    model.eval()
    batches, real = eval_batches(len(dataset), recipe["data"]["eval_batch_size"], rank, world)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    for x, y in loader(dataset, batches, recipe["data"]["workers"]):
        pred = model(x.to(device)).argmax(dim=1)
        keep = max(0, min(len(y), real - seen))  # the padding repeats a sample: count it once
        seen += len(y)
        counts[0] += (pred[:keep] == y[:keep].to(device)).sum()
        counts[1] += keep
    if sqdist_dist.is_distributed():
        torch.distributed.all_reduce(counts)
    return float(100.0 * counts[0] / counts[1])


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
# A quantizer (weight or activation) may define any of these methods; the trainer calls
# them on every quantizer module that has them, so a method with a schedule, a loss term
# or per-layer statistics needs no trainer of its own (the SLB and SRQ plugins use them):
#   set_progress(step, total_steps, steps_per_epoch)  before every optimizer step (and
#       before each evaluation, with the steps trained): a schedule as a pure function of
#       the step, so a resumed run continues it exactly.
#   regularization() -> Tensor | None  added to the loss of every micro-batch.
#   recalibrate_bn_after_epoch(epoch) -> bool  after epoch ``epoch`` (0-based) ends: when
#       any layer's quantizer says so, BN statistics are re-estimated for the network as
#       evaluated, on train.bn_recalibrate batches (HOOK_BN_BATCHES when that is 0).
#   metrics() -> dict[str, float]  logged as ``quant/<module>/<key>`` with each log line.
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
    sizes = {name: layer.weight.numel() for name, layer in sq.layers.items()}
    total = sum(sizes.values())
    avg = sum(bits[n] * sizes[n] for n in bits) / total if total else 0.0
    return {"layer_bits": bits, "avg_weight_bits": round(avg, 4)}


# ---------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything a training run carries from step to step."""

    recipe: dict
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    sq: SQController | None
    train_set: object
    test_set: object
    sampler: EpochBatches
    tracker: Tracker
    base_lrs: list[float]
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stages: list = field(default_factory=list)
    trained: tuple[int, float] = (0, 0.0)  # (stage, ratio) of the last step trained
    resumed_from: int | None = None
    quantizers: list = field(default_factory=list)  # quantizer_modules(net), for the hooks

    @property
    def deepspeed(self) -> bool:
        from . import engine

        return engine.is_deepspeed(self.accelerator)

    @property
    def net(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def setup(recipe: dict) -> Run:
    """Accelerator, data, model, optimizer; restores ``train.resume`` when it names a checkpoint."""
    from timm.optim import create_optimizer_v2

    from . import engine

    accelerator = engine.make_accelerator(recipe)  # may update recipe["engine"] from engine.config
    rank, world = accelerator.process_index, accelerator.num_processes
    run_dir, tcfg = recipe["run"]["dir"], recipe["train"]
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(run_dir, "config.yaml"))
    accelerator.wait_for_everyone()

    torch.manual_seed(tcfg["seed"] + rank)
    random.seed(tcfg["seed"] + rank)
    np.random.seed(tcfg["seed"] + rank)
    train_set, test_set = build_datasets(recipe)
    model, sq = build_model(recipe, rank)
    model.to(accelerator.device)
    if sq is not None and sq.activation_quantizers:
        # every rank the same batch (rank 0's first of a one-process run): the same initial step sizes
        first = EpochBatches(len(train_set), recipe["data"]["batch_size"], tcfg["seed"], 0, 1).batches(0)[:1]
        x, _ = next(iter(loader(train_set, first, 0, seed=tcfg["seed"], epoch=0)))
        calibrate_activations(model, x.to(accelerator.device))
    o = recipe["optim"]
    opt_kwargs = {"momentum": o["momentum"]} if o["name"] in ("sgd", "momentum", "nesterov") else {}
    groups = (lambda m: optimizer_param_groups(m, o["weight_decay"])) \
        if any(isinstance(m, ActivationQuantizer) and m.weight_decay for m in model.modules()) else None
    optimizer = create_optimizer_v2(model, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"],
                                    param_group_fn=groups, **opt_kwargs)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume loads the scheduled ones

    grad_accum = recipe["engine"]["grad_accum"]
    sampler = EpochBatches(len(train_set), recipe["data"]["batch_size"], tcfg["seed"], rank, world)
    steps_per_epoch = len(sampler) // grad_accum
    if steps_per_epoch < 1:
        raise RecipeError(f"data.batch_size={recipe['data']['batch_size']!r}: larger than this process's share of the training set ({len(train_set) // world} samples)")
    total_steps = tcfg["epochs"] * steps_per_epoch
    if tcfg["max_steps"]:
        total_steps = min(total_steps, tcfg["max_steps"])

    ckpt = tcfg["resume"]
    ckpt = latest_checkpoint(run_dir) if ckpt == "auto" else (None if ckpt == "none" else ckpt)
    deepspeed = engine.is_deepspeed(accelerator)
    state = load_checkpoint(ckpt, rank, weights=not deepspeed) if ckpt is not None else None
    if state is not None and not deepspeed:  # DeepSpeed restores model and optimizer shards after prepare
        model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])

    model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed:
        engine.cast_inputs_to_model_dtype(accelerator.unwrap_model(model))
        if ckpt is not None:
            engine.load_engine_state(model, ckpt)
    run = Run(recipe, accelerator, model, optimizer, sq, train_set, test_set, sampler,
              Tracker(run_dir, recipe, active=accelerator.is_main_process), base_lrs, steps_per_epoch, total_steps,
              trained=(sq.stage, sq.ratio) if sq else (0, 0.0))
    run.quantizers = quantizer_modules(run.net)
    if state is not None:
        rs = state["rank_state"]
        run.step, run.epoch, run.batch_in_epoch, run.stages = rs["step"], rs["epoch"], rs["batch_in_epoch"], list(rs["stages"])
        if sq is not None:
            sq.load_state_dict(rs["sq"])
            run.trained = tuple(rs.get("trained", (sq.stage, sq.ratio)))
        if accelerator.scaler is not None and rs.get("scaler"):
            accelerator.scaler.load_state_dict(rs["scaler"])
        set_rng_state(rs["rng"])  # last: nothing above may draw after it
        run.resumed_from = run.step
    return run


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: new masks and LR at the start of an optimizer step, forward, backward, step."""
    recipe, optimizer = run.recipe, run.optimizer
    if run.batch_in_epoch % recipe["engine"]["grad_accum"] == 0:  # a new optimizer step
        if run.sq is not None:
            run.sq.draw_masks()
        for group, base in zip(optimizer.param_groups, run.base_lrs):
            group["lr"] = base * lr_factor(run.step, recipe, run.steps_per_epoch, run.total_steps)
        call_hooks(run, "set_progress", run.step, run.total_steps, run.steps_per_epoch)
    with run.accelerator.accumulate(run.model):
        logits = run.model(x)
        loss = F.cross_entropy(logits, y)
        terms = [t for t in call_hooks(run, "regularization") if t is not None]
        if terms:
            loss = loss + torch.stack([t.reshape(()) for t in terms]).sum()
        run.accelerator.backward(loss)
        clip = recipe["engine"]["gradient_clipping"]
        if clip and run.accelerator.sync_gradients:
            run.accelerator.clip_grad_norm_(run.model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logits


def log_step(run: Run, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    sq = run.sq
    metrics = {"train/loss": loss.item(), "train/acc": float((logits.argmax(1) == y).float().mean() * 100),
               "lr": run.optimizer.param_groups[0]["lr"], "epoch": run.epoch}
    if sq is not None:
        fractions = sq.quantized_fraction()
        metrics.update({"sq/ratio": sq.ratio, "sq/stage": sq.stage,
                        "sq/quantized_fraction": sum(fractions.values()) / len(fractions),
                        **{f"sq/error/{k}": v for k, v in sq.mean_errors().items()},
                        **{f"sq/quantized/{k}": v for k, v in fractions.items()}})
    for name, m in run.quantizers:
        if hasattr(m, "metrics"):
            metrics.update({f"quant/{name}/{k}": float(v) for k, v in m.metrics().items()})
    run.tracker.log(metrics, run.step)


def save(run: Run) -> None:
    """A checkpoint of the current step (collective: every rank calls it)."""
    from . import engine

    if run.deepspeed:  # model: consolidated fp32 (collective); model + optimizer shards: DeepSpeed's own format
        engine.broadcast_buffers(run.net)
        model_state, optimizer_state = engine.full_state_dict(run.accelerator, run.model), None
        write_extra = lambda folder: engine.save_engine_state(run.model, folder)  # noqa: E731
    else:
        model_state, optimizer_state, write_extra = run.net.state_dict(), run.optimizer.state_dict(), None
    scaler = run.accelerator.scaler
    save_checkpoint(run.recipe["run"]["dir"], run.step, model_state=model_state, optimizer_state=optimizer_state,
                    meta=model_meta(run.recipe, run.sq, run.trained), rank=run.accelerator.process_index,
                    write_extra=write_extra,
                    rank_state={"step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
                                "stages": run.stages, "trained": list(run.trained),
                                "sq": run.sq.state_dict() if run.sq else {}, "rng": rng_state(),
                                "scaler": scaler.state_dict() if scaler is not None else None})


def stage_eval(run: Run, label: str) -> float:
    """Top-1 of the network as trained so far (fully quantized), recorded as the stage ``run.trained``."""
    from . import engine

    acc_ = run.accelerator
    net, tcfg = run.net, run.recipe["train"]
    call_hooks(run, "set_progress", run.step, run.total_steps, run.steps_per_epoch)
    if run.deepspeed:  # DeepSpeed leaves BN statistics per rank: evaluate rank 0's everywhere
        engine.broadcast_buffers(net)
    if tcfg["bn_recalibrate"] and run.sq is not None:
        recalibrate_bn(net, run.train_set, run.sampler.batches(0), acc_.device, tcfg["bn_recalibrate"],
                       run.recipe["data"]["workers"], seed=tcfg["seed"])
    acc = evaluate(net, run.test_set, run.recipe, acc_.device, acc_.process_index, acc_.num_processes)
    run.model.train()
    stage, ratio = run.trained
    run.stages.append({"stage": stage, "ratio": ratio, "step": run.step, "epoch": run.epoch, "label": label, "top1": acc})
    run.tracker.log({"eval/top1": acc, "sq/stage": stage}, run.step)
    return acc


def finish(run: Run, final_acc: float, seconds: float) -> dict:
    """Final checkpoint, ``final/`` (model + meta) and ``summary.json``."""
    from . import engine

    save(run)
    sq, recipe = run.sq, run.recipe
    summary = {"final_accuracy": final_acc, "total_steps": run.step, "resumed_from_step": run.resumed_from,
               "stages": run.stages, "seconds": round(seconds, 2), "world_size": run.accelerator.num_processes,
               "model": recipe["model"]["name"], "quantizer": recipe["quant"]["name"] if sq else None,
               "activations": (recipe["quant"]["activations"].get("name") if sq else None) or None,
               "bits": bits_label(recipe), "sq_ratio": run.trained[1] if sq else 0.0,
               **(layer_bits(sq) if sq else {})}
    final_state = engine.full_state_dict(run.accelerator, run.model)  # collective under DeepSpeed: fp32, consolidated
    if run.accelerator.is_main_process:
        run_dir = recipe["run"]["dir"]
        final_dir = os.path.join(run_dir, "final")
        os.makedirs(final_dir, exist_ok=True)
        save_state_dict(final_state, os.path.join(final_dir, "model.safetensors"))
        with open(os.path.join(final_dir, "meta.json"), "w") as f:
            json.dump(model_meta(recipe, sq, run.trained), f, indent=1)
        tmp = os.path.join(run_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(run_dir, "summary.json"))
        run.tracker.summary(summary)
        run.tracker.close()
        print(f"final top-1 accuracy: {final_acc:.2f}%  ({summary['bits']}, {run.step} steps, run folder {run_dir})")
    run.accelerator.wait_for_everyone()
    return summary


def train(recipe: dict, on_step=None) -> dict:
    """Run the recipe; returns the summary (also written to RUN/summary.json on rank 0).

    ``on_step(step, model, controller)``, if given, is called after every optimizer
    step on every rank (``model`` unwrapped; ``controller`` None for a float run).
    """
    from tqdm import tqdm

    from . import preempt

    run = setup(recipe)
    sq, tcfg, accelerator = run.sq, recipe["train"], run.accelerator
    device, workers, grad_accum = accelerator.device, recipe["data"]["workers"], recipe["engine"]["grad_accum"]
    handler = preempt.install()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and tcfg["progress"]))
    run.model.train()
    usable = len(run.sampler) - len(run.sampler) % grad_accum  # whole optimizer steps per epoch
    preempted, t0 = False, time.time()
    while run.step < run.total_steps and not preempted:
        batches = run.sampler.batches(run.epoch)[run.batch_in_epoch:usable]
        # the sample keys carry the epoch: augmentation is the same however the epoch is split by a resume
        for x, y in loader(run.train_set, batches, workers, seed=tcfg["seed"], epoch=run.epoch):
            x, y = x.to(device), y.to(device)
            loss, logits = train_step(run, x, y)
            run.batch_in_epoch += 1
            if run.batch_in_epoch % grad_accum:
                continue
            run.step += 1
            bar.update(1)
            run.trained = (sq.stage, sq.ratio) if sq is not None else (0, 0.0)  # the stage this step belonged to
            if on_step is not None:
                on_step(run.step, run.net, sq)
            new_stage = sq.advance("step") if sq is not None else False
            if run.step % tcfg["log_every"] == 0 or run.step == run.total_steps:
                log_step(run, loss, logits, y)
                bar.set_postfix(loss=f"{loss.item():.3f}", ratio=sq.ratio if sq else 0.0)
            if run.batch_in_epoch == usable:  # the epoch is done: count it before any checkpoint
                run.epoch, run.batch_in_epoch = run.epoch + 1, 0
                new_stage = (sq.advance("epoch") if sq is not None else False) or new_stage
                if any(call_hooks(run, "recalibrate_bn_after_epoch", run.epoch - 1)):
                    recalibrate_bn(run.net, run.train_set, run.sampler.batches(0), device,
                                   tcfg["bn_recalibrate"] or HOOK_BN_BATCHES, workers, seed=tcfg["seed"])
                    run.model.train()
            if new_stage:
                stage_eval(run, "stage-end")
                if recipe["sq"]["restart_per_stage"]:
                    reset_optimizer_state(run.optimizer)
                save(run)
            elif tcfg["checkpoint_every"] and run.step % tcfg["checkpoint_every"] == 0:
                save(run)
            if _any_rank(handler.requested, device):
                save(run)
                preempted = True
            if preempted or run.step >= run.total_steps or run.batch_in_epoch == 0:
                break
    bar.close()

    if preempted:
        if accelerator.is_main_process:
            run.tracker.log({"event": "preempted"}, run.step)
            run.tracker.close()
            preempt.requeue()
        accelerator.wait_for_everyone()
        return {"preempted": True, "total_steps": run.step}
    return finish(run, stage_eval(run, "final"), time.time() - t0)


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when any rank's flag is set (a preemption signal may reach one rank first)."""
    if not sqdist_dist.is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: python -m sqdist.train RECIPE.yaml [section.key=value ...]")
        return 0 if argv else 2
    try:
        recipe = load_recipe(argv[0], argv[1:])
        train(recipe)
    except RecipeError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one of them says why
            print(f"sqdist: recipe error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
