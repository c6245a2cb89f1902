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
