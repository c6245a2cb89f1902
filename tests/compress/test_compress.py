"""Product-quantization compression (And the Bit Goes Down): the EM, the layers, the file, the CLI.

The EM is held to its definition (objective never increases; with identity inputs it is
k-means), the layers to an independent forward (output error, logits of the reloaded
file), and the command to real runs: one process, then two gloo processes that must hold
the same codebooks as the one.
"""
import copy
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from sqdist.compress import (CompressConfig, CompressError, block_size, codebook_size, compress_layer_, compress_model,
                             compressed_layers, finetune, fit_codebook, load_compressed, load_pq_model, pack_indices,
                             read_compressed, round_codebooks_, save_compressed, unpack_indices)
from sqdist.compress.cli import main
from sqdist.compress.layers import input_statistics, is_compressed, output_error
from sqdist.compress.pq import objective, refill_empty
from sqdist.compress.walk import distill_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
DIGITS_NET = {"num_classes": 10, "in_chans": 1, "channels": [4, 8, 16, 32], "stem_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small convolutions run faster on one thread


def grams_of(rows):
    """Per-image Gram matrices (S, d, d) of unfolded input rows (S, R, d)."""
    return torch.einsum("sri,srj->sij", rows, rows)


# ---------------------------------------------------------------- EM
@pytest.mark.parametrize("rank", [9, 5])  # full column rank, and inputs that never use 4 of the 9 columns
def test_em_objective_never_increases(rank):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 9, generator=g, dtype=torch.float64)
    rows = torch.randn(8, 40, 9, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 9, dtype=torch.float64)
    rows[..., rank:] = 0
    grams = grams_of(rows)
    fit = fit_codebook(w, grams, 32, 25, generator=g, sample=1.0)
    obj = fit.objective
    assert len(obj) == 25
    assert all(b <= a * (1 + 1e-12) for a, b in zip(obj, obj[1:])), obj
    assert obj[-1] < 0.9 * obj[0]
    full = grams.sum(0)  # the reported value is the objective of the returned codebook
    assert objective(w, fit.codebook, fit.assignments, full) / float(((w @ full) * w).sum()) == pytest.approx(obj[-1])


def test_identity_inputs_make_it_plain_kmeans():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 4, generator=g, dtype=torch.float64) * 4
    w = (centers[torch.arange(300) % 6] + torch.randn(300, 4, generator=g, dtype=torch.float64))
    init = w[torch.randperm(300, generator=g)[:6]].clone()

    c, a = init.clone(), None  # Lloyd's algorithm, written out
    for _ in range(8):
        a = torch.cdist(w, c).argmin(dim=1)
        c = torch.stack([w[a == k].mean(0) for k in range(6)])
    fit = fit_codebook(w, torch.eye(4, dtype=torch.float64), 6, 8, generator=g, init=init)
    assert torch.equal(fit.assignments, a)
    assert torch.allclose(fit.codebook, c, rtol=0, atol=1e-12)
    # inputs that stretch one coordinate change the metric, and so the clustering
    stretched = fit_codebook(w, torch.diag(torch.tensor([100.0, 1, 1, 1], dtype=torch.float64)), 6, 8,
                             generator=g, init=init)
    assert not torch.equal(stretched.assignments, a)


