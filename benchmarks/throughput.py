"""Training throughput of FP, plain QAT and SQ on synthetic ImageNet-shaped data.

The same training step (forward, cross-entropy, backward, SGD step; channels_last,
bf16 autocast) for each configuration, one after the other in one process, on
random images and labels that stay on the device (so the data pipeline is not
measured):

- ``fp``:            the float model;
- ``qat``:           every quantizable layer TWN at ratio 1 (plain QAT), fused kernels;
- ``qat_reference``: the same with ``SQDIST_KERNELS=reference``;
- ``sq``:            SQ-TWN at ratio 0.5 (new masks every step), fused kernels;
- ``sq_reference``:  the same with ``SQDIST_KERNELS=reference``.

Each runs ``--warmup`` untimed steps, then ``--steps`` timed ones (synchronized wall
clock); images/s = batch * steps / time. The table gives each configuration's step
time as a multiple of FP's, and SQ's as a multiple of QAT's.

    python benchmarks/throughput.py                                  # resnet50, batch 128, 224x224 (a GPU)
    python benchmarks/throughput.py --json                           # one JSON object
    python benchmarks/throughput.py --device cpu --model resnet18 --batch 4 --image-size 32 --steps 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

CONFIGS = {
    # name: (quantized, SQ ratio, SQDIST_KERNELS)
    "fp": (False, None, "auto"),
    "qat": (True, 1.0, "auto"),
    "qat_reference": (True, 1.0, "reference"),
    "sq": (True, 0.5, "auto"),
    "sq_reference": (True, 0.5, "reference"),
}


def build(name: str, model_name: str, device: torch.device, num_classes: int, seed: int = 0):
    """(model, SQ controller or None) for configuration ``name``, channels_last on ``device``."""
    import timm

    from sqdist import QuantConfig, SQConfig, quantize_model

    quantized, ratio, _ = CONFIGS[name]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=num_classes)
    sq = None
    if quantized:
        sq = quantize_model(model, QuantConfig("twn", sq=SQConfig(ratios=(ratio,), seed=seed)))
    model = model.to(device=device, memory_format=torch.channels_last)
    return model, sq


def run_config(name: str, args, device: torch.device) -> dict:
    """Images/s of one configuration (it sets ``SQDIST_KERNELS`` for its own run)."""
    os.environ["SQDIST_KERNELS"] = CONFIGS[name][2]
    model, sq = build(name, args.model, device, args.num_classes)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    # a few distinct batches, rotated, so no step reads the same input as the last
    xs = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
          .to(device).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    ys = [torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device) for _ in range(2)]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    def step(i: int) -> None:
        if sq is not None:
            sq.draw_masks()  # SQ: errors, draw, (broadcast), new hybrid weights in the forward
        with autocast:
            loss = F.cross_entropy(model(xs[i % 2]), ys[i % 2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    res = {"images_per_s": args.batch * args.steps / seconds, "step_ms": seconds / args.steps * 1e3,
           "kernels": CONFIGS[name][2]}
    if sq is not None:
        res["sq_ratio"] = sq.ratio
        res["quantized_fraction"] = sum(sq.quantized_fraction().values()) / len(sq.layers)
        res["layers"] = len(sq.layers)
    del model, optimizer, xs, ys
    if device.type == "cuda":
        res["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def ratios(results: dict) -> dict:
    """Step-time multiples: every configuration against FP, SQ against QAT (same kernels)."""
    out = {}
    fp = results.get("fp")
    for name, r in results.items():
        if fp and name != "fp" and "step_ms" in r:
            out[f"{name}/fp"] = r["step_ms"] / fp["step_ms"]
    for sq, qat in (("sq", "qat"), ("sq_reference", "qat_reference"), ("sq", "sq_reference")):
        if sq in results and qat in results and "step_ms" in results[sq] and "step_ms" in results[qat]:
            out[f"{sq}/{qat}"] = results[sq]["step_ms"] / results[qat]["step_ms"]
    return out


def table(report: dict) -> str:
    info, results = report["info"], report["results"]
    lines = [f"{info['model']}, batch {info['batch']}, {info['image_size']}x{info['image_size']}, {info['dtype']}, "
             f"channels_last, {info['steps']} steps after {info['warmup']} on {info['device_name']} "
             f"(torch {info['torch']})",
             f"{'config':<15}{'images/s':>10}{'step ms':>10}{'x FP':>8}"]
    fp = results.get("fp", {}).get("step_ms")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<15}  failed: {r['error']}")
            continue
        mult = f"{r['step_ms'] / fp:>7.2f}x" if fp else f"{'-':>8}"
        lines.append(f"{name:<15}{r['images_per_s']:>10.1f}{r['step_ms']:>10.2f}{mult}")
    extra = [f"{k} {v:.3f}x" for k, v in report["ratios"].items() if "/fp" not in k]
    if extra:
        lines.append("step time: " + ", ".join(extra))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--model", default="resnet50", help="a timm model name")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: autocast")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotuning, kernel builds)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        print(f"--configs: {bad or args.configs!r}; allowed: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    for key in ("batch", "image_size", "steps", "num_classes"):
        if getattr(args, key) < 1:
            print(f"--{key.replace('_', '-')}: {getattr(args, key)}; allowed: an integer >= 1", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu with tiny settings)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {}
    for name in names:
        try:
            results[name] = run_config(name, args, device)
        except Exception as exc:  # one failing configuration must not lose the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    os.environ.pop("SQDIST_KERNELS", None)
    from sqdist.quant import kernels

    info = {"model": args.model, "batch": args.batch, "image_size": args.image_size, "dtype": args.dtype,
            "steps": args.steps, "warmup": args.warmup, "device": device.type, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "kernel_backend": kernels.backend_for(torch.empty(0, device=device))}
    report = {"info": info, "results": results, "ratios": ratios(results)}
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
