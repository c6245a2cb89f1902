"""``python -m sqdist.compress``: compress a finished run by product quantization, then fine-tune.

    python -m sqdist.compress RUN OUT.safetensors                      # RUN/final, small blocks
    python -m sqdist.compress RUN/checkpoints/step-N OUT.safetensors --blocks large
    accelerate launch --multi_gpu --num_processes 2 -m sqdist.compress RUN OUT.safetensors
    python -m sqdist.compress RUN OUT2.safetensors --resume OUT.safetensors --finetune-steps 500
    python -m sqdist.compress --check OUT.safetensors
    ... data.batch_size=128 data.root=/data/imagenet                   # recipe overrides (RUN/config.yaml)

The source must be a full-precision run (``quant.enabled: false``): it is both the
network compressed and the teacher of the fine-tuning. Its ``config.yaml`` gives the data
(and any ``section.key=value`` override changes it). Per-layer records (output error after
EM and after the layer's fine-tuning, codebook size, bits per weight) and the fine-tuning
loss go to ``LOG_DIR/metrics.jsonl`` (default ``OUT`` without suffix + ``-compress/``), and
to wandb with ``track.wandb=true``. The written file is read back and its logits compared
with the compressed network's; a difference fails the run.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..config import RecipeError
from ..cli import OneLineParser, report_error  # noqa: F401 (re-exported: their old home)
from ..files import ExportError
from ..runs import load_weights, read_meta, resolve_checkpoint, run_recipe
from .file import CompressError, apply_compressed_, load_compressed, read_compressed, save_compressed
from .layers import compressed_layers, round_codebooks_
from .pq import BLOCKS, MAX_CODEBOOK
from .walk import CompressConfig, broadcast_state_, compress_model, finetune, plan_layers

DEFAULTS = CompressConfig()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sqdist.compress", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="full-precision run folder (uses RUN/final) or checkpoint folder; "
                                  "with --check a compressed file")
    p.add_argument("out", nargs="?", help="the compressed .safetensors file to write")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value (applied to RUN/config.yaml)")
    p.add_argument("--blocks", default=DEFAULTS.blocks, help=f"subvector size: {' or '.join(BLOCKS)} (default small)")
    p.add_argument("--codebook", type=int, metavar="K",
                   help=f"centroids per layer, at most the largest power of two below the layer's subvectors / 4 "
                        f"(default {DEFAULTS.codebook})")
    p.add_argument("--codebook-fc", type=int, metavar="K",
                   help=f"centroids of the classifier, capped likewise (default {DEFAULTS.codebook_fc})")
    p.add_argument("--calib-images", type=int, default=DEFAULTS.calib_images, metavar="N",
                   help=f"training images whose layer inputs fit the codebooks (default {DEFAULTS.calib_images})")
    p.add_argument("--em-iters", type=int, default=DEFAULTS.em_iters, metavar="N",
                   help=f"EM iterations per layer (default {DEFAULTS.em_iters})")
    p.add_argument("--em-sample", type=float, default=DEFAULTS.em_sample, metavar="F",
                   help=f"fraction of the calibration images resampled each EM iteration "
                        f"(default {DEFAULTS.em_sample})")
    p.add_argument("--layer-steps", type=int, default=DEFAULTS.layer_steps, metavar="N",
                   help=f"fine-tuning steps of each layer's codebook (default {DEFAULTS.layer_steps})")
    p.add_argument("--layer-lr", type=float, default=DEFAULTS.layer_lr, help=f"(default {DEFAULTS.layer_lr})")
    p.add_argument("--finetune-steps", type=int, default=DEFAULTS.finetune_steps, metavar="N",
                   help=f"global fine-tuning steps at the end (default {DEFAULTS.finetune_steps})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr,
                   help=f"global fine-tuning LR, cosine (default {DEFAULTS.lr})")
    p.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="re-estimate BN statistics on N batches before each evaluation (default: the run's "
                        "train.bn_recalibrate)")
    p.add_argument("--resume", metavar="FILE",
                   help="a compressed file of this run: skip compression, fine-tune it further")
    p.add_argument("--log-dir", help="where metrics.jsonl goes (default: OUT without suffix + '-compress')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true", help="read a compressed file back, verify it, print a summary")
    return p


def _validate(args) -> CompressConfig:
    if args.blocks not in BLOCKS:
        raise CompressError(f"--blocks={args.blocks!r}; allowed: {', '.join(BLOCKS)}")
    for flag, value in (("--codebook", args.codebook), ("--codebook-fc", args.codebook_fc)):
        if value is not None and not 1 <= value <= MAX_CODEBOOK:
            raise CompressError(f"{flag}={value}; allowed: an integer from 1 to {MAX_CODEBOOK}")
    for flag, value, low in (("--calib-images", args.calib_images, 1), ("--em-iters", args.em_iters, 1),
                             ("--layer-steps", args.layer_steps, 0), ("--finetune-steps", args.finetune_steps, 0)):
        if value < low:
            raise CompressError(f"{flag}={value}; allowed: an integer >= {low}")
    if not 0.0 < args.em_sample <= 1.0:
        raise CompressError(f"--em-sample={args.em_sample}; allowed: a fraction in (0, 1]")
    for flag, value in (("--lr", args.lr), ("--layer-lr", args.layer_lr)):
        if not (value > 0 and math.isfinite(value)):
            raise CompressError(f"{flag}={value}; allowed: a number > 0")
    if args.seed is not None and args.seed < 0:
        raise CompressError(f"--seed={args.seed}; allowed: an integer >= 0")
    if args.bn_recalibrate is not None and args.bn_recalibrate < 0:
        raise CompressError(f"--bn-recalibrate={args.bn_recalibrate}; allowed: an integer >= 0")
    if not str(args.out).endswith(".safetensors"):
        raise CompressError(f"out={args.out!r}; allowed: a path ending in .safetensors")
    return CompressConfig(blocks=args.blocks, codebook=args.codebook or DEFAULTS.codebook,
                          codebook_fc=args.codebook_fc or DEFAULTS.codebook_fc,
                          calib_images=args.calib_images, em_iters=args.em_iters, em_sample=args.em_sample,
                          layer_steps=args.layer_steps, layer_lr=args.layer_lr, finetune_steps=args.finetune_steps,
                          lr=args.lr, seed=0 if args.seed is None else args.seed)


def _recipe(ckpt: Path, meta, overrides: list[str]) -> dict:
    """The run's recipe with ``overrides``; compression is plain fp32 data parallelism whatever engine trained it."""
    recipe = run_recipe(ckpt, meta, overrides)
    recipe["engine"].update(name="ddp", mixed_precision="no", grad_accum=1)
    return recipe


