"""Step time through the trainer, compiled (``train.compile=true``, inductor) against eager, and how far
inductor's values move from eager's.

    flock /tmp/sqdist-bench.lock python benchmarks/compile_speed.py                  # the table in benchmarks/results/
    python benchmarks/compile_speed.py --rows "FP,TWN" --threads 1 --steps 8 --rounds 1   # a quick look

Each row is a leaderboard recipe (``benchmarks/leaderboard.py`` ``ROWS``) at scale: timm ``resnet18``
(10 classes, 3 input channels) on the digits images upscaled to 32x32, batch 64. Every measurement is
a whole ``sqdist.train.train`` run (data loading, SQ masks, hooks, logging, the optimizer: everything a
run does) of ``--skip + --steps`` steps; a step's time is the wall time between two ``on_step`` calls,
and a run's time is the median of its steps after the first ``--skip`` (compilation, the first
recompilations and the allocator's warm-up fall there; the first step's time is shown as ``first``).
In each round every row runs eager and compiled back to back, so a change of the machine's load is seen
by both; ``x`` is eager's median over compiled's, ``x FP`` a row's median over FP's, both per round,
then the median over rounds. ``--threads``: torch's intra-op threads.

Split (``--split``): for each row, eager and compiled, a few steps of ``train_step`` on one batch under
``torch.profiler``: the milliseconds a step spends in convolutions (forward ``aten::convolution`` and
``aten::convolution_backward``, the same oneDNN kernels eager or compiled: inductor calls them, it does not
generate them) and in everything else (the part compiling can speed up). ``bound``: the step's
speed-up if compiling made everything but the convolutions free (eager step / eager convolutions).

Values: for each row, one step of the same model and batch, eager and compiled with inductor, from the
same weights: the largest absolute difference of the logits, of the loss and of any gradient,
relative to that tensor's largest magnitude.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


from digits_common import ROOT, load
from leaderboard import ROWS

SCALE = ["model.name=resnet18", "model.kwargs={num_classes: 10}", "data.image_size=32", "data.batch_size=64",
         "train.progress=false", "track.wandb=false", "train.log_every=5"]
DEFAULT_ROWS = ("FP", "TWN", "W4A4 LSQ", "SLB W2", "SRQ W2A2")


# "<row> (before)": the row with SLB's PyTorch paths (SQDIST_SLB_KERNEL=torch), i.e. its hard phase as it was
# before the argmax kernel. A short train() run is in SLB's hard phase (its temperature schedule ends at 0.9 of
# the run's epochs: from the first step in a run under an epoch): benchmarks/results/compile_speed.md
BEFORE = " (before)"


def row_env(label: str):
    import contextlib
    from unittest import mock

    return mock.patch.dict(os.environ, {"SQDIST_SLB_KERNEL": "torch"}) if label.endswith(BEFORE) else contextlib.nullcontext()


def recipe_of(label: str, steps: int, compiled: bool, folder: str) -> dict:
    row = ROWS[label.removesuffix(BEFORE)]
    extra = [f"train.max_steps={steps}", f"run.dir={folder}"]
    if compiled:
        extra += ["train.compile=true", "train.compile_backend=inductor"]
    return load(row.recipe, [*row.overrides, *SCALE, *extra])


def timed_train(recipe: dict) -> list[float]:
    """Seconds of every step of ``sqdist.train.train(recipe)`` (wall time between two ``on_step`` calls;
    the first from the start of ``train``, setup and compilation included)."""
    import contextlib
    import io

    from sqdist.train import train

    stamps = [time.perf_counter()]
    with contextlib.redirect_stdout(io.StringIO()):
        train(recipe, on_step=lambda *a: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


CONV_OPS = ("aten::convolution", "aten::convolution_backward")  # each a whole convolution, forward or backward


def split(label: str, compiled: bool, warm: int = 4, steps: int = 4) -> dict:
    """Milliseconds a step (``train_step`` on the run's first batch) spends in convolutions and in the rest."""
    import torch

    from digits_common import timed_run
    from sqdist.train.compiling import compile_model
    from sqdist.train.loop import train_step

    with tempfile.TemporaryDirectory() as folder, row_env(label):
        run, x, y = timed_run(load(ROWS[label].recipe, [*ROWS[label].overrides, *SCALE, "train.max_steps=1000"]),
                              folder)
        if compiled:
            compile_model(run.net)
        for _ in range(warm):
            train_step(run, x, y)
            run.step += 1
        with torch.profiler.profile() as prof:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(run, x, y)
                run.step += 1
            wall = (time.perf_counter() - start) / steps
    conv = sum(e.cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 1e3 / steps
    return {"step_ms": wall * 1e3, "conv_ms": conv, "rest_ms": wall * 1e3 - conv}


def value_differences(label: str) -> dict:
    """One step, eager and inductor, from the same weights and batch: relative max differences."""
    import torch

    from digits_common import timed_run

    with tempfile.TemporaryDirectory() as folder:
        recipe = load(ROWS[label].recipe, [*ROWS[label].overrides, *SCALE])
        run, x, y = timed_run(recipe, folder)
        net = run.net
        for _, q in run.quantizers:
            if hasattr(q, "set_progress"):
                q.set_progress(0, 100, 20)
        if run.sq is not None:
            run.sq.draw_masks()
        state = {k: v.clone() for k, v in net.state_dict().items()}

        def step():
            net.load_state_dict(state)
            net.zero_grad(set_to_none=True)
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

        eager = step()
        from sqdist.train.compiling import compile_model

        compile_model(net)  # as train.compile=true does (inductor, its options)
        step()  # compile
        comp = step()
        net._compiled_call_impl = None

        def rel(a, b):
            return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))

        grads = [rel(eager[2][k], comp[2][k]) for k in eager[2]]
        return {"logits": rel(eager[0], comp[0]), "loss": rel(eager[1], comp[1]), "grad_max": max(grads),
                "grad_median": statistics.median(grads)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=16, help="timed steps per run")
    p.add_argument("--skip", type=int, default=6, help="steps not timed at the start of each run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-values", action="store_true")
    p.add_argument("--eager-only", action="store_true", help="no compiled runs (SLB's step against FP's)")
    p.add_argument("--values-rows", default=None, help="rows of the value comparison (default: --rows)")
    p.add_argument("--split", action="store_true", help="only the profile split (convolutions / the rest) per row")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "compile_speed.json"))
    args = p.parse_args(argv)
    import torch

    labels = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in labels + (args.values_rows or "").split(",") if r and r.removesuffix(BEFORE) not in ROWS]
    if unknown:
        print(f"compile_speed.py: --rows {unknown[0]!r}: not a leaderboard row; allowed: {', '.join(ROWS)} "
              f"(each optionally with '{BEFORE}')", file=sys.stderr)
        return 2
    results = {"load_before": os.getloadavg(), "torch": torch.__version__, "rows": {}, "values": {}, "split": {}}
    print(f"load before: {os.getloadavg()}", flush=True)
    if args.split:
        return print_split(results, labels, args)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for r in range(args.rounds):
            for label in labels:
                for compiled in (False,) if args.eager_only else (False, True):
                    with tempfile.TemporaryDirectory() as folder, row_env(label):
                        times = timed_train(recipe_of(label, args.skip + args.steps, compiled, folder))
                    entry = results["rows"].setdefault(f"{label}|{threads}|{int(compiled)}", [])
                    entry.append({"median": statistics.median(times[args.skip:]), "mean": statistics.mean(times[args.skip:]),
                                  "first": times[0]})
                    print(f"threads {threads} round {r} {label:10s} {'compiled' if compiled else 'eager':8s} "
                          f"median {entry[-1]['median'] * 1e3:8.1f} ms  first {times[0]:6.1f} s  load "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
    if not args.no_values:
        torch.set_num_threads(args.threads[0])
        for label in (args.values_rows or args.rows).split(","):
            results["values"][label] = value_differences(label)
            print(label, results["values"][label], flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load after: {os.getloadavg()}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, labels, args.threads, args.rounds, args.eager_only))
    return 0


