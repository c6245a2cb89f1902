"""Which objective GPTQ should minimise, given that BN statistics are re-estimated after PTQ.

    python benchmarks/ptq_objective.py                       # digits, 5 seeds, k-bit 2/3/4/8 and TWN
    python benchmarks/ptq_objective.py --data fashion_mnist --seeds 5 --widths kbit2,TWN

Each seed's FP run (the leaderboard's FP row: the same recipe, seed and epochs, read back from
the leaderboard's cache when it is there) is quantized by ``python -m sqdist.ptq`` with: RTN;
GPTQ as before round 2 (``--hessian plain --no-walk-bn``); GPTQ with the Hessian centred for
layers that feed a BatchNorm; GPTQ with BN statistics re-estimated from the calibration inputs
as the walk goes, with a plain or a centred Hessian; and that with ``--act-order`` (the
default since round 2; the other GPTQ variants run with ``--no-act-order``). Every variant
ends with the same BN re-estimation on 10 training batches. Prints top-1 per variant and its
paired difference against RTN on the same seed (mean, 95% interval), and saves
``benchmarks/results/ptq_objective[_<data>].md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from digits_common import OUT, paired, pool_map, stats, train_all  # noqa: E402
from leaderboard import setting_overrides  # noqa: E402
from ptq_rows import CALIB_IMAGES, ptq_job  # noqa: E402

VARIANTS = {
    "RTN": ["--method", "rtn"],
    "GPTQ plain (before)": ["--hessian", "plain", "--no-walk-bn", "--no-act-order"],
    "GPTQ centred": ["--hessian", "centred", "--no-walk-bn", "--no-act-order"],
    "GPTQ plain + walk BN": ["--hessian", "plain", "--no-act-order"],
    "GPTQ centred + walk BN": ["--hessian", "centred", "--no-act-order"],
    "GPTQ centred + walk BN + act-order (default)": ["--hessian", "centred", "--act-order"],
    "AdaRound": ["--method", "adaround"],
}
WIDTHS = {**{f"kbit{b}": ["--quantizer", "kbit", "--bits", str(b)] for b in (2, 3, 4, 8)},
          "TWN": ["--quantizer", "twn"]}
EPOCHS = {"digits": 10, "fashion_mnist": 2}   # the leaderboard's FP row on each task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", choices=sorted(EPOCHS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (default 0)")
    p.add_argument("--widths", default="kbit2,kbit3,kbit4,kbit8,TWN")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "AdaRound"),
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all but AdaRound)")
    p.add_argument("--out", default=None, help="the .md/.json path without suffix "
                                               "(default benchmarks/results/ptq_objective[_<data>])")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    widths, variants = args.widths.split(","), args.variants.split(",")
    runs = str(OUT / ("leaderboard_runs" if args.data == "digits" else f"leaderboard_{args.data}_runs"))
    setting = setting_overrides(args.data)   # the leaderboard's FP row: digits_fp in the task's setting
    jobs = [{"label": "FP", "seed": s, "recipe": "digits_fp", "name": "FP", "runs": runs,
             "overrides": [f"train.seed={s}", "train.progress=false", "track.wandb=false", *setting,
                           f"train.epochs={EPOCHS[args.data]}"]} for s in range(args.first_seed, args.first_seed + args.seeds)]
    fp = train_all(jobs, args.workers)
    ptq = []
    for width in widths:
        for variant in variants:
            flags = [*WIDTHS[width], *VARIANTS[variant], "--calib-images", str(CALIB_IMAGES), "--bn-recalibrate", "10"]
            tag = hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:8]
            for s, r in enumerate(fp, start=args.first_seed):
                ptq.append({"width": width, "variant": variant, "seed": s, "run_dir": r["run_dir"], "flags": flags,
                            "fresh": False, "out": str(Path(r["run_dir"]) / f"ptqobj_{tag}.safetensors")})
    results = pool_map(ptq_job, ptq, args.workers)
    table = {}
    for j, r in zip(ptq, results):
        table.setdefault(j["width"], {}).setdefault(j["variant"], []).append(r["top1"])
    fp_top1 = [r["summary"]["final_accuracy"] for r in fp]
    title = "GPTQ's objective against BN re-estimation" if args.out is None else "PTQ variants against RTN"
    lines = [f"# {title} ({args.data}, {args.seeds} paired seeds)", "",
             f"Command: `python benchmarks/ptq_objective.py --data {args.data} --seeds {args.seeds} "
             + (f"--first-seed {args.first_seed} " if args.first_seed else "") +
             f"--widths {args.widths} --variants \"{args.variants}\""
             + (f" --out {args.out}" if args.out else "") + "`", "",
             f"FP: {stats(fp_top1)['mean']:.2f} (seeds {', '.join(f'{v:.2f}' for v in fp_top1)}). {CALIB_IMAGES} "
             "calibration images; BN re-estimated on 10 training batches after every variant.", "",
             "| width | variant | top-1 mean ± std | 95% CI | paired vs RTN [95% CI] |", "|---|---|---:|---|---|"]
    payload = {"data": args.data, "seeds": args.seeds, "first_seed": args.first_seed, "fp": stats(fp_top1), "rows": {}}
    for width, by_variant in table.items():
        for variant, values in by_variant.items():
            st = stats(values)
            row = {"top1": st}
            diff = ""
            if variant != "RTN" and "RTN" in by_variant:
                d = paired(values, by_variant["RTN"])
                row["vs_rtn"] = d
                diff = f"{d['mean']:+.2f}"
                if d["ci95"]:
                    diff += f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
            ci = f"[{st['ci95'][0]:.2f}, {st['ci95'][1]:.2f}]" if st["ci95"] else ""
            lines.append(f"| {width} | {variant} | {st['mean']:.2f} ± {st['std']:.2f} | {ci} | {diff} |")
            payload["rows"][f"{width} {variant}"] = row
    text = "\n".join(lines) + "\n"
    print(text)
    name = "ptq_objective" if args.data == "digits" else f"ptq_objective_{args.data}"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / name
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
