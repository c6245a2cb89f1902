"""Activation quantizers: the input of every quantized layer, LSQ and PACT, W/A recipes.

    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2, "scale": "lsq"}, activations="lsq",
                                           activation_params={"bits": 2}))
    calibrate_activations(model, first_batch)     # step sizes and signed/unsigned, per layer

In a recipe: ``quant.activations: {name: lsq, bits: 2}``.
"""
import json
import math
import os

import pytest
import timm
import torch
from torch import nn

from sqdist import (LSQ, PACT, ActivationQuantizer, QuantConfig, SQConfig, calibrate_activations,
                    create_activation_quantizer, list_activation_quantizers, quantize_model,
                    register_activation_quantizer)
from sqdist.config import RecipeError, bits_label, load_recipe
from sqdist.quant.registry import ACTIVATION_ENTRY_POINT_GROUP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo


def lsq(bits, signed, step):
    q = LSQ(bits, signed=signed)
    q.calibrate(torch.ones(1, 4))  # marks it calibrated (signed fixed above); then set the step by hand
    with torch.no_grad():
        q.step.fill_(step)
    return q.train()


# ---------------------------------------------------------------- LSQ, by hand
def test_lsq_unsigned_values_and_gradients():
    q = lsq(2, False, 0.5)  # Q_N = 0, Q_P = 3
    x = torch.tensor([[0.2, 0.9, 1.7, -0.3]], requires_grad=True)
    out = q(x)  # x / s = 0.4, 1.8, 3.4, -0.6 -> clip [0, 3] -> round 0, 2, 3, 0
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 1.5, 0.0]]))
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))  # zero where clipped
    # d/ds: round(v) - v inside (-0.4, 0.2), Q_P = 3 above, -Q_N = 0 below; weighted 1, 2, 3, 4 -> 9.0;
    # gradient scale g = 1 / sqrt(N * Q_P), N = 4 features per example
    torch.testing.assert_close(q.step.grad, torch.tensor([9.0 / math.sqrt(12)]))


def test_lsq_signed_values_and_gradients():
    q = lsq(2, True, 0.5)  # Q_N = 2, Q_P = 1
    x = torch.tensor([[0.2, -0.9, 1.7, -1.3]], requires_grad=True)
    out = q(x)  # 0.4, -1.8, 3.4, -2.6 -> clip [-2, 1] -> round 0, -2, 1, -2
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, 0.5, -1.0]]))
    out.sum().backward()
    # -0.4 + (-0.2) + Q_P (1) + (-Q_N) (-2) = -1.6, times 1 / sqrt(4 * 1)
    torch.testing.assert_close(q.step.grad, torch.tensor([-0.8]))
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_lsq_gradient_scale_counts_features_of_one_example_not_the_batch():
    q = lsq(2, False, 0.5)
    one = torch.tensor([[0.2, 0.9, 1.7, -0.3]])
    q(one).sum().backward()
    g1 = q.step.grad.clone()
    q.step.grad = None
    q(one.repeat(8, 1)).sum().backward()  # 8 copies: the gradient sums 8 times, g stays 1/sqrt(4 * 3)
    torch.testing.assert_close(q.step.grad, 8 * g1)


def test_lsq_calibration_decides_the_sign_and_initializes_the_step():
    q = LSQ(2)
    q.calibrate(torch.tensor([[0.2, 0.9, 1.7, 0.4]]))  # no negative value: unsigned, Q_P = 3
    assert (q.qmin, q.qmax) == (0, 3) and not bool(q.signed)
    torch.testing.assert_close(q.step.detach(), torch.tensor([2 * 0.8 / math.sqrt(3)]))  # 2 mean|x| / sqrt(Q_P)
    q = LSQ(4)
    q.calibrate(torch.tensor([[0.2, -0.9, 1.7, 0.4]]))  # signed, Q_N = 8, Q_P = 7
    assert (q.qmin, q.qmax) == (-8, 7) and bool(q.signed)
    torch.testing.assert_close(q.step.detach(), torch.tensor([2 * 0.8 / math.sqrt(7)]))
    forced = LSQ(2, signed=True)
    forced.calibrate(torch.ones(1, 3))
    assert (forced.qmin, forced.qmax) == (-2, 1)