def print_split(results: dict, labels: list[str], args) -> int:
    import torch

    lines = ["| row | threads | eager step ms | eager conv ms | eager rest ms | compiled step ms | compiled conv ms | "
             "compiled rest ms | bound (eager step / eager conv) |", "|---|---|---|---|---|---|---|---|---|"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label in labels:
            e, c = split(label, False), split(label, True)
            results["split"][f"{label}|{threads}"] = {"eager": e, "compiled": c}
            lines.append(f"| {label} | {threads} | {e['step_ms']:.0f} | {e['conv_ms']:.0f} | {e['rest_ms']:.0f} | "
                         f"{c['step_ms']:.0f} | {c['conv_ms']:.0f} | {c['rest_ms']:.0f} | "
                         f"{e['step_ms'] / e['conv_ms']:.2f}x |")
            print(lines[-1], flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load after: {os.getloadavg()}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


def table(results: dict, labels: list[str], threads: list[int], rounds: int, eager_only: bool = False) -> str:
    """Medians over the rounds of each run's median step (``mean x FP``: of each run's mean step, log steps in)."""
    rows = results["rows"]
    lines = ["| row | threads | eager ms | compiled ms | compiled speed-up | eager x FP | compiled x FP | "
             "mean x FP eager / compiled | first step eager / compiled (s) |", "|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b, key="median"):  # median over the rounds; n/a without both runs
        if not a or not b:
            return "n/a"
        return f"{statistics.median(a[i][key] / b[i][key] for i in range(rounds)):.2f}"

    def ms(runs):
        return f"{statistics.median(x['median'] for x in runs) * 1e3:.0f}" if runs else "n/a"

    def first(runs):
        return f"{statistics.median(x['first'] for x in runs):.1f}" if runs else "n/a"

    for t in threads:
        for label in labels:
            e, c = rows[f"{label}|{t}|0"], None if eager_only else rows[f"{label}|{t}|1"]
            fe, fc = rows.get(f"FP|{t}|0"), rows.get(f"FP|{t}|1")
            speed = "n/a" if c is None else ratio(e, c) + "x"
            lines.append(f"| {label} | {t} | {ms(e)} | {ms(c)} | {speed} | {ratio(e, fe)} | {ratio(c, fc)} | "
                         f"{ratio(e, fe, 'mean')} / {ratio(c, fc, 'mean')} | {first(e)} / {first(c)} |")
    if results["values"]:
        lines += ["", "| row | logits | loss | largest gradient difference | median over tensors |", "|---|---|---|---|---|"]
        for label, v in results["values"].items():
            lines.append(f"| {label} | {v['logits']:.1e} | {v['loss']:.1e} | {v['grad_max']:.1e} | {v['grad_median']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
