"""Datasets: the embedded ``digits`` default and ImageNet-layout folders (timm).

Batches come from :class:`EpochBatches`, a sampler whose order is a pure
function of (seed, epoch): rank ``r`` of ``w`` takes every ``w``-th index, and a
resumed run skips the batches it already trained on, so a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    data = recipe["data"]
    in_chans = int(recipe["model"]["kwargs"].get("in_chans", 3))
    if data["name"] == "digits":
        return load_digits_split(data["image_size"], data["test_fraction"], in_chans)
    return load_folder_split(data["root"], data["image_size"], in_chans)


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


def loader(dataset: Dataset, batches: list[list[int]], workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers)


def eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
    """Each rank evaluates every ``world``-th sample; counts are summed across ranks."""
    idx = list(range(rank, len(dataset), world))
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers)
