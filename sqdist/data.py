"""Datasets: the embedded ``digits`` default, Fashion-MNIST (idx files) and ImageNet-layout folders (timm).

Batches come from :class:`EpochBatches`, a sampler whose order is a pure
function of (seed, epoch): rank ``r`` of ``w`` takes every ``w``-th index, and a
resumed run skips the batches it already trained on, so a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import copy
import gzip
import os
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .config import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, RecipeError, check_split_fraction

DIGITS_MEAN, DIGITS_STD = 0.3, 0.35  # of load_digits / 16, rounded
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353  # of the 60,000 training images / 255
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


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


def read_idx(path: str) -> np.ndarray:
    """The array in an idx file (the MNIST format; gzip-compressed when the name ends in ``.gz``).

    Layout: two zero bytes, a type code (0x08 uint8, ...), the number of dimensions, each
    dimension as a big-endian int32, then the values, big-endian, C order.
    """
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:  # a truncated or non-gzip .gz file (gzip.BadGzipFile)
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (header {raw[:4].hex()!r})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: {len(raw) - offset} bytes of values for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def splitmix64(seeds: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each seed (SplitMix64's finalizer): independent-looking bits per sample."""
    z = seeds.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class ArrayImages(Dataset):
    """Grey images held in memory (uint8 ``(N, H, W)``) with labels ``(N,)``, read as normalized
    ``(in_chans, image_size, image_size)`` float tensors.

    ``augment``: a crop of the image padded by ``pad`` pixels (zeros, the background) at a
    random offset, and a horizontal flip with probability 1/2. Both are a pure function of a
    per-sample seed (:meth:`seeded_items`; :class:`SeededSamples` passes its (seed, epoch,
    index) seed), and a whole batch is cut with one gather (:func:`shift_flip_reference` is the
    plain per-image version): about 30 us an image on one core, where a read reseeding the RNGs
    per sample costs about 200 (60,000 images an epoch).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, mean: float, std: float,
                 in_chans: int = 1, augment: bool = False, pad: int = 2):
        self.images, self.labels = images, labels
        self.image_size, self.mean, self.std, self.in_chans = image_size, mean, std, in_chans
        self.augment, self.pad = augment, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        seed = int(torch.randint(0, 2**62, ())) if self.augment else 0  # from the caller's torch RNG
        return self.seeded_items([index], [seed])[0]

    def augmentation(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dy, dx, flip) of each seed: the crop's offset in the padded image (0..2 pad) and the flip."""
        bits = torch.from_numpy(splitmix64(np.array([s % 2**64 for s in seeds], dtype=np.uint64)).view(np.int64))
        span = 2 * self.pad + 1
        return (bits & 0xFF) % span, ((bits >> 8) & 0xFF) % span, ((bits >> 16) & 1).bool()

    def seeded_items(self, indices: list[int], seeds: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Samples ``indices``, the augmentation of each drawn from its seed alone."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]  # (B, H, W) uint8
        b, h, w = x.shape
        if self.augment:
            dy, dx, flip = self.augmentation(seeds)
            rows = dy[:, None] + torch.arange(h)  # (B, H) rows of the padded image
            cols = torch.arange(w).expand(b, w)
            cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (B, W)
            padded = F.pad(x, (self.pad,) * 4)
            x = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = x.unsqueeze(1).float().div_(255.0)  # (B, 1, H, W) in [0, 1]
        if (h, w) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).expand(-1, self.in_chans, -1, -1)
        return [(xi.contiguous(), int(yi)) for xi, yi in zip(x, self.labels[idx])]

    def without_augmentation(self) -> "ArrayImages":
        """The same images (shared, not copied) as an evaluation set reads them."""
        view = copy.copy(self)
        view.augment = False
        return view


