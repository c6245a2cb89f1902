"""The Triton kernels (:mod:`sqdist.quant.kernels.triton_ops`) held to their PyTorch references.

On a GPU they run natively on CUDA tensors; without one, on CPU tensors in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are imported). Sizes stay small for
the interpreter, but odd (rows of 1, 37 and 2100 elements: several blocks and a ragged tail), with
zero rows, NaN rows, empty weights and non-contiguous views.

fp32: codes, Q and the hybrid weight exactly, scales and error sums within float32 summation order
(the kernels sum in float64); NaN where the reference has NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

from sqdist import BWN, KBit, TWN
from sqdist.quant import kernels
from sqdist.quant.kbit_mse import _best_ratio_reference, kbit_codes_at_ratio, kbit_codes_at_ratio_reference, kbit_mse_ratio
from sqdist.quant.lsq import lsq_quantize, lsq_quantize_reference
from sqdist.quant.weights import bwn_reference, kbit_reference, layer_errors, quantization_error, twn_reference
from sqdist.sq import select

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = [("bwn", {}), ("twn", {"delta": 0.7, "threshold": "row"}), ("twn", {"delta": 0.7, "threshold": "layer"}),
         ("kbit", {"bits": 2}), ("kbit", {"bits": 4}), ("kbit", {"bits": 8})]
SPEC_IDS = ["bwn", "twn-row", "twn-layer", "kbit2", "kbit4", "kbit8"]


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """Every test here sends its tensors to the Triton kernels (SQDIST_KERNELS=triton)."""
    monkeypatch.setenv("SQDIST_KERNELS", "triton")
    assert kernels.ops("triton") is not None, "triton is not importable (see the warning above)"
    if DEVICE == "cpu":
        assert kernels.ops("triton").INTERPRETED, "no GPU and TRITON_INTERPRET is not 1: nothing can run the kernels"
    return kernels.ops("triton")


def weight(m, n, seed=0, dtype=torch.float32, nan_row=True):
    """Uneven rows, exact zeros, a zero row (1) and a row with one NaN (3)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).add(0.1)
    w[torch.rand(m, n, generator=g) < 0.05] = 0.0
    if m > 1:
        w[1] = 0.0
    if m > 3 and nan_row:
        w[3, n // 2] = float("nan")
    return w.to(DEVICE, dtype)


def reference(w, kind, **kw):
    """codes, scale of the PyTorch reference."""
    if kind == "bwn":
        return bwn_reference(w)
    if kind == "twn":
        return twn_reference(w, kw["delta"], kw["threshold"])
    return kbit_reference(w, kw["bits"])


def run(ws, kind, masks=None, **kw):
    res = kernels.quantize_many(ws, kind, masks=masks, **kw)
    assert res is not None and kernels.backend_for(ws[0]) == "triton"
    return res


def same(a, b):
    """Equal, NaN where the other is NaN (and -0.0 == 0.0)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# ------------------------------------------------------------------ quantize: codes, scales, Q, errors
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_quantize_matches_reference(spec):
    kind, kw = spec
    for m, n in ((9, 37), (5, 1), (2, 2100)):
        w = weight(m, n, seed=n)
        codes, scale = reference(w, kind, **kw)
        q = codes * scale[:, None]
        res = run([w], kind, codes=True, scales=True, values=True, error="channel", **kw)
        assert same(res.codes[0], codes), (m, n)
        torch.testing.assert_close(res.scales[0], scale, rtol=1e-6, atol=0, equal_nan=True)
        assert same(res.values[0], res.codes[0] * res.scales[0][:, None])  # Q is codes * scale, exactly
        torch.testing.assert_close(res.errors[0], quantization_error(w, q), rtol=1e-5, atol=1e-7, equal_nan=True)
        elem = run([w], kind, error="element", **kw).errors[0]
        torch.testing.assert_close(elem, quantization_error(w, res.values[0], "element"), rtol=1e-6, atol=1e-7,
                                   equal_nan=True)
        if m > 3:  # the NaN row is NaN in the scale (all kinds but k-bit's codes stay finite elsewhere)
            assert scale[3].isnan() and res.scales[0][3].isnan() and res.errors[0][1] == 0


@pytest.mark.parametrize("spec", SPECS[:4], ids=SPEC_IDS[:4])
def test_hybrid_weight_follows_row_and_element_masks(spec):
    kind, kw = spec
    w = weight(11, 53, seed=1, nan_row=False)
    codes, scale = reference(w, kind, **kw)
    q = codes * scale[:, None]
    g = torch.Generator().manual_seed(2)
    rows = (torch.rand(11, generator=g) < 0.5).to(DEVICE)
    elems = (torch.rand(11, 53, generator=g) < 0.5).to(DEVICE)
    for mask, full in ((rows, rows[:, None].expand_as(w)), (elems, elems)):
        got = run([w], kind, masks=[mask], values=True, **kw).values[0]
        assert torch.equal(got[~full], w[~full])  # full-precision entries: W itself
        torch.testing.assert_close(got[full], q[full], rtol=1e-6, atol=0)  # the scale within summation order
    assert torch.equal(run([w], kind, masks=[torch.zeros_like(rows)], values=True, **kw).values[0], w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_weights_compute_in_fp32(dtype):
    w = weight(7, 45, seed=3, dtype=dtype, nan_row=False)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for kind, kw in (("bwn", {}), ("twn", {"delta": 0.7, "threshold": "row"}), ("kbit", {"bits": 4})):
        codes32, scale32 = reference(w.float(), kind, **kw)
        res = run([w], kind, codes=True, scales=True, values=True, **kw)
        assert res.codes[0].dtype == dtype and torch.equal(res.codes[0].float(), codes32)
        torch.testing.assert_close(res.scales[0].float(), scale32, rtol=ulp, atol=0)
        q = res.codes[0] * res.scales[0][:, None]  # the reference formula, in the dtype
        if DEVICE == "cpu" and dtype == torch.bfloat16:
            # numpy has no bfloat16: the interpreter's float32 -> bfloat16 conversion does not round half
            # to even as a GPU (and torch) does, so it may land one bfloat16 ulp off
            torch.testing.assert_close(res.values[0], q, rtol=2 * ulp, atol=0)
        else:
            assert torch.equal(res.values[0], q)


def test_non_contiguous_and_empty_weights():
    base = weight(16, 3 * 3 * 6, seed=4, nan_row=False).reshape(16, 3, 3, 6)
    w4d = base.permute(0, 3, 1, 2)  # an (m, c, kh, kw) weight in channels-last memory
    strided = w4d.reshape(16, -1)[::3, 1::2]
    assert not w4d.is_contiguous() and not strided.is_contiguous()
    for quantizer, ref in ((BWN(), bwn_reference), (TWN(), twn_reference), (KBit(3, scale="max"), lambda w: kbit_reference(w, 3))):
        for w in (w4d.reshape(16, -1), strided):
            codes, scale = ref(w)
            got_codes, got_scale = quantizer.quantize_codes(w)
            assert torch.equal(got_codes, codes)
            torch.testing.assert_close(got_scale, scale, rtol=1e-6, atol=0)
    empty = torch.zeros(0, 5, device=DEVICE)
    res = run([empty, strided], "twn", codes=True, scales=True, error="channel", delta=0.7)
    assert res.codes[0].shape == (0, 5) and res.scales[0].shape == (0,) and res.errors[0].shape == (0,)
    assert res.codes[1].shape == strided.shape


def test_hybrid_gradient_is_straight_through():
    w = weight(6, 18, seed=5, nan_row=False).reshape(6, 2, 3, 3).requires_grad_()
    g = torch.randn(6, 2, 3, 3, device=DEVICE)
    for mask in (torch.tensor([True, False, True, True, False, False], device=DEVICE), torch.rand(6, 2, 3, 3) < 0.5):
        mask = mask.to(DEVICE)
        for quantizer in (BWN(), TWN(threshold="layer"), KBit(3, scale="max")):
            w.grad = None
            out = quantizer.hybrid(w, mask)
            assert "HybridWeight" in type(out.grad_fn).__name__  # the fused path, not the reference's where()
            (out * g).sum().backward()
            assert torch.equal(w.grad, g)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("SQDIST_KERNELS", "reference")
                want = quantizer.hybrid(w, mask)
            torch.testing.assert_close(out, want, rtol=1e-6, atol=0)  # the scale within summation order


def test_sq_selection_errors_and_masks_match_reference():
    qs = [BWN(), TWN(), KBit(4, scale="max"), TWN(threshold="layer")]
    ws = [weight(8 + 3 * i, 20 + 7 * i, seed=i, nan_row=False) for i in range(len(qs))]
    for granularity in ("channel", "element"):
        got = layer_errors(qs, ws, granularity)
        for q, w, e in zip(qs, ws, got):
            codes, scale = reference(w, q.quantizer_name, **q.config())
            torch.testing.assert_close(e, quantization_error(w, codes * scale[:, None], granularity), rtol=1e-5, atol=1e-7)
    for q, w in zip(qs, ws):  # the same errors draw the same mask
        want = q.error(w)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SQDIST_KERNELS", "reference")
            ref = q.error(w)
        masks = [select(e.cpu(), 0.5, generator=torch.Generator().manual_seed(7)) for e in (want, ref)]
        assert torch.equal(*masks) and masks[0].sum() == round(0.5 * w.shape[0])


def test_bad_arguments_say_what_is_wrong(triton_kernels):
    quantize = triton_kernels.quantize
    with pytest.raises(ValueError, match="kind=7; allowed"):
        quantize([torch.zeros(2, 3, device=DEVICE)], 7, 0.7, 1, False, [], 1)
    with pytest.raises(ValueError, match=r"shape \[2, 3, 4\]"):
        quantize([torch.zeros(2, 3, 4, device=DEVICE)], 0, 0.7, 1, False, [], 1)
    with pytest.raises(ValueError, match=r"mask 0 has shape \[3\]"):
        quantize([torch.zeros(2, 3, device=DEVICE)], 0, 0.7, 1, False, [torch.zeros(3, dtype=torch.bool, device=DEVICE)], 1)
    with pytest.raises(ValueError, match="one step per tensor"):
        triton_kernels.lsq_forward(torch.zeros(3, device=DEVICE), torch.ones(2, device=DEVICE), -1, 1)


# ------------------------------------------------------------------ k-bit mse: search errors, codes at a ratio
@pytest.mark.parametrize("bits", [2, 4])
def test_mse_errors_match_reference(bits, triton_kernels):
    levels = 2 ** (bits - 1) - 1
    w = weight(7, 300, seed=bits).mul(0.05).T.contiguous().T  # a transposed (column-major) view
    assert not w.is_contiguous()
    w[2, :8] = (torch.arange(8, device=DEVICE) + 0.5) * w[2].abs().max() / levels / 2  # half-way between codes
    top = w.abs().amax(dim=1) / levels
    safe = torch.where(top > 0, top, torch.ones_like(top))
    ratios = torch.rand(7, 33, generator=torch.Generator().manual_seed(bits)).mul(0.9).add(0.1).to(DEVICE)
    errors = triton_kernels.mse_errors(w, safe, ratios, levels)
    s = (safe[:, None] * ratios)[:, :, None]
    want = (torch.div(w[:, None, :], s).round().clamp(-levels, levels) * s - w[:, None, :]).square().sum(2)
    torch.testing.assert_close(errors, want, rtol=1e-5, atol=1e-12, equal_nan=True)
    assert errors[3].isnan().all() and (errors[1] == 0).all()  # the NaN row, the zero row
    # the search through these errors picks the reference's ratio, or on a near-tie (another summation
    # order, a GPU's) one whose error equals it to float32 rounding
    finite = [0, 1, 2, 4, 5, 6]
    got, want = kbit_mse_ratio(w[finite], bits), _ratio_by_reference(w[finite], bits)
    wf, sf = w[finite], safe[finite]

    def err(r):
        s = (sf * r)[:, None]
        return (torch.div(wf, s).round().clamp(-levels, levels) * s - wf).square().double().sum(1)
    differ = got != want
    assert int(differ.sum()) <= 1
    torch.testing.assert_close(err(got)[differ], err(want)[differ], rtol=1e-5, atol=1e-12)


def _ratio_by_reference(w, bits):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQDIST_KERNELS", "reference")
        return kbit_mse_ratio(w, bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kbit_codes_at_ratio_match_reference(bits):
    w = weight(9, 133, seed=bits).mul(0.05)
    w[2, :5] = torch.tensor([0.5, 1.5, -2.5, 0.0, 3.0], device=DEVICE) * 0.01  # ties at ratio 1
    ratio = torch.rand(9, generator=torch.Generator().manual_seed(bits)).mul(0.9).add(0.1).to(DEVICE)
    ratio[2] = 1.0
    codes, scale = kbit_codes_at_ratio_reference(w, ratio, bits)
    got_codes, got_scale = kbit_codes_at_ratio(w, ratio, bits)
    assert same(got_codes, codes) and same(got_scale, scale)
    q, s = kbit_codes_at_ratio(w, ratio, bits, values=True)
    assert same(q, codes * scale[:, None]) and same(s, scale)
    assert scale[1] == 0 and codes[3].isnan().sum() == 1  # zero row: scale 0; NaN row: NaN only where w is NaN
    # the gradient to w through the scale's max |w_i| (what the reference computes), NaN row left out
    grads = []
    for fn in (kbit_codes_at_ratio, kbit_codes_at_ratio_reference):
        ws = w[[0, 1, 2, 4]].clone().requires_grad_()
        c, sc = fn(ws, ratio[[0, 1, 2, 4]], bits)
        (c.detach() * sc[:, None] * torch.linspace(-1, 1, c.numel(), device=DEVICE).reshape(c.shape)).sum().backward()
        grads.append(ws.grad)
    assert torch.equal(*grads) and grads[0].abs().sum() > 0


def test_kbit_mse_quantizer_matches_reference():
    w = weight(12, 75, seed=9, nan_row=False).mul(0.05)
    q = KBit(4, scale="mse").eval()
    got, got_scale = q.quantize(w)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQDIST_KERNELS", "reference")
        want, want_scale = q.quantize(w)
    assert torch.equal(got, want) and torch.equal(got_scale, want_scale)


# ------------------------------------------------------------------ LSQ
def _lsq_three_ways(x, g, qmin, qmax):
    """(y, dL/dx, dL/ds) of the Triton kernels, of lsq.py's one-node PyTorch form and of the paper's pseudo-code."""
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    out = []
    for mode, fn in (("triton", lsq_quantize), ("reference", lsq_quantize), ("reference", lsq_quantize_reference)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SQDIST_KERNELS", mode)
            xs, step = x.clone().requires_grad_(), torch.tensor([0.21], device=DEVICE, requires_grad=True)
            y = fn(xs, step, qmin, qmax, factor)
            (y * g).nan_to_num().sum().backward()
        out.append((y.detach(), xs.grad, step.grad))
    return out


@pytest.mark.parametrize("qrange", [(-8, 7), (0, 15), (-1, 1)], ids=["signed4", "unsigned4", "ternary"])
def test_lsq_forward_backward_match_reference(qrange):
    qmin, qmax = qrange
    x = torch.randn(37, 41, generator=torch.Generator().manual_seed(qmax)).mul(0.6).to(DEVICE).T  # 1517 elements
    assert not x.is_contiguous()
    g = torch.randn(41, 37, device=DEVICE)
    (y, gx, gs), (fy, fgx, fgs), (ry, rgx, rgs) = _lsq_three_ways(x, g, qmin, qmax)
    # the one-node PyTorch form (lsq.py) computes the same roundings: equal
    assert torch.equal(y, fy) and torch.equal(gx, fgx) and (gx == 0).any() and (gx != 0).any()
    # the paper's pseudo-code rounds (x / s) * s and the scaled step once more: within float rounding
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx, rgx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs, fgs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-7)
    assert gs.abs() > 0
    # a NaN input: NaN out, no gradient to it (the paper's rule and the C++ op's; the one-node form
    # lets it through), and a NaN step gradient, as everywhere
    x[5, 7] = float("nan")
    (y, gx, gs), (fy, fgx, _), (ry, rgx, rgs) = _lsq_three_ways(x, g, qmin, qmax)
    assert same(y, fy) and y[5, 7].isnan() and gx[5, 7] == 0 and rgx[5, 7] == 0
    assert torch.equal(gx[~x.isnan()], fgx[~x.isnan()]) and gs.isnan() and rgs.isnan()


def test_lsq_rounds_half_to_even_and_takes_empty_inputs(triton_kernels):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 6.5, -7.5, 3.0000002, 1e30, -1e30], device=DEVICE)
    step = torch.ones(1, device=DEVICE)
    assert torch.equal(triton_kernels.lsq_forward(x, step, -8, 7), x.clamp(-8, 7).round())
    empty = torch.zeros(0, 3, device=DEVICE)
    assert triton_kernels.lsq_forward(empty, step, -8, 7).shape == (0, 3)
    gx, total = triton_kernels.lsq_backward(empty, empty, step, -8, 7)
    assert gx.shape == (0, 3) and total.item() == 0


# ------------------------------------------------------------------ plugins: ESB between searches
@pytest.mark.parametrize("bits, m", [(3, 0), (4, 1), (8, 5)])
def test_esb_refined_matches_reference(bits, m):
    """ESB's levels at the kept scale and the refitted scale (``sqdist_esb.esb_triton``) against
    ``esb_codes_refined_reference``: levels exactly (midpoints included), scales within the float64 sums'
    order, ``values`` the levels times the scales; a row with scale 0, a zero row, a NaN."""
    sqdist_esb = pytest.importorskip("sqdist_esb")
    from sqdist_esb import esb_triton  # the plugin's Triton kernel: not optional where the plugin is installed
    levels = torch.tensor(sqdist_esb.esb_levels(bits, m))
    g = torch.Generator().manual_seed(bits + m)
    w = torch.randn(9, 301, generator=g) * 0.05
    w[3] = 0.0
    grid = torch.cat([torch.zeros(1), levels])
    exact = torch.cat([levels, (grid[1:] + grid[:-1]) / 2])  # levels and midpoints for the scale 0.01
    w[7, :exact.numel()] = exact * 0.01
    scale = sqdist_esb.esb_fit_scale(w, levels) * (0.9 + 0.2 * torch.rand(9, generator=g))
    scale[5], scale[7] = 0.0, 0.01
    w[8, 4] = float("nan")
    w, scale, levels = w.to(DEVICE), scale.to(DEVICE), levels.to(DEVICE)
    ref_c, ref_s = sqdist_esb.esb_codes_refined_reference(w, levels, scale, m)
    c, s = sqdist_esb.esb_codes_refined(w, levels, scale, m)
    q, s2 = sqdist_esb.esb_codes_refined(w, levels, scale, m, values=True)
    assert same(c, ref_c) and same(s2, s) and same(q, c * s[:, None])
    assert same(c, esb_triton.refined(w, scale, m, float(levels[-1]))[0])  # the kernel, called directly
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0, equal_nan=True)
    # (a NaN's bits may round to +inf, then the top level, or stay NaN, with linear_bits: as in the reference)
    assert not c[5].any() and s[5] == 0 and s[3] == scale[3] and c.abs().nansum() > 0


# ------------------------------------------------------------------ the choice of implementation
def test_sqdist_kernels_chooses_triton_for_cuda_tensors(monkeypatch):
    w = torch.zeros(2, 2)
    for value, want in (("reference", None), ("cuda", None), ("auto", "cpu"), ("cpu", "cpu"), ("triton", "triton")):
        monkeypatch.setenv("SQDIST_KERNELS", value)
        assert kernels.backend_for(w) == want, value
    assert kernels.fast_op("lsq_forward", w).__module__ == "sqdist.quant.kernels.triton_ops"
    assert kernels.fast_op("lsq_forward", w.double()) is None  # float32 only: the reference for others
    if torch.cuda.is_available():
        for value, want in (("auto", "triton"), ("cuda", "triton"), ("cpu", None), ("reference", None)):
            monkeypatch.setenv("SQDIST_KERNELS", value)
            assert kernels.backend_for(w.cuda()) == want, value


# ------------------------------------------------------------------ the GPU build, without a GPU
COMPILE_FOR_SM90 = r"""
import re, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from sqdist.quant.kernels import triton_ops as T

assert not T.INTERPRETED
W = {"w_ptr": "*{dt}", "mask_ptr": "*u8", "thr_ptr": "*fp32", "values_ptr": "*{dt}", "codes_ptr": "*{dt}",
     "scales_ptr": "*{dt}", "err_ptr": "*fp32", "n": "i32", "delta": "fp32", "levels": "fp32"}
F = {"VALUES": True, "CODES": True, "SCALES": True, "ERR_CH": True, "ERR_EL": False, "BLOCK": 1024}
jobs = [(T._quantize_rows, {k: v.format(dt=dt) for k, v in W.items()},
         dict(F, KIND=kind, MASK=mask, LAYER_THR=layer, ERR_CH=not el, ERR_EL=el))
        for dt, kind, mask, layer, el in [("fp32", 0, 1, False, False), ("fp32", 1, 2, True, True),
                                          ("fp32", 1, 0, False, False), ("fp32", 2, 1, False, True),
                                          ("bf16", 2, 2, False, False), ("fp16", 1, 1, False, False)]]
jobs += [(T._mse_errors, {"w_ptr": "*fp32", "safe_ptr": "*fp32", "ratios_ptr": "*fp32", "err_ptr": "*fp32",
                          "n": "i32", "k": "i32", "levels": "fp32"}, {"BLOCK_K": 64, "BLOCK": 64}),
         (T._codes_at_ratio, {"w_ptr": "*fp32", "ratio_ptr": "*fp32", "out_ptr": "*fp32", "scales_ptr": "*fp32",
                              "n": "i32", "levels": "fp32"}, {"VALUES": True, "BLOCK": 1024}),
         (T._lsq_forward, {"x_ptr": "*fp32", "y_ptr": "*fp32", "step_ptr": "*fp32", "numel": "i32", "lo": "fp32",
                           "hi": "fp32"}, {"BLOCK": 1024}),
         (T._lsq_backward, {"x_ptr": "*fp32", "g_ptr": "*fp32", "gx_ptr": "*fp32", "partial_ptr": "*fp64",
                            "step_ptr": "*fp32", "numel": "i32", "lo": "fp32", "hi": "fp32"}, {"BLOCK": 1024})]
try:  # the ESB plugin's kernel, where the plugin is installed
    from sqdist_esb import esb_triton
    jobs += [(esb_triton._refined, {"w_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "s_ptr": "*fp32",
                                    "n": "i32", "add": "i32", "mask": "i32", "top": "fp32"},
              {"VALUES": values, "BLOCK": 1024}) for values in (False, True)]
except ImportError:
    pass
ops = set()
for fn, sig, consts in jobs:
    k = compile(ASTSource(fn, {**sig, **{c: "constexpr" for c in consts}}, constexprs=consts),
                target=GPUTarget("cuda", 90, 32), options=dict(T.EXACT))
    assert len(k.asm["cubin"]) > 0
    ops |= set(re.findall(r"\b(div\.[a-z0-9.]+|fma\.[a-z0-9.]+)", k.asm["ptx"]))
print(len(jobs), sorted(ops))
"""


def test_kernels_compile_for_sm90_with_ieee_divisions_and_no_fma(tmp_path):
    """Every kernel (the main variants of ``quantize``) goes through Triton's whole GPU build, to an sm_90 cubin
    (ptxas ships with triton), in a process without the interpreter: what a GPU would compile, checked without
    one. The PTX divides with ``div.rn`` (IEEE, as torch) and fuses no multiply-add (``EXACT``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                                           env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, ops = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 10 and ops == "['div.rn.f32', 'div.rn.f64']", proc.stdout  # f64: the row means
