"""SLB plugin (plugins/sqdist-slb): levels, temperature schedule, expectation vs argmax,
logits that train while the layer weight stays frozen, SQ and memory refusals, export."""
import math
import os

import pytest
import timm
import torch
from torch import nn

import sqdist
from sqdist import QuantConfig, SQConfig, create_quantizer, load_quantized, quantize_model
from sqdist.config import RecipeError, load_recipe
from sqdist.export import export_model

sqdist_slb = pytest.importorskip("sqdist_slb")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # plugins/<p>/tests/


def test_registered_through_the_entry_point():
    assert "slb" in sqdist.list_quantizers()
    assert type(create_quantizer("slb")).__module__ == "sqdist_slb"


@pytest.mark.parametrize("bits, levels, codes", [
    (1, [-1.0, 1.0], [-1, 1]),
    (2, [-1.0, -1 / 3, 1 / 3, 1.0], [-3, -1, 1, 3]),
    (3, [(2 * j - 7) / 7 for j in range(8)], [-7, -5, -3, -1, 1, 3, 5, 7]),
])
def test_levels_and_their_integer_codes(bits, levels, codes):
    q = create_quantizer("slb", bits=bits)
    assert torch.allclose(q.levels, torch.tensor(levels))
    assert q.code_levels() == codes
    assert q.bits == bits


def test_temperature_schedule_values():
    # 10 epochs of 10 steps, golden-stick defaults: start = int(10 * 0.2) = 2, end = int(10 * 0.6) = 6
    def t(step):
        return sqdist_slb.temperature(step, 100, 10)

    assert t(0) == (1.0, False) and t(19) == (1.0, False)  # epochs 1-2 (1-based): t0
    assert t(20)[0] == pytest.approx(1.2) and t(39)[0] == pytest.approx(1.2 ** 2)
    assert t(49) == (pytest.approx(1.2 ** 3), False)
    assert t(50) == (pytest.approx(1.2 ** 4), True)  # epoch 6: the last increase, argmax from here on
    assert t(99) == (pytest.approx(1.2 ** 4), True)
    # the authors' README settings: factor 1.05, start 0.3, end 0.9 of 100 epochs
    assert sqdist_slb.temperature(50 * 7, 100 * 7, 7, 1.0, 0.3, 0.9, 1.05)[0] == pytest.approx(1.05 ** 21)
    q = create_quantizer("slb", t0=2.0, factor=1.5)
    q.set_progress(35, 100, 10)  # epoch 4: two increases past start
    assert (q.temperature, q.hard) == (pytest.approx(2.0 * 1.5 ** 2), False)
    # BN re-estimated after each epoch past t_start (0-based epoch 2 = the third)
    assert [q.recalibrate_bn_after_epoch(e) for e in range(4)] == [False, False, True, True]


def weight(shape=(6, 3, 3, 3), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [1, 2])
def test_weight_start_logits_commit_to_the_nearest_level_of_the_weight(bits):
    w = weight()
    q = create_quantizer("slb", bits=bits, init="weight")
    q.calibrate(w)
    assert q.logits.shape == (*w.shape, 2 ** bits)
    w2 = w.reshape(6, -1)
    s = w2.abs().mean(1) if bits == 1 else w2.abs().amax(1)
    x = (w2 / s[:, None]).clamp(-1, 1)
    nearest = q.levels[(x[..., None] - q.levels).abs().argmin(-1)]
    assert torch.allclose(q.quantize(w2)[0], nearest, atol=1e-6)


