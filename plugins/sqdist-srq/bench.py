"""Time one training step of SRQ against full precision (timm resnet18, 10 classes, 32x32, batch 64).

    python plugins/sqdist-srq/bench.py [--threads 2] [--rounds 5] [--profile srq_w3a3]

Prints, per configuration, the median step time over interleaved rounds (forward, backward, SGD
step), its ratio to full precision measured in the same run, and the growth of the process's peak
resident memory (``ru_maxrss``) over the configuration's first steps (configurations run in the order
listed; a later one only shows memory beyond the earlier peaks). The quantized configurations are
those of ``recipes/digits_srq_w2a2.yaml`` at W3A3 and ``recipes/digits_srq_learned_bits.yaml``.
With ``--reference`` the quantized configurations also run on the full-grid reference
(``SQDIST_SRQ_KERNEL=reference``: the implementation before the fast path), as ``<config>_ref``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import sqdist

IMPLEMENTATION = os.environ.get("SQDIST_SRQ_KERNEL", "auto")
CONFIGS = {
    "fp": None,
    "srq_w3a3": sqdist.QuantConfig(quantizer="srq", params={"bits": 3}, activations="srq",
                                   activation_params={"bits": 3}, sq=sqdist.SQConfig(ratios=(1.0,))),
    "srq_learned": sqdist.QuantConfig(quantizer="srq", params={"bits": 4, "learn_bits": True, "min_bits": 2,
                                                               "bit_reg": 1.0, "target_bits": 3.0},
                                      activations="srq", activation_params={"bits": 4},
                                      sq=sqdist.SQConfig(ratios=(1.0,))),
}


def build(name: str, x: torch.Tensor):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    sq = None
    if CONFIGS[name.removesuffix("_ref")] is not None:
        sq = sqdist.quantize_model(model, CONFIGS[name.removesuffix("_ref")])
        sqdist.calibrate_activations(model, x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    quantizers = [m for m in model.modules() if hasattr(m, "regularization")]
    return model, sq, opt, quantizers


def step(name, model, sq, opt, quantizers, x, y, i):
    os.environ["SQDIST_SRQ_KERNEL"] = "reference" if name.endswith("_ref") else IMPLEMENTATION
    if sq is not None:
        sq.draw_masks()
        for q in quantizers:
            q.set_progress(i, 1000, 100)
    loss = F.cross_entropy(model(x), y)
    terms = [t for t in (q.regularization() for q in quantizers) if t is not None]
    if terms:
        loss = loss + sum(t.sum() for t in terms)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--reference", action="store_true", help="also the quantized configurations on the reference")
    ap.add_argument("--profile", default=None, help="a configuration to profile (torch.profiler, one step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    names = args.configs.split(",")
    if args.reference:
        names += [f"{n}_ref" for n in names if CONFIGS[n] is not None]
    runs, memory = {}, {}
    for name in names:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runs[name] = build(name, x)
        step(name, *runs[name], x, y, 0)  # warm-up (and the compiled kernel's build or load)
        memory[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step(args.profile, *runs[args.profile], x, y, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.profile, *runs[args.profile], x, y, 2)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(name, *runs[name], x, y, 1 + r * args.steps + i)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["fp"]) if "fp" in times else None
    print(f"resnet18 32x32 batch 64, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'config':<14}{'step ms':>10}{'x FP':>8}{'peak RSS +MiB':>16}")
    for name in names:
        t = statistics.median(times[name])
        ratio = f"{t / base:.2f}" if base else "-"
        print(f"{name:<14}{t * 1e3:>10.1f}{ratio:>8}{memory[name]:>16.0f}")


if __name__ == "__main__":
    main()
