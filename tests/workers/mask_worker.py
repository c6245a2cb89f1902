"""Run sqdist.train on every rank and record, per step, whether this rank's SQ
masks, and the hybrid weights its forward uses, equal rank 0's. Usage (under accelerate launch / torchrun):

    python tests/workers/mask_worker.py RECIPE OUT.json [key=value ...]
"""
import json
import sys

import torch
import torch.distributed as dist

from sqdist.config import load_recipe
from sqdist.train import train


def main():
    recipe = load_recipe(sys.argv[1], sys.argv[3:])
    records = []

    def on_step(step, model, sq):
        world, rank = dist.get_world_size(), dist.get_rank()
        masks = torch.cat([layer.sq_mask.reshape(-1).to(torch.uint8) for layer in sq.layers.values()])
        # the weight each SQ layer's forward uses this step: where(mask, Q, W)
        with torch.no_grad():
            hybrid = torch.cat([layer.sq_weight().reshape(-1) for layer in sq.layers.values()])
        all_masks = [torch.empty_like(masks) for _ in range(world)]
        all_hybrid = [torch.empty_like(hybrid) for _ in range(world)]
        dist.all_gather(all_masks, masks)
        dist.all_gather(all_hybrid, hybrid)
        records.append({
            "step": step, "rank": rank,
            "masks_equal_rank0": torch.equal(masks, all_masks[0]),
            "hybrid_equal_rank0": torch.equal(hybrid, all_hybrid[0]),
            "rows_per_layer": {n: [int(l.sq_mask.sum()), l.sq_mask.numel()] for n, l in sq.layers.items()},
        })

    train(recipe, on_step=on_step)
    with open(f"{sys.argv[2]}.rank{dist.get_rank()}", "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
