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
