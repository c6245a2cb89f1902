"""Datasets: Fashion-MNIST from idx files, and a held-out split read as the evaluation set reads it."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from sqdist.config import FASHION_MNIST_ROOT, RecipeError, fashion_mnist_files, load_recipe
from sqdist.data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, ArrayImages, SeededSamples, build_datasets,
                         load_fashion_mnist_split, loader, read_idx, shift_flip_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = ["data.name=fashion_mnist", "data.image_size=28", "model.kwargs={num_classes: 10, in_chans: 1}"]


def write_idx(path, array: np.ndarray) -> None:
    """An idx file as the MNIST distribution writes it: 0, 0, type code, ndim, big-endian dims, values; gzipped."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """A Fashion-MNIST folder of 40 training and 20 test images, labels shuffled: image i is filled
    with the value ``10 * label[i]``, with one bright pixel at the top left so a flip or a shift shows."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = np.repeat((labels * 10)[:, None, None], 28, 1).repeat(28, 2)
        images[:, 0, 0] = 255
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_read_idx_reads_what_the_writer_wrote(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(str(tmp_path / "a.gz")), a)
    b = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "b.gz", b)
    assert read_idx(str(tmp_path / "b.gz")).tolist() == [1, -2, 70000]
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"abc")  # 3 values for a shape of 5
    with pytest.raises(ValueError, match="3 bytes of values for shape"):
        read_idx(str(tmp_path / "bad.gz"))


