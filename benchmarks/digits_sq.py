"""Does SQ beat plain BWN/TWN training? Test accuracy on digits, many seeds, two protocols.

    python benchmarks/digits_sq.py                          # 20 seeds, table + plot, ~25 min on 2 cores
    python benchmarks/digits_sq.py --seeds 10 --epochs-per-stage 10
    python benchmarks/digits_sq.py --sq-set sq.variant=authors   # an SQ variant against the same baselines
    python benchmarks/digits_sq.py --json                   # {protocol: {method: {mean, std, runs}}}
    python benchmarks/digits_sq.py --quick                  # smoke test, ~1 min
    python benchmarks/digits_sq.py --set optim.name=adam --set optim.lr=0.01   # any recipe override

Methods: FP, BWN, TWN (plain quantization-aware training, every row quantized from
step 1) and SQ-BWN, SQ-TWN (ratio 50% -> 75% -> 87.5% -> 100%), from
``recipes/digits_{fp,bwn,twn,sq_bwn,sq_twn}.yaml``. With E epochs per stage:

- ``paper``: each SQ stage is a full training run (LR schedule restarted) started
  from the previous stage's weights, ``sq.restart_per_stage=true``,
  ``sq.stage_length=E``, ``train.epochs=4E``, as in the SQ authors' code; the
  baselines train one run of E epochs, so SQ gets 4x their steps.
- ``compute_matched``: the same SQ runs; FP, BWN and TWN train 4E epochs (one
  cosine schedule), so every method takes the same number of steps.

Seed ``s`` sets ``train.seed`` (initial weights, batch order) and ``sq.seed`` (mask
draws), so "SQ minus plain" is a paired difference: same initial weights, same
data order. Runs go to ``benchmarks/out/digits_sq_runs/<run>/``; a run whose
``summary.json`` exists for the same recipe is read back instead of retrained
(``--fresh`` retrains). Runs use one thread each, ``--workers`` of them at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from digits_common import ROOT, check_counts, paired, pool_map, save_results, stats, train_job

RECIPES = {"FP": "digits_fp", "BWN": "digits_bwn", "TWN": "digits_twn", "SQ-BWN": "digits_sq_bwn", "SQ-TWN": "digits_sq_twn"}
METHODS = ["FP", "BWN", "SQ-BWN", "TWN", "SQ-TWN"]
PAIRS = [("SQ-BWN", "BWN"), ("SQ-TWN", "TWN")]
PROTOCOLS = {"paper": "paper: SQ stage = full run from the last weights (4x the baseline's steps)",
             "compute_matched": "compute-matched: baselines train as many steps as SQ"}


def plan(seeds: int, epochs_per_stage: int, extra: list[str] = (), sq_extra: list[str] = ()) -> list[dict]:
    """Every training run the two protocols need: one dict per run (method, seed, epochs, overrides).

    ``extra`` applies to every run, ``sq_extra`` to the SQ runs only (so SQ variants share the
    baselines); both come after the protocol's own keys and so win over them.
    """
    e = epochs_per_stage
    runs = []
    for seed in range(seeds):
        common = [f"train.seed={seed}", "train.progress=false", "track.wandb=false"]
        for method in ("FP", "BWN", "TWN"):
            sq_seed = [] if method == "FP" else [f"sq.seed={seed}"]  # the recipe check refuses sq.* on a float run
            for epochs in (e, 4 * e):
                runs.append({"method": method, "seed": seed, "epochs": epochs,
                             "overrides": common + sq_seed + [f"train.epochs={epochs}", *extra]})
        for method in ("SQ-BWN", "SQ-TWN"):
            runs.append({"method": method, "seed": seed, "epochs": 4 * e,
                         "overrides": common + [f"sq.seed={seed}", f"train.epochs={4 * e}", f"sq.stage_length={e}", "sq.unit=epoch",
                                                "sq.restart_per_stage=true", *extra, *sq_extra]})
    return runs


def run_one(job: dict) -> dict:
    """Train one run in this process (one thread); returns its summary (read back when cached)."""
    res = train_job({**job, "recipe": RECIPES[job["method"]], "name": f"{job['method']}_e{job['epochs']}",
                     "runs": job["out"]})
    return {**res["summary"], "cached": res["cached"]}


def collect(jobs: list[dict], summaries: list[dict], epochs_per_stage: int) -> tuple[dict, dict]:
    """Per protocol and method: accuracy stats and paired differences; and SQ stage-end accuracies."""
    e = epochs_per_stage
    acc: dict[tuple[str, int], dict[int, float]] = {}
    stages: dict[str, dict[int, list[float]]] = {}
    for job, s in zip(jobs, summaries):
        acc.setdefault((job["method"], job["epochs"]), {})[job["seed"]] = s["final_accuracy"]
        if job["method"].startswith("SQ"):
            stages.setdefault(job["method"], {})[job["seed"]] = [st["top1"] for st in s["stages"]]
    seeds = sorted({j["seed"] for j in jobs})
    results = {}
    for protocol, base_epochs in (("paper", e), ("compute_matched", 4 * e)):
        res = {}
        for method in METHODS:
            epochs = 4 * e if method.startswith("SQ") else base_epochs
            res[method] = stats([acc[(method, epochs)][s] for s in seeds])
        for sq, plain in PAIRS:
            res[f"{sq} - {plain}"] = paired(res[sq]["runs"], res[plain]["runs"])
        res["epochs"] = {m: (4 * e if m.startswith("SQ") else base_epochs) for m in METHODS}
        results[protocol] = res
    return results, {m: [v[s] for s in seeds] for m, v in stages.items()}


def table(results: dict, meta: dict) -> str:
    lines = [f"Digits test accuracy (%), {meta['seeds']} seeds, {meta['epochs_per_stage']} epochs per SQ stage; "
             f"model {meta['model']}, {meta['image_size']}x{meta['image_size']} inputs, {meta['optim']}, "
             f"BN recalibrated on {meta['bn_recalibrate']} batches before evaluation; SQ {meta['sq']}"
             + (f"; overrides {meta['overrides']}" if meta["overrides"] else "")
             + (f"; SQ-only overrides {meta['sq_overrides']}" if meta["sq_overrides"] else "") + ".",
             ""]
    for protocol, res in results.items():
        lines += [f"**{PROTOCOLS[protocol]}**", "",
                  "| method | epochs | mean | std | min | max |", "|---|---:|---:|---:|---:|---:|"]
        for m in METHODS:
            r = res[m]
            lines.append(f"| {m} | {res['epochs'][m]} | {r['mean']:.2f} | {r['std']:.2f} | {min(r['runs']):.2f} | {max(r['runs']):.2f} |")
        lines += ["", "| paired, same seed | mean diff | std | 95% CI | p (paired t) |", "|---|---:|---:|---|---:|"]
        for sq, plain in PAIRS:
            d = res[f"{sq} - {plain}"]
            p = "n/a" if d["p"] is None else f"{d['p']:.2g}"
            lines.append(f"| {sq} - {plain} | {d['mean']:+.2f} | {d['std']:.2f} | [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] | {p} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, stage_acc: dict, path: Path, meta: dict) -> None:
    """Mean stage-end top-1 (fully quantized network) after each SQ stage, with the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"BWN": "tab:blue", "TWN": "tab:orange"}
    labels = ["50%", "75%", "87.5%", "100%"]
    for sq, plain in PAIRS:
        a = np.array(stage_acc[sq])  # (seeds, stages)
        x = np.arange(1, a.shape[1] + 1)
        ax.errorbar(x, a.mean(0), yerr=a.std(0, ddof=1) if len(a) > 1 else None, marker="o", capsize=3,
                    color=colors[plain], label=f"{sq} (stage end, fully quantized)")
        for protocol, style in (("paper", ":"), ("compute_matched", "--")):
            r = results[protocol][plain]
            ax.axhline(r["mean"], ls=style, color=colors[plain], lw=1,
                       label=f"{plain}, {results[protocol]['epochs'][plain]} epochs ({protocol.replace('_', '-')} baseline)")
    fp = results["compute_matched"]["FP"]
    ax.axhline(fp["mean"], ls="-", color="gray", lw=1, label=f"FP, {results['compute_matched']['epochs']['FP']} epochs")
    ax.set_xticks(range(1, len(labels) + 1), [f"stage {i + 1}\n({r} quantized)" for i, r in enumerate(labels)])
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"SQ on digits: {meta['seeds']} seeds, {meta['epochs_per_stage']} epochs per stage", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per method (default 20)")
    parser.add_argument("--epochs-per-stage", type=int, default=5, help="E: epochs per SQ stage and of a paper-protocol baseline")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 1 epoch per stage")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to every run (repeatable)")
    parser.add_argument("--sq-set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the SQ runs only, e.g. sq.variant=authors (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "digits_sq"), help="table.md, results.json, stages.png")
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "out" / "digits_sq_runs"),
                        help="run folders, shared between invocations (cached by recipe)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose summary.json already exists")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs_per_stage = 2, 1
    check_counts(parser, args, ("seeds", "epochs_per_stage", "workers"))

    from sqdist.config import RecipeError, load_recipe

    try:  # fail on a bad --set before any training
        probe = load_recipe(str(ROOT / "recipes" / "digits_sq_twn.yaml"), args.set + args.sq_set)
    except RecipeError as exc:
        sys.exit(f"digits_sq: recipe error: {exc}")
    meta = {"seeds": args.seeds, "epochs_per_stage": args.epochs_per_stage, "overrides": args.set, "sq_overrides": args.sq_set,
            "model": f"{probe['model']['name']} {probe['model']['kwargs']}", "image_size": probe["data"]["image_size"],
            "optim": f"{probe['optim']['name']} lr {probe['optim']['lr']}, {probe['sched']['name']} schedule",
            "bn_recalibrate": probe["train"]["bn_recalibrate"],
            "sq": {k: probe["sq"][k] for k in ("probability", "variant", "granularity")}}

    jobs = plan(args.seeds, args.epochs_per_stage, args.set, args.sq_set)
    out = Path(args.out)
    for j in jobs:
        j.update(out=args.runs, fresh=args.fresh)
    t0 = time.time()
    # longest runs first, so the two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["epochs"])
    done = dict(zip(order, pool_map(run_one, [jobs[i] for i in order], args.workers)))
    summaries = [done[i] for i in range(len(jobs))]
    meta["wall_seconds"] = round(time.time() - t0, 1)
    meta["train_seconds"] = round(sum(s["seconds"] for s in summaries), 1)  # cached runs included
    meta["runs"], meta["runs_cached"] = len(summaries), sum(bool(s.get("cached")) for s in summaries)

    results, stage_acc = collect(jobs, summaries, args.epochs_per_stage)
    text = table(results, meta)
    save_results(out, text, {"meta": meta, **results, "stages": stage_acc})
    plot(results, stage_acc, out / "stages.png", meta)
    if args.json:
        print(json.dumps({**results, "meta": meta}))
        return
    print(text)
    print(f"plot: {out / 'stages.png'}; wall {meta['wall_seconds']} s; {meta['runs']} runs, {meta['runs_cached']} of them "
          f"read back from {args.runs}; {meta['train_seconds']} s of training in all")


if __name__ == "__main__":
    main()
