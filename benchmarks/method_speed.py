"""Step time and memory of every method against FP at a real layer scale, through the trainer.

    python benchmarks/method_speed.py                  # resnet18 32x32 batch 64, every method; resnet50 224 rows
    python benchmarks/method_speed.py --quick --json   # smoke test: 4 methods, few steps, no resnet50
    python benchmarks/method_speed.py --rows "FP,kbit4,W4A4 LSQ" --steps 20 --no-resnet50

Rows: the leaderboard's methods (``benchmarks/leaderboard.py`` ``ROWS``: the same recipes and
overrides), a few more named configurations (``EXTRA_ROWS``), and one row with default
parameters for every registered weight / activation quantizer that no row uses
(``sqdist.list_quantizers()``, ``sqdist.list_activation_quantizers()``). Each recipe is then
put at scale: timm ``resnet18`` (``num_classes=10``, 3 input channels) on the digits images
upscaled to 32x32, batch 64.

Step time: ``digits_common.step_times``, the function the leaderboard's step-time column uses:
the run built by ``sqdist.train.setup`` and stepped by ``sqdist.train.train_step`` (masks, LR,
quantizer hooks, forward, backward, optimizer step) on its first batch; the methods interleaved
in ``--rounds`` rounds in one process, ``--threads`` threads; median step (the mean is shown as
well: a method that does extra work every N steps shows it there). ``x FP``: median over FP's
median, measured in the same run. The machine is shared: ratios are noisy, absolute times more so.

Memory: for each method a subprocess builds the same run, takes ``--memory-steps`` steps and
reports its peak resident set size (Linux ``VmHWM``) during those steps (the peak is reset after
setup through ``/proc/self/clear_refs``), and the RSS after setup. It includes Python, torch and
the model's weights, gradients and optimizer state; the ``+ vs FP`` column is the difference to FP's.

Then resnet50 at 224x224 (batch ``--r50-batch``) for FP, TWN, kbit4, W4A4 LSQ, SRQ W3A3 and ESB W4:
a few steps each, absolute times as context.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from digits_common import ROOT, load, step_times  # noqa: E402
from leaderboard import KBIT, ROWS, Row, missing  # noqa: E402

SCALE = ["model.name=resnet18", "model.kwargs={num_classes: 10}", "data.image_size=32", "data.batch_size=64",
         "train.progress=false", "track.wandb=false"]
R50 = ["model.name=resnet50", "model.kwargs={num_classes: 10}", "data.image_size=224",
       "train.progress=false", "track.wandb=false"]
EXTRA_ROWS = {
    "kbit4 scale max": Row("digits_bwn", [KBIT, "quant.params={bits: 4, scale: max}"], what="k-bit 4, max scale"),
    "kbit4 LSQ step": Row("digits_bwn", [KBIT, "quant.params={bits: 4, scale: lsq}"], what="k-bit 4, learned step"),
}
# leaderboard rows left out: the same step as another row (paper protocol: only the schedule differs;
# DropBits, PACT alpha=10: a parameter value); PQ, PTQ and the 3x budgets are left out in all_rows
SKIP = ("SQ-TWN (paper)", "SQ-BWN (paper)", "W2A2 PACT alpha=10",
        "SRQ+DropBits W2A2", "kbit8", "kbit6")
R50_ROWS = ("FP", "TWN", "kbit4", "W4A4 LSQ", "SRQ W3A3", "ESB W4")
QUICK_ROWS = ("FP", "TWN", "kbit4", "W4A4 LSQ")


def all_rows() -> dict[str, Row]:
    """The leaderboard's rows (less ``SKIP``), ``EXTRA_ROWS``, then a row for every registered quantizer
    that none of them uses (weights: the BWN recipe with that quantizer; activations: k-bit 4 LSQ step
    weights with that activation quantizer at 4 bits)."""
    import sqdist

    # a longer budget, a compression or a post-training quantization of a run: no training step of its own
    rows = {k: v for k, v in ROWS.items() if k not in SKIP and v.budget == 1 and not v.ptq and v.compress is None}
    rows.update(EXTRA_ROWS)
    used_w, used_a = set(), set()
    for label, row in rows.items():
        if missing(row) is None:
            q = load(row.recipe, row.overrides)["quant"]
            used_w.add(q["name"])
            used_a.add(q["activations"].get("name"))
    for name in sqdist.list_quantizers():
        if name not in used_w:
            rows[f"{name} (defaults)"] = Row("digits_bwn", [f"quant.name={name}"], what=f"{name}, default parameters")
    for name in sqdist.list_activation_quantizers():
        if name not in used_a:
            rows[f"kbit4 LSQ step / {name} 4"] = Row(
                "digits_w2a2", ["quant.params={bits: 4, scale: lsq}", f"quant.activations={{name: {name}, bits: 4}}"],
                what=f"k-bit 4 learned step / {name} 4 bits")
    return rows


def recipe_of(row: Row, scale: list[str], batch: int | None = None) -> dict:
    extra = [f"data.batch_size={batch}"] if batch else []
    recipe = load(row.recipe, [*row.overrides, *scale, *extra])
    if recipe["quant"]["enabled"] and "sq.unit=step" in row.overrides:
        recipe["sq"]["stage_length"] = 10 ** 6  # the first stage (ratio 0.5) throughout
    return recipe


# ---------------------------------------------------------------- memory (one subprocess per method)
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_probe(recipe: dict, steps: int, threads: int) -> dict:
    """In this process: build the run, reset the RSS peak, take ``steps`` steps; MiB."""
    import tempfile

    import torch

    from digits_common import _timed_step, timed_run

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        run, x, y = timed_run(recipe, folder)
        setup_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        for i in range(steps):
            _timed_step(run, x, y, i)
        peak_kib = _status_kib("VmHWM")
        run.tracker.close()
    return {"setup_rss_mib": round(setup_kib / 1024, 1), "peak_rss_mib": round(peak_kib / 1024, 1)}


def measure_memory(recipe: dict, steps: int, threads: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", json.dumps(recipe), "--memory-steps", str(steps),
           "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe: over {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"memory probe: {tail[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- tables
def bits_of(recipe: dict) -> str:
    from sqdist.config import bits_label

    return bits_label(recipe)


def measure(rows: dict[str, Row], scale: list[str], args, batch: int | None, steps: int, rounds: int, warmup: int,
            memory: bool) -> list[dict]:
    recipes, out = {}, {}
    for label, row in rows.items():
        why = missing(row)
        if why:
            out[label] = {"method": label, "what": row.what, "status": why}
            continue
        recipes[label] = recipe_of(row, scale, batch)
    times = step_times(recipes, steps, rounds=rounds, warmup=warmup, threads=args.threads, budget_s=args.budget,
                       cap_s=args.cap)
    fp = times.get("FP", {}).get("median")
    for label, t in times.items():
        entry = {"method": label, "what": rows[label].what, "bits": bits_of(recipes[label])}
        if "error" in t:
            entry["status"] = f"failed: {t['error']}"
        else:
            entry.update({"status": "ok", "step_ms": round(t["median"] * 1e3, 2), "mean_ms": round(t["mean"] * 1e3, 2),
                          "steps": t["steps"], "x_fp": round(t["median"] / fp, 3) if fp else None})
            if t.get("warmup_only"):
                entry["status"] = f"over --cap {args.cap:g} s: the mean of the {warmup} warm-up step(s), not timed further"
            elif memory:
                entry.update(measure_memory(recipes[label], args.memory_steps, args.threads,
                                            timeout=int(120 + 20 * t["mean"] * args.memory_steps)))
        out[label] = entry
    fp_mem = out.get("FP", {}).get("peak_rss_mib")
    for entry in out.values():
        if fp_mem and "peak_rss_mib" in entry:
            entry["peak_vs_fp_mib"] = round(entry["peak_rss_mib"] - fp_mem, 1)
    return [out[label] for label in rows]


def table(rows: list[dict], title: str) -> str:
    lines = [title, "",
             "| method | W/A | step ms (median) | mean ms | x FP | steps | peak RSS MiB | + vs FP MiB | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "n/a"
        status = r["status"] if "error" not in r else f"{r['status']}; {r['error']}"
        lines.append(f"| {r['method']} | {r.get('bits', '')} | {f('step_ms', '{:.1f}')} | {f('mean_ms', '{:.1f}')} | "
                     f"{f('x_fp')} | {r.get('steps', '')} | {f('peak_rss_mib', '{:.0f}')} | "
                     f"{f('peak_vs_fp_mib', '{:+.0f}')} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=None, help="comma list of methods (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="print the methods and exit")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per method (default 12)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds per method and round: a slow method takes fewer steps (at least one a round)")
    ap.add_argument("--cap", type=float, default=None,
                    help="seconds: a method whose warm-up step takes longer is not timed further (its warm-up is shown)")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps of the memory probe (default 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    ap.add_argument("--no-resnet50", action="store_true", help="skip the resnet50 224x224 rows")
    ap.add_argument("--r50-batch", type=int, default=4, help="resnet50 batch (default 4)")
    ap.add_argument("--r50-rows", default=",".join(R50_ROWS), help=f"resnet50 methods (default {','.join(R50_ROWS)})")
    ap.add_argument("--r50-steps", type=int, default=2, help="resnet50 timed steps per method (default 2)")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: rows {','.join(QUICK_ROWS)}, 4 steps, no resnet50")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the tables")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key in ("steps", "rounds", "threads", "memory_steps", "r50_batch", "r50_steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}={getattr(args, key)}: expected an integer >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup={args.warmup}: expected an integer >= 0")
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(json.loads(args.memory_probe), args.memory_steps, args.threads)))
        return 0
    rows = all_rows()
    if args.list:
        print("\n".join(rows))
        return 0
    if args.quick:
        args.steps, args.rounds, args.warmup, args.no_resnet50 = 4, 2, 1, True
    names = list(QUICK_ROWS) if args.quick and args.rows is None else (
        list(rows) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()])
    unknown = [n for n in names if n not in rows]
    if unknown or not names:
        ap.error(f"--rows: {unknown[0] if unknown else '(empty)'!r} is not a method; allowed: {', '.join(rows)}")
    if "FP" not in names:
        names.insert(0, "FP")
    r50 = [r.strip() for r in args.r50_rows.split(",") if r.strip()]
    bad = [r for r in r50 if r not in rows]
    if bad:
        ap.error(f"--r50-rows: {bad[0]!r} is not a method; allowed: {', '.join(rows)}")
    if "FP" not in r50:
        r50.insert(0, "FP")
    import torch

    t0 = time.time()
    small = measure({n: rows[n] for n in names}, SCALE, args, None, args.steps, args.rounds, args.warmup,
                    not args.no_memory)
    big = []
    if not args.no_resnet50:
        big = measure({n: rows[n] for n in r50}, R50, args, args.r50_batch, args.r50_steps, 1, 1, False)
    meta = {"torch": torch.__version__, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "cpu": os.cpu_count(), "load_avg_end": os.getloadavg(),
            "wall_seconds": round(time.time() - t0, 1),
            "command": " ".join(["python benchmarks/method_speed.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        print(json.dumps({"resnet18": small, "resnet50": big, "meta": meta}))
        return 0
    print(table(small, f"resnet18 (num_classes 10), 32x32, batch 64, {args.threads} threads, "
                       f"{args.steps} timed steps in {args.rounds} interleaved rounds after {args.warmup} (median)"))
    if big:
        print()
        print(table(big, f"resnet50 (num_classes 10), 224x224, batch {args.r50_batch}, {args.threads} threads, "
                         f"{args.r50_steps} timed steps after 1, no memory probe"))
    print(f"\nwall {meta['wall_seconds']} s; load average at the end {meta['load_avg_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
