"""Product quantization of one layer's weight, fitted to the layer's outputs.

A weight ``W`` of shape ``(C_out, C_in, kh, kw)`` (or ``(C_out, C_in)``) is read as
``C_out`` rows of ``D = C_in * kh * kw`` values ordered (c_in, kh, kw); every row is cut
into ``D / d`` contiguous subvectors of ``d`` values. One codebook of ``K`` centroids
``(K, d)`` serves all the subvectors of the layer, and the layer stores, per subvector,
the index of its centroid.

The codebook minimizes the error of the layer's *outputs* rather than of its weights:

    J = sum_w || X~ (w - c_a(w)) ||^2 = sum_w (w - c_a(w))^T G (w - c_a(w)),   G = X~^T X~

``X~`` holds the layer's inputs unfolded im2col-style and cut into blocks of ``d``
columns, all blocks stacked as rows (one ``X~`` shared by every subvector, as in
*And the Bit Goes Down*), so only the ``d x d`` Gram matrix ``G`` is needed. The
caller passes one Gram matrix per calibration image; :func:`fit_codebook` resamples
a subset of images every EM iteration.

EM (:func:`fit_codebook`): E-step assigns each subvector to the centroid nearest in
the ``G`` metric; an empty cluster takes over part of the most populated one; M-step
sets each centroid to the mean of its subvectors, which minimizes
``sum (w - c)^T G (w - c)`` for any positive semi-definite ``G``, so with a fixed ``G``
the objective never increases. With ``G = I`` this is plain k-means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCKS = ("small", "large")
# subvector length d per kind of layer: spatial convs take one (small) or two (large) kernels
_POINTWISE = {"small": 4, "large": 8}   # 1x1 convs and Linear layers other than the classifier
_CLASSIFIER = {"small": 4, "large": 4}
_SPATIAL_KERNELS = {"small": 1, "large": 2}
MAX_CODEBOOK = 2 ** 16
CAP_DIVISOR = 4  # K is at most the largest power of two below (number of subvectors) / 4


def largest_divisor_at_most(n: int, target: int) -> int:
    """The largest divisor of ``n`` that is ``<= target`` (at least 1)."""
    for d in range(min(n, max(target, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def block_size(weight_shape: tuple[int, ...], blocks: str, classifier: bool = False) -> int:
    """Subvector length ``d`` for a weight of ``weight_shape`` ((C_out, C_in[, kh, kw])).

    ``small``: ``kh*kw`` for convs with a spatial kernel (9 for 3x3), 4 for 1x1 convs and
    Linear layers; ``large``: ``2*kh*kw`` (18) and 8. The classifier takes 4 in both. When
    the target does not divide a row (``C_in*kh*kw``; depthwise convs have ``C_in = 1``),
    the largest divisor below it is used.
    """
    if blocks not in BLOCKS:
        raise ValueError(f"blocks={blocks!r}; allowed: {', '.join(BLOCKS)}")
    row = math.prod(weight_shape[1:])
    area = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
    if classifier:
        target = _CLASSIFIER[blocks]
    elif area > 1:
        target = _SPATIAL_KERNELS[blocks] * area
    else:
        target = _POINTWISE[blocks]
    return largest_divisor_at_most(row, target)


def codebook_size(n_subvectors: int, wanted: int) -> int:
    """``min(wanted, largest power of two strictly below n_subvectors / 4)``, at least 1.

    The cap keeps every centroid fitted to a few subvectors (the rule of the paper's code).
    """
    cap, limit = 1, n_subvectors / CAP_DIVISOR
    while cap * 2 < limit:
        cap *= 2
    return max(1, min(wanted, cap))


def index_bits(k: int) -> int:
    """Bits per stored index for a codebook of ``k`` centroids (``ceil(log2 k)``, at least 1)."""
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def subvectors(weight: Tensor, d: int) -> Tensor:
    """``weight`` (C_out, ...) as its subvectors ``(C_out * D / d, d)``, row by row.

    Subvector ``o * (D / d) + j`` holds values ``j*d .. (j+1)*d - 1`` of row ``o``
    (``D = weight[0].numel()``, values ordered (c_in, kh, kw)).
    """
    return weight.reshape(weight.shape[0], -1).reshape(-1, d)


def reconstruct(codebook: Tensor, indices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The weight of ``shape`` that ``codebook`` (K, d) and ``indices`` (n,) encode: ``codebook[indices]``."""
    return codebook[indices].reshape(shape)


@dataclass
class PQFit:
    """What :func:`fit_codebook` found.

    codebook: (K, d) centroids, in the dtype of the subvectors.
    assignments: (n,) int64, the centroid of every subvector.
    objective: per EM iteration, ``J / J0`` after the M-step, measured with the Gram of
        *all* calibration images (``J0 = sum_w w^T G w``: the objective of an all-zero weight).
    refilled: how many empty clusters were refilled, over all iterations.
    """

    codebook: Tensor
    assignments: Tensor
    objective: list[float] = field(default_factory=list)
    refilled: int = 0


_CHUNK_VALUES = 1 << 24  # (subvectors x centroids) values per chunk of the E- and M-steps


def assign(w: Tensor, codebook: Tensor, gram: Tensor) -> Tensor:
    """E-step: for every subvector ``w`` (n, d) the index of ``argmin_k (w - c_k)^T G (w - c_k)``.

    Computed as ``c^T G c - 2 w^T G c`` (the ``w^T G w`` term is the same for every k), a
    chunk of subvectors at a time. Ties go to the lowest index.
    """
    cg = codebook @ gram                       # (K, d)
    cc = (cg * codebook).sum(1)                # (K,)
    chunk = max(1, _CHUNK_VALUES // codebook.shape[0])
    out = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
    for start in range(0, w.shape[0], chunk):
        part = w[start:start + chunk]
        out[start:start + chunk] = (cc[None, :] - 2.0 * part @ cg.T).argmin(dim=1)
    return out


def objective(w: Tensor, codebook: Tensor, assignments: Tensor, gram: Tensor) -> float:
    """``sum_w (w - c_a(w))^T G (w - c_a(w))`` for subvectors ``w`` (n, d)."""
    r = w - codebook[assignments]
    return float(((r @ gram) * r).sum())


def refill_empty(w: Tensor, codebook: Tensor, assignments: Tensor, gram: Tensor,
                 generator: torch.Generator) -> int:
    """Give every empty cluster half of the most populated one; returns how many were refilled.

    The empty centroid becomes a copy of the most populated cluster's centroid, and the
    upper half of that cluster's members, ranked by their projection on a random direction
    (in the ``G`` metric), move to the copy: the split that tiny opposite noise on the two
    copies makes, except that neither side can end up empty. The objective does not
    change (the moved members keep an identical centroid), and the next M-step can only
    lower it. Changes ``codebook`` and ``assignments`` in place; a cluster stays empty
    only when no cluster has two members.
    """
    counts = torch.bincount(assignments, minlength=codebook.shape[0])
    refilled = 0
    for k in (counts == 0).nonzero().flatten().tolist():
        m = int(counts.argmax())  # the first of the most populated
        if counts[m] < 2:
            break
        members = (assignments == m).nonzero().flatten()
        direction = torch.randn(w.shape[1], generator=generator, dtype=torch.float64).to(w)
        proj = (w[members] - codebook[m]) @ (gram @ direction)
        moved = members[proj.argsort(stable=True)[members.numel() // 2:]]
        codebook[k] = codebook[m]
        assignments[moved] = k
        counts[m] -= moved.numel()
        counts[k] = moved.numel()
        refilled += 1
    return refilled


def update_centroids(w: Tensor, codebook: Tensor, assignments: Tensor) -> None:
    """M-step: each non-empty centroid becomes the mean of its subvectors (in place).

    The sums are one-hot matrix products, chunk by chunk: the same result on every run,
    where ``index_add_`` on a GPU adds in whatever order its atomics land.
    """
    k_total = codebook.shape[0]
    counts = torch.bincount(assignments, minlength=k_total)
    sums = torch.zeros_like(codebook)
    chunk = max(1, _CHUNK_VALUES // k_total)
    for start in range(0, w.shape[0], chunk):
        onehot = F.one_hot(assignments[start:start + chunk], k_total).to(w.dtype)  # (chunk, K)
        sums += onehot.T @ w[start:start + chunk]
    full = counts > 0
    codebook[full] = sums[full] / counts[full, None].to(w.dtype)


def fit_codebook(w: Tensor, grams: Tensor, k: int, iters: int, *, generator: torch.Generator,
                 sample: float = 0.5, init: Tensor | None = None, on_iteration=None) -> PQFit:
    """Fit a ``k``-centroid codebook to subvectors ``w`` by EM in the metric of the inputs.

    Args:
        w: (n, d) subvectors (:func:`subvectors`); the EM runs in float64.
        grams: (S, d, d) one Gram matrix per calibration image (``X~_s^T X~_s``), or (d, d).
        k: number of centroids, ``1 <= k <= n``.
        iters: EM iterations (each: E-step, refill, M-step), at least 1.
        generator: CPU generator for the initial centroids, resampling and refills.
        sample: fraction of the images whose Grams make ``G`` in each iteration (a fresh
            subset every iteration); 1.0 keeps ``G`` fixed, and then the objective never increases.
        init: (k, d) initial centroids; default: ``k`` distinct subvectors drawn at random.
        on_iteration: ``on_iteration(i, objective)`` after every iteration (a progress bar).

    Returns:
        :class:`PQFit` with the codebook in ``w``'s dtype.
    """
    n, d = w.shape
    if not 1 <= k <= n:
        raise ValueError(f"codebook size {k}; allowed: 1 to {n}, the number of subvectors")
    if iters < 1:
        raise ValueError(f"iters={iters}; allowed: 1 or more")
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample={sample}; allowed: a fraction in (0, 1]")
    x = w.detach().to(torch.float64)
    grams = grams.detach().to(device=x.device, dtype=torch.float64)
    grams = grams[None] if grams.dim() == 2 else grams
    if grams.shape[1:] != (d, d):
        raise ValueError(f"grams of shape {tuple(grams.shape)}; expected (S, {d}, {d}) for subvectors of length {d}")
    full = grams.sum(0)
    if init is None:
        picks = torch.randperm(n, generator=generator)[:k].to(x.device)
        codebook = x[picks].clone()
    else:
        codebook = init.detach().to(x).clone()
        if codebook.shape != (k, d):
            raise ValueError(f"init of shape {tuple(codebook.shape)}; expected ({k}, {d})")
    baseline = float(((x @ full) * x).sum()) or 1.0
    n_images = grams.shape[0]
    take = max(1, round(sample * n_images))
    fit = PQFit(codebook, torch.zeros(n, dtype=torch.long, device=x.device))
    for it in range(iters):
        if take < n_images:
            picked = torch.randperm(n_images, generator=generator)[:take].sort().values.to(x.device)
            gram = grams[picked].sum(0)
        else:
            gram = full
        fit.assignments = assign(x, codebook, gram)
        fit.refilled += refill_empty(x, codebook, fit.assignments, gram, generator)
        update_centroids(x, codebook, fit.assignments)
        fit.objective.append(objective(x, codebook, fit.assignments, full) / baseline)
        if on_iteration is not None:
            on_iteration(it, fit.objective[-1])
    fit.codebook = codebook.to(w.dtype)
    return fit
