"""SRQ with DropBits and learned bit widths (plugins/sqdist-srq): the estimator, DropBits,
the learned widths and their regularizer, export at mixed widths, two processes, ZeRO-2.

    from sqdist import create_quantizer, create_activation_quantizer
    w = create_quantizer("srq", bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0)
    a = create_activation_quantizer("srq", bits=2, drop_prob=0.1)
"""
import json
import os
from types import SimpleNamespace

import pytest
import timm
import torch

from sqdist import (QuantConfig, SQConfig, calibrate_activations, create_activation_quantizer, create_quantizer,
                    list_activation_quantizers, list_quantizers, quantize_model)
from sqdist.export import export_model, load_quantized

sqdist_srq = pytest.importorskip("sqdist_srq")
from sqdist_srq import SRQActivation, SRQWeight, _srq_reference, fast, srq_probabilities, srq_value  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # plugins/<p>/tests/


def test_registered_for_weights_and_activations():
    assert "srq" in list_quantizers() and "srq" in list_activation_quantizers()
    assert isinstance(create_quantizer("srq", bits=3), SRQWeight)
    assert isinstance(create_activation_quantizer("srq", bits=3), SRQActivation)


@pytest.mark.parametrize("params, message", [
    ({"bits": 1}, r"srq bits=1; allowed: an integer from 2 to 8"),
    ({"drop_prob": 1.0}, r"srq drop_prob=1.0; allowed: a number in \[0, 1\)"),
    ({"drop_schedule": "cosine"}, r"srq drop_schedule='cosine'; allowed: 'constant', 'linear'"),
    ({"bits": 2, "learn_bits": True}, r"srq min_bits=2; allowed: .*learn_bits needs bits >= 3"),
    ({"bits": 4, "learn_bits": True, "bit_reg": 1.0}, r"srq target_bits=None; allowed: a number from min_bits"),
    ({"bits": 4, "bit_reg": 3.0}, r"srq bit_reg=3.0 needs learn_bits=true; allowed with learn_bits=false: 0.0"),
    ({"bits": 4, "target_bits": 3.0}, r"srq target_bits=3.0 needs learn_bits=true; allowed with learn_bits=false: None"),
    ({"bits": 4, "learn_bits": False, "min_bits": 3}, r"srq min_bits=3 needs learn_bits=true; allowed with .*: 2 "),
])
def test_bad_parameters_name_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        create_quantizer("srq", **params)


