"""The command line: ``python -m sqdist.export``.

Command line::

    python -m sqdist.export RUN_DIR OUT.safetensors            # uses RUN_DIR/final
    python -m sqdist.export RUN_DIR/checkpoints/step-000123 OUT.safetensors
    python -m sqdist.export ... --force                        # also when SQ ratio < 1
    python -m sqdist.export ... --keep-fp-bits 8               # full-precision layers at 8 bits
    python -m sqdist.export RUN_DIR OUT.onnx                   # ONNX (sqdist.export.onnx_writer), checked by onnxruntime
    python -m sqdist.export RUN_DIR OUT.onnx --activations int8 [--calib-batches 8]   # integer kernels in onnxruntime
    python -m sqdist.export RUN_DIR OUT.onnx --opset 17        # int8 codes everywhere (default 25: INT2/INT4)
    python -m sqdist.export RUN_DIR OUT.xml --activations int8 # OpenVINO IR (sqdist.export.openvino), checked in OpenVINO
    python -m sqdist.export ... --json                         # the summary as one JSON object
    python -m sqdist.export --check OUT.safetensors            # read back and verify (also OUT.onnx)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .format import ExportError, _one_line, check_keep_fp_bits
from .reader import read_packed
from .run import export_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqdist.export",
        description="Write a trained run's quantized layers as packed 1/2/k-bit codes + per-row scales "
                    "(.safetensors), or as an ONNX graph of int8 codes and DequantizeLinear (.onnx).")
    parser.add_argument("source", help="run folder (uses RUN/final), checkpoint folder, or with --check an export file")
    parser.add_argument("out", nargs="?", help="output file: .safetensors, .onnx or .xml (OpenVINO IR)")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the suffix of out)")
    parser.add_argument("--force", action="store_true", help="export even when the SQ ratio is below 1.0")
    parser.add_argument("--keep-fp-bits", metavar="{8,32}",
                        help="store the full-precision layers (stem, classifier, excluded layers) as 8-bit "
                             "per-row codes, or as they are (default: 8 with --activations int8, the fast "
                             "configuration; else 32)")
    parser.add_argument("--input-size", metavar="C,H,W",
                        help="onnx: the input the graph is traced with (default: the run's data.image_size and "
                             "in_chans); the batch size stays dynamic")
    parser.add_argument("--activations", metavar="{float,int8}",
                        help="onnx: float (default: the inputs as trained) or int8: calibrate 8-bit inputs and "
                             "outputs on the run's training data so that onnxruntime runs integer kernels; "
                             "reports onnxruntime's top-1 on the run's evaluation split")
    parser.add_argument("--calib-batches", metavar="N",
                        help="with --activations int8: training batches to calibrate on (default 8)")
    parser.add_argument("--opset", metavar="N",
                        help="onnx: opset 13..25 (default 25: ternary/binary codes as INT2, <= 4-bit as INT4; "
                             "21: INT4 only; 17: int8)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--check", action="store_true", help="read an export back, verify it, print a summary")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if args.out is not None:
                parser.error("--check takes one file")
            kind = args.format or next((f for f, s in SUFFIXES.items() if args.source.endswith(s)), "safetensors")
            if kind == "openvino":
                from .openvino import check_openvino

                info = check_openvino(args.source)
                print(f"{args.source}: ok, OpenVINO runs it; input {_shape(info['input'])}, {info['int2_weights']} "
                      f"2-bit + {info['int4_weights']} 4-bit weights, {info['integer_convolutions']} of "
                      f"{info['integer_convolutions'] + info['float_convolutions']} convolutions on u8/i8")
                return 0
            if kind == "onnx":
                from .onnx_writer import check_onnx

                info = check_onnx(args.source)
                print(f"{args.source}: ok, onnxruntime runs it; opset {info['opset']}, input {_shape(info['input'])}, "
                      f"{info['int2_weights']} int2 + {info['int4_weights']} int4 + {info['int8_weights']} int8 "
                      f"weights (DequantizeLinear), "
                      f"{info['qdq_inputs']} quantized "
                      f"inputs, {os.path.getsize(args.source) / 1e6:.2f} MB")
                return 0
            _, meta = read_packed(args.source)
            q = meta["quantizer"]
            fp = f", {len(meta['fp_layers'])} full-precision layers at 8 bits" if meta["fp_layers"] else ""
            fp += f", {len(meta['inputs'])} quantized inputs" if meta["inputs"] else ""
            print(f"{args.source}: ok, {meta['model']['name']} with {len(meta['layers'])} {q['name']} layers "
                  f"{q['params']}{fp}, {os.path.getsize(args.source) / 1e6:.2f} MB")
            return 0
        if args.out is None:
            parser.error("the following arguments are required: out")
        fast = args.activations == "int8"  # 8-bit activations: 8-bit stem and classifier unless asked otherwise
        keep_fp_bits = check_keep_fp_bits(args.keep_fp_bits or ("8" if fast else "32"), "--keep-fp-bits")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):  # before loading and tracing the model
            raise ExportError(f"out={args.out!r}: folder {folder} does not exist; create it or write elsewhere")
        if _format_of(args.out, args.format) == "openvino":
            return _openvino(args, keep_fp_bits)
        if _format_of(args.out, args.format) == "onnx":
            from .int8 import check_activations
            from .onnx_writer import INT2_OPSET, OPSET, parse_input_size
            from .run import export_run_onnx

            input_size = parse_input_size(args.input_size) if args.input_size is not None else None
            activations = check_activations(args.activations or "float", "--activations")
            if args.calib_batches is not None and activations != "int8":
                raise ExportError(f"--calib-batches={args.calib_batches!r}: calibration is for --activations int8 "
                                  f"only; allowed: omit it, or add --activations int8")
            calib = _int_flag("--calib-batches", args.calib_batches, 8, 1, None, "an integer >= 1")
            opset = _int_flag("--opset", args.opset, OPSET, 13, INT2_OPSET,
                              f"an integer from 13 to {INT2_OPSET} (25: INT2/INT4 weights, 21: INT4, 17: int8)")
            info = export_run_onnx(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits,
                                   input_size=input_size, activations=activations, calib_batches=calib, opset=opset)
            if args.json:
                print(json.dumps(info))
                return 0
            checked = (f"onnxruntime (default session) max |logit difference| {info['max_abs_diff']:.2e}"
                       if info["max_abs_diff"] is not None else "not checked: onnxruntime is not installed")
            if info.get("rounding_worst_share") is not None and info.get("model_rel_error") is not None:
                checked += (f" from the network it runs; against the trained model: codes more than one step off at "
                            f"most {100 * info['rounding_worst_share']:.2f}% at a rounding, logits "
                            f"{info['model_rel_error']:.3g} relative on the check batch")
            top1 = (f"; top-1 onnxruntime {info['top1_onnx']:.2f}% vs the run's {info['top1_model']:.2f}%, "
                    f"the same prediction on {info['agreement']:.2f}% of {info['eval_examples']} examples"
                    if "top1_onnx" in info else "")
            if info.get("wide_weight_codes"):
                checked += (f"; {len(info['wide_weight_codes'])} layers hold 8-bit weight codes above 64: onnxruntime "
                            f"runs them bit for bit on x86 CPUs with VNNI or AMX (this one: "
                            f"{ {True: 'yes', False: 'no', None: 'unknown'}[info['cpu_vnni']]}), without VNNI its "
                            f"int16 pair sums may saturate")
            print(f"wrote {info['path']}: {info['int2_weights']} int2 + {info['int4_weights']} int4 + "
                  f"{info['int8_weights']} int8 weights "
                  f"(DequantizeLinear, axis 0), {info['activations']} activations, opset {info['opset']}, input "
                  f"{_shape(info['input'])}, {info['bytes'] / 1e6:.2f} MB; {checked}{top1}")
            return 0
        for flag, value in (("--input-size", args.input_size), ("--activations", args.activations),
                            ("--calib-batches", args.calib_batches), ("--opset", args.opset)):
            if value is not None:
                raise ExportError(f"{flag}={value!r}: only ONNX export takes it; allowed with an .onnx output or "
                                  f"--format onnx")
        info = export_run(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits)
    except ExportError as exc:
        print(f"sqdist.export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
        return 0
    fp = f", {info['fp_layers']} full-precision layers at 8 bits" if info["fp_layers"] else ""
    fp += f", {info['inputs']} quantized inputs" if info["inputs"] else ""
    print(f"wrote {info['path']}: {info['layers']} {info['quantizer']} layers packed at "
          f"{'/'.join(map(str, info['bits']))} bit(s){fp}, {info['bytes'] / 1e6:.2f} MB")
    return 0


FORMATS = ("safetensors", "onnx", "openvino")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "openvino": ".xml"}


def _openvino(args, keep_fp_bits: int) -> int:
    """``python -m sqdist.export RUN OUT.xml``: write and check an OpenVINO IR, print its summary."""
    from .int8 import check_activations
    from .onnx_writer import parse_input_size
    from .openvino import OPENVINO_OPSET
    from .run import export_run_openvino

    if args.opset is not None:
        raise ExportError(f"--opset={args.opset!r}: OpenVINO export writes opset {OPENVINO_OPSET} (INT4 codes; "
                          f"OpenVINO does not read opset 25's INT2); allowed: omit --opset for an .xml output")
    activations = check_activations(args.activations or "float", "--activations")
    if args.calib_batches is not None and activations != "int8":
        raise ExportError(f"--calib-batches={args.calib_batches!r}: calibration is for --activations int8 "
                          f"only; allowed: omit it, or add --activations int8")
    calib = _int_flag("--calib-batches", args.calib_batches, 8, 1, None, "an integer >= 1")
    input_size = parse_input_size(args.input_size) if args.input_size is not None else None
    info = export_run_openvino(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits,
                               input_size=input_size, activations=activations, calib_batches=calib)
    if args.json:
        print(json.dumps(info))
        return 0
    top1 = (f"; top-1 OpenVINO {info['top1_openvino']:.2f}% vs the run's {info['top1_model']:.2f}%, the same "
            f"prediction on {info['agreement']:.2f}% of {info['eval_examples']} examples"
            if "top1_openvino" in info else "")
    print(f"wrote {info['path']} + {os.path.basename(info['bin'])}: {info['int2_weights']} 2-bit + "
          f"{info['int4_weights']} 4-bit weights, {info['activations']} activations, {info['integer_convolutions']} of "
          f"{info['integer_convolutions'] + info['float_convolutions']} convolutions run on u8/i8 in OpenVINO, input "
          f"{_shape(info['input'])}, {info['bytes'] / 1e6:.2f} MB; OpenVINO max |logit difference| "
          f"{info['max_abs_diff']:.2e} from the network it runs (codes read at every FakeQuantize); against the "
          f"trained model logits {info['model_rel_error']:.3g} relative on the check batch{top1}")
    return 0


def _int_flag(flag: str, text: str | None, default: int, low: int, high: int | None, allowed: str) -> int:
    """The integer value of a command-line flag, ``default`` when absent; out of range: :class:`ExportError`."""
    if text is None:
        return default
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < low or (high is not None and value > high):
        raise ExportError(f"{flag}={text!r}; allowed: {allowed}")
    return value


def _shape(dims) -> str:
    return f"({', '.join(map(str, dims))})"


def _format_of(path: str, format: str | None) -> str:
    """The export format: ``format`` when given, else from the suffix of ``path``."""
    if format is not None:
        return format
    for name in FORMATS:
        if path.endswith(SUFFIXES[name]):
            return name
    raise ExportError(f"out={path!r}; allowed: a path ending in .safetensors, .onnx or .xml, or pass --format "
                      f"{{{','.join(FORMATS)}}}")


if __name__ == "__main__":
    sys.exit(main())