def test_empty_clusters_are_refilled():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 4, generator=g, dtype=torch.float64)
    init = torch.cat([w[:3], torch.full((2, 4), 100.0, dtype=torch.float64)])  # 2 centroids far from everything
    fit = fit_codebook(w, torch.eye(4, dtype=torch.float64), 5, 6, generator=g, init=init, sample=1.0)
    assert fit.refilled >= 2
    assert torch.bincount(fit.assignments, minlength=5).min() > 0
    assert all(b <= a * (1 + 1e-12) for a, b in zip(fit.objective, fit.objective[1:]))

    # one refill: half of the most populated cluster moves to the copy, the objective is unchanged
    codebook = torch.cat([w[:2], torch.full((1, 4), 100.0, dtype=torch.float64)])
    assignments = torch.cdist(w, codebook).argmin(dim=1)
    big = int(torch.bincount(assignments, minlength=3).argmax())
    members = int((assignments == big).sum())
    before = objective(w, codebook, assignments, torch.eye(4, dtype=torch.float64))
    assert refill_empty(w, codebook, assignments, torch.eye(4, dtype=torch.float64), g) == 1
    assert torch.bincount(assignments, minlength=3).tolist()[2] == members - members // 2
    assert torch.equal(codebook[2], codebook[big])
    assert objective(w, codebook, assignments, torch.eye(4, dtype=torch.float64)) == pytest.approx(before, rel=1e-12)


def test_block_and_codebook_rules():
    assert [block_size((256, 128, 3, 3), b) for b in ("small", "large")] == [9, 18]
    assert [block_size((256, 64, 1, 1), b) for b in ("small", "large")] == [4, 8]
    assert [block_size((1000, 2048), b, classifier=True) for b in ("small", "large")] == [4, 4]
    assert block_size((16, 1, 3, 3), "large") == 9  # depthwise: 18 does not divide a 9-value row
    assert block_size((64, 1, 5, 5), "large") == 25
    assert codebook_size(10**6, 256) == 256
    assert codebook_size(1024, 256) == 128  # largest power of two strictly below 1024 / 4
    assert codebook_size(8, 256) == 1
    with pytest.raises(ValueError, match="allowed: small, large"):
        block_size((8, 8, 3, 3), "medium")
    with pytest.raises(ValueError, match="allowed: 1 to 10, the number of subvectors"):
        fit_codebook(torch.randn(10, 4), torch.eye(4), 11, 1, generator=torch.Generator())


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 16])
def test_index_packing_round_trip(bits):
    idx = torch.randint(1 << bits, (1001,))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_indices(packed, bits, 1001), idx)


