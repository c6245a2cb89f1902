"""What the digits benchmarks share: train a recipe once per (overrides, seed) with a cache,
the file size of its export, and the statistics of paired seeds.

A run lives in ``<runs>/<name>_s<seed>_<digest>/`` where ``digest`` hashes the full recipe
(after overrides and defaults), so a run is retrained only when its recipe changes.
``cache`` lists other benchmarks' run folders searched for the same digest first (a run
trained by ``wa_bits.py`` is read back by ``leaderboard.py``). Runs use one thread each.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
# recipe keys added after runs were cached, and their default: left out of the digest at the
# default, so those runs stay valid
LATER_DEFAULTS = {("data", "holdout_fraction"): 0.0, ("data", "augment"): False, ("train", "compile"): False,
                  ("train", "compile_mode"): "default", ("train", "compile_backend"): "inductor",
                  ("engine", "fsdp_unit"): "block"}


def recipe_digest(recipe: dict) -> str:
    r = json.loads(json.dumps(recipe))
    for (section, key), default in LATER_DEFAULTS.items():
        if r.get(section, {}).get(key) == default:
            del r[section][key]
    return hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()[:10]


def load(recipe: str, overrides: list[str]) -> dict:
    """``recipes/<recipe>.yaml`` with ``overrides`` (a path works too)."""
    from sqdist.config import load_recipe

    path = recipe if os.path.sep in recipe else str(ROOT / "recipes" / f"{recipe}.yaml")
    return load_recipe(path, list(overrides))


def train_job(job: dict) -> dict:
    """Train ``job`` in this process (one thread), or read it back; returns {summary, run_dir, cached}.

    ``job``: ``recipe`` (stem), ``overrides``, ``name`` (folder prefix), ``seed``, ``runs``
    (folder of run folders), optional ``fresh`` (retrain) and ``cache`` (more folders to search),
    ``checkpoint_every`` (steps: the run checkpoints that often and, when its folder holds a checkpoint
    from an interrupted attempt, resumes from it with ``train.resume=auto`` instead of starting again;
    left out of the digest) and ``cached_only`` (read back or raise LookupError, never train).
    """
    import torch

    torch.set_num_threads(1)  # 2 runs at once on 2 cores beat one run on 2 threads by far
    from sqdist.train import train

    recipe = load(job["recipe"], job["overrides"])
    digest = recipe_digest(recipe)
    leaf = f"{job['name'].replace(' ', '_')}_s{job['seed']}_{digest}"
    run_dir = Path(job["runs"]) / leaf
    if not job.get("fresh"):
        for folder in [job["runs"], *job.get("cache", ())]:
            for found in sorted(Path(folder).glob(f"*_s{job['seed']}_{digest}")):
                if (found / "summary.json").exists() and (found / "final" / "model.safetensors").exists():
                    return {"summary": json.loads((found / "summary.json").read_text()), "run_dir": str(found),
                            "cached": True}
    if job.get("cached_only"):
        raise LookupError("not trained yet")
    every = job.get("checkpoint_every")
    resuming = bool(every) and not job.get("fresh") and (run_dir / "checkpoints" / "latest").is_file()
    if run_dir.exists() and not resuming:
        shutil.rmtree(run_dir)
    recipe["run"]["dir"] = str(run_dir)
    if every:  # after the digest: how often a run saves does not change what it computes (resume is bit-exact)
        recipe["train"]["checkpoint_every"], recipe["train"]["resume"] = int(every), "auto"
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's one-line "final top-1" per run
        summary = train(recipe)
    if summary.get("preempted"):
        raise RuntimeError(f"preempted at step {summary['total_steps']}: the same command resumes it")
    if every:
        prune_checkpoints(run_dir)
    return {"summary": summary, "run_dir": str(run_dir), "cached": False}


def prune_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoints but the latest (its final/ and summary.json are what is read back)."""
    root = run_dir / "checkpoints"
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    for folder in root.glob("step-*"):
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


def safe_job(fn, job: dict) -> dict:
    """``fn(job)``; a failure becomes ``{"error": one line}`` so one broken row does not stop a table."""
    try:
        return fn(job)
    except BaseException as exc:  # noqa: BLE001 - reported per row
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


def _safe_train(job: dict) -> dict:
    return safe_job(train_job, job)


def pool_map(fn, jobs: list[dict], workers: int) -> list:
    """``[fn(j) for j in jobs]`` on ``workers`` spawned processes (in order)."""
    if workers == 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


def same_run(job: dict) -> str:
    """What makes two jobs the same run (they train once: two workers must not train it into one folder at once)."""
    return json.dumps([job["recipe"], list(job["overrides"]), job["name"], job["seed"], str(job["runs"]),
                       bool(job.get("fresh"))])


def train_all(jobs: list[dict], workers: int, keep_going: bool = False) -> list[dict]:
    """Train every job (longest first, so the workers finish together); results in job order.
    Jobs of the same run (:func:`same_run`: e.g. the FP run every PTQ and PQ row of a seed reads) train once."""
    first: dict[str, int] = {}
    for i, job in enumerate(jobs):
        first.setdefault(same_run(job), i)
    order = sorted(first.values(), key=lambda i: -jobs[i].get("cost", 1))
    fn = _safe_train if keep_going else train_job
    done = dict(zip(order, pool_map(fn, [jobs[i] for i in order], workers)))
    return [done[first[same_run(job)]] for job in jobs]


