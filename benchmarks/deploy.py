"""Deploy that pays off: latency and file size of sqdist's export against the FP32 model, in onnxruntime and OpenVINO.

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

OpenVINO (``runtime: openvino``; skipped with ``--runtimes onnxruntime`` or when it is not installed):
the FP32 ONNX converted to IR (a default CPU compile: on a CPU with bf16 that runs the float
convolutions in bf16, the fastest FP32 model a user gets; ``runtime_precision`` says), sqdist's
8-bit-activation export as IR (:func:`sqdist.export.openvino.onnx_to_openvino` of the same opset-21
ONNX that the onnxruntime int8 row times; ternary codes stored in 2 bits in the IR), and for the resnets NNCF's ``nncf.quantize`` of
the FP32 IR on the same calibration batches (saved as a user saves it: ``ov.save_model``). All of them are
timed in the same rounds as the onnxruntime files; each row's ``fp32_ms``/``speedup``/``size_ratio`` are
against the same runtime's FP32 model. ``conv_precisions`` counts the convolutions of the compiled model by
``runtimePrecision`` (u8/i8: integer kernels; f32/bf16: float).
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
    # no spinning: the files are timed interleaved in one process, and a session's pool spins on the cores after its
    # run returns, taking them from whichever file runs next (on 2 cores: onnxruntime FP32 resnet18 34 ms at batch 1
    # with two spinning sessions, 17 ms without; OpenVINO's 9 -> 26 ms). A lone session times the same either way
    # (within 3%), so this is what a user running one model gets.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_compiled(path: Path, threads: int):
    """A default CPU compile of an IR (latency hint, ``threads`` inference threads)."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})


def runner(runtime: str, path: Path, threads: int):
    """A function running the file on one input: an onnxruntime session or an OpenVINO infer request."""
    if runtime == "onnxruntime":
        s = session(path, threads)
        return lambda x: s.run(None, {"input": x})
    request = openvino_compiled(path, threads).create_infer_request()
    return lambda x: request.infer({0: x})


def conv_precisions(path: Path, threads: int) -> dict:
    """``{runtimePrecision: count}`` of the convolutions (and fully connected layers) OpenVINO compiled."""
    from sqdist.export.openvino import runtime_precisions

    counts: dict[str, int] = {}
    for kind, precisions in runtime_precisions(openvino_compiled(path, threads)).items():
        if kind in ("Convolution", "FullyConnected"):
            for p, n in precisions.items():
                counts[p] = counts.get(p, 0) + n
    return counts


def latencies(files: list[tuple[str, Path]], input_size, batch: int, reps: int, threads: int) -> list[float]:
    """Median milliseconds of each ``(runtime, file)``, measured interleaved (one run of each per round)."""
    runs = [runner(runtime, p, threads) for runtime, p in files]
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    for run in runs:
        run(x)  # warm-up
    times = [[] for _ in runs]
    for _ in range(reps):
        for t, run in zip(times, runs):
            start = time.perf_counter()
            run(x)
            t.append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def fp32_ir(fp32: Path) -> Path:
    """The FP32 ONNX as OpenVINO IR (float32 weights)."""
    import openvino as ov

    import shutil

    from sqdist.export.openvino import fit_pool_windows

    out, copy = fp32.with_suffix(".xml"), fp32.with_name(fp32.stem + "_for_openvino.onnx")
    shutil.copyfile(fp32, copy)
    fit_pool_windows(copy)  # a 2x2 average pool over a 1x1 map (digits at 8x8): OpenVINO refuses it as written
    ov.save_model(ov.convert_model(str(copy)), str(out), compress_to_fp16=False)
    return out


def nncf_int8(fp32_xml: Path, out: Path, calibration: list) -> Path:
    """NNCF's own int8 of the FP32 IR (``nncf.quantize``, default preset, the same calibration batches),
    saved as a user saves it (``ov.save_model``)."""
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = ov.Core().read_model(str(fp32_xml))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress bars
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, nncf.Dataset([x.numpy() for x in calibration]),
                                  subset_size=sum(len(x) for x in calibration))
    ov.save_model(quantized, str(out))
    return out


def ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def top1_ir(path: Path, evaluation) -> float:
    x, y = evaluation.tensors
    logits = openvino_compiled(path, 1)(x.float().numpy())[0]
    return 100.0 * float((torch.from_numpy(logits).argmax(1) == y).float().mean())


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
             fp32_top1=None, run_top1=None):
    """Write every file of one model; returns a function that times them (in the same rounds) and gives its rows."""
    from sqdist.export.openvino import onnx_to_openvino

    files = {}  # (runtime, kind) -> (path, bytes, info)
    for activations in ("float", "int8"):
        out = folder / f"{name}_twn_{activations}.onnx"
        # int8: opset 21 (INT4 codes), the file OpenVINO reads too; float: the default opset 25 (INT2)
        info = export_onnx(model, out, input_size=input_size, keep_fp_bits=args.keep_fp_bits, activations=activations,
                           calibration=calibration if activations == "int8" else None,
                           opset=21 if activations == "int8" else 25)
        files["onnxruntime", activations] = (out, info["bytes"], info)
    if evaluation is None and args.ort_static:  # random-weight resnets: onnxruntime's own int8 beside ours
        out = ort_static(fp32, folder / f"{name}_ort_static.onnx", calibration)
        files["onnxruntime", "own-int8"] = (out, out.stat().st_size, {"int2_weights": 0, "int4_weights": 0,
                                                                     "int8_weights": None, "max_abs_diff": None})
    fp32_xml = None
    if "openvino" in args.runtimes:
        fp32_xml = fp32_ir(fp32)
        onnx_path, _, info = files["onnxruntime", "int8"]
        ir = onnx_to_openvino(onnx_path, folder / f"{name}_twn_int8.xml")
        files["openvino", "int8"] = (Path(ir["path"]), ir["bytes"], {**info, "int2_weights": ir["int2_weights"],
                                                                       "int4_weights": ir["int4_weights"]})
        if evaluation is None:
            out = nncf_int8(fp32_xml, folder / f"{name}_nncf.xml", calibration)
            files["openvino", "own-int8"] = (out, ir_bytes(out), {"int2_weights": 0, "int4_weights": 0,
                                                                  "int8_weights": None, "max_abs_diff": None})
    baselines = {"onnxruntime": (fp32, fp32.stat().st_size)}
    if fp32_xml is not None:
        baselines["openvino"] = (fp32_xml, ir_bytes(fp32_xml))
    order = [(rt, p) for rt, (p, _) in baselines.items()] + [(rt, p) for (rt, _), (p, _, _) in files.items()]
    precisions = {p: conv_precisions(p, args.threads) for rt, p in order if rt == "openvino"}
    # the files are written; the timing (and what follows) runs later, under the benchmark lock
    return lambda: timed_rows(name, input_size, args, evaluation, fp32_top1, run_top1, files, baselines, order,
                              precisions)


