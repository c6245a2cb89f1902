"""The Fashion-MNIST leaderboard trained to convergence, with distillation rows; resumable across sessions.

    setsid nohup nice -n 19 python benchmarks/leaderboard_converged.py --publish > /work/leaderboard-runs/log.txt 2>&1 &
    (started so, in a session of its own, it sets that session's autogroup to its nice: alone, nice yields nothing
    to other sessions where the kernel groups by session)
    python benchmarks/leaderboard_converged.py --report     # what is finished so far, trains nothing
    kill -TERM -- -PGID; sleep 60; kill -KILL -- -PGID      # stop it (setsid: PGID = its pid): the workers
                                                            # checkpoint on SIGTERM, then wait for the dead parent
    python benchmarks/leaderboard_converged.py --data digits --ladder 1,2 --ladder-seeds 1 --seeds 1 \\
        --rows "FP,TWN + KD" --runs /tmp/smoke --json       # the smoke test's configuration

The setting of ``benchmarks/leaderboard.py --data fashion_mnist`` (its network, data, optimizers,
BN re-estimation, rows and paired statistics), with three changes:

1. **The epoch count E is chosen by FP on a holdout split, not on the test set.** FP trains with
   ``data.holdout_fraction`` (default 0.1 of the training split, stratified, held out of training)
   and is evaluated on it, for each rung of a ladder of epoch counts (default 15, 20, 30, 40; cosine
   schedule, so each rung is a full run of that length), ``--ladder-seeds`` paired seeds (default 2).
   E is the first rung whose next rung gains less than ``--min-gain`` points (default 0.2) on the
   holdout, paired mean over the seeds; the last rung if every step gains more. Rungs are trained
   one after another and only as far as needed. Every row then trains E epochs on the full training
   split (SQ paper protocol: 4 runs of E) and is evaluated on the test set, ``--seeds`` paired seeds.
2. **Distillation rows** (``... + KD``): the method with ``train.distill.teacher`` = the same seed's FP
   run of this table (weight 0.5, temperature 4, the trainer's defaults), paired against the method
   without KD. FP runs first (a phase of its own), then every other row, longest first.
3. **Everything survives an interruption.** Runs live under ``--runs`` (default
   ``/work/leaderboard-runs``, outside the checkout), one folder per (row, seed), named by the digest
   of its recipe; a finished run is read back, never retrained. Every run checkpoints once an epoch
   and an interrupted one resumes from its last checkpoint (``train.resume=auto``, bit-exact), so
   rerunning the same command continues where the last one stopped. ``--report`` reads back what is
   finished and writes the table marked ``partial: N of M runs`` until every run is there.

Step times are not measured here (see ``leaderboard_fashion_mnist.md``; the methods are the same).
``benchmarks/leaderboard_budget.py --converged`` estimates the run time before a run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from digits_common import ROOT, check_counts, load, paired, save_results, train_all
from leaderboard import ROWS, Row, collect, missing, plan, plot, setting_overrides, steps_per_epoch, table

RUNS = "/work/leaderboard-runs"
KD = {"TWN + KD": "TWN", "BWN + KD": "BWN", "W2A2 LSQ + KD": "W2A2 LSQ", "SRQ W2A2 + KD": "SRQ W2A2"}
for _label, _base in KD.items():
    _row = ROWS[_base]
    ROWS[_label] = Row(_row.recipe, list(_row.overrides), _base, f"{_row.what}, distilled from the same seed's FP run",
                       _row.needs)
# TWN 4x: TWN with the steps of SQ's paper protocol, so that protocol's gain can be split into SQ and steps
CONVERGED_ROWS = ["FP", "kbit4", "ESB W4", "TWN", "SQ-TWN", "SQ-TWN (paper)", "TWN 4x", "BWN", "SQ-BWN", "SLB W1",
                  "W2A2 LSQ", "SRQ W2A2", "SRQ learned widths", *KD]
LADDER, LADDER_SEEDS, HOLDOUT, MIN_GAIN = (15, 20, 30, 40), 2, 0.1, 0.2


def with_checkpoints(jobs: list[dict], per_epoch: int, cached_only: bool) -> list[dict]:
    """Every job checkpoints once an epoch (and resumes from it); ``cached_only``: read back, never train."""
    return [{**j, "checkpoint_every": per_epoch, "cached_only": cached_only, "cache": []} for j in jobs]


def choose_epochs(args, setting: list[str], per_epoch: int) -> dict:
    """FP's holdout top-1 per ladder rung, trained rung by rung until the gain falls under ``args.min_gain``.

    Returns {"epochs": E or None (the ladder is not finished), "curve": [{"epochs", "holdout_top1", "runs"}],
    "gains": [...]}."""
    holdout = [f"data.holdout_fraction={args.holdout}"]
    held_epoch = steps_per_epoch(load("digits_fp", list(setting) + holdout))  # fewer steps: the holdout is out
    curve, gains = [], []
    for i, epochs in enumerate(args.ladder):
        jobs = plan(["FP"], args.ladder_seeds, epochs, per_epoch, args.runs, False, list(setting) + holdout)
        jobs = [{**j, "name": "FP_holdout"} for j in with_checkpoints(jobs, held_epoch, args.report)]
        results = train_all(jobs, args.workers, keep_going=True)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            why = errors[0].replace("LookupError: ", "")
            return {"epochs": None, "curve": curve, "gains": gains, "status": f"the {epochs}-epoch rung: {why}"}
        top1 = [r["summary"]["final_accuracy"] for r in results]
        curve.append({"epochs": epochs, "holdout_top1": round(sum(top1) / len(top1), 3), "runs": top1})
        print(f"ladder: FP {epochs} epochs, holdout top-1 {top1}", file=sys.stderr, flush=True)
        if i:
            gains.append(paired(curve[-1]["runs"], curve[-2]["runs"]) | {"from": curve[-2]["epochs"], "to": epochs})
            if gains[-1]["mean"] < args.min_gain:
                return {"epochs": curve[-2]["epochs"], "curve": curve, "gains": gains, "status": "ok"}
    return {"epochs": args.ladder[-1], "curve": curve, "gains": gains, "status": "ok (the last rung)"}


def kd_jobs(labels: list[str], seeds: int, epochs: int, per_epoch: int, setting: list[str], args,
            fp: dict[int, dict]) -> list[dict]:
    """The KD rows' jobs, each with the same seed's FP run as its teacher (no job where that run is missing)."""
    jobs = []
    for j in plan(labels, seeds, epochs, per_epoch, args.runs, False, setting):
        teacher = fp.get(j["seed"], {}).get("run_dir")
        jobs.append({**j, "overrides": j["overrides"] + [f"train.distill.teacher={teacher}"], "cost": 1.3,
                     "teacher_missing": teacher is None})
    return jobs


def run_all(args, rows: list[str], setting: list[str], per_epoch: int, epochs: int) -> tuple[list, list]:
    """FP first (the KD rows' teachers), then every other row; returns (jobs, results) in row order."""
    fp_jobs = with_checkpoints(plan(["FP"], args.seeds, epochs, per_epoch, args.runs, False, setting), per_epoch,
                               args.report)
    fp_results = train_all(fp_jobs, args.workers, keep_going=True)
    fp = {j["seed"]: r for j, r in zip(fp_jobs, fp_results) if "error" not in r}
    plain = [r for r in rows if r not in KD and r != "FP"]
    jobs = plan(plain, args.seeds, epochs, per_epoch, args.runs, False, setting)
    jobs += kd_jobs([r for r in rows if r in KD], args.seeds, epochs, per_epoch, setting, args, fp)
    jobs = with_checkpoints(jobs, per_epoch, args.report)
    todo = [j for j in jobs if not j.get("teacher_missing")]
    done = dict(zip(map(id, todo), train_all(todo, args.workers, keep_going=True)))
    results = [done.get(id(j), {"error": "LookupError: not trained yet (nor its FP teacher)"}) for j in jobs]
    if "FP" in rows:
        jobs, results = fp_jobs + jobs, fp_results + results
    return jobs, results


def header(meta: dict, ladder: dict, budget: str) -> str:
    curve = ", ".join(f"{c['epochs']}: {c['holdout_top1']:.2f}" for c in ladder["curve"])
    gains = "; ".join(f"{g['from']}->{g['to']}: {g['mean']:+.2f}" + (f" [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
                      if g.get("ci95") else "") for g in ladder["gains"])
    e = meta["epochs"] or "E (not chosen yet)"
    png = f"![top-1 against file size]({meta['png']})\n\n" if meta["runs_done"] else ""
    state = (f"**partial: {meta['runs_done']} of {meta['runs_total']} runs** (rows whose seeds are not all finished "
             "show `not trained yet`; rerun the command to continue)" if meta["runs_done"] < meta["runs_total"]
             else f"complete: {meta['runs_total']} runs")
    made = ("\n\nThis page: the same command with `--report` (reads the finished runs back, trains nothing)."
            if meta["report"] else "")
    return (f"# Leaderboard at convergence: {meta['data']}\n\n    {meta['command']}{made}\n\n"
            f"{png}{state}.\n\n"
            f"Setting: {meta['model']}, {meta['image_size']}x{meta['image_size']} inputs, {meta['optim']} (SLB: its "
            f"recipe's optimizer), {e} epochs ({meta['steps_per_epoch']} steps each; SQ paper protocol: "
            f"4 runs of {e}), {meta['seeds']} paired seeds, test set. KD rows: teacher = the same seed's "
            f"FP run, weight 0.5, temperature 4; their paired difference is against the method without KD.\n\n"
            f"Epoch count: FP on a {meta['holdout']:.0%} holdout of the training split (not the test set), "
            f"{meta['ladder_seeds']} paired seeds per rung of the ladder {meta['ladder']}; E = the first rung whose "
            f"next gains less than {meta['min_gain']} points (paired mean). Holdout top-1 by epochs: {curve or 'none yet'}"
            f"; gains {gains or 'none yet'}; chosen E = {e} ({ladder['status']}).\n\n{budget}\n\n")


def kd_gaps(out: dict) -> list[dict]:
    """For each KD row whose base and FP are finished: the gap FP - base and what KD recovers, KD - base (both
    paired over the seeds), and the share of the gap closed (KD - base) / (FP - base), of the means; None where the
    gap's 95% interval reaches 0."""
    rows = []
    for label, base in KD.items():
        kd, b, fp = out.get(label, {}), out.get(base, {}), out.get("FP", {})
        if not all("top1" in e for e in (kd, b, fp)):
            continue
        gap, got = paired(fp["top1"]["runs"], b["top1"]["runs"]), paired(kd["top1"]["runs"], b["top1"]["runs"])
        # a share of a gap whose interval reaches 0 is no number (it runs to hundreds of percent)
        clear = gap["mean"] > 0 and (gap["ci95"] is None or gap["ci95"][0] > 0)
        share = got["mean"] / gap["mean"] if clear else None
        rows.append({"method": label, "base": base, "gap": gap, "recovered": got, "share_closed": share})
    return rows


def kd_table(gaps: list[dict]) -> str:
    if not gaps:
        return ""

    def diff(d):
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else f"{d['mean']:+.2f}"

    lines = ["", "", "Distillation against the gap to FP (paired over the seeds; share = mean recovered / mean gap):", "",
             "| KD row | FP - base [95% CI] | KD - base [95% CI] | share of the gap closed |", "|---|---|---|---:|"]
    for g in gaps:
        share = "n/a (gap's interval reaches 0)" if g["share_closed"] is None else f"{g['share_closed']:.0%}"
        lines.append(f"| {g['method']} | {diff(g['gap'])} | {diff(g['recovered'])} | {share} |")
    return "\n".join(lines)


READING = "\n## Reading"


def kept_reading(page: Path) -> str:
    """The ``## Reading`` section (to the end) of the page a republish replaces: written by hand from the table's
    numbers, so a rerun that adds runs keeps it (and whoever adds runs rereads it against the new numbers)."""
    text = page.read_text() if page.is_file() else ""
    at = text.find(READING)
    return text[at:] if at >= 0 else ""


def background_priority() -> None:
    """Under ``nice`` and ``setsid``, also lower this session's autogroup to the same nice (Linux, autogroups).

    The kernel shares the CPU between autogroups (one per session) before it looks at nice values, so a job
    started under ``setsid`` and ``nice -n 19`` still took half of the 2 cores from normal work beside it (an
    array op of 2.4 M floats: 8 ms beside the job, 0.3 ms once its autogroup had nice 19)."""
    niceness = os.nice(0)
    # only in a session of its own (started under setsid): the autogroup is the whole session's, and lowering a
    # login shell's would slow everything started from it, after this run too
    if niceness > 0 and os.getsid(0) == os.getpid():
        try:
            Path("/proc/self/autogroup").write_text(str(niceness))
        except OSError:  # no autogroup scheduling here, or not allowed: nice alone
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds per row (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="skip the ladder: train every row this many epochs")
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)), help="epoch counts FP tries on the holdout")
    parser.add_argument("--ladder-seeds", type=int, default=LADDER_SEEDS)
    parser.add_argument("--holdout", type=float, default=HOLDOUT, help="data.holdout_fraction of the ladder's runs")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN, help="points a longer rung must gain to be taken")
    parser.add_argument("--rows", default=None, help="comma list (default: every converged row); allowed: "
                        + ", ".join(CONVERGED_ROWS))
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each (default 2)")
    parser.add_argument("--runs", default=RUNS, help=f"run folders, cached by recipe digest (default {RUNS})")
    parser.add_argument("--out", default=None, help="table.md, results.json, the plot (default <runs>/out)")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the finished runs")
    parser.add_argument("--publish", action="store_true",
                        help="also write benchmarks/results/leaderboard_<data>_converged.md/.json/.png")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                        help="where --publish writes the page (default benchmarks/results)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    check_counts(parser, args, ("seeds", "ladder_seeds", "workers"))
    if args.report:
        args.workers = 1  # reading back: in this process, no workers to start
    try:
        args.ladder = [int(e) for e in args.ladder.split(",") if e.strip()]
    except ValueError:
        parser.error(f"--ladder={args.ladder!r}: expected a comma list of epoch counts, e.g. 15,20,30,40")
    if not args.ladder or min(args.ladder) < 1 or args.ladder != sorted(set(args.ladder)):
        parser.error(f"--ladder={args.ladder!r}: expected increasing epoch counts >= 1")
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout={args.holdout}: expected a fraction between 0 and 1")
    rows = CONVERGED_ROWS if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: {unknown[0] if unknown else '(empty)'!r} is not a row; allowed: {', '.join(ROWS)}")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    args.out = args.out or str(Path(args.runs) / "out")
    if not args.report:  # one training process per runs folder: two would write the same run folders
        import fcntl

        lock = open(Path(args.runs) / ".lock", "w")  # noqa: SIM115 - held until the process exits
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            parser.exit(2, f"--runs={args.runs}: another leaderboard_converged.py is training there; allowed: "
                           "wait for it, or --report to read what it has finished\n")

        background_priority()

    t0 = time.time()
    setting = setting_overrides(args.data)
    probe = load("digits_fp", setting)
    per_epoch = steps_per_epoch(probe)
    ladder = choose_epochs(args, setting, per_epoch) if args.epochs is None else {
        "epochs": args.epochs, "curve": [], "gains": [], "status": "set by --epochs"}
    epochs = ladder["epochs"]
    status = {label: missing(ROWS[label]) for label in rows}
    runnable = [label for label in rows if status[label] is None]
    out, jobs, results = {}, [], []
    if epochs is not None:
        jobs, results = run_all(args, runnable, setting, per_epoch, epochs)
        out = collect(runnable, jobs, results, {}, args.seeds)
    ordered = {label: out.get(label) or {"method": label, "what": ROWS[label].what, "protocol": ROWS[label].protocol,
                                         "base": ROWS[label].base,
                                         "status": status[label] or f"waiting: epoch count not chosen ({ladder['status']})"}
               for label in rows}
    for e in ordered.values():
        e["status"] = e["status"].replace("failed: LookupError: ", "")
    data_name = f"leaderboard_{args.data}_converged"
    meta = {"data": args.data, "seeds": args.seeds, "epochs": epochs, "steps_per_epoch": per_epoch,
            "model": f"{probe['model']['name']} {probe['model']['kwargs']}", "image_size": probe["data"]["image_size"],
            "optim": f"{probe['optim']['name']} lr {probe['optim']['lr']}, {probe['sched']['name']} schedule",
            "ladder": args.ladder, "ladder_seeds": args.ladder_seeds, "holdout": args.holdout, "min_gain": args.min_gain,
            "runs_total": len(jobs) or len(rows) * args.seeds, "runs_done": sum("error" not in r for r in results),
            "runs_cached": sum(bool(r.get("cached")) for r in results), "png": f"{data_name}.png",
            "wall_seconds": round(time.time() - t0, 1), "runs_folder": args.runs,
            "command": shlex.join(["python", "benchmarks/leaderboard_converged.py", *(a for a in sys.argv[1:] if a != "--report")]),
            "report": args.report}
    gaps = kd_gaps(ordered)
    text = table(ordered, meta) + kd_table(gaps)
    payload = {"rows": list(ordered.values()), "kd_gaps": gaps, "ladder": ladder, "meta": meta}
    folder = save_results(args.out, text, payload)
    if out:
        plot(ordered, folder / "leaderboard.png", {**meta, "epochs": f"{epochs}"}, floor=None)
    if args.publish:
        published = Path(args.results) / data_name
        note = Path(args.runs) / "budget.md"  # benchmarks/leaderboard_budget.py --converged --note writes it
        budget = note.read_text().strip() if note.is_file() else "Run time: not estimated."
        page = published.with_suffix(".md")
        page.write_text(header(meta, ladder, budget) + text + "\n" + kept_reading(page))
        published.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        if out:
            published.with_suffix(".png").write_bytes((folder / "leaderboard.png").read_bytes())
    if args.json:
        print(json.dumps(payload))
        return
    print(text)
    print(f"\n{meta['runs_done']} of {meta['runs_total']} runs finished ({meta['runs_cached']} read back); "
          f"E = {epochs}; wall {meta['wall_seconds']} s; {folder}")


if __name__ == "__main__":
    main()