def test_eval_value_is_the_exact_quantized_value_of_training():
    q = lsq(3, True, 0.37)
    x = torch.randn(16, 50) * 2
    train_out = q(x)
    q.eval()
    eval_out = q(x)
    s = q.step.detach()
    assert torch.equal(eval_out, torch.clamp(torch.round(x / s), -4, 3) * s)
    torch.testing.assert_close(train_out, eval_out)


# ---------------------------------------------------------------- PACT, by hand
def test_pact_unsigned_values_and_gradients():
    q = PACT(2, signed=False, alpha=1.5).train()  # step alpha / 3 = 0.5
    q.calibrate(torch.ones(1, 4))
    x = torch.tensor([[0.2, 0.9, 1.7, -0.3]], requires_grad=True)
    out = q(x)  # clip to [0, 1.5] -> 0.2, 0.9, 1.5, 0 -> round(y / 0.5) * 0.5
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 1.5, 0.0]]))
    (out * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))  # 1 on [0, alpha)
    torch.testing.assert_close(q.alpha.grad, torch.tensor([3.0]))  # d y_q / d alpha = 1 where x >= alpha


def test_pact_signed_clips_symmetrically():
    q = PACT(2, signed=True, alpha=1.5).train()  # codes -1, 0, 1, step 1.5
    q.calibrate(torch.ones(1, 4))
    x = torch.tensor([[0.2, -0.9, 1.7, -1.6]], requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.5, 1.5, -1.5]]))
    out.sum().backward()
    torch.testing.assert_close(q.alpha.grad, torch.tensor([0.0]))  # +1 at 1.7, -1 at -1.6
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert q.activation_qparams() == (1.5, 0, -1, 1)


def test_pact_starts_at_the_papers_alpha_and_is_weight_decayed_by_train():
    from sqdist.train import optimizer_param_groups

    assert PACT(4).alpha.item() == 10.0 and PACT.weight_decay and not LSQ.weight_decay
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    quantize_model(model, QuantConfig("twn", activations="pact", activation_params={"bits": 4}))
    groups = optimizer_param_groups(model, 1e-4)
    decayed = [p for g in groups if g["weight_decay"] == 1e-4 for p in g["params"]]
    assert any(p is model[3].input_quantizer.alpha for p in decayed)  # a scalar, decayed anyway
    assert not any(p is model[3].bias for p in decayed)  # biases still are not


def test_pact_alpha_can_start_from_the_calibration_batch():
    q = PACT(2, alpha="calibrate")
    q.calibrate(torch.tensor([[0.2, 0.9, 1.7, 0.4]]))  # unsigned, Q_P = 3: alpha = 3 * (2 * 0.8 / sqrt(3))
    torch.testing.assert_close(q.alpha.detach(), torch.tensor([2 * 0.8 * math.sqrt(3)]))
    assert q.config() == {"bits": 2, "signed": "auto", "alpha": "calibrate"}
    with pytest.raises(ValueError, match=r"^pact alpha='auto'; allowed: a finite number > 0 or 'calibrate'$"):
        PACT(2, alpha="auto")


# ---------------------------------------------------------------- in a model
def test_every_quantized_layer_but_the_stem_gets_an_input_quantizer():
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[4, 8, 16, 32], stem_width=8)
    sq = quantize_model(model, QuantConfig("bwn", activations="lsq", activation_params={"bits": 2},
                                           keep_stem_and_classifier=False, sq=SQConfig(ratios=(1.0,))))
    stem = "conv1.0"
    assert stem in sq.layers and sq.layers[stem].input_quantizer is None  # its input is the image
    assert set(sq.activation_quantizers) == set(sq.layers) - {stem}
    assert all(isinstance(q, LSQ) and q.bits == 2 for q in sq.activation_quantizers.values())
    x = torch.randn(32, 1, 8, 8)
    model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert calibrate_activations(model, x) == len(sq.layers) - 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_before.items())  # BN statistics put back
    assert model.training and all(m.training for m in model.modules())
    # every layer after a ReLU (and the pooled classifier input) is unsigned
    assert all(not bool(q.signed) and q.qmin == 0 for q in sq.activation_quantizers.values())
    seen = {}
    for name, q in sq.activation_quantizers.items():
        q.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():  # BN on batch statistics as in calibration; the exact quantized values
        logits_q = model(x)
        for name, q in sq.activation_quantizers.items():  # each layer's input lies on its 2-bit grid 0..3
            codes = seen[name] / q.step
            torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
            assert codes.round().min() >= 0 and codes.round().max() <= 3 and codes.round().unique().numel() > 1
        for q in sq.activation_quantizers.values():
            q.observing = True  # pass-through, the float network (it re-calibrates too: nothing is checked after)
        logits_fp = model(x)
        for q in sq.activation_quantizers.values():
            q.observing = False
    assert not torch.allclose(logits_q, logits_fp)


