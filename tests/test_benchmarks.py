"""The benchmarks' smoke modes run end to end (the numbers themselves are in benchmarks/results/)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_leaderboard_quick_json_has_the_required_rows(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/leaderboard.py", "--quick", "--json",
                           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"FP", "BWN", "TWN", "SQ-TWN", "kbit4"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert isinstance(r["size_bytes"], int) and r["size_bytes"] > 0
        assert 0 <= r["top1_mean"] <= 100 and len(r["top1"]["runs"]) == 2
        assert r["bits"].startswith("W")
    # sizes come from the written files: FP's fp32 weights are the largest, BWN's 1-bit codes the smallest
    assert rows["FP"]["size_bytes"] > rows["kbit4"]["size_bytes"] > rows["TWN"]["size_bytes"] > rows["BWN"]["size_bytes"]
    assert rows["FP"]["step_ratio"] == 1.0 and rows["SQ-TWN"]["vs_base"]["mean"] is not None
    assert (tmp_path / "out" / "leaderboard.png").stat().st_size > 10_000
    assert "| SQ-TWN | W2A32 |" in (tmp_path / "out" / "table.md").read_text()


def test_leaderboard_pareto_front():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from leaderboard import pareto
    finally:
        sys.path.pop(0)
    points = [(100, 95.0, "fp"), (30, 93.0, "kbit4"), (25, 90.0, "twn"), (26, 89.0, "worse"), (20, 85.0, "bwn"),
              (30, 92.0, "tie-size-worse")]
    assert [p[2] for p in pareto(points)] == ["bwn", "twn", "kbit4", "fp"]


def test_leaderboard_fashion_mnist_rows_run_in_its_setting_with_their_budgets():
    from sqdist.config import FASHION_MNIST_ROOT, fashion_mnist_files

    if not all(os.path.isfile(p) for p in fashion_mnist_files(FASHION_MNIST_ROOT)):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from digits_common import load
        from leaderboard import DATASETS, plan, setting_overrides
    finally:
        sys.path.pop(0)
    data = DATASETS["fashion_mnist"]
    assert data.seeds == 5 and data.epochs == 2 and {"SQ-TWN 3x", "SLB W1 3x", "PQ small blocks", "SRQ learned widths"} <= set(data.rows)
    setting = setting_overrides("fashion_mnist")
    fashion = load("fashion_mnist_fp", [])
    jobs = plan(["TWN", "SQ-TWN 3x", "SLB W1", "SQ-BWN (paper)"], 1, 3, 100, "runs", False, setting)
    recipes = {j["label"]: load(j["recipe"], j["overrides"]) for j in jobs}
    for label, r in recipes.items():  # every row in the Fashion-MNIST setting, with its own method
        assert r["data"] == {**fashion["data"], "root": FASHION_MNIST_ROOT}, label
        assert r["model"] == fashion["model"] and r["train"]["bn_recalibrate"] == fashion["train"]["bn_recalibrate"]
    assert recipes["TWN"]["train"]["epochs"] == 3 and recipes["SQ-TWN 3x"]["train"]["epochs"] == 9
    assert recipes["SQ-TWN 3x"]["sq"]["stage_length"] == 225 and recipes["SQ-TWN 3x"]["sq"]["unit"] == "step"
    assert recipes["SLB W1"]["quant"]["name"] == "slb" and recipes["SLB W1"]["optim"]["name"] == "momentum"
    assert recipes["SQ-BWN (paper)"]["train"]["epochs"] == 12 and recipes["SQ-BWN (paper)"]["sq"]["stage_length"] == 3
    assert [j["cost"] for j in jobs] == [1, 3, 1, 4]
    assert setting_overrides("digits") == []


def test_method_speed_lists_every_registered_quantizer_and_refuses_unknown_rows():
    # the registry as a fresh process sees it (other tests register quantizers in this one)
    names = subprocess.run([sys.executable, "-c", "import sqdist; print(*sqdist.list_quantizers())"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300).stdout.split()
    assert "kbit" in names
    proc = subprocess.run([sys.executable, "benchmarks/method_speed.py", "--list"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = proc.stdout.splitlines()
    assert {"FP", "kbit4", "kbit4 scale max", "W4A4 LSQ", "SQ-TWN", "BWN", "TWN"} <= set(rows)
    text = proc.stdout
    for name in names:  # a row of its own or a leaderboard row that uses it
        assert name in text.lower() or name.upper() in text, name
    bad = subprocess.run([sys.executable, "benchmarks/method_speed.py", "--rows", "FP,nope"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--rows: 'nope' is not a method" in bad.stderr


@pytest.mark.slow
def test_method_speed_measures_through_the_trainer(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/method_speed.py", "--rows", "FP,kbit4", "--steps", "2",
                           "--rounds", "2", "--warmup", "1", "--no-resnet50", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(proc.stdout)["resnet18"]}
    assert rows["FP"]["x_fp"] == 1.0 and rows["FP"]["bits"] == "W32A32" and rows["kbit4"]["bits"] == "W4A32"
    for r in rows.values():
        assert r["status"] == "ok" and r["steps"] == 2 and r["step_ms"] > 0 and r["peak_rss_mib"] > r["setup_rss_mib"] / 2


@pytest.mark.slow
def test_deploy_digits_json_has_the_required_fields(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/deploy.py", "--models", "digits", "--reps", "2", "--lock", "",
                           "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    # each runtime's FP32 model is a row of its own (the baseline of that runtime's rows)
    assert {(r["runtime"], r["batch"]) for r in rows if r["weights"] == "fp32"} == {
        (rt, b) for rt in ("onnxruntime", "openvino") for b in (1, 8)}
    twn = [r for r in rows if r["weights"] != "fp32"]
    assert {(r["activations"], r["batch"]) for r in twn} == {("float", 1), ("float", 8), ("int8", 1), ("int8", 8)}
    assert {(r["runtime"], r["activations"]) for r in twn} == {("onnxruntime", "float"), ("onnxruntime", "int8"),
                                                               ("openvino", "int8")}
    for r in twn:
        assert {"model", "runtime", "weights", "activations", "batch", "fp32_ms", "ms", "speedup", "fp32_bytes",
                "bytes", "size_ratio"} <= set(r)
        assert r["weights"] == "twn" and r["ms"] > 0
        # an IR's .xml (the graph as text) outweighs this tiny network's weights: sizes compared in onnxruntime
        assert r["bytes"] < r["fp32_bytes"] or r["runtime"] == "openvino"
        assert abs(r["top1"] - r["run_top1"]) <= 1.0  # each runtime on the test split, against the run in torch


def test_deploy_refuses_unknown_models():
    proc = subprocess.run([sys.executable, "benchmarks/deploy.py", "--models", "resnet18,vgg"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown 'vgg'" in proc.stderr and "Traceback" not in proc.stderr


def _benchmarks_import(*names):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import digits_common
    finally:
        sys.path.pop(0)
    return [getattr(digits_common, n) for n in names]


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_leaderboard_run_interrupted_mid_run_resumes_from_its_epoch_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from sqdist.train import train

    load, recipe_digest, train_job = _benchmarks_import("load", "recipe_digest", "train_job")
    overrides = ["train.epochs=2", "train.progress=false", "track.wandb=false"]
    job = {"recipe": "digits_twn", "overrides": overrides, "name": "TWN", "seed": 0, "checkpoint_every": 21}
    whole = train_job({**job, "runs": str(tmp_path / "a")})
    assert whole["summary"]["total_steps"] == 42 and whole["summary"]["resumed_from_step"] is None
    # the same run in another folder, killed at step 30 (after its epoch-1 checkpoint at step 21)
    recipe = load("digits_twn", overrides)
    run_dir = tmp_path / "b" / f"TWN_s0_{recipe_digest(recipe)}"
    recipe["run"]["dir"], recipe["train"]["checkpoint_every"] = str(run_dir), 21

    def crash(step, net, sq):
        if step == 30:
            raise _Crash

    with pytest.raises(_Crash):
        train(recipe, on_step=crash)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000021"
    assert not (run_dir / "summary.json").exists()
    resumed = train_job({**job, "runs": str(tmp_path / "b")})
    assert resumed["run_dir"] == str(run_dir) and not resumed["cached"]
    assert resumed["summary"]["resumed_from_step"] == 21
    assert resumed["summary"]["final_accuracy"] == whole["summary"]["final_accuracy"]
    a = load_file(os.path.join(whole["run_dir"], "final", "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-exact resume
    # a finished run keeps only its last checkpoint and is read back, not retrained
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-0000042"]
    again = train_job({**job, "runs": str(tmp_path / "b")})
    assert again["cached"] and again["run_dir"] == str(run_dir)
    with pytest.raises(LookupError):  # --report: read back or nothing
        train_job({**job, "runs": str(tmp_path / "c"), "cached_only": True})


@pytest.mark.slow
def test_jobs_of_the_same_run_train_it_once(tmp_path, monkeypatch):
    """``leaderboard.py --rows FP,PTQ ...`` on an empty cache: each PTQ row's job is the FP run of its seed.
    Two workers must not train one run into one folder at once: it trains once, every job gets its result."""
    (train_all,) = _benchmarks_import("train_all")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # the spawned workers import digits_common
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = {"recipe": "digits_fp", "name": "FP", "runs": str(tmp_path / "runs")}
    seed0 = {**base, "seed": 0, "overrides": ["train.epochs=1", "train.progress=false", "track.wandb=false"]}
    seed1 = {**seed0, "seed": 1, "overrides": ["train.seed=1", *seed0["overrides"]]}
    jobs = [{**seed0, "label": "FP"}, {**seed0, "label": "PTQ RTN kbit2"}, {**seed1, "label": "FP"},
            {**seed0, "label": "PTQ GPTQ kbit2"}, {**seed1, "label": "PTQ RTN kbit2"}]
    results = train_all(jobs, 2)
    assert results[0] == results[1] == results[3] and results[2] == results[4] and results[0] != results[2]
    assert not results[1]["cached"] and not results[3]["cached"]   # the trained run itself, not a second read
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "runs").iterdir()) == ["s0", "s1"]
    lines = (Path(results[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))   # one training wrote it


@pytest.mark.slow
def test_leaderboard_converged_smoke_chooses_epochs_distills_and_continues(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "benchmarks/leaderboard_converged.py", "--data", "digits", "--ladder", "1,2",
           "--ladder-seeds", "1", "--seeds", "1", "--rows", "FP,TWN + KD", "--runs", str(runs), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout)
    rows = {r["method"]: r for r in first["rows"]}
    assert rows["FP"]["status"] == "ok" and rows["TWN + KD"]["status"] == "ok", rows
    assert [c["epochs"] for c in first["ladder"]["curve"]] == [1, 2] and len(first["ladder"]["gains"]) == 1
    gain = first["ladder"]["gains"][0]["mean"]
    assert first["meta"]["epochs"] == (2 if gain >= 0.2 else 1)  # the rule, applied to the holdout curve
    # the ladder's FP runs were evaluated on the holdout split; the table's runs train E epochs on the full split
    import yaml

    def config(folder):
        return yaml.safe_load((folder / "config.yaml").read_text())

    ladder = sorted(config(p)["train"]["epochs"] for p in runs.glob("FP_holdout_s0_*"))
    assert ladder == [1, 2] and all(config(p)["data"]["holdout_fraction"] == 0.1 for p in runs.glob("FP_holdout_s0_*"))
    assert config(next(runs.glob("FP_s0_*")))["data"]["holdout_fraction"] == 0.0
    fp_dir = next(runs.glob("FP_s0_*"))
    kd_dir = next(runs.glob("TWN_+_KD_s0_*"))
    kd = json.loads((kd_dir / "summary.json").read_text())
    assert kd["distill"]["teacher"] == str(fp_dir) and kd["total_steps"] == 21 * first["meta"]["epochs"]
    assert first["meta"]["runs_done"] == first["meta"]["runs_total"] == 2 and first["meta"]["runs_cached"] == 0
    # an interruption: the KD run lost its end (summary, final/); the same command finishes it from its
    # checkpoint and reads everything else back
    (kd_dir / "summary.json").unlink()
    for f in (kd_dir / "final").iterdir():
        f.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(proc.stdout)
    assert second["meta"]["runs_cached"] == 1 and second["meta"]["runs_done"] == 2
    assert json.loads((kd_dir / "summary.json").read_text())["resumed_from_step"] == kd["total_steps"]
    assert {r["method"]: r["top1_mean"] for r in second["rows"]} == {r["method"]: r["top1_mean"] for r in first["rows"]}
    # --publish rewrites the page's table and keeps its hand-written reading
    results = tmp_path / "results"
    results.mkdir()
    page = results / "leaderboard_digits_converged.md"
    page.write_text("# an older table\n\n## Reading\n\nWritten from the numbers.\n")
    proc = subprocess.run([*cmd, "--publish", "--results", str(results)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert "an older table" not in text and "| TWN + KD |" in text
    assert text.endswith("\n## Reading\n\nWritten from the numbers.\n")
    # --report trains nothing and says what is missing
    proc = subprocess.run([*cmd[:-3], "--runs", str(tmp_path / "empty"), "--epochs", "1", "--report", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["meta"]["runs_done"] == 0 and all(r["status"].startswith("not trained yet") for r in report["rows"])
    assert not list((tmp_path / "empty").glob("FP_*"))
    bad = subprocess.run([*cmd[:-1], "--json", "--rows", "FP,nope"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "--rows: 'nope' is not a row" in bad.stderr
    import fcntl

    with open(runs / ".lock", "w") as lock:  # a second training process on the same runs folder is refused
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert busy.returncode == 2 and "another leaderboard_converged.py is training there" in busy.stderr


def test_leaderboard_publish_with_some_rows_is_refused_before_anything_runs(tmp_path):
    published = Path(ROOT) / "benchmarks" / "results" / "leaderboard_fashion_mnist.md"
    before = published.read_bytes()
    proc = subprocess.run([sys.executable, "benchmarks/leaderboard.py", "--data", "fashion_mnist", "--rows", "FP",
                           "--publish", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--publish with --rows='FP'" in proc.stderr and "allowed:" in proc.stderr
    assert published.read_bytes() == before and not (tmp_path / "runs").exists()


def _converged():
    sys.path.insert(0, str(Path(ROOT) / "benchmarks"))
    try:
        import leaderboard_converged
    finally:
        sys.path.remove(str(Path(ROOT) / "benchmarks"))
    return leaderboard_converged


def test_leaderboard_converged_republish_keeps_the_reading(tmp_path):
    kept_reading = _converged().kept_reading
    page = tmp_path / "page.md"
    assert kept_reading(page) == ""  # no page yet
    page.write_text("# Leaderboard\n\n| table |\n")
    assert kept_reading(page) == ""  # a page without a reading
    page.write_text("# Leaderboard\n\n| old table |\n\n## Reading\n\nSQ helps at 2 bits.\n")
    assert kept_reading(page) == "\n## Reading\n\nSQ helps at 2 bits.\n"


def test_leaderboard_converged_kd_closes_a_share_of_the_gap_to_fp():
    lc = _converged()
    from digits_common import stats

    out = {"FP": {"top1": stats([92.0, 92.4, 92.2])}, "TWN": {"top1": stats([90.0, 90.1, 90.5])},
           "TWN + KD": {"top1": stats([91.0, 91.3, 91.2])}, "BWN + KD": {"top1": stats([88.0, 88.0, 88.0])}}
    gaps = lc.kd_gaps(out)  # BWN + KD has no BWN row yet: no line
    assert [g["method"] for g in gaps] == ["TWN + KD"]
    g = gaps[0]
    assert g["gap"]["runs"] == [2.0, 2.3, 1.7] and g["recovered"]["runs"] == [1.0, 1.2, 0.7]
    assert g["share_closed"] == pytest.approx((2.9 / 3) / 2.0, abs=1e-3)  # mean recovered / mean gap (3 decimals)
    text = lc.kd_table(gaps)
    assert text.startswith("\n\nDistillation")  # a blank line after the main table: markdown ends it there
    assert "| TWN + KD | +2.00 [" in text and "| 48% |" in text
    assert lc.kd_table([]) == ""
    out["BWN"] = {"top1": stats([91.0, 93.0, 89.0])}  # a gap whose interval reaches 0: no share
    bwn = lc.kd_gaps(out)[1]
    assert bwn["method"] == "BWN + KD" and bwn["gap"]["ci95"][0] < 0 < bwn["gap"]["mean"] and bwn["share_closed"] is None
    assert "| BWN + KD | +1.20 [" in lc.kd_table([bwn]) and "n/a (gap's interval reaches 0)" in lc.kd_table([bwn])
