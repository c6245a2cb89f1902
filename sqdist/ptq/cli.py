"""``python -m sqdist.ptq``: quantize a finished full-precision run without retraining.

    python -m sqdist.ptq RUN OUT.safetensors --bits 3                       # GPTQ, k-bit 3 (mse scale)
    python -m sqdist.ptq RUN OUT.safetensors --bits 3 --method rtn          # round-to-nearest baseline
    python -m sqdist.ptq RUN OUT.safetensors --bits 3 --method adaround     # AdaRound (k-bit, TWN)
    python -m sqdist.ptq RUN OUT.safetensors --quantizer twn --act-order --json
    python -m sqdist.ptq RUN OUT.safetensors --avg-bits 2.5                 # bits per layer (1/2/3/4/8) under a budget
    python -m sqdist.ptq RUN OUT.safetensors --size-budget 60000            # ... of the quantized layers' bytes
    python -m sqdist.ptq RUN OUT.onnx --bits 8                              # ONNX, checked by onnxruntime
    accelerate launch --multi_gpu --num_processes 2 -m sqdist.ptq RUN OUT.safetensors --bits 4
    ... data.batch_size=128 data.root=/data/imagenet                        # recipe overrides (RUN/config.yaml)

The source is a full-precision run (``quant.enabled: false``) or one of its checkpoints. Every
Conv2d/Linear layer except the stem conv and the classifier is quantized in execution order,
each on the inputs of the partly quantized network (``--calib-images`` training images), then
the BatchNorm statistics are re-estimated on the run's training data and the network is
evaluated on the run's test split. The output is the packed file ``python -m sqdist.export``
writes for a trained run (``sqdist.load_quantized`` reads it; ``--keep-fp-bits 8`` stores the
stem and classifier at 8 bits), read back and compared with the quantized network's logits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..cli import OneLineParser, report_error
from ..config import RecipeError
from ..export import ExportError, check_keep_fp_bits, export_model, load_quantized
from ..files import one_line
from ..runs import load_weights, read_meta, resolve_checkpoint, run_recipe
from .gptq import METHODS
from .budget import layer_bytes
from .walk import MIXED, QUANTIZERS, PTQConfig, ptq_model

DEFAULTS = PTQConfig()
BITS = {"kbit": (2, 8), "twn": (2, 2), "bwn": (1, 1)}
HESSIANS = ("centred", "plain")


class PTQError(ExportError):
    """A PTQ input the user can fix; the message is one line."""


class _Parser(OneLineParser):
    """An unknown flag's line also names the options each method takes (``--adaround-lr`` is not one)."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message += "; the methods' options: " + "; ".join(
                f"{method} {', '.join(flag for flag, _ in options)}"
                for method, options in (("gptq", GPTQ_OPTIONS), ("adaround", ADAROUND_OPTIONS)))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sqdist.ptq", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="full-precision run folder (uses RUN/final) or checkpoint folder")
    p.add_argument("out", help="the packed .safetensors file (or .onnx graph) to write")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value (applied to RUN/config.yaml)")
    p.add_argument("--quantizer", default="kbit", help=f"{', '.join(QUANTIZERS)} (default kbit, mse scale)")
    p.add_argument("--bits", type=int, default=None,
                   help="kbit: 2 to 8 (default 4); twn: 2; bwn: 1 (the default of each)")
    p.add_argument("--method", default=DEFAULTS.method, help=f"{' or '.join(METHODS)} (default gptq)")
    p.add_argument("--calib-images", type=int, default=DEFAULTS.calib_images, metavar="N",
                   help=f"training images whose layer inputs make the Hessians (default {DEFAULTS.calib_images})")
    p.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="choose each layer's bits (1 = BWN's grid, 2, 3, 4, 8 k-bit) for an average of B bits per "
                        "weight of the quantized layers (their codes and scales in the file), minimising the summed "
                        "sensitivity (a knapsack; sqdist.ptq.budget); --quantizer kbit, without --bits")
    p.add_argument("--size-budget", type=int, default=None, metavar="BYTES",
                   help="as --avg-bits, for a budget of BYTES bytes of the quantized layers' codes and scales")
    p.add_argument("--damp", type=float, default=None,
                   help=f"GPTQ dampening, a fraction of the mean Hessian diagonal (default {DEFAULTS.damp})")
    p.add_argument("--block", type=int, default=None, help=f"GPTQ columns per lazy update (default {DEFAULTS.block})")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by decreasing Hessian diagonal (default: on)")
    p.add_argument("--adaround-iters", type=int, default=None, metavar="N",
                   help=f"AdaRound: Adam steps per layer (default {DEFAULTS.adaround_iters})")
    p.add_argument("--adaround-reg", type=float, default=None, metavar="LAMBDA",
                   help=f"AdaRound: the rounding regulariser's weight (default {DEFAULTS.adaround_reg}, the paper's)")
    p.add_argument("--hessian", default="centred", help="centred (default): (X - mean)^T (X - mean) for a layer "
                                                        "whose output goes into a BatchNorm, X^T X otherwise; "
                                                        "plain: X^T X everywhere")
    p.add_argument("--no-walk-bn", action="store_true", help="do not re-estimate each BatchNorm from the calibration "
                                                             "inputs as the walk reaches it (done by default where "
                                                             "the walk runs on cached activations)")
    p.add_argument("--no-cache", action="store_true", help="run the network up to each layer (one partial forward "
                                                           "per layer, one chunk's memory) instead of one forward "
                                                           "over cached activations")
    p.add_argument("--seed", type=int, default=None, help="calibration images (default: the run's train.seed)")
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="re-estimate BN statistics on N training batches after quantizing (default: the run's "
                        "train.bn_recalibrate, 10 when that is 0)")
    p.add_argument("--keep-fp-bits", default="32", metavar="{8,32}",
                   help="store the full-precision layers (stem, classifier) as 8-bit per-row codes, or as they "
                        "are (32, the default)")
    p.add_argument("--json", action="store_true", help="print one JSON object (method, bits, top1, "
                                                       "layer_output_error, ...) instead of the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _validate(args) -> tuple[PTQConfig, int]:
    import sqdist

    _method_options(args)
    if args.quantizer not in QUANTIZERS:
        extra = " (registered, but without a fixed per-row grid)" if args.quantizer in sqdist.list_quantizers() else ""
        raise PTQError(f"--quantizer={args.quantizer!r}{extra}; allowed: {', '.join(QUANTIZERS)}")
    budget = _budget(args)
    low, high = BITS[args.quantizer]
    bits = (4 if args.quantizer == "kbit" else low) if args.bits is None else args.bits
    if not low <= bits <= high:
        allowed = f"an integer from {low} to {high}" if low < high else f"{low}"
        raise PTQError(f"--bits={bits} with --quantizer {args.quantizer}; allowed: {allowed}")
    if args.method not in METHODS:
        raise PTQError(f"--method={args.method!r}; allowed: {', '.join(METHODS)}")
    if args.hessian not in HESSIANS:
        raise PTQError(f"--hessian={args.hessian!r}; allowed: {', '.join(HESSIANS)}")
    if args.method == "adaround" and args.quantizer == "bwn":
        raise PTQError("--method adaround with --quantizer bwn (no zero code to round to); allowed: kbit, twn")
    for flag, value in (("--calib-images", args.calib_images), ("--block", args.block),
                        ("--adaround-iters", args.adaround_iters)):
        if value < 1:
            raise PTQError(f"{flag}={value}; allowed: an integer >= 1")
    if not (args.damp > 0 and math.isfinite(args.damp)):
        raise PTQError(f"--damp={args.damp}; allowed: a number > 0 (0.01 in the paper)")
    if not (args.adaround_reg > 0 and math.isfinite(args.adaround_reg)):
        raise PTQError(f"--adaround-reg={args.adaround_reg}; allowed: a number > 0 (0.01 in the paper)")
    for flag, value in (("--seed", args.seed), ("--bn-recalibrate", args.bn_recalibrate)):
        if value is not None and value < 0:
            raise PTQError(f"{flag}={value}; allowed: an integer >= 0")
    if not str(args.out).endswith((".safetensors", ".onnx")):
        raise PTQError(f"out={args.out!r}; allowed: a path ending in .safetensors or .onnx")
    keep_fp_bits = check_keep_fp_bits(args.keep_fp_bits, "--keep-fp-bits")
    params = {"bits": bits} if args.quantizer == "kbit" else {}
    return PTQConfig(quantizer=args.quantizer, params=params, method=args.method, calib_images=args.calib_images,
                     damp=args.damp, block=args.block, act_order=args.act_order,
                     seed=0 if args.seed is None else args.seed, centred=args.hessian == "centred",
                     walk_bn=not args.no_walk_bn, cache=not args.no_cache, adaround_iters=args.adaround_iters,
                     adaround_reg=args.adaround_reg, **budget), keep_fp_bits


GPTQ_OPTIONS = (("--damp", "damp"), ("--block", "block"), ("--act-order", "act_order"))
ADAROUND_OPTIONS = (("--adaround-iters", "adaround_iters"), ("--adaround-reg", "adaround_reg"))


def _method_options(args) -> None:
    """An option of another method than ``--method``'s is refused (it would be ignored); the
    others get their defaults."""
    mine = {"gptq": GPTQ_OPTIONS, "adaround": ADAROUND_OPTIONS}.get(args.method, ())
    budget = args.avg_bits is not None or args.size_budget is not None
    for flag, key in (*GPTQ_OPTIONS, *ADAROUND_OPTIONS):
        if getattr(args, key) is None:
            setattr(args, key, getattr(DEFAULTS, key))
        elif (flag, key) not in mine and not (budget and args.method == "adaround" and (flag, key) in GPTQ_OPTIONS):
            allowed = ", ".join(f for f, _ in mine) or "none of GPTQ's or AdaRound's options"
            raise PTQError(f"{flag} with --method {args.method} (it would be ignored); allowed with --method "
                           f"{args.method}: {allowed}")


def _budget(args) -> dict:
    """``avg_bits`` / ``size_budget`` of PTQConfig from ``--avg-bits`` / ``--size-budget``, checked."""
    if args.avg_bits is None and args.size_budget is None:
        return {}
    if args.avg_bits is not None and args.size_budget is not None:
        raise PTQError(f"--avg-bits={args.avg_bits} with --size-budget={args.size_budget}; allowed: one of them")
    flag = "--avg-bits" if args.avg_bits is not None else "--size-budget"
    if args.avg_bits is not None and not (args.avg_bits > 0 and math.isfinite(args.avg_bits)):
        raise PTQError(f"--avg-bits={args.avg_bits}; allowed: a number > 0 (bits per weight, e.g. 2.5)")
    if args.size_budget is not None and args.size_budget < 1:
        raise PTQError(f"--size-budget={args.size_budget}; allowed: an integer >= 1 (bytes)")
    if args.quantizer != "kbit":
        raise PTQError(f"{flag} with --quantizer {args.quantizer}; allowed: --quantizer kbit (each layer gets 1 bit, "
                       f"BWN's grid, or 2, 3, 4, 8 bits k-bit)")
    if args.bits is not None:
        raise PTQError(f"--bits={args.bits} with {flag} (each layer's bits are chosen); allowed: omit --bits")
    return {"avg_bits": args.avg_bits, "size_budget": args.size_budget}


def run(args, on_stage=None) -> int:
    """The command, on every rank. ``on_stage("final", model)`` is called on every rank with the
    quantized network (BN re-estimated) before rank 0 writes it."""
    from ..data import EpochBatches, build_datasets
    from ..train.engine import make_accelerator
    from ..train import evaluate, recalibrate_bn

    config, keep_fp_bits = _validate(args)
    ckpt = resolve_checkpoint(args.source)
    meta = read_meta(ckpt)
    if meta.enabled:
        raise PTQError(f"{meta.path}: quant.enabled is true (a low-bit run); quantize a full-precision run "
                       f"(quant.enabled: false), e.g. one of recipes/digits_fp.yaml")
    model = load_weights(ckpt, meta, PTQError)
    recipe = run_recipe(ckpt, meta, list(args.overrides))
    # quantization is plain fp32 data parallelism whatever engine trained the run
    recipe["engine"].update(name="ddp", mixed_precision="no", grad_accum=1)
    if args.seed is None:
        config = PTQConfig(**{**config.to_dict(), "seed": recipe["train"]["seed"]})
    bn_batches = args.bn_recalibrate if args.bn_recalibrate is not None else (recipe["train"]["bn_recalibrate"] or 10)

    accelerator = make_accelerator(recipe)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_set, test_set = build_datasets(recipe)
    if config.calib_images > len(train_set):
        raise PTQError(f"--calib-images={config.calib_images}: the training set has {len(train_set)} images; "
                       f"allowed: 1 to {len(train_set)}")
    batch, workers = recipe["data"]["batch_size"], recipe["data"]["workers"]
    t0 = time.time()
    model.to(device)
    top1_fp = evaluate(model, test_set, recipe, device, rank, world)
    try:
        records = ptq_model(model, train_set, config, device=device, batch_size=batch, workers=workers,
                            progress=recipe["train"]["progress"] and not args.no_progress and not args.json)
    except ValueError as exc:  # nothing to quantize in this architecture
        raise PTQError(f"{meta.model_name}: {one_line(exc)}") from None
    if bn_batches:
        batches = EpochBatches(len(train_set), batch, config.seed, rank, world).batches(0)
        recalibrate_bn(model, train_set, batches, device, bn_batches, workers, seed=config.seed)
    top1 = evaluate(model, test_set, recipe, device, rank, world)
    model.eval()
    if on_stage is not None:
        on_stage("final", model)
    errors = {r["layer"]: r["output_error"] for r in records}
    settings = {**config.to_dict(), "source": str(ckpt), "bn_recalibrate": bn_batches,
                "walk": records[0]["walk"], "walk_bn": records[0]["walk_bn"]}
    budgeted = config.avg_bits is not None or config.size_budget is not None
    bits = {r["layer"]: r["bits"] for r in records} if budgeted else model_bits(model)
    summary = {"method": config.method, "quantizer": MIXED if budgeted else config.quantizer, "bits": bits,
               "top1": top1, "top1_fp": top1_fp, "layer_output_error": errors,
               "layer_output_error_sum": sum(errors.values()), "settings": settings}
    if budgeted:
        layers = dict(model.named_modules())
        coded = sum(layer_bytes(layers[r["layer"]], r["bits"]) for r in records)
        weights = sum(layers[r["layer"]].weight.numel() for r in records)
        summary.update(budget_bytes=config.budget_bytes([layers[r["layer"]] for r in records]), quantized_bytes=coded,
                       avg_bits=8 * coded / weights, sensitivity={r["layer"]: r["sensitivity"] for r in records})
    if config.method != "rtn":
        summary["layer_output_error_rtn"] = {r["layer"]: r["output_error_rtn"] for r in records}
    failed = None
    if accelerator.is_main_process:
        out = Path(args.out)
        sq = {"ptq": {**settings, "top1": top1}}
        x = torch.stack([test_set[i][0] for i in range(min(len(test_set), recipe["data"]["eval_batch_size"]))])
        if out.suffix == ".onnx":
            from ..export import export_onnx
            from ..export.onnx_writer import default_input_size

            info = export_onnx(model, out, input_size=default_input_size(model, recipe), keep_fp_bits=keep_fp_bits,
                               metadata={"ptq": sq["ptq"]})
            diff = info["max_abs_diff"]
        else:
            info = export_model(model, out, model_name=meta.model_name, model_kwargs=meta.model_kwargs,
                                sq_ratio=1.0, sq=sq, keep_fp_bits=keep_fp_bits)
            with torch.no_grad():
                expected = model(x.to(device)).cpu()
                got = load_quantized(out, device)(x.to(device)).cpu()
            diff = float((got - expected).abs().max())
            if keep_fp_bits == 32 and diff != 0.0:
                out.unlink()
                failed = f"the written file's logits differ from the quantized network's by {diff:.3g}; removed {out}"
        summary.update(path=str(out), bytes=info["bytes"], reload_max_abs_diff=diff,
                       seconds=round(time.time() - t0, 2))
        if args.json:
            print(json.dumps(summary))
        else:
            shown = (f"{summary['avg_bits']:.3f} bits per weight ({_counts(bits)})" if budgeted
                     else f"{config.quantizer} {bits} bit(s)")
            print(f"{config.method} {shown}, {len(records)} layers of "
                  f"{meta.model_name}: top-1 {top1_fp:.2f}% (fp32) -> {top1:.2f}%; summed layer output error "
                  f"{summary['layer_output_error_sum']:.4f}")
            print(f"wrote {out}: {info['bytes'] / 1e6:.3f} MB; reload: max |logit difference| {diff}")
    accelerator.wait_for_everyone()
    if failed:
        print(f"sqdist.ptq: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _counts(bits: dict) -> str:
    """``{layer: bits}`` as ``"3 x 1 bit, 5 x 2 bits"``."""
    counts = {b: list(bits.values()).count(b) for b in sorted(set(bits.values()))}
    return ", ".join(f"{n} x {b} bit{'s' if b > 1 else ''}" for b, n in counts.items())


def model_bits(model) -> int:
    """The bits of the model's quantized layers (one quantizer)."""
    from ..nn import SQLayer

    return next(m.quantizer.bits for m in model.modules() if isinstance(m, SQLayer))


def main(argv: list[str] | None = None, on_stage=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        return run(args, on_stage=on_stage)
    except (ExportError, RecipeError) as exc:  # PTQError is an ExportError
        return report_error("sqdist.ptq", exc)


if __name__ == "__main__":
    sys.exit(main())
