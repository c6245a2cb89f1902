"""Deploy that pays off: onnxruntime latency and file size of sqdist's ONNX against the FP32 ONNX.

    python benchmarks/deploy.py                  # table (and benchmarks/results/deploy.md with --save)
    python benchmarks/deploy.py --json           # {"rows": [...], "setup": {...}}
    python benchmarks/deploy.py --quick          # resnet18 only, fewer repetitions

Models: timm resnet18 and resnet50 at 224x224, 1000 classes, random weights with BatchNorm
gains drawn in [0.5, 1.5] as in a trained network (speed and size do not depend on the values;
the export check does), and a digits resnet10t trained with recipes/digits_twn.yaml
(and its float twin recipes/digits_fp.yaml for the FP32 row), for accuracy on real test data.
For each: the FP32 ONNX (torch.onnx, opset 17), and sqdist's ONNX of the TWN model
(``export_onnx``, opset 25: INT2 ternary codes) with float activations and with 8-bit activations
(``activations="int8"``, calibrated on 2 batches of random images for the resnets, on the
run's training data for digits). Stem and classifier at 8 bits (``--keep-fp-bits 8``).

Latency: one default onnxruntime session per file (CPU, ``--threads`` intra-op threads), the
sessions interleaved in one process (``--reps`` rounds, each file once per round), median.
``speedup`` = FP32 median / median; ``size_ratio`` = FP32 bytes / bytes. For the resnets,
onnxruntime's own ``quantize_static`` of the FP32 ONNX (QDQ, per-channel int8, uint8
activations, the same calibration batches) is timed in the same rounds: the int8 bar to meet.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
from sqdist import QuantConfig, SQConfig, quantize_model  # noqa: E402
from sqdist.export import export_onnx, load_run  # noqa: E402
from sqdist.export.run import run_data  # noqa: E402


def look_trained(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm gains drawn in [0.5, 1.5], as in a trained network: timm zero-initialises the last gain of
    each residual block, which makes an untrained network's blocks identities (and an int8 export of it
    checks nothing there)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
    return model


def fp32_onnx(model: torch.nn.Module, path: Path, input_size: tuple[int, int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, *input_size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def ort_static(fp32: Path, out: Path, calibration: list) -> Path:
    """onnxruntime's own int8 path on the FP32 ONNX, the bar to meet: ``quant_pre_process`` then
    ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min/max calibration on
    the same batches as sqdist's export)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.left = iter([{"input": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.left, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(paths: list[Path], input_size, batch: int, reps: int, threads: int) -> list[float]:
    """Median milliseconds of each file, measured interleaved (one run of each per round)."""
    sessions = [session(p, threads) for p in paths]
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    for s in sessions:
        s.run(None, {"input": x})  # warm-up
    times = [[] for _ in sessions]
    for _ in range(reps):
        for t, s in zip(times, sessions):
            start = time.perf_counter()
            s.run(None, {"input": x})
            t.append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def top1(path: Path, evaluation) -> float:
    s = session(path, 1)
    x, y = evaluation.tensors
    (logits,) = s.run(["logits"], {"input": x.float().numpy()})
    return 100.0 * float((torch.from_numpy(logits).argmax(1) == y).float().mean())


def train_run(recipe: str, folder: Path) -> Path:
    from sqdist.config import load_recipe
    from sqdist.train import train

    run = folder / Path(recipe).stem
    with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout is the table or the JSON
        train(load_recipe(str(ROOT / "recipes" / recipe), [f"run.dir={run}", "train.progress=false"]))
    return run


def float_run_model(run: Path) -> torch.nn.Module:
    from sqdist.runs import load_weights, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    return load_weights(ckpt, read_meta(ckpt))


