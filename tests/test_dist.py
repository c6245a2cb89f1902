"""The mask broadcast: bit packing on the collective's device, and rank 0's masks on every rank."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sqdist import dist as sqdist_dist
from sqdist.dist import broadcast_masks, masks_to, pack_bits, unpack_bits

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")
SHAPES = [(1,), (7,), (8,), (9,), (64,), (3, 5), (17, 33), (2, 3, 3, 3), (1000,), (4099,)]


def pack_bits_host(mask):
    """The packing as it was before it moved to the collective's device: bit weights from the host."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits_host(packed, n):
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return packed.cpu().reshape(-1, 1).bitwise_and(weights).ne(0).reshape(-1)[:n]


def random_masks(shapes, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) < p for s in shapes]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 63, 1000, 4099])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_packing_gives_the_same_bytes_as_before(n, p, generator):
    mask = torch.rand(n, generator=generator) < p
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(packed, pack_bits_host(mask))
    assert torch.equal(unpack_bits(packed, n), unpack_bits_host(packed, n))
    assert torch.equal(unpack_bits(packed, n), mask)


def test_many_masks_of_different_shapes_pack_as_one_stream():
    """What broadcast_masks sends: every layer's mask, flattened and concatenated, then packed."""
    masks = random_masks(SHAPES, seed=3)
    flat = torch.cat([m.reshape(-1) for m in masks])
    assert flat.numel() % 8 != 0  # the last byte is padded
    packed = pack_bits(flat)
    assert torch.equal(packed, pack_bits_host(flat))
    parts = unpack_bits(packed, flat.numel()).split([m.numel() for m in masks])
    for part, m in zip(parts, masks):
        assert torch.equal(part.view(m.shape), m)


def test_every_byte_value_unpacks_to_its_little_endian_bits():
    packed = torch.arange(256, dtype=torch.uint8)
    bits = unpack_bits(packed, 256 * 8).view(256, 8)
    assert torch.equal(bits, unpack_bits_host(packed, 256 * 8).view(256, 8))
    assert bits[1].tolist() == [True] + [False] * 7 and bits[128].tolist() == [False] * 7 + [True]
    assert torch.equal(pack_bits(bits.reshape(-1)), packed)


def test_without_a_process_group_masks_pass_through():
    masks = random_masks([(4,), (2, 3)], seed=0)
    assert broadcast_masks(masks) is masks
    moved = broadcast_masks(masks, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved, masks))
    assert masks_to(masks, "cpu") == masks  # already there: the same tensors, no copy


