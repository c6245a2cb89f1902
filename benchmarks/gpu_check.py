"""The Python steps of ``benchmarks/gpu_check.sh`` (see there), one subcommand each.

    python benchmarks/gpu_check.py train RECIPE [key=value ...] --json OUT.json
        sqdist.train.train() on the recipe, in this process, with timing hooks: the final
        top-1, the median step time, the SQ work's share of it (the mask draw with its
        errors, and the hybrid weights of the forward), and under mixed precision the
        GradScaler Accelerate used and the steps it skipped.
    python benchmarks/gpu_check.py kill-resume RECIPE [key=value ...] --work DIR --kill-after STEP --json OUT.json
        three ``python -m sqdist.train`` runs: uninterrupted; killed (SIGKILL) once its
        checkpoint of step >= STEP exists; that one resumed (train.resume=auto). Compares
        the two final/model.safetensors byte for byte.
    python benchmarks/gpu_check.py summary --work DIR --out gpu.json
        one JSON of every step's outcome and figures, and a table on stdout.

The hooks wrap ``SQController.draw_masks`` and ``SQLayer.sq_weight`` in this process
only, and time them with CUDA events (no synchronization inside a step) or, on the
CPU, the wall clock; sqdist itself is unchanged.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- train, timed
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def settle(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def timed_train(recipe_path: str, overrides: list[str], warm_steps: int = 5) -> dict:
    import torch

    from sqdist.quant import kernels
    from sqdist.train import engine
    from sqdist import nn as sq_nn
    from sqdist import train as sq_train
    from sqdist.config import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    clock = Clock(torch.cuda.is_available())
    captured: dict = {}
    marks: list = []               # one per finished optimizer step (after on_step)
    regions: list = []             # (step index it belongs to, kind, start, end)
    skipped = []

    make_accelerator = engine.make_accelerator

    def capture_accelerator(recipe_):
        captured["accelerator"] = make_accelerator(recipe_)
        return captured["accelerator"]

    def timed(kind, fn, only_training=False):
        def wrapper(self, *a, **kw):
            if only_training and not self.training:
                return fn(self, *a, **kw)
            start = clock.mark()
            out = fn(self, *a, **kw)
            regions.append((len(marks), kind, start, clock.mark()))
            return out
        return wrapper

    def on_step(step, model, sq):
        marks.append(clock.mark())
        acc = captured.get("accelerator")
        if acc is not None and getattr(acc, "optimizer_step_was_skipped", False):
            skipped.append(step)

    engine.make_accelerator = capture_accelerator
    sq_nn.SQController.draw_masks = timed("draw", sq_nn.SQController.draw_masks)
    sq_nn.SQLayer.sq_weight = timed("hybrid", sq_nn.SQLayer.sq_weight, only_training=True)
    t0 = time.time()
    summary = sq_train.train(recipe, on_step=on_step)
    wall = time.time() - t0
    clock.settle()

    # step k's interval runs from the mark of step k-1 to that of step k; regions recorded
    # while len(marks) == k-1 belong to step k. The median over steps leaves out the ones
    # that hold a stage-end evaluation or a checkpoint.
    per_step: dict[int, dict[str, float]] = {}
    for k, kind, a, b in regions:
        per_step.setdefault(k, {}).setdefault(kind, 0.0)
        per_step[k][kind] += clock.seconds(a, b)
    steps = []
    for k in range(max(1, warm_steps), len(marks)):
        dt = clock.seconds(marks[k - 1], marks[k])
        sq = per_step.get(k, {})
        steps.append((dt, sq.get("draw", 0.0), sq.get("hybrid", 0.0)))
    acc = captured.get("accelerator")
    scaler = getattr(acc, "scaler", None) if acc is not None else None
    device = str(acc.device) if acc is not None else "?"
    probe = torch.empty(0, device=acc.device if acc is not None else "cpu")
    res = {
        "final_accuracy": summary.get("final_accuracy"), "total_steps": summary.get("total_steps"),
        "preempted": bool(summary.get("preempted")),  # a SIGTERM (the step's timeout) ends the run early
        "stages": [{k: s[k] for k in ("stage", "ratio", "step", "top1") if k in s} for s in summary.get("stages", [])],
        "train_seconds": summary.get("seconds"), "wall_seconds": round(wall, 2), "device": device,
        "kernels_mode": kernels.mode(), "kernel_backend": kernels.backend_for(probe),
        "mixed_precision": recipe["engine"]["mixed_precision"],
        "scaler": None if scaler is None else {"class": f"{type(scaler).__module__}.{type(scaler).__name__}",
                                               "scale": float(scaler.get_scale()), "enabled": scaler.is_enabled()},
        "skipped_steps": len(skipped), "timed_steps": len(steps),
    }
    if steps:
        res.update(
            step_ms_median=statistics.median(s[0] for s in steps) * 1e3,
            draw_ms_median=statistics.median(s[1] for s in steps) * 1e3,
            hybrid_ms_median=statistics.median(s[2] for s in steps) * 1e3,
            sq_share_median=statistics.median((s[1] + s[2]) / s[0] for s in steps if s[0] > 0),
            sq_share_total=sum(s[1] + s[2] for s in steps) / max(sum(s[0] for s in steps), 1e-12))
    return res


# ---------------------------------------------------------------- kill and resume
def _train_cmd(recipe: str, overrides: list[str], run_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sqdist.train", recipe, *overrides, f"run.dir={run_dir}", "train.progress=false", *extra]


def _tensors_equal(a_path: str, b_path: str) -> dict:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    differ = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    return {"tensors": len(a), "keys_equal": a.keys() == b.keys(), "tensors_differing": differ[:20],
            "n_tensors_differing": len(differ)}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def kill_resume(recipe: str, overrides: list[str], work: str, kill_after: int, timeout: float, res: dict) -> dict:
    """Fills ``res`` as it goes (a timeout leaves what was done) and returns it."""
    os.makedirs(work, exist_ok=True)
    res.update(overrides=overrides, kill_after=kill_after)
    logs = {name: open(os.path.join(work, f"{name}.log"), "w") for name in ("uninterrupted", "killed", "resumed")}
    deadline = time.time() + timeout
    ref_dir, run_dir = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")

    t = time.time()
    ref = subprocess.run(_train_cmd(recipe, overrides, ref_dir), cwd=ROOT, stdout=logs["uninterrupted"],
                         stderr=subprocess.STDOUT, timeout=max(1, deadline - time.time()))
    res["uninterrupted"] = {"rc": ref.returncode, "seconds": round(time.time() - t, 2)}
    if ref.returncode != 0:
        res["error"] = "the uninterrupted run failed (see uninterrupted.log)"
        return res

    t = time.time()
    proc = subprocess.Popen(_train_cmd(recipe, overrides, run_dir), cwd=ROOT, stdout=logs["killed"], stderr=subprocess.STDOUT)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    want = f"step-{kill_after:07d}"

    def latest_step() -> str:
        try:
            with open(latest) as f:
                return f.read().strip()
        except OSError:
            return ""

    while proc.poll() is None and time.time() < deadline and latest_step() < want:
        time.sleep(0.02)
    reached = latest_step() >= want
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res["killed"] = {"killed": killed and reached, "at": latest_step() or None, "seconds": round(time.time() - t, 2),
                     "summary_written": os.path.exists(os.path.join(run_dir, "summary.json"))}
    if not reached:
        res["error"] = f"out of time ({timeout:.0f} s) before the checkpoint {want} (see killed.log)"
        return res
    if not killed:
        res["error"] = f"the run ended (rc {proc.returncode}) before it could be killed at {want}: lower --kill-after"
        return res

    t = time.time()
    resumed = subprocess.run(_train_cmd(recipe, overrides, run_dir, "train.resume=auto"), cwd=ROOT,
                             stdout=logs["resumed"], stderr=subprocess.STDOUT, timeout=max(1, deadline - time.time()))
    res["resumed"] = {"rc": resumed.returncode, "seconds": round(time.time() - t, 2)}
    if resumed.returncode != 0:
        res["error"] = "the resumed run failed (see resumed.log)"
        return res
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    res["resumed"]["from_step"] = summary.get("resumed_from_step")
    with open(os.path.join(ref_dir, "summary.json")) as f:
        ref_summary = json.load(f)
    a, b = (os.path.join(d, "final", "model.safetensors") for d in (ref_dir, run_dir))
    res.update(bytes_identical=_sha256(a) == _sha256(b), **_tensors_equal(a, b),
               final_accuracy=[ref_summary.get("final_accuracy"), summary.get("final_accuracy")],
               total_steps=[ref_summary.get("total_steps"), summary.get("total_steps")])
    return res


# ---------------------------------------------------------------- summary
def junit_counts(paths: list[str]) -> dict:
    """passed/failed/errors/skipped over junit files; the same for the tests whose id names cuda, and for
    the Triton kernels' tests (tests/quant/test_triton.py)."""
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cuda, triton = dict(total), dict(total)
    failed_ids = []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            total.setdefault("unreadable", []).append(f"{os.path.basename(path)}: {exc}")
            continue
        for case in root.iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = ("failed" if "failure" in kinds else "errors" if "error" in kinds
                       else "skipped" if "skipped" in kinds else "passed")
            total[outcome] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if "cuda" in name.lower():
                cuda[outcome] += 1
            if "test_triton" in name:
                triton[outcome] += 1
            if outcome in ("failed", "errors"):
                failed_ids.append(name)
    return {**total, "cuda": cuda, "triton": triton, "failed_ids": failed_ids[:50]}