def test_uncalibrated_quantizer_calibrates_on_its_first_batch_in_one_process():
    q = LSQ(2)
    x = torch.tensor([[0.2, 0.9, 1.7, 0.4]])
    q(x)
    assert q._calibrated and bool(q.calibrated)
    torch.testing.assert_close(q.step.detach(), torch.tensor([2 * 0.8 / math.sqrt(3)]))


def test_state_dict_round_trip_keeps_sign_and_step():
    q = LSQ(3)
    q.calibrate(torch.tensor([[0.5, -1.0, 2.0]]))
    again = LSQ(3)
    again.load_state_dict(q.state_dict())
    assert again._calibrated and again._signed and again.qmin == -4
    assert torch.equal(again.step, q.step)


# ---------------------------------------------------------------- registry and plugins
def test_activation_quantizers_are_registered_by_name_and_from_plugins():
    from importlib.metadata import entry_points

    assert {"lsq", "pact", "act_pow2"} <= set(list_activation_quantizers())
    assert {ep.name: ep.value for ep in entry_points(group=ACTIVATION_ENTRY_POINT_GROUP)}["act_pow2"] == \
        "sqdist_pow2:ActPow2"
    plugin = create_activation_quantizer("act_pow2", bits=4)
    plugin.calibrate(torch.tensor([[0.3, 2.5, 1.0]]))  # max 2.5 / 15 -> step 2^-2
    assert plugin.step.item() == 0.25 and plugin.activation_qparams() == (0.25, 0, 0, 15)

    @register_activation_quantizer("test_halfstep")
    class HalfStep(ActivationQuantizer):
        def levels(self, signed):
            return (-1, 1) if signed else (0, 2)

        def scale(self):
            return torch.tensor([0.5])

        def fake_quantize(self, x):
            return x + (torch.clamp(torch.round(x * 2), self.qmin, self.qmax) / 2 - x).detach()

    q = create_activation_quantizer("test_halfstep", bits=2)
    q.calibrate(torch.ones(1, 2))
    assert torch.equal(q.eval()(torch.tensor([0.2, 0.8, 5.0])), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"activation quantizer name 'lsq' is already registered by sqdist.quant.activations.LSQ"):
        register_activation_quantizer("lsq")(HalfStep)
    with pytest.raises(ValueError, match=r"unknown activation quantizer 'lqs'; allowed: act_pow2, .*lsq, pact"):
        create_activation_quantizer("lqs")
    with pytest.raises(ValueError, match=r"activation quantizer 'lsq' has no parameter 'bit'; allowed: bits, signed"):
        create_activation_quantizer("lsq", bit=2)


