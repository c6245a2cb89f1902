"""Post-training quantization (GPTQ, AdaRound, round-to-nearest): the algorithm, the walk, the file, the command.

GPTQ is held to a plain reference written here (Optimal Brain Quantization's column loop with
the explicit inverse Hessian downdated after every column: no Cholesky factor, no blocks), the
walk to the output error it must lower against round-to-nearest on the same inputs, grouped and
depthwise convs to a per-group computation from their own unfolded inputs, the centred Hessian
to the Gram matrix of centred inputs, the cached walk to the per-layer walk (and to one forward
of the calibration set), AdaRound to the paper's behaviour (decisions end at 0 or 1, less output
error than RTN), and the command to a real digits run read back by ``sqdist.load_quantized``.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import sqdist
from sqdist import create_quantizer, export_model, load_quantized
from sqdist.export import read_packed
from sqdist.ptq import PTQConfig, gptq_quantize, ptq_model, quantize_weight, row_grid
from sqdist.ptq.adaround import AdaRoundConfig, adaround_codes, beta_at
from sqdist.ptq.calib import InputStatistics, call_counts
from sqdist.ptq.walk import reestimate_batchnorm
from sqdist.ptq.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
DIGITS_NET = {"num_classes": 10, "in_chans": 1, "channels": [4, 8, 16, 32], "stem_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- one layer
def reference_rule(name, w):
    """The per-column rounding on the grid fixed from the original ``w`` (m, n), written out."""
    if name == "kbit":
        _, s = create_quantizer("kbit", bits=3).quantize_codes(w)
        return lambda c: torch.clamp(torch.round(c / s), -3, 3) * s
    if name == "twn":
        t = 0.7 * w.abs().mean(dim=1)
        keep = w.abs() > t[:, None]
        a = (w.abs() * keep).sum(dim=1) / keep.sum(dim=1)
        return lambda c: torch.sign(c) * (c.abs() > t) * a
    a = w.abs().mean(dim=1)
    return lambda c: torch.where(c >= 0, a, -a)


def reference_gptq(w, x, name, damp=0.01, order=None):
    """GPTQ as the OBQ loop: quantize column j, spread its error with the inverse Hessian's row j,
    then remove j from the inverse (rank-1 downdate). Returns the quantized weight."""
    w = w.double().clone()
    h = 2 * x.T @ x
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    rule = reference_rule(name, w.clone())
    q = torch.zeros_like(w)
    for j in (range(w.shape[1]) if order is None else order.tolist()):
        q[:, j] = rule(w[:, j])
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]  # column j itself becomes q[:, j]; done ones get 0 weight
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


@pytest.mark.parametrize("name", ["kbit", "twn", "bwn"])
@pytest.mark.parametrize("block, act_order", [(128, False), (3, False), (4, True)])
def test_gptq_on_one_linear_matches_the_plain_reference(name, block, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    quantizer = create_quantizer(name, **({"bits": 3} if name == "kbit" else {}))
    h = 2 * x.T @ x
    grid = row_grid(quantizer, w)
    codes = gptq_quantize(w, h, grid, damp=0.01, block=block, act_order=act_order)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    expected = reference_gptq(w, x, name, order=order)
    assert torch.allclose(codes * grid.scale[:, None], expected, atol=1e-9)
    rtn, scale = quantizer.quantize_codes(w)
    assert torch.allclose(scale, grid.scale) and not torch.equal(codes, rtn)  # same grid, other codes
    # the point of it: the output error on x is lower than the quantizer applied once
    assert ((x @ (w - expected).T) ** 2).sum() < ((x @ (w - rtn * scale[:, None]).T) ** 2).sum()


def test_identity_hessian_gives_round_to_nearest():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
    for name in ("kbit", "twn", "bwn"):
        q = create_quantizer(name)
        codes, scale = quantize_weight(w, torch.eye(12)[None], q, "gptq")
        rtn_codes, rtn_scale = quantize_weight(w, torch.eye(12)[None], q, "rtn")
        assert torch.equal(codes, rtn_codes) and torch.equal(scale, rtn_scale), name


# ---------------------------------------------------------------- grouped and depthwise convs
class GroupedNet(nn.Module):
    """stem -> grouped conv (2 groups) -> depthwise conv -> 1x1 -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.point = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.depthwise(x))
        x = F.relu(self.point(x))
        return self.fc(x.mean(dim=(2, 3)))