def _load_json(path: str):
    try:
        with open(path) as f:
            text = f.read()
        # a benchmark may print a warning before its JSON: take the outermost object
        return json.loads(text[text.index("{"):text.rindex("}") + 1])
    except (OSError, ValueError) as exc:
        return {"error": f"{os.path.basename(path)}: {type(exc).__name__}: {exc}"}


def summary(work: str, out: str, mode: str) -> dict:
    steps = {}
    steps_file = os.path.join(work, "steps.jsonl")
    if os.path.exists(steps_file):
        with open(steps_file) as f:
            for line in f:
                if line.strip():
                    s = json.loads(line)
                    steps[s.pop("name")] = s
    env = _load_json(os.path.join(work, "env.json"))
    report = {
        "issue": [17, 35], "mode": mode, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": env.get("device"), "torch": env.get("torch"), "cuda": env.get("cuda"), "python": env.get("python"),
        "env": env, "steps": steps,
        "tests": junit_counts(sorted(glob.glob(os.path.join(work, "junit*.xml")))),
    }
    for key, name in (("build", "build.json"), ("kernels", "kernels.json"), ("throughput", "throughput.json"),
                      ("triton_kernels", "triton_kernels.json"), ("methods", "methods.json")):
        path = os.path.join(work, name)
        if os.path.exists(path):
            report[key] = _load_json(path)
    digits = {}
    for path in sorted(glob.glob(os.path.join(work, "digits_*.json"))):
        digits[os.path.basename(path)[len("digits_"):-len(".json")]] = _load_json(path)
    report["digits"] = digits
    report["resume"] = {os.path.basename(p)[len("resume_"):-len(".json")]: _load_json(p)
                        for p in sorted(glob.glob(os.path.join(work, "resume_*.json")))}
    report["figures"] = figures(report)
    report["ok"] = all(s.get("rc") == 0 for s in steps.values() if not s.get("skipped")) and \
        report["tests"]["failed"] == 0 and report["tests"]["errors"] == 0
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, out)
    return report


