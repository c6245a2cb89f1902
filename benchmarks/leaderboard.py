"""One leaderboard for every method: top-1 against the size of the exported file (digits or Fashion-MNIST).

    python benchmarks/leaderboard.py                   # 10 seeds x 10 epochs, every row: table, JSON, plot
    python benchmarks/leaderboard.py --quick --json    # smoke test (CI): 2 seeds, 2 epochs, 5 rows
    python benchmarks/leaderboard.py --rows FP,TWN,SQ-TWN --seeds 20
    python benchmarks/leaderboard.py --data fashion_mnist --publish   # 5 seeds x 2 epochs, its rows; ~2.5 h

``--data fashion_mnist`` runs every row in the setting of ``recipes/fashion_mnist_fp.yaml``
(its model, data and BN re-estimation replace the digits ones; each row keeps its method's
optimizer) and adds a longer budget (rows ``... 3x``: 3x the epochs) where the budget decides
the result (SLB's annealing, SQ's stages; TWN 3x is SQ-TWN 3x's base).
``benchmarks/leaderboard_budget.py`` estimates the seconds of every row before a run.

The setting of ``benchmarks/digits_sq.py``: its narrow resnet10t (channels 4-32) on 8x8
digits, SGD lr 0.05, cosine, weight decay 5e-4, batch 64, BN re-estimated on 10 batches
before the evaluation; the stem conv and the classifier stay full precision. Every row
trains the same epochs (compute matched; SQ's four stages split that one schedule), except
the rows marked ``paper``: SQ's own protocol, four full runs of E epochs from the last
weights (4x the steps). Seed ``s`` sets ``train.seed`` (and ``sq.seed``): rows are paired by
seed, and each quantized row gets the paired difference against the plain method of its bits
(``base``).

Per row: top-1 mean, std and 95% CI over the seeds; the paired difference; the bytes of
the file ``python -m sqdist.export`` writes for seed 0's run (packed codes, stem and
classifier fp32; FP: the run's ``final/model.safetensors``; PQ rows: the file
``python -m sqdist.compress`` writes; PTQ rows: the file ``python -m sqdist.ptq`` writes from
the same seed's FP run, see ``benchmarks/ptq_rows.py``); and the time of one training step against FP's,
measured after all training in this process, one thread, on the same batch, by
``digits_common.step_times`` (the function ``benchmarks/method_speed.py`` uses): the rows
interleaved in rounds, median step.

A method is one line of ``ROWS``; a row whose quantizer is not installed, or whose runs fail,
is printed with that status instead of numbers. Runs are cached by recipe under ``--runs``
(and read back from the other digits benchmarks' run folders).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from digits_common import (OUT, ROOT, check_counts, export_bytes, load, paired, pool_map, safe_job, save_results, stats,
                           step_times, train_all)
from ptq_rows import PTQ_ROWS, bits_label, ptq_jobs, safe_ptq_job

KBIT = "quant.name=kbit"
SQ_STEPS = "sq.unit=step"  # compute-matched SQ: the four stages split one schedule (stage length set in plan())


@dataclass
class Row:
    """A leaderboard row: a recipe and its overrides (or a compression of the FP run)."""

    recipe: str
    overrides: list = field(default_factory=list)
    base: str | None = None          # the plain method of the same bits: paired difference against it
    what: str = ""                   # weights / activations, in words
    needs: tuple = ()                # ("quantizer", name) / ("activation", name) that must be registered
    protocol: str = "matched"        # matched | paper (SQ's protocol, 4x the steps)
    compress: str | None = None      # PQ block size ("small" | "large"): compress seed s's FP run
    ptq: bool = False                # post-training quantization of seed s's FP run (benchmarks/ptq_rows.py)
    budget: int = 1                  # epochs of the run: budget x --epochs (a longer schedule of the same method)


# One line per method. Plugin rows come from plugins/sqdist-{slb,esb,srq}.
ROWS = {
    "FP": Row("digits_fp", what="fp32"),
    "kbit8": Row("digits_bwn", [KBIT, "quant.params={bits: 8}"], "FP", "k-bit 8, mse scale"),
    "kbit6": Row("digits_bwn", [KBIT, "quant.params={bits: 6}"], "FP", "k-bit 6, mse scale"),
    "kbit4": Row("digits_bwn", [KBIT, "quant.params={bits: 4}"], "FP", "k-bit 4, mse scale"),
    "kbit3": Row("digits_bwn", [KBIT, "quant.params={bits: 3}"], "FP", "k-bit 3, mse scale"),
    "kbit2": Row("digits_bwn", [KBIT, "quant.params={bits: 2, scale: mse}"], "FP", "k-bit 2 (ternary), mse scale"),
    "kbit2 LSQ step": Row("digits_bwn", [KBIT, "quant.params={bits: 2, scale: lsq}"], "kbit2",
                          "k-bit 2, learned step (LSQ)"),
    "TWN": Row("digits_twn", [], "kbit2", "TWN (ternary)"),
    "BWN": Row("digits_bwn", [], None, "BWN (binary)"),
    "SQ-TWN": Row("digits_sq_twn", [SQ_STEPS], "TWN", "SQ over TWN"),
    "SQ-BWN": Row("digits_sq_bwn", [SQ_STEPS], "BWN", "SQ over BWN"),
    "SQ-kbit2": Row("digits_sq_twn", [SQ_STEPS, KBIT, "quant.params={bits: 2, scale: mse}"], "kbit2",
                    "SQ over k-bit 2"),
    "SQ-kbit2 LSQ step": Row("digits_sq_twn", [SQ_STEPS, KBIT, "quant.params={bits: 2, scale: lsq}"], "kbit2 LSQ step",
                             "SQ over k-bit 2 with a learned step"),
    "SQ-TWN (paper)": Row("digits_sq_twn", [], "TWN", "SQ over TWN, 4 runs of E epochs", protocol="paper"),
    "SQ-BWN (paper)": Row("digits_sq_bwn", [], "BWN", "SQ over BWN, 4 runs of E epochs", protocol="paper"),
    "W1A2 LSQ": Row("digits_bwn", ["quant.activations={name: lsq, bits: 2}"], None, "BWN / LSQ 2"),
    "W2A2 LSQ": Row("digits_w2a2", [], None, "k-bit 2 LSQ step / LSQ 2"),
    "W2A2 PACT": Row("digits_w2a2", ["quant.activations={name: pact, bits: 2, alpha: calibrate}"], "W2A2 LSQ",
                     "k-bit 2 LSQ step / PACT 2 (alpha from data)"),
    "W2A2 PACT alpha=10": Row("digits_w2a2", ["quant.activations={name: pact, bits: 2}"], "W2A2 LSQ",
                              "k-bit 2 LSQ step / PACT 2 (alpha from the paper's 10)"),
    "W3A3 LSQ": Row("digits_w2a2", ["quant.params={bits: 3, scale: lsq}", "quant.activations={name: lsq, bits: 3}"],
                    None, "k-bit 3 LSQ step / LSQ 3"),
    "W4A4 LSQ": Row("digits_w2a2", ["quant.params={bits: 4, scale: lsq}", "quant.activations={name: lsq, bits: 4}"],
                    None, "k-bit 4 LSQ step / LSQ 4"),
    "SLB W1": Row("digits_slb", [], "BWN", "SLB 1 bit (SGD momentum, its recipe's schedule)", needs=(("quantizer", "slb"),)),
    "SLB W2": Row("digits_slb", ["quant.params.bits=2"], "kbit2", "SLB 2 bits", needs=(("quantizer", "slb"),)),
    # the same methods on 3x the epochs: SQ's matched stages and SLB's temperature schedule stretch with the run
    "TWN 3x": Row("digits_twn", [], "TWN", "TWN (ternary), 3x epochs", budget=3),
    "TWN 4x": Row("digits_twn", [], "TWN", "TWN (ternary), 4x epochs: the steps of SQ's paper protocol", budget=4),
    "SQ-TWN 3x": Row("digits_sq_twn", [SQ_STEPS], "TWN 3x", "SQ over TWN, 3x epochs", budget=3),
    "SLB W1 3x": Row("digits_slb", [], "SLB W1", "SLB 1 bit, 3x epochs", needs=(("quantizer", "slb"),), budget=3),
    "SLB W2 3x": Row("digits_slb", ["quant.params.bits=2"], "SLB W2", "SLB 2 bits, 3x epochs",
                     needs=(("quantizer", "slb"),), budget=3),
    "ESB W3": Row("digits_esb", ["quant.params.bits=3"], "kbit3", "ESB 3 bits, m=1", needs=(("quantizer", "esb"),)),
    "ESB W4": Row("digits_esb", [], "kbit4", "ESB 4 bits, m=1", needs=(("quantizer", "esb"),)),
    "SQ-ESB W4": Row("digits_sq_twn", [SQ_STEPS, "quant.name=esb", "quant.params={bits: 4, linear_bits: 1}"], "ESB W4",
                     "SQ over ESB 4 bits", needs=(("quantizer", "esb"),)),
    "ESB W4A4": Row("digits_esb", ["quant.activations={name: esb, bits: 4, linear_bits: 1}"], "W4A4 LSQ",
                    "ESB 4 / ESB 4", needs=(("quantizer", "esb"), ("activation", "esb"))),
    "SRQ W2A2": Row("digits_srq_w2a2", [], "W2A2 LSQ", "SRQ 2 / SRQ 2", needs=(("quantizer", "srq"),)),
    "SRQ W3A3": Row("digits_srq_w2a2", ["quant.params.bits=3", "quant.activations.bits=3"], "W3A3 LSQ", "SRQ 3 / SRQ 3",
                    needs=(("quantizer", "srq"),)),
    "SRQ+DropBits W2A2": Row("digits_srq_w2a2", ["quant.params.drop_prob=0.05"], "W2A2 LSQ",
                             "SRQ 2 + DropBits (weights, p=0.05) / SRQ 2", needs=(("quantizer", "srq"),)),
    "SRQ learned widths": Row("digits_srq_learned_bits", [], None, "SRQ, learned bits per layer (2-4) / SRQ 4",
                              needs=(("quantizer", "srq"),)),
    "PQ small blocks": Row("digits_fp", [], "FP", "And the Bit Goes Down, small blocks", compress="small"),
    "PQ large blocks": Row("digits_fp", [], "FP", "And the Bit Goes Down, large blocks", compress="large"),
}
ROWS.update({label: Row("digits_fp", [], base, what, ptq=True) for label, (*_, base, what) in PTQ_ROWS.items()})
QUICK_ROWS = ["FP", "BWN", "TWN", "SQ-TWN", "kbit4"]
LONG_ROWS = ["TWN 3x", "SQ-TWN 3x", "SLB W1 3x", "SLB W2 3x"]
TIMING_ROUNDS = 3  # step times: the rows interleaved in 3 rounds (digits_common.step_times)


@dataclass
class Data:
    """A task the leaderboard runs on: its setting, and the defaults of a full run."""

    setting: str | None   # recipe whose model, data and BN re-estimation replace each row's (None: the rows' own)
    seeds: int
    epochs: int
    rows: list            # the rows of a full run


# fashion_mnist: 5 seeds x 2 epochs (3x rows: 6, SQ paper rows: 8) fit 2.5 hours on 2 idle cores: about 2.0 h at
# the step costs measured in December 2026 with the windowed SRQ (2.6 h with the full-grid SRQ before it);
# benchmarks/leaderboard_budget.py --data fashion_mnist prints the estimate row by row
DATASETS = {
    "digits": Data(None, 10, 10, [r for r in ROWS if r not in LONG_ROWS]),
    "fashion_mnist": Data("fashion_mnist_fp", 5, 2, [
        "FP", "kbit8", "kbit4", "kbit3", "kbit2", "TWN", "BWN", "SQ-TWN", "SQ-BWN", "SQ-TWN (paper)", "SQ-BWN (paper)",
        "W2A2 LSQ", "W4A4 LSQ", "SLB W1", "SLB W2", "ESB W4", "SRQ W2A2", "SRQ learned widths", "PQ small blocks",
        *LONG_ROWS, *PTQ_ROWS]),
}


def setting_overrides(data: str) -> list[str]:
    """Overrides that put any row's recipe in ``data``'s setting: model, data, BN re-estimation."""
    setting = DATASETS[data].setting
    if setting is None:
        return []
    r = load(setting, [])
    d = r["data"]
    return [f"model.name={r['model']['name']}", f"model.kwargs={json.dumps(r['model']['kwargs'])}",
            f"data.name={d['name']}", f"data.root={d['root']}", f"data.image_size={d['image_size']}",
            f"data.batch_size={d['batch_size']}", f"data.augment={str(d['augment']).lower()}",
            f"train.bn_recalibrate={r['train']['bn_recalibrate']}"]


def steps_per_epoch(recipe: dict) -> int:
    from sqdist.data import build_datasets

    train_set, _ = build_datasets(recipe)
    return len(train_set) // recipe["data"]["batch_size"]


def missing(row: Row) -> str | None:
    """Why the row cannot run here (a quantizer or recipe that is not installed), or None."""
    import sqdist

    for kind, name in row.needs:
        names = sqdist.list_quantizers() if kind == "quantizer" else sqdist.list_activation_quantizers()
        if name not in names:
            return f"not available: {kind} {name!r} is not installed"
    if not (ROOT / "recipes" / f"{row.recipe}.yaml").exists():
        return f"not available: recipes/{row.recipe}.yaml does not exist"
    return None


def plan(rows: list[str], seeds: int, epochs: int, per_epoch: int, runs: str, fresh: bool,
         setting: list[str] = ()) -> list[dict]:
    """Training jobs: one per (row, seed); a PQ row trains (reads back) the FP run it compresses.
    ``setting``: overrides put before each row's (see :func:`setting_overrides`)."""
    jobs = []
    for label in rows:
        row = ROWS[label]
        row_epochs = epochs * row.budget
        stage = math.ceil(row_epochs * per_epoch / 4)  # compute-matched SQ: 4 stages in one run of `row_epochs`
        for seed in range(seeds):
            common = [f"train.seed={seed}", "train.progress=false", "track.wandb=false"]
            if row.protocol == "paper":
                extra = [f"train.epochs={4 * epochs}", f"sq.seed={seed}", f"sq.stage_length={epochs}", "sq.unit=epoch",
                         "sq.restart_per_stage=true"]
            else:
                extra = [f"train.epochs={row_epochs}"]
                if SQ_STEPS in row.overrides:
                    extra += [f"sq.seed={seed}", f"sq.stage_length={stage}", "sq.restart_per_stage=false"]
            overrides = common + list(setting) + row.overrides + extra
            name = "FP" if row.compress or row.ptq else label
            jobs.append({"label": label, "seed": seed, "recipe": row.recipe, "overrides": overrides, "name": name,
                         "runs": runs, "fresh": fresh, "cost": 4 if row.protocol == "paper" else row.budget,
                         "cache": [str(OUT / "wa_bits_runs"), str(OUT / "digits_sq_runs")]})
    return jobs


