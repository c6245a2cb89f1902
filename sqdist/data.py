"""Datasets: the embedded ``digits`` default and ImageNet-layout folders (timm).

Batches come from :class:`EpochBatches`, a sampler whose order is a pure
function of (seed, epoch): rank ``r`` of ``w`` takes every ``w``-th index, and a
resumed run skips the batches it already trained on, so a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

DIGITS_MEAN, DIGITS_STD = 0.3, 0.35  # of load_digits / 16, rounded


def load_digits_split(image_size: int = 16, test_fraction: float = 0.25, in_chans: int = 1) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 real images), upscaled to ``image_size``.

    Returns (train, test) ``TensorDataset``s of images ``(N, in_chans, S, S)`` and labels ``(N,)``;
    the split is fixed (stratified, random_state=0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).repeat(1, in_chans, 1, 1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=0, stratify=digits.target)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def load_folder_split(root: str, image_size: int, in_chans: int = 3) -> tuple[Dataset, Dataset]:
    """ImageNet layout (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) through timm."""
    from timm.data import create_dataset, create_transform

    train = create_dataset("", root=root, split="train", is_training=True)
    val = create_dataset("", root=root, split="val")  # the recipe check requires root/val
    train.transform = create_transform(image_size, is_training=True)
    val.transform = create_transform(image_size, is_training=False)
    return train, val


def build_datasets(recipe: dict) -> tuple[Dataset, Dataset]:
    """(train, evaluation) sets; with ``data.holdout_fraction`` the evaluation set is a held-out
    part of the training split (see :func:`hold_out`), and the test set is not used."""
    data = recipe["data"]
    in_chans = int(recipe["model"]["kwargs"].get("in_chans", 3))
    if data["name"] == "digits":
        train, test = load_digits_split(data["image_size"], data["test_fraction"], in_chans)
    else:
        train, test = load_folder_split(data["root"], data["image_size"], in_chans)
    return hold_out(train, data["holdout_fraction"]) if data["holdout_fraction"] else (train, test)


def hold_out(train: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """Split ``train`` into (kept, held out): ``fraction`` of it, stratified by label, fixed (seed 1)."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset

    if isinstance(train, TensorDataset):
        labels = train.tensors[1]
    else:  # timm's ImageDataset over a folder: (path, class) samples
        labels = torch.as_tensor([target for _, target in train.reader.samples])
    from .config import check_split_fraction

    check_split_fraction("data.holdout_fraction", fraction, labels.tolist())  # a class left out: one clear line
    idx = torch.arange(len(labels)).numpy()
    keep, held = train_test_split(idx, test_size=fraction, random_state=1, stratify=labels.numpy())
    return Subset(train, sorted(keep.tolist())), Subset(train, sorted(held.tolist()))


@dataclass
class EpochBatches:
    """Index batches for one process: shuffled by (seed, epoch), sharded by rank, drop_last.

    Every rank gets the same number of batches, so collectives stay in step.
    """

    n: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        return (self.n // self.world) // self.batch_size

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        mine = order[self.rank :: self.world][: (self.n // self.world)]
        out = [mine[i * self.batch_size : (i + 1) * self.batch_size].tolist() for i in range(len(self))]
        return out[start:]


class SeededSamples(Dataset):
    """``dataset`` whose sample ``(epoch, index)`` draws its randomness (timm's random crop
    and flip, any augmentation) from a seed that is a pure function of (seed, epoch, index).

    So a sample is the same whichever worker loads it and whenever it is loaded: a run
    resumed mid-epoch, with any ``data.workers``, sees exactly the samples an
    uninterrupted run would. The caller's RNG streams (torch, Python, numpy) are left
    as they were, so the model's own randomness (dropout) is not disturbed either.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed the CUDA generators, which
            # fork_rng(devices=[]) does not restore (and costs ~2 ms a sample in stack captures)
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def loader(dataset: Dataset, batches: list[list[int]], workers: int = 0, *, seed: int = 0, epoch: int = 0) -> DataLoader:
    """Batches of ``dataset`` (index lists), each sample seeded by (seed, epoch, index).

    The loader has a generator of its own: starting it (or its workers) takes no draw
    from the global torch RNG, so where a run resumes does not shift that stream.
    """
    keyed = [[(epoch, i) for i in batch] for batch in batches]
    return DataLoader(SeededSamples(dataset, seed), batch_sampler=keyed, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[list[list[int]], int]:
    """Rank ``rank``'s evaluation batches and how many of its samples are real.

    Rank ``r`` takes every ``world``-th sample; ranks with one sample fewer repeat their
    last one, so every rank runs the same number of batches (under ZeRO-3 every forward
    is a collective: unequal counts would hang). Count only the first ``real`` samples.
    """
    idx = list(range(rank, n, world))
    real = len(idx)
    per_rank = -(-n // world)
    idx += idx[-1:] * (per_rank - real) if idx else [0] * per_rank
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)], real


def eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0) -> tuple[DataLoader, int]:
    """``(loader, real)``: see :func:`eval_batches`; counts are summed across ranks."""
    batches, real = eval_batches(len(dataset), batch_size, rank, world)
    return loader(dataset, batches, workers), real
