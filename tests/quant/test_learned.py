"""Quantizers that learn, and k-bit's scale choices.

A quantizer's ``nn.Parameter`` s train with the model through the default path: the
minimal learned method overrides only ``quantize_codes`` and returns a scale computed
from its own parameter; codes are straight through, the scale is differentiable.
k-bit chooses its scale by ``max`` (fused kernel), ``mse`` (the default) or ``lsq``
(a learned step size, Esser et al., ICLR 2020).
"""
import math

import pytest
import torch
from torch import nn

import sqdist
from sqdist import BWN, KBit, TWN, QuantConfig, Quantizer, SQConfig, quantize_model
from sqdist.quant.weights import kbit_mse_reference, kbit_reference, quantization_error


class ScaledSign(Quantizer):
    """The minimal learned quantizer: ``Q_i = exp(g) * mean|W_i| * sign(W_i)`` with a learned ``g``."""

    bits = 1

    def __init__(self):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(()))

    def quantize_codes(self, w):
        return torch.where(w >= 0, 1.0, -1.0), self.log_gain.exp() * w.detach().abs().mean(dim=1)


# ---------------------------------------------------------------- the default learned path
def test_overriding_only_quantize_codes_trains_the_scale_parameter():
    q = ScaledSign()
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]], requires_grad=True)
    out = q(w)  # scale 2.5, codes +-1
    torch.testing.assert_close(out, torch.tensor([[2.5, -2.5, 2.5, -2.5]]))
    upstream = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    (out * upstream).sum().backward()
    # d/dg sum(G * codes * e^g * 2.5) at g = 0: 1 * 2.5 + (-1) * (-2.5) = 5
    torch.testing.assert_close(q.log_gain.grad, torch.tensor(5.0))
    assert torch.equal(w.grad, upstream)  # codes straight through: the weight gets the upstream gradient
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    opt.step()
    torch.testing.assert_close(q.log_gain.detach(), torch.tensor(-0.5))


def test_learned_quantizer_in_a_model_gets_its_gradient_through_sq_hybrid_rows_only():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    sqdist.register_quantizer("test_scaled_sign")(ScaledSign)
    sq = quantize_model(model, QuantConfig("test_scaled_sign", sq=SQConfig(ratios=(0.5,))))
    layer = model[2]
    assert layer.quantizer.learns and layer.quantizer._spec() is None
    assert "2.quantizer.log_gain" in dict(model.named_parameters())
    sq.draw_masks()
    model(torch.randn(4, 6)).square().sum().backward()
    g = layer.quantizer.log_gain.grad
    assert g is not None and g != 0
    # the gradient comes from the quantized rows only: recompute it from those rows by hand
    w = layer.weight.detach()
    x = torch.relu(model[0](torch.randn(4, 6)))  # any input: check the rule on a fresh pass
    layer.quantizer.log_gain.grad = None
    out = nn.functional.linear(x, layer.sq_weight(), layer.bias)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    dq = upstream.T @ x  # dL/dW~, (8, 8)
    codes = torch.where(w >= 0, 1.0, -1.0)
    expected = ((dq * codes).sum(dim=1) * w.abs().mean(dim=1))[layer.sq_mask].sum()
    torch.testing.assert_close(layer.quantizer.log_gain.grad, expected)


