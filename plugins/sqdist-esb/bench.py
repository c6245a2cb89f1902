"""Step time of the ESB and SLB plugins against full precision (one training step: SQ masks,
forward, backward, optimizer step).

    python plugins/sqdist-esb/bench.py                       # timm resnet18, 32x32, batch 64, 2 threads
    python plugins/sqdist-esb/bench.py --rows "FP,ESB W4,ESB W4 every step,SLB W2,SLB W2 reference"

Each row is a recipe (``recipes/digits_esb.yaml``, ``recipes/digits_slb.yaml``) with the
model swapped for timm ``resnet18`` (``num_classes=10``), built as ``sqdist.train`` builds it
(``build_model``: ``quantize_model`` with the recipe's ``QuantConfig``) and stepped with the
recipe's optimizer. Rows are timed in interleaved rounds (every row once per round, after a
warm-up), and the table gives the median step time and its ratio to FP's, measured in the same
process. The ``every step`` / ``reference`` rows are the pure-PyTorch references kept beside
the fast paths (ESB: the least-squares scale searched at every quantization; SLB: softmax then a
weighted sum, autograd's backward).

ESB searches its scale once every ``search_every`` (16) steps: the median leaves that step out;
the mean includes it in proportion only when a row runs at least 16 timed steps
(``--steps 16``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESNET = ["model.name=resnet18", "model.kwargs={num_classes: 10}", "track.wandb=false"]
ROWS = {
    "FP": ("digits_fp", []),
    "ESB W4": ("digits_esb", []),
    "ESB W4 every step": ("digits_esb", ["quant.params.search_every=1"]),
    "SQ-ESB W4": ("digits_esb", ["sq.ratios=[0.5, 1.0]", "sq.stage_length=1000"]),
    "SLB W2": ("digits_slb", ["quant.params.bits=2"]),
    "SLB W2 reference": ("digits_slb", ["quant.params.bits=2", "quant.params.fused=false"]),
    "SLB W1": ("digits_slb", []),
}
DEFAULT_ROWS = "FP,ESB W4,ESB W4 every step,SLB W2,SLB W2 reference"


def build(recipe_name: str, overrides: list[str]):
    """(model, controller, optimizer, quantizer modules with set_progress) as ``sqdist.train`` builds them."""
    import torch
    from timm.optim import create_optimizer_v2

    from sqdist.config import load_recipe
    from sqdist.train import build_model

    recipe = load_recipe(str(ROOT / "recipes" / f"{recipe_name}.yaml"), RESNET + overrides)
    torch.manual_seed(0)
    model, sq = build_model(recipe)
    o = recipe["optim"]
    kwargs = {"momentum": o["momentum"]} if o["name"] in ("sgd", "momentum", "nesterov") else {}
    opt = create_optimizer_v2(model, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"], **kwargs)
    hooks = [m for m in model.modules() if hasattr(m, "set_progress")]
    return model, sq, opt, hooks


def make_step(model, sq, opt, hooks, x, y, total_steps: int = 10_000):
    import torch.nn.functional as F

    state = {"step": 0}

    def step():
        if sq is not None:
            sq.draw_masks()
        for m in hooks:
            m.set_progress(state["step"], total_steps, 100)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        if sq is not None:
            sq.advance("step")

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma list; allowed: " + ", ".join(ROWS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or "FP" not in rows:
        parser.error(f"--rows: {bad[0] if bad else 'FP missing'!r}; allowed: {', '.join(ROWS)} (FP included)")

    import torch

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    steps = {}
    for label in rows:
        model, sq, opt, hooks = build(*ROWS[label])
        model.train()
        steps[label] = make_step(model, sq, opt, hooks, x, y)
        for _ in range(args.warmup):
            steps[label]()
    times = {label: [] for label in rows}
    for _ in range(args.rounds):
        for label in rows:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                steps[label]()
                times[label].append(time.perf_counter() - t0)
    fp = statistics.median(times["FP"])
    print(f"resnet18, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps (median)\n")
    fp_mean = statistics.mean(times["FP"])
    print("| row | median step (ms) | / FP | mean step (ms) | / FP |\n|---|---:|---:|---:|---:|")
    for label in rows:
        med, mean = statistics.median(times[label]), statistics.mean(times[label])
        print(f"| {label} | {med * 1e3:.1f} | {med / fp:.2f} | {mean * 1e3:.1f} | {mean / fp_mean:.2f} |")


if __name__ == "__main__":
    main()
