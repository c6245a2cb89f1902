"""Learned steps and clipping values stay positive and finite.

A learned step size (LSQ, k-bit ``scale="lsq"``, SRQ's ``alpha``, ESB's step) or clipping value
(PACT) is a parameter the optimizer moves freely; the quantizer uses ``max(|p|, STEP_FLOOR)``
(:func:`sqdist.quant.steps.positive_step`), so one SGD step across 0 cannot make a layer dead
(every unsigned input on code 0) or NaN (``x / 0``). A calibration batch that is all zero (the
input of a layer behind a zero-initialized branch) starts the step at 1, not 0.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import sqdist
from sqdist import QuantConfig, SQConfig, calibrate_activations, create_activation_quantizer, quantize_model
from sqdist.quant import KBit
from sqdist.quant.steps import STEP_FLOOR, positive_step


def effective_steps(sq) -> dict[str, float]:
    """Every learned step of a model quantized with kbit lsq weights and LSQ inputs, as the layers use them."""
    out = {}
    for name, layer in sq.layers.items():
        w = layer.weight.detach()
        with torch.no_grad():
            _, scale = layer.quantizer.quantize_codes(w.reshape(w.shape[0], -1))
        out[f"{name}.quantizer"] = float(scale[0])
        if layer.input_quantizer is not None:
            out[f"{name}.input_quantizer"] = float(layer.input_quantizer.scale().detach())
    return out


# (model, input size): random init, 10 classes; the three nets where one LSQ step went to 0 or below
TIMM_CASES = [("test_byobnet", 64), ("mobilenetv4_hybrid_medium", 64), ("mobilenetv4_hybrid_medium_075", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name,size", TIMM_CASES)
def test_timm_model_trains_a_step_evaluates_and_exports_with_positive_steps(tmp_path, name, size):
    """test_byobnet: zero-initialized branches give LSQ an all-zero calibration input (the step was 0,
    every later forward NaN); mobilenetv4_hybrid_medium(_075): one SGD step at lr 1e-3 carried
    several LSQ steps below 0 (the layers went dead and export refused them)."""
    from sqdist.export import export_model, load_quantized

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 4, "scale": "lsq"}, sq=SQConfig(ratios=(1.0,)),
                                           activations="lsq", activation_params={"bits": 8}))
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    calibrate_activations(model, x)
    steps = effective_steps(sq)
    assert all(0 < s < math.inf for s in steps.values()), {k: s for k, s in steps.items() if not 0 < s < math.inf}

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    steps = effective_steps(sq)
    bad = {k: s for k, s in steps.items() if not 0 < s < math.inf}
    assert not bad, bad

    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all()
    path = tmp_path / "m.safetensors"
    info = export_model(model, path, model_name=name, model_kwargs={"num_classes": 10})
    assert info["layers"] == len(sq.layers) and info["inputs"] == len(sq.activation_quantizers)
    loaded = load_quantized(path)
    with torch.no_grad():
        assert (loaded(x) - logits).abs().max() <= 1e-4 * max(1.0, float(logits.abs().max()))


def _learned_quantizers():
    """(label, quantizer, raw parameter, the step the quantizer uses per unit of parameter, call that gives that step),
    calibrated on non-zero data."""
    from sqdist_esb import ESBActivation
    from sqdist_srq import SRQActivation, SRQWeight

    x = torch.rand(8, 16) + 0.1
    w = torch.randn(4, 9)
    out = []
    lsq = create_activation_quantizer("lsq", bits=4)
    lsq.calibrate(x)
    out.append(("lsq", lsq, lsq.step, 1.0, lsq.scale))
    pact = create_activation_quantizer("pact", bits=4, alpha="calibrate")
    pact.calibrate(x)
    out.append(("pact", pact, pact.alpha, 1.0 / pact.qmax, pact.scale))
    kbit = KBit(4, scale="lsq")
    kbit.calibrate(w)
    out.append(("kbit lsq", kbit, kbit.step, 1.0, lambda q=kbit: q.quantize_codes(w)[1][:1]))
    srq_w = SRQWeight(bits=3)
    srq_w.calibrate(w)
    out.append(("srq weights", srq_w, srq_w.alpha, 1.0, lambda q=srq_w: q.quantize_codes(w)[1][:1]))
    srq_a = SRQActivation(bits=3)
    srq_a.calibrate(x)
    out.append(("srq activations", srq_a, srq_a.alpha, 1.0, srq_a.scale))
    esb = ESBActivation(bits=3)
    esb.calibrate(x)
    out.append(("esb activations", esb, esb.step, 1.0, esb.scale))
    return out


@pytest.mark.parametrize("raw", [-0.3, 0.0, -0.0, 1e-30])
def test_every_learned_step_is_positive_whatever_its_parameter(raw):
    for label, q, param, per_unit, used_step in _learned_quantizers():
        with torch.no_grad():
            param.fill_(raw)
        step = float(used_step().detach())
        assert step == pytest.approx(per_unit * max(abs(raw), STEP_FLOOR), rel=1e-6), (label, step)
        assert step > 0 and math.isfinite(step), (label, step)
        if label.endswith("activations") or label in ("lsq", "pact"):
            q.train()
            xin = (torch.rand(8, 16) + 0.1).requires_grad_()
            y = q(xin)
            assert torch.isfinite(y).all(), label
            y.sum().backward()
            assert param.grad is not None and torch.isfinite(param.grad).all() and float(param.grad.abs()) > 0, label
            q.eval()
            with torch.no_grad():
                assert torch.isfinite(q(xin)).all(), label


def test_a_step_carried_below_zero_quantizes_as_its_absolute_value():
    """LSQ with step -s is LSQ with step s (an unsigned layer used to output zeros, its step's gradient exactly 0)."""
    x = torch.linspace(0, 3, 31)[None, :]
    outs, grads = [], []
    for step in (0.25, -0.25):
        q = create_activation_quantizer("lsq", bits=2)
        q.calibrate(x)
        with torch.no_grad():
            q.step.fill_(step)
        q.train()
        y = q(x)
        y.sum().backward()
        outs.append(y.detach())
        grads.append(float(q.step.grad))
        assert float(q.scale().detach()) == 0.25 and q.activation_qparams()[0] == 0.25
    assert torch.equal(outs[0], outs[1]) and float(outs[1].max()) == 0.75
    assert grads[0] != 0 and grads[1] == -grads[0]  # d|s|/ds = sign(s): the step moves back the same way


def test_positive_step_is_floored_with_the_gradient_straight_through():
    p = torch.tensor([0.0, -1e-12, 2e-3, -0.5], requires_grad=True)
    s = positive_step(p)
    assert s.tolist() == pytest.approx([STEP_FLOOR, STEP_FLOOR, 2e-3, 0.5], rel=1e-6)
    s.sum().backward()
    assert p.grad.tolist() == [1.0, -1.0, 1.0, -1.0]  # at 0: +1, so a zero parameter can leave 0
    assert float(torch.tensor(STEP_FLOOR, dtype=torch.float16)) == STEP_FLOOR  # exact in half precision


def test_all_zero_calibration_input_gives_a_usable_step():
    """The input of a layer behind a zero-initialized branch is all zero at calibration: the step starts at 1."""
    from sqdist_esb import ESBActivation
    from sqdist_srq import SRQActivation, SRQWeight

    zeros = torch.zeros(4, 8)
    for q in (create_activation_quantizer("lsq", bits=8), create_activation_quantizer("pact", bits=4, alpha="calibrate"),
              SRQActivation(bits=3), ESBActivation(bits=3)):
        q.calibrate(zeros)
        step = float(q.scale().detach())  # PACT's is alpha / qmax, alpha started at 1
        assert step == pytest.approx(1.0 / q.qmax if type(q).__name__ == "PACT" else 1.0), type(q).__name__
        q.train()
        y = q(torch.rand(4, 8))
        assert torch.isfinite(y).all() and float(y.abs().sum()) > 0, type(q).__name__
    for q in (KBit(4, scale="lsq"), SRQWeight(bits=3)):
        q.calibrate(zeros)
        _, scale = q.quantize_codes(torch.randn(4, 8))
        assert float(scale[0]) == 1.0, type(q).__name__