def images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("layer", ["grouped", "depthwise"])
def test_grouped_conv_is_quantized_per_group_on_its_own_inputs(layer):
    torch.manual_seed(0)
    net = GroupedNet().eval()
    conv = getattr(net, layer)
    x = F.relu(net.stem(images()[:][0]))
    if layer == "depthwise":
        x = F.relu(net.grouped(x))
    q = create_quantizer("kbit", bits=3)
    groups, per_in, per_out = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    grams = []
    for g in range(groups):  # each group's unfolded inputs, from its own input channels
        cols = F.unfold(x[:, g * per_in:(g + 1) * per_in], 3, padding=1).transpose(1, 2).reshape(-1, per_in * 9)
        grams.append(cols.T.double() @ cols.double())
    codes, scale = quantize_weight(conv.weight, torch.stack(grams), q, "gptq")
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    assert torch.equal(scale, q.quantize_codes(w)[1])
    for g in range(groups):
        rows = slice(g * per_out, (g + 1) * per_out)
        alone, _ = quantize_weight(w[rows], grams[g][None], q, "gptq")  # as if the group were a layer of its own
        assert torch.equal(alone, codes[rows]), g
    rtn, _ = quantize_weight(conv.weight, torch.stack(grams), q, "rtn")
    assert not torch.equal(rtn, codes)  # the Hessians changed the codes


def test_walk_lowers_every_layers_output_error_against_round_to_nearest():
    torch.manual_seed(0)
    data = images()
    net = GroupedNet().eval()
    fp = {k: v.clone() for k, v in net.state_dict().items()}
    records = ptq_model(net, data, PTQConfig(params={"bits": 3}, calib_images=96), device="cpu", batch_size=32)
    assert [r["layer"] for r in records] == ["grouped", "depthwise", "point"]  # stem and classifier stay fp
    assert [r["groups"] for r in records] == [2, 8, 1]
    for r in records:
        assert 0 < r["output_error"] < r["output_error_rtn"], r
    # the quantized layers compute with scale * codes (each row on its own scale's grid)
    for name in ("grouped", "depthwise", "point"):
        layer = getattr(net, name)
        w = layer.quantizer(layer.weight).reshape(layer.out_channels, -1)
        codes = w / layer.quantizer.scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.round().abs().max() <= 3
    assert torch.equal(net.stem.weight, fp["stem.weight"]) and torch.equal(net.fc.weight, fp["fc.weight"])