def export_bytes(run_dir: str, keep_fp_bits: int = 32) -> int:
    """Bytes of ``python -m sqdist.export RUN OUT.safetensors`` (packed weights)."""
    from sqdist.export import export_run

    with tempfile.TemporaryDirectory() as folder:
        return export_run(run_dir, os.path.join(folder, "out.safetensors"), keep_fp_bits=keep_fp_bits)["bytes"]


def check_counts(parser, args, names: tuple[str, ...]) -> None:
    """``parser.error`` (one line, exit 2) unless every ``args.<name>`` is an integer >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")


def save_results(folder: str | Path, text: str, payload: dict) -> Path:
    """``table.md`` (``text``) and ``results.json`` (``payload``) in ``folder`` (made if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(text + "\n")
    (folder / "results.json").write_text(json.dumps(payload, indent=1))
    return folder


# ---------------------------------------------------------------- step time
def timed_run(recipe: dict, folder: str):
    """``sqdist.train.setup`` of ``recipe`` writing into ``folder`` (no tracker, no progress bar),
    model in train mode, and its first training batch: ``(run, x, y)``."""
    from sqdist.data import loader
    from sqdist.train import setup

    recipe = json.loads(json.dumps(recipe))
    recipe["run"]["dir"], recipe["track"]["wandb"], recipe["train"]["progress"] = folder, False, False
    with contextlib.redirect_stdout(io.StringIO()):
        run = setup(recipe)
    x, y = next(iter(loader(run.train_set, run.sampler.batches(0)[:1], 0, seed=0)))
    run.model.train()
    return run, x.to(run.accelerator.device), y.to(run.accelerator.device)


def step_times(recipes: dict, steps: int, rounds: int = 1, warmup: int = 3, threads: int | None = 1,
               budget_s: float | None = None, cap_s: float | None = None) -> dict:
    """Seconds of one training step of each recipe, measured through the trainer.

    Every recipe is built by ``sqdist.train.setup`` (model, quantizers, calibration, optimizer as a
    run has them) and stepped by ``sqdist.train.train_step`` (new SQ masks, LR, quantizer hooks,
    forward, backward, optimizer step) on its first training batch, ``run.step`` counting up as in
    training. After ``warmup`` untimed steps each, the recipes are interleaved: ``rounds`` rounds of
    ``steps // rounds`` steps of each in turn, so a change of the machine's load is seen by all.
    ``budget_s``: a recipe whose warm-up step took longer gets fewer steps (at least one a round).
    ``cap_s``: a recipe whose warm-up steps took longer than this each is not timed further; its
    entry is the warm-up (``"steps": 0``, ``"warmup_only": True``).

    ``recipes``: {label: recipe}. Returns {label: {"median", "mean", "min", "steps", "times"}} (seconds);
    a recipe that fails to build or step gets {"error": one line}.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    per_round = max(1, steps // max(rounds, 1))
    out, runs = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for i, (label, recipe) in enumerate(recipes.items()):
            try:
                run, x, y = timed_run(recipe, os.path.join(root, str(i)))
                first = time.perf_counter()
                for k in range(warmup):
                    _timed_step(run, x, y, k)
                each = (time.perf_counter() - first) / max(warmup, 1)
                if cap_s is not None and warmup and each > cap_s:
                    run.tracker.close()
                    out[label] = {"median": each, "mean": each, "min": each, "steps": 0, "times": [],
                                  "warmup_only": True}
                    continue
                n = per_round if budget_s is None else max(1, min(per_round, int(budget_s / max(each, 1e-9))))
                runs[label] = (run, x, y, n, [])
            except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
                out[label] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]}
        for r in range(rounds):
            for label, (run, x, y, n, times) in runs.items():
                for k in range(n):
                    t0 = time.perf_counter()
                    _timed_step(run, x, y, warmup + r * n + k)
                    times.append(time.perf_counter() - t0)
        for label, (run, _, _, _, times) in runs.items():
            run.tracker.close()
            ordered = sorted(times)
            out[label] = {"median": ordered[len(ordered) // 2], "mean": sum(times) / len(times), "min": ordered[0],
                          "steps": len(times), "times": times}
        runs.clear()
    return {label: out[label] for label in recipes}


def _timed_step(run, x, y, step: int) -> None:
    from sqdist.train import train_step

    run.step = step
    train_step(run, x, y)


# ---------------------------------------------------------------- statistics
def t95(n: int) -> float:
    """Two-sided 95% Student t quantile for n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def stats(values: list[float]) -> dict:
    """mean, sample std, min, max, the 95% CI of the mean, and the values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = t95(n) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(mean, 3), "std": round(std, 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "ci95": [round(mean - half, 3), round(mean + half, 3)] if n > 1 else None,
            "runs": [round(v, 3) for v in values]}


def paired(a: list[float], b: list[float]) -> dict:
    """a - b per seed: mean, std, the 95% interval of the mean, and a paired t-test p-value."""
    from scipy.stats import ttest_rel

    d = [x - y for x, y in zip(a, b)]
    out = stats(d)
    out["p"] = float(f"{ttest_rel(a, b).pvalue:.3g}") if len(d) > 1 and out["std"] > 0 else None
    return out
