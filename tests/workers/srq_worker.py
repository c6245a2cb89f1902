"""Run sqdist.train on every rank (SRQ with DropBits) and record, per step, whether this rank's
DropBits draws equal rank 0's: each SRQ weight quantizer re-runs its training forward on the
layer's (replicated) weight with this step's generator, and the results are compared across ranks.
Usage (under accelerate launch):

    python tests/workers/srq_worker.py RECIPE OUT.json [key=value ...]

Writes OUT.json.rank{r}: [{"step", "draws_equal_rank0", "params_equal_rank0"}, ...].
"""
import json
import sys

import torch
import torch.distributed as dist

from sqdist.config import load_recipe
from sqdist.train import train
from sqdist_srq import SRQWeight


def gathered_equal(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.equal(t, out[0])


def main():
    recipe = load_recipe(sys.argv[1], sys.argv[3:])
    records = []

    def on_step(step, model, sq):
        params = torch.cat([p.detach().float().reshape(-1) for n, p in model.named_parameters() if "quantizer." in n])
        draws = []
        for layer in sq.layers.values():
            q = layer.quantizer
            if isinstance(q, SRQWeight) and q.drop_prob > 0:
                w = layer.weight.detach()
                q._calls = 0  # this step's first draw again
                with torch.no_grad():
                    draws.append(q.fake_quantize(w.reshape(w.shape[0], -1)).reshape(-1))
        records.append({"step": step, "draws": len(draws), "draws_equal_rank0": gathered_equal(torch.cat(draws)),
                        "params_equal_rank0": gathered_equal(params)})

    train(recipe, on_step=on_step)
    with open(f"{sys.argv[2]}.rank{dist.get_rank()}", "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