def compress_one(job: dict) -> dict:
    from compress_digits import compress_job

    return compress_job(job)


def _safe_compress(job: dict) -> dict:
    return safe_job(compress_one, job)


def compress_flags(blocks: str, fp_steps: int, quick: bool) -> list[str]:
    """``sqdist.compress`` as ``benchmarks/compress_digits.py`` runs it (fine-tuned: layer and global)."""
    em, layer = (10, 5) if quick else (100, 20)
    return ["--blocks", blocks, "--em-iters", str(em), "train.bn_recalibrate=10", "--layer-steps", str(layer),
            "--layer-lr", "0.01", "--finetune-steps", str(fp_steps), "--lr", "0.05"]


def collect(rows: list[str], jobs: list[dict], results: list[dict], compressed: dict, seeds: int) -> dict:
    """Per row: status, top-1 statistics, size, bits (no paired differences yet)."""
    out = {}
    for label in rows:
        row = ROWS[label]
        mine = [(j, r) for j, r in zip(jobs, results) if j["label"] == label]
        errors = [r["error"] for _, r in mine if "error" in r]
        entry = {"method": label, "what": row.what, "protocol": row.protocol, "base": row.base, "seeds": seeds}
        if row.compress or row.ptq:
            cres = compressed.get(label, [])
            errors += [r["error"] for r in cres if "error" in r]
        if errors:
            out[label] = {**entry, "status": f"failed: {errors[0]}"}
            continue
        summaries = {j["seed"]: r["summary"] for j, r in mine}
        run0 = next(r["run_dir"] for j, r in mine if j["seed"] == 0)
        if row.compress or row.ptq:
            top1 = [r["top1"] for r in compressed[label]]
            size = compressed[label][0]["bytes"]
            bits = "PQ" if row.compress else bits_label(label)
            if row.ptq:
                errors = [r["layer_output_error_sum"] for r in compressed[label]]
                entry["layer_output_error_sum"] = round(sum(errors) / len(errors), 4)
        else:
            top1 = [summaries[s]["final_accuracy"] for s in range(seeds)]
            fp = not load(row.recipe, [])["quant"]["enabled"]
            try:
                size = (Path(run0) / "final" / "model.safetensors").stat().st_size if fp else export_bytes(run0)
            except ValueError as exc:  # ExportError: a method the packed format cannot hold (the row keeps its top-1)
                size, entry["export_error"] = None, str(exc).splitlines()[0][:200]
            bits = summaries[0].get("bits") or "W32A32"
            if summaries[0].get("avg_weight_bits") is not None and len(set(summaries[0]["layer_bits"].values())) > 1:
                bits += f" (avg {summaries[0]['avg_weight_bits']:.2f} bits)"
        out[label] = {**entry, "status": "ok" if size else "ok, no export", "bits": bits, "top1": stats(top1),
                      "top1_mean": round(sum(top1) / len(top1), 3), "size_bytes": int(size) if size else None,
                      "cached_runs": sum(bool(r.get("cached")) for _, r in mine)}
    for label, entry in out.items():
        base = entry["base"]
        if "top1" in entry and base in out and "top1" in out[base]:
            entry["vs_base"] = paired(entry["top1"]["runs"], out[base]["top1"]["runs"])
    return out