def figures(report: dict) -> dict:
    """The issue's headline numbers, pulled out of the step results (absent when a step failed)."""
    fig: dict = {}
    t = report["tests"]
    fig["tests"] = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped " \
                   f"(cuda: {t['cuda']['passed']} passed, {t['cuda']['failed']} failed, {t['cuda']['skipped']} skipped; " \
                   f"triton: {t['triton']['passed']} passed, {t['triton']['failed']} failed, {t['triton']['skipped']} skipped)"
    k = report.get("kernels") or {}
    if "info" in k:
        fig["copy_gbps"] = k["info"].get("copy_gbps")
        for name, r in k.items():
            if name != "info" and isinstance(r, dict):
                fig[f"kernels/{name}"] = {key: r.get(key) for key in ("kernel_s", "speedup", "gbps", "of_copy",
                                                                     "device_s", "device_gbps", "device_of_copy")
                                          if key in r}
    for name, r in ((report.get("triton_kernels") or {}).get("ops") or {}).items():
        fig[f"triton/{name}"] = {key: r.get(key) for key in ("reference_ms", "triton_ms", "speedup", "gbps", "of_copy")
                                 if key in r}
    methods = (report.get("methods") or {}).get("resnet50") or []
    if methods:
        fig["resnet50_step_ms"] = {r["method"]: r.get("step_ms", r.get("status")) for r in methods}
    tp = report.get("throughput") or {}
    if "results" in tp:
        fig["throughput_images_per_s"] = {n: r.get("images_per_s") for n, r in tp["results"].items()}
        fig["throughput_step_time_ratios"] = tp.get("ratios")
    for name, d in (report.get("digits") or {}).items():
        fig[f"digits/{name}"] = {key: d.get(key) for key in ("final_accuracy", "step_ms_median", "sq_share_median",
                                                           "kernel_backend", "skipped_steps") if key in d}
        if d.get("scaler"):
            fig[f"digits/{name}"]["scaler"] = d["scaler"]["class"]
    for precision, r in (report.get("resume") or {}).items():
        f = fig[f"resume/{precision}"] = {key: r.get(key) for key in ("bytes_identical", "n_tensors_differing", "error")
                                          if key in r}
        f["killed_at"] = (r.get("killed") or {}).get("at")
    return fig