def shift_flip_reference(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """What :meth:`ArrayImages.seeded_items` cuts from one ``(H, W)`` image, the plain way."""
    h, w = image.shape
    out = F.pad(image, (pad,) * 4)[dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def load_fashion_mnist_split(root: str, image_size: int = 28, in_chans: int = 1,
                             augment: bool = False) -> tuple[ArrayImages, ArrayImages]:
    """Fashion-MNIST (60,000 training and 10,000 test 28x28 grey images, 10 classes) from the
    idx files under ``root``; (train, test) :class:`ArrayImages`, the training set augmented
    (random 2-pixel shift, horizontal flip) when ``augment``."""
    sets = []
    for split in ("train", "test"):
        images, labels = (read_idx(os.path.join(root, name)) for name in FASHION_MNIST_FILES[split])
        if images.ndim != 3 or labels.shape != (len(images),):
            raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        sets.append(ArrayImages(torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64)),
                                image_size, FASHION_MNIST_MEAN, FASHION_MNIST_STD, in_chans,
                                augment=augment and split == "train"))
    return sets[0], sets[1]


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
    elif data["name"] == "fashion_mnist":
        root = data["root"] or FASHION_MNIST_ROOT
        try:
            train, test = load_fashion_mnist_split(root, data["image_size"], in_chans, data["augment"])
        except ValueError as exc:  # a truncated or foreign file: one line, like the recipe check's
            raise RecipeError(f"data.root={root!r}: {exc}; reinstall with apt-get install --reinstall "
                              "dataset-fashion-mnist") from None
    else:
        train, test = load_folder_split(data["root"], data["image_size"], in_chans)
    return hold_out(train, data["holdout_fraction"], eval_view(train, test)) if data["holdout_fraction"] else (train, test)


def eval_view(train: Dataset, test: Dataset) -> Dataset:
    """``train``'s samples as the evaluation set reads them: no augmentation, ``test``'s transform."""
    if isinstance(train, Subset):  # the part kept by data.holdout_fraction
        return Subset(eval_view(train.dataset, test), train.indices)
    while isinstance(test, Subset):  # a held-out part: its dataset has the evaluation transform
        test = test.dataset
    if isinstance(train, ArrayImages):
        return train.without_augmentation()
    if hasattr(train, "reader") and hasattr(train, "transform"):  # timm's ImageDataset: same files, eval transform
        view = copy.copy(train)
        view.transform = test.transform
        return view
    return train  # a TensorDataset is not augmented


def hold_out(train: Dataset, fraction: float, held_view: Dataset | None = None) -> tuple[Dataset, Dataset]:
    """Split ``train`` into (kept, held out): ``fraction`` of it, stratified by label, fixed (seed 1).

    The held-out part is read from ``held_view`` (the same samples without the training
    augmentation, see :func:`eval_view`; default ``train``), so it is evaluated as a test set would be.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(train, TensorDataset):
        labels = train.tensors[1]
    elif isinstance(train, ArrayImages):
        labels = train.labels
    else:  # timm's ImageDataset over a folder: (path, class) samples
        labels = torch.as_tensor([target for _, target in train.reader.samples])
    check_split_fraction("data.holdout_fraction", fraction, labels.tolist())  # a class left out: one clear line
    if held_view is not None and len(held_view) != len(train):
        raise ValueError(f"held_view has {len(held_view)} samples, train {len(train)}: not the same samples")
    idx = torch.arange(len(labels)).numpy()
    keep, held = train_test_split(idx, test_size=fraction, random_state=1, stratify=labels.numpy())
    return Subset(train, sorted(keep.tolist())), Subset(train if held_view is None else held_view, sorted(held.tolist()))


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
        # a dataset that draws its augmentation from given seeds, batch by batch (``seeded_items``),
        # directly or under a Subset (a held-out split): read it without reseeding per sample
        self.seeded, self.positions = None, None
        if hasattr(dataset, "seeded_items"):
            self.seeded = dataset
        elif isinstance(dataset, Subset) and hasattr(dataset.dataset, "seeded_items"):
            self.seeded, self.positions = dataset.dataset, dataset.indices

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, epoch: int, index: int) -> int:
        return (self.seed * 1_000_003 + epoch) * 10_000_019 + index

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch at once (DataLoader's batched fetch): one call to a ``seeded_items`` dataset,
        else sample by sample."""
        if self.seeded is None:
            return [self[key] for key in keys]
        index = [i if self.positions is None else self.positions[i] for _, i in keys]
        return self.seeded.seeded_items(index, [self.sample_seed(e, i) for e, i in keys])

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if self.seeded is not None:
            return self.__getitems__([key])[0]
        sample_seed = self.sample_seed(epoch, index)
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