def rows_for(name: str, fp32: Path, model, input_size, calibration, folder: Path, args, evaluation=None,
             fp32_top1=None, run_top1=None) -> list[dict]:
    files = {}
    for activations in ("float", "int8"):
        out = folder / f"{name}_twn_{activations}.onnx"
        info = export_onnx(model, out, input_size=input_size, keep_fp_bits=args.keep_fp_bits,
                           activations=activations, calibration=calibration if activations == "int8" else None)
        files[activations] = (out, info)
    if evaluation is None and args.ort_static:  # random-weight resnets: onnxruntime's own int8 beside ours
        out = ort_static(fp32, folder / f"{name}_ort_static.onnx", calibration)
        files["ort-static"] = (out, {"bytes": out.stat().st_size, "int2_weights": 0, "int4_weights": 0,
                                     "int8_weights": None, "max_abs_diff": None})
    rows = []
    for batch in args.batches:
        ms = latencies([fp32] + [f for f, _ in files.values()], input_size, batch, args.reps, args.threads)
        for (kind, (path, info)), t in zip(files.items(), ms[1:]):
            weights, activations = ("int8 (onnxruntime quantize_static)", "int8") if kind == "ort-static" else ("twn", kind)
            row = {"model": name, "weights": weights, "activations": activations, "batch": batch,
                   "fp32_ms": round(ms[0], 3), "ms": round(t, 3), "speedup": round(ms[0] / t, 3),
                   "fp32_bytes": fp32.stat().st_size, "bytes": info["bytes"],
                   "size_ratio": round(fp32.stat().st_size / info["bytes"], 3),
                   "int2_weights": info["int2_weights"], "int4_weights": info["int4_weights"],
                   "int8_weights": info["int8_weights"],
                   "max_abs_diff": info["max_abs_diff"], "fp32_top1": fp32_top1, "run_top1": run_top1,
                   "top1": round(top1(path, evaluation), 2) if evaluation is not None else None}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | activations | batch | fp32 ms | ms | speedup | fp32 MB | MB | smaller | "
             "top-1 fp32 / run / onnx |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        acc = (f"{r['fp32_top1']:.2f} / {r['run_top1']:.2f} / {r['top1']:.2f}" if r["top1"] is not None else "-")
        lines.append(f"| {r['model']} | {r['weights']} | {r['activations']} | {r['batch']} | {r['fp32_ms']:.1f} | "
                     f"{r['ms']:.1f} | {r['speedup']:.2f}x | {r['fp32_bytes'] / 1e6:.2f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['size_ratio']:.2f}x | {acc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print {'rows': [...], 'setup': {...}}")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 5 rounds")
    parser.add_argument("--reps", type=int, default=11, help="interleaved rounds per batch size (median)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--keep-fp-bits", type=int, default=8, choices=(8, 32))
    parser.add_argument("--models", default="resnet18,resnet50,digits",
                        help="comma-separated: resnet18, resnet50, digits")
    parser.add_argument("--digits-run", help="a finished digits_twn run (default: train one, ~1 minute)")
    parser.add_argument("--digits-fp-run", help="a finished digits_fp run (default: train one)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/deploy.md and deploy.json")
    parser.add_argument("--no-ort-static", dest="ort_static", action="store_false",
                        help="skip onnxruntime's own quantize_static rows (timed beside ours on the resnets)")
    args = parser.parse_args(argv)
    for flag in ("reps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected an integer >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ("resnet18", "resnet50", "digits")]
    if unknown:
        parser.error(f"--models={args.models!r}: unknown {unknown[0]!r}; allowed: resnet18, resnet50, digits")
    if args.quick:
        models, args.reps = ["resnet18"], 5
    args.batches = (1, 8)
    import onnxruntime as ort
    import onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in models:
            if name == "digits":
                twn_run = Path(args.digits_run) if args.digits_run else train_run("digits_twn.yaml", folder)
                fp_run = Path(args.digits_fp_run) if args.digits_fp_run else train_run("digits_fp.yaml", folder)
                model, meta = load_run(twn_run)
                calibration, evaluation = run_data(meta, 8)
                size = (int(meta["model_kwargs"].get("in_chans", 3)), meta["config"]["data"]["image_size"],
                        meta["config"]["data"]["image_size"])
                fp32 = folder / "digits_fp32.onnx"
                fp32_onnx(float_run_model(fp_run), fp32, size)
                with torch.no_grad():
                    x, y = evaluation.tensors
                    run_top1 = round(100.0 * float((model(x).argmax(1) == y).float().mean()), 2)
                rows += rows_for("digits-resnet10t", fp32, model, size, calibration, folder, args, evaluation,
                                 round(top1(fp32, evaluation), 2), run_top1)
                continue
            torch.manual_seed(0)
            model = look_trained(timm.create_model(name, num_classes=1000)).eval()
            fp32 = folder / f"{name}_fp32.onnx"
            fp32_onnx(model, fp32, (3, 224, 224))
            quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(1.0,))))
            model.eval()
            calibration = [torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
            rows += rows_for(name, fp32, model, (3, 224, 224), calibration, folder, args)
    setup = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
             "threads": args.threads, "reps": args.reps, "keep_fp_bits": args.keep_fp_bits,
             "cpu": _cpu_name(), "opset": 25}
    text = table(rows)
    if args.save:
        out = ROOT / "benchmarks" / "results"
        (out / "deploy.json").write_text(json.dumps({"rows": rows, "setup": setup}, indent=1) + "\n")
        (out / "deploy.md").write_text(_report(text, setup) + "\n")
    print(json.dumps({"rows": rows, "setup": setup}) if args.json else text)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _report(text: str, setup: dict) -> str:
    return (f"# Deploy: onnxruntime latency and file size against the FP32 ONNX\n\n"
            f"    python benchmarks/deploy.py --save    # this file and deploy.json\n\n"
            f"onnxruntime {setup['onnxruntime']}, onnx {setup['onnx']}, {setup['threads']} intra-op threads, "
            f"{setup['cpu']}; medians of {setup['reps']} interleaved rounds in one process (a shared machine: "
            f"compare ratios, not milliseconds). TWN weights as INT2 codes (opset 25), stem and classifier at "
            f"{setup['keep_fp_bits']} bits; resnets at 224x224 with random weights; digits: resnet10t trained "
            f"with recipes/digits_twn.yaml (FP32 row: recipes/digits_fp.yaml), top-1 on its 450 test images "
            f"(fp32 ONNX / the run in torch / sqdist's ONNX in onnxruntime).\n\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
