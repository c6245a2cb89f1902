"""Fused SQ kernels against the PyTorch reference on resnet50's quantized weights.

One "SQ step" is what training does every iteration for every quantized layer:
the errors of all layers (``SQController.errors``, channel granularity) and the
hybrid weight ``where(mask, q(W), W)`` of every layer (a 50% channel mask), both
without autograd. It runs through sqdist's own API, once with
``SQDIST_KERNELS=reference`` and once with the fast path of the device (``SQDIST_KERNELS=cpu``:
the C++ op; ``cuda``: the Triton kernels), in the
same process, interleaved repeat by repeat; the median of the repeats is reported.

On a GPU, ``gbps`` is the bytes the step must move (read W twice: errors and
hybrid; write W~ and the errors) over the kernel step's wall time, and
``device_gbps`` the same bytes over the time the GPU spent in kernels (summed
from the profiler: the step without its launch overhead). Both are set against
``copy_gbps``, a 1 GiB device-to-device ``copy_`` timed with CUDA events
(bytes read plus written; ``of_copy`` and ``device_of_copy`` are the fractions),
and against ``peak_gbps`` from the memory clock and bus width.

    python benchmarks/kernels.py                 # table, CPU (and CUDA when present)
    python benchmarks/kernels.py --json          # one JSON object
    python benchmarks/kernels.py --device cuda --repeats 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from sqdist import QuantConfig, quantize_model
from sqdist.quant import kernels
from sqdist.quant.weights import layer_errors

QUANTIZERS = {"bwn": ("bwn", {}), "twn": ("twn", {}), "kbit4": ("kbit", {"bits": 4, "scale": "max"})}  # max: the fused scale


def resnet50_layers(device: str):
    """(quantizer, weight) of every layer quantize_model quantizes in timm's resnet50."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    sq = quantize_model(model, QuantConfig("bwn"))
    return [layer.weight.detach().to(device) for layer in sq.layers.values()]


def sq_step(quantizers, weights, masks):
    with torch.no_grad():
        errors = layer_errors(quantizers, [w.reshape(w.shape[0], -1) for w in weights])
        hybrids = [q.hybrid(w, m) for q, w, m in zip(quantizers, weights, masks)]
    return errors, hybrids


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(device: str, repeats: int, names: list[str], warmup: int = 3) -> dict:
    from sqdist import create_quantizer

    weights = resnet50_layers(device)
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(w.shape[0], generator=g) < 0.5).to(device) for w in weights]
    numel = sum(w.numel() for w in weights)
    elem = weights[0].element_size()
    rows = sum(w.shape[0] for w in weights)
    moved = numel * elem * 3 + rows * 4  # read W (errors), read W + write W~ (hybrid), write errors
    results = {}
    for name in names:
        kind, params = QUANTIZERS[name]
        quantizers = [create_quantizer(kind, **params).to(device) for _ in weights]
        ref_t, ker_t = [], []
        for _ in range(max(1, warmup)):  # warm-up: the JIT build, and the allocator settling on its big blocks
            for mode in ("reference", device):
                os.environ["SQDIST_KERNELS"] = mode
                sq_step(quantizers, weights, masks)
        if kernels.backend_for(weights[0]) is None:
            raise SystemExit(f"no compiled {device} kernel (see the warning above)")
        for _ in range(repeats):
            for mode, acc in (("reference", ref_t), (device, ker_t)):
                os.environ["SQDIST_KERNELS"] = mode
                acc.append(timed(lambda: sq_step(quantizers, weights, masks), device))
        r, k = statistics.median(ref_t), statistics.median(ker_t)
        res = {"reference_s": r, "kernel_s": k, "speedup": r / k}
        if device == "cuda":
            res["gbps"] = moved / k / 1e9
            os.environ["SQDIST_KERNELS"] = device
            busy = device_seconds(lambda: sq_step(quantizers, weights, masks), repeats)
            if busy:
                res.update(device_s=busy, device_gbps=moved / busy / 1e9)
        results[name] = res
    os.environ["SQDIST_KERNELS"] = "auto"
    info = {"device": device, "layers": len(weights), "weights": numel, "dtype": str(weights[0].dtype),
            "repeats": repeats, "bytes_per_step": moved}
    if device == "cpu":
        info["threads"] = int(kernels.ops("cpu").max_threads())
        info["cpu"] = _cpu_name()
    else:
        props = torch.cuda.get_device_properties(0)
        peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9
        copy = copy_gbps()
        info.update(gpu=props.name, peak_gbps=peak, copy_gbps=copy)
        for res in results.values():
            res.update(peak_gbps=peak, copy_gbps=copy, of_copy=res["gbps"] / copy)
            if "device_gbps" in res:
                res["device_of_copy"] = res["device_gbps"] / copy
    return {"info": info, **results}


def copy_gbps(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9): the median of
    ``repeats`` ``dst.copy_(src)`` of ``nbytes`` (far larger than the L2), timed with CUDA events."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")  # not zeros: real data
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def device_seconds(fn, repeats: int) -> float | None:
    """GPU time per call of ``fn`` spent in kernels and copies (the profiler's device events,
    summed; launch gaps excluded), or None when the profiler gives no device events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return busy_us / 1e6 / repeats if busy_us > 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def table(report: dict) -> str:
    info = report["info"]
    head = f"{info['device']}: resnet50, {info['layers']} layers, {info['weights'] / 1e6:.1f}M {info['dtype']} weights, " \
           f"median of {info['repeats']}"
    if info["device"] == "cpu":
        head += f", {info['threads']} OpenMP threads ({info['cpu']})"
    else:
        head += f", {info['gpu']}, peak {info['peak_gbps']:.0f} GB/s, copy {info['copy_gbps']:.0f} GB/s"
    lines = [head, f"{'quantizer':<10}{'reference ms':>14}{'kernel ms':>11}{'speedup':>9}"
             + (f"{'GB/s':>8}{'of copy':>9}{'busy ms':>9}{'busy GB/s':>11}{'of copy':>9}"
                if info["device"] == "cuda" else "")]
    for name, r in report.items():
        if name == "info":
            continue
        line = f"{name:<10}{r['reference_s'] * 1e3:>14.2f}{r['kernel_s'] * 1e3:>11.2f}{r['speedup']:>8.1f}x"
        if "gbps" in r:
            line += f"{r['gbps']:>8.0f}{r['of_copy']:>9.0%}"
            if "device_gbps" in r:
                line += f"{r['device_s'] * 1e3:>9.3f}{r['device_gbps']:>11.0f}{r['device_of_copy']:>9.0%}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                    help="all: cpu, and cuda when a GPU is present")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per quantizer and mode first")
    ap.add_argument("--quantizers", default="bwn,twn,kbit4", help="comma list of: " + ", ".join(QUANTIZERS))
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.quantizers.split(",") if n.strip()]
    for n in names:
        if n not in QUANTIZERS:
            print(f"--quantizers: {n!r}; allowed: {', '.join(QUANTIZERS)}", file=sys.stderr)
            return 2
    if args.repeats < 1:
        print(f"--repeats: {args.repeats}; allowed: an integer >= 1", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if args.device == "all" and not torch.cuda.is_available():
        devices = ["cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    reports = {d: bench(d, args.repeats, names, args.warmup) for d in devices}
    if args.json:
        # one device: {"info": ..., "<quantizer>": {...}}; both: {"cpu": {...}, "cuda": {...}}
        print(json.dumps(next(iter(reports.values())) if len(reports) == 1 else reports, indent=1))
    else:
        print("\n\n".join(table(r) for r in reports.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
