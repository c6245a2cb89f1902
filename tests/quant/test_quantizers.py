"""Quantizers: values on hand-worked examples, scales, row errors, straight-through gradients.

A quantizer maps a weight seen as a matrix (m, n) (row i = output channel i,
flattened) to codes and a per-row scale; ``Q = scale[:, None] * codes``.
"""
import pytest
import torch

import sqdist
from sqdist import BWN, KBit, TWN, create_quantizer, quantization_error
from sqdist.quant.weights import bwn_reference, kbit_mse_reference, kbit_reference, twn_reference, twn_threshold

W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                  [0.1, -0.2, 0.9, -1.0]])


def quantize(name, w, **params):
    q, scale = create_quantizer(name, **params).quantize(w)
    return q, scale


def test_bwn_hand_example():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [0.5, 0.5, -0.5, 0.0]])
    q, scale = quantize("bwn", w)
    # a_i = mean |W_i|; sign(0) counts as +1 so every weight is +-a_i
    torch.testing.assert_close(scale, torch.tensor([2.5, 0.375]))
    torch.testing.assert_close(q, torch.tensor([[2.5, -2.5, 2.5, -2.5],
                                                [0.375, 0.375, -0.375, 0.375]]))
    # e_i = ||W_i - Q_i||_1 / ||W_i||_1 = (1.5+.5+.5+1.5)/10, (3*.125+.375)/1.5
    torch.testing.assert_close(BWN().error(w), torch.tensor([0.4, 0.5]))


def test_twn_row_threshold_hand_example():
    # row 0: t = 0.7 * 2.5 = 1.75 keeps -2, 3, -4 -> a = 3
    # row 1: t = 0.7 * 0.55 = 0.385 keeps 0.9, -1.0 -> a = 0.95
    torch.testing.assert_close(twn_threshold(W), torch.tensor([[1.75], [0.385]]))
    q, scale = quantize("twn", W)
    torch.testing.assert_close(scale, torch.tensor([3.0, 0.95]))
    torch.testing.assert_close(q, torch.tensor([[0.0, -3.0, 3.0, -3.0],
                                                [0.0, 0.0, 0.95, -0.95]]))
    torch.testing.assert_close(TWN().error(W), torch.tensor([3.0 / 10.0, 0.4 / 2.2]))


