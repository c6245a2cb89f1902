"""The command line: ``python -m sqdist.export``.

Command line::

    python -m sqdist.export RUN_DIR OUT.safetensors            # uses RUN_DIR/final
    python -m sqdist.export RUN_DIR/checkpoints/step-000123 OUT.safetensors
    python -m sqdist.export ... --force                        # also when SQ ratio < 1
    python -m sqdist.export ... --keep-fp-bits 8               # full-precision layers at 8 bits
    python -m sqdist.export RUN_DIR OUT.onnx                   # ONNX (sqdist.export.onnx_writer), checked by onnxruntime
    python -m sqdist.export --check OUT.safetensors            # read back and verify (also OUT.onnx)
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("out", nargs="?", help="output file: .safetensors or .onnx")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the suffix of out)")
    parser.add_argument("--force", action="store_true", help="export even when the SQ ratio is below 1.0")
    parser.add_argument("--keep-fp-bits", default="32", metavar="{8,32}",
                        help="store the full-precision layers (stem, classifier, excluded layers) as 8-bit "
                             "per-row codes, or as they are (32, the default)")
    parser.add_argument("--input-size", metavar="C,H,W",
                        help="onnx: the input the graph is traced with (default: the run's data.image_size and "
                             "in_chans); the batch size stays dynamic")
    parser.add_argument("--check", action="store_true", help="read an export back, verify it, print a summary")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if args.out is not None:
                parser.error("--check takes one file")
            if (args.format or ("onnx" if args.source.endswith(".onnx") else "safetensors")) == "onnx":
                from .onnx_writer import check_onnx

                info = check_onnx(args.source)
                print(f"{args.source}: ok, onnxruntime runs it; opset {info['opset']}, input {_shape(info['input'])}, "
                      f"{info['int8_weights']} int8 weights (DequantizeLinear), {info['qdq_inputs']} quantized "
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
        keep_fp_bits = check_keep_fp_bits(args.keep_fp_bits, "--keep-fp-bits")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):  # before loading and tracing the model
            raise ExportError(f"out={args.out!r}: folder {folder} does not exist; create it or write elsewhere")
        if _format_of(args.out, args.format) == "onnx":
            from .onnx_writer import export_run_onnx, parse_input_size

            input_size = parse_input_size(args.input_size) if args.input_size is not None else None
            info = export_run_onnx(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits,
                                   input_size=input_size)
            checked = (f"onnxruntime max |logit difference| {info['max_abs_diff']:.2e}"
                       if info["max_abs_diff"] is not None else "not checked: onnxruntime is not installed")
            print(f"wrote {info['path']}: {info['int8_weights']} int8 weights (DequantizeLinear, axis 0), opset "
                  f"{info['opset']}, input {_shape(info['input'])}, {info['bytes'] / 1e6:.2f} MB; {checked}")
            return 0
        if args.input_size is not None:
            raise ExportError(f"--input-size={args.input_size!r}: only ONNX export traces an input; "
                              f"allowed with an .onnx output or --format onnx")
        info = export_run(args.source, args.out, force=args.force, keep_fp_bits=keep_fp_bits)
    except ExportError as exc:
        print(f"sqdist.export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    fp = f", {info['fp_layers']} full-precision layers at 8 bits" if info["fp_layers"] else ""
    fp += f", {info['inputs']} quantized inputs" if info["inputs"] else ""
    print(f"wrote {info['path']}: {info['layers']} {info['quantizer']} layers packed at "
          f"{'/'.join(map(str, info['bits']))} bit(s){fp}, {info['bytes'] / 1e6:.2f} MB")
    return 0


FORMATS = ("safetensors", "onnx")


def _shape(dims) -> str:
    return f"({', '.join(map(str, dims))})"


def _format_of(path: str, format: str | None) -> str:
    """The export format: ``format`` when given, else from the suffix of ``path``."""
    if format is not None:
        return format
    for name in FORMATS:
        if path.endswith(f".{name}"):
            return name
    raise ExportError(f"out={path!r}; allowed: a path ending in .safetensors or .onnx, or pass --format "
                      f"{{{','.join(FORMATS)}}}")


if __name__ == "__main__":
    sys.exit(main())
