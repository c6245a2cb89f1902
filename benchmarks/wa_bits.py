"""Weight and activation bits on digits: FP, BWN, TWN, k-bit scales, and W/A with LSQ and PACT.

    python benchmarks/wa_bits.py                       # 10 seeds, 20 epochs, table
    python benchmarks/wa_bits.py --seeds 20 --epochs 10
    python benchmarks/wa_bits.py --json                # {"rows": {label: {mean, std, runs, ...}}, "meta": ...}
    python benchmarks/wa_bits.py --quick               # smoke test: 2 seeds, 1 epoch

The setting of ``benchmarks/digits_sq.py``: the narrow resnet10t of ``recipes/digits_*.yaml``
(channels 4-32, 8x8 digits, SGD lr 0.05, cosine, BN re-estimated on 10 batches before the
evaluation), plain quantization-aware training (every row quantized from step 1, no SQ
stages), the same epochs for every row. The stem conv and the classifier stay full
precision in every row, and no activation quantizer sits on the stem's input (the image).
Seed ``s`` sets ``train.seed`` (initial weights, batch order), so rows are paired by seed.
Runs go to ``benchmarks/out/wa_bits_runs/<run>/``; a run whose ``summary.json`` exists for
the same recipe is read back (``--fresh`` retrains). One thread per run, ``--workers`` at once.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from digits_common import ROOT, check_counts, pool_map, save_results, stats, train_job
KBIT = "quant.name=kbit"
# label -> (recipe, overrides, what the weights and the activations are)
ROWS = {
    "FP": ("digits_fp", [], "fp32", "fp32"),
    "BWN": ("digits_bwn", [], "BWN (1 bit)", "fp32"),
    "TWN": ("digits_twn", [], "TWN (ternary, 2 bits)", "fp32"),
    "kbit2 max": ("digits_bwn", [KBIT, "quant.params={bits: 2, scale: max}"], "k-bit 2, max scale", "fp32"),
    "kbit2 mse": ("digits_bwn", [KBIT, "quant.params={bits: 2, scale: mse}"], "k-bit 2, mse scale", "fp32"),
    "kbit4": ("digits_bwn", [KBIT, "quant.params={bits: 4}"], "k-bit 4, mse scale", "fp32"),
    "W1A2 LSQ": ("digits_bwn", ["quant.activations={name: lsq, bits: 2}"], "BWN", "LSQ 2"),
    "W2A2 LSQ": ("digits_w2a2", [], "k-bit 2, LSQ step", "LSQ 2"),
    "W2A2 PACT": ("digits_w2a2", ["quant.activations={name: pact, bits: 2}"], "k-bit 2, LSQ step",
                  "PACT 2, alpha from 10"),
    "W2A2 PACT cal": ("digits_w2a2", ["quant.activations={name: pact, bits: 2, alpha: calibrate}"], "k-bit 2, LSQ step",
                      "PACT 2, alpha from data"),
    "W4A4 LSQ": ("digits_w2a2", ["quant.params={bits: 4, scale: lsq}", "quant.activations={name: lsq, bits: 4}"],
                 "k-bit 4, LSQ step", "LSQ 4"),
}


def plan(seeds: int, epochs: int, rows: list[str], extra: list[str] = ()) -> list[dict]:
    """One job per (row, seed): the recipe and its overrides (``extra`` last, so it wins)."""
    jobs = []
    for seed in range(seeds):
        common = [f"train.seed={seed}", "train.progress=false", "track.wandb=false",
                  f"train.epochs={epochs}"]
        for label in rows:
            recipe, overrides, _, _ = ROWS[label]
            jobs.append({"label": label, "seed": seed, "recipe": recipe, "overrides": common + overrides + list(extra)})
    return jobs


def run_one(job: dict) -> dict:
    """Train one run in this process (one thread); returns its summary (read back when cached)."""
    res = train_job({**job, "name": job["label"], "runs": job["out"]})
    return {**res["summary"], "cached": res["cached"]}


def table(results: dict, meta: dict) -> str:
    lines = [f"Digits test top-1 (%), mean ± std over {meta['seeds']} seeds (train.seed 0..{meta['seeds'] - 1}), "
             f"{meta['epochs']} epochs each; model {meta['model']}, {meta['image_size']}x{meta['image_size']} inputs, "
             f"{meta['optim']}, BN re-estimated on {meta['bn_recalibrate']} batches before evaluation; plain QAT "
             f"(no SQ stages); stem conv and classifier full precision"
             + (f"; overrides {meta['overrides']}" if meta["overrides"] else "") + ".",
             "", "| row | W/A | weights | activations | top-1 mean ± std | min | max |",
             "|---|---|---|---|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['bits']} | {r['weights']} | {r['activations']} | {r['mean']:.2f} ± {r['std']:.2f} "
                     f"| {min(r['runs']):.2f} | {max(r['runs']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per row (default 10)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every run (default 20, the recipes')")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 1 epoch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to every run (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "wa_bits"), help="table.md, results.json")
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "out" / "wa_bits_runs"),
                        help="run folders, shared between invocations (cached by recipe)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose summary.json already exists")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 2, 1
    check_counts(parser, args, ("seeds", "epochs", "workers"))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: {unknown[0] if unknown else '(empty)'!r} is not a row; allowed: {', '.join(ROWS)}")

    from sqdist.config import RecipeError, bits_label, load_recipe

    jobs = plan(args.seeds, args.epochs, rows, args.set)
    try:  # every row's recipe, before any training: a bad --set fails here with one line
        recipes = {label: load_recipe(str(ROOT / "recipes" / f"{ROWS[label][0]}.yaml"), ROWS[label][1] + args.set)
                   for label in rows}
    except RecipeError as exc:
        sys.exit(f"wa_bits: recipe error: {exc}")
    probe = recipes[rows[0]]
    meta = {"seeds": args.seeds, "epochs": args.epochs, "overrides": args.set,
            "model": f"{probe['model']['name']} {probe['model']['kwargs']}", "image_size": probe["data"]["image_size"],
            "optim": f"{probe['optim']['name']} lr {probe['optim']['lr']}, {probe['sched']['name']} schedule",
            "bn_recalibrate": probe["train"]["bn_recalibrate"]}
    for j in jobs:
        j.update(out=args.runs, fresh=args.fresh)
    t0 = time.time()
    summaries = pool_map(run_one, jobs, args.workers)
    meta["wall_seconds"] = round(time.time() - t0, 1)
    meta["train_seconds"] = round(sum(s["seconds"] for s in summaries), 1)  # cached runs included
    meta["runs"], meta["runs_cached"] = len(summaries), sum(bool(s.get("cached")) for s in summaries)

    acc: dict[str, dict[int, float]] = {}
    for job, s in zip(jobs, summaries):
        acc.setdefault(job["label"], {})[job["seed"]] = s["final_accuracy"]
    results = {label: {"bits": bits_label(recipes[label]), "weights": ROWS[label][2], "activations": ROWS[label][3],
                       **stats([acc[label][s] for s in range(args.seeds)])} for label in rows}
    text = table(results, meta)
    save_results(args.out, text, {"rows": results, "meta": meta})
    if args.json:
        print(json.dumps({"rows": results, "meta": meta}))
        return
    print(text)
    print(f"\nwall {meta['wall_seconds']} s; {meta['runs']} runs, {meta['runs_cached']} of them read back from "
          f"{args.runs}; {meta['train_seconds']} s of training in all")


if __name__ == "__main__":
    main()
