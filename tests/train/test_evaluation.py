"""Evaluation: BN re-estimation under the quantized weights, and the evaluation split.

``recalibrate_bn`` reads only the batches it is asked for, keeps each BN's own
momentum, and under data parallelism leaves identical statistics on every rank
(a real two-process gloo group). ``eval_batches`` gives every rank the same number
of batches (under ZeRO-3 every forward is a collective) and counts each sample once.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from sqdist.data import eval_batches
from sqdist.train import evaluate, recalibrate_bn


class CountingDataset(Dataset):
    """A TensorDataset that counts its __getitem__ calls."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = TensorDataset(torch.randn(n, 3, 4, 4, generator=g) * 2 + 1, torch.randint(0, 5, (n,), generator=g))
        self.calls = 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.calls += 1
        return self.data[i]


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.01), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.Dropout(0.5))


def test_recalibrate_reads_only_the_batches_asked_for_and_keeps_momentum():
    data = CountingDataset(2000)
    batches = [list(range(i, i + 10)) for i in range(0, 2000, 10)]  # a whole epoch: 200 batches
    net = small_net()
    recalibrate_bn(net, data, batches, torch.device("cpu"), n_batches=2)
    assert data.calls == 20  # was 2,000: the whole epoch was loaded, then cut to 2 batches
    bn = net[1]
    assert bn.momentum == 0.01  # the BN's own (timm's tf_* models use 0.01), not a hard-coded 0.1
    # a plain average over the 2 batches: the mean of their per-batch channel means
    with torch.no_grad():
        feats = [net[0](torch.stack([data.data[i][0] for i in b])) for b in batches[:2]]
    expected = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2


def test_eval_batches_are_equal_in_number_on_every_rank():
    """450 samples, 4 ranks, batches of 56: ranks hold 113, 113, 112, 112 samples."""
    per_rank = [eval_batches(450, 56, r, 4) for r in range(4)]
    assert len({len(b) for b, _ in per_rank}) == 1  # was 3 batches on ranks 0-1, 2 on ranks 2-3
    assert [real for _, real in per_rank] == [113, 113, 112, 112]
    counted = [i for batches, real in per_rank for i in sum(batches, [])[:real]]
    assert sorted(counted) == list(range(450))  # every sample counted exactly once


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = small_net()  # same weights on both ranks
        data = CountingDataset(400, seed=rank)  # but different data: each rank its own shard
        batches = [list(range(i, i + 20)) for i in range(0, 400, 20)]
        recalibrate_bn(net, data, batches, torch.device("cpu"), n_batches=3)
        bn = net[1]
        # uneven evaluation split: 7 samples over 2 ranks (4 and 3), batches of 3: 2 batches each
        test = TensorDataset(torch.randn(7, 3, 4, 4), torch.arange(7) % 5)
        recipe = {"data": {"eval_batch_size": 3, "workers": 0}}
        acc = evaluate(net, test, recipe, torch.device("cpu"), rank, world)
        torch.save({"mean": bn.running_mean.clone(), "var": bn.running_var.clone(), "acc": acc}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_recalibrated_statistics_are_identical_on_every_rank(tmp_path, free_port):
    out = str(tmp_path / "bn")
    mp.spawn(_worker, args=(2, free_port, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["mean"], r1["mean"]) and torch.equal(r0["var"], r1["var"])
    # the average of the two ranks' own statistics: what one process reading both shards gets
    solo = []
    for seed in (0, 1):
        torch.manual_seed(0)
        net = small_net()
        recalibrate_bn(net, CountingDataset(400, seed=seed), [list(range(i, i + 20)) for i in range(0, 400, 20)],
                       torch.device("cpu"), n_batches=3)
        solo.append(net[1])
    torch.testing.assert_close(r0["mean"], (solo[0].running_mean + solo[1].running_mean) / 2)
    torch.testing.assert_close(r0["var"], (solo[0].running_var + solo[1].running_var) / 2)
    assert not torch.allclose(solo[0].running_mean, solo[1].running_mean)  # the shards did differ
    assert r0["acc"] == r1["acc"] and (r0["acc"] * 7 / 100) == pytest.approx(round(r0["acc"] * 7 / 100))


def test_checkpoint_can_be_read_without_its_weights(tmp_path):
    """Under DeepSpeed each rank restores its own shards: the position and RNG states are
    read from the checkpoint, the whole-model file is not."""
    from sqdist.train.checkpoint import load_checkpoint, save_checkpoint

    net = small_net()
    folder = save_checkpoint(str(tmp_path), 7, model_state=net.state_dict(), optimizer_state={"state": {}, "param_groups": []},
                             rank_state={"step": 7}, meta={"m": 1})
    full = load_checkpoint(folder)
    assert set(full["model"]) == set(net.state_dict()) and full["optimizer"] is not None
    light = load_checkpoint(folder, weights=False)
    assert light["model"] is None and light["optimizer"] is None
    assert light["rank_state"] == {"step": 7} and light["meta"] == {"m": 1}


def test_holdout_fraction_evaluates_on_part_of_the_training_split():
    from sqdist.config import load_recipe
    from sqdist.data import build_datasets

    base = ["data.image_size=8", "model.kwargs={num_classes: 10, in_chans: 1}"]
    train, test = build_datasets(load_recipe(None, base))
    kept, held = build_datasets(load_recipe(None, base + ["data.holdout_fraction=0.2"]))
    assert len(kept) + len(held) == len(train) and abs(len(held) - 0.2 * len(train)) <= 1
    as_set = lambda ds: {tuple(ds[i][0].flatten().tolist()) for i in range(len(ds))}  # noqa: E731
    assert as_set(kept).isdisjoint(as_set(held))  # held-out images are not trained on
    assert as_set(held) <= as_set(train) and as_set(held).isdisjoint(as_set(test))  # and the test set is not used
    labels = [int(held[i][1]) for i in range(len(held))]
    assert all(abs(labels.count(c) - len(held) / 10) <= 3 for c in range(10))  # stratified
    again, _ = build_datasets(load_recipe(None, base + ["data.holdout_fraction=0.2"]))
    assert kept.indices == again.indices  # fixed