def print_table(report: dict) -> None:
    print(f"== gpu_check ({report['mode']}): {report.get('device')}, torch {report.get('torch')}")
    for name, s in report["steps"].items():
        state = "skipped" if s.get("skipped") else ("TIMEOUT" if s.get("timed_out") else ("ok" if s.get("rc") == 0 else f"FAIL rc={s.get('rc')}"))
        print(f"  {name:<16} {state:<10} {s.get('seconds', 0):>6.1f} s  {s.get('note', '')}")
    for key, value in report["figures"].items():
        print(f"  {key}: {json.dumps(value, default=str)}")
    print(f"== {'OK' if report['ok'] else 'NOT OK'}")


# ---------------------------------------------------------------- env
def env_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host_cpus": os.cpu_count()}
    for mod in ("timm", "accelerate", "safetensors", "numpy", "pytest"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # a missing package is a finding, not a crash
            info[mod] = f"missing ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 1e9, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        info["git"] = None
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--json", required=True)
    k = sub.add_parser("kill-resume")
    k.add_argument("recipe")
    k.add_argument("overrides", nargs="*")
    k.add_argument("--work", required=True)
    k.add_argument("--kill-after", type=int, required=True)
    k.add_argument("--timeout", type=float, default=300)
    k.add_argument("--json", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--mode", default="gpu")
    e = sub.add_parser("env")
    e.add_argument("--json", required=True)
    args = ap.parse_args(argv)

    if args.cmd == "summary":
        report = summary(args.work, args.out, args.mode)
        print_table(report)
        return 0 if report["ok"] else 1
    if args.cmd == "env":
        res = env_info()
    elif args.cmd == "train":
        res = timed_train(args.recipe, args.overrides)
    else:
        res = {}
        try:
            kill_resume(args.recipe, args.overrides, args.work, args.kill_after, args.timeout, res)
        except subprocess.TimeoutExpired as exc:
            res["error"] = f"out of time ({args.timeout:.0f} s) in: {' '.join(exc.cmd[-3:])}"
    if os.environ.get("RANK", "0") == "0":  # under torchrun (the FSDP2 row) rank 0 writes
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(json.dumps(res, default=str))
    failed = "error" in res or res.get("preempted") or (args.cmd == "kill-resume" and not res.get("bytes_identical"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