# ---------------------------------------------------------------- the objective: BN re-estimated after PTQ
def test_centred_hessian_is_the_gram_of_the_centred_unfolded_inputs():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.rand(5, 4, 6, 6, generator=g) + 1.0
    stats = InputStatistics(conv)
    stats.add(x[:2])
    stats.add(x[2:])   # chunks accumulate
    for g_ in range(2):
        cols = F.unfold(x[:, 2 * g_:2 * g_ + 2], 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
        assert torch.allclose(stats.hessian(False)[g_], cols.T @ cols)
        centred = cols - cols.mean(0)
        # float32 products summed in float64: exact to float32 rounding of the uncentred Gram
        tolerance = 1e-5 * float((cols.T @ cols).abs().max())
        assert torch.allclose(stats.hessian(True)[g_], centred.T @ centred, atol=tolerance)
    assert int(stats.rows) == 5 * 36


class BNNet(nn.Module):
    """stem -> conv -> BN -> ReLU -> conv (no BN) -> ReLU -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.plain = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.plain(x)).mean(dim=(2, 3)))


def test_only_layers_that_feed_a_batchnorm_get_the_centred_hessian():
    torch.manual_seed(0)
    net = BNNet().eval()
    counts, feeds = call_counts(net, ["conv", "plain"], images(8)[:][0])
    assert counts == {"conv": 1, "plain": 1} and feeds == {"conv"}
    records = ptq_model(net, images(), PTQConfig(params={"bits": 2}, calib_images=96), device="cpu", batch_size=32)
    assert {r["layer"]: r["centred"] for r in records} == {"conv": True, "plain": False}
    plain = ptq_model(BNNet().eval(), images(), PTQConfig(params={"bits": 2}, calib_images=96, centred=False),
                      device="cpu", batch_size=32)
    assert not any(r["centred"] for r in plain)


def test_centred_gptq_has_less_error_left_after_the_mean_is_removed():
    """What BN re-estimation leaves of a layer's output error is the centred part: GPTQ on the
    centred Hessian leaves less of it than GPTQ on X^T X, whose compensation goes to the mean."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64)
    x = torch.relu(torch.randn(2000, 32, generator=g, dtype=torch.float64) @ mix)   # correlated, post-ReLU: mean > 0
    xc = x - x.mean(0)
    q = create_quantizer("kbit", bits=2)
    grid = row_grid(q, w)
    left = {}
    for name, h in (("plain", x.T @ x), ("centred", xc.T @ xc)):
        codes = gptq_quantize(w, 2 * h, grid)
        left[name] = ((xc @ (w - codes * grid.scale[:, None]).T) ** 2).sum()
    rtn, scale = q.quantize_codes(w)
    left["rtn"] = ((xc @ (w - rtn * scale[:, None]).T) ** 2).sum()
    assert left["centred"] < left["plain"] and left["centred"] < left["rtn"], left


def test_walk_bn_sets_each_batchnorm_to_its_calibration_inputs_statistics():
    torch.manual_seed(0)
    net = BNNet().eval()
    data = images()
    records = ptq_model(net, data, PTQConfig(params={"bits": 3}, calib_images=96), device="cpu", batch_size=32)
    assert records[0]["walk"] == "cached" and records[0]["walk_bn"]
    x = data[:][0]   # 96 images: the calibration set is all of them
    with torch.no_grad():
        inputs = net.conv(F.relu(net.stem(x)))   # conv holds its quantized weight already
    ref = nn.BatchNorm2d(8, momentum=None).train()
    ref(inputs)
    assert torch.allclose(net.bn.running_mean, ref.running_mean, atol=1e-5)
    assert torch.allclose(net.bn.running_var, ref.running_var, rtol=1e-4)
    single = nn.BatchNorm2d(8)
    reestimate_batchnorm(single, [inputs[:50], inputs[50:]])   # chunks add up
    assert torch.allclose(single.running_var, ref.running_var, rtol=1e-4)


# ---------------------------------------------------------------- the walk's cost, layers that run more than once
def test_cached_walk_runs_the_network_once_and_decides_what_the_per_layer_walk_decides():
    data = images(64)
    nets, stem_calls = {}, {}
    for cache in (True, False):
        torch.manual_seed(0)
        net = timm.create_model("resnet10t", **DIGITS_NET).eval()
        calls = [0]
        net.conv1[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        records = ptq_model(net, data, PTQConfig(params={"bits": 3}, calib_images=64, cache=cache, walk_bn=False),
                            device="cpu", batch_size=16)
        nets[cache], stem_calls[cache] = net, calls[0]
    assert len(records) == 14
    # 4 chunks: the cached walk forwards each once (+ a few passes on one chunk to find the layers);
    # the per-layer walk forwards them again for every layer
    setup = stem_calls[True] - 4
    assert 0 < setup <= 3 and stem_calls[False] == 14 * 4 + setup
    for (name, a), b in zip(nets[True].named_modules(), nets[False].modules()):
        if hasattr(a, "quantizer") and hasattr(a.quantizer, "codes"):
            assert torch.equal(a.quantizer.codes, b.quantizer.codes), name


class SharedConvNet(nn.Module):
    """One conv applied twice per forward (timm has blocks that reuse a layer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_layer_run_twice_per_forward_is_quantized_on_both_calls_inputs():
    torch.manual_seed(0)
    net = SharedConvNet().eval()
    data = images(64)
    with torch.no_grad():
        first = F.relu(net.stem(data[:][0]))
        second = F.relu(net.shared(first))
    stats = InputStatistics(net.shared)
    stats.add(first)
    stats.add(second)
    expected, scale = quantize_weight(net.shared.weight, stats.hessian(False), create_quantizer("kbit", bits=3), "gptq",
                                      act_order=PTQConfig().act_order)
    with pytest.warns(UserWarning, match=r"run more than once per forward: shared \(2 calls\); walking layer by layer"):
        records = ptq_model(net, data, PTQConfig(params={"bits": 3}, calib_images=64), device="cpu", batch_size=32)
    assert [r["layer"] for r in records] == ["shared"] and not records[0]["centred"]
    assert torch.allclose(net.shared.quantizer.codes, expected) and torch.allclose(net.shared.quantizer.scale, scale)


class WindowNet(nn.Module):
    """A conv on windows folded into the batch (as efficientvit's attention does), behind Python
    control flow on a value, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.local = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if float(x.mean()) >= 0:   # always true; untraceable
            b, c, h, w = x.shape
            windows = x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, c, h // 2, w // 2)
            x = F.relu(self.local(windows)).reshape(b, 4, c, h // 2, w // 2).mean(dim=1)
        return self.fc(x.mean(dim=(2, 3)))


def test_layer_on_windows_folded_into_the_batch_and_an_untraceable_network():
    """Before: 'layer local saw the inputs of 256 calibration images, expected 64'."""
    results = {}
    for cache in (True, False):
        torch.manual_seed(0)
        net = WindowNet().eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = ptq_model(net, images(64), PTQConfig(params={"bits": 3}, calib_images=64, cache=cache),
                                device="cpu", batch_size=32)
        said = [str(w.message) for w in caught if "walking layer by layer" in str(w.message)]
        assert len(said) == cache and all("cannot trace WindowNet" in m for m in said), said
        assert [r["layer"] for r in records] == ["local"] and 0 < records[0]["output_error"] < 1
        assert records[0]["walk"] == "per-layer" and not records[0]["walk_bn"]
        results[cache] = net.local.quantizer.codes
    assert torch.equal(results[True], results[False])   # the untraceable network fell back to the per-layer walk


# ---------------------------------------------------------------- AdaRound
def test_adaround_schedule_warms_up_then_anneals_beta_from_20_to_2():
    config = AdaRoundConfig(iters=100)
    assert beta_at(0, config) is None and beta_at(19, config) is None
    assert beta_at(20, config) == 20.0 and abs(beta_at(99, config) - 2.0) < 0.01
    betas = [beta_at(i, config) for i in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:]))


@pytest.mark.parametrize("name", ["kbit", "twn"])
def test_adaround_decisions_become_0_or_1_with_less_output_error_than_rtn(name):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 48, generator=g, dtype=torch.float64) * 0.1
    x = torch.relu(torch.randn(3000, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g,
                                                                                         dtype=torch.float64))
    x = (x - x.mean(0)) / x.std(0)   # what a layer after BN sees, roughly
    h = x.T @ x
    q = create_quantizer(name, **({"bits": 3} if name == "kbit" else {}))
    grid = row_grid(q, w)
    codes, info = adaround_codes(w, h, grid.scale, grid.levels, 3000.0)   # 1000 steps, the default
    soft = info["h"]
    assert bool(((soft == 0) | (soft == 1)).all())   # every rounding decided, none left in between
    rtn, _ = q.quantize_codes(w)
    assert torch.equal(codes.abs().clamp(max=grid.levels), codes.abs()) and not torch.equal(codes, rtn)
    floor = torch.floor(w / grid.scale[:, None])
    assert bool(((codes == floor) | (codes == floor + 1) | (codes.abs() == grid.levels)).all())  # down or up

    def error(c):
        d = w - c * grid.scale[:, None]
        return float(((d @ h) * d).sum())

    assert error(codes) < error(rtn)


def test_adaround_walk_keeps_every_layer_at_or_below_rtn_error():
    torch.manual_seed(0)
    net = BNNet().eval()
    records = ptq_model(net, images(), PTQConfig(params={"bits": 2}, method="adaround", calib_images=96,
                                                 adaround_iters=300), device="cpu", batch_size=32)
    assert [r["layer"] for r in records] == ["conv", "plain"]
    for r in records:
        assert 0 < r["output_error"] <= r["output_error_rtn"], r
    codes = net.conv.quantizer.codes
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 1
    with pytest.raises(ValueError, match="allowed: kbit, twn"):
        ptq_model(BNNet().eval(), images(), PTQConfig(quantizer="bwn", params={}, method="adaround"), device="cpu",
                  batch_size=32)


# ---------------------------------------------------------------- the file
@pytest.mark.parametrize("quantizer, params", [("kbit", {"bits": 4}), ("twn", {})])
def test_packed_file_reloads_with_identical_logits(tmp_path, quantizer, params):
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", **DIGITS_NET).eval()
    data = images(64)
    ptq_model(net, data, PTQConfig(quantizer=quantizer, params=params, calib_images=64), device="cpu", batch_size=32)
    net.eval()
    info = export_model(net, tmp_path / "out.safetensors", model_name="resnet10t", model_kwargs=DIGITS_NET)
    assert info["quantizer"] == quantizer and info["layers"] == 14
    x = data[:16][0]
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "out.safetensors")(x), net(x))


