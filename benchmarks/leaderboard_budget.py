"""How long a full ``benchmarks/leaderboard.py`` run takes, estimated row by row before running it.

    python benchmarks/leaderboard_budget.py --data fashion_mnist            # its default seeds, epochs and rows
    python benchmarks/leaderboard_budget.py --data fashion_mnist --epochs 4 --rows FP,TWN,SLB\\ W1

For each row it builds seed 0's recipe exactly as the leaderboard would, then measures on one
thread: the CPU seconds of a training step (the loader's batch included: read, augment,
masks, forward, backward, optimizer), of one evaluation (BN re-estimation and the test set,
measured on ``--eval-batches`` batches and scaled), and of starting a run (data and model).
CPU time, not wall time: on a shared machine it is what the run would take alone on an idle
core (each leaderboard worker has one thread). A run costs

    start + steps x step + evaluations x evaluation

(evaluations: one, or one per SQ stage). The total is the makespan of the leaderboard's own
schedule (jobs longest first onto ``--workers`` workers), plus the step timing it does at the
end. A PQ row is priced as its fine-tuning, as many steps as the FP run at the FP step cost (the
FP run it compresses is the FP row's, read back from the cache: the FP row's jobs start
first); its EM iterations are not measured.

``--converged`` prices ``benchmarks/leaderboard_converged.py`` (its rows, 3 seeds, ``--epochs``
default 20): a KD row is its method's step plus the teacher's forward pass (FP's evaluation cost
per image x the batch), and the FP ladder on the holdout (90% of the steps a rung) is added, every
rung of it (the worst case: no rung stops it early) and the rungs up to the chosen E + 1 rung.
``--note`` writes the estimate to ``<runs>/budget.md``, which the converged table's header shows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from digits_common import load
from leaderboard import DATASETS, ROWS, missing, plan, setting_overrides, steps_per_epoch
from leaderboard_converged import CONVERGED_ROWS, KD, LADDER, LADDER_SEEDS, RUNS


def cpu_costs(recipe: dict, steps: int, eval_batches: int) -> dict:
    """CPU seconds of starting a run, of one training step (median) and of one evaluation."""
    import torch

    from sqdist.data import eval_batches as make_eval_batches
    from sqdist.data import loader
    from sqdist.train import recalibrate_bn, setup, train_step

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        recipe = json.loads(json.dumps(recipe))
        recipe["run"]["dir"] = folder
        recipe["track"]["wandb"] = False
        c0 = time.process_time()
        run = setup(recipe)
        start = time.process_time() - c0
        run.model.train()
        times = []
        c0 = time.process_time()
        for i, (x, y) in enumerate(loader(run.train_set, run.sampler.batches(0)[: steps + 3], 0, seed=0)):
            run.step = i
            train_step(run, x, y)
            c1 = time.process_time()
            times.append(c1 - c0)
            c0 = c1
        step = sorted(times[3:])[len(times[3:]) // 2]
        # evaluation: BN re-estimation (when the recipe asks) and the test set, on a few batches, scaled
        net, bs = run.net, recipe["data"]["eval_batch_size"]
        batches, _ = make_eval_batches(len(run.test_set), bs)
        c0 = time.process_time()
        if recipe["train"]["bn_recalibrate"] and run.sq is not None:
            recalibrate_bn(net, run.train_set, run.sampler.batches(0), "cpu", recipe["train"]["bn_recalibrate"])
        bn = time.process_time() - c0
        net.eval()
        c0 = time.process_time()
        with torch.no_grad():
            for x, _ in loader(run.test_set, batches[:eval_batches], 0):
                net(x)
        evaluation = bn + (time.process_time() - c0) * len(batches) / min(eval_batches, len(batches))
        run.tracker.close()
    return {"start": start, "step": step, "evaluation": evaluation}


def test_images(recipe: dict) -> int:
    from sqdist.data import build_datasets

    return len(build_datasets(recipe)[1])


def evaluations(recipe: dict) -> int:
    """Evaluations of one run: one per SQ stage (each stage ends with one), else the final one."""
    q, sq = recipe["quant"], recipe["sq"]
    return len(sq["ratios"]) if q["enabled"] and len(sq["ratios"]) > 1 else 1


def makespan(costs: list[float], workers: int) -> float:
    """Longest first onto the least loaded worker, as ``digits_common.train_all`` orders its jobs."""
    load_ = [0.0] * workers
    for c in sorted(costs, reverse=True):
        load_[load_.index(min(load_))] += c
    return max(load_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=None, help="default: the data's (leaderboard.DATASETS)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the data's (leaderboard.DATASETS)")
    parser.add_argument("--rows", default=None, help="comma list (default: the data's full list)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="training steps timed per row (median)")
    parser.add_argument("--eval-batches", type=int, default=3, help="evaluation batches timed per row")
    parser.add_argument("--timed-steps", type=int, default=30, help="the leaderboard's --timed-steps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--converged", action="store_true", help="price benchmarks/leaderboard_converged.py "
                        "(its rows, 3 seeds, 20 epochs unless --seeds/--epochs, and its FP ladder)")
    parser.add_argument("--note", action="store_true", help="--converged: write the estimate to <runs>/budget.md")
    parser.add_argument("--runs", default=RUNS, help=f"--note: the converged runs folder (default {RUNS})")
    args = parser.parse_args()
    data = DATASETS[args.data]
    seeds = (3 if args.converged else data.seeds) if args.seeds is None else args.seeds
    epochs = (20 if args.converged else data.epochs) if args.epochs is None else args.epochs
    default_rows = CONVERGED_ROWS if args.converged else data.rows
    rows = list(default_rows) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    if (args.converged or any(r in KD for r in rows)) and "FP" not in rows:
        rows = ["FP", *rows]  # a KD row's teacher forward is priced from FP's
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: {unknown[0]!r} is not a row; allowed: {', '.join(ROWS)}")
    setting = setting_overrides(args.data)
    per_epoch = steps_per_epoch(load("digits_fp", setting))
    out, costs, fp_step, measured = {}, [], None, {}
    for label in sorted(rows, key=lambda r: r in KD):  # FP and the methods before their KD rows
        if missing(ROWS[label]):
            out[label] = {"status": missing(ROWS[label])}
            continue
        jobs = plan([KD.get(label, label)], seeds, epochs, per_epoch, "unused", False, setting)
        recipe = load(jobs[0]["recipe"], jobs[0]["overrides"])
        if KD.get(label, label) not in measured:
            measured[KD.get(label, label)] = cpu_costs(recipe, args.steps, args.eval_batches)
        c = dict(measured[KD.get(label, label)])
        if label in KD:  # + the teacher's forward pass of every batch: FP's evaluation, per image
            fp_recipe = load("digits_fp", setting)
            c["step"] += measured["FP"]["evaluation"] * recipe["data"]["batch_size"] / test_images(fp_recipe)
        steps = recipe["train"]["epochs"] * per_epoch
        run = c["start"] + steps * c["step"] + evaluations(recipe) * c["evaluation"]
        if label == "FP":
            fp_step = c["step"]
        if ROWS[label].compress:  # the FP run is read back from the FP row's (trained first); then fine-tuning:
            run = steps * c["step"]  # as many steps as the FP run, at about its cost
        if ROWS[label].ptq:  # no training: the FP row's run, walked layer by layer over 512 calibration images
            run = c["start"] + 3 * c["evaluation"]  # (a rough bound) then BN re-estimation and one test evaluation
        costs += [run] * seeds
        out[label] = {"steps": steps, "step_ms": round(1000 * c["step"], 2), "eval_s": round(c["evaluation"], 2),
                      "start_s": round(c["start"], 2), "run_s": round(run, 1), "row_s": round(run * seeds, 1)}
        print(f"{label:20s} {steps:6d} steps x {1000 * c['step']:6.1f} ms + {evaluations(recipe)} eval x "
              f"{c['evaluation']:5.1f} s + start {c['start']:4.1f} s = {run:7.1f} s a run, {run * seeds:8.1f} s "
              f"for {seeds} seeds", file=sys.stderr, flush=True)
    timing = sum(args.timed_steps * v["step_ms"] / 1000 * 1.5 for v in out.values() if "step_ms" in v)  # + setup
    ladder = {}
    if args.converged:  # no step timing; FP's holdout ladder first, 2 seeds a rung at once on the workers
        timing = 0.0
        rung = lambda e: out["FP"]["start_s"] + 0.9 * e * per_epoch * fp_step + out["FP"]["eval_s"]  # noqa: E731
        after = [e for e in LADDER if e > epochs][:1]
        ladder = {"all_rungs_s": round(sum(rung(e) for e in LADDER) * LADDER_SEEDS / args.workers, 1),
                  "to_chosen_s": round(sum(rung(e) for e in LADDER if e <= epochs or e in after) * LADDER_SEEDS
                                       / args.workers, 1)}
    total = makespan(costs, args.workers) + timing + ladder.get("to_chosen_s", 0.0)
    summary = {"data": args.data, "seeds": seeds, "epochs": epochs, "steps_per_epoch": per_epoch,
               "workers": args.workers, "rows": out, "cpu_seconds": round(sum(costs), 1),
               "estimated_wall_seconds": round(total, 1), "fp_step_ms": round(1000 * fp_step, 2) if fp_step else None,
               "ladder": ladder}
    if args.note:
        from pathlib import Path

        worst = makespan(costs, args.workers) + ladder.get("all_rungs_s", 0.0)
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        (Path(args.runs) / "budget.md").write_text(
            f"Run time, planned before the run (`python benchmarks/leaderboard_budget.py --converged --epochs {epochs} "
            f"--note`, CPU time per step measured on one thread): {sum(costs):.0f} CPU seconds of training for "
            f"{seeds} seeds x {epochs} epochs; on {args.workers} idle cores about {total / 3600:.1f} h with the FP "
            f"ladder up to E + one rung ({ladder.get('to_chosen_s', 0) / 3600:.1f} h of it); every ladder rung: "
            f"{worst / 3600:.1f} h. Each epoch more or less in E moves the rows by {sum(costs) / epochs / args.workers / 3600:.2f} h.\n")
    if args.json:
        print(json.dumps(summary))
        return
    print(f"| row | steps a run | step (ms) | step / FP | evaluation (s) | a run (s) | {seeds} seeds (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, v in out.items():
        if "run_s" not in v:
            print(f"| {label} | | | | | | {v['status']} |")
            continue
        ratio = f"{v['step_ms'] / summary['fp_step_ms']:.2f}" if fp_step else ""
        print(f"| {label} | {v['steps']} | {v['step_ms']:.1f} | {ratio} | {v['eval_s']:.1f} | {v['run_s']:.0f} | "
              f"{v['row_s']:.0f} |")
    print(f"\n{args.data}: {seeds} seeds x {epochs} epochs ({per_epoch} steps each): {sum(costs):.0f} CPU seconds of "
          f"training; on {args.workers} idle cores (one run per core, longest first) about {total:.0f} s "
          f"= {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
