"""Size of product-quantized ResNets against fp32 (And the Bit Goes Down), small and large blocks.

    python benchmarks/compress_size.py            # a table
    python benchmarks/compress_size.py --json     # one JSON object: {model: {blocks: {...}}}

Each model is built by timm with random weights (the size does not depend on the values):
every Conv2d/Linear but the stem gets the codebook size and subvector length
``python -m sqdist.compress`` would give it (K = 256 for convs, 1024 for the classifier,
capped per layer), random centroids and assignments, and is written with
``sqdist.compress.save_compressed``. Sizes:

- paper: the paper's accounting (``sqdist.compress.size_report``): parameters only, indices at
  ``log2(K) / d`` bits per weight, codebooks float16, the rest fp32;
- measured: the bytes of the written file against the bytes of the fp32 model's safetensors
  (``state_dict``, running statistics included), both on disk.

The paper (kill-the-bits README, MB there meaning MiB): ResNet-18 small 29x (1.54 MB), large
43x (1.03 MB); ResNet-50 small 19x (5.09 MB), large 31x (3.19 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet50", "resnet18")
MIB = 1024 * 1024


def measure(name: str, blocks: str, folder: str, seed: int = 0) -> dict:
    import timm

    from sqdist.train.checkpoint import save_state_dict
    from sqdist.compress import CompressConfig, compress_layer_, plan_layers, save_compressed, size_report

    model = timm.create_model(name, pretrained=False)
    fp32_path = os.path.join(folder, f"{name}_fp32.safetensors")
    if not os.path.exists(fp32_path):
        save_state_dict(model.state_dict(), fp32_path)
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    plans = plan_layers(model, CompressConfig(blocks=blocks))
    for plan in plans:
        compress_layer_(modules[plan.name], torch.randn(plan.k, plan.d, generator=g) * 0.05,
                        torch.randint(plan.k, (plan.n,), generator=g))
    out = os.path.join(folder, f"{name}_{blocks}.safetensors")
    info = save_compressed(model, out, model_name=name, compress={"blocks": blocks, "random": True})
    acc = size_report(model)
    fp32_bytes = os.path.getsize(fp32_path)
    return {"layers": len(plans),
            "paper": {**{f"{k}_MiB": round(acc[f"{k}_bytes"] / MIB, 3)
                         for k in ("fp32", "compressed", "index", "codebook", "other")},
                      "ratio": round(acc["ratio"], 2)},
            "measured": {"fp32_bytes": fp32_bytes, "file_bytes": info["bytes"], "fp32_MB": round(fp32_bytes / 1e6, 3),
                         "file_MB": round(info["bytes"] / 1e6, 3), "ratio": round(fp32_bytes / info["bytes"], 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results[name] = {blocks: measure(name, blocks, folder) for blocks in ("small", "large")}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| model | blocks | layers | fp32 MiB (paper) | compressed MiB (paper) | ratio (paper) "
          "| fp32 file MB | written file MB | ratio (measured) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_blocks in results.items():
        for blocks, r in by_blocks.items():
            p, m = r["paper"], r["measured"]
            print(f"| {name} | {blocks} | {r['layers']} | {p['fp32_MiB']:.2f} | {p['compressed_MiB']:.2f} | "
                  f"{p['ratio']:.2f}x | {m['fp32_MB']:.2f} | {m['file_MB']:.2f} | {m['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