def test_training_is_the_expectation_eval_and_hard_phase_the_argmax():
    w = weight()
    w2 = w.reshape(6, -1)
    q = create_quantizer("slb", bits=2)
    q.calibrate(w)
    q.set_progress(30, 100, 10)  # T = 1.2^2
    q.train()
    soft = q(w)
    p = torch.softmax(q.temperature * q.logits, -1)
    assert torch.allclose(soft, (p * q.levels).sum(-1), atol=1e-6)
    soft.sum().backward()
    assert q.logits.grad.abs().sum() > 0  # an exact expectation: every logit has a gradient
    argmax = q.levels[q.logits.argmax(-1)]
    q.eval()
    assert torch.equal(q(w), argmax)  # eval: argmax, even with gradients enabled
    q.train()
    q.set_progress(60, 100, 10)  # past t_end: argmax in training too, logits kept at zero gradient
    q.logits.grad = None
    hard = q(w)
    assert q.hard and torch.equal(hard, argmax)
    hard.sum().backward()
    assert q.logits.grad is not None and q.logits.grad.abs().sum() == 0
    codes, scale = q.quantize_codes(w2)
    assert torch.allclose(codes * scale[:, None], argmax.reshape(6, -1))


def test_logits_train_and_the_layer_weight_is_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    sq = quantize_model(model, QuantConfig(quantizer="slb", params={"bits": 2}, keep_stem_and_classifier=False,
                                           sq=SQConfig(ratios=(1.0,))))
    layer = sq.layers["3"]
    assert not layer.weight.requires_grad and layer.quantizer.logits.requires_grad
    w0, a0 = layer.weight.clone(), layer.quantizer.logits.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for step in range(5):
        for m in model.modules():
            if hasattr(m, "set_progress"):
                m.set_progress(step, 100, 10)  # epoch 1 of 10: soft, T = t0
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.weight.grad is None and torch.equal(layer.weight, w0)
    assert not torch.equal(layer.quantizer.logits, a0)


def test_sq_ratios_below_one_are_refused_with_one_line():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"sq.ratios=\[0.5, 1.0\]: quantizer 'slb' has no full-precision weight"):
        quantize_model(model, QuantConfig(quantizer="slb", keep_stem_and_classifier=False,
                                          sq=SQConfig(ratios=(0.5, 1.0))))
    with pytest.raises(RecipeError, match=r"sq.ratios=\[0.5, 1.0\]: quantizer 'slb'.*allowed: \[1.0\]"):
        load_recipe(os.path.join(ROOT, "recipes", "digits_slb.yaml"), ["sq.ratios=[0.5,1.0]"])


@pytest.mark.parametrize("params, expected", [
    ({"bits": 5}, "slb bits=5; allowed: 1, 2, 3, 4"),
    ({"t_start": 0.7, "t_end": 0.6}, "slb t_end=0.6; allowed: a number in [t_start=0.7, 1]"),
    ({"factor": 0.9}, "slb factor=0.9; allowed: a number in [1.0, 1000.0]"),
    ({"init": "zeros"}, "slb init='zeros'; allowed: 'he', 'weight', 'normal'"),
    ({"fused": 1}, "slb fused=1; allowed: true, false"),
])
def test_bad_parameters_name_the_key_and_what_is_allowed(params, expected):
    with pytest.raises(ValueError) as exc:
        create_quantizer("slb", **params)
    assert str(exc.value) == expected


def test_a_layer_whose_logits_cannot_fit_is_refused(monkeypatch):
    monkeypatch.setattr(sqdist_slb, "free_bytes", lambda device: 10_000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match=r"slb bits=2: a layer of 162 weights needs 4 logits per weight, .* more "
                                          r"than the 0.00 GiB free on cpu; allowed: fewer bits"):
        create_quantizer("slb", bits=2).calibrate(weight())


@pytest.mark.parametrize("bits", [1, 2])
def test_export_then_load_gives_the_quantized_logits(tmp_path, bits):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer="slb", params={"bits": bits}, sq=SQConfig(ratios=(1.0,))))
    with torch.no_grad():  # logits away from their initial values
        for layer in sq.layers.values():
            layer.quantizer.logits.add_(torch.randn_like(layer.quantizer.logits))
    model.train()
    model(torch.randn(16, 1, 16, 16))  # BatchNorm statistics off their defaults
    model.eval()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    info = export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
    assert info["bits"] == [bits]
    with torch.no_grad():
        assert (load_quantized(tmp_path / "m.safetensors")(x) - expected).abs().max() <= 1e-5
    expected_bytes = sum(math.ceil(layer.weight.numel() * bits / 8) for layer in sq.layers.values())
    packed = sum(v.numel() for k, v in __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "m.safetensors")).items() if k.endswith(".packed"))
    assert packed == expected_bytes  # bits per weight, not 2^bits logits