def test_ratio_zero_keeps_learned_parameters_in_the_graph_with_zero_gradient():
    """DDP and ZeRO expect a gradient for every parameter, even in a full-precision stage."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2, "scale": "lsq"}, sq=SQConfig(ratios=(0.0, 1.0), unit="step")))
    x = torch.randn(4, 6)
    sq.draw_masks()
    assert torch.equal(model[2].sq_weight(), model[2].weight)  # ratio 0: the float weight
    out = model(x)
    out.sum().backward()
    assert model[2].quantizer.step.grad is not None and model[2].quantizer.step.grad == 0


def test_builtins_keep_the_fused_path_and_learned_ones_leave_it(monkeypatch):
    monkeypatch.setenv("SQDIST_KERNELS", "auto")
    assert BWN()._spec() == {"kind": "bwn"} and TWN()._spec() is not None
    assert KBit(4, scale="max")._spec() == {"kind": "kbit", "bits": 4}
    assert KBit(4)._spec() is None and KBit(4, scale="lsq")._spec() is None
    assert not BWN().learns and KBit(2, "lsq").learns
    frozen = KBit(2, "lsq").requires_grad_(False)
    assert not frozen.learns


# ---------------------------------------------------------------- LSQ for weights
def test_lsq_weight_values_and_gradients_by_hand():
    q = KBit(2, scale="lsq")  # L = 1: codes -1, 0, 1
    with torch.no_grad():
        q.step.fill_(1.0)
    w = torch.tensor([[0.2, -0.9, 1.7, -0.3], [0.6, 0.1, -2.0, 0.4]], requires_grad=True)
    out = q(w)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, 1.0, 0.0], [1.0, 0.0, -1.0, 0.0]]))
    out.sum().backward()
    # d/dw: 1 where |w/s| < 1, 0 where clipped (1.7, -2.0)
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))
    # d/ds: round(v) - v inside (-0.2, -0.1, 0.3, 0.4, -0.1, -0.4), +1 at 1.7, -1 at -2.0; sum -0.1,
    # times g = 1 / sqrt(N_W * Q_P) = 1 / sqrt(8)
    torch.testing.assert_close(q.step.grad, torch.tensor([-0.1 / math.sqrt(8)]))


def test_lsq_weight_step_is_initialized_as_in_the_paper():
    w = torch.tensor([[0.2, -0.9, 1.7, -0.3], [0.6, 0.1, -2.0, 0.4]])
    for bits, q_p in ((2, 1), (4, 7)):
        q = KBit(bits, scale="lsq")
        q.calibrate(w)  # 2 mean|W| / sqrt(Q_P), mean|W| = 6.2 / 8
        torch.testing.assert_close(q.step.detach(), torch.tensor([2 * 0.775 / math.sqrt(q_p)]))
        codes, scale = q.quantize_codes(w)
        assert torch.equal(scale, q.step.detach().expand(2)) and codes.abs().max() <= q_p


def test_sq_selection_error_uses_the_current_learned_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2, "scale": "lsq"}, sq=SQConfig(ratios=(0.5,))))
    layer = model[2]
    before = sq.errors()["2"]
    w = layer.weight.detach()
    torch.testing.assert_close(before, quantization_error(w, layer.quantizer.quantize(w)[0]))
    with torch.no_grad():
        layer.quantizer.step.mul_(3.0)
    after = sq.errors()["2"]
    s = layer.quantizer.step.detach()
    expected = quantization_error(w, torch.clamp(torch.round(w / s), -1, 1) * s)
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------- k-bit scale choices
def test_kbit_mse_hand_example():
    # one row, 2 bits (codes -1, 0, 1): the max scale 2.0 keeps only 2.0; the best scale keeps 1.2 too
    w = torch.tensor([[0.3, -1.2, 2.0, -0.1]])
    codes, scale = kbit_mse_reference(w, 2)
    # a scale s with codes (0, -1, 1, 0) has error (0.3^2 + (1.2 - s)^2 + (2 - s)^2 + 0.1^2),
    # least at s = 1.6 (the mean of 1.2 and 2.0); the grid finds it to 1/512 of max|w|
    assert torch.equal(codes, torch.tensor([[0.0, -1.0, 1.0, 0.0]]))
    assert abs(float(scale) - 1.6) <= 2.0 / 512
    q_max = KBit(2, scale="max").quantize(w)[0]  # (0, -2, 2, 0): L2 error 0.09 + 0.64 + 0.01
    q_mse = KBit(2).quantize(w)[0]  # (0, -1.6, 1.6, 0): 0.09 + 0.16 + 0.16 + 0.01
    torch.testing.assert_close((w - q_max).square().sum(), torch.tensor(0.74))
    torch.testing.assert_close((w - q_mse).square().sum(), torch.tensor(0.42), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kbit_mse_error_is_never_above_max(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 77, generator=g)
    w[::7, 3] *= 25.0  # rows with an outlier: the max scale wastes its levels there
    w[5] = 0.0  # a zero row is exact either way
    w[6, :] = 0.5  # a constant row: the max scale is exact, the search must keep it
    l2 = {}
    for name, fn in (("max", kbit_reference), ("mse", kbit_mse_reference)):
        codes, scale = fn(w, bits)
        l2[name] = (w - codes * scale[:, None]).square().sum(dim=1)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1 and torch.equal(codes, codes.round())
    assert (l2["mse"] <= l2["max"] * (1 + 1e-6)).all()
    assert l2["mse"][6] == 0 and l2["mse"][5] == 0
    plain = l2["mse"][1::7] / l2["max"][1::7]  # rows without an outlier: the search gains most at few bits
    assert plain.mean() < {2: 0.5, 3: 0.75, 4: 0.95, 8: 0.995}[bits]


def test_kbit_scale_is_validated_with_one_line():
    with pytest.raises(ValueError, match=r"^kbit scale='median'; allowed: 'mse', 'max', 'lsq'$"):
        KBit(4, scale="median")
    assert KBit(3).config() == {"bits": 3, "scale": "mse", "search_every": 16}


# ---------------------------------------------------------------- the example plugin
def test_plugin_learned_pow2_scale_trains_its_exponents():
    q = sqdist.create_quantizer("kbit_pow2_learned", bits=3)
    assert type(q).__module__ == "sqdist_pow2"
    w = torch.tensor([[0.3, -1.2, 2.0, -0.7], [0.05, 0.01, -0.02, 0.04]], requires_grad=True)
    q.calibrate(w)  # t = ceil(log2(max|W_i| / 3)): 2/3 -> 0, 0.05/3 -> -5
    assert torch.equal(q.t.detach(), torch.tensor([0.0, -5.0]))
    out = q(w)
    codes = torch.tensor([[0.0, -1.0, 2.0, -1.0], [2.0, 0.0, -1.0, 1.0]])
    torch.testing.assert_close(out, codes * torch.tensor([[1.0], [2.0 ** -5]]))
    out.sum().backward()
    # d/dt_i sum(codes * 2^t_i) = sum_j codes_ij * 2^t_i * ln 2
    torch.testing.assert_close(q.t.grad, codes.sum(dim=1) * torch.tensor([1.0, 2.0 ** -5]) * math.log(2))


# ---------------------------------------------------------------- two processes
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1, channels: [4, 8, 16, 32], stem_width: 8}}
data: {image_size: 8, batch_size: 32}
quant: {name: kbit, params: {bits: 2, scale: lsq}, activations: {name: pact, bits: 2, alpha: 1.0}}
sq: {ratios: [0.5]}
optim: {lr: 0.05}
train: {epochs: 1, max_steps: 3, progress: false, log_every: 1}
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_learned_parameters_train_identically_on_two_processes(tmp_path, engine, launch_two):
    """DDP (every parameter must get a gradient, or the second step fails) and DeepSpeed ZeRO-2:
    the weight step sizes and PACT's alphas change every step and stay equal on both ranks."""
    import json

    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "params.json"
    launch_two("learned_worker.py", tmp_path / "tiny.yaml", out, f"run.dir={tmp_path / 'run'}", f"engine.name={engine}",
               "engine.zero_stage=2")
    ranks = [json.loads(open(f"{out}.rank{r}").read()) for r in (0, 1)]
    steps = ranks[1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["params_equal_rank0"] and r["masks_equal_rank0"] for r in steps)
    names = list(steps[0]["params"])
    assert any(n.endswith(".quantizer.step") for n in names) and any(n.endswith(".input_quantizer.alpha") for n in names)
    for name in names:  # every quantizer parameter moved between the first and the last step
        assert steps[0]["params"][name] != steps[-1]["params"][name], name


