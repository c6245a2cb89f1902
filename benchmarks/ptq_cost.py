"""What the PTQ walk costs: cached activations (one forward of the calibration set) against the
walk that runs the network up to each layer (one partial forward per layer).

    python benchmarks/ptq_cost.py                                   # resnet18 + resnet50 at 224, 128 images
    python benchmarks/ptq_cost.py --models resnet18 --walks cached,per-layer --images 128 --size 224
    python benchmarks/ptq_cost.py --device cuda                     # on a GPU (peak: CUDA memory allocated)

Each (model, walk) runs in a fresh process with one thread (``OMP_NUM_THREADS=1`` unless set):
``sqdist.ptq.ptq_model`` (GPTQ, k-bit 4, calibration chunks of 32) on random images of the
given size (the cost does not depend on the pixels; random initial weights, 1000 classes).
Reported: the walk's wall time, the forwards of the calibration set it ran (the stem's calls
over the number of chunks; three of those calls are passes over one chunk that find the layers,
their order and which feed a BatchNorm), and the peak memory: the process's peak RSS, and how
much the walk added to the peak RSS before it (on CUDA: the peak memory allocated on the
device). Prints a table and writes ``benchmarks/results/ptq_cost.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(model_name: str, walk: str, images: int, size: int, device: str) -> dict:
    import resource

    import timm
    import torch
    from torch.utils.data import TensorDataset

    from sqdist.ptq import PTQConfig, ptq_model

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000).eval().to(device)
    data = TensorDataset(torch.randn(images, 3, size, size), torch.zeros(images, dtype=torch.long))
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    calls = [0]
    stem.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    records = ptq_model(model, data, PTQConfig(params={"bits": 4}, calib_images=images, cache=walk == "cached",
                                               walk_bn=walk == "cached"), device=device, batch_size=32)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"model": model_name, "walk": records[0]["walk"], "layers": len(records), "seconds": round(seconds, 1),
           "forwards": round(calls[0] / -(-images // 32), 1), "peak_rss_mib": round(peak),
           "walk_added_rss_mib": round(peak - before), "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--walks", default="cached,per-layer")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (model, walk); a slower one is reported so")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ptq_cost.md"))
    p.add_argument("--one", nargs=2, metavar=("MODEL", "WALK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.images, args.size, args.device)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for model in args.models.split(","):
        for walk in args.walks.split(","):
            cmd = [sys.executable, __file__, "--one", model, walk, "--images", str(args.images), "--size",
                   str(args.size), "--device", args.device]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                said = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                    {"model": model, "walk": walk, "error": said}
            except subprocess.TimeoutExpired:
                row = {"model": model, "walk": walk, "error": f"longer than {args.timeout} s"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = [f"# PTQ walk cost ({args.images} images at {args.size}x{args.size}, GPTQ k-bit 4, {args.device})", "",
             f"Command: `python benchmarks/ptq_cost.py --models {args.models} --walks {args.walks} --images "
             f"{args.images} --size {args.size} --device {args.device}`", "",
             "| model | walk | layers | forwards of the calibration set | seconds | peak RSS MiB "
             "| added by the walk MiB" + (" | CUDA peak MiB |" if args.device == "cuda" else " |"),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if args.device == "cuda" else "")]
    for r in rows:
        if "error" in r:
            cuda = " |" if args.device == "cuda" else ""
            lines.append(f"| {r['model']} | {r['walk']} | | | {r['error']} | | |{cuda}")
            continue
        cuda = f" {r['cuda_peak_mib']} |" if args.device == "cuda" else ""
        lines.append(f"| {r['model']} | {r['walk']} | {r['layers']} | {r['forwards']} | {r['seconds']} | "
                     f"{r['peak_rss_mib']} | {r['walk_added_rss_mib']} |{cuda}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
