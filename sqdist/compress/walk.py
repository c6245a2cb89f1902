"""The walk over a network: compress every layer in turn, then fine-tune the whole.

For each layer (in the order the forward runs them, the stem conv excepted):

1. its inputs are collected from the *partially compressed* network (the layers before
   it already hold their codebooks) on calibration images, as Gram matrices;
2. rank 0 fits the codebook and assignments (:func:`sqdist.compress.pq.fit_codebook`)
   and broadcasts them, so every rank holds the same compressed layer;
3. the layer's codebook is fine-tuned alone, the uncompressed model as teacher (KL
   divergence of the softmax outputs), BatchNorm in eval mode.

Then :func:`finetune` trains all codebooks and the uncompressed parameters (stem, norms,
biases) against the teacher, BatchNorm statistics updating. Data parallelism: each rank
forwards its share of the calibration images and of every batch; Gram matrices and
gradients are summed over the ranks, so the ranks never disagree.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import calibration_chunks  # noqa: F401 (re-exported)
from ..dist import all_reduce_, average_gradients, broadcast_, broadcast_state_, rank_and_world  # noqa: F401 (re-exported)
from ..data import EpochBatches, loader
from .file import CompressError
from .layers import (candidate_layers, compress_layer_, compressed_layers, execution_order, input_statistics,
                     output_error, round_codebooks_)
from .pq import block_size, codebook_size, fit_codebook, subvectors


@dataclass(frozen=True)
class CompressConfig:
    """How to compress (the paper's values where they fit a small run; the CLI's defaults).

    blocks: ``small`` or ``large`` subvectors (:func:`sqdist.compress.pq.block_size`).
    codebook: centroids per conv / non-classifier layer; codebook_fc: for the classifier.
        Both are capped per layer (:func:`sqdist.compress.pq.codebook_size`).
    calib_images: training images whose layer inputs fit the codebooks.
    em_iters: EM iterations per layer; em_sample: fraction of the calibration images
        resampled for each iteration's Gram matrix (1.0: all, a fixed objective).
    layer_steps, layer_lr: per-layer codebook fine-tuning (SGD, constant LR).
    finetune_steps, lr: global fine-tuning (SGD, cosine LR).
    momentum, weight_decay: both fine-tunings (no decay on 1-d parameters: norms, biases).
    seed: calibration images, EM initialization and resampling, batch order.
    """

    blocks: str = "small"
    codebook: int = 256
    codebook_fc: int = 1024
    calib_images: int = 1024
    em_iters: int = 100
    em_sample: float = 0.5
    layer_steps: int = 100
    layer_lr: float = 0.01
    finetune_steps: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerPlan:
    """One layer to compress: subvector length ``d``, ``k`` centroids, ``n`` subvectors."""

    name: str
    shape: tuple[int, ...]
    d: int
    k: int
    n: int
    classifier: bool

    @property
    def bits_per_weight(self) -> float:
        return math.log2(self.k) / self.d if self.k > 1 else 0.0


def plan_layers(model: nn.Module, config: CompressConfig, names: list[str] | None = None) -> list[LayerPlan]:
    """The layers :func:`compress_model` compresses (``names``, default module order minus the stem)."""
    candidates, stem, classifier = candidate_layers(model)
    names = [n for n in candidates if n != stem] if names is None else names
    modules = dict(model.named_modules())
    plans = []
    for name in names:
        m = modules[name]
        shape = tuple(m.weight_shape) if hasattr(m, "weight_shape") else tuple(m.weight.shape)
        is_fc = name in classifier
        d = block_size(shape, config.blocks, classifier=is_fc)
        n = math.prod(shape) // d
        plans.append(LayerPlan(name, shape, d, codebook_size(n, config.codebook_fc if is_fc else config.codebook),
                               n, is_fc))
    return plans


def batch_stream(dataset, batch_size: int, seed: int, workers: int = 0):
    """(x, y) batches of this rank's share, forever: epoch after epoch of :class:`EpochBatches`."""
    rank, world = rank_and_world()
    sampler = EpochBatches(len(dataset), batch_size, seed, rank, world)
    if len(sampler) < 1:
        raise CompressError(f"data.batch_size={batch_size} is larger than this process's share of the training set "
                         f"({len(dataset) // world} samples)")
    epoch = 0
    while True:
        yield from loader(dataset, sampler.batches(epoch), workers, seed=seed, epoch=epoch)
        epoch += 1


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax outputs, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="batchmean")