# ---------------------------------------------------------------- k-bit mse: the search every N steps
def _drifting_weights(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 3, 3, 3, generator=g)
    w[::5, 0, 0, 0] *= 8.0  # outliers: the best ratio is far from 1
    for _ in range(steps):
        yield w.clone()
        w = w + 0.01 * torch.randn(w.shape, generator=g)


@pytest.mark.parametrize("bits", [2, 4])
def test_kbit_mse_searching_every_step_is_the_reference(bits):
    from sqdist.quant.weights import kbit_mse_reference

    q = KBit(bits, search_every=1)
    weights = list(_drifting_weights(6, seed=bits))
    q.calibrate(weights[0])
    q.train()
    for step, w in enumerate(weights):
        q.set_progress(step, 6, 3)
        codes, scale = q.quantize_codes(w.reshape(24, -1))
        ref_codes, ref_scale = kbit_mse_reference(w.reshape(24, -1), bits)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_kbit_mse_between_searches_keeps_each_rows_ratio():
    """At multiples of search_every the search (the reference exactly); in between the ratio found there
    with the current row maximum: on weights that drift a little the L2 error stays within 2% of the search's."""
    from sqdist.quant.weights import kbit_codes_at_ratio, kbit_mse_ratio, kbit_mse_reference

    q = KBit(3, search_every=4)
    weights = list(_drifting_weights(10))
    q.calibrate(weights[0])
    q.train()
    searched = None
    for step, w in enumerate(weights):
        w2d = w.reshape(24, -1)
        q.set_progress(step, 10, 5)
        codes, scale = q.quantize_codes(w2d)
        ref_codes, ref_scale = kbit_mse_reference(w2d, 3)
        if step % 4 == 0:
            searched = kbit_mse_ratio(w2d, 3)
            assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        else:
            fast_codes, fast_scale = kbit_codes_at_ratio(w2d, searched, 3)
            assert torch.equal(codes, fast_codes) and torch.equal(scale, fast_scale)
            l2 = (w2d - codes * scale[:, None]).square().sum()
            assert l2 <= 1.02 * (w2d - ref_codes * ref_scale[:, None]).square().sum()
        assert torch.equal(q.mse_ratio, searched)
        wp = w.clone().requires_grad_()  # the training forward: Q of these codes, the gradient straight through
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(step))
        out = q(wp)
        (out * g).sum().backward()
        assert torch.equal(out.detach(), (codes * scale[:, None]).reshape(w.shape)) and torch.equal(wp.grad, g)
    q.eval()  # evaluation and export: the search on every call
    assert torch.equal(q.quantize_codes(w2d)[1], kbit_mse_reference(w2d, 3)[1])


