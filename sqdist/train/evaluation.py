"""Evaluation of a trained network: BatchNorm re-estimation under the quantized weights, top-1 accuracy."""
from __future__ import annotations

import torch

from .. import dist as sqdist_dist
from ..data import eval_batches, loader
from .compiling import eager


def set_bn_train_only(model: torch.nn.Module) -> None:
    """Train mode for BatchNorm only: SQ layers use their fully quantized weights."""
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()


@torch.no_grad()
def recalibrate_bn(model, dataset, batches, device, n_batches: int, workers: int = 0, seed: int = 0) -> None:
    """Re-estimate BN statistics under the quantized weights (plain average over ``n_batches``).

    Reads only the first ``n_batches`` of ``batches``. Each BN keeps its own momentum.
    Under data parallelism the statistics are then averaged over the ranks (the mean
    over every rank's batches, as one process reading them all would get), so every
    rank evaluates, and rank 0 saves, the same network.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    set_bn_train_only(model)
    try:
        with eager():  # a compiled model (train.compile): its eager forward, no compilation for a few batches
            for x, _ in loader(dataset, batches[:n_batches], workers, seed=seed):
                model(x.to(device))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    if sqdist_dist.is_distributed():
        stats = [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
        flat = torch.cat([t.detach().float().reshape(-1) for t in stats])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        for t, part in zip(stats, flat.split([t.numel() for t in stats])):
            t.copy_(part.view_as(t))


@torch.no_grad()
def evaluate(model, dataset, recipe: dict, device, rank: int, world: int) -> float:
    """Top-1 accuracy (%) over the whole test set, summed across ranks.

    Every rank runs the same number of batches (see :func:`sqdist.data.eval_batches`).
    """
    model.eval()
    batches, real = eval_batches(len(dataset), recipe["data"]["eval_batch_size"], rank, world)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    for x, y in loader(dataset, batches, recipe["data"]["workers"]):
        with eager():  # a compiled model (train.compile): its eager forward
            pred = model(x.to(device)).argmax(dim=1)
        keep = max(0, min(len(y), real - seen))  # the padding repeats a sample: count it once
        seen += len(y)
        counts[0] += (pred[:keep] == y[:keep].to(device)).sum()
        counts[1] += keep
    if sqdist_dist.is_distributed():
        torch.distributed.all_reduce(counts)
    return float(100.0 * counts[0] / counts[1])
