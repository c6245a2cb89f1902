"""Bits per layer under a size budget (``python -m sqdist.ptq --size-budget / --avg-bits``) against uniform widths.

    python benchmarks/ptq_budget.py --data fashion_mnist --seeds 5     # the issue's goal
    python benchmarks/ptq_budget.py --data digits --seeds 5 --budgets size30

Each seed's FP run (the leaderboard's FP row, read back from its cache when it is there) is
quantized by GPTQ (the command's defaults) at uniform k-bit 2 and 3, and with each layer's bits
chosen (1/2/3/4/8, ``sqdist.ptq.budget``) under two budgets: the file of uniform k-bit 2 plus 30%
(``--size-budget``: the quantized layers' codes and scales of seed 0's k-bit 2 file plus 30% of that
whole file, less 1 KiB for the metadata, so the whole file stays within 1.3x) and 2.5 bits per
weight (``--avg-bits 2.5``). Prints top-1, the paired differences against uniform k-bit 2 and 3
(mean, 95% interval), the file bytes against uniform k-bit 2's, and how many layers got each
width; saves ``benchmarks/results/ptq_budget_<data>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path


from digits_common import OUT, paired, pool_map, stats, train_all
from leaderboard import setting_overrides
from ptq_objective import EPOCHS, VARIANTS, WIDTHS
from ptq_rows import CALIB_IMAGES, ptq_job

GPTQ = VARIANTS["GPTQ centred + walk BN + act-order (default)"]
COMMON = ["--calib-images", str(CALIB_IMAGES), "--bn-recalibrate", "10"]
MARGIN = 1024   # bytes of metadata a mixed file may hold beyond a uniform one


def quantized_bytes(path: str) -> int:
    """Bytes of the quantized layers' codes and scales in a packed file."""
    from safetensors import safe_open

    from sqdist.export import read_packed

    _, meta = read_packed(path)
    with safe_open(path, "pt") as f:
        return sum(f.get_tensor(f"{n}.weight.packed").numel() + 4 * f.get_tensor(f"{n}.weight.scale").numel()
                   for n in meta["layers"])


def jobs_for(name: str, flags: list[str], fp: list[dict]) -> list[dict]:
    flags = [*flags, *COMMON]
    tag = hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:8]   # ptq_objective's name: its files are reused
    return [{"variant": name, "seed": s, "run_dir": r["run_dir"], "flags": flags, "fresh": False,
             "out": str(Path(r["run_dir"]) / f"ptqobj_{tag}.safetensors")} for s, r in enumerate(fp)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion_mnist", choices=sorted(EPOCHS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--budgets", default="size30,avg2.5", help="comma list of: size30 (uniform k-bit 2's file + 30%%), "
                                                              "avg2.5 (2.5 bits per weight); default both")
    args = p.parse_args()
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets or set(budgets) - {"size30", "avg2.5"}:
        p.error(f"--budgets={args.budgets!r}; allowed: a comma list of size30, avg2.5")
    runs = str(OUT / ("leaderboard_runs" if args.data == "digits" else f"leaderboard_{args.data}_runs"))
    setting = setting_overrides(args.data)
    fp = train_all([{"label": "FP", "seed": s, "recipe": "digits_fp", "name": "FP", "runs": runs,
                     "overrides": [f"train.seed={s}", "train.progress=false", "track.wandb=false", *setting,
                                   f"train.epochs={EPOCHS[args.data]}"]} for s in range(args.seeds)], args.workers)
    uniform = [*jobs_for("GPTQ kbit2", [*WIDTHS["kbit2"], *GPTQ], fp),
               *jobs_for("GPTQ kbit3", [*WIDTHS["kbit3"], *GPTQ], fp)]
    done = pool_map(ptq_job, uniform, args.workers)
    kbit2_file = Path(uniform[0]["out"]).stat().st_size
    budget = quantized_bytes(uniform[0]["out"]) + math.floor(0.3 * kbit2_file) - MARGIN
    mixed = [*(jobs_for("GPTQ mixed, kbit2 file + 30%", ["--size-budget", str(budget), *GPTQ], fp)
               if "size30" in budgets else []),
             *(jobs_for("GPTQ mixed, 2.5 bits per weight", ["--avg-bits", "2.5", *GPTQ], fp)
               if "avg2.5" in budgets else [])]
    done += pool_map(ptq_job, mixed, args.workers)
    table: dict[str, list] = {}
    for j, r in zip(uniform + mixed, done):
        summary = json.loads(Path(j["out"]).with_suffix(".json").read_text())
        table.setdefault(j["variant"], []).append({**r, "bits": summary["bits"], "avg_bits": summary.get("avg_bits")})
    fp_top1 = [r["summary"]["final_accuracy"] for r in fp]
    lines = [f"# Bits per layer under a size budget ({args.data}, {args.seeds} paired seeds)", "",
             f"Command: `python benchmarks/ptq_budget.py --data {args.data} --seeds {args.seeds} "
             f"--budgets {','.join(budgets)}`", "",
             f"FP: {stats(fp_top1)['mean']:.2f} (seeds {', '.join(f'{v:.2f}' for v in fp_top1)}). GPTQ (the command's "
             f"defaults), {CALIB_IMAGES} calibration images, BN re-estimated on 10 training batches. Size budget: "
             f"`--size-budget {budget}` (seed 0's uniform k-bit 2 file: {kbit2_file:,} bytes).", "",
             "| variant | top-1 mean ± std | 95% CI | paired vs GPTQ kbit2 [95% CI] | paired vs GPTQ kbit3 [95% CI] "
             "| file bytes (mean) | / kbit2 file | avg bits (codes + scales) | layers per width (seed 0) |",
             "|---|---:|---|---|---|---:|---:|---:|---|"]
    payload = {"data": args.data, "seeds": args.seeds, "fp": stats(fp_top1), "size_budget": budget,
               "kbit2_file_bytes": kbit2_file, "rows": {}}

    def diff(values, base):
        d = paired(values, [r["top1"] for r in table[base]])
        return d, f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else f"{d['mean']:+.2f}"

    for variant, rows in table.items():
        values = [r["top1"] for r in rows]
        st = stats(values)
        by2, text2 = diff(values, "GPTQ kbit2")
        by3, text3 = diff(values, "GPTQ kbit3")
        size = sum(r["bytes"] for r in rows) / len(rows)
        bits = rows[0]["bits"]
        widths = (", ".join(f"{list(bits.values()).count(b)} x {b}" for b in sorted(set(bits.values())))
                  if isinstance(bits, dict) else f"all {bits}")
        avg = [r["avg_bits"] for r in rows if r["avg_bits"] is not None]
        ci = f"[{st['ci95'][0]:.2f}, {st['ci95'][1]:.2f}]" if st["ci95"] else ""
        lines.append(f"| {variant} | {st['mean']:.2f} ± {st['std']:.2f} | {ci} | "
                     f"{text2 if variant != 'GPTQ kbit2' else ''} | {text3 if variant != 'GPTQ kbit3' else ''} | "
                     f"{size:,.0f} | {size / kbit2_file:.3f} | {f'{sum(avg) / len(avg):.3f}' if avg else ''} | "
                     f"{widths} |")
        payload["rows"][variant] = {"top1": st, "vs_kbit2": by2, "vs_kbit3": by3, "bytes": [r["bytes"] for r in rows],
                                    "bits": [r["bits"] for r in rows], "avg_bits": avg,
                                    "seconds": [r["seconds"] for r in rows]}
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / f"ptq_budget_{args.data}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