# ---------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits FP run trained for one epoch by the training command."""
    run = tmp_path_factory.mktemp("ptq") / "fp"
    proc = subprocess.run([sys.executable, "-m", "sqdist.train", os.path.join(ROOT, "recipes", "digits_fp.yaml"),
                           "train.epochs=1", f"run.dir={run}", "train.progress=false", "track.wandb=false"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_command_writes_files_load_quantized_reads_and_gptq_beats_rtn(digits_run, tmp_path, capsys):
    results = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.safetensors"
        assert main([str(digits_run), str(out), "--method", method, "--bits", "3", "--calib-images", "256",
                     "--json"]) == 0
        results[method] = json.loads(capsys.readouterr().out)
        model = sqdist.load_quantized(out)
        assert isinstance(model.layer1[0].conv1, nn.Conv2d)
    rtn, gptq = results["rtn"], results["gptq"]
    for r, method in ((rtn, "rtn"), (gptq, "gptq")):
        assert r["method"] == method and r["bits"] == 3 and r["reload_max_abs_diff"] == 0.0
        assert len(r["layer_output_error"]) == 14 and 0 <= r["top1"] <= 100
    assert sum(gptq["layer_output_error"].values()) < sum(rtn["layer_output_error"].values())
    # what the file holds: the same top-1 when evaluated from the file
    from sqdist.config import load_recipe
    from sqdist.data import build_datasets
    from sqdist.train import evaluate

    recipe = load_recipe(str(digits_run / "config.yaml"), [])
    _, test_set = build_datasets(recipe)
    assert evaluate(load_quantized(tmp_path / "gptq.safetensors"), test_set, recipe, "cpu", 0, 1) == gptq["top1"]


def test_command_adaround_writes_a_file_that_reloads(digits_run, tmp_path, capsys):
    out = tmp_path / "ada.safetensors"
    assert main([str(digits_run), str(out), "--method", "adaround", "--bits", "3", "--calib-images", "128",
                 "--adaround-iters", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "adaround" and result["bits"] == 3 and result["reload_max_abs_diff"] == 0.0
    assert result["settings"]["adaround_iters"] == 200 and result["settings"]["walk"] == "cached"
    for layer, error in result["layer_output_error"].items():
        assert error <= result["layer_output_error_rtn"][layer] + 1e-9, layer


def test_command_keep_fp_bits_and_onnx(digits_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "twn.safetensors"
    assert main([str(digits_run), str(out), "--quantizer", "twn", "--calib-images", "128", "--keep-fp-bits", "8",
                 "--act-order"]) == 0
    assert "gptq twn 2 bit(s)" in capsys.readouterr().out
    _, meta = read_packed(out)
    assert meta["quantizer"]["name"] == "twn" and len(meta["fp_layers"]) == 2 and meta["sq"]["ptq"]["act_order"]
    assert main([str(digits_run), str(tmp_path / "k.onnx"), "--bits", "8", "--calib-images", "128"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out and (tmp_path / "k.onnx").exists()


@pytest.mark.parametrize("args, expected", [
    (["--quantizer", "slb"], "--quantizer='slb'"),
    (["--quantizer", "nope"], "--quantizer='nope'; allowed: kbit, twn, bwn"),
    (["--bits", "9"], "--bits=9 with --quantizer kbit; allowed: an integer from 2 to 8"),
    (["--quantizer", "twn", "--bits", "3"], "--bits=3 with --quantizer twn; allowed: 2"),
    (["--method", "awq"], "--method='awq'; allowed: gptq, rtn, adaround"),
    (["--method", "adaround", "--adaround-iters", "0"], "--adaround-iters=0; allowed: an integer >= 1"),
    (["--method", "adaround", "--adaround-reg", "-1"], "--adaround-reg=-1.0; allowed: a number > 0"),
    (["--method", "adaround", "--quantizer", "bwn"], "--method adaround with --quantizer bwn"),
    (["--damp", "0"], "--damp=0.0; allowed: a number > 0"),
    (["--hessian", "diag"], "--hessian='diag'; allowed: centred, plain"),
    (["missing run"], "no such run or checkpoint folder"),
    (["low-bit run"], "quant.enabled is true"),
])
def test_bad_input_gets_one_line_and_exit_2(digits_run, tmp_path, capsys, args, expected):
    source = digits_run
    if args == ["missing run"]:
        source, args = tmp_path / "nothing", []
    elif args == ["low-bit run"]:
        source, args = tmp_path / "lowbit", []
        (source / "final").mkdir(parents=True)
        (source / "final" / "model.safetensors").write_bytes((digits_run / "final" / "model.safetensors").read_bytes())
        meta = json.loads((digits_run / "final" / "meta.json").read_text())
        meta["quant"]["enabled"] = True
        (source / "final" / "meta.json").write_text(json.dumps(meta))
    assert main([str(source), str(tmp_path / "out.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sqdist.ptq: error: ") and expected in err, err
    assert not (tmp_path / "out.safetensors").exists()



@pytest.mark.slow
def test_two_processes_hold_rank_0s_network_and_one_process_codes(digits_run, tmp_path, capsys, launch_two):
    """Two gloo processes quantize a digits run (Gram matrices summed over the ranks, rank 0
    decides the codes and broadcasts them, BN statistics averaged): every rank holds the same
    network, and its quantized weights are the ones one process computes on the same images."""
    flags = ["--bits", "3", "--calib-images", "256", "--no-progress", "data.batch_size=32"]
    dump, two = tmp_path / "dump", tmp_path / "two.safetensors"
    proc = launch_two("ptq_worker.py", dump, digits_run, two, *flags, env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("reload: max |logit difference| 0.0") == 1, proc.stdout  # rank 0 writes
    from safetensors.torch import load_file

    a, b = (load_file(f"{dump}.rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = tmp_path / "one.safetensors"
    assert main([str(digits_run), str(one), *flags]) == 0
    capsys.readouterr()
    (state_one, meta), (state_two, _) = read_packed(one), read_packed(two)
    for name in meta["layers"]:
        assert torch.equal(state_one[f"{name}.weight"], state_two[f"{name}.weight"]), name
