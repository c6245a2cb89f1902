"""FSDP2 against DDP, many configurations in ONE launch of 2 processes (torchrun, gloo).

    torchrun --nproc_per_node 2 tests/workers/fsdp2_worker.py WORKDIR

For every configuration: a DDP run and an FSDP2 run of the same recipe and seed (4 steps, SQ at ratio
0.5; ``twn_distill`` distils from a full-precision teacher trained first), recording each step's loss
and masks (all layers) and, on every rank, whether its masks equal rank 0's. Both run with
``SQDIST_DEBUG=1``: rank 0's masks are also broadcast and compared at every draw (DDP: all layers at
once; FSDP2: inside each forward). A few configurations are also resumed from their step-2 checkpoint
into a new folder. Rank 0 writes WORKDIR/results.json; the test asserts on it.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from sqdist.config import load_recipe
from sqdist.train import train

TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1}}
data: {image_size: 8, batch_size: 32}
quant: {name: twn}
sq: {ratios: [0.5], stage_length: 1}
optim: {lr: 0.05}
train: {epochs: 2, max_steps: 4, progress: false, log_every: 1, checkpoint_every: 2}
"""
CONFIGS = {  # name: (overrides, resume too)
    "bwn": (["quant.name=bwn"], False),
    "twn": (["quant.name=twn"], True),
    "kbit4": (["quant.name=kbit", "quant.params.bits=4"], False),
    "twn_lsq4": (["quant.activations={name: lsq, bits: 4}"], True),
    "twn_pact4": (["quant.activations={name: pact, bits: 4}"], False),
    "slb2": (["quant.name=slb", "quant.params.bits=2", "sq.ratios=[1.0]"], False),
    "esb3": (["quant.name=esb", "quant.params.bits=3"], False),
    "srq_learned": (["quant.name=srq", "quant.params={bits: 4, learn_bits: true, target_bits: 3, bit_reg: 0.1}",
                     "quant.activations={name: srq, bits: 4}"], True),
    "twn_7classes_layer_units": (["data.name=folder", "model.kwargs.num_classes=7", "model.kwargs.in_chans=3",
                                  "engine.fsdp_unit=layer"], False),
    "twn_root_unit_grad_accum_clip": (["engine.fsdp_unit=root", "engine.grad_accum=2", "engine.gradient_clipping=0.5"], False),
    # bf16: DDP autocasts, FSDP2 casts the weights (MixedPrecisionPolicy): close, not equal
    "twn_bf16": (["engine.mixed_precision=bf16"], False),
    # the teacher ({teacher}: an FP run of the same recipe trained first in this launch) runs whole on
    # every rank beside the sharded student
    "twn_distill": (["train.distill.teacher={teacher}", "train.distill.weight=0.7"], True),
}
BF16 = "twn_bf16"


