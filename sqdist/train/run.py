"""A training run: :class:`Run` (what the loop carries), :func:`setup` (builds it, restores a
checkpoint), :func:`save`, :func:`stage_eval` and :func:`finish` (checkpoints, evaluations, summary)."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import RecipeError, bits_label, dump_recipe
from ..data import EpochBatches, build_datasets, loader
from ..nn import SQController
from ..quant.activations import ActivationQuantizer, calibrate_activations
from ..runs import write_meta
from .build import (build_model, call_hooks, layer_bits, model_meta, optimizer_param_groups, quantizer_modules, rng_state,
                    set_rng_state)
from .distill import load_teacher
from .compiling import check_recipe, compile_model
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_state_dict
from .evaluation import evaluate, recalibrate_bn
from .tracking import Tracker


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
    teacher: torch.nn.Module | None = None  # train.distill.teacher, frozen (sqdist.train.distill)

    @property
    def deepspeed(self) -> bool:
        from . import engine

        return engine.is_deepspeed(self.accelerator)

    @property
    def fsdp2(self) -> bool:
        return self.recipe["engine"]["name"] == "fsdp2"

    @property
    def net(self) -> torch.nn.Module:
        # keep_torch_compile=False: the module itself even under a torch.compile wrapper (state_dict keys
        # without "_orig_mod."); train.compile compiles in place and has no wrapper
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


def setup(recipe: dict) -> Run:
    """Accelerator, data, model, optimizer; restores ``train.resume`` when it names a checkpoint."""
    from timm.optim import create_optimizer_v2

    from . import engine, fsdp

    check_recipe(recipe["train"])
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
    teacher = None
    if sq is not None and sq.activation_quantizers or tcfg["distill"]["teacher"] is not None:
        # every rank the same batch (rank 0's first of a one-process run): the same initial step sizes
        first = EpochBatches(len(train_set), recipe["data"]["batch_size"], tcfg["seed"], 0, 1).batches(0)[:1]
        x, _ = next(iter(loader(train_set, first, 0, seed=tcfg["seed"], epoch=0)))
        if sq is not None and sq.activation_quantizers:
            calibrate_activations(model, x.to(accelerator.device))
        teacher = load_teacher(recipe, model, x, accelerator.device)
    sharded = recipe["engine"]["name"] == "fsdp2"
    if sharded:  # before the optimizer: fully_shard replaces every parameter by its shard
        model = fsdp.shard_model(model, recipe, accelerator.device)
    o = recipe["optim"]
    opt_kwargs = {"momentum": o["momentum"]} if o["name"] in ("sgd", "momentum", "nesterov") else {}
    if opt_kwargs and accelerator.device.type in ("cpu", "cuda") and not engine.is_deepspeed(accelerator) and not sharded:
        # SGD's fused kernel: one pass over every parameter (the same values as the per-tensor and
        # foreach forms; several times faster on a step with many parameters, e.g. SLB's logits)
        opt_kwargs["fused"] = True
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
    state = load_checkpoint(ckpt, rank, weights=not (deepspeed or sharded)) if ckpt is not None else None
    if state is not None and not (deepspeed or sharded):  # DeepSpeed and FSDP2 restore their shards
        model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])

    if sharded:  # the model is FSDP2's already; Accelerate wraps the optimizer only
        if ckpt is not None:
            fsdp.load_sharded(model, optimizer, ckpt)
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed:
        engine.cast_inputs_to_model_dtype(accelerator.unwrap_model(model))
        if ckpt is not None:
            engine.load_engine_state(model, ckpt)
    run = Run(recipe, accelerator, model, optimizer, sq, train_set, test_set, sampler,
              Tracker(run_dir, recipe, active=accelerator.is_main_process), base_lrs, steps_per_epoch, total_steps,
              trained=(sq.stage, sq.ratio) if sq else (0, 0.0), teacher=teacher)
    if tcfg["compile"]:  # in place: the same module, state_dict keys and engine wrapper (docs/compile.md)
        compile_model(run.net, tcfg["compile_mode"], tcfg["compile_backend"])
    run.quantizers = quantizer_modules(run.net)
    call_hooks(run, "set_run_seed", tcfg["seed"])
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


def save(run: Run) -> None:
    """A checkpoint of the current step (collective: every rank calls it)."""
    from . import engine, fsdp

    if run.deepspeed:  # model: consolidated fp32 (collective); model + optimizer shards: DeepSpeed's own format
        engine.broadcast_buffers(run.net)
        model_state, optimizer_state = engine.full_state_dict(run.accelerator, run.model), None
        write_extra = lambda folder: engine.save_engine_state(run.model, folder)  # noqa: E731
    elif run.fsdp2:  # model: consolidated (collective); model + optimizer shards: torch.distributed.checkpoint
        engine.broadcast_buffers(run.net)
        model_state, optimizer_state = fsdp.full_state_dict(run.model), None
        write_extra = lambda folder: fsdp.save_sharded(run.model, run.optimizer, folder)  # noqa: E731
    else:
        model_state, optimizer_state, write_extra = run.net.state_dict(), run.optimizer.state_dict(), None
    scaler = run.accelerator.scaler
    with fsdp.unsharded(run.model):  # FSDP2: a quantizer's config may read its parameters
        meta = model_meta(run.recipe, run.sq, run.trained)
    save_checkpoint(run.recipe["run"]["dir"], run.step, model_state=model_state, optimizer_state=optimizer_state,
                    meta=meta, rank=run.accelerator.process_index,
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
    if run.deepspeed or run.fsdp2:  # they leave BN statistics per rank: evaluate rank 0's everywhere
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
    from . import engine, fsdp

    save(run)
    sq, recipe = run.sq, run.recipe
    with fsdp.unsharded(run.model):  # FSDP2: learned bit widths and the quantizers' config read whole parameters
        bits, meta = (layer_bits(sq) if sq else {}), model_meta(recipe, sq, run.trained)
    summary = {"final_accuracy": final_acc, "total_steps": run.step, "resumed_from_step": run.resumed_from,
               "stages": run.stages, "seconds": round(seconds, 2), "world_size": run.accelerator.num_processes,
               "model": recipe["model"]["name"], "quantizer": recipe["quant"]["name"] if sq else None,
               "activations": (recipe["quant"]["activations"].get("name") if sq else None) or None,
               "bits": bits_label(recipe), "sq_ratio": run.trained[1] if sq else 0.0,
               "distill": dict(recipe["train"]["distill"]) if run.teacher is not None else None,
               **bits}
    final_state = engine.full_state_dict(run.accelerator, run.model)  # collective under DeepSpeed: fp32, consolidated
    if run.accelerator.is_main_process:
        run_dir = recipe["run"]["dir"]
        final_dir = os.path.join(run_dir, "final")
        os.makedirs(final_dir, exist_ok=True)
        save_state_dict(final_state, os.path.join(final_dir, "model.safetensors"))
        write_meta(final_dir, meta)
        tmp = os.path.join(run_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(run_dir, "summary.json"))
        run.tracker.summary(summary)
        run.tracker.close()
        print(f"final top-1 accuracy: {final_acc:.2f}%  ({summary['bits']}, {run.step} steps, run folder {run_dir})")
    run.accelerator.wait_for_everyone()
    return summary
