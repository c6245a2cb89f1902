"""Train a low-bit network with Stochastic Quantization.

    accelerate launch -m sqdist.train recipes/resnet50_twn.yaml data.root=/data/imagenet
    python -m sqdist.train recipes/digits_sq_twn.yaml train.epochs=2

A plain PyTorch loop: every step draws new SQ masks (the same on every rank),
runs forward/backward on the hybrid weights, steps the optimizer, and
advances the SQ schedule. Each SQ stage ends with a top-1 evaluation and a
checkpoint; ``train.resume=auto`` continues bit-exactly from the latest one.

:func:`train` reads top to bottom: :func:`setup` builds everything (and
restores a checkpoint), then the loop calls :func:`train_step`,
:func:`log_step`, :func:`stage_eval` and :func:`save` by name.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from .. import dist as sqdist_dist
from ..config import RecipeError, load_recipe
from ..data import loader
from .build import HOOK_BN_BATCHES, call_hooks, lr_factor, reset_optimizer_state
from .distill import distill_loss
from .evaluation import recalibrate_bn
from .fsdp import backward_sharded_terms, is_dtensor, unsharded
from .run import Run, finish, save, setup, stage_eval


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: new masks and LR at the start of an optimizer step, forward, backward, step."""
    recipe, optimizer = run.recipe, run.optimizer
    if run.batch_in_epoch % recipe["engine"]["grad_accum"] == 0:  # a new optimizer step
        # the quantizers' schedules first: the draw's errors (all layers here under DDP, in each
        # forward under ZeRO-3/FSDP2) then see this step's quantizer, whichever engine draws
        call_hooks(run, "set_progress", run.step, run.total_steps, run.steps_per_epoch)
        if run.sq is not None:
            run.sq.draw_masks()
        for group, base in zip(optimizer.param_groups, run.base_lrs):
            group["lr"] = base * lr_factor(run.step, recipe, run.steps_per_epoch, run.total_steps)
    with run.accelerator.accumulate(run.model):
        logits = run.model(x)
        if run.teacher is None:
            loss = F.cross_entropy(logits, y)
        else:
            with torch.no_grad():
                teacher_logits = run.teacher(x)
            distill = recipe["train"]["distill"]
            loss = distill_loss(logits, teacher_logits, y, distill["weight"], distill["temperature"])
        terms = [t for t in call_hooks(run, "regularization") if t is not None]
        # under FSDP2 a term computed from parameters outside the forward is a DTensor (of shards):
        # its gradient goes straight to the shards, after FSDP's own backward
        sharded = [t for t in terms if is_dtensor(t)]
        terms = [t for t in terms if not is_dtensor(t)]
        if terms:
            loss = loss + torch.stack([t.reshape(()) for t in terms]).sum()
        run.accelerator.backward(loss)
        if sharded:
            loss = loss + backward_sharded_terms(sharded, run.model)
        clip = recipe["engine"]["gradient_clipping"]
        if clip and run.accelerator.sync_gradients:
            run.accelerator.clip_grad_norm_(run.model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logits


def log_step(run: Run, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    # FSDP2: quantizers with metrics read their whole parameters (one all-gather; none without metrics)
    with unsharded(run.model, any(hasattr(m, "metrics") for _, m in run.quantizers)):
        _log_step(run, loss, logits, y)


def _log_step(run: Run, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
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