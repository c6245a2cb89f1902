"""Product quantization (And the Bit Goes Down) of the digits FP model, next to BWN/TWN/SQ of similar size.

    python benchmarks/compress_digits.py                 # 10 seeds: a table (and benchmarks/out/compress_digits/)
    python benchmarks/compress_digits.py --seeds 3 --json
    python benchmarks/compress_digits.py --quick         # smoke test: 2 seeds, short runs

For every seed ``s``: train ``recipes/digits_{fp,bwn,twn}.yaml`` (20 epochs) and
``digits_sq_{bwn,twn}.yaml`` (4 stages of 5 epochs, each a fresh run from the last weights:
the paper's protocol, the same number of steps as the 20-epoch baselines) with
``train.seed=s sq.seed=s``; then compress the FP run with ``python -m sqdist.compress`` at
small and large blocks, twice:

- ``EM only``: ``--layer-steps 0 --finetune-steps 0`` (codebooks fitted to the layer outputs, nothing else);
- ``fine-tuned``: per-layer codebook fine-tuning (``--layer-steps``), reported before
  (``before global``) and after the global fine-tuning (``--finetune-steps``, as many steps as
  the FP run trained).

BN statistics are re-estimated on 10 batches before every evaluation, as the digits recipes do
for the quantized runs. Sizes: the bytes of each written file (``python -m sqdist.export`` for
BWN/TWN/SQ, the stem conv and classifier fp32 as trained), against the FP run's
``model.safetensors``. Runs are cached under ``--runs`` (a run whose summary or file exists is
read back; ``--fresh`` redoes them); one thread per run, ``--workers`` at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

from digits_common import ROOT, export_bytes, pool_map, stats, train_job

TRAINED = {"FP": "digits_fp", "BWN": "digits_bwn", "TWN": "digits_twn",
           "SQ-BWN": "digits_sq_bwn", "SQ-TWN": "digits_sq_twn"}


def compress_job(job: dict) -> dict:
    """``python -m sqdist.compress`` in this process (one thread); returns the file's results and size."""
    import torch

    torch.set_num_threads(1)
    from sqdist.compress import read_compressed
    from sqdist.compress.cli import main

    out = Path(job["out"])
    if not out.exists() or job["fresh"]:
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main([job["run_dir"], str(out), *job["flags"], "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"sqdist.compress {job['run_dir']} {out} failed: {err.getvalue()[-2000:]}")
        (out.with_suffix(".seconds")).write_text(f"{time.time() - t0:.1f}")
    _, _, meta = read_compressed(out)
    return {**meta["results"], "bytes": out.stat().st_size, "seconds": float(out.with_suffix(".seconds").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds (default 10)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="epochs of the FP/BWN/TWN runs; SQ: 4 stages of epochs/4 (default 20)")
    parser.add_argument("--em-iters", type=int, default=100)
    parser.add_argument("--layer-steps", type=int, default=20)
    parser.add_argument("--layer-lr", type=float, default=0.01)
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: the FP run's steps")
    parser.add_argument("--lr", type=float, default=0.05, help="global fine-tuning LR (the recipes' training LR)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 4 epochs, 10 EM iterations")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "out" / "compress_digits_runs"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "compress_digits"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.em_iters, args.layer_steps = 2, 4, 10, 5
    if args.epochs % 4:
        parser.error(f"--epochs={args.epochs}: expected a multiple of 4 (the SQ runs train 4 stages)")

    t0 = time.time()
    jobs = []
    for seed in range(args.seeds):
        common = [f"train.seed={seed}", "train.progress=false", "track.wandb=false", f"train.epochs={args.epochs}"]
        for method in TRAINED:
            extra = [] if method == "FP" else [f"sq.seed={seed}"]
            if method.startswith("SQ"):
                extra += [f"sq.stage_length={args.epochs // 4}", "sq.unit=epoch", "sq.restart_per_stage=true"]
            jobs.append({"method": method, "recipe": TRAINED[method], "name": method, "seed": seed,
                         "overrides": common + extra, "runs": args.runs, "fresh": args.fresh})
    trained = pool_map(train_job, jobs, args.workers)
    acc = {m: [] for m in TRAINED}
    fp_runs = {}
    for job, res in zip(jobs, trained):
        acc[job["method"]].append(res["summary"]["final_accuracy"])
        if job["method"] == "FP":
            fp_runs[job["seed"]] = res
    steps = fp_runs[0]["summary"]["total_steps"]
    finetune_steps = steps if args.finetune_steps is None else args.finetune_steps
    common_flags = ["--em-iters", str(args.em_iters), "train.bn_recalibrate=10"]
    variants = {"EM only": ["--layer-steps", "0", "--finetune-steps", "0"],
                "fine-tuned": ["--layer-steps", str(args.layer_steps), "--layer-lr", str(args.layer_lr),
                               "--finetune-steps", str(finetune_steps), "--lr", str(args.lr)]}
    cjobs = []
    for seed, res in fp_runs.items():
        for blocks in ("small", "large"):
            for variant, flags in variants.items():
                tag = hashlib.sha1(json.dumps([blocks, flags, common_flags]).encode()).hexdigest()[:8]
                cjobs.append({"seed": seed, "blocks": blocks, "variant": variant, "run_dir": res["run_dir"],
                              "flags": ["--blocks", blocks, *common_flags, *flags], "fresh": args.fresh,
                              "out": str(Path(res["run_dir"]) / f"pq_{blocks}_{tag}.safetensors")})
    compressed = pool_map(compress_job, cjobs, args.workers)

    fp32_bytes = (Path(fp_runs[0]["run_dir"]) / "final" / "model.safetensors").stat().st_size
    first = {job["method"]: res["run_dir"] for job, res in zip(jobs, trained) if job["seed"] == 0}
    sizes = {"FP": fp32_bytes, **{m: export_bytes(first[m]) for m in ("BWN", "TWN", "SQ-BWN", "SQ-TWN")}}
    rows = {m: {"bytes": sizes[m], "top1": stats(acc[m])} for m in TRAINED}
    for blocks in ("small", "large"):
        em = [r for j, r in zip(cjobs, compressed) if j["blocks"] == blocks and j["variant"] == "EM only"]
        ft = [r for j, r in zip(cjobs, compressed) if j["blocks"] == blocks and j["variant"] == "fine-tuned"]
        rows[f"PQ {blocks}, EM only"] = {"bytes": em[0]["bytes"], "top1": stats([r["top1"] for r in em]),
                                         "seconds": stats([r["seconds"] for r in em])}
        rows[f"PQ {blocks}, before global fine-tuning"] = {"bytes": ft[0]["bytes"],
                                                           "top1": stats([r["top1_compressed"] for r in ft])}
        rows[f"PQ {blocks}, fine-tuned"] = {"bytes": ft[0]["bytes"], "top1": stats([r["top1"] for r in ft]),
                                            "seconds": stats([r["seconds"] for r in ft])}
    meta = {"seeds": args.seeds, "epochs": args.epochs, "fp32_bytes": fp32_bytes, "compress_flags": variants,
            "common_flags": common_flags, "finetune_steps": finetune_steps, "wall_seconds": round(time.time() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return
    print(f"Digits test top-1 (%), {args.seeds} seeds; FP/BWN/TWN {args.epochs} epochs, SQ 4 x {args.epochs // 4}; "
          f"file sizes against the FP run's model.safetensors ({fp32_bytes} bytes).\n")
    print("| model | file bytes | smaller than fp32 | mean | std | min | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        t = r["top1"]
        print(f"| {name} | {r['bytes']} | {fp32_bytes / r['bytes']:.2f}x | {t['mean']:.2f} | {t['std']:.2f} | "
              f"{t['min']:.2f} | {t['max']:.2f} |")
    print(f"\nwall {meta['wall_seconds']} s; compress flags {variants}, {common_flags}")


if __name__ == "__main__":
    main()