# ---------------------------------------------------------------- recipes
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1, channels: [4, 8, 16, 32], stem_width: 8}}
data: {image_size: 8, batch_size: 32}
quant: {name: kbit, params: {bits: 2, scale: lsq}, activations: {name: lsq, bits: 2}}
sq: {ratios: [1.0]}
optim: {lr: 0.05}
train: {epochs: 1, progress: false, log_every: 5}
"""


@pytest.mark.parametrize("override, expected", [
    # every registered name, plugins included (sqdist-esb adds esb)
    ("quant.activations.name=lqs", f"quant.activations.name='lqs': allowed: {', '.join(list_activation_quantizers())}"),
    ("quant.activations={bits: 2}",
     f"quant.activations={{'bits': 2}}: missing 'name'; allowed names: {', '.join(list_activation_quantizers())}"),
    ("quant.activations.bits=9", "lsq bits=9; allowed: an integer from 2 to 8"),
    ("quant.activations.signed=maybe", "lsq signed='maybe'; allowed: 'auto', true, false"),
    ("quant.activations.step=1", "activation quantizer 'lsq' has no parameter 'step'; allowed: bits, signed"),
    ("quant.params.scale=median", "kbit scale='median'; allowed: 'mse', 'max', 'lsq'"),
])
def test_bad_activation_recipe_is_one_line(tmp_path, override, expected):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path), [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bits_label_says_weights_and_activations(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    assert bits_label(load_recipe(str(path))) == "W2A2"
    assert bits_label(load_recipe(str(path), ["quant.activations={}", "quant.name=bwn", "quant.params={}"])) == "W1A32"
    assert bits_label(load_recipe(str(path), ["quant.params.bits=4", "quant.activations.bits=4"])) == "W4A4"
    assert bits_label(load_recipe(os.path.join(ROOT, "recipes", "digits_fp.yaml"))) == "W32A32"
    assert bits_label(load_recipe(os.path.join(ROOT, "recipes", "digits_w2a2.yaml"))) == "W2A2"


def test_w2a2_run_trains_its_step_sizes_and_says_w2a2(tmp_path, capsys):
    from sqdist.train import train

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    run = tmp_path / "run"
    recipe = load_recipe(str(path), [f"run.dir={run}", "train.max_steps=3"])
    values = []

    def on_step(step, model, sq):
        values.append({k: v.detach().clone() for k, v in model.named_parameters() if k.endswith(".step")})

    summary = train(recipe, on_step=on_step)
    assert "(W2A2, 3 steps" in capsys.readouterr().out
    assert summary["bits"] == "W2A2" and summary["activations"] == "lsq"
    assert json.loads((run / "summary.json").read_text())["bits"] == "W2A2"
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["quant"]["params"] == {"bits": 2, "scale": "lsq"} and meta["quant"]["bits"] == "W2A2"
    acts = meta["quant"]["activations"]
    assert acts["name"] == "lsq" and acts["bits"] == 2 and len(acts["layers"]) == len(meta["quant"]["layers"]) > 5
    weight_steps = {k for k in values[0] if k.endswith(".quantizer.step")}
    act_steps = {k for k in values[0] if k.endswith(".input_quantizer.step")}
    assert len(weight_steps) == len(meta["quant"]["layers"]) and len(act_steps) == len(acts["layers"])
    assert all(not torch.equal(values[0][k], values[-1][k]) for k in values[0])  # every step size trains


# ---------------------------------------------------------------- export
def w2a2_model(in_chans=1):
    """A narrow resnet10t with LSQ 2-bit weights and activations, calibrated, BN statistics set, eval mode."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=in_chans, channels=[4, 8, 16, 32], stem_width=8)
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2, "scale": "lsq"}, activations="lsq",
                                           activation_params={"bits": 2}, sq=SQConfig(ratios=(1.0,))))
    x = torch.randn(64, in_chans, 8, 8)
    calibrate_activations(model, x)
    model.train()
    with torch.no_grad():
        model(x)  # BN statistics off their defaults
    return model.eval(), sq


def test_packed_export_stores_input_quantizers_and_reproduces_the_logits(tmp_path):
    from sqdist.export import export_model, load_quantized, read_packed

    model, sq = w2a2_model()
    path = tmp_path / "w2a2.safetensors"
    info = export_model(model, path, model_name="resnet10t",
                        model_kwargs={"num_classes": 10, "in_chans": 1, "channels": [4, 8, 16, 32], "stem_width": 8})
    assert info["inputs"] == len(sq.activation_quantizers) and info["bits"] == [2]
    _, meta = read_packed(path)
    assert meta["format_version"] == 3 and meta["activations"]["name"] == "lsq"
    for name, q in sq.activation_quantizers.items():
        assert meta["inputs"][name] == {"scale": q.step.item(), "zero_point": 0, "qmin": 0, "qmax": 3}
    loaded = load_quantized(path)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in loaded.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # weights and inputs on the same grids: the same logits
        for name in sq.activation_quantizers:  # and the inputs really are quantized in the loaded model
            loaded.get_submodule(name)._forward_pre_hooks.clear()
        assert not torch.allclose(loaded(x), model(x))


def test_weight_only_export_stays_version_2(tmp_path):
    from sqdist.export import export_model, read_packed

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    quantize_model(model, QuantConfig("twn", sq=SQConfig(ratios=(1.0,))))
    export_model(model.eval(), tmp_path / "w.safetensors")
    _, meta = read_packed(tmp_path / "w.safetensors")
    assert meta["format_version"] == 2 and meta["inputs"] == {}


