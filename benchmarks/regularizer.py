"""Is quantization a regularizer? FP against 8-, 6- and 4-bit quantization-aware training, paired by seed.

    python benchmarks/regularizer.py                 # 10 seeds, both regimes: table (markdown) and results.json
    python benchmarks/regularizer.py --json
    python benchmarks/regularizer.py --quick         # smoke test: 2 seeds, short runs

The claim tested (Chen et al., ACM JETC 2021, arXiv 2104.12046): quantized networks can be
*more* accurate than their full-precision originals because quantization regularizes. Two regimes:

- ``usual``: the digits setting of ``benchmarks/digits_sq.py`` (narrow resnet10t, channels
  4-32, 1,347 training images, weight decay 5e-4, 10 epochs).
- ``overfit``: a model 4x wider (channels 16-128), trained on 20% of the data
  (``data.test_fraction=0.8``: 359 training images, 1,438 test images), no weight decay, 40
  epochs (as many steps as ``usual`` has in 10 at this batch size... about 200).

Rows: FP; k-bit 8, 6, 4 (``quant.name=kbit``, per-row mse scale; stem conv and classifier full
precision, as everywhere in the digits benchmarks); and **FP with tuned weight decay**: the
weight decay chosen from ``WEIGHT_DECAYS`` by the mean top-1 on a held-out 20% of the
training split (``data.holdout_fraction=0.2``; ``--tune-seeds`` seeds each, the test set never
seen), then trained on the whole training split with seeds 0..N-1 like the other rows. So
"quantization regularizes" is set against the ordinary regularizer. Seed ``s`` is
``train.seed`` in every row: the differences are paired. Runs are cached by recipe under
``--runs`` (and read back from the leaderboard's run folder).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from digits_common import OUT, paired, save_results, stats, train_all

KBIT = "quant.name=kbit"
BITS = (8, 6, 4)
WEIGHT_DECAYS = (0.0, 1e-4, 5e-4, 2e-3, 1e-2)
REGIMES = {
    "usual": {"epochs": 10, "overrides": [],
              "what": "narrow resnet10t (4-32 channels), 1,347 training images, weight decay 5e-4, 10 epochs"},
    "overfit": {"epochs": 40, "overrides": ["model.kwargs={num_classes: 10, in_chans: 1, channels: [16, 32, 64, 128], "
                                            "stem_width: 16}", "data.test_fraction=0.8", "optim.weight_decay=0"],
                "what": "resnet10t 4x wider (16-128 channels), 359 training images (test_fraction 0.8), "
                        "no weight decay, 40 epochs"},
}


def rows(regime: dict) -> dict[str, tuple[str, list[str]]]:
    """label -> (recipe, overrides) of the fixed rows of a regime."""
    out = {"FP": ("digits_fp", list(regime["overrides"]))}
    for bits in BITS:
        params = "quant.params={bits: 2, scale: mse}" if bits == 2 else f"quant.params={{bits: {bits}}}"
        out[f"kbit{bits}"] = ("digits_bwn", [KBIT, params, *regime["overrides"]])
    return out


def job(label: str, recipe: str, overrides: list[str], seed: int, epochs: int, regime: str, args) -> dict:
    return {"label": label, "regime": regime, "seed": seed, "recipe": recipe, "name": f"{regime}_{label}",
            "overrides": [f"train.seed={seed}", "train.progress=false", "track.wandb=false", f"train.epochs={epochs}",
                          *overrides],
            "runs": args.runs, "fresh": args.fresh, "cache": [str(OUT / "leaderboard_runs"), str(OUT / "wa_bits_runs")]}


def verdict(d: dict) -> str:
    lo, hi = d["ci95"]
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "no detectable difference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per row (default 10)")
    parser.add_argument("--tune-seeds", type=int, default=3, help="seeds per weight decay when tuning (default 3)")
    parser.add_argument("--regimes", default="usual,overfit", help="comma list of: " + ", ".join(REGIMES))
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 1 tuning seed, 2 (8) epochs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(OUT / "regularizer"), help="folder of table.md and results.json")
    parser.add_argument("--runs", default=str(OUT / "regularizer_runs"), help="run folders (cached by recipe)")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    regimes = {name: dict(REGIMES[name]) for name in args.regimes.split(",") if name}
    if args.quick:
        args.seeds, args.tune_seeds = 2, 1
        for r in regimes.values():
            r["epochs"] = max(2, r["epochs"] // 5)
    t0 = time.time()

    # 1. tune FP's weight decay on the held-out part of the training split
    tune_jobs = [job(f"FP wd={wd:g}", "digits_fp", [*r["overrides"], f"optim.weight_decay={wd}", "data.holdout_fraction=0.2"],
                     seed, r["epochs"], name, args)
                 for name, r in regimes.items() for wd in WEIGHT_DECAYS for seed in range(args.tune_seeds)]
    # 2. the fixed rows, on the test set
    fixed = [job(label, recipe, overrides, seed, r["epochs"], name, args)
             for name, r in regimes.items() for label, (recipe, overrides) in rows(r).items() for seed in range(args.seeds)]
    done = train_all(tune_jobs + fixed, args.workers)
    tuned_acc: dict[tuple[str, str], list[float]] = {}
    for j, res in zip(tune_jobs, done):
        tuned_acc.setdefault((j["regime"], j["label"]), []).append(res["summary"]["final_accuracy"])
    acc: dict[tuple[str, str], dict[int, float]] = {}
    for j, res in zip(fixed, done[len(tune_jobs):]):
        acc.setdefault((j["regime"], j["label"]), {})[j["seed"]] = res["summary"]["final_accuracy"]

    # 3. FP at the chosen weight decay, on the test set
    chosen = {}
    for name in regimes:
        held = {wd: sum(tuned_acc[(name, f"FP wd={wd:g}")]) / args.tune_seeds for wd in WEIGHT_DECAYS}
        chosen[name] = {"weight_decay": max(WEIGHT_DECAYS, key=lambda wd: (held[wd], -wd)),  # a tie: the smaller
                        "held_out_top1": {f"{wd:g}": round(v, 3) for wd, v in held.items()}}
    best_jobs = [job("FP tuned wd", "digits_fp", [*r["overrides"], f"optim.weight_decay={chosen[name]['weight_decay']}"],
                     seed, r["epochs"], name, args) for name, r in regimes.items() for seed in range(args.seeds)]
    for j, res in zip(best_jobs, train_all(best_jobs, args.workers)):
        acc.setdefault((j["regime"], j["label"]), {})[j["seed"]] = res["summary"]["final_accuracy"]

    results = {}
    for name, r in regimes.items():
        seeds = range(args.seeds)
        top1 = {label: [acc[(name, label)][s] for s in seeds] for label in [*rows(r), "FP tuned wd"]}
        res = {"what": r["what"], "epochs": r["epochs"], "tuning": chosen[name],
               "top1": {label: stats(v) for label, v in top1.items()}, "paired": {}}
        for bits in BITS:
            for ref in ("FP", "FP tuned wd"):
                d = paired(top1[f"kbit{bits}"], top1[ref])
                d["verdict"] = verdict(d)
                res["paired"][f"kbit{bits} - {ref}"] = d
        d = paired(top1["FP tuned wd"], top1["FP"])
        d["verdict"] = verdict(d)
        res["paired"]["FP tuned wd - FP"] = d
        results[name] = res
    meta = {"seeds": args.seeds, "tune_seeds": args.tune_seeds, "weight_decays": list(WEIGHT_DECAYS),
            "wall_seconds": round(time.time() - t0, 1),
            "command": " ".join(["python benchmarks/regularizer.py", *sys.argv[1:]])}
    lines = []
    for name, res in results.items():
        lines += [f"**{name}**: {res['what']}. FP's weight decay tuned on a held-out 20% of the training split: "
                  f"held-out top-1 {res['tuning']['held_out_top1']} -> {res['tuning']['weight_decay']:g}.", "",
                  "| row | top-1 mean ± std | 95% CI | min | max |", "|---|---:|---|---:|---:|"]
        for label, t in res["top1"].items():
            lines.append(f"| {label} | {t['mean']:.2f} ± {t['std']:.2f} | [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] | "
                         f"{t['min']:.2f} | {t['max']:.2f} |" if t["ci95"] else f"| {label} | {t['mean']:.2f} | | | |")
        lines += ["", "| paired, same seed | mean diff | 95% CI | p (paired t) | first row is |", "|---|---:|---|---:|---|"]
        for label, d in res["paired"].items():
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else ""
            p = "n/a" if d["p"] is None else f"{d['p']:.2g}"
            lines.append(f"| {label} | {d['mean']:+.2f} | {ci} | {p} | {d['verdict']} |")
        lines.append("")
    text = "\n".join(lines)
    save_results(args.out, text, {"regimes": results, "meta": meta})
    if args.json:
        print(json.dumps({"regimes": results, "meta": meta}))
        return
    print(text)
    print(f"wall {meta['wall_seconds']} s")


if __name__ == "__main__":
    main()
