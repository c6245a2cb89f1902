"""SRQ with DropBits and learned bit widths (plugins/sqdist-srq): the estimator, DropBits,
the learned widths and their regularizer, export at mixed widths, two processes, ZeRO-2.

    from sqdist import create_quantizer, create_activation_quantizer
    w = create_quantizer("srq", bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0)
    a = create_activation_quantizer("srq", bits=2, drop_prob=0.1)
"""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from sqdist import (QuantConfig, SQConfig, calibrate_activations, create_activation_quantizer, create_quantizer,
                    list_activation_quantizers, list_quantizers, quantize_model)
from sqdist.export import export_model, load_quantized

sqdist_srq = pytest.importorskip("sqdist_srq")
from sqdist_srq import SRQActivation, SRQWeight, srq_probabilities, srq_value  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    torch.manual_seed(0)
    w = torch.randn(8, 30)
    outs = []
    for q in (SRQWeight(bits=3), SRQWeight(bits=3, drop_prob=0.0, drop_min_bits=1, seed=5)):
        q.calibrate(w)
        wg = w.clone().requires_grad_()
        y = q.fake_quantize(wg)
        y.square().sum().backward()
        outs.append((y.detach(), wg.grad, q.alpha.grad, q.sigma.grad))
        assert q._calls == 0  # no draw at all
    for a, b in zip(*outs):
        assert torch.equal(a, b)


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
    assert torch.allclose(torch.remainder(y1[changed], 2), torch.zeros(()))  # ... whose points are even codes
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
    assert torch.equal(q.fake_quantize(w) / q.alpha.detach(), fine) and q._calls == 0  # decayed to 0: no draw


def test_learned_widths_move_under_the_regularizer():
    """Only the regularizer: the weight-count weighted average width falls from 4 to the target 3 and
    stops there; the larger layer (more weights) is pushed harder and drops first."""
    torch.manual_seed(0)
    small, large = SRQWeight(bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0), \
        SRQWeight(bits=4, learn_bits=True, min_bits=2, bit_reg=1.0, target_bits=3.0)
    small.calibrate(torch.randn(8, 10))
    large.calibrate(torch.randn(32, 90))
    assert (small.bits, large.bits) == (4, 4)
    opt = torch.optim.SGD([small.soft_bits, large.soft_bits], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        sum(q.regularization() for q in (small, large)).backward()
        opt.step()
    avg = (80 * float(small.expected_bits()) + 2880 * float(large.expected_bits())) / 2960
    assert 2.9 < avg <= 3.05
    assert large.bits == 3 and small.bits == 4 and float(small.soft_bits) > float(large.soft_bits)
    assert small.metrics()["bits"] == 4.0 and large.metrics()["soft_bits"] < 3.5


def test_learned_width_never_drifts_out_of_its_range():
    from sqdist_srq import ClampInward

    b = torch.tensor([1.5, 1.5, 4.5, 4.5, 3.0], requires_grad=True)
    ClampInward.apply(b, 2.0, 4.0).mul(torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])).sum().backward()
    # below 2: a positive gradient (descent lowers b further) is cut, a negative one (back up) passes; above 4 the mirror
    assert b.grad.tolist() == [0.0, -1.0, 0.0, 1.0, 1.0]


def _tiny_model(**params):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig("srq", params, activations="srq", activation_params={"bits": 3},
                                           sq=SQConfig(ratios=(1.0,))))
    calibrate_activations(model, torch.randn(8, 1, 16, 16))
    return model, sq


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


def _launch(tmp_path, worker, out, engine):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + 7 * len(engine) + len(worker)) % 1000),
           os.path.join(ROOT, "tests", "workers", worker), str(tmp_path / "tiny.yaml"), str(out),
           f"run.dir={tmp_path / 'run'}", f"engine.name={engine}", "engine.zero_stage=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(open(f"{out}.rank1").read())


def _train_two(tmp_path, engine):
    """Three steps on two processes: every quantizer parameter moves and stays equal on the ranks;
    the widths reach summary.json and the metrics log."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    steps = _launch(tmp_path, "learned_worker.py", tmp_path / "params.json", engine)
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
def test_two_process_train(tmp_path):
    _train_two(tmp_path, "ddp")


@pytest.mark.slow
def test_dropbits_draws_agree_on_two_processes(tmp_path):
    """The ranks' global RNGs are seeded differently (seed + rank); DropBits' per-step generators
    are not, so both ranks coarsen the same weights every step."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    steps = _launch(tmp_path, "srq_worker.py", tmp_path / "draws.json", "ddp")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["draws"] > 0 for r in steps)
    assert all(r["draws_equal_rank0"] and r["params_equal_rank0"] for r in steps)


@pytest.mark.slow
def test_deepspeed_zero2_train(tmp_path):
    _train_two(tmp_path, "deepspeed")