# ---------------------------------------------------------------- two real processes (gloo)
def _broadcast_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = random_masks(SHAPES, seed=100 + rank)  # each rank draws its own, as in training
        got = broadcast_masks(mine)
        rank0 = random_masks(SHAPES, seed=100)
        torch.save({"equal_rank0": [torch.equal(g, r) for g, r in zip(got, rank0)],
                    "shapes": [tuple(g.shape) for g in got], "dtypes": [str(g.dtype) for g in got],
                    "differed_before": any(not torch.equal(m, r) for m, r in zip(mine, rank0))},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        # a second broadcast from rank 1, with the results asked for on a given device
        got1 = broadcast_masks(mine, src=1, device="cpu")
        rank1 = random_masks(SHAPES, seed=101)
        assert all(torch.equal(g, r) for g, r in zip(got1, rank1)), f"rank {rank}: src=1 broadcast differs"
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_end_with_rank0_masks(tmp_path):
    world = 2
    mp.spawn(_broadcast_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(res["equal_rank0"]), (rank, res["equal_rank0"])
        assert res["shapes"] == [tuple(s) for s in SHAPES] and set(res["dtypes"]) == {"torch.bool"}
    assert torch.load(tmp_path / "rank1.pt", weights_only=True)["differed_before"]  # so the broadcast did it


# ---------------------------------------------------------------- on a GPU: no host sync
@pytest.mark.gpu
@needs_cuda
def test_cuda_packing_matches_host_and_never_syncs():
    masks = [m.cuda() for m in random_masks(SHAPES, seed=7)]
    flat = torch.cat([m.reshape(-1) for m in masks])
    pack_bits(flat[:8]), unpack_bits(pack_bits(flat[:8]), 8)  # the per-device constant, made once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed = pack_bits(flat)
        unpacked = unpack_bits(packed, flat.numel())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert packed.is_cuda and unpacked.is_cuda
    assert torch.equal(packed.cpu(), pack_bits_host(flat.cpu()))
    assert torch.equal(unpacked.cpu(), flat.cpu())


@pytest.mark.gpu
@needs_cuda
def test_broadcast_of_cuda_masks_under_nccl_stays_on_the_gpu(monkeypatch):
    """broadcast_masks with NCCL's device choice (the collective itself stubbed: one GPU here):
    CUDA masks in, CUDA masks out, and not one synchronizing CUDA call on the way."""
    sent = []
    monkeypatch.setattr(sqdist_dist, "is_distributed", lambda: True)
    monkeypatch.setattr(sqdist_dist.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(sqdist_dist.dist, "broadcast", lambda t, src: sent.append(t))
    masks = [m.cuda() for m in random_masks(SHAPES, seed=8)]
    broadcast_masks(masks)  # warm: the per-device constant
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = broadcast_masks(masks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sent[-1].is_cuda and sent[-1].dtype == torch.uint8
    assert all(o.is_cuda and torch.equal(o, m) for o, m in zip(out, masks))
    host = [m.cpu() for m in masks]  # host masks go up in one copy that does not wait for the GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = broadcast_masks(host, device="cuda")
        moved = masks_to(host, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sent[-1].is_cuda and all(o.is_cuda and torch.equal(o.cpu(), m) for o, m in zip(out, host))
    assert all(o.is_cuda and o.shape == m.shape and torch.equal(o.cpu(), m) for o, m in zip(moved, host))
    back = broadcast_masks(masks, device="cpu")  # asked for on the host: one copy down, which waits
    assert all(not b.is_cuda and torch.equal(b, m.cpu()) for b, m in zip(back, masks))


# ---------------------------------------------------------------- DDP and the activation quantizers' state
def _ddp_activation_state_worker(rank, world, init_file, result_dir):
    """Rank 1 calibrates differently from rank 0 (another batch: signed where rank 0's is unsigned; or
    not at all), then DDP wraps the model and broadcasts rank 0's buffers."""
    from torch import nn

    from sqdist import QuantConfig, SQConfig, calibrate_activations, quantize_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    try:
        for case in ("other batch", "uncalibrated"):
            torch.manual_seed(0)  # the same weights on both ranks
            model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3))
            with torch.no_grad():  # the stem passes its input on: layer 1 sees the calibration batch itself
                model[0].weight.copy_(torch.eye(6))
                model[0].bias.zero_()
            sq = quantize_model(model, QuantConfig("kbit", {"bits": 4, "scale": "lsq"}, sq=SQConfig(ratios=(1.0,)),
                                                   keep_stem_and_classifier=False, activations="lsq",
                                                   activation_params={"bits": 4}))
            quantizers = list(sq.activation_quantizers.values())
            batch = torch.rand(16, 6) if rank == 0 else torch.randn(16, 6) * 3  # rank 1: negative values too
            if rank == 0 or case == "other batch":
                calibrate_activations(model, batch)
            before = [[q._signed, q._calibrated] for q in quantizers]
            ddp = nn.parallel.DistributedDataParallel(model)
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
            record = {"before": before}
            try:
                train_out = ddp(x)
                ddp.eval()
                with torch.no_grad():
                    eval_out = ddp(x)
                record.update(after=[[q._signed, q._calibrated, q.qmin, q.qmax] for q in quantizers],
                              train_out=train_out.detach().tolist(), eval_out=eval_out.tolist())
            except RuntimeError as exc:
                record["error"] = str(exc).splitlines()[0]
            out[case] = record
    finally:
        torch.save(out, os.path.join(result_dir, f"ddp_rank{rank}.pt"))
        dist.destroy_process_group()


def test_ddp_makes_rank0_activation_calibration_every_ranks():
    """Signed/unsigned and calibrated live in buffers, which DDP broadcasts from rank 0 (at construction
    and before every forward); the quantizer reads them from there, so a rank that calibrated on another
    batch, or not at all, quantizes exactly as rank 0 does once DDP wraps the model."""
    import tempfile

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_activation_state_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"ddp_rank{r}.pt"), weights_only=True) for r in range(world)]
    for case in ("other batch", "uncalibrated"):
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["before"] != r1["before"], case  # the ranks really disagreed before DDP
        assert "error" not in r0 and "error" not in r1, (case, r0.get("error"), r1.get("error"))
        assert r1["after"] == r0["after"] and r0["after"][0][:2] == [False, True], case  # rank 0's: unsigned, calibrated
        assert r1["train_out"] == r0["train_out"] and r1["eval_out"] == r0["eval_out"], case