# ---------------------------------------------------------------- layers
class Mixed(nn.Module):
    """Layer kinds whose im2col differs: stride, groups, 'same' with an even kernel, reflect, tokens."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.same = nn.Conv2d(8, 6, 4, padding="same")
        self.reflect = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.tokens = nn.Linear(4, 5)

    def forward(self, x):
        x = self.reflect(self.same(self.depthwise(self.strided(x))))
        return self.tokens(x.flatten(2).transpose(1, 2))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_output_error_matches_the_layer_forward():
    model = Mixed().eval()
    x = torch.randn(6, 3, 9, 9)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n, m in model.named_children()]
    model(x)
    for h in hooks:
        h.remove()
    for name, layer in model.named_children():
        w = layer.weight.detach()
        approx = w + 0.1 * torch.randn_like(w)
        d = block_size(tuple(w.shape), "small")
        block_grams, group_grams, seen = input_statistics(model, layer, [x[:4], x[4:]], d, "cpu")
        assert seen == 6 and block_grams.shape == (6, d, d)
        out = lambda weight: (layer._conv_forward(inputs[name], weight, None) if isinstance(layer, nn.Conv2d)
                              else F.linear(inputs[name], weight))
        with torch.no_grad():
            direct = float((out(w) - out(approx)).pow(2).sum() / out(w).pow(2).sum())
        assert output_error(w, approx, group_grams) == pytest.approx(direct, rel=1e-4), name


# ---------------------------------------------------------------- models, file
TINY = CompressConfig(codebook=32, codebook_fc=32, calib_images=16, em_iters=3, em_sample=1.0, layer_steps=1,
                      finetune_steps=2, lr=0.01)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("resnet10t", DIGITS_NET, (1, 8, 8)),
    ("mobilenetv3_small_050", {"num_classes": 10}, (3, 32, 32)),
    ("test_vit", {"num_classes": 10, "img_size": 32}, (3, 32, 32)),
])
def test_compressed_model_reloads_with_identical_logits(tmp_path, name, kwargs, shape):
    model = timm.create_model(name, **kwargs)
    data = TensorDataset(torch.randn(32, *shape), torch.randint(10, (32,)))
    teacher = copy.deepcopy(model).eval()
    records = compress_model(model, data, TINY, device="cpu", batch_size=8, teacher=teacher)
    layers = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    stem = teacher.pretrained_cfg["first_conv"]
    assert sorted(r["layer"] for r in records) == sorted(n for n in layers if not n.startswith(stem))
    assert set(compressed_layers(model)) == {r["layer"] for r in records}
    assert all(0 <= r["recon_error/em"] < 10 and r["em/objective_last"] <= r["em/objective_first"] for r in records)
    finetune(model, teacher, data, TINY, device="cpu", batch_size=8)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model.eval()(x)
    path = tmp_path / "model.safetensors"
    info = save_compressed(model, path, model_name=name, model_kwargs=kwargs)
    assert info["accounting"]["ratio"] > 1.5
    plain = load_compressed(path)
    assert not any(is_compressed(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
        assert torch.equal(load_pq_model(path)(x), expected)  # the form fine-tuning resumes from


def test_fine_tuning_trains_codebooks_and_the_rest_but_keeps_assignments():
    model = timm.create_model("resnet10t", **DIGITS_NET)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(10, (32,)))
    teacher = copy.deepcopy(model).eval()
    compress_model(model, data, CompressConfig(calib_images=16, em_iters=2, layer_steps=0), device="cpu",
                   batch_size=8, teacher=teacher)
    x = data.tensors[0]

    def kl():
        with torch.no_grad():
            return float(distill_loss(model.eval()(x), teacher(x)))

    before = {n: (m.codebook.detach().clone(), m.indices.clone()) for n, m in compressed_layers(model).items()}
    stem, kl_before = model.conv1[0].weight.detach().clone(), kl()
    finetune(model, teacher, data, CompressConfig(finetune_steps=5, lr=0.05), device="cpu", batch_size=8)
    after = compressed_layers(model)
    assert all(torch.equal(after[n].indices, i) for n, (_, i) in before.items())
    assert not torch.equal(after["fc"].codebook, before["fc"][0])
    assert not torch.equal(model.conv1[0].weight, stem)  # the uncompressed stem trains too
    assert all(torch.equal(m.codebook, m.codebook.half().float()) for m in after.values())  # what the file holds
    assert kl() < 0.8 * kl_before


def test_corrupted_file_is_refused(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3))
    compress_layer_(model[1], torch.randn(4, 9), torch.randint(4, (8 * 4,)))
    round_codebooks_(model)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, model_name="none")
    _, layers, meta = read_compressed(path)
    assert torch.equal(layers["1"][1], model[1].indices) and meta["layers"]["1"]["bits"] == 2
    assert main(["--check", str(path)]) == 0 and "ok, none with 1 compressed layers" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CompressError, match="CRC32"):
        read_compressed(path)
    assert main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fails its CRC32 check" in err


# ---------------------------------------------------------------- the command
@pytest.fixture
def fp_run(tmp_path):
    """A finished full-precision digits run (random weights: compression does not care)."""
    from sqdist.train.checkpoint import save_state_dict
    from sqdist.config import dump_recipe, load_recipe
    from sqdist.train import build_model, model_meta

    run = tmp_path / "fp"
    recipe = load_recipe(os.path.join(ROOT, "recipes", "digits_fp.yaml"), [f"run.dir={run}"])
    torch.manual_seed(0)
    model, _ = build_model(recipe)
    (run / "final").mkdir(parents=True)
    dump_recipe(recipe, str(run / "config.yaml"))
    save_state_dict(model.state_dict(), str(run / "final" / "model.safetensors"))
    (run / "final" / "meta.json").write_text(json.dumps(model_meta(recipe, None)))
    return run


@pytest.mark.parametrize("case, expected", [
    ("no model", "model.safetensors: not found"),
    ("K too large", "--codebook=5000 is above the subvector count of every layer (largest: layer4.0.conv2 with 1024"),
    ("unknown blocks", "--blocks='medium'; allowed: small, large"),
    ("low-bit run", "quant.enabled is true"),
])
def test_bad_input_gets_one_line_and_exit_2(fp_run, tmp_path, capsys, case, expected):
    args = [str(fp_run), str(tmp_path / "out.safetensors")]
    if case == "no model":
        (fp_run / "final" / "model.safetensors").unlink()
    elif case == "K too large":
        args += ["--codebook", "5000"]
    elif case == "unknown blocks":
        args += ["--blocks", "medium"]
    else:
        meta = json.loads((fp_run / "final" / "meta.json").read_text())
        meta["quant"]["enabled"] = True
        (fp_run / "final" / "meta.json").write_text(json.dumps(meta))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sqdist.compress: error: ") and expected in err, err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_two_processes_hold_one_process_codebooks_and_resume(fp_run, tmp_path, launch_two):
    """Two gloo processes compress a digits run (rank 0 decides, then broadcasts), then resume
    fine-tuning from the written file; every rank must hold rank 0's network at every stage,
    and rank 0's codebooks must be those one process fits with the same seed."""
    flags = ["--em-iters", "4", "--calib-images", "192", "--layer-steps", "0", "--no-progress",
             "data.batch_size=32", "train.bn_recalibrate=2"]
    dump, two = tmp_path / "dump", tmp_path / "two.safetensors"
    proc = launch_two("compress_worker.py", dump, fp_run, two, tmp_path / "resumed.safetensors", *flags,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("reload: max |logit difference| 0.0e+00") == 2, proc.stdout  # checked by the command
    state = {(step, stage, r): load_file(f"{dump}.{step}.{stage}.rank{r}.safetensors")
             for step in ("compress", "resume") for stage in ("compressed", "final") for r in (0, 1)}
    for step in ("compress", "resume"):
        for stage in ("compressed", "final"):
            a, b = state[(step, stage, 0)], state[(step, stage, 1)]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, stage)
    _, layers, _ = read_compressed(two)
    resumed = state[("resume", "final", 0)]  # fine-tuning moved the codebooks, not the assignments
    assert all(torch.equal(resumed[f"{n}.indices"], i) for n, (_, i) in layers.items())
    assert any(not torch.equal(resumed[f"{n}.codebook"], c) for n, (c, _) in layers.items())
    _, _, meta = read_compressed(tmp_path / "resumed.safetensors")
    assert meta["compress"]["resumed_from"] == str(two) and meta["compress"]["finetune_steps_total"] == 2
    log = [json.loads(line) for line in (tmp_path / "two-compress" / "metrics.jsonl").read_text().splitlines()]
    per_layer = [r for r in log if "layer" in r]
    assert len(per_layer) == 15 and all(0 <= r["recon_error/em"] < 2 for r in per_layer)

    # one process (this one), same seed and settings: the codebooks and assignments rank 0 decided
    from sqdist.config import load_recipe
    from sqdist.data import build_datasets

    recipe = load_recipe(str(fp_run / "config.yaml"), ["data.batch_size=32"])
    model = timm.create_model("resnet10t", **recipe["model"]["kwargs"])
    model.load_state_dict(load_file(str(fp_run / "final" / "model.safetensors")))
    compress_model(model, build_datasets(recipe)[0], CompressConfig(em_iters=4, calib_images=192, layer_steps=0),
                   device="cpu", batch_size=32)
    one = compressed_layers(model)
    assert list(one) == list(layers)
    two_state = state[("compress", "compressed", 0)]
    for name, m in one.items():
        assert torch.equal(two_state[f"{name}.indices"], m.indices), name
        assert torch.equal(two_state[f"{name}.codebook"], m.codebook.detach()), name
