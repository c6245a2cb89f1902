"""Leaderboard rows of post-training quantization: ``python -m sqdist.ptq`` on each seed's FP run.

Each row quantizes the FP row's run of seed ``s`` (no training of its own) by round-to-nearest,
GPTQ or AdaRound (the command's defaults), at the bits of a QAT row (its ``base``: the paired
difference says what training buys), or with each layer's bits chosen under 2.5 bits per weight
(``--avg-bits 2.5``, rows ``... mixed 2.5b``, paired against QAT kbit2).
The stem conv and the classifier stay full precision, as in the QAT rows; BN statistics are
re-estimated on 10 training batches, as before every leaderboard evaluation; 512 calibration
images. The size is the packed file the command writes (the same format as ``sqdist.export``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

from digits_common import safe_job

# label: (method, quantizer, bits, the QAT row of the same bits, in words)
SHOWN = {"rtn": "RTN", "gptq": "GPTQ", "adaround": "AdaRound"}
PTQ_ROWS = {
    f"PTQ {SHOWN[method]} {name}": (method, quantizer, bits, base, f"{what}, {SHOWN[method]} of the FP run")
    for method in ("rtn", "gptq", "adaround")
    for name, quantizer, bits, base, what in (
        ("kbit8", "kbit", 8, "kbit8", "k-bit 8, mse scale"),
        ("kbit4", "kbit", 4, "kbit4", "k-bit 4, mse scale"),
        ("kbit3", "kbit", 3, "kbit3", "k-bit 3, mse scale"),
        ("kbit2", "kbit", 2, "kbit2", "k-bit 2 (ternary), mse scale"),
        ("TWN", "twn", 2, "TWN", "TWN (ternary)"),
    )
}
# bits per layer under a budget of 2.5 bits per weight (codes and scales; --avg-bits), paired against QAT kbit2
for method in ("gptq", "adaround"):
    PTQ_ROWS[f"PTQ {SHOWN[method]} mixed 2.5b"] = (method, "kbit", None, "kbit2",
                                                   f"bits per layer (1/2/3/4/8), 2.5 per weight, {SHOWN[method]} "
                                                   f"of the FP run")
AVG_BITS = 2.5
# part of each cached file's name: files written by the command before round 2 (its GPTQ
# minimised another objective under the same flags) are not read back
PTQ_VERSION = 2
CALIB_IMAGES = 512


def ptq_flags(label: str) -> list[str]:
    method, quantizer, bits, _, _ = PTQ_ROWS[label]
    width = ["--bits", str(bits)] if bits is not None else ["--avg-bits", str(AVG_BITS)]
    return ["--method", method, "--quantizer", quantizer, *width, "--calib-images", str(CALIB_IMAGES),
            "--bn-recalibrate", "10"]


def ptq_jobs(labels: list[str], jobs: list[dict], results: list[dict], fresh: bool) -> list[dict]:
    """One job per (PTQ row, seed) whose FP run trained; the file goes into that run's folder."""
    out = []
    for label in labels:
        if label not in PTQ_ROWS:
            continue
        flags = ptq_flags(label)
        tag = hashlib.sha1(json.dumps([flags, PTQ_VERSION]).encode()).hexdigest()[:8]
        for j, r in zip(jobs, results):
            if j["label"] == label and "error" not in r:
                out.append({"label": label, "seed": j["seed"], "run_dir": r["run_dir"], "flags": flags, "fresh": fresh,
                            "out": str(Path(r["run_dir"]) / f"ptq_{tag}.safetensors")})
    return out


def ptq_job(job: dict) -> dict:
    """``python -m sqdist.ptq`` in this process (one thread), cached beside the file: its JSON summary."""
    import torch

    torch.set_num_threads(1)
    from sqdist.ptq.cli import main

    out = Path(job["out"])
    summary = out.with_suffix(".json")
    if not (out.exists() and summary.exists()) or job["fresh"]:
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main([job["run_dir"], str(out), *job["flags"], "--json", "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"sqdist.ptq {job['run_dir']} {out} failed: {err.getvalue()[-2000:]}")
        result = json.loads(text.getvalue().strip().splitlines()[-1])
        result["seconds"] = round(time.time() - t0, 1)
        summary.write_text(json.dumps(result))
    result = json.loads(summary.read_text())
    return {"top1": result["top1"], "bytes": out.stat().st_size, "seconds": result["seconds"],
            "layer_output_error_sum": result["layer_output_error_sum"]}


def safe_ptq_job(job: dict) -> dict:
    return safe_job(ptq_job, job)


def bits_label(label: str) -> str:
    _, quantizer, bits, _, _ = PTQ_ROWS[label]
    if bits is None:
        return f"W{AVG_BITS}A32 mixed (PTQ)"
    return f"W{bits}A32 (PTQ)" if quantizer == "kbit" else "W2A32 ternary (PTQ)"
