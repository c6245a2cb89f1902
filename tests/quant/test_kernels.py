"""The fused SQ kernels against the PyTorch references in sqdist.quant.weights: the C++ op (csrc/)
on CPU tensors and, where a GPU is present, the Triton kernels on CUDA tensors (without a GPU the
Triton kernels are held to the references in tests/quant/test_triton.py, under Triton's interpreter).

fp32: codes and masks exactly, scales / Q / errors within 1e-6 relative.
bf16 / fp16: the kernels compute in fp32, so codes and scales are held to the
reference run on ``w.float()`` (codes exactly, scales within one ulp of the
dtype), Q exactly to ``codes * scale`` in the dtype, and the errors within 1e-6
to ``quantization_error`` of the kernel's own Q taken in fp32; the error of the
reference run in the low-precision dtype itself agrees to 2e-2 on average.

TWN codes may differ where |w| equals the threshold to within float rounding
(the two sums add in different orders); only those entries are allowed to differ.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sqdist import BWN, KBit, TWN, QuantConfig, SQConfig, quantize_model
from sqdist.quant import kernels
from sqdist.quant.weights import bwn_reference, kbit_reference, quantization_error, twn_reference, twn_threshold

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False): the Triton kernels run "
                         "under the interpreter in tests/quant/test_triton.py instead")
BACKEND = {"cpu": "cpu", "cuda": "triton"}  # the fast path auto picks for a tensor on each device
DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])]

# (name, reference-keyword-arguments): every quantizer the kernels implement
SPECS = [
    ("bwn", {}),
    ("twn", {"delta": 0.7, "threshold": "row"}),
    ("twn", {"delta": 0.7, "threshold": "layer"}),
    ("twn", {"delta": 0.5, "threshold": "row"}),
    ("kbit", {"bits": 2}),
    ("kbit", {"bits": 4}),
    ("kbit", {"bits": 8}),
]
SPEC_IDS = ["bwn", "twn-row", "twn-layer", "twn-d0.5", "kbit2", "kbit4", "kbit8"]
SHAPES = [(1, 1), (1, 7), (5, 1), (3, 4), (17, 33), (64, 576), (7, 4099)]


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    """Every test here runs with SQDIST_KERNELS=auto and needs the CPU op built."""
    monkeypatch.setenv("SQDIST_KERNELS", "auto")
    assert kernels.ops("cpu") is not None, "the CPU SQ kernel did not build (see the warning above)"


def reference(w, kind, **kw):
    """codes, scale, Q of the PyTorch reference on w (m, n)."""
    if kind == "bwn":
        codes, scale = bwn_reference(w)
    elif kind == "twn":
        codes, scale = twn_reference(w, kw["delta"], kw["threshold"])
    else:
        codes, scale = kbit_reference(w, kw["bits"])
    return codes, scale, codes * scale[:, None]


def fused(w, kind, **kw):
    res = kernels.quantize_many([w], kind, **kw)
    assert res is not None, f"no compiled op for a {w.dtype} tensor on {w.device}"
    return res


def assert_codes_equal(got, want, w, kind, **kw):
    """Equal codes; for TWN, entries with |w| at the threshold (to float rounding) may differ.

    Returns the rows where codes differ (their scale legitimately differs too)."""
    differ = got != want
    if kind == "twn":
        thr = twn_threshold(w.float(), kw["delta"], kw["threshold"]).expand_as(w)
        at_threshold = (w.float().abs() - thr).abs() <= 1e-6 * thr
        assert not (differ & ~at_threshold).any(), f"{int((differ & ~at_threshold).sum())} codes differ"
        assert int(differ.sum()) <= max(1, w.numel() // 100000)
    else:
        assert not differ.any(), f"{int(differ.sum())} codes differ"
    return differ.any(dim=1)


def assert_matches_reference(w, res, kind, **kw):
    """codes/scales/Q/channel errors of one fp32 weight against the reference (1e-6)."""
    codes, scale, q = reference(w, kind, **kw)
    flipped = assert_codes_equal(res.codes[0], codes, w, kind, **kw)
    same = ~flipped
    torch.testing.assert_close(res.scales[0][same], scale[same], rtol=1e-6, atol=0)
    if flipped.any():  # TWN rows with a code at the threshold: scale = mean |w| over the kernel's kept set
        kept = res.codes[0][flipped] != 0
        want = (w[flipped].abs() * kept).sum(1) / kept.sum(1).clamp(min=1)
        torch.testing.assert_close(res.scales[0][flipped], want, rtol=1e-6, atol=0)
    q_kernel = res.codes[0] * res.scales[0][:, None]
    torch.testing.assert_close(res.errors[0], quantization_error(w, q_kernel), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.errors[0][same], quantization_error(w, q)[same], rtol=1e-6, atol=1e-7)
    return q_kernel, q


def weight(shape, dtype=torch.float32, device="cpu", seed=0):
    """Random weight with what real layers have: uneven rows, exact zeros, a zero row."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.rand(shape[0], generator=g).add(0.1).view(-1, *([1] * (len(shape) - 1)))
    w = torch.randn(shape, generator=g) * row_scale
    w[torch.rand(shape, generator=g) < 0.05] = 0.0
    if shape[0] >= 3:
        w[1] = 0.0
    return w.to(device=device, dtype=dtype)