def test_fashion_mnist_shapes_labels_and_normalization(fake_fashion):
    recipe = load_recipe(None, FASHION + [f"data.root={fake_fashion}"])
    train, test = build_datasets(recipe)
    assert len(train) == 40 and len(test) == 20
    assert not train.augment and build_datasets(load_recipe(None, FASHION + [f"data.root={fake_fashion}",
                                                                           "data.augment=true"]))[0].augment
    with pytest.raises(RecipeError, match=r"^data.augment=true: data.name='digits' has no such option"):
        load_recipe(None, ["data.augment=true"])
    with pytest.raises(RecipeError, match=r"num_classes=5: expected an integer >= 10 \(data.name=fashion_mnist has 10"):
        load_recipe(None, FASHION[:-1] + [f"data.root={fake_fashion}", "model.kwargs={num_classes: 5, in_chans: 1}"])
    labels = read_idx(str(fake_fashion / "t10k-labels-idx1-ubyte.gz"))
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[i]
        # a test image is read as stored: (value / 255 - mean) / std, bright pixel at the top left
        expected = (labels[i] * 10 / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        assert torch.allclose(x[0, 5:, 5:], torch.full((23, 23), expected))
        assert x[0, 0, 0] == pytest.approx((1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)
    # three channels and another size when the model asks for them
    rgb, _ = load_fashion_mnist_split(str(fake_fashion), image_size=16, in_chans=3)
    x, _ = rgb.without_augmentation()[0]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[2])


def test_fashion_mnist_augmentation_is_a_pure_function_of_seed_epoch_and_index(fake_fashion):
    train, _ = load_fashion_mnist_split(str(fake_fashion), augment=True)
    plain = train.without_augmentation()
    batches = [list(range(0, 40, 2)), list(range(1, 40, 2))]
    first = [x for x, _ in loader(train, batches, seed=3, epoch=1)]
    again = [x for x, _ in loader(train, batches[::-1], workers=0, seed=3, epoch=1)]
    assert torch.equal(torch.cat(first)[:20], torch.cat(again)[20:])  # same samples whatever the batching
    assert torch.equal(SeededSamples(train, 3)[(1, 4)][0], first[0][2])  # one sample read alone: the same
    other = torch.cat([x for x, _ in loader(train, batches, seed=3, epoch=2)])
    assert not torch.equal(torch.cat(first), other)  # a new epoch, new crops and flips
    # a shift or a flip keeps the image's value everywhere but the border and moves the bright corner pixel
    bright = (1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    moved = 0
    for i, x in enumerate(torch.cat(first)):
        index = batches[0][i] if i < 20 else batches[1][i - 20]
        ref = plain[index][0]
        assert torch.equal(x[0, 6:-6, 6:-6], ref[0, 6:-6, 6:-6])
        assert (x == bright).sum() <= 1
        moved += not torch.equal(x, ref)
    assert moved >= 30  # 49 of the 50 (shift, flip) pairs change the image
    # and the test set is never augmented
    _, test = load_fashion_mnist_split(str(fake_fashion), augment=True)
    assert torch.equal(torch.cat([x for x, _ in loader(test, [[0, 1, 2]], seed=0, epoch=0)]),
                       torch.cat([x for x, _ in loader(test, [[0, 1, 2]], seed=5, epoch=9)]))


def test_batched_shift_and_flip_match_the_per_image_reference():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    data = ArrayImages(images, torch.arange(50) % 10, 28, mean=0.0, std=1.0, augment=True, pad=3)
    seeds = [7 * i + 2**40 for i in range(50)]
    dy, dx, flip = data.augmentation(seeds)
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(7)) and 10 < int(flip.sum()) < 40  # every offset, both flips
    got = data.seeded_items(list(range(50)), seeds)
    for i, (x, y) in enumerate(got):
        ref = shift_flip_reference(images[i], int(dy[i]), int(dx[i]), bool(flip[i]), 3).float() / 255
        assert torch.equal(x[0], ref) and y == i % 10


def test_fashion_mnist_missing_folder_or_file_is_one_line_and_exit_2(tmp_path, fake_fashion, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(RecipeError) as info:
        load_recipe(None, FASHION + [f"data.root={missing}"])
    message = str(info.value)
    assert message.startswith(f"data.root='{missing}': no such folder") and "\n" not in message
    assert "dataset-fashion-mnist" in message and "apt-get install dataset-fashion-mnist" in message
    os.remove(fake_fashion / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(RecipeError, match=r"missing file .*t10k-labels-idx1-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_recipe(None, FASHION + [f"data.root={fake_fashion}"])
    # the trainer's command line: that one line on stderr, exit code 2, no traceback
    from sqdist.train import main

    assert main([os.path.join(ROOT, "recipes", "fashion_mnist_twn.yaml"), f"data.root={missing}"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"sqdist: recipe error: {message}"]


def test_fashion_mnist_corrupt_file_is_one_line(fake_fashion):
    with gzip.open(fake_fashion / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not an idx file")
    recipe = load_recipe(None, FASHION + [f"data.root={fake_fashion}"])
    with pytest.raises(RecipeError, match=r"^data.root=.*not an idx file.*apt-get install --reinstall dataset-fashion-mnist$"):
        build_datasets(recipe)


def test_fashion_mnist_truncated_or_non_gzip_file_is_one_line_and_exit_2(fake_fashion, capsys):
    """A .gz that gzip cannot read (cut short, or not gzip at all) names the file in one line, exit 2."""
    from sqdist.train import main

    images = fake_fashion / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    for content, kind in ((whole[: len(whole) // 2], "EOFError"), (b"plain bytes, not gzip", "BadGzipFile")):
        images.write_bytes(content)
        assert main([os.path.join(ROOT, "recipes", "fashion_mnist_twn.yaml"), f"data.root={fake_fashion}",
                     "train.progress=false", f"run.dir={fake_fashion.parent / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{images}: cannot be read ({kind}" in err and "apt-get install --reinstall" in err, err


def test_export_calibrates_on_a_fixed_unaugmented_subset(fake_fashion):
    """--activations int8 calibrates on the training images as the evaluation reads them (no random
    shift or flip) and on the same subset every time, whatever the global RNG: two exports are equal."""
    from sqdist.export.run import run_data

    recipe = load_recipe(None, FASHION + [f"data.root={fake_fashion}", "data.augment=true", "data.batch_size=8"])
    meta = {"config": recipe, "checkpoint": "run"}
    torch.manual_seed(1)
    first, _ = run_data(meta, 2)
    torch.manual_seed(2)
    second, _ = run_data(meta, 2)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))
    train, _ = build_datasets(recipe)
    assert train.augment  # the training view is augmented; the calibration images are not
    plain = torch.stack([x for x, _ in train.without_augmentation().seeded_items(list(range(40)), [0] * 40)])
    for image in torch.cat(first):
        assert any(torch.equal(image, p) for p in plain)
    held = load_recipe(None, FASHION + [f"data.root={fake_fashion}", "data.augment=true", "data.batch_size=8",
                                        "data.holdout_fraction=0.25"])
    calibration, _ = run_data({"config": held, "checkpoint": "run"}, 2)  # the kept part of a holdout split too
    for image in torch.cat(calibration):
        assert any(torch.equal(image, p) for p in plain)


@pytest.mark.skipif(not all(os.path.isfile(p) for p in fashion_mnist_files(FASHION_MNIST_ROOT)),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_when_installed():
    recipe = load_recipe(None, ["data.name=fashion_mnist", "data.image_size=28",
                                "model.kwargs={num_classes: 10, in_chans: 1}"])
    assert recipe["data"]["root"] == FASHION_MNIST_ROOT  # the default folder
    train, test = build_datasets(recipe)
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(train.labels).tolist() == [6_000] * 10 and torch.bincount(test.labels).tolist() == [1_000] * 10
    x = torch.stack([test[i][0] for i in range(0, 10_000, 10)])
    assert x.shape == (1000, 1, 28, 28)
    # the normalization constants are the training set's: the normalized test images are near mean 0, std 1
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


# ---------------------------------------------------------------- held-out split
def _png_tree(root, n_per_class: int = 6, size: int = 40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_holdout_on_folder_data_reads_the_eval_transform(tmp_path):
    from PIL import Image
    from timm.data import create_transform

    _png_tree(tmp_path)
    recipe = load_recipe(None, ["data.name=folder", f"data.root={tmp_path}", "data.image_size=32",
                                "data.holdout_fraction=0.5", "model.kwargs={num_classes: 2}"])
    kept, held = build_datasets(recipe)
    assert len(kept) == len(held) == 6
    eval_transform = create_transform(32, is_training=False)
    files = held.dataset.reader.samples
    for i, index in enumerate(held.indices):
        x, y = held[i]
        assert torch.equal(x, held[i][0])  # no random crop, flip or colour jitter: the same tensor each read
        path, target = files[index]
        assert y == target and torch.equal(x, eval_transform(Image.open(path).convert("RGB")))
    # the training part keeps its augmentation
    x0 = kept[0][0]
    assert any(not torch.equal(x0, kept[0][0]) for _ in range(5))


def test_holdout_on_fashion_mnist_reads_unaugmented_images(fake_fashion):
    recipe = load_recipe(None, FASHION + [f"data.root={fake_fashion}", "data.holdout_fraction=0.25", "data.augment=true"])
    kept, held = build_datasets(recipe)
    train, _ = load_fashion_mnist_split(str(fake_fashion))
    plain = train.without_augmentation()
    assert len(held) == 10 and set(kept.indices).isdisjoint(held.indices)
    got = torch.cat([x for x, _ in loader(held, [list(range(10))], seed=1, epoch=3)])
    assert torch.equal(got, torch.stack([plain[i][0] for i in held.indices]))
    assert kept.dataset.augment  # training part still augmented


def test_fashion_mnist_training_part_of_a_holdout_split_is_read_by_batch_with_the_same_seeds(fake_fashion):
    recipe = load_recipe(None, FASHION + [f"data.root={fake_fashion}", "data.holdout_fraction=0.25", "data.augment=true"])
    kept, _ = build_datasets(recipe)
    seeded = SeededSamples(kept, 4)
    assert seeded.seeded is kept.dataset  # the batched path, not a reseeded read per sample
    batch = seeded.__getitems__([(2, 0), (2, 5)])
    for (x, y), i in zip(batch, (0, 5)):  # sample i of the split: image kept.indices[i], seeded by i
        ref, ref_y = kept.dataset.seeded_items([kept.indices[i]], [seeded.sample_seed(2, i)])[0]
        assert torch.equal(x, ref) and y == ref_y and torch.equal(seeded[(2, i)][0], x)