def test_kbit_mse_ratios_resume_from_a_checkpoint_and_old_checkpoints_still_load():
    from sqdist.quant.weights import kbit_mse_reference

    weights = list(_drifting_weights(7))
    a = KBit(4, search_every=4)
    a.calibrate(weights[0])
    a.train()
    for step in range(6):  # searched at 0 and 4
        a.set_progress(step, 10, 5)
        a.quantize_codes(weights[step].reshape(24, -1))
    state = a.state_dict()
    assert set(state) == {"mse_ratio"}
    b = KBit(4, search_every=4)
    b.calibrate(weights[6])  # different weights: the checkpoint's ratios must win
    b.load_state_dict(state)
    b.train()
    for q in (a, b):
        q.set_progress(6, 10, 5)
    w2d = weights[6].reshape(24, -1)
    assert torch.equal(a.quantize_codes(w2d)[1], b.quantize_codes(w2d)[1])
    c = KBit(4, search_every=4)  # a checkpoint from before the ratios were kept: the search at the next step
    c.calibrate(weights[0])
    c.load_state_dict({}, strict=True)
    c.train()
    c.set_progress(6, 10, 5)
    assert torch.equal(c.quantize_codes(w2d)[1], kbit_mse_reference(w2d, 4)[1])
    with pytest.raises(ValueError, match=r"^kbit search_every=0; allowed: an integer >= 1$"):
        KBit(4, search_every=0)


def test_a_kbit_subclass_with_its_own_codes_rule_is_what_forward_computes():
    """``KBit.quantize`` takes the compiled one-pass route for ``scale="mse"`` only when ``quantize_codes``
    is k-bit's own: a subclass's rule still decides the training forward (``Q`` of its codes)."""

    class Halved(KBit):
        def quantize_codes(self, w):
            codes, scale = super().quantize_codes(w)
            return codes, scale / 2

    w = next(_drifting_weights(1))
    for cls, factor in ((KBit, 1.0), (Halved, 0.5)):
        q = cls(4)
        q.calibrate(w)
        q.train()
        q.set_progress(1, 10, 5)
        codes, scale = KBit.quantize_codes(q, w.reshape(24, -1))
        assert torch.equal(q(w), (codes * (scale * factor)[:, None]).reshape(w.shape))