def _sgd(params: list[nn.Parameter], lr: float, config: CompressConfig) -> torch.optim.SGD:
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": rest, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def distill_steps(model: nn.Module, teacher: nn.Module, params: list[nn.Parameter], batches, steps: int,
                  lr: float, config: CompressConfig, device, *, cosine: bool = False, on_step=None) -> float | None:
    """``steps`` SGD steps on ``params`` against ``teacher``; gradients averaged over the ranks.

    The caller sets the train/eval modes. Returns the mean loss of the last 10 steps (this rank's; None without steps).
    ``on_step(step, loss, lr)`` is called after every step.
    """
    if steps <= 0 or not params:
        return None
    optimizer = _sgd(params, lr, config)
    losses = []
    for step in range(steps):
        x, _ = next(batches)
        x = x.to(device)
        with torch.no_grad():
            target = teacher(x)
        now = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps)) if cosine else lr
        for group in optimizer.param_groups:
            group["lr"] = now
        loss = distill_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], now)
    return sum(losses[-10:]) / len(losses[-10:])


# ---------------------------------------------------------------- the walk
def compress_model(model: nn.Module, train_set, config: CompressConfig, *, device, batch_size: int,
                   teacher: nn.Module | None = None, workers: int = 0, log=None, progress: bool = False) -> list[dict]:
    """Compress ``model``'s Conv2d/Linear layers in place (all but the stem conv), layer by layer.

    Args:
        model: any timm model (or ``nn.Module``) on ``device``; every rank holds the same weights.
        train_set: dataset of ``(image, label)``; calibration images and fine-tuning batches.
        config: :class:`CompressConfig`.
        batch_size: per-rank batch for fine-tuning, and the calibration chunk.
        teacher: the uncompressed model (default: a copy of ``model`` before compression).
        log: ``log(metrics: dict)`` receives one record per layer (rank 0).
        progress: a progress bar per layer (rank 0): EM iterations, then fine-tuning steps.

    Returns:
        One dict per layer: name, shape, d, k, bits_per_weight, em objective (first, last),
        refilled clusters, output error after EM and after fine-tuning, fine-tuning loss.
    """
    from tqdm import tqdm

    rank, world = rank_and_world()
    teacher = copy.deepcopy(model).eval() if teacher is None else teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    chunks = calibration_chunks(train_set, config.calib_images, batch_size, config.seed)
    n_images = sum(len(c) for c in chunks)
    mine = list(range(rank, len(chunks), world))
    slots_of_mine = [j for c in mine for j in range(c * batch_size, c * batch_size + len(chunks[c]))]
    first, _ = next(iter(loader(train_set, chunks[:1], 0, seed=config.seed)))
    candidates, stem, _ = candidate_layers(model)
    order = execution_order(model, [n for n in candidates if n != stem], first.to(device))
    plans = plan_layers(model, config, order)
    modules = dict(model.named_modules())
    stream = batch_stream(train_set, batch_size, config.seed + 1, workers)
    records = []
    for i, plan in enumerate(plans):
        module = modules[plan.name]
        bar = tqdm(total=config.em_iters + config.layer_steps, desc=f"[{i + 1}/{len(plans)}] {plan.name}",
                   dynamic_ncols=True, disable=not (progress and rank == 0))
        calib = (x for x, _ in loader(train_set, [chunks[c] for c in mine], workers, seed=config.seed))
        block_grams, group_grams, seen = input_statistics(model, module, calib, plan.d, device)
        if seen != len(slots_of_mine):
            raise RuntimeError(f"layer {plan.name} saw the inputs of {seen} calibration images, expected "
                               f"{len(slots_of_mine)}")
        # every rank fills the slots of its images: the sum holds every image's Gram, bit for bit
        slots = torch.zeros(n_images, plan.d, plan.d, dtype=torch.float64, device=device)
        slots[slots_of_mine] = block_grams
        all_reduce_(slots)
        all_reduce_(group_grams)

        weight = module.weight.detach().clone()
        w = subvectors(weight, plan.d)
        codebook = torch.zeros(plan.k, plan.d, dtype=torch.float64, device=device)
        indices = torch.zeros(plan.n, dtype=torch.long, device=device)
        fit = None
        if rank == 0:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
            fit = fit_codebook(w.double(), slots, plan.k, config.em_iters, generator=generator,
                               sample=config.em_sample, on_iteration=lambda *_: bar.update(1))
            codebook.copy_(fit.codebook)
            indices.copy_(fit.assignments)
        bar.set_postfix(K=plan.k, d=plan.d)
        broadcast_(codebook)
        broadcast_(indices)
        compress_layer_(module, codebook.half().float(), indices)  # the values the file will hold
        error_em = output_error(weight, module.weight, group_grams)

        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        module.codebook.requires_grad_(True)
        loss = distill_steps(model, teacher, [module.codebook], stream, config.layer_steps, config.layer_lr,
                             config, device, on_step=lambda *_: bar.update(1))
        round_codebooks_(model)
        error_ft = output_error(weight, module.weight, group_grams)
        bar.set_postfix(K=plan.k, d=plan.d, error=f"{error_em:.3g}->{error_ft:.3g}")
        bar.close()
        record = {"layer": plan.name, "layer_index": i, "shape": list(plan.shape), "block": plan.d,
                  "codebook": plan.k, "bits_per_weight": round(plan.bits_per_weight, 4),
                  "recon_error/em": error_em, "recon_error/finetuned": error_ft, "layer_finetune/loss": loss}
        if fit is not None:
            record.update({"em/objective_first": fit.objective[0], "em/objective_last": fit.objective[-1],
                           "em/refilled": fit.refilled})
        records.append(record)
        if log is not None and rank == 0:
            log(record)
    for p in model.parameters():
        p.requires_grad_(True)
    return records