def table(out: dict, meta: dict) -> str:
    fp = out.get("FP", {})
    lines = ["| method | W/A | protocol | top-1 mean ± std | 95% CI | vs base: paired diff [95% CI] | file bytes | "
             "smaller than FP | step time / FP | status |",
             "|---|---|---|---:|---|---|---:|---:|---:|---|"]
    for label, e in out.items():
        if "top1" not in e:
            lines.append(f"| {label} | | {e['protocol']} | | | | | | | {e['status']} |")
            continue
        t = e["top1"]
        ci = f"[{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]" if t["ci95"] else ""
        d = e.get("vs_base")
        diff = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] vs {e['base']}" if d and d["ci95"] else ""
        smaller = f"{fp['size_bytes'] / e['size_bytes']:.2f}x" if fp.get("status") == "ok" and e["size_bytes"] else ""
        size = f"{e['size_bytes']:,}" if e["size_bytes"] else "n/a"
        ratio = f"{e['step_ratio']:.2f}" if e.get("step_ratio") else "n/a"
        protocol = "paper (4x steps)" if e["protocol"] == "paper" else (
            f"{ROWS[label].budget}x steps" if label in ROWS and ROWS[label].budget > 1 else "matched")
        lines.append(f"| {label} | {e['bits']} | {protocol} | {t['mean']:.2f} ± {t['std']:.2f} | {ci} | {diff} | "
                     f"{size} | {smaller} | {ratio} | {e['status']}" + (f": {e['export_error']}" if e.get("export_error") else "") + " |")
    return "\n".join(lines)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size (smaller) and top-1 (higher), by size."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def plot(out: dict, path: Path, meta: dict, floor: float | None = 60.0) -> None:
    """Top-1 (mean ± std) against file size, one legend entry per row, the Pareto front drawn;
    rows below ``floor`` are named under the plot instead of stretching the axis (None: the axis
    starts a point below the lowest mean minus its std of the rows at 60% or more, for tables whose rows
    lie close together; never below 60)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(e["size_bytes"], e["top1"]["mean"], label, e) for label, e in out.items() if e.get("size_bytes")]
    if floor is None:  # never below 60: a collapsed row (10%) is still named below the axis, not plotted
        low = [m - e["top1"]["std"] for _, m, _, e in ok if math.isfinite(m - e["top1"]["std"]) and m >= 60.0]
        floor = max(60.0, math.floor(min(low) - 1.0)) if low else 60.0
    shown = [p for p in ok if p[1] >= floor]
    below = [p for p in ok if p[1] < floor]
    colors = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors
    fig, ax = plt.subplots(figsize=(11, 6.2))
    for i, (size, mean, label, e) in enumerate(shown):
        longer = e["protocol"] == "paper" or ROWS.get(label, Row("")).budget > 1
        marker = "s" if longer else ("D" if not e["bits"].split(" ")[0].endswith("A32") else "o")
        ax.errorbar(size, mean, yerr=e["top1"]["std"], fmt=marker, capsize=2, ms=5, color=colors[i % len(colors)],
                    label=f"{label} ({e['bits']}): {mean:.1f}")
    front = pareto([(s, m, label) for s, m, label, _ in ok])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2, ls="--",
                label="Pareto front: " + " > ".join(p[2] for p in front))
    matched = pareto([(s, m, label) for s, m, label, e in ok
                      if e["protocol"] == "matched" and ROWS.get(label, Row("")).budget == 1])
    if matched != front:
        ax.step([p[0] for p in matched], [p[1] for p in matched], where="post", color="gray", lw=1, ls=":",
                label="same compute only: " + " > ".join(p[2] for p in matched))
    ax.set_xscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("exported file size (bytes, log scale)")
    ax.set_ylabel(f"{meta.get('data', 'digits')} test top-1 (%), mean ± std over seeds")
    note = "; ".join(f"{label} {mean:.1f}%" for _, mean, label, _ in below)
    ax.set_title(f"Every method on {meta.get('data', 'digits')}, {meta['seeds']} seeds x {meta['epochs']} epochs\n"
                 "circles weights only, diamonds W/A, squares 3-4x steps (SQ's paper protocol, 3x rows)"
                 + (f"\nbelow the axis: {note}" if note else ""), fontsize=8.5)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.3, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")  # the legend outside the axes, nothing blank beside it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=list(DATASETS),
                        help="the task: digits (default) or fashion_mnist (the setting of recipes/fashion_mnist_fp.yaml)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default: digits 10, fashion_mnist 5)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run; SQ paper rows: 4x, 3x rows: 3x (default: digits 10, fashion_mnist 2)")
    parser.add_argument("--rows", default=None, help="comma list of rows (default: the data's full list); allowed: "
                        + ", ".join(ROWS))
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: 2 seeds, 2 epochs, rows {','.join(QUICK_ROWS)}, 10 timed steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each (default 2)")
    parser.add_argument("--timed-steps", type=int, default=30, help="steps timed per row (median; default 30)")
    parser.add_argument("--out", default=None, help="folder of table.md, results.json, leaderboard.png "
                        "(default benchmarks/out/leaderboard, for fashion_mnist leaderboard_fashion_mnist)")
    parser.add_argument("--runs", default=None, help="run folders, cached by recipe (default benchmarks/out/"
                        "leaderboard_runs, for fashion_mnist leaderboard_fashion_mnist_runs)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that are cached")
    parser.add_argument("--publish", action="store_true", help="also write the table and the plot to "
                        "benchmarks/results/leaderboard_<data>.md/.png")
    args = parser.parse_args()
    data = DATASETS[args.data]
    suffix = "" if args.data == "digits" else f"_{args.data}"
    args.out = args.out or str(OUT / f"leaderboard{suffix}")
    args.runs = args.runs or str(OUT / f"leaderboard{suffix}_runs")
    args.seeds = data.seeds if args.seeds is None else args.seeds
    args.epochs = data.epochs if args.epochs is None else args.epochs
    if args.quick:
        args.seeds, args.epochs, args.timed_steps = 2, 2, 10
    check_counts(parser, args, ("seeds", "epochs", "workers", "timed_steps"))
    rows = QUICK_ROWS if args.quick and args.rows is None else (
        list(data.rows) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()])
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: {unknown[0] if unknown else '(empty)'!r} is not a row; allowed: {', '.join(ROWS)}")
    if args.publish and args.rows is not None and set(rows) != set(data.rows):
        parser.error(f"--publish with --rows={args.rows!r} would replace the published table with only those rows; "
                     f"allowed: --publish without --rows (every row), or --rows without --publish (table in --out)")

    t0 = time.time()
    setting = setting_overrides(args.data)
    probe = load("digits_fp", setting)
    per_epoch = steps_per_epoch(probe)
    status = {label: missing(ROWS[label]) for label in rows}
    runnable = [label for label in rows if status[label] is None]
    jobs = plan(runnable, args.seeds, args.epochs, per_epoch, args.runs, args.fresh, setting)
    results = train_all(jobs, args.workers, keep_going=True)

    compressed: dict[str, list] = {}
    cjobs = []
    for label in runnable:
        row = ROWS[label]
        if not row.compress:
            continue
        for j, r in zip(jobs, results):
            if j["label"] == label and "error" not in r:
                flags = compress_flags(row.compress, r["summary"]["total_steps"], args.quick)
                tag = hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:8]
                cjobs.append({"label": label, "seed": j["seed"], "run_dir": r["run_dir"], "flags": flags,
                              "fresh": args.fresh, "out": str(Path(r["run_dir"]) / f"pq_{row.compress}_{tag}.safetensors")})
    for cj, cr in zip(cjobs, pool_map(_safe_compress, cjobs, args.workers)):
        compressed.setdefault(cj["label"], []).append(cr)
    pjobs = ptq_jobs(runnable, jobs, results, args.fresh)
    for pj, pr in zip(pjobs, pool_map(safe_ptq_job, pjobs, args.workers)):
        compressed.setdefault(pj["label"], []).append(pr)

    out = collect(runnable, jobs, results, compressed, args.seeds)
    timing_runs = {label: next(j for j in jobs if j["label"] == label) for label in runnable
                   if "top1" in out[label] and not (ROWS[label].compress or ROWS[label].ptq)}
    if "FP" in timing_runs:  # time per step, after all training, one row after another
        times = step_times({label: load(j["recipe"], j["overrides"]) for label, j in timing_runs.items()},
                           args.timed_steps, rounds=TIMING_ROUNDS)
        fp = times["FP"].get("median")
        for label, t in times.items():
            if "median" in t and fp:
                out[label]["step_seconds"] = round(t["median"], 5)
                out[label]["step_ratio"] = round(t["median"] / fp, 3)
    ordered = {}
    for label in rows:
        ordered[label] = out.get(label) or {"method": label, "what": ROWS[label].what, "protocol": ROWS[label].protocol,
                                            "base": ROWS[label].base, "status": status[label]}
    meta = {"data": args.data, "seeds": args.seeds, "epochs": args.epochs, "steps_per_epoch": per_epoch,
            "model": f"{probe['model']['name']} {probe['model']['kwargs']}", "image_size": probe["data"]["image_size"],
            "optim": f"{probe['optim']['name']} lr {probe['optim']['lr']}, {probe['sched']['name']} schedule",
            "bn_recalibrate": probe["train"]["bn_recalibrate"], "timed_steps": args.timed_steps,
            "runs": len(jobs) + len(cjobs) + len(pjobs), "runs_cached": sum(bool(r.get("cached")) for r in results),
            "wall_seconds": round(time.time() - t0, 1), "command": " ".join(["python benchmarks/leaderboard.py", *sys.argv[1:]])}
    text = table(ordered, meta)
    rows_json = list(ordered.values())
    folder = save_results(args.out, text, {"rows": rows_json, "meta": meta})
    plot(ordered, folder / "leaderboard.png", meta)
    if args.publish:
        published = ROOT / "benchmarks" / "results" / f"leaderboard_{args.data}"  # not the digits write-up
        published.with_suffix(".md").write_text(
            f"# Leaderboard: every method on {args.data}\n\n    {meta['command']}\n\n"
            f"![top-1 against file size]({published.name}.png)\n\nSetting: {meta['model']}, {meta['image_size']}x"
            f"{meta['image_size']} inputs, {meta['optim']} (SLB: its recipe's optimizer), {args.epochs} epochs "
            f"({per_epoch} steps each), {args.seeds} seeds; wall {meta['wall_seconds']} s.\n\n{text}\n")
        published.with_suffix(".png").write_bytes((folder / "leaderboard.png").read_bytes())
    if args.json:
        print(json.dumps({"rows": rows_json, "meta": meta}))
        return
    print(text)
    print(f"\nplot: {folder / 'leaderboard.png'}; wall {meta['wall_seconds']} s; {meta['runs']} runs "
          f"({meta['runs_cached']} read back from the cache)")


if __name__ == "__main__":
    main()