# ------------------------------------------------------------------ fp32 equality
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_fp32_matches_reference(device, spec, shape):
    kind, kw = spec
    w = weight(shape, device=device)
    res = fused(w, kind, codes=True, scales=True, values=True, error="channel", **kw)
    q_kernel, q = assert_matches_reference(w, res, kind, **kw)
    assert torch.equal(res.values[0], q_kernel)  # Q is exactly codes * scale
    torch.testing.assert_close(res.values[0], q, rtol=1e-6, atol=0)
    # per element, |w - q| / |w| cancels where q ~ w: one ulp of the scale (allowed above)
    # shows up magnified, so the element errors are held to the kernel's own Q
    elem = fused(w, kind, error="element", **kw).errors[0]
    torch.testing.assert_close(elem, quantization_error(w, res.values[0], "element"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_hybrid_weight_follows_the_mask(device, spec):
    kind, kw = spec
    w = weight((33, 75), device=device, seed=1)
    _, _, q = reference(w, kind, **kw)
    g = torch.Generator().manual_seed(2)
    rows = (torch.rand(33, generator=g) < 0.5).to(device)
    elems = (torch.rand(33, 75, generator=g) < 0.5).to(device)
    for mask, full in ((rows, rows[:, None].expand_as(w)), (elems, elems)):
        got = fused(w, kind, masks=[mask], values=True, **kw).values[0]
        assert torch.equal(got[~full], w[~full])  # full-precision entries: W itself
        torch.testing.assert_close(got[full], q[full], rtol=1e-6, atol=0)
    none = torch.zeros(33, dtype=torch.bool, device=device)
    assert torch.equal(fused(w, kind, masks=[none], values=True, **kw).values[0], w)


# ------------------------------------------------------------------ bf16 / fp16
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_low_precision_matches_fp32_reference(device, dtype, spec):
    kind, kw = spec
    w = weight((40, 301), dtype=dtype, device=device, seed=3)
    codes32, scale32, _ = reference(w.float(), kind, **kw)
    res = fused(w, kind, codes=True, scales=True, values=True, error="channel", **kw)
    assert res.codes[0].dtype == dtype and res.scales[0].dtype == dtype and res.errors[0].dtype == torch.float32
    assert_codes_equal(res.codes[0].float(), codes32, w, kind, **kw)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(res.scales[0].float(), scale32, rtol=ulp, atol=0)
    q = res.codes[0] * res.scales[0][:, None]  # the reference formula, in the dtype
    assert torch.equal(res.values[0], q)
    torch.testing.assert_close(res.errors[0], quantization_error(w.float(), q.float()), rtol=1e-6, atol=1e-7)
    # the reference run entirely in the low-precision dtype: same errors up to its roundings
    _, _, q_low = reference(w, kind, **kw)
    assert (res.errors[0] - quantization_error(w, q_low)).abs().mean() < 2e-2


# ------------------------------------------------------------------ layouts and batching
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_weights(device):
    base = weight((64, 3, 3, 48), device=device, seed=4)
    w4d = base.permute(0, 3, 1, 2)  # an (m, c, kh, kw) weight in channels-last memory
    assert not w4d.is_contiguous()
    w2d = w4d.reshape(64, -1)
    for quantizer, ref in ((BWN(), bwn_reference), (KBit(4, scale="max"), lambda w: kbit_reference(w, 4))):
        codes, scale = ref(w2d)
        got_codes, got_scale = quantizer.quantize_codes(w4d[:, :, :, :].reshape(64, -1))
        assert torch.equal(got_codes, codes)
        torch.testing.assert_close(got_scale, scale, rtol=1e-6, atol=0)
    strided = w2d[::2, 1::3]  # a strided view, rows and columns
    codes, scale, q = reference(strided, "twn", delta=0.7, threshold="row")
    res = fused(strided, "twn", codes=True, scales=True, error="channel", delta=0.7)
    assert_codes_equal(res.codes[0], codes, strided, "twn", delta=0.7, threshold="row")
    torch.testing.assert_close(res.errors[0], quantization_error(strided, q), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_many_weights_in_one_call(device):
    ws = [weight(s, device=device, seed=i) for i, s in enumerate([(8, 9), (0, 5), (1, 1), (130, 27), (3, 1000)])]
    ws.append(weight((5, 6), dtype=torch.bfloat16, device=device))  # another dtype: its own launch
    res = kernels.quantize_many(ws, "kbit", bits=3, codes=True, scales=True, error="channel")
    assert [c.shape for c in res.codes] == [w.shape for w in ws]
    for w, c, s, e in zip(ws, res.codes, res.scales, res.errors):
        codes, scale, q = reference(w.float(), "kbit", bits=3)
        assert torch.equal(c.float(), codes)
        if w.dtype == torch.float32:
            torch.testing.assert_close(s, scale, rtol=1e-6, atol=0)
            torch.testing.assert_close(e, quantization_error(w, q), rtol=1e-6, atol=1e-7)


def test_bad_arguments_say_what_is_wrong():
    op = kernels.ops("cpu").quantize
    with pytest.raises(RuntimeError, match=r"shape \[2, 3, 4\]; allowed: \(m, n\)"):
        op([torch.zeros(2, 3, 4)], 0, 0.7, 1, False, [], 1)
    with pytest.raises(RuntimeError, match="dtype Double; allowed: float32, float16, bfloat16"):
        op([torch.zeros(2, 3, dtype=torch.float64)], 0, 0.7, 1, False, [], 1)
    with pytest.raises(RuntimeError, match="kind=7; allowed"):
        op([torch.zeros(2, 3)], 7, 0.7, 1, False, [], 1)
    with pytest.raises(RuntimeError, match=r"mask 0 has shape \[3\]"):
        op([torch.zeros(2, 3)], 0, 0.7, 1, False, [torch.zeros(3, dtype=torch.bool)], 1)
    # float64 is not a kernel dtype: the quantizers use the reference for it
    w = torch.randn(4, 5, dtype=torch.float64)
    assert kernels.quantize_many([w], "bwn", codes=True) is None
    assert torch.equal(BWN().quantize_codes(w)[0], bwn_reference(w)[0])


# ------------------------------------------------------------------ choice of implementation
def test_sqdist_kernels_chooses_per_device(monkeypatch):
    w = torch.zeros(2, 2)
    for value, want in (("reference", None), ("cpu", "cpu"), ("cuda", None), ("auto", "cpu"), ("AUTO", "cpu")):
        monkeypatch.setenv("SQDIST_KERNELS", value)
        assert kernels.backend_for(w) == want, value
    monkeypatch.setenv("SQDIST_KERNELS", "fast")
    with pytest.raises(ValueError, match="SQDIST_KERNELS='fast'; allowed: reference, cpu, cuda, triton, auto"):
        kernels.backend_for(w)
    monkeypatch.setenv("SQDIST_KERNELS", "reference")
    assert kernels.quantize_many([w], "bwn", codes=True) is None
    assert kernels.hybrid_weight(w, "bwn") is None


def test_failed_build_warns_once_and_uses_the_reference(tmp_path):
    """A cache path that is a file makes the JIT build fail for real (in a fresh process)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    script = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        from sqdist import TWN
        from sqdist.quant.kernels import _build
        _build.prebuilt = lambda backend: None  # ignore an install-time build: exercise the JIT path
        from sqdist.quant.weights import twn_reference
        w = torch.randn(6, 10)
        q = TWN()
        for _ in range(3):
            codes, scale = q.quantize_codes(w)
            e = q.error(w)
        ref_codes, ref_scale = twn_reference(w)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        print("OK")
    """)
    env = dict(os.environ, SQDIST_KERNELS="cpu", SQDIST_KERNEL_CACHE=str(blocker / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
    warned = [ln for ln in proc.stderr.splitlines() if "compiled cpu SQ kernels are unavailable" in ln]
    assert len(warned) == 1, proc.stderr


# ------------------------------------------------------------------ gradients and layers
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_gradients_through_fused_path_equal_reference(device, granularity, monkeypatch):
    def run(mode):
        monkeypatch.setenv("SQDIST_KERNELS", mode)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 5)).to(device)
        sq = quantize_model(model, QuantConfig("twn", keep_stem_and_classifier=False,
                                               sq=SQConfig(ratios=(0.5,), granularity=granularity)))
        x = torch.randn(4, 3, 8, 8, device=device)
        sq.draw_masks()
        out = model(x)
        out.square().sum().backward()
        masks = [layer.sq_mask.clone() for layer in sq.layers.values()]
        return out.detach(), [p.grad.clone() for p in model.parameters()], masks, sq

    out_ref, grads_ref, masks_ref, _ = run("reference")
    out_k, grads_k, masks_k, sq = run("auto")
    assert all(kernels.backend_for(layer.weight) == BACKEND[device] for layer in sq.layers.values())
    for a, b in zip(masks_ref, masks_k):
        assert torch.equal(a, b)  # same errors -> same draw
    torch.testing.assert_close(out_k, out_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_k, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_hybrid_gradient_is_straight_through(device):
    w = weight((6, 2, 3, 3), device=device).requires_grad_()
    g = torch.randn(6, 2, 3, 3, device=device)
    mask = torch.tensor([True, False, True, True, False, False], device=device)
    for quantizer in (BWN(), TWN(threshold="layer"), KBit(3, scale="max")):
        w.grad = None
        out = quantizer.hybrid(w, mask)
        assert out.grad_fn is not None and "HybridWeight" in type(out.grad_fn).__name__
        (out * g).sum().backward()
        assert torch.equal(w.grad, g)


# ------------------------------------------------------------------ resnet50
@pytest.mark.slow
@pytest.mark.parametrize("spec", [("bwn", {}), ("twn", {"delta": 0.7, "threshold": "row"}),
                                  ("twn", {"delta": 0.7, "threshold": "layer"}), ("kbit", {"bits": 4})],
                         ids=["bwn", "twn-row", "twn-layer", "kbit4"])
def test_resnet50_weights_match_reference(spec, resnet50_weights):
    kind, kw = spec
    res = kernels.quantize_many(resnet50_weights, kind, codes=True, scales=True, error="channel", **kw)
    for w, c, s, e in zip(resnet50_weights, res.codes, res.scales, res.errors):
        assert_matches_reference(w, kernels.Fused([], [c], [s], [e]), kind, **kw)


@pytest.fixture(scope="module")
def resnet50_weights():
    """The (m, n) weights quantize_model quantizes in timm's resnet50 (stem and fc stay fp)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    sq = quantize_model(model, QuantConfig("bwn"))
    ws = [layer.weight.detach().reshape(layer.weight.shape[0], -1) for layer in sq.layers.values()]
    assert len(ws) == 52 and sum(w.numel() for w in ws) > 20_000_000
    return ws


# ------------------------------------------------------------------ all layers at once
def test_layer_errors_groups_layers_and_respects_overrides():
    """SQController.errors() path: one fused call per quantizer setting; a subclass that
    changes the math keeps its own (reference) error."""

    class HalfScaleTWN(TWN):
        def quantize_codes(self, w):
            codes, scale = twn_reference(w, self.delta, self.threshold)
            return codes, scale / 2

    from sqdist.quant.weights import layer_errors

    qs = [BWN(), TWN(), KBit(4, scale="max"), TWN(), HalfScaleTWN(), TWN(threshold="layer")]
    ws = [weight((8 + i, 20 + 3 * i), seed=i) for i in range(len(qs))]
    got = layer_errors(qs, ws)
    for q, w, e in zip(qs, ws, got):
        codes, scale = q.quantize_codes(w)
        torch.testing.assert_close(e, quantization_error(w, codes * scale[:, None]), rtol=1e-6, atol=1e-7)
    assert qs[4]._spec() is None and qs[1]._spec() == {"kind": "twn", "delta": 0.7, "threshold": "row"}
    elem = layer_errors(qs[:2], ws[:2], "element")
    assert [e.shape for e in elem] == [w.shape for w in ws[:2]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kbit_mse_search_kernel_is_the_reference(bits):
    """``mse_errors`` (every candidate of a row in one pass) against the PyTorch search: the errors
    within float32 summation rounding, and the chosen ratio the reference's or one whose error ties
    it to that rounding; rows of zeros, one element, values exactly half-way between codes."""
    from sqdist.quant.kbit_mse import MSE_GRID, kbit_mse_ratio

    assert hasattr(kernels.ops("cpu"), "mse_errors")
    torch.manual_seed(bits)
    levels = 2 ** (bits - 1) - 1
    for m, n in ((96, 4608), (64, 27), (5, 1)):
        w = torch.randn(m, n) * 0.05
        w[0] = 0.0
        if n > 8:
            w[1, :8] = (torch.arange(8) + 0.5) * w[1].abs().max() / levels / 2  # half-way at ratio 0.5
        top = w.abs().amax(dim=1) / levels
        safe = torch.where(top > 0, top, torch.ones_like(top))
        ratios = torch.rand(m, 33) * 0.9 + 0.1
        errors = kernels.ops("cpu").mse_errors(w, safe, ratios, levels)
        s = (safe[:, None] * ratios)[:, :, None]
        ref = (torch.div(w[:, None, :], s).round().clamp(-levels, levels) * s - w[:, None, :]).square().double().sum(2)
        torch.testing.assert_close(errors.double(), ref, rtol=1e-5, atol=1e-12)
        got = kbit_mse_ratio(w, bits, MSE_GRID)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SQDIST_KERNELS", "reference")
            want = kbit_mse_ratio(w, bits, MSE_GRID)
        err = lambda r: (torch.div(w, safe[:, None] * r[:, None]).round().clamp(-levels, levels)  # noqa: E731
                         * (safe[:, None] * r[:, None]) - w).square().double().sum(1)
        differ = got != want
        assert differ.float().mean() <= 0.02, int(differ.sum())
        torch.testing.assert_close(err(got)[differ], err(want)[differ], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kbit_codes_at_ratio_kernel_is_the_reference(bits, monkeypatch):
    """``kbit_codes_at_ratio`` (compiled, one pass a row) against its PyTorch form: codes and scales
    equal, and the same gradient for ``w`` through the scale's max|w_i|; a zero row, ties."""
    from sqdist.quant.kbit_mse import kbit_codes_at_ratio, kbit_codes_at_ratio_reference

    assert hasattr(kernels.ops("cpu"), "kbit_codes_at_ratio")
    torch.manual_seed(bits)
    w = torch.randn(64, 577) * 0.05
    w[0] = 0.0
    w[1, :5] = torch.tensor([0.5, 1.5, -2.5, 0.0, 3.0]) * 0.01
    ratio = torch.rand(64) * 0.9 + 0.1
    ratio[1] = 1.0
    results = []
    for mode in ("cpu", "reference"):
        monkeypatch.setenv("SQDIST_KERNELS", mode)
        ws = w.clone().requires_grad_()
        fn = kbit_codes_at_ratio if mode == "cpu" else kbit_codes_at_ratio_reference
        codes, scale = fn(ws, ratio, bits)
        (codes.detach() * scale[:, None] * torch.linspace(-1, 1, w.numel()).reshape(w.shape)).sum().backward()
        results.append((codes, scale.detach(), ws.grad))
    (c, s, g), (rc, rs, rg) = results
    assert torch.equal(c, rc) and torch.equal(s, rs) and torch.equal(g, rg)
    assert s[0] == 0 and g[1].abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_kbit_values_at_ratio_kernel_is_the_reference(bits, monkeypatch):
    """``kbit_values_at_ratio`` (the compiled op writing ``codes * scale``) equals the reference codes times
    the reference scales bit for bit, a zero row included, with the kernels and without them."""
    from sqdist.quant.kbit_mse import kbit_codes_at_ratio_reference, kbit_values_at_ratio

    torch.manual_seed(bits)
    w = torch.randn(48, 301) * 0.05
    w[5] = 0.0
    ratio = torch.rand(48) * 0.9 + 0.1
    codes, scale = kbit_codes_at_ratio_reference(w, ratio, bits)
    for mode in ("cpu", "reference"):
        monkeypatch.setenv("SQDIST_KERNELS", mode)
        q, s = kbit_values_at_ratio(w, ratio, bits)
        assert torch.equal(q, codes * scale[:, None]) and torch.equal(s, scale)
        assert not q[5].any() and s[5] == 0 and q.abs().sum() > 0