def make_folder(root, classes=7, n=24, size=8):
    """An ImageNet-layout folder of 7 classes (the classifier's rows do not split evenly over 2 ranks)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 2)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(count):
                img = (rng.random((size, size, 3)) * 40).astype("uint8")
                img[..., c % 3] = 40 + 30 * c
                Image.fromarray(img).save(os.path.join(root, split, f"c{c}", f"{i}.png"))


def run(workdir, name, overrides):
    """One training run; per step: loss (rank 0's log), masks (uint8), whether they equal rank 0's."""
    recipe = load_recipe(os.path.join(workdir, "tiny.yaml"), [f"run.dir={os.path.join(workdir, name)}", *overrides])
    steps = []

    def on_step(step, model, sq):
        record = {"step": step}
        if sq is not None and 0.0 < sq.ratio < 1.0:
            masks = torch.cat([layer.sq_mask.reshape(-1).to(torch.uint8) for layer in sq.layers.values()])
            gathered = [torch.empty_like(masks) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, masks)
            record["masks_equal_rank0"] = torch.equal(masks, gathered[0])
            record["masks"] = masks.tolist() if dist.get_rank() == 0 else None
        steps.append(record)

    AcceleratorState._reset_state()  # each run its own precision; the process group (PartialState) stays
    t0 = time.time()
    summary = train(recipe, on_step=on_step)
    folder = os.path.join(workdir, name)
    losses = [json.loads(l)["train/loss"] for l in open(os.path.join(folder, "metrics.jsonl")) if "train/loss" in l] \
        if dist.get_rank() == 0 else []
    return {"steps": steps, "losses": losses, "seconds": time.time() - t0, "summary": summary, "folder": folder}


def compare(a_folder, b_folder):
    """Largest absolute difference per key of two final models (rank 0)."""
    a = load_file(os.path.join(a_folder, "final", "model.safetensors"))
    b = load_file(os.path.join(b_folder, "final", "model.safetensors"))
    if a.keys() != b.keys():
        return {"keys_differ": sorted(set(a) ^ set(b))}
    return {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}


def debug_check_catches_different_seeds():
    """SQDIST_DEBUG's check, on masks two ranks drew from different seeds: every rank raises."""
    from sqdist.dist import check_masks_agree
    from sqdist.sq import SQConfig, SQSelector

    error = torch.rand(64, generator=torch.Generator().manual_seed(0))
    same = SQSelector(SQConfig(ratios=(0.5,), seed=5)).draw(error, 3)
    check_masks_agree([same], ["layer"])  # same seed, step and layer on both ranks: passes
    mine = SQSelector(SQConfig(ratios=(0.5,), seed=5 + dist.get_rank())).draw(error, 3)
    try:
        check_masks_agree([mine], ["layer3"])
    except RuntimeError as exc:
        return "layer3" in str(exc)
    return False


def main():
    workdir = sys.argv[1]
    only = sys.argv[2:] or list(CONFIGS)
    dist.init_process_group("gloo")  # the group every run's Accelerator then uses
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, "tiny.yaml"), "w") as f:
            f.write(TINY)
        make_folder(os.path.join(workdir, "folder7"))
    dist.barrier()
    results = {}
    if any("{teacher}" in o for name in only for o in CONFIGS[name][0]):
        results["_teacher"] = run(workdir, "teacher", ["quant.enabled=false"])["folder"]
    for name in only:
        overrides, resume = CONFIGS[name]
        if "data.name=folder" in overrides:
            overrides = [*overrides, f"data.root={os.path.join(workdir, 'folder7')}"]
        overrides = [o.replace("{teacher}", results.get("_teacher", "")) for o in overrides]
        os.environ["SQDIST_DEBUG"] = "1"  # every draw also checked against rank 0's (a broadcast per draw)
        ddp = run(workdir, f"{name}-ddp", overrides)
        fsdp = run(workdir, f"{name}-fsdp2", [*overrides, "engine.name=fsdp2"])
        record = {"ddp": ddp, "fsdp2": fsdp}
        if resume:
            step2 = os.path.join(fsdp["folder"], "checkpoints", "step-0000002")
            record["resumed"] = run(workdir, f"{name}-fsdp2-resumed", [*overrides, "engine.name=fsdp2",
                                                                       f"train.resume={step2}"])
        os.environ.pop("SQDIST_DEBUG", None)
        dist.barrier()
        if dist.get_rank() == 0:
            record["fsdp2_vs_ddp"] = compare(ddp["folder"], fsdp["folder"])
            if resume:
                record["resumed_vs_fsdp2"] = compare(fsdp["folder"], record["resumed"]["folder"])
        results[name] = record
    results["_debug_check_caught"] = debug_check_catches_different_seeds()
    all_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(all_ranks, {n: [r["fsdp2"]["steps"] for r in [results[n]]][0] for n in only})
    if dist.get_rank() == 0:
        results["_rank1_fsdp2_steps"] = all_ranks[1]
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
