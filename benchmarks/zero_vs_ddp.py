"""Per-step time of DeepSpeed ZeRO against DDP, same recipe, same processes, one invocation.

    python benchmarks/zero_vs_ddp.py                         # digits SQ-TWN, 2 processes, ZeRO-2
    python benchmarks/zero_vs_ddp.py --stages 1 2 3 --steps 40 --repeats 2 --json
    python benchmarks/zero_vs_ddp.py --stages 3 --override quant.enabled=false   # the engines without SQ

Each engine runs ``accelerate launch --multi_gpu --num_processes N -m sqdist.train
RECIPE`` for ``--steps`` optimizer steps with ``train.log_every=1``; the step time
is read from the ``time`` stamps in ``RUN/metrics.jsonl``, dropping the first
``--warmup`` steps and any interval that holds a stage-end evaluation. Engines
alternate within each repeat so that load from other work on the machine hits
them alike. The table gives the median step time and the ratio to DDP.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str, engine: list[str], run_dir: str, steps: int, procs: int, port: int) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
           "--main_process_port", str(port), "-m", "sqdist.train", recipe, f"run.dir={run_dir}",
           f"train.max_steps={steps}", "train.log_every=1", "train.progress=false", *engine]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"zero_vs_ddp: {' '.join(engine) or 'ddp'} failed:\n{proc.stderr[-3000:]}")


def step_times(run_dir: str, warmup: int) -> list[float]:
    """Seconds between consecutive logged steps, without warm-up and evaluation intervals."""
    stamps, evaluated = {}, set()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                stamps[rec["step"]] = rec["time"]
            elif "eval/top1" in rec:
                evaluated.add(rec["step"])
    return [stamps[s] - stamps[s - 1] for s in sorted(stamps)
            if s - 1 in stamps and s > warmup + 1 and s - 1 not in evaluated]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"))
    ap.add_argument("--stages", type=int, nargs="+", default=[2], help="ZeRO stages to compare with DDP")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every engine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    # the same training on every engine: DeepSpeed owns its optimizer state, so no per-stage optimizer restart
    common = ["sq.restart_per_stage=false", *args.override]
    engines = {"ddp": common} | {f"zero{s}": [*common, "engine.name=deepspeed", f"engine.zero_stage={s}"]
                                 for s in args.stages}
    times: dict[str, list[float]] = {name: [] for name in engines}
    port = 29500 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, overrides in engines.items():
                run_dir = os.path.join(tmp, f"{name}-{rep}")
                run(args.recipe, overrides, run_dir, args.steps, args.procs, port)
                times[name] += step_times(run_dir, args.warmup)
    ddp = statistics.median(times["ddp"])
    result = {name: {"median_step_s": statistics.median(t), "mean_step_s": statistics.fmean(t), "steps": len(t),
                     "ratio_to_ddp": statistics.median(t) / ddp} for name, t in times.items()}
    if args.json:
        print(json.dumps({"recipe": os.path.relpath(args.recipe, ROOT), "processes": args.procs,
                          "overrides": args.override, "engines": result}, indent=1))
        return 0
    print(f"recipe {os.path.relpath(args.recipe, ROOT)}, {args.procs} processes, {args.steps} steps x {args.repeats}, "
          f"first {args.warmup} dropped{', overrides: ' + ' '.join(args.override) if args.override else ''}\n")
    print("| engine | median step (ms) | mean step (ms) | steps timed | / DDP |")
    print("|---|---:|---:|---:|---:|")
    for name, r in result.items():
        print(f"| {name} | {1000 * r['median_step_s']:.1f} | {1000 * r['mean_step_s']:.1f} | {r['steps']} | {r['ratio_to_ddp']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