def test_pi_matches_hand_worked_values():
    """Grid alpha * {-2, -1, 0, 1}, alpha = 0.5, sigma = 0.5, x = 0.15 (u = x / alpha = 0.3, tau = 1):
    pi_i ∝ sigmoid((g_i + alpha/2 - x)/sigma) - sigmoid((g_i - alpha/2 - x)/sigma) =
    0.084527, 0.168174, 0.239808, 0.218691 (sum 0.711200), normalized below."""
    pi = srq_probabilities(torch.tensor([0.15 / 0.5]), 0.5 / 0.5, -2, 1)
    torch.testing.assert_close(pi[0], torch.tensor([0.118851, 0.236466, 0.337188, 0.307495]), atol=2e-6, rtol=0)
    y = srq_value(torch.tensor([0.15], requires_grad=True), torch.tensor([0.5]), torch.tensor([0.5]), -2, 1)
    assert float(y.detach()) == 0.0  # the argmax: code 0 (probability 0.337), not the expectation -0.1667
    # an element far from the grid: still a distribution (the noise mass that lands in the grid), not 0/0
    far = srq_probabilities(torch.tensor([40.0]), 1 / 3, -2, 1)[0]
    assert torch.isfinite(far).all() and abs(float(far.sum()) - 1) < 1e-6 and int(far.argmax()) == 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_no_gradient_far_outside_the_grid(bits, signed):
    """Beyond the grid the output is clipped and x gets (almost) no gradient, at any distance: the
    old p / (sum p + 1e-12) gave dy/dx = -0.84 at 9 steps above a 2-bit unsigned grid."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    for sigma in (1 / 3, 0.1, 1.0):
        x = torch.tensor([qmax + 9.0, qmax + 12.0, qmax + 30.0, qmax + 1e4,
                          qmin - 9.0, qmin - 12.0, qmin - 1e4, qmax + 2.0, qmin - 2.0], requires_grad=True)
        y = srq_value(x, torch.tensor([1.0]), torch.tensor([sigma]), qmin, qmax)
        y.sum().backward()
        assert y.detach().tolist() == [qmax] * 4 + [qmin] * 3 + [qmax, qmin]
        assert torch.isfinite(x.grad).all() and x.grad[:7].abs().max() < 1e-3, (sigma, x.grad)
        assert (x.grad[7:] > -1e-4).all()  # nearer: the true (wide-noise) gradient, not of the wrong sign (beyond rounding)
    x = torch.tensor([12.0], requires_grad=True)  # the reviewer's case: 2-bit unsigned, alpha 1, sigma 1/3
    srq_value(x, torch.tensor([1.0]), torch.tensor([1 / 3]), 0, 3).sum().backward()
    assert abs(float(x.grad)) < 1e-5


def test_low_precision_input_uses_float32_probabilities():
    x = torch.linspace(-3, 3, 101)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype).requires_grad_()
        y = srq_value(xl, torch.tensor([0.5]), torch.tensor([0.2]), -4, 3)
        y.sum().backward()
        assert y.dtype == dtype and torch.isfinite(xl.grad.float()).all()
        ref = x.to(dtype).float().requires_grad_()
        srq_value(ref, torch.tensor([0.5]), torch.tensor([0.2]), -4, 3).sum().backward()
        torch.testing.assert_close(xl.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_forward_is_always_a_grid_point_and_the_argmax():
    torch.manual_seed(0)
    x = torch.randn(2000) * 2
    for sigma in (0.05, 0.3, 2.0):
        pi = srq_probabilities(x.double() / 0.4, sigma / 0.4, -4, 3)  # float64: no underflow far off the grid
        y = srq_value(x, torch.tensor([0.4]), torch.tensor([sigma]), -4, 3)
        codes = y / 0.4
        assert torch.equal(codes, torch.round(codes)) and codes.min() >= -4 and codes.max() <= 3
        assert torch.equal(codes, (pi.argmax(dim=-1) - 4).float())  # highest probability, also for a wide sigma
    # the quantizers in training, with DropBits and a learned width: points of the widest grid
    q = SRQWeight(bits=4, drop_prob=0.5, learn_bits=True, min_bits=2)
    w = torch.randn(8, 20)
    q.calibrate(w)
    q.soft_bits.data.fill_(2.6)
    codes = q.fake_quantize(w) / q.alpha.detach()
    assert torch.allclose(codes, torch.round(codes), atol=1e-5) and codes.min() >= -8 and codes.max() <= 7
    a = SRQActivation(bits=3, drop_prob=0.5)
    xa = torch.randn(4, 5, 6).relu()
    a.calibrate(xa)
    codes = a(xa) / a.alpha.detach()
    assert torch.allclose(codes, torch.round(codes), atol=1e-5) and codes.min() >= 0 and codes.max() <= 7


def test_gradients_reach_alpha_sigma_weight_and_width():
    torch.manual_seed(0)
    w = torch.randn(16, 9, requires_grad=True)
    q = SRQWeight(bits=4, learn_bits=True, min_bits=2)
    q.calibrate(w.detach())
    q.soft_bits.data.fill_(3.4)  # between 3 and 4 bits: both widths train
    (q.fake_quantize(w) * torch.randn(16, 9)).sum().backward()
    for name, grad in [("W", w.grad), ("alpha", q.alpha.grad), ("sigma", q.sigma.grad), ("soft_bits", q.soft_bits.grad)]:
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all(), name
    a = SRQActivation(bits=2)
    x = torch.randn(4, 10, requires_grad=True)
    a.calibrate(x.detach())
    (a(x) * torch.randn(4, 10)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, a.alpha, a.sigma))


def test_drop_probability_zero_changes_nothing():
    """DropBits on, its probability decayed to 0 (linear schedule at the last step): the DropBits code
    runs (a draw is made) and gives the outputs and gradients of DropBits off, weights and inputs."""
    torch.manual_seed(0)
    w = torch.randn(8, 30)
    x = torch.randn(4, 30).relu()
    for make in (lambda **kw: SRQWeight(bits=3, **kw), lambda **kw: SRQActivation(bits=3, **kw)):
        outs = []
        for q in (make(), make(drop_prob=0.5, drop_schedule="linear", drop_min_bits=1, seed=5)):
            q.calibrate(w if isinstance(q, SRQWeight) else x)
            q.set_progress(100, 100, 10)
            assert q.current_drop_prob() == 0.0
            t = (w if isinstance(q, SRQWeight) else x).clone().requires_grad_()
            y = q.fake_quantize(t)
            y.square().sum().backward()
            outs.append((y.detach(), t.grad, q.alpha.grad, q.sigma.grad))
            assert q._calls == (1 if q.drop_prob > 0 else 0)  # with DropBits on, its path ran
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    from sqdist_srq import drop_counts
    assert not drop_counts((1000,), 0.0, 3, torch.Generator(), "cpu").any()


def test_dropbits_coarsens_the_grid_reproducibly():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    q = SRQWeight(bits=3, drop_prob=0.5, seed=1)
    q.calibrate(w)
    alpha = q.alpha.detach()
    fine = torch.clamp(torch.round(w / alpha), -4, 3)
    q.set_progress(7, 100, 10)
    y1 = q.fake_quantize(w) / alpha
    changed = ~torch.isclose(y1, fine)
    assert 0.1 < changed.float().mean() < 0.6  # some weights were put on a coarser grid ...
    # ... the symmetric sub-grids: 2 bits {-3, -1, 1, 3}, 1 bit {-2, 2} (no 0: 2^k levels around 0)
    assert set(y1[changed].round().tolist()) <= {-3.0, -1.0, 1.0, 3.0, -2.0, 2.0}
    assert torch.allclose(y1[changed], y1[changed].round(), atol=1e-5)
    q.set_progress(7, 100, 10)
    assert torch.equal(q.fake_quantize(w) / alpha, y1)  # same seed and step: the same draw (every rank, resume)
    q.set_progress(8, 100, 10)
    assert not torch.equal(q.fake_quantize(w) / alpha, y1)
    q.eval()
    assert torch.equal(q.fake_quantize(w) / alpha, fine)  # no DropBits outside training
    q = SRQWeight(bits=3, drop_prob=0.5, drop_schedule="linear")
    q.calibrate(w)
    q.set_progress(25, 100, 10)
    assert q.current_drop_prob() == 0.375
    q.set_progress(100, 100, 10)
    assert torch.equal(q.fake_quantize(w) / q.alpha.detach(), fine)  # decayed to 0: nothing dropped


def test_dropbits_has_no_bias_on_a_symmetric_input():
    """At 2 bits a dropped weight used to land on {-2, 0} alpha (code +1 always to 0, -1 to -2 or 0:
    a mean shift of about -0.23 alpha per dropped weight); the symmetric dropped grid {-1, 1} alpha
    keeps the mean of a symmetric input at 0, for weights and signed inputs."""
    torch.manual_seed(0)
    q = SRQWeight(bits=2, drop_prob=0.5)
    q.calibrate(torch.randn(64, 64))
    alpha = float(q.alpha.detach())
    v = torch.rand(100_000) * 1.4 * alpha  # inside the full grid's symmetric part (|x| < 1.5 alpha)
    w = torch.cat([v, -v]).reshape(2, -1)
    a = SRQActivation(bits=2, signed=True, drop_prob=0.5)
    a.calibrate(torch.randn(4, 100))
    a.alpha.data.fill_(alpha)
    means, dropped = [], []
    for step in range(10):
        for quantizer in (q, a):
            quantizer.set_progress(step, 100, 10)
        with torch.no_grad():
            yw, ya = q.fake_quantize(w), a(w)
        coarse = yw.abs() == alpha  # +-alpha is on both grids; dropped elements of the old grid were 0 or -2 alpha
        means += [float(yw.mean()) / alpha, float(ya.mean()) / alpha]
        dropped.append(float(yw[(w - yw).abs() > 0.5 * alpha].mean()) / alpha if coarse.any() else 0.0)
    assert max(abs(m) for m in means) < 0.01, means
    assert max(abs(m) for m in dropped) < 0.02, dropped


def test_dropbits_seed_comes_from_train_seed(tmp_path):
    """DropBits' masks follow the run's train.seed (the trainer's set_run_seed hook): two runs that
    differ only in train.seed draw different masks, the same seed the same masks."""
    from sqdist.config import load_recipe
    from sqdist.train import train

    (tmp_path / "tiny.yaml").write_text(TINY)

    def masks(seed, run):
        recipe = load_recipe(str(tmp_path / "tiny.yaml"), [f"run.dir={tmp_path / run}", "train.max_steps=1",
                                                          f"train.seed={seed}"])
        drawn = []

        def on_step(step, model, sq):
            for layer in sq.layers.values():
                q = layer.quantizer
                assert q._run_seed == seed
                q._calls = 0  # this step's first draw again
                drawn.append(q._draw(layer.weight, drop_limit=q.max_bits)[1])
        train(recipe, on_step=on_step)
        return torch.cat([d.reshape(-1) for d in drawn])

    first, again, other = masks(0, "a"), masks(0, "b"), masks(1, "c")
    assert first.any() and torch.equal(first, again)
    assert not torch.equal(first, other) and (first != other).float().mean() > 0.05


# ---------------------------------------------------------------- the fast path against the full-grid reference
def test_window_leaves_out_less_than_float_precision():
    """The window [c - K, c + K] around the mode holds all of pi but less than 2^-24 (float64 full grid),
    for narrow and wide noise, inside the grid, on the boundaries between codes and far outside."""
    qmin, qmax = -128, 127
    u = torch.cat([torch.linspace(-140, 140, 5601, dtype=torch.float64),
                   torch.arange(-128, 128, dtype=torch.float64) + 0.5, torch.tensor([-1e4, 1e4], dtype=torch.float64)])
    c = torch.clamp(torch.round(u), qmin, qmax)
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
    for tau in (1e-3, 0.05, 0.1, 1 / 3, 0.5, 1.0, 2.0, 5.0):
        k = fast.window_half_width(tau, qmax - qmin + 1)
        assert k < 256 if tau <= 2 else True
        pi = srq_probabilities(u, tau, qmin, qmax)
        outside = ((codes - c.unsqueeze(1)).abs() > k)
        left_out = (pi * outside).sum(dim=1).max()
        assert left_out < fast.NEGLECTED_MASS, (tau, k, float(left_out))
        if k > 1:  # and the width is not wasteful: one code less would leave out more somewhere (or nearly)
            tighter = (pi * ((codes - c.unsqueeze(1)).abs() > k - 2)).sum(dim=1).max()
            assert tighter > fast.NEGLECTED_MASS * 1e-3, (tau, k)
    # sigma = alpha / 3 (the start): 15 codes; a 3-bit grid has 8 (all of it); sigma = alpha / 20: 3 codes
    assert fast.window_half_width(1 / 3, 256) == 7 and fast.window_half_width(1 / 3, 8) == 7
    assert fast.window_half_width(0.05, 256) == 1


def _grads(fn, x, step, sigma, g, *grid):
    x, step, sigma = (t.clone().requires_grad_() for t in (x, step, sigma))
    y = fn(x, step, sigma, *grid)
    (y * g.to(y.dtype)).sum().backward()
    return y.detach(), x.grad, step.grad, sigma.grad


GRIDS = [(-2, 1, 0.0), (-4, 3, 0.0), (-8, 7, 0.0), (0, 15, 0.0), (-128, 127, 0.0), (-2, 1, 0.5), (-1, 0, 0.5)]

KERNELS = {"cpu": "cpu", "torch": "cuda", "reference": "reference"}  # SRQ's implementations by SQDIST_KERNELS


def _set_implementation(implementation, monkeypatch):
    """``cpu``: the kernel, exact per element (no table); ``cpu-table``: the kernel's interpolated
    table wherever it can be built (every call tabulates, however small); ``torch``: the PyTorch path
    (what ``SQDIST_KERNELS=cuda`` runs on CPU tensors)."""
    monkeypatch.setenv("SQDIST_KERNELS", KERNELS[implementation.split("-")[0]])
    if implementation.startswith("cpu") and fast.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")
    monkeypatch.setattr(fast, "TABLE_ELEMENTS_PER_NODE", 0 if implementation == "cpu-table" else 10 ** 12)


@pytest.mark.parametrize("implementation", ["cpu", "cpu-table", "torch"])
@pytest.mark.parametrize("grid", GRIDS)
def test_fast_path_matches_the_full_grid_reference(implementation, grid, monkeypatch):
    """Forward equal to the float32 reference; gradients for x, the step and sigma within float
    tolerance of the float64 reference (float32's own reference is further off on wide grids), on
    random inputs with far-off-grid elements, ties between codes, tiny and wide noise."""
    _set_implementation(implementation, monkeypatch)
    qmin, qmax, offset = grid
    torch.manual_seed(qmax)
    step = torch.tensor([0.5])  # x / step exact in float32 and float64: the two paths see the same u
    x = torch.cat([torch.randn(4000) * (qmax - qmin) * 0.3 * step,
                   (torch.arange(qmin, qmax + 1) + offset + 0.5) * step,  # ties
                   torch.tensor([qmax + 9.0, qmax + 1e4, qmin - 50.0, qmin - 3.0, qmax + 1.2]) * step])
    g = torch.randn_like(x)
    for sigma in (1e-7, 0.01, 0.05, 1 / 3, 0.7, 2.0):
        s = torch.tensor([sigma]) * step
        y, gx, gstep, gsigma = _grads(srq_value, x, step, s, g, qmin, qmax, offset)
        y32 = _grads(_srq_reference, x, step, s, g, qmin, qmax, offset)[0]
        _, rx, rstep, rsigma = _grads(_srq_reference, x.double(), step.double(), s.double(), g, qmin, qmax, offset)
        assert torch.equal(y, y32), (sigma, (y - y32).abs().max())
        torch.testing.assert_close(gx.double(), rx, atol=1e-5 * float(rx.abs().max()), rtol=1e-4)
        for got, ref in ((gstep, rstep), (gsigma, rsigma)):  # sums over 4000+ elements of either sign
            bound = float((g.double().abs() * (qmax - qmin + 1)).sum() * max(1.0, float(rx.abs().max())))
            torch.testing.assert_close(got.double(), ref, atol=1e-6 * bound, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["cpu", "cpu-table", "torch"])
def test_quantizers_fast_path_match_the_reference(implementation, monkeypatch):
    """The quantizers as trained (DropBits on weights and inputs, a learned width between two
    integers): the fast path's outputs equal the reference's, and the gradients of the weight, the
    input, alpha, sigma and soft_bits agree (the same draws: one generator per step)."""
    _set_implementation(implementation, monkeypatch)
    torch.manual_seed(0)
    w = torch.randn(32, 72)
    x = torch.randn(8, 72)
    results = {}
    for mode in ("reference", implementation):
        monkeypatch.setenv("SQDIST_KERNELS", KERNELS[mode.split("-")[0]])
        out = []
        for q, t in ((SRQWeight(bits=4, learn_bits=True, min_bits=2, drop_prob=0.3, seed=3), w),
                     (SRQWeight(bits=3, drop_prob=0.4, drop_min_bits=1), w),
                     (SRQActivation(bits=3, drop_prob=0.4), x.relu()),
                     (SRQActivation(bits=4, signed=True, drop_prob=0.4), x)):
            q.calibrate(t)
            if getattr(q, "learn_bits", False):
                q.soft_bits.data.fill_(3.3)
            q.set_progress(4, 100, 10)
            t = t.clone().requires_grad_()
            y = q.fake_quantize(t)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            out.append([y.detach(), t.grad] + [p.grad for _, p in sorted(q.named_parameters())])
        results[mode] = out
    for ref, got in zip(results["reference"], results[implementation]):
        assert torch.equal(ref[0], got[0])
        for r, g in zip(ref[1:], got[1:]):
            torch.testing.assert_close(g, r, atol=1e-4 * (1 + float(r.abs().max())), rtol=1e-3)


def test_learned_widths_move_under_the_regularizer():
    """Only the regularizer: the weight-count weighted average width falls from 4 to the target 3 and
    stops there; the larger layer (more weights) is pushed harder and drops first."""
    torch.manual_seed(0)
    small, large = SRQWeight(bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0), \
        SRQWeight(bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0)
    small.calibrate(torch.randn(8, 10))
    large.calibrate(torch.randn(32, 90))
    layers = {"a": SimpleNamespace(quantizer=small), "b": SimpleNamespace(quantizer=large)}  # as quantize_model's hook
    for name, layer in layers.items():
        layer.quantizer.on_model_quantized(name, layers)
    assert (small.bits, large.bits) == (4, 4)
    opt = torch.optim.SGD([small.soft_bits, large.soft_bits], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        assert large.regularization() is None  # the whole term comes from the group's first layer
        small.regularization().backward()
        opt.step()
    avg = (80 * float(small.expected_bits()) + 2880 * float(large.expected_bits())) / 2960
    assert 2.9 < avg <= 3.05
    assert large.bits == 3 and small.bits == 4 and float(small.soft_bits) > float(large.soft_bits)
    assert small.metrics()["bits"] == 4.0 and large.metrics()["soft_bits"] < 3.5
    assert small.metrics()["avg_bits"] == (80 * 4 + 2880 * 3) / 2960 and abs(small.metrics()["avg_soft_bits"] - avg) < 1e-6
    assert "avg_bits" not in large.metrics()


def test_learned_width_never_drifts_out_of_its_range():
    from sqdist_srq import ClampInward

    b = torch.tensor([1.5, 1.5, 4.5, 4.5, 3.0], requires_grad=True)
    ClampInward.apply(b, 2.0, 4.0).mul(torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])).sum().backward()
    # below 2: a positive gradient (descent lowers b further) is cut, a negative one (back up) passes; above 4 the mirror
    assert b.grad.tolist() == [0.0, -1.0, 0.0, 1.0, 1.0]


def _tiny_model(act=None, **params):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig("srq", params, activations="srq", activation_params=act or {"bits": 3},
                                           sq=SQConfig(ratios=(1.0,))))
    calibrate_activations(model, torch.randn(8, 1, 16, 16))
    return model, sq


def _reg_grads(sq):
    """The model's summed regularizer and each layer's soft_bits gradient from it."""
    quantizers = [layer.quantizer for layer in sq.layers.values()]
    for q in quantizers:
        q.soft_bits.grad = None
    terms = [t for t in (q.regularization() for q in quantizers) if t is not None]
    assert len(terms) == 1
    sum(terms).backward()
    return float(sum(terms)), [float(q.soft_bits.grad) for q in quantizers]


def test_a_second_model_in_the_process_is_independent_of_the_first():
    """Benchmark workers train many models in one process: a model's DropBits draws and its width
    regularizer must not depend on models built (and still alive) before it."""
    params = dict(bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0, drop_prob=0.3)
    x = torch.randn(8, 1, 16, 16)

    def run(model, sq):
        model.train()
        for _, m in model.named_modules():
            if hasattr(m, "set_progress"):
                m.set_progress(5, 100, 10)
        out = model(x).detach()  # with gradients on: the training forward, DropBits on weights and inputs
        with torch.no_grad():
            draws = [layer.quantizer.fake_quantize(layer.weight.reshape(layer.weight.shape[0], -1))
                     for layer in sq.layers.values()]
        return out, draws

    act = {"bits": 3, "drop_prob": 0.3}
    first, first_sq = _tiny_model(act, **params)
    out1, draws1 = run(first, first_sq)
    reg1, grads1 = _reg_grads(first_sq)
    for layer in first_sq.layers.values():  # the first model's widths go down: its average is no one else's
        layer.quantizer.soft_bits.data.fill_(2.0)
    second, second_sq = _tiny_model(act, **params)
    out2, draws2 = run(second, second_sq)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(draws1, draws2))
    reg2, grads2 = _reg_grads(second_sq)
    assert reg2 == reg1 == 1.0 and grads2 == grads1  # avg 4 over the second model only: 1.0 * (4 - 3)
    sizes = [layer.weight.numel() for layer in second_sq.layers.values()]
    assert grads2 == pytest.approx([n / sum(sizes) for n in sizes])
    assert sum(1 for k in second.state_dict() if k.endswith("soft_bits")) == len(sizes)  # each quantizer once
    salts = [m._salt for _, m in second.named_modules() if hasattr(m, "_salt")]
    assert len(set(salts)) == len(salts)  # every quantizer draws its own masks


def test_export_round_trip_at_mixed_widths(tmp_path):
    model, sq = _tiny_model(bits=4, learn_bits=True, min_bits=2)
    widths = {}
    for i, (name, layer) in enumerate(sq.layers.items()):
        layer.quantizer.soft_bits.data.fill_(2 + i % 3)
        widths[name] = 2 + i % 3
    model.train()  # a few SGD steps so the weights are not the initial ones
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 1, 16, 16)).square().mean().backward()
        opt.step()
    assert {n: layer.quantizer.bits for n, layer in sq.layers.items()} == widths
    model.eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    info = export_model(model, tmp_path / "m.safetensors", model_name="test_resnet",
                        model_kwargs={"num_classes": 10, "in_chans": 1})
    assert info["bits"] == [2, 3, 4]
    loaded = load_quantized(tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        packed = json.loads(f.metadata()["packed"])
    assert {n: packed[n]["bits"] for n in widths} == widths
    assert all(packed[n]["levels"] == list(range(-2 ** (b - 1), 2 ** (b - 1))) for n, b in widths.items())


# ---------------------------------------------------------------- training runs
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1, channels: [4, 8, 16, 32], stem_width: 8}}
data: {image_size: 8, batch_size: 32}
quant: {name: srq, params: {bits: 3, learn_bits: true, min_bits: 2, bit_reg: 1.0, target_bits: 2.5, drop_prob: 0.2},
        activations: {name: srq, bits: 2, drop_prob: 0.2}}
sq: {ratios: [1.0]}
optim: {lr: 0.05}
train: {epochs: 1, max_steps: 3, progress: false, log_every: 1}
"""


def _launch(launch_two, tmp_path, worker, out, engine):
    launch_two(worker, tmp_path / "tiny.yaml", out, f"run.dir={tmp_path / 'run'}", f"engine.name={engine}",
               "engine.zero_stage=2", env={"OMP_NUM_THREADS": "1"})
    return json.loads(open(f"{out}.rank1").read())


def _train_two(launch_two, tmp_path, engine):
    """Three steps on two processes: every quantizer parameter moves and stays equal on the ranks;
    the widths reach summary.json and the metrics log."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    steps = _launch(launch_two, tmp_path, "learned_worker.py", tmp_path / "params.json", engine)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["params_equal_rank0"] for r in steps)
    names = list(steps[0]["params"])
    for suffix in (".quantizer.alpha", ".quantizer.sigma", ".quantizer.soft_bits", ".input_quantizer.alpha"):
        moved = [n for n in names if n.endswith(suffix) and steps[0]["params"][n] != steps[-1]["params"][n]]
        assert moved, suffix
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["layer_bits"].values()) <= {2, 3} and 2 <= summary["avg_weight_bits"] <= 3
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("quant/") and k.endswith("/bits") for line in logged for k in line)
    return steps


@pytest.mark.slow
def test_two_process_train(tmp_path, launch_two):
    _train_two(launch_two, tmp_path, "ddp")


@pytest.mark.slow
def test_dropbits_draws_agree_on_two_processes(tmp_path, launch_two):
    """The ranks' global RNGs are seeded differently (seed + rank); DropBits' per-step generators
    are not, so both ranks coarsen the same weights every step."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    steps = _launch(launch_two, tmp_path, "srq_worker.py", tmp_path / "draws.json", "ddp")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["draws"] > 0 for r in steps)
    assert all(r["draws_equal_rank0"] and r["params_equal_rank0"] for r in steps)


@pytest.mark.slow
def test_deepspeed_zero2_train(tmp_path, launch_two):
    _train_two(launch_two, tmp_path, "deepspeed")


def test_the_kernel_tabulates_only_large_tensors_with_a_usable_tau():
    """A resnet-sized weight at the start tau tabulates (spacing tau / 32); a small tensor, a tiny tau
    (too many nodes) or a non-finite one is computed exactly per element (spacing 0)."""
    lv = fast.Level(1.0, -4, 3)
    assert fast.table_spacing(1 / 3, lv, 512 * 512 * 9) == pytest.approx(1 / 3 / fast.TABLE_NODES_PER_TAU)
    assert fast.table_spacing(1 / 3, lv, 1000) == 0.0
    assert fast.table_spacing(1e-6, lv, 512 * 512 * 9) == 0.0
    assert fast.table_spacing(float("nan"), lv, 512 * 512 * 9) == 0.0


def test_learned_width_draws_kernel_equals_reference_and_frequency_is_f():
    """A learned width's per-element draws (``fast.random_widths``): the compiled op and the PyTorch form
    give the same uint8 widths for the same generator seed (shape kept, lo and lo + 1 only), the share of
    ``lo + 1`` is ``f`` within sampling error, another seed draws other widths, and the same seed the same."""
    if fast.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")
    n = 300_007
    for f, lo in ((0.3, 2), (0.925, 3), (0.0, 2), (1.0, 1)):
        got = fast.random_widths((n // 7, 7), f, lo, torch.Generator().manual_seed(11), "cpu")
        seeds = tuple(torch.randint(0, 2 ** 32, (2,), generator=torch.Generator().manual_seed(11),
                                    dtype=torch.int64).tolist())
        ref = fast.random_widths_reference(got.numel(), seeds, f, lo).reshape(got.shape)
        assert got.dtype == torch.uint8 and got.shape == (n // 7, 7) and torch.equal(got, ref)
        assert set(torch.unique(got).tolist()) <= {lo, lo + 1}
        share = float((got == lo + 1).double().mean())
        assert abs(share - f) <= 5 * (f * (1 - f) / got.numel()) ** 0.5 + 1e-12, (f, share)
    a = fast.random_widths((n,), 0.5, 2, torch.Generator().manual_seed(1), "cpu")
    b = fast.random_widths((n,), 0.5, 2, torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(a, fast.random_widths((n,), 0.5, 2, torch.Generator().manual_seed(1), "cpu"))
    assert 0.45 < float((a != b).double().mean()) < 0.55  # independent draws differ on half the elements
    neighbours = (a[1:] == 3) & (a[:-1] == 3)  # consecutive elements independent: P(both) = 1/4
    assert abs(float(neighbours.double().mean()) - 0.25) < 0.01
