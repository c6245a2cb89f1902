"""Slurm: the sbatch script we render, preemption signals, and real jobs.

The cluster tests start a two-node Slurm cluster on loopback
(``slurm/cluster_up.sh``: munged, slurmctld, slurmd n1 and n2), submit the
digits recipe with ``python -m sqdist.slurm submit`` exactly as a user would,
and read the outcome from ``scontrol show job`` and the run's summary.json.
They install Debian's slurm-wlm and munge when missing (root only) and are
skipped, with the reason, only where that is impossible.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdist.train import preempt
from sqdist.slurm import SubmitError, SubmitSpec, render, time_to_seconds
from sqdist.slurm import main as slurm_main

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_sq_twn.yaml"
PY = sys.executable
# A short run: 2 ranks x 40 optimizer steps, a checkpoint every 3 steps.
STEPS = 40
CPUS = min(2, os.cpu_count() or 1)  # per node, within what each loopback node has
# Full-width resnet10t on 16x16 inputs: slow enough (~0.1 s a step) that a signal sent after the
# first checkpoint reliably lands mid-run, whatever the load on the machine.
TRAIN_OVERRIDES = [f"train.max_steps={STEPS}", "train.checkpoint_every=3", "train.progress=false",
                   "data.image_size=16", "model.kwargs={num_classes: 10, in_chans: 1}"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "sqdist.slurm", *args], capture_output=True, text=True, cwd=ROOT, env=env)


# ------------------------------------------------------------ rendering
def test_dry_run_gpu_nodes_launches_accelerate_on_every_node():
    out = cli("submit", str(RECIPE), "train.epochs=90", "--nodes", "4", "--gpus-per-node", "8",
              "--cpus-per-node", "64",
              "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj1", "--sbatch=--qos=high", "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00", "#SBATCH --account=proj1",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@300",
                 f"#SBATCH --chdir={ROOT}", "#SBATCH --job-name=sqdist-digits_sq_twn",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --qos=high"):
        assert line in script.splitlines(), f"missing {line!r}"
    assert "--multi_gpu --num_machines 4 --num_processes 32" in script
    assert "srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1" in script
    assert '--machine_rank "$SLURM_NODEID"' in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert '--main_process_ip "$head_addr" --main_process_port "$port"' in script
    assert "port=$(( 20000 + SLURM_JOB_ID % 10000 ))" in script
    # The venv's python on the nodes, the recipe by absolute path, resume last.
    assert f"{PY} --multi_gpu" in script
    assert f"-m sqdist.train {RECIPE} train.epochs=90 train.resume=auto" in script
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


def test_dry_run_cpu_nodes_one_process_each():
    out = cli("submit", str(RECIPE), "--nodes", "2", "--gpus-per-node", "0", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "--multi_gpu --num_machines 2 --num_processes 2" in out.stdout
    assert "--gpus-per-node" not in out.stdout
    assert "#SBATCH --time" not in out.stdout and "#SBATCH --partition" not in out.stdout


def test_single_process_job_needs_no_distributed_launcher(tmp_path):
    spec = SubmitSpec(recipe=RECIPE, nodes=1, gpus_per_node=0, log_dir=tmp_path, job_name="one")
    script = render(spec)
    assert "--multi_gpu" not in script
    assert "--num_machines 1 --num_processes 1" in script
    assert f"#SBATCH --output={tmp_path}/one-%j.log" in script
    assert spec.log_path(42) == tmp_path / "one-42.log"


def test_relative_recipe_and_log_dir_resolve_against_the_working_directory(tmp_path):
    (tmp_path / "r.yaml").write_text("train: {epochs: 1}\n")
    script = render(SubmitSpec(recipe=Path("r.yaml"), workdir=tmp_path, log_dir=Path("logs")))
    assert f"-m sqdist.train {tmp_path}/r.yaml train.resume=auto" in script
    assert f"#SBATCH --output={tmp_path}/logs/sqdist-r-%j.log" in script


@pytest.mark.parametrize("args, names", [
    ([str(ROOT / "recipes/missing.yaml")], "recipes/missing.yaml"),
    ([str(RECIPE), "--nodes", "0"], "--nodes=0"),
    ([str(RECIPE), "--gpus-per-node", "-1"], "--gpus-per-node=-1"),
    ([str(RECIPE), "--time", "soon"], "--time='soon'"),
    ([str(RECIPE), "--time", "4", "--signal-before", "300"], "--time=4"),
    ([str(RECIPE), "epochs"], "'epochs'"),
    ([str(RECIPE), "train.resume=none"], "train.resume"),
    ([str(RECIPE), "--partition", "a b"], "--partition='a b'"),
    ([str(RECIPE), "--cpus-per-node", "0"], "--cpus-per-node=0"),
    ([str(RECIPE), "--sbatch=--qos high"], "--sbatch='--qos high'"),
])
def test_bad_input_gives_one_clear_line_and_exit_2(args, names, capsys):
    assert slurm_main(["submit", *args, "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sqdist.slurm: error:") and names in lines[0], out.err


def test_bad_input_exit_code_from_the_command_line():
    out = cli("submit", "recipes/missing.yaml", "--nodes", "2")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("sqdist.slurm: error: recipe 'recipes/missing.yaml' is not a file "
                                  f"(looked at {ROOT}/recipes/missing.yaml)")


def test_time_to_seconds_reads_every_slurm_format():
    assert [time_to_seconds(t) for t in ("90", "5:30", "2:00:00", "1-2", "1-2:30", "1-0:0:10")] == \
        [5400, 330, 7200, 93600, 95400, 86410]
    with pytest.raises(SubmitError, match="not a Slurm time limit"):
        time_to_seconds("1h")


# ------------------------------------------------------------ preemption signals
def test_handler_sets_a_flag_and_keeps_the_process_alive():
    handler = preempt.install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert handler.received == signal.SIGTERM
    finally:
        handler.uninstall()


def test_handler_works_under_a_launcher_that_ignores_sigusr1():
    """The job's launchers ignore SIGUSR1 and their children inherit that; install() must undo it."""
    child = ("import os, signal, sys\n"
             "from sqdist.train import preempt\n"
             "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN\n"
             "h = preempt.install()\n"
             "os.kill(os.getpid(), signal.SIGUSR1)\n"
             "print(h.requested)\n")
    out = subprocess.run(["bash", "-c", f'trap "" USR1; exec {PY} -c "$0"', child],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_requeue_outside_slurm_does_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preempt.requeue() is False


def test_requeue_in_a_submitted_job_leaves_the_request_to_the_batch_script(monkeypatch, tmp_path):
    marker = tmp_path / "job.requeue"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SQDIST_REQUEUE_FILE", str(marker))
    monkeypatch.setenv("RANK", "1")
    assert preempt.requeue() is False and not marker.exists()  # rank 1 never requeues
    monkeypatch.setenv("RANK", "0")
    assert preempt.requeue() is True
    assert marker.read_text().strip() == "1234"


# ------------------------------------------------------------ a real cluster
def _ensure_slurm() -> str | None:
    """Install slurm-wlm and munge if missing (root only). Returns a skip reason or None."""
    if os.geteuid() != 0:
        return "the loopback Slurm cluster needs root (slurmd starts jobs as the submitting user)"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            return f"cannot install Slurm ({' '.join(cmd)}): {err}"
        if res.returncode != 0:
            return f"cannot install Slurm ({' '.join(cmd)}): {res.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port_base() -> int:
    """Three free consecutive ports below the range job ports use (20000+)."""
    for base in range(15000 + os.getpid() % 4000, 19997, 3):
        try:
            for p in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no three free consecutive ports in 15000-19999")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node loopback cluster; yields the environment that reaches it."""
    reason = _ensure_slurm()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-cluster")
    env = {**os.environ, "SQDIST_SLURM_PORT": str(_free_port_base())}
    up = subprocess.run(["bash", str(ROOT / "slurm/cluster_up.sh"), str(state)],
                        capture_output=True, text=True, env=env)
    assert up.returncode == 0, f"cluster_up.sh failed:\n{up.stdout}\n{up.stderr}"
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/cluster_down.sh"), str(state)], capture_output=True, env=env)


def job_info(job_id: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for_job(job_id: str, env: dict, log: Path, timeout: float = 900) -> dict:
    """Poll until the job reaches a final state; returns scontrol's fields."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(job_id, env)
        if info.get("JobState") in final:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"job {job_id} not finished after {timeout} s; log tail:\n{tail}")


def submit_digits(env: dict, run_dir: Path, log_dir: Path, name: str) -> tuple[str, Path]:
    out = cli("submit", str(RECIPE), *TRAIN_OVERRIDES, f"run.dir={run_dir}",
              "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", str(CPUS), "--log-dir", str(log_dir), "--job-name", name, env=env)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    log = Path(re.search(r"log: (\S+)", out.stdout).group(1))
    assert log == log_dir / f"{name}-{job_id}.log"
    return job_id, log


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, tmp_path_factory):
    """The digits recipe on 2 nodes x 1 CPU process, run to the end."""
    base = tmp_path_factory.mktemp("digits-2node")
    t0 = time.time()
    job_id, log = submit_digits(slurm_cluster, base / "run", base / "logs", "digits")
    info = wait_for_job(job_id, slurm_cluster, log)
    seconds = time.time() - t0
    print(f"\n[slurm] 2-node digits job {job_id}: submit to finish {seconds:.1f} s")
    return {"job_id": job_id, "info": info, "log": log, "run": base / "run", "seconds": seconds}


@pytest.mark.slow
def test_two_node_digits_job_completes(uninterrupted_run):
    info, log = uninterrupted_run["info"], uninterrupted_run["log"]
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0" and info["NumCPUs"] == str(2 * CPUS)
    summary = json.loads((uninterrupted_run["run"] / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["total_steps"] == STEPS and summary["resumed_from_step"] is None
    # 40 steps teach little; what matters is that the final evaluation ran and was recorded.
    assert isinstance(summary["final_accuracy"], float) and 0.0 <= summary["final_accuracy"] <= 100.0
    evals = [json.loads(line) for line in (uninterrupted_run["run"] / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == STEPS and evals[-1]["eval/top1"] == summary["final_accuracy"]
    assert (uninterrupted_run["run"] / "final" / "model.safetensors").is_file()
    assert "finished with status 0" in text


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_from_its_checkpoint(slurm_cluster, uninterrupted_run, tmp_path):
    env, run = slurm_cluster, tmp_path / "run"
    t0 = time.time()
    job_id, log = submit_digits(env, run, tmp_path / "logs", "digits-preempt")
    # Preempt once the first checkpoint exists: training is then well inside its loop.
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest").exists():
        assert time.time() < deadline and job_info(job_id, env).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.5)
    # What Slurm does before the time limit (--signal=USR1@secs): SIGUSR1 to every step process.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=env)
    info = wait_for_job(job_id, env, log)
    seconds = time.time() - t0
    print(f"\n[slurm] preempted 2-node digits job {job_id}: submit to finish {seconds:.1f} s")

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "1", text[-3000:]
    assert "requeueing job" in text and "start #1" in text  # both runs appended to one log
    summary = json.loads((run / "summary.json").read_text())
    first = json.loads((uninterrupted_run["run"] / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < STEPS
    assert summary["total_steps"] == first["total_steps"] == STEPS
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [e["step"] for e in events if e.get("event") == "preempted"] == [summary["resumed_from_step"]]
    # Resume is exact: the interrupted run ends with the uninterrupted run's weights.
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(uninterrupted_run["run"] / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["final_accuracy"] == first["final_accuracy"]
