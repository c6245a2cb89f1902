"""Each Triton kernel against its PyTorch reference, and against the device's memory bandwidth.

Every op runs through sqdist's own API, once with ``SQDIST_KERNELS=triton`` and once with
``SQDIST_KERNELS=reference``, interleaved repeat by repeat on the same tensors; the median is
reported. ``gbps`` is the bytes the op must move at least (each input read once, each output
written once) over the Triton kernel's time, set against ``copy_gbps`` (a 1 GiB device copy, read
plus written, timed the same way): ``of_copy`` is the fraction. Sizes are resnet50-like: a
(2048, 4608) weight (layer4's largest rows times conv2's row length) and LSQ on a (32, 256, 56, 56)
activation.

    python benchmarks/triton_kernels.py                     # a table, on the GPU
    python benchmarks/triton_kernels.py --json --repeats 20
    python benchmarks/triton_kernels.py --device cpu        # tiny sizes in Triton's interpreter: tests the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (Triton compiles in the first)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def ops(torch, device: str, small: bool) -> dict:
    """{name: (function, bytes moved at least)}: the function takes no argument and runs the op once."""
    from sqdist import BWN, KBit, TWN
    from sqdist.quant.kbit_mse import kbit_mse_ratio, kbit_values_at_ratio
    from sqdist.quant.lsq import lsq_quantize
    from sqdist.quant.weights import layer_errors

    g = torch.Generator().manual_seed(0)
    m, n = (48, 300) if small else (2048, 4608)
    act = (2, 4, 8, 8) if small else (32, 256, 56, 56)
    w = (torch.randn(m, n, generator=g) * 0.05).to(device)
    mask = (torch.rand(m, generator=g) < 0.5).to(device)
    ratio = (torch.rand(m, generator=g) * 0.5 + 0.5).to(device)
    x = torch.randn(act, generator=g).to(device)
    grad = torch.randn(act, generator=g).to(device)
    step = torch.tensor([0.05], device=device, requires_grad=True)
    nw, nx = w.numel() * 4, x.numel() * 4

    def sq_step(q):  # the SQ step of one layer: the selection's errors, then the hybrid weight
        def run():
            with torch.no_grad():
                layer_errors([q], [w])
                q.hybrid(w, mask)
        return run

    def lsq_train():
        xs = x.detach().requires_grad_()
        lsq_quantize(xs, step, -8, 7, 1e-3).backward(grad)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    found = {}
    try:  # the ESB plugin's kernel, where the plugin is installed
        import sqdist_esb

        levels = torch.tensor(sqdist_esb.esb_levels(4, 1), device=device)
        kept = sqdist_esb.esb_fit_scale(w, levels)
        found["esb4 levels + refit"] = (lambda: sqdist_esb.esb_codes_refined(w, levels, kept, 1, values=True), 2 * nw)
    except ImportError:
        pass
    return {
        **found,
        "sq_step bwn": (sq_step(BWN()), 3 * nw),  # read W for the errors and the hybrid, write W~
        "sq_step twn": (sq_step(TWN()), 3 * nw),
        "sq_step kbit4 max": (sq_step(KBit(4, scale="max")), 3 * nw),
        "kbit4 mse search": (no_grad(lambda: kbit_mse_ratio(w, 4)), 2 * nw),  # coarse and fine pass
        "kbit4 values at ratio": (lambda: kbit_values_at_ratio(w, ratio, 4), 2 * nw),
        "lsq forward": (no_grad(lambda: lsq_quantize(x, step, -8, 7, 1e-3)), 2 * nx),
        "lsq forward+backward": (lsq_train, 5 * nx),  # x, y; x, dL/dy, dL/dx
    }


def clock(torch, device: str, fn) -> float:
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_gbps(torch, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(clock(torch, "cuda", lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / t / 1e9


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before sqdist's Triton kernels are imported (triton.jit reads it)
    import torch

    from sqdist.quant import kernels

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the interpreter's dry run", file=sys.stderr)
        return 1
    os.environ["SQDIST_KERNELS"] = "triton"
    if kernels.backend_for(torch.zeros(1, device=args.device)) != "triton":
        print("the Triton kernels are unavailable (see the warning above)", file=sys.stderr)
        return 1
    results = {}
    for name, (fn, nbytes) in ops(torch, args.device, small=args.device == "cpu").items():
        times = {"triton": [], "reference": []}
        for i in range(args.warmup + args.repeats):
            for mode in times:
                os.environ["SQDIST_KERNELS"] = mode
                t = clock(torch, args.device, fn)
                if i >= args.warmup:
                    times[mode].append(t)
        tri, ref = statistics.median(times["triton"]), statistics.median(times["reference"])
        results[name] = {"triton_ms": tri * 1e3, "reference_ms": ref * 1e3, "speedup": ref / tri,
                         "bytes": nbytes, "gbps": nbytes / tri / 1e9}
    os.environ.pop("SQDIST_KERNELS")
    info = {"device": args.device, "torch": torch.__version__, "repeats": args.repeats,
            "interpreted": bool(kernels.ops("triton").INTERPRETED)}
    if args.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), copy_gbps=copy_gbps(torch))
        for r in results.values():
            r["of_copy"] = r["gbps"] / info["copy_gbps"]
    if args.json:
        print(json.dumps({"info": info, "ops": results}, indent=1))
        return 0
    print(f"Triton kernels vs PyTorch reference: {json.dumps(info)}")
    print("| op | reference ms | triton ms | speedup | GB/s | of copy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        of_copy = f"{r['of_copy']:.2f}" if "of_copy" in r else "n/a"
        print(f"| {name} | {r['reference_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x | {r['gbps']:.1f} | {of_copy} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