def check(path: str) -> int:
    _, layers, meta = read_compressed(path)
    results = meta["results"]
    top1 = f", top-1 {results['top1']:.2f}%" if isinstance(results.get("top1"), (int, float)) else ""
    bits = sorted({info["bits"] for info in meta["layers"].values()})
    print(f"{path}: ok, {meta['model']['name']} with {len(layers)} compressed layers "
          f"(index bits {'/'.join(map(str, bits))}), {os.path.getsize(path) / 1e6:.3f} MB{top1}")
    return 0


def run(args, on_stage=None) -> int:
    """The command, on every rank. ``on_stage(stage, model)`` is called on every rank after
    compression (``"compressed"``) and at the end (``"final"``)."""
    from ..data import EpochBatches, build_datasets
    from ..train.engine import make_accelerator
    from ..train.tracking import Tracker
    from ..train.evaluation import evaluate, recalibrate_bn

    config = _validate(args)
    ckpt = resolve_checkpoint(args.source)
    meta = read_meta(ckpt)
    if meta.enabled:
        raise CompressError(f"{meta.path}: quant.enabled is true (a low-bit run); compress a full-precision run "
                            f"(quant.enabled: false), e.g. one of recipes/digits_fp.yaml")
    model = load_weights(ckpt, meta, CompressError)
    recipe = _recipe(ckpt, meta, list(args.overrides))
    if args.seed is None:
        config = CompressConfig(**{**config.to_dict(), "seed": recipe["train"]["seed"]})
    bn_batches = recipe["train"]["bn_recalibrate"] if args.bn_recalibrate is None else args.bn_recalibrate
    resumed = read_compressed(args.resume) if args.resume else None
    if resumed is not None and resumed[2]["model"] != {"name": meta.model_name, "kwargs": meta.model_kwargs}:
        raise CompressError(f"--resume={args.resume}: written from {resumed[2]['model']}, not from this run's "
                            f"{meta.model_name} {meta.model_kwargs}")
    if resumed is None:
        largest = max(plan_layers(model, config, None), key=lambda p: p.n, default=None)
        if largest is None:
            raise CompressError(f"{meta.model_name} has no Conv2d/Linear layer besides the stem: "
                                "nothing to compress")
        for flag, k in (("--codebook", args.codebook), ("--codebook-fc", args.codebook_fc)):
            if k is not None and k > largest.n:  # explicitly asked for, and no layer can hold it
                raise CompressError(f"{flag}={k} is above the subvector count of every layer (largest: {largest.name} "
                                    f"with {largest.n} subvectors of {largest.d}); allowed: 1 to {largest.n}")

    accelerator = make_accelerator(recipe)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_set, test_set = build_datasets(recipe)
    if resumed is None and config.calib_images > len(train_set):
        raise CompressError(f"--calib-images={config.calib_images}: the training set has {len(train_set)} images; "
                            f"allowed: 1 to {len(train_set)}")
    batch, workers = recipe["data"]["batch_size"], recipe["data"]["workers"]
    progress = recipe["train"]["progress"] and not args.no_progress
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else out.with_name(out.name[: -len(".safetensors")] + "-compress")
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    tracker = Tracker(str(log_dir), recipe, active=accelerator.is_main_process)
    step = [0]

    def log(metrics: dict) -> None:
        tracker.log(metrics, step[0])
        step[0] += 1

    def bn_then_evaluate(net) -> float:
        if bn_batches:
            batches = EpochBatches(len(train_set), batch, config.seed, rank, world).batches(0)
            recalibrate_bn(net, train_set, batches, device, bn_batches, workers, seed=config.seed)
        return evaluate(net, test_set, recipe, device, rank, world)

    t0 = time.time()
    model.to(device)
    teacher = copy.deepcopy(model).eval()
    top1_fp = evaluate(teacher, test_set, recipe, device, rank, world)
    if resumed is None:
        compress_model(model, train_set, config, device=device, batch_size=batch, teacher=teacher,
                       workers=workers, log=log, progress=progress)
        settings = {**config.to_dict(), "source": str(ckpt), "finetune_steps_total": config.finetune_steps}
    else:
        previous = apply_compressed_(model, args.resume, _read=resumed)
        settings = {**previous["compress"], "source": str(ckpt), "resumed_from": str(args.resume),
                    "finetune_steps_total": previous["compress"].get("finetune_steps_total", 0) + config.finetune_steps,
                    "finetune_steps": config.finetune_steps, "lr": config.lr}
    round_codebooks_(model)
    top1_compressed = bn_then_evaluate(model)
    if on_stage is not None:
        on_stage("compressed", model)
    if config.finetune_steps:
        finetune(model, teacher, train_set, config, device=device, batch_size=batch, workers=workers,
                 log=log, progress=progress)
        top1 = bn_then_evaluate(model)
    else:
        top1 = top1_compressed
    broadcast_state_(model)  # every rank holds exactly what rank 0 writes
    model.eval()
    if on_stage is not None:
        on_stage("final", model)
    results = {"top1_fp": top1_fp, "top1_compressed": top1_compressed, "top1": top1}
    failed = None
    if accelerator.is_main_process:
        info = save_compressed(model, out, model_name=meta.model_name, model_kwargs=meta.model_kwargs,
                               compress=settings, results=results)
        x = torch.stack([test_set[i][0] for i in range(min(len(test_set), recipe["data"]["eval_batch_size"]))])
        with torch.no_grad():
            expected = model(x.to(device)).cpu()
            got = load_compressed(out).to(device)(x.to(device)).cpu()
        diff = float((got - expected).abs().max())
        fp32_bytes = (ckpt / "model.safetensors").stat().st_size
        acc = info["accounting"]
        summary = {**results, "bytes": info["bytes"], "fp32_bytes": fp32_bytes, "ratio": fp32_bytes / info["bytes"],
                   "ratio_paper": acc["ratio"], "reload_max_abs_diff": diff, "layers": len(compressed_layers(model)),
                   "seconds": round(time.time() - t0, 2)}
        tracker.log({f"result/{k}": v for k, v in summary.items()}, step[0])
        tracker.summary(summary)
        tracker.close()
        print(f"compressed {summary['layers']} layers of {meta.model_name} ({settings.get('blocks')} blocks"
              f"{', resumed from ' + str(args.resume) if resumed else ''}): top-1 {top1_fp:.2f}% (fp32) -> "
              f"{top1_compressed:.2f}% (compressed) -> {top1:.2f}% (after {config.finetune_steps} fine-tuning steps)")
        print(f"wrote {out}: {info['bytes'] / 1e6:.3f} MB, {summary['ratio']:.2f}x smaller than the fp32 run file "
              f"({acc['ratio']:.2f}x by the paper's accounting); reload: max |logit difference| {diff:.1e}; "
              f"log {log_dir / 'metrics.jsonl'}")
        if diff != 0.0:
            out.unlink()
            failed = f"the written file's logits differ from the compressed network's by {diff:.3g}; removed {out}"
    accelerator.wait_for_everyone()
    if failed:
        print(f"sqdist.compress: error: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, on_stage=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        if args.check:
            if args.out is not None:
                parser.error("--check takes one file")
            return check(args.source)
        if args.out is None:
            parser.error("the following arguments are required: out")
        return run(args, on_stage=on_stage)
    except (ExportError, RecipeError) as exc:  # CompressError is an ExportError
        return report_error("sqdist.compress", exc)


if __name__ == "__main__":
    sys.exit(main())