def finetune(model: nn.Module, teacher: nn.Module, train_set, config: CompressConfig, *, device, batch_size: int,
             workers: int = 0, log=None, progress: bool = False) -> float | None:
    """Global fine-tuning: all codebooks and uncompressed parameters, BN statistics updating.

    ``config.finetune_steps`` SGD steps (cosine from ``config.lr``) of KL distillation from
    ``teacher``; gradients averaged over the ranks, then every rank takes rank 0's
    parameters and buffers (BN statistics are per rank while training). Codebooks are
    rounded to float16 values at the end. Returns the mean loss of the last 10 steps (None
    without steps).
    """
    from tqdm import tqdm

    rank, _ = rank_and_world()
    if not compressed_layers(model):
        raise ValueError("finetune: the model has no compressed layers")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    bar = tqdm(total=config.finetune_steps, desc="finetune", dynamic_ncols=True,
               disable=not (progress and rank == 0))

    def on_step(step, loss, lr):
        bar.update(1)
        if log is not None and rank == 0 and (step % 10 == 0 or step == config.finetune_steps - 1):
            log({"finetune/step": step + 1, "finetune/loss": loss, "finetune/lr": lr})

    model.train()
    loss = distill_steps(model, teacher, params, batch_stream(train_set, batch_size, config.seed + 2, workers),
                         config.finetune_steps, config.lr, config, device, cosine=True, on_step=on_step)
    bar.close()
    model.eval()
    broadcast_state_(model)
    round_codebooks_(model)
    return loss
