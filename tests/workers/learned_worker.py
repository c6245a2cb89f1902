"""Run sqdist.train on every rank and record, per step, this rank's quantizer parameters
(weight step sizes, activation step sizes / clipping values) and whether they, and the SQ
masks, equal rank 0's. Usage (under accelerate launch):

    python tests/workers/learned_worker.py RECIPE OUT.json [key=value ...]

Writes OUT.json.rank{r}: [{"step", "params": {name: value}, "params_equal_rank0", "masks_equal_rank0"}, ...].
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
        world = dist.get_world_size()
        params = {k: float(v.detach().float()) for k, v in model.named_parameters() if "quantizer." in k}
        flat = torch.tensor(list(params.values()), dtype=torch.float64)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        record = {"step": step, "params": params, "params_equal_rank0": torch.equal(flat, gathered[0])}
        if 0.0 < sq.ratio < 1.0:
            masks = torch.cat([layer.sq_mask.reshape(-1).to(torch.uint8) for layer in sq.layers.values()])
            all_masks = [torch.empty_like(masks) for _ in range(world)]
            dist.all_gather(all_masks, masks)
            record["masks_equal_rank0"] = torch.equal(masks, all_masks[0])
        records.append(record)

    train(recipe, on_step=on_step)
    with open(f"{sys.argv[2]}.rank{dist.get_rank()}", "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
