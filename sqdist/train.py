"""Train a low-bit network with Stochastic Quantization.

    accelerate launch -m sqdist.train recipes/resnet50_twn.yaml data.root=/data/imagenet
    python -m sqdist.train recipes/digits_sq_twn.yaml train.epochs=2

A plain PyTorch loop: every step draws new SQ masks (rank 0's, broadcast),
runs forward/backward on the hybrid weights, steps the optimizer, and
advances the SQ schedule. Each SQ stage ends with a top-1 evaluation and a
checkpoint; ``train.resume=auto`` continues bit-exactly from the latest one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__
from . import dist as sqdist_dist
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_state_dict
from .config import RecipeError, dump_recipe, load_recipe
from .data import EpochBatches, build_datasets, eval_loader, loader
from .nn import QuantConfig, SQController, quantize_model
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
    controller = quantize_model(model, QuantConfig(
        quantizer=q["name"], params=dict(q["params"]), include=tuple(q["include"]), exclude=tuple(q["exclude"]),
        keep_stem_and_classifier=q["keep_stem_and_classifier"], sq=sq_config, broadcast=s["broadcast"],
        draw_in_forward=recipe["engine"]["name"] == "deepspeed" and recipe["engine"]["zero_stage"] == 3))
    return model, controller


def model_meta(recipe: dict, controller: SQController | None) -> dict:
    """What export and evaluation need to rebuild the model from a checkpoint."""
    q = recipe["quant"]
    return {
        "model": {"name": recipe["model"]["name"], "kwargs": recipe["model"]["kwargs"]},
        "quant": {"enabled": controller is not None, "name": q["name"], "params": q["params"],
                  "layers": list(controller.layers) if controller else []},
        "sq": {"ratio": controller.ratio if controller else 0.0, "stage": controller.stage if controller else 0},
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


def reset_optimizer_state(optimizer) -> None:
    """Forget momentum / Adam moments: the next SQ stage starts as a fresh run."""
    getattr(optimizer, "optimizer", optimizer).state.clear()  # Accelerate wraps the torch optimizer


def set_bn_train_only(model: torch.nn.Module) -> None:
    """Train mode for BatchNorm only: SQ layers use their fully quantized weights."""
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()


@torch.no_grad()
def recalibrate_bn(model, dataset, batches, device, n_batches: int) -> None:
    """Re-estimate BN statistics under the quantized weights (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    set_bn_train_only(model)
    for x, _ in list(loader(dataset, batches))[:n_batches]:
        model(x.to(device))
    for m in bns:
        m.momentum = 0.1


@torch.no_grad()
def evaluate(model, dataset, recipe: dict, device, rank: int, world: int) -> float:
    """Top-1 accuracy (%) over the whole test set, summed across ranks."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in eval_loader(dataset, recipe["data"]["eval_batch_size"], rank, world, recipe["data"]["workers"]):
        pred = model(x.to(device)).argmax(dim=1)
        correct[0] += (pred == y.to(device)).sum()
        correct[1] += y.numel()
    if sqdist_dist.is_distributed():
        torch.distributed.all_reduce(correct)
    return float(100.0 * correct[0] / correct[1])


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------- the run
def train(recipe: dict, on_step=None) -> dict:
    """Run the recipe; returns the summary (also written to RUN/summary.json on rank 0).

    ``on_step(step, model, controller)``, if given, is called after every optimizer
    step on every rank (``model`` unwrapped; ``controller`` None for a float run).
    """
    from . import engine
    from . import preempt

    accelerator = engine.make_accelerator(recipe)  # may update recipe["engine"] from engine.config
    deepspeed = engine.is_deepspeed(accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    run_dir, tcfg = recipe["run"]["dir"], recipe["train"]
    if main:
        os.makedirs(run_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(run_dir, "config.yaml"))
    accelerator.wait_for_everyone()

    torch.manual_seed(tcfg["seed"] + rank)
    train_set, test_set = build_datasets(recipe)
    model, sq = build_model(recipe, rank)
    model.to(device)

    from timm.optim import create_optimizer_v2

    o = recipe["optim"]
    opt_kwargs = {"momentum": o["momentum"]} if o["name"] in ("sgd", "momentum", "nesterov") else {}
    optimizer = create_optimizer_v2(model, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"], **opt_kwargs)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    grad_accum = recipe["engine"]["grad_accum"]
    sampler = EpochBatches(len(train_set), recipe["data"]["batch_size"], tcfg["seed"], rank, world)
    steps_per_epoch = len(sampler) // grad_accum
    if steps_per_epoch < 1:
        raise RecipeError(f"data.batch_size={recipe['data']['batch_size']!r}: larger than this process's share of the training set ({len(train_set) // world} samples)")
    total_steps = tcfg["epochs"] * steps_per_epoch
    if tcfg["max_steps"]:
        total_steps = min(total_steps, tcfg["max_steps"])

    # ---- resume
    step, epoch, batch_in_epoch, resumed_from, stages = 0, 0, 0, None, []
    ckpt = tcfg["resume"]
    ckpt = latest_checkpoint(run_dir) if ckpt == "auto" else (None if ckpt == "none" else ckpt)
    if ckpt is not None:
        state = load_checkpoint(ckpt, rank)
        if not deepspeed:  # DeepSpeed restores model and optimizer shards after prepare
            model.load_state_dict(state["model"])
            if state["optimizer"] is not None:
                optimizer.load_state_dict(state["optimizer"])
        rs = state["rank_state"]
        step, epoch, batch_in_epoch, stages = rs["step"], rs["epoch"], rs["batch_in_epoch"], list(rs["stages"])
        if sq is not None:
            sq.load_state_dict(rs["sq"])
        _set_rng_state(rs["rng"])
        resumed_from = step

    model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed:
        engine.cast_inputs_to_model_dtype(accelerator.unwrap_model(model))
        if ckpt is not None:
            engine.load_engine_state(model, ckpt)
    tracker = Tracker(run_dir, recipe, active=main)
    handler = preempt.install()

    def checkpoint() -> None:
        if deepspeed:  # model: consolidated fp32 (collective); model + optimizer shards: DeepSpeed's own format
            engine.broadcast_buffers(accelerator.unwrap_model(model))
            model_state, optimizer_state = engine.full_state_dict(accelerator, model), None
            write_extra = lambda folder: engine.save_engine_state(model, folder)  # noqa: E731
        else:
            model_state, optimizer_state = accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()
            write_extra = None
        save_checkpoint(run_dir, step, model_state=model_state, optimizer_state=optimizer_state,
                        meta=model_meta(recipe, sq), rank=rank, write_extra=write_extra,
                        rank_state={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "stages": stages,
                                    "sq": sq.state_dict() if sq else {}, "rng": _rng_state()})

    def stage_eval(label: str, stage: int, ratio: float) -> float:
        net = accelerator.unwrap_model(model)
        if deepspeed:  # DeepSpeed leaves BN statistics per rank: evaluate rank 0's everywhere
            engine.broadcast_buffers(net)
        if tcfg["bn_recalibrate"] and sq is not None:
            recalibrate_bn(net, train_set, sampler.batches(0), device, tcfg["bn_recalibrate"])
        acc = evaluate(net, test_set, recipe, device, rank, world)
        model.train()
        stages.append({"stage": stage, "ratio": ratio, "step": step,
                       "epoch": epoch, "label": label, "top1": acc})
        tracker.log({"eval/top1": acc, "sq/stage": stages[-1]["stage"]}, step)
        return acc

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (main and tcfg["progress"]), desc="train", dynamic_ncols=True)
    model.train()
    usable = len(sampler) - len(sampler) % grad_accum  # whole optimizer steps per epoch
    preempted, t0 = False, time.time()
    while step < total_steps and not preempted:
        batches = sampler.batches(epoch)[batch_in_epoch:usable]
        for x, y in loader(train_set, batches, recipe["data"]["workers"]):
            x, y = x.to(device), y.to(device)
            if batch_in_epoch % grad_accum == 0:  # a new optimizer step: new masks, new lr
                if sq is not None:
                    sq.draw_masks()
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_factor(step, recipe, steps_per_epoch, total_steps)
            with accelerator.accumulate(model):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                accelerator.backward(loss)
                if recipe["engine"]["gradient_clipping"] and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), recipe["engine"]["gradient_clipping"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            if batch_in_epoch % grad_accum:
                continue
            step += 1
            bar.update(1)
            ended = (sq.stage, sq.ratio) if sq is not None else (0, 0.0)  # the stage this step belonged to
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(model), sq)
            new_stage = sq.advance("step") if sq is not None else False
            if step % tcfg["log_every"] == 0 or step == total_steps:
                metrics = {"train/loss": loss.item(), "train/acc": float((logits.argmax(1) == y).float().mean() * 100),
                           "lr": optimizer.param_groups[0]["lr"], "epoch": epoch}
                if sq is not None:
                    fractions = sq.quantized_fraction()
                    metrics.update({"sq/ratio": sq.ratio, "sq/stage": sq.stage,
                                    "sq/quantized_fraction": sum(fractions.values()) / len(fractions),
                                    **{f"sq/error/{k}": v for k, v in sq.mean_errors().items()},
                                    **{f"sq/quantized/{k}": v for k, v in fractions.items()}})
                tracker.log(metrics, step)
                bar.set_postfix(loss=f"{loss.item():.3f}", ratio=sq.ratio if sq else 0.0)
            if batch_in_epoch == usable:  # the epoch is done: count it before any checkpoint
                epoch, batch_in_epoch = epoch + 1, 0
                new_stage = (sq.advance("epoch") if sq is not None else False) or new_stage
            if new_stage:
                stage_eval("stage-end", *ended)
                if recipe["sq"]["restart_per_stage"]:
                    reset_optimizer_state(optimizer)
                checkpoint()
            elif tcfg["checkpoint_every"] and step % tcfg["checkpoint_every"] == 0:
                checkpoint()
            if _any_rank(handler.requested, device):
                checkpoint()
                preempted = True
            if preempted or step >= total_steps or batch_in_epoch == 0:
                break
    bar.close()

    if preempted:
        if main:
            tracker.log({"event": "preempted"}, step)
            tracker.close()
            preempt.requeue()
        accelerator.wait_for_everyone()
        return {"preempted": True, "total_steps": step}

    final_acc = stage_eval("final", sq.stage if sq else 0, sq.ratio if sq else 0.0)
    checkpoint()
    summary = {"final_accuracy": final_acc, "total_steps": step, "resumed_from_step": resumed_from,
               "stages": stages, "seconds": round(time.time() - t0, 2), "world_size": world,
               "model": recipe["model"]["name"], "quantizer": recipe["quant"]["name"] if sq else None,
               "sq_ratio": sq.ratio if sq else 0.0}
    final_state = engine.full_state_dict(accelerator, model)  # collective under DeepSpeed: fp32, consolidated
    if main:
        final_dir = os.path.join(run_dir, "final")
        os.makedirs(final_dir, exist_ok=True)
        save_state_dict(final_state, os.path.join(final_dir, "model.safetensors"))
        with open(os.path.join(final_dir, "meta.json"), "w") as f:
            json.dump(model_meta(recipe, sq), f, indent=1)
        tmp = os.path.join(run_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(run_dir, "summary.json"))
        tracker.summary(summary)
        tracker.close()
        print(f"final top-1 accuracy: {final_acc:.2f}%  ({step} steps, run folder {run_dir})")
    accelerator.wait_for_everyone()
    return summary


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