def timed_rows(name, input_size, args, evaluation, fp32_top1, run_top1, files, baselines, order, precisions):
    own = {"onnxruntime": "int8 (onnxruntime quantize_static)", "openvino": "int8 (NNCF nncf.quantize)"}
    rows = []
    for batch in args.batches:
        ms = dict(zip(order, latencies(order, input_size, batch, args.reps, args.threads)))
        for runtime, (base, base_bytes) in baselines.items():
            base_ms = ms[runtime, base]
            rows.append({"model": name, "runtime": runtime, "weights": "fp32", "activations": "float", "batch": batch,
                         "fp32_ms": round(base_ms, 3), "ms": round(base_ms, 3), "speedup": 1.0,
                         "fp32_bytes": base_bytes, "bytes": base_bytes, "size_ratio": 1.0, "int2_weights": 0,
                         "int4_weights": 0, "int8_weights": 0, "max_abs_diff": None,
                         "conv_precisions": precisions.get(base), "fp32_top1": fp32_top1, "run_top1": None,
                         "top1": None if evaluation is None else fp32_top1 if runtime == "onnxruntime"
                         else round(top1_ir(base, evaluation), 2)})
            for (rt, kind), (path, size, info) in files.items():
                if rt != runtime:
                    continue
                t = ms[rt, path]
                weights, activations = (own[rt], "int8") if kind == "own-int8" else ("twn", kind)
                accuracy = None
                if evaluation is not None:
                    accuracy = round(top1(path, evaluation) if rt == "onnxruntime" else top1_ir(path, evaluation), 2)
                rows.append({"model": name, "runtime": rt, "weights": weights, "activations": activations,
                             "batch": batch, "fp32_ms": round(base_ms, 3), "ms": round(t, 3),
                             "speedup": round(base_ms / t, 3), "fp32_bytes": base_bytes, "bytes": size,
                             "size_ratio": round(base_bytes / size, 3), "int2_weights": info["int2_weights"],
                             "int4_weights": info["int4_weights"], "int8_weights": info["int8_weights"],
                             "max_abs_diff": info["max_abs_diff"], "conv_precisions": precisions.get(path),
                             "fp32_top1": fp32_top1, "run_top1": run_top1, "top1": accuracy})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | runtime | weights | activations | batch | fp32 ms | ms | speedup | fp32 MB | MB | smaller | "
             "convs run as | top-1 fp32 / run / this |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        acc = "-"
        if r["top1"] is not None:
            acc = " / ".join("-" if v is None else f"{v:.2f}" for v in (r["fp32_top1"], r["run_top1"], r["top1"]))
        convs = ", ".join(f"{n} {p}" for p, n in sorted(r["conv_precisions"].items())) if r["conv_precisions"] else "-"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['weights']} | {r['activations']} | {r['batch']} | "
                     f"{r['fp32_ms']:.1f} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['fp32_bytes'] / 1e6:.2f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['size_ratio']:.2f}x | {convs} | {acc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print {'rows': [...], 'setup': {...}}")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, 5 rounds")
    parser.add_argument("--reps", type=int, default=11, help="interleaved rounds per batch size (median)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each runtime")
    parser.add_argument("--runtimes", default="onnxruntime,openvino",
                        help="comma-separated: onnxruntime (always timed: its FP32 and sqdist's ONNX), openvino")
    parser.add_argument("--lock", default="/tmp/sqdist-bench.lock",
                        help="file locked (flock) while timing, so that one benchmark times at a time ('' : none)")
    parser.add_argument("--image-size", type=int, default=224, help="input H = W of the random-weight timm models")
    parser.add_argument("--keep-fp-bits", type=int, default=8, choices=(8, 32))
    parser.add_argument("--models", default="resnet18,resnet50,digits",
                        help="comma-separated: digits, or timm model names (random weights, 1000 classes)")
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
    unknown = [m for m in models if m != "digits" and not timm.is_model(m)]
    if unknown:
        parser.error(f"--models={args.models!r}: unknown {unknown[0]!r}; allowed: digits or a timm model name "
                     f"(resnet18, resnet50, ...)")
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not set(args.runtimes) <= {"onnxruntime", "openvino"} or "onnxruntime" not in args.runtimes:
        parser.error(f"--runtimes={','.join(args.runtimes)!r}; allowed: onnxruntime or onnxruntime,openvino")
    if "openvino" in args.runtimes:
        try:
            import nncf  # noqa: F401
            import openvino  # noqa: F401
        except ImportError:
            parser.error("--runtimes openvino needs openvino and nncf: pip install 'sqdist[openvino]' "
                         "(or pass --runtimes onnxruntime)")
    if args.quick:
        models, args.reps = ["resnet18"], 5
    args.batches = (1, 8)
    import onnxruntime as ort
    import onnx

    rows, timers = [], []
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
                timers.append(rows_for("digits-resnet10t", fp32, model, size, calibration, folder, args, evaluation,
                                       round(top1(fp32, evaluation), 2), run_top1))
                continue
            torch.manual_seed(0)
            model = look_trained(timm.create_model(name, num_classes=1000)).eval()
            fp32 = folder / f"{name}_fp32.onnx"
            size = (3, args.image_size, args.image_size)
            fp32_onnx(model, fp32, size)
            quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(1.0,))))
            model.eval()
            calibration = [torch.randn(4, *size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
            timers.append(rows_for(name, fp32, model, size, calibration, folder, args))
        with bench_lock(args.lock):  # every export written: only the timing waits for the machine
            print(f"timing starts: {_load()}", file=sys.stderr)
            for timer in timers:
                rows += timer()
            setup_load = _load()
    setup = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
             "threads": args.threads, "reps": args.reps, "keep_fp_bits": args.keep_fp_bits,
             "cpu": _cpu_name(), "opset": {"float": 25, "int8": 21}, "runtimes": args.runtimes,
             "openvino": _version("openvino"), "nncf": _version("nncf"), "image_size": args.image_size}
    text = table(rows)
    setup["goals"] = goals(rows)
    setup["load"] = setup_load
    if args.save:
        out = ROOT / "benchmarks" / "results"
        (out / "deploy.json").write_text(json.dumps({"rows": rows, "setup": setup}, indent=1) + "\n")
        (out / "deploy.md").write_text(_report(text, setup, rows) + "\n")
    print(json.dumps({"rows": rows, "setup": setup}) if args.json else text)
    return 0


@contextlib.contextmanager
def bench_lock(path: str):
    """Hold an exclusive flock on ``path`` (what ``flock PATH command`` takes) while timing."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0] + " (1-minute load average at the end, 2 cores)"
    except OSError:
        return "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def goals(rows: list[dict]) -> list[dict]:
    """Issue 36's goals per random-weight model, from the OpenVINO rows: sqdist int8 >= 3.0x OpenVINO FP32 at
    batch 8 and >= 2.0x at batch 1, at least as fast as NNCF's int8 of the FP32 model, its file >= 2x smaller."""
    out = []
    for (model, batch) in sorted({(r["model"], r["batch"]) for r in rows if r["runtime"] == "openvino"}):
        mine = [r for r in rows if (r["model"], r["batch"], r["runtime"]) == (model, batch, "openvino")]
        ours = next((r for r in mine if r["weights"] == "twn" and r["activations"] == "int8"), None)
        nncf = next((r for r in mine if r["weights"].startswith("int8 (NNCF")), None)
        if ours is None or nncf is None:
            continue
        target = 3.0 if batch >= 8 else 2.0
        out.append({"model": model, "batch": batch, "speedup": ours["speedup"], "speedup_goal": target,
                    "speedup_met": ours["speedup"] >= target, "nncf_speedup": nncf["speedup"], "vs_nncf": round(nncf["ms"] / ours["ms"], 3),
                    "vs_nncf_met": ours["ms"] <= nncf["ms"], "nncf_bytes_ratio": round(nncf["bytes"] / ours["bytes"], 3),
                    "size_met": nncf["bytes"] >= 2 * ours["bytes"]})
    return out


def goals_table(rows: list[dict]) -> str:
    lines = ["| model | batch | sqdist int8 / OpenVINO FP32 | goal | NNCF int8 / OpenVINO FP32 | sqdist int8 / NNCF int8 "
             "(speed) | NNCF bytes / sqdist bytes (goal 2x) |", "|---|---:|---:|---|---:|---:|---:|"]
    yes = {True: "met", False: "NOT met"}
    for g in goals(rows):
        lines.append(f"| {g['model']} | {g['batch']} | {g['speedup']:.2f}x | {g['speedup_goal']:.1f}x: "
                     f"{yes[g['speedup_met']]} | {g['nncf_speedup']:.2f}x | {g['vs_nncf']:.2f}x ({yes[g['vs_nncf_met']]}) | "
                     f"{g['nncf_bytes_ratio']:.2f}x ({yes[g['size_met']]}) |")
    return "\n".join(lines)


def _report(text: str, setup: dict, rows: list[dict]) -> str:
    return (f"# Deploy: latency and file size against the FP32 model, in onnxruntime and OpenVINO\n\n"
            f"    flock /tmp/sqdist-bench.lock python benchmarks/deploy.py --save    # this file and deploy.json\n\n"
            f"onnxruntime {setup['onnxruntime']}, onnx {setup['onnx']}, OpenVINO {setup['openvino']}, NNCF "
            f"{setup['nncf']}, {setup['threads']} threads per runtime, {setup['cpu']}; medians of {setup['reps']} "
            f"interleaved rounds in one process, every file of a model and batch size in the same rounds, "
            f"onnxruntime sessions without spinning threads (see `session` in deploy.py: spinning pools of "
            f"interleaved sessions take the cores from each other; a lone session times the same either way) (a "
            f"shared machine: load {setup.get('load', '?')}; compare ratios, not milliseconds). TWN weights: INT2 codes "
            f"(opset 25) with float activations, INT4 codes (opset 21, the file OpenVINO reads too) with 8-bit "
            f"activations; stem and classifier at {setup['keep_fp_bits']} bits; resnets at "
            f"{setup['image_size']}x{setup['image_size']}, random weights with BatchNorm gains in [0.5, 1.5]; "
            f"digits: resnet10t trained with recipes/digits_twn.yaml (FP32 row: recipes/digits_fp.yaml), top-1 on "
            f"its 450 test images (fp32 / the run in torch / this file in this runtime). Each row's speedup and "
            f"size are against the FP32 model in the SAME runtime (OpenVINO FP32: a default CPU compile, which runs "
            f"the float convolutions in bf16 on this CPU: see 'convs run as'). 'own int8' rows: onnxruntime's "
            f"quantize_static and NNCF's nncf.quantize of the FP32 model on the same calibration batches.\n\n"
            f"## Goals (issue 36), OpenVINO\n\n{goals_table(rows)}\n\n## All rows\n\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
