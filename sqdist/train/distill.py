"""Knowledge distillation from a finished run (Hinton, Vinyals and Dean, 2015).

    python -m sqdist.train recipes/fashion_mnist_twn.yaml train.distill.teacher=runs/fashion_mnist_fp

With ``train.distill.teacher`` set, the loss of every step is

    (1 - weight) * cross_entropy(student, labels) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(``T`` = ``train.distill.temperature``; the ``T^2`` keeps the soft term's gradients on the scale of the
hard one's as ``T`` grows). The teacher is a run or checkpoint folder (full precision or quantized, as
``python -m sqdist.export`` reads it), loaded on every rank, in eval mode, without gradients: it draws
nothing from any random generator, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RecipeError


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
                 temperature: float) -> torch.Tensor:
    """Cross-entropy mixed with the KL divergence to the teacher's softened logits (mean over the batch)."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0:
        return hard
    t, dtype = temperature, torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: in fp32
    soft = F.kl_div(F.log_softmax(logits.to(dtype) / t, 1), F.log_softmax(teacher_logits.to(dtype) / t, 1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * t * t * soft


def load_teacher(recipe: dict, student: nn.Module, x: torch.Tensor, device: torch.device) -> nn.Module | None:
    """The teacher ``train.distill.teacher`` names, on ``device``, frozen; None when distillation is off.

    Refuses (:class:`RecipeError`, one line) a folder that is not a finished run or checkpoint, a teacher
    trained on other data or another input size (its ``config.yaml``), one with another number of classes
    than ``student``, and one that cannot run ``x`` (a batch of this recipe's inputs).
    """
    from ..export import load_run
    from ..files import ExportError
    from ..runs import load_weights, read_config, read_meta, resolve_checkpoint

    source = recipe["train"]["distill"]["teacher"]
    if source is None:
        return None
    key = f"train.distill.teacher={source!r}"
    try:
        ckpt = resolve_checkpoint(source)
        meta = read_meta(ckpt)
        teacher = load_run(ckpt)[0] if meta.enabled else load_weights(ckpt, meta)
    except ExportError as exc:
        raise RecipeError(f"{key}: {exc}") from None
    config = read_config(ckpt) or {}
    for section, name in (("data", "name"), ("data", "image_size")):
        theirs, ours = (config.get(section) or {}).get(name), recipe[section][name]
        if theirs is not None and theirs != ours:
            raise RecipeError(f"{key}: the teacher was trained with {section}.{name}={theirs!r}, this recipe has "
                              f"{ours!r}; allowed: a teacher trained on the same data and input size")
    teacher.to(device).requires_grad_(False)
    try:
        with torch.no_grad():
            out = teacher(x.to(device))
    except Exception as exc:  # another in_chans, an input the network cannot take
        message = " ".join(str(exc).split())[:200]
        raise RecipeError(f"{key}: the teacher ({meta.model_name}) cannot run this recipe's inputs "
                          f"{tuple(x.shape[1:])}: {message}") from None
    classes = getattr(student, "num_classes", None)
    if out.ndim != 2 or (classes is not None and out.shape[1] != classes):
        raise RecipeError(f"{key}: the teacher ({meta.model_name}) gives {out.shape[-1]} logits, the student "
                          f"{classes}; allowed: a teacher with the student's number of classes")
    return teacher
