"""Run sqdist.train under DeepSpeed (or DDP) on every rank and record, per step,
whether this rank's SQ masks (and, where the weights are replicated, the
weights) equal rank 0's, plus the weight shape each SQ layer saw inside its
forward. Usage (under accelerate launch):

    python tests/workers/deepspeed_worker.py RECIPE OUT.json [key=value ...]

Writes OUT.json.rank{r}: {"steps": [...], "inside_forward": {...}, "outside_forward": {...}}.
"""
import json
import sys

import torch
import torch.distributed as dist

from sqdist import nn as sqnn
from sqdist.config import load_recipe
from sqdist.train import train

_real_sq_weight = sqnn.SQLayer.sq_weight
inside = {"calls": 0, "full_shape": True, "shapes": {}}


def sq_weight_recording_shape(self):
    """The real SQLayer.sq_weight, after noting the weight shape it is handed."""
    w = self.weight
    full = tuple(getattr(w, "ds_shape", w.shape))  # ZeRO-3 keeps the full shape in ds_shape
    inside["calls"] += 1
    inside["full_shape"] &= tuple(w.shape) == full and w.numel() > 0
    inside["shapes"].setdefault(type(self).__name__ + str(full), list(w.shape))
    return _real_sq_weight(self)


def main():
    sqnn.SQLayer.sq_weight = sq_weight_recording_shape
    recipe = load_recipe(sys.argv[1], sys.argv[3:])
    replicated = recipe["engine"]["name"] == "ddp" or recipe["engine"]["zero_stage"] < 3
    records, outside = [], {}

    def on_step(step, model, sq):
        world, rank = dist.get_world_size(), dist.get_rank()
        record = {"step": step, "rank": rank, "ratio": sq.ratio if sq else 0.0}
        if sq is not None and 0.0 < sq.ratio < 1.0:  # a partial selection: there are masks to compare
            masks = torch.cat([layer.sq_mask.reshape(-1).to(torch.uint8) for layer in sq.layers.values()])
            all_masks = [torch.empty_like(masks) for _ in range(world)]
            dist.all_gather(all_masks, masks)
            record["masks_equal_rank0"] = torch.equal(masks, all_masks[0])
            record["rows_per_layer"] = {n: [int(l.sq_mask.sum()), l.sq_mask.numel()] for n, l in sq.layers.items()}
        if replicated:
            weights = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
            all_weights = [torch.empty_like(weights) for _ in range(world)]
            dist.all_gather(all_weights, weights)
            record["weights_equal_rank0"] = torch.equal(weights, all_weights[0])
        records.append(record)
        if not outside and sq is not None:  # between forwards: what each SQ layer's weight holds on this rank
            for name, layer in sq.layers.items():
                w = layer.weight
                outside[name] = {"numel": w.data.numel(), "full_numel": int(getattr(w, "ds_numel", w.numel())),
                                 "shard_numel": int(w.ds_tensor.numel()) if hasattr(w, "ds_tensor") else None}

    train(recipe, on_step=on_step)
    with open(f"{sys.argv[2]}.rank{dist.get_rank()}", "w") as f:
        json.dump({"steps": records, "inside_forward": inside, "outside_forward": outside}, f)


if __name__ == "__main__":
    main()
