"""The benchmarks' smoke modes run end to end (the numbers themselves are in benchmarks/results/)."""
import json
import os
import subprocess
import sys

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