def test_twn_layer_threshold_is_the_authors_form():
    # mean W = -0.275; mean |W - mean W| = 12.35 / 8; t = 0.7 * 1.54375 for every row
    t = 0.7 * 12.35 / 8
    torch.testing.assert_close(twn_threshold(W, threshold="layer"), torch.tensor([[t], [t]]))
    q, scale = quantize("twn", W, threshold="layer")
    # row 1 has no |w| > 1.0806: it becomes all zeros (error 1); the scale stays per row
    torch.testing.assert_close(scale, torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(q, torch.tensor([[0.0, -3.0, 3.0, -3.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(TWN(threshold="layer").error(W), torch.tensor([0.3, 1.0]))


@pytest.mark.parametrize("bits, scale, q_row, error", [
    # scale="max": L = 2^(k-1) - 1 levels each side, scale = max|w| / L, codes = round(w / scale)
    (2, 2.0, [0.0, -2.0, 2.0, 0.0], 1.8 / 4.2),
    (3, 2.0 / 3, [0.0, -4.0 / 3, 2.0, -2.0 / 3], (0.3 + 0.4 / 3 + 0.1 / 3) / 4.2),
    (4, 2.0 / 7, [2.0 / 7, -8.0 / 7, 2.0, -4.0 / 7], 0.2 / 4.2),
])
def test_kbit_hand_examples(bits, scale, q_row, error):
    w = torch.tensor([[0.3, -1.2, 2.0, -0.7]])
    q, s = quantize("kbit", w, bits=bits, scale="max")
    torch.testing.assert_close(s, torch.tensor([scale]))
    torch.testing.assert_close(q, torch.tensor([q_row]))
    torch.testing.assert_close(KBit(bits, scale="max").error(w), torch.tensor([error]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kbit_codes_are_integers_in_range(bits):
    w = torch.randn(16, 27)
    codes, scale = KBit(bits, scale="max").quantize_codes(w)
    levels = 2 ** (bits - 1) - 1
    assert torch.equal(codes, codes.round())
    assert codes.abs().max() == levels  # the largest |w| of each row maps to the top level
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / levels)


def test_kbit_error_falls_with_bits():
    w = torch.randn(32, 64)
    errors = [KBit(b, scale).error(w).mean().item() for b in (2, 4, 8) for scale in ("max", "mse")]
    errors = errors[::2] + errors[1::2]  # max 2, 4, 8, then mse 2, 4, 8
    assert errors[0] > errors[1] > errors[2] and errors[3] > errors[4] > errors[5]
    errors = errors[3:]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_quantization_error_per_row_and_per_element():
    w = torch.tensor([[1.0, -2.0], [0.0, 0.0], [4.0, 0.0]])
    q = torch.tensor([[1.5, -1.5], [0.0, 0.0], [3.0, 1.0]])
    # row errors: (.5+.5)/3; a zero row is represented exactly -> 0; (1+1)/4
    torch.testing.assert_close(quantization_error(w, q), torch.tensor([1.0 / 3, 0.0, 0.5]))
    # element errors |w - q| / |w|; where w == 0: 0 if q == 0 too (exact), else inf
    inf = float("inf")
    torch.testing.assert_close(quantization_error(w, q, "element"),
                               torch.tensor([[0.5, 0.25], [0.0, 0.0], [0.25, inf]]))


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_bwn_zero_weight_is_not_called_exact(kernels, monkeypatch):
    """BWN maps a weight of exactly 0 to +a: its element error is infinite, so SQ's
    probability for it is 0 (it was 0 error and p ~ 1: always quantized first)."""
    from sqdist.sq import selection_probability

    monkeypatch.setenv("SQDIST_KERNELS", kernels)
    w = torch.tensor([[0.0, 1.0, -2.0, 3.0]])  # a = 1.5: Q = [1.5, 1.5, -1.5, 1.5]
    e = BWN().error(w, "element")
    torch.testing.assert_close(e, torch.tensor([[float("inf"), 0.5, 0.25, 0.5]]))
    p = selection_probability(e.reshape(-1))
    assert p[0] == 0 and torch.allclose(p[1:].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert p[2] > p[1] == p[3]  # the smallest error is the likeliest
    # TWN maps 0 to 0: exact, error 0
    assert TWN().error(w, "element")[0, 0] == 0


@pytest.mark.parametrize("name, params", [("bwn", {}), ("twn", {}), ("twn", {"threshold": "layer"}),
                                          ("kbit", {"bits": 2}), ("kbit", {"bits": 8}), ("kbit", {"bits": 4, "scale": "max"}),
                                          ("kbit_pow2", {"bits": 4})])
def test_forward_is_q_with_straight_through_gradient(name, params, monkeypatch):
    quantizer = create_quantizer(name, **params)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)  # a conv weight: rows are output channels
    out = quantizer(w)  # the fused kernel where one serves it (SQDIST_KERNELS=auto)
    monkeypatch.setenv("SQDIST_KERNELS", "reference")  # the expected value: the pure-PyTorch reference
    q, _ = quantizer.quantize(w.detach().reshape(8, -1))
    reference = {"bwn": lambda x: bwn_reference(x), "twn": lambda x: twn_reference(x, **params),
                 "kbit": lambda x: (kbit_reference if params.get("scale") == "max" else kbit_mse_reference)(
                     x, params["bits"])}.get(name)
    if reference is not None:  # a built-in: also against the reference function itself
        codes, scale = reference(w.detach().reshape(8, -1))
        torch.testing.assert_close(q, codes * scale[:, None])
    assert out.shape == w.shape
    torch.testing.assert_close(out.detach(), q.reshape(w.shape))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # d sum(q(w)) / dw = 1 straight through


class HalvedBWN(BWN):
    """A subclass that changes BWN's math by overriding ``quantize`` only."""

    def quantize(self, w):
        q, scale = super().quantize(w)
        return q / 2, scale / 2


class NoisyTWN(TWN):
    """Overrides ``error`` only: the selection must see this error, not the kernel's."""

    def error(self, w, granularity="channel"):
        return torch.full(w.shape[:1] if granularity == "channel" else w.shape, 0.125)


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_a_subclass_that_overrides_its_math_runs_its_own_code(kernels, monkeypatch):
    """The fused op computes BWN/TWN/k-bit exactly; a subclass overriding forward, quantize,
    hybrid or error is no longer that math, whatever SQDIST_KERNELS says."""
    from sqdist.quant.weights import layer_errors

    monkeypatch.setenv("SQDIST_KERNELS", kernels)
    w = torch.randn(6, 10)
    half, plain = HalvedBWN(), BWN()
    assert half._spec() is None and NoisyTWN()._spec() is None
    codes, scale = bwn_reference(w)
    torch.testing.assert_close(half(w), codes * scale[:, None] / 2)
    mask = torch.tensor([True, False] * 3)
    torch.testing.assert_close(half.hybrid(w, mask), torch.where(mask[:, None], codes * scale[:, None] / 2, w))
    torch.testing.assert_close(plain.hybrid(w, mask), torch.where(mask[:, None], codes * scale[:, None], w))
    errors = layer_errors([NoisyTWN(), TWN()], [w, w])
    assert torch.equal(errors[0], torch.full((6,), 0.125))
    torch.testing.assert_close(errors[1], quantization_error(w, TWN().quantize(w)[0]))


def test_pow2_plugin_scale_is_a_power_of_two_that_does_not_saturate():
    w = torch.randn(16, 20)
    codes, scale = create_quantizer("kbit_pow2", bits=4).quantize_codes(w)
    torch.testing.assert_close(torch.exp2(torch.log2(scale).round()), scale)
    assert (scale >= w.abs().amax(dim=1) / 7).all()
    assert (scale < 2 * w.abs().amax(dim=1) / 7).all()
    assert codes.abs().max() <= 7


def test_config_rebuilds_the_same_quantizer():
    for q in (BWN(), TWN(0.6, "layer"), KBit(3), KBit(2, "lsq")):
        again = create_quantizer(q.quantizer_name, **q.config())
        assert type(again) is type(q) and again.config() == q.config()
    assert sqdist.TWN(0.6, "layer").extra_repr() == "delta=0.6, threshold='layer'"
