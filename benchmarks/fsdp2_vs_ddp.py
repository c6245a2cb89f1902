"""Per-step time of FSDP2 (``engine.name=fsdp2``) against DDP on N CPU processes, and the
collectives each step runs, same recipe, one invocation.

    python benchmarks/fsdp2_vs_ddp.py                          # digits SQ-TWN, 2 processes
    python benchmarks/fsdp2_vs_ddp.py --steps 40 --repeats 2 --units block root --json

Each engine trains through ``torchrun --nproc_per_node N -m sqdist.train RECIPE`` (the way a
run takes its steps: data loading, hooks, everything) with ``train.log_every=1``; the step time
comes from the ``time`` stamps of ``RUN/metrics.jsonl`` (the first ``--warmup`` steps and the
intervals holding an evaluation dropped, as in benchmarks/zero_vs_ddp.py). Engines alternate
within each repeat. The collectives are counted in a separate short run per engine under
``torch.profiler`` (the c10d operations it records, DDP's bucketed all-reduce included), over
``--count-steps`` steps after one warm-up step, and given per step.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

from zero_vs_ddp import step_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLLECTIVES = ("allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "reducescatter", "broadcast")


def torchrun(args: list[str], procs: int, port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"fsdp2_vs_ddp: {' '.join(args[-3:])} failed:\n{proc.stderr[-3000:]}")


def count_worker(recipe_path: str, out: str, count_steps: int, overrides: list[str]) -> None:
    """(under torchrun) train 1 + count_steps steps, profiling the last count_steps; rank 0 writes the counts."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from sqdist.config import load_recipe
    from sqdist.train import train

    recipe = load_recipe(recipe_path, [*overrides, f"train.max_steps={1 + count_steps}", "train.progress=false"])
    prof = profile(activities=[ProfilerActivity.CPU])

    def on_step(step, model, sq):
        if step == 1:
            prof.__enter__()
        elif step == 1 + count_steps:
            prof.__exit__(None, None, None)

    train(recipe, on_step=on_step)
    counts = collections.Counter()
    for event in prof.key_averages():
        name = event.key.lower()
        if name.startswith("c10d::") and any(c in name for c in COLLECTIVES):
            counts[event.key] += event.count
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({k: v / count_steps for k, v in sorted(counts.items())}, f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--count-worker":
        count_worker(argv[1], argv[2], int(argv[3]), argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"))
    ap.add_argument("--units", nargs="+", default=["block"], choices=["block", "layer", "root"],
                    help="engine.fsdp_unit values to time (each one an FSDP2 row)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--count-steps", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every engine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    common = ["sq.restart_per_stage=false", *args.override]
    engines = {"ddp": common} | {f"fsdp2-{u}": [*common, "engine.name=fsdp2", f"engine.fsdp_unit={u}"]
                                 for u in args.units}
    times: dict[str, list[float]] = {name: [] for name in engines}
    counts: dict[str, dict] = {}
    port = 29500 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, overrides in engines.items():
                run_dir = os.path.join(tmp, f"{name}-{rep}")
                torchrun(["-m", "sqdist.train", args.recipe, f"run.dir={run_dir}", f"train.max_steps={args.steps}",
                          "train.log_every=1", "train.progress=false", *overrides], args.procs, port)
                times[name] += step_times(run_dir, args.warmup)
        for name, overrides in engines.items():
            out = os.path.join(tmp, f"{name}-counts.json")
            torchrun([os.path.abspath(__file__), "--count-worker", args.recipe, out, str(args.count_steps),
                      f"run.dir={os.path.join(tmp, name + '-count')}", *overrides], args.procs, port)
            with open(out) as f:
                counts[name] = json.load(f)
    ddp = statistics.median(times["ddp"])
    result = {name: {"median_step_s": statistics.median(t), "mean_step_s": statistics.fmean(t), "steps": len(t),
                     "ratio_to_ddp": statistics.median(t) / ddp, "collectives_per_step": counts[name]}
              for name, t in times.items()}
    if args.json:
        print(json.dumps({"recipe": os.path.relpath(args.recipe, ROOT), "processes": args.procs,
                          "overrides": args.override, "engines": result}, indent=1))
        return 0
    print(f"recipe {os.path.relpath(args.recipe, ROOT)}, {args.procs} CPU processes (gloo), {args.steps} steps x "
          f"{args.repeats}, first {args.warmup} dropped{', overrides: ' + ' '.join(args.override) if args.override else ''}\n")
    print("| engine | median step (ms) | mean step (ms) | steps timed | / DDP | collectives per step |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in result.items():
        coll = ", ".join(f"{k.split('::')[-1]} {v:g}" for k, v in r["collectives_per_step"].items()) or "none"
        print(f"| {name} | {1000 * r['median_step_s']:.1f} | {1000 * r['mean_step_s']:.1f} | {r['steps']} | "
              f"{r['ratio_to_ddp']:.2f} | {coll} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
