"""Mean per-row quantization error of each quantizer on a freshly initialized timm ResNet-18.

    python examples/quantizer_errors.py [--model resnet18] [--seed 0]

For every quantizer, ``quantize_model``'s default layer selection (stem conv and
classifier stay full precision) picks the layers; the error of a layer is the
mean over its rows of ``e_i = ||W_i - Q_i||_1 / ||W_i||_1``, and the table shows
the mean, min and max over layers. Prints a markdown table.
"""
from __future__ import annotations

import argparse

import timm
import torch

from sqdist import QuantConfig, quantize_model

QUANTIZERS = [  # (name, params)
    ("bwn", {}),
    ("twn", {}),
    ("twn", {"threshold": "layer"}),
    ("kbit", {"bits": 2, "scale": "max"}),
    ("kbit", {"bits": 2, "scale": "mse"}),
    ("kbit", {"bits": 4, "scale": "max"}),
    ("kbit", {"bits": 4, "scale": "mse"}),
    ("kbit", {"bits": 8, "scale": "max"}),
    ("kbit", {"bits": 8, "scale": "mse"}),
    ("kbit", {"bits": 2, "scale": "lsq"}),
    ("kbit_pow2", {"bits": 4}),
]


def layer_errors(model_name: str, seed: int, quantizer: str, params: dict) -> dict[str, float]:
    """Per quantized layer: mean over rows of the normalized L1 error."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False)
    sq = quantize_model(model, QuantConfig(quantizer, params))
    return {name: float(e.mean()) for name, e in sq.errors().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="timm model name (random init)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"Mean per-row error ||W_i - Q_i||_1 / ||W_i||_1 on `{args.model}` (random init, seed {args.seed})\n")
    print("| quantizer | params | layers | mean over layers | min layer | max layer |")
    print("|---|---|---:|---:|---:|---:|")
    for name, params in QUANTIZERS:
        errors = layer_errors(args.model, args.seed, name, params)
        values = list(errors.values())
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
        print(f"| {name} | {shown} | {len(values)} | {sum(values) / len(values):.4f} "
              f"| {min(values):.4f} | {max(values):.4f} |")


if __name__ == "__main__":
    main()
