"""Deploy parity on random timm architectures: does each export, and does what onnxruntime runs
match the model that was trained?

    python benchmarks/deploy_sweep.py --int8 --n 30 --seed 3            # 8-bit activations at export
    python benchmarks/deploy_sweep.py --lsq8 --n 30 --seed 3            # activations trained with LSQ, 8 bits
    python benchmarks/deploy_sweep.py --int8 --names resnet18,lcnet_050   # given architectures

Architectures are drawn from ``timm.list_models()`` with ``--seed`` (at most ``--max-params``
parameters, 64x64 inputs unless the model fixes its size); one that does not build or train is
skipped and the next drawn, until ``--n`` have trained. Each is made to look trained: BatchNorm
gains drawn in [0.5, 1.5] (timm zero-initialises some), kbit4 weights (``--int8``; 4-bit weights
and 8-bit LSQ inputs with ``--lsq8``), one SGD step, BatchNorm statistics from that step.

Each runs in a subprocess of its own (a crash or a hang is that row's result). A row is
``pass`` (exported, onnxruntime checked against the trained model and, exactly, against the
integer network), ``refused`` (one line from sqdist naming what it cannot export) or ``failed``
(anything else: a traceback, a crash, more than one line). The summary line gives the counts;
``--out FILE`` writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SKIP_WORDS = ("pretrained",)  # names that only select pretrained weights of another entry
KEYS = ("max_abs_diff", "tie_flips", "near_flips", "max_abs_diff_model", "model_rel_error", "model_agreement",
        "rounding_worst_share", "rounding_worst_point", "float_layers")


def candidates(seed: int) -> list[str]:
    import timm

    names = sorted(set(timm.list_models()))
    random.Random(seed).shuffle(names)
    return names


def parameter_count(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # some models cannot be built on the meta device; build them for real
        try:
            return sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
        except Exception:
            return None


def one(name: str, mode: str, size: int, keep_fp_bits: int, out_dir: str) -> dict:
    """Build, train one step, export and check ``name``; the row (run in a subprocess by :func:`main`)."""
    import timm
    import torch

    from sqdist import QuantConfig, SQConfig, calibrate_activations, quantize_model
    from sqdist.export import ExportError, export_onnx

    torch.manual_seed(0)
    row = {"name": name}
    try:
        model = timm.create_model(name, num_classes=10)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        fixed = cfg.get("fixed_input_size") or not _accepts(model, size)
        input_size = tuple(cfg.get("input_size", (3, 224, 224))) if fixed else (3, size, size)
        row["input"] = list(input_size)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
            model.train()(torch.randn(2, *input_size)).sum()  # timm trains it at this size
    except Exception as exc:
        row.update(status="untrainable", line=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return row
    try:  # from here on a failure is sqdist's
        lsq = mode == "lsq8"
        quantize_model(model, QuantConfig(quantizer="kbit", params={"bits": 4}, activations="lsq" if lsq else None,
                                          activation_params={"bits": 8} if lsq else {}, sq=SQConfig(ratios=(1.0,))))
        x = torch.randn(8, *input_size, generator=torch.Generator().manual_seed(1))
        if lsq:
            calibrate_activations(model, x)
        model.train()
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.01).step()
        if not bool(torch.isfinite(loss)):
            raise RuntimeError("loss is not finite")
    except Exception as exc:
        row.update(status="failed", line=f"training with sqdist: {type(exc).__name__}: {str(exc)[:200]}")
        return row
    model.eval()
    calibration = [torch.randn(8, *input_size, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    start = time.perf_counter()
    try:
        info = export_onnx(model, Path(out_dir) / f"{name}.onnx", input_size=input_size, keep_fp_bits=keep_fp_bits,
                           activations="float" if lsq else "int8", calibration=None if lsq else calibration)
        row.update(status="pass", **{k: info.get(k) for k in KEYS})
    except ExportError as exc:
        row.update(status="refused", line=str(exc))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _accepts(model, size: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
        return True
    except Exception:
        return False


def run_one(name: str, args) -> dict:
    """:func:`one` in a subprocess: a crash, a hang or anything printed beyond the row is a failure."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--one", name, "--mode", args.mode, "--size", str(args.size),
               "--keep-fp-bits", str(args.keep_fp_bits), "--tmp", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"name": name, "status": "failed", "line": f"timed out after {args.timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        return {"name": name, "status": "failed", "line": f"exit {proc.returncode}: {tail[:300]}"}
    row = json.loads(lines[-1])
    row["printed_lines"] = len(lines) - 1 + len([s for s in proc.stderr.splitlines() if s.strip()])
    if row["status"] == "refused" and "\n" in row["line"]:
        row["status"] = "failed"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8", help="8-bit activations at export")
    mode.add_argument("--lsq8", dest="mode", action="store_const", const="lsq8", help="8-bit LSQ activations trained")
    parser.add_argument("--mode", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=30, help="architectures that train (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--names", default="", help="comma-separated architectures instead of a random draw")
    parser.add_argument("--size", type=int, default=64, help="input height and width unless fixed (default 64)")
    parser.add_argument("--max-params", type=float, default=15e6)
    parser.add_argument("--keep-fp-bits", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per architecture")
    parser.add_argument("--out", default="", help="write the rows and the summary as JSON here")
    parser.add_argument("--report", default="", help="print a results JSON (--out) as a markdown table and exit")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = args.mode or "int8"
    if args.report:
        result = json.loads(Path(args.report).read_text())
        flag = "--lsq8" if result["mode"] == "lsq8" else "--int8"
        print(markdown(result, f"python benchmarks/deploy_sweep.py {flag} --n {result['n']} --seed {result['seed']}"
                               f" --out {args.report}"), end="")
        return 0
    if args.one:
        print(json.dumps(one(args.one, args.mode, args.size, args.keep_fp_bits, args.tmp)))
        return 0
    names = [n for n in args.names.split(",") if n] or None
    pool = iter(names or candidates(args.seed))
    rows, skipped = [], []
    while len(rows) < (len(names) if names else args.n):
        name = next(pool, None)
        if name is None:
            break
        if not names:
            if any(w in name for w in SKIP_WORDS):
                continue
            count = parameter_count(name)
            if count is None or count > args.max_params:
                continue
        row = run_one(name, args)
        if row["status"] == "untrainable":
            skipped.append(row)
            print(f"  skip {name}: {row['line']}", flush=True)
            continue
        rows.append(row)
        if args.out:  # after every row: an interrupted sweep keeps what it measured
            write(args, rows, skipped)
        rel = row.get("model_rel_error")
        detail = row.get("line") or (f"logits vs the model {'-' if rel is None else f'{rel:.4f}'} relative, "
                                     f"argmax agrees {row.get('model_agreement')}, float layers "
                                     f"{len(row.get('float_layers') or [])}")
        print(f"{len(rows):2d} {row['status']:7s} {name} {tuple(row.get('input', ()))} {row.get('seconds', '')}s: "
              f"{detail}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "refused", "failed")}
    print(f"mode {args.mode}, seed {args.seed}, keep_fp_bits {args.keep_fp_bits}: {len(rows)} architectures, "
          f"{counts['pass']} pass, {counts['refused']} refused, {counts['failed']} failed "
          f"({len(skipped)} skipped: did not build or train)")
    if args.out:
        write(args, rows, skipped)
    return 0


def markdown(result: dict, command: str) -> str:
    """The sweep's rows as a table (what benchmarks/results/deploy_sweep.md holds)."""
    lines = [f"`{command}`", "",
             f"{len(result['rows'])} architectures: {result['counts']['pass']} pass, {result['counts']['refused']} "
             f"refused, {result['counts']['failed']} failed ({len(result['skipped'])} drawn did not build or train).",
             "", "| # | architecture | input | status | logits vs the model (relative) | argmax agrees | "
             "codes > 1 step off at a rounding | onnxruntime: ties / one step off | float layers | s |",
             "|---:|---|---|---|---:|---:|---:|---|---:|---:|"]
    for k, r in enumerate(result["rows"], 1):
        def num(key, fmt):
            return "" if r.get(key) is None else format(r[key], fmt)
        status = r["status"] if r["status"] == "pass" else f"{r['status']}: {r.get('line', '')[:160]}"
        lines.append(f"| {k} | {r['name']} | {'x'.join(map(str, r.get('input', [])[1:]))} | {status} | "
                     f"{num('model_rel_error', '.4f')} | {num('model_agreement', '.3f')} | "
                     f"{num('rounding_worst_share', '.2%')} | {num('tie_flips', 'd')} / {num('near_flips', 'd')} | "
                     f"{len(r.get('float_layers') or [])} | {r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def write(args, rows: list[dict], skipped: list[dict]) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "refused", "failed")}
    Path(args.out).write_text(json.dumps({"mode": args.mode, "seed": args.seed, "n": args.n, "size": args.size,
                                          "keep_fp_bits": args.keep_fp_bits, "max_params": args.max_params,
                                          "counts": counts, "rows": rows, "skipped": skipped}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