def test_onnx_export_carries_the_activation_quantizers(tmp_path):
    pytest.importorskip("onnxruntime")
    from sqdist.export import export_onnx

    model, sq = w2a2_model()
    info = export_onnx(model, tmp_path / "w2a2.onnx", input_size=(1, 8, 8))
    assert info["qdq_inputs"] == len(sq.activation_quantizers)
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= 1e-4  # onnxruntime against the eval forward


def test_trained_w2a2_run_exports_and_reloads_with_the_same_logits(tmp_path):
    from sqdist.export import export_run, load_quantized, load_run
    from sqdist.train import train

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    run = tmp_path / "run"
    train(load_recipe(str(path), [f"run.dir={run}", "train.max_steps=4", "train.bn_recalibrate=2"]))
    trained, meta = load_run(run)
    assert len([m for m in trained.modules() if isinstance(m, LSQ)]) == len(meta["activations"]["layers"])
    info = export_run(run, tmp_path / "run.safetensors")
    assert info["inputs"] == len(meta["activations"]["layers"])
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "run.safetensors")(x), trained(x))


def test_runs_from_before_the_kbit_scale_choice_export_with_the_max_scale(tmp_path):
    from sqdist.runs import read_meta

    (tmp_path / "meta.json").write_text(json.dumps({
        "model": {"name": "resnet10t", "kwargs": {}}, "sq": {"ratio": 1.0},
        "quant": {"enabled": True, "name": "kbit", "params": {"bits": 4}, "layers": ["layer1.0.conv1"]}}))
    meta = read_meta(tmp_path)
    assert meta.params == {"bits": 4, "scale": "max"} and meta.activations == {} and meta.quantizer == "kbit"


def test_pact_clips_at_the_absolute_value_of_alpha():
    """An optimizer step can carry alpha below 0; the layer must not go dead (every input clipped to -|alpha|)."""
    from sqdist import create_activation_quantizer

    x = torch.linspace(0, 3, 31)[None, :]
    outs = []
    for alpha in (2.0, -2.0):
        q = create_activation_quantizer("pact", bits=2)
        q.init_from(x)
        q._signed = False
        q._calibrated = True
        with torch.no_grad():
            q.alpha.fill_(alpha)
        q.train()
        outs.append(q.fake_quantize(x.clone().requires_grad_()))
        assert float(q.scale()) == pytest.approx(2.0 / 3)
    assert torch.equal(outs[0], outs[1]) and float(outs[1].min()) == 0.0 and float(outs[1].max()) == 2.0


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-2, 1)])
def test_lsq_one_node_backward_equals_the_autograd_reference(qmin, qmax, kernels, monkeypatch):
    """The hand-written backward of lsq_quantize (the compiled CPU ops, or its PyTorch form) against
    the straight-through ops of the paper: same values, same gradients for x and for a step
    derived from a parameter (|p|)."""
    from sqdist.quant.kernels import cpu_op
    from sqdist.quant.weights import lsq_quantize, lsq_quantize_reference

    monkeypatch.setenv("SQDIST_KERNELS", kernels)
    assert (cpu_op("lsq_backward", torch.ones(2)) is not None) == (kernels == "cpu")
    g = torch.Generator().manual_seed(qmax)
    x = torch.randn(8, 16, 5, 5, generator=g) * 0.7
    x[0, 0, 0] = torch.tensor([0.0, qmin * 0.25, qmax * 0.25, 0.125, -0.125])  # at the bounds, at a .5 tie
    if qmin == 0:
        x = x.relu()  # exact zeros: on the lower bound, outside
    grad = torch.randn(x.shape, generator=g)
    results = []
    for fn in (lsq_quantize_reference, lsq_quantize):
        xs, p = x.clone().requires_grad_(), torch.tensor([-0.25], requires_grad=True)
        out = fn(xs, p.abs(), qmin, qmax, 0.03)
        out.backward(grad)
        results.append((out.detach(), xs.grad, p.grad))
    (ref, ref_gx, ref_gp), (out, gx, gp) = results
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-6, atol=1e-6)  # the reference's is (g * s) / s
    assert torch.equal(gx == 0, ref_gx == 0) and (gx == 0).any() and (gx != 0).any()
    torch.testing.assert_close(gp, ref_gp, rtol=1e-5, atol=1e-6)
    assert gp.abs().item() > 1e-3