# ---------------------------------------------------------------- two processes: DDP and DeepSpeed ZeRO-2
PLUGIN_RUN = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1, channels: [4, 8, 16, 32], stem_width: 8}}
data: {image_size: 8, batch_size: 64}
sq: {ratios: [1.0]}
optim: {name: adamw, lr: 0.01, weight_decay: 0.0}
train: {epochs: 2, progress: false, log_every: 5, bn_recalibrate: 2}
"""
PLUGINS = {"slb": ["quant.name=slb", "quant.params={bits: 2, t_start: 0.0, t_end: 1.0}"],  # epoch 1 soft, 2 argmax
           "esb": ["quant.name=esb", "quant.params={bits: 3, linear_bits: 0}"]}


@pytest.mark.slow
@pytest.mark.parametrize("plugin, engine", [("slb", "ddp"), ("slb", "zero2"), ("esb", "zero2")])
def test_plugins_train_on_two_processes(tmp_path, plugin, engine, launch_two):
    """Every rank holds rank 0's parameters after every step (SLB: frozen weights and logits
    under DDP without find_unused_parameters and under ZeRO-2); the run exports and reloads."""
    import json

    from safetensors.torch import load_file

    from sqdist.export import export_run, load_run

    (tmp_path / "r.yaml").write_text(PLUGIN_RUN)
    run = tmp_path / "run"
    engine_args = ["engine.name=deepspeed", "engine.zero_stage=2"] if engine == "zero2" else []
    launch_two("deepspeed_worker.py", tmp_path / "r.yaml", tmp_path / "w.json", f"run.dir={run}", *PLUGINS[plugin],
               *engine_args, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    rank1 = json.loads((tmp_path / "w.json.rank1").read_text())["steps"]
    assert len(rank1) > 10 and all(r["weights_equal_rank0"] for r in rank1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["avg_weight_bits"] == (2 if plugin == "slb" else 3) and summary["final_accuracy"] > 10
    final = load_file(str(run / "final" / "model.safetensors"))
    model, _ = load_run(run)
    if plugin == "slb":
        layer = "layer1.0.conv1"
        assert final[f"{layer}.quantizer.logits"].shape == (*final[f"{layer}.weight"].shape, 4)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        hard = [m[f"quant/{layer}.quantizer/hard"] for m in metrics if f"quant/{layer}.quantizer/hard" in m]
        assert hard[0] == 0.0 and hard[-1] == 1.0  # the soft phase, then the argmax
    export_run(run, tmp_path / "m.safetensors")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert (load_quantized(tmp_path / "m.safetensors")(x) - model(x)).abs().max() <= 1e-5


# ---------------------------------------------------------------- golden-stick's start and optimizer
def confidence(q):
    return float(torch.softmax(q.temperature * q.logits.detach(), dim=-1).amax(dim=-1).mean())


@pytest.mark.parametrize("bits", [1, 2])
def test_fresh_logits_are_he_normal_and_undecided(bits):
    """The default start is golden-stick's: He-normal logits (std sqrt(2 / (C_out k^2 2^b))), so at
    the start temperature every weight is undecided: mean max probability about 1 / 2^b (the
    weight start commits each weight: about 0.8 at 1 bit)."""
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    q = create_quantizer("slb", bits=bits)
    q.calibrate(w)
    n = 2 ** bits
    assert q.logits.std().item() == pytest.approx(math.sqrt(2 / (32 * 9 * n)), rel=0.05)
    assert 1 / n <= confidence(q) <= 1 / n + 0.05
    committed = create_quantizer("slb", bits=bits, init="weight")
    committed.calibrate(w)
    assert confidence(committed) > 1 / n + 0.25
    # the logged confidence (one pass, no softmax) is the softmax form's
    for quantizer in (q, committed):
        for t in (1.0, 37.5):
            quantizer.temperature = t
            assert quantizer.metrics()["confidence"] == pytest.approx(confidence(quantizer), rel=1e-6)


def test_recipe_trains_the_logits_as_golden_stick_does():
    """SGD momentum 0.9 (not Nesterov, as MindSpore's nn.Momentum), lr 0.1, weight decay 1e-4 on
    the logits (golden-stick decays every parameter but BN's and biases); BN parameters undecayed."""
    from sqdist.train import setup

    recipe = load_recipe(os.path.join(ROOT, "recipes", "digits_slb.yaml"), ["track.wandb=false"])
    assert recipe["quant"]["params"].get("init", "he") == "he"
    o = recipe["optim"]
    assert (o["name"], o["lr"], o["momentum"], o["weight_decay"]) == ("momentum", 0.1, 0.9, 1e-4)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        recipe["run"]["dir"] = folder
        run = setup(recipe)
        decay = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
        for name, p in run.model.named_parameters():
            if name.endswith("quantizer.logits"):
                assert decay[id(p)] == 1e-4
            elif "bn" in name or name.endswith("bias"):
                assert decay[id(p)] == 0.0
        group = run.optimizer.param_groups[0]
        assert isinstance(run.optimizer.optimizer, torch.optim.SGD)
        assert (group["momentum"], group["nesterov"]) == (0.9, False)
        run.tracker.close()


def _set_kernel(implementation, monkeypatch):
    monkeypatch.setenv("SQDIST_KERNELS", {"cpu": "cpu", "torch": "reference"}[implementation])
    if implementation == "cpu" and sqdist_slb.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")


@pytest.mark.parametrize("implementation", ["cpu", "torch"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float32_expectation_is_the_float64_reference(bits, implementation, monkeypatch):
    """float32 logits (the kernel's own exp): values and gradients within float32 rounding of the
    float64 reference, from undecided to hard-committed logits and a large temperature; odd sizes."""
    _set_kernel(implementation, monkeypatch)
    torch.manual_seed(bits)
    levels = sqdist_slb.slb_levels(bits)
    for scale, t in ((0.01, 1.0), (1.0, 0.2), (3.0, 30.0), (50.0, 5.0)):
        a = (torch.randn(1001, 2 ** bits) * scale).requires_grad_()
        g = torch.randn(1001)
        fast = sqdist_slb.expectation(a, levels, t)
        (grad,) = torch.autograd.grad((fast * g).sum(), a)
        a64 = a.detach().double().requires_grad_()
        ref = sqdist_slb.expectation_reference(a64, levels.double(), t)
        (grad_ref,) = torch.autograd.grad((ref * g.double()).sum(), a64)
        tol = 2e-7 * max(5.0, scale * t)  # float32 t A carries 6e-8 t |A| into softmax's exponents
        torch.testing.assert_close(fast.double(), ref, atol=tol, rtol=0)
        torch.testing.assert_close(grad.double(), grad_ref, atol=tol * max(1.0, t), rtol=0)


@pytest.mark.parametrize("implementation", ["cpu", "torch"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fused_expectation_is_the_reference(bits, implementation, monkeypatch):
    """The hand-written backward (CPU kernel or transposed PyTorch) against autograd through softmax
    and the weighted sum, and the quantizer's training forward with fused=True against fused=False."""
    _set_kernel(implementation, monkeypatch)
    levels = sqdist_slb.slb_levels(bits).double()
    a = torch.randn(5, 3, 3, 3, 2 ** bits, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    for t in (1.0, 4.3):
        fast = sqdist_slb.expectation(a, levels, t, binary=bits == 1)
        (grad_fast,) = torch.autograd.grad((fast * g).sum(), a)
        ref = sqdist_slb.expectation_reference(a, levels, t)
        (grad_ref,) = torch.autograd.grad((ref * g).sum(), a)
        assert torch.allclose(fast, ref, atol=1e-12) and torch.allclose(grad_fast, grad_ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: sqdist_slb.expectation(x, levels, 2.0, binary=bits == 1), (a,))
    w = weight()
    outs = []
    for fused in (True, False):
        q = create_quantizer("slb", bits=bits, fused=fused)
        torch.manual_seed(0)
        q.calibrate(w)
        q.set_progress(30, 100, 10)
        q.train()
        out = q(w)
        (out * w).sum().backward()
        outs.append((out.detach(), q.logits.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_argmax_kernel_is_torch_argmax(bits, dtype):
    """The hard phase's CPU kernel (blocks of rows) against ``levels[torch.argmax]``: several blocks and a partial
    one, ties (the first maximum), NaN anywhere (the first NaN wins), infinities."""
    if sqdist_slb.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")
    n = 2 ** bits
    g = torch.Generator().manual_seed(bits)
    a = torch.randint(-3, 4, (70_001, n), generator=g).to(dtype)  # small integers: many ties
    pick = torch.rand(70_001, n, generator=g)
    a[pick < 0.02] = float("nan")
    a[(pick > 0.5) & (pick < 0.52)] = float("inf")
    a[pick > 0.98] = -float("inf")
    levels = sqdist_slb.slb_levels(bits).to(dtype)
    got = sqdist_slb.argmax_levels(a, [float(v) for v in levels.tolist()])
    assert got.dtype == dtype and torch.equal(got, levels[a.argmax(dim=-1)])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_confidence_kernel_is_the_reference(bits):
    """The logged confidence by the CPU kernel against the PyTorch form, float32 and float64, undecided to committed
    logits; several chunks and a partial block; the same value at 1 and 2 threads (chunks added in order)."""
    if sqdist_slb.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")
    g = torch.Generator().manual_seed(bits)
    for dtype in (torch.float32, torch.float64):
        for scale, t in ((0.01, 1.0), (1.0, 4.3), (5.0, 30.0)):
            a = (torch.randn(200_003, 2 ** bits, generator=g) * scale).to(dtype)
            ref = sqdist_slb.confidence_reference(a.double(), t)
            got = sqdist_slb.kernel().confidence(a, t)
            assert got.dtype == torch.float64 and abs(float(got) - float(ref)) <= 1e-6 * float(ref)
    threads = torch.get_num_threads()
    try:
        for x in (a, a.float()):
            torch.set_num_threads(1)
            one = sqdist_slb.kernel().confidence(x, 4.3)
            torch.set_num_threads(2)
            assert torch.equal(sqdist_slb.kernel().confidence(x, 4.3), one)
    finally:
        torch.set_num_threads(threads)
    assert math.isnan(float(sqdist_slb.kernel().confidence(a[:0], 4.3)))  # no rows: NaN, as the reference's mean
    assert math.isnan(float(sqdist_slb.confidence_reference(a[:0], 4.3)))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codes_by_the_kernel_are_the_argmax_codes(bits, monkeypatch):
    """quantize_codes (export, the logged error) through the hard phase's kernel: torch.argmax's codes exactly."""
    w = weight()
    codes = {}
    for implementation in ("cpu", "torch"):
        _set_kernel(implementation, monkeypatch)
        q = create_quantizer("slb", bits=bits)
        torch.manual_seed(0)
        q.calibrate(w)
        with torch.no_grad():  # ties: two levels equal and largest in a third of the weights
            q.logits[::3, ..., 1] = q.logits[::3, ..., 0] = q.logits.amax(dim=-1)[::3] + 1.0
        codes[implementation] = q.quantize_codes(w.reshape(w.shape[0], -1))[0]
        assert not codes[implementation].requires_grad  # codes, not a function of the logits
    assert torch.equal(codes["cpu"], codes["torch"])
    assert (codes["cpu"][::3] == -(2 ** bits - 1)).all()  # the first of the tied levels
    assert set(codes["cpu"].unique().tolist()) <= set(sqdist_slb.slb_code_levels(bits))
