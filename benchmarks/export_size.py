"""Packed export size against the fp32 safetensors, timm resnet50 (initialized weights).

    python benchmarks/export_size.py            # table
    python benchmarks/export_size.py --json     # {"twn": {"fp32_bytes", "packed_bytes", "ratio"}, ...}
    python benchmarks/export_size.py --keep-stem-and-classifier
    python benchmarks/export_size.py --keep-stem-and-classifier --keep-fp-bits 8

Each quantizer quantizes every Conv/Linear layer (stem and classifier too unless
``--keep-stem-and-classifier``) at SQ ratio 1.0, then ``export_model`` writes the
packed file; ``--keep-fp-bits 8`` stores the layers left full precision as 8-bit
per-row codes instead of fp32. BatchNorm parameters and buffers, biases and the
per-row scales stay in their own dtype, so the ratio sits a little below 32 / bits.
Sizes are those of the written files.
"""
import argparse
import json
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from sqdist import QuantConfig, SQConfig, quantize_model
from sqdist.export import export_model, full_precision_layers, int8_rows, load_quantized

QUANTIZERS = {"twn": ("twn", {}), "bwn": ("bwn", {}), "kbit4": ("kbit", {"bits": 4})}


def measure(name: str, params: dict, keep: bool, keep_fp_bits: int, folder: Path, verify: bool) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    fp32 = folder / "resnet50_fp32.safetensors"
    if not fp32.exists():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    quantize_model(model, QuantConfig(quantizer=name, params=params, keep_stem_and_classifier=keep,
                                      sq=SQConfig(ratios=(1.0,))))
    out = folder / f"resnet50_{name}.safetensors"
    export_model(model, out, model_name="resnet50", keep_fp_bits=keep_fp_bits)
    if verify:  # the packed file reproduces the quantized model (full-precision layers at 8 bits if asked)
        x = torch.randn(2, 3, 224, 224)
        model.eval()
        with torch.no_grad():
            if keep_fp_bits == 8:
                for layer in full_precision_layers(model).values():
                    codes, scale = int8_rows(layer.weight)
                    layer.weight.copy_((codes.float() * scale[:, None]).reshape(layer.weight.shape))
            diff = (load_quantized(out)(x) - model(x)).abs().max().item()
        assert diff <= 1e-4, f"{name}: reloaded logits differ by {diff}"
    fp32_bytes, packed_bytes = fp32.stat().st_size, out.stat().st_size
    return {"fp32_bytes": fp32_bytes, "packed_bytes": packed_bytes, "ratio": round(fp32_bytes / packed_bytes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--keep-stem-and-classifier", action="store_true",
                        help="leave conv1 and fc full precision, as the training recipes do")
    parser.add_argument("--keep-fp-bits", type=int, choices=(8, 32), default=32,
                        help="store the full-precision layers as 8-bit per-row codes (8) or as fp32 (32)")
    parser.add_argument("--verify", action="store_true", help="also reload each file and compare logits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {key: measure(name, params, args.keep_stem_and_classifier, args.keep_fp_bits, Path(tmp), args.verify)
                   for key, (name, params) in QUANTIZERS.items()}
    if args.json:
        print(json.dumps(results))
        return
    scope = "all layers but conv1/fc" if args.keep_stem_and_classifier else "all Conv/Linear layers"
    kept = f"; conv1/fc {'8-bit' if args.keep_fp_bits == 8 else 'fp32'}" if args.keep_stem_and_classifier else ""
    print(f"resnet50, {scope} quantized at SQ ratio 1.0{kept}")
    print(f"{'quantizer':<10} {'fp32 MB':>9} {'packed MB':>10} {'smaller':>8}")
    for key, r in results.items():
        print(f"{key:<10} {r['fp32_bytes'] / 1e6:>9.2f} {r['packed_bytes'] / 1e6:>10.2f} {r['ratio']:>7.2f}x")


if __name__ == "__main__":
    main()
