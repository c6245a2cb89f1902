"""ESB plugin (plugins/sqdist-esb): level sets, the fitted scale against the authors' table,
straight-through gradients, SQ, the activation quantizer, export."""
import pytest
import timm
import torch
from torch import nn

import sqdist
from sqdist import QuantConfig, SQConfig, create_activation_quantizer, create_quantizer, load_quantized, quantize_model
from sqdist.export import ExportError, export_model

sqdist_esb = pytest.importorskip("sqdist_esb")


def test_registered_through_the_entry_points():
    assert "esb" in sqdist.list_quantizers() and "esb" in sqdist.list_activation_quantizers()
    assert type(create_quantizer("esb")).__module__ == "sqdist_esb"


@pytest.mark.parametrize("bits, m, positive", [
    (2, 0, [1]),                                   # ternary
    (3, 0, [1, 2, 4]),                             # powers of two
    (3, 1, [0.5, 1, 1.5]),
    (4, 0, [1, 2, 4, 8, 16, 32, 64]),
    (4, 1, [0.5, 1, 1.5, 2, 3, 4, 6]),             # the paper's example
    (4, 2, [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]),  # m >= b - 2: uniform
    (5, 2, [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]),
    (5, 3, [k / 8 for k in range(1, 16)]),
])
def test_level_sets(bits, m, positive):
    assert sqdist_esb.esb_levels(bits, m) == positive
    codes = sqdist_esb.esb_code_levels(bits, m)
    assert len(codes) == 2 ** bits - 1 and codes == sorted(codes)
    assert codes == sorted([-round(v * 2 ** m) for v in positive] + [0] + [round(v * 2 ** m) for v in positive])


def test_every_row_lies_on_its_scaled_level_set():
    q = create_quantizer("esb", bits=4, linear_bits=1)
    w = torch.randn(16, 75, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)[:, None]
    levels = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    levels = torch.cat([-levels, levels])
    codes, scale = q.quantize_codes(w)
    Q, _ = q.quantize(w)
    s = scale * 2  # the scale of the level set (export's scale is s / 2^linear_bits)
    for i in range(16):
        assert torch.isclose(Q[i][:, None], s[i] * levels[None], rtol=1e-6, atol=0).any(dim=1).all()
    assert set(codes.unique().long().tolist()) <= set(q.code_levels())
    assert len(codes.unique()) > 8  # the non-uniform levels are used


def rows(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(32, 144, generator=g)
    if kind == "laplace":
        u = torch.rand(32, 144, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "uniform":
        return torch.rand(32, 144, generator=g) * 2 - 1
    w = torch.randn(32, 144, generator=g)
    w[:, 0] *= 10  # one outlier per row
    return w


@pytest.mark.parametrize("bits, m", [(2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2), (5, 2), (5, 3)])
@pytest.mark.parametrize("kind", ["normal", "laplace", "uniform", "outlier"])
def test_fitted_scale_is_never_worse_than_the_authors_table(bits, m, kind):
    w = rows(kind)
    fit = create_quantizer("esb", bits=bits, linear_bits=m)
    table = create_quantizer("esb", bits=bits, linear_bits=m, alpha="table")
    err_fit = (fit.quantize(w)[0] - w).square().sum(1)
    err_table = (table.quantize(w)[0] - w).square().sum(1)
    assert (err_fit <= err_table * (1 + 1e-6)).all()  # per row
    assert err_fit.sum() < err_table.sum() or kind == "normal"  # and strictly better somewhere off-Gaussian


def test_table_scale_is_alpha_times_row_std():
    w = rows("normal")
    q = create_quantizer("esb", bits=4, linear_bits=1, alpha="table")
    assert torch.allclose(q.quantize_codes(w)[1] * 2, 0.4871 * w.std(dim=1, unbiased=False))
    fixed = create_quantizer("esb", bits=4, linear_bits=1, alpha=0.5)
    assert torch.allclose(fixed.quantize_codes(w)[1] * 2, 0.5 * w.std(dim=1, unbiased=False))


def test_gradient_to_the_weight_is_straight_through_and_sq_applies():
    q = create_quantizer("esb", bits=3, linear_bits=0)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    out = q(w)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape))
    mask = torch.tensor([True, False] * 3)
    hybrid = q.hybrid(w.detach(), mask)
    assert torch.equal(hybrid[1::2], w.detach()[1::2])
    assert torch.equal(hybrid[0::2], q.quantize(w.detach().reshape(6, -1))[0].reshape(6, 4, 3, 3)[0::2])


@pytest.mark.parametrize("params, expected", [
    ({"bits": 9}, "esb bits=9; allowed: an integer from 2 to 8"),
    ({"bits": 4, "linear_bits": 4}, "esb linear_bits=4; allowed: an integer from 0 to bits - 1 = 3"),
    ({"bits": 5, "linear_bits": 0}, "esb linear_bits=0: with bits=5 the largest level is 16384 / 2^0, beyond an "
                                    "int8 code; allowed with bits=5: linear_bits in [2, 3, 4]"),
    ({"bits": 4, "linear_bits": 3, "alpha": "table"}, "esb alpha='table': the authors' table has no entry for "
                                                      "bits=4, linear_bits=3; allowed: 'fit' or a number > 0"),
    ({"alpha": -1}, "esb alpha=-1; allowed: 'fit', 'table' or a number > 0"),
])
def test_bad_parameters_name_the_key_and_what_is_allowed(params, expected):
    with pytest.raises(ValueError) as exc:
        create_quantizer("esb", **params)
    assert str(exc.value) == expected


def test_activation_quantizer_uses_the_level_set_and_learns_its_step():
    act = create_activation_quantizer("esb", bits=3, linear_bits=1)
    x = torch.relu(torch.randn(8, 4, 5, 5))
    act.calibrate(x)
    assert act.qmin == 0 and act.qmax == 12  # unsigned: 0 and 7 positive levels, up to 6 = 12 / 2
    act.train()
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    y.sum().backward()
    assert act.step.grad is not None and act.step.grad.abs() > 0
    assert xr.grad is not None
    act.eval()
    with torch.no_grad():
        v = act(x) / act.step
    levels = torch.tensor([0] + sqdist_esb.esb_levels(4, 1))
    assert torch.isclose(v.reshape(-1, 1), levels[None], atol=1e-5).any(dim=1).all()
    assert torch.allclose(act(x), y.detach())
    with pytest.raises(ExportError, match="esb activations are non-uniform"):
        act.activation_qparams()


@pytest.mark.parametrize("bits, m", [(3, 0), (4, 1)])
def test_export_then_load_gives_the_quantized_logits(tmp_path, bits, m):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer="esb", params={"bits": bits, "linear_bits": m},
                                           sq=SQConfig(ratios=(1.0,))))
    model.train()
    model(torch.randn(16, 1, 16, 16))
    model.eval()
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    info = export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
    assert info["bits"] == [bits] and info["layers"] == len(sq.layers)
    loaded = load_quantized(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-5
    modules = dict(loaded.named_modules())
    for name, layer in sq.layers.items():
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        assert torch.equal(modules[name].weight.reshape(w.shape), layer.quantizer.quantize(w)[0])


def test_esb_activations_at_8_bits_and_unsigned_code_limit():
    import sqdist

    q = sqdist.create_activation_quantizer("esb", bits=8, linear_bits=7)  # the widest: its unsigned codes fit uint8
    assert q.bits == 8
    with pytest.raises(ValueError, match=r"esb activations linear_bits=1: with bits=8 .*allowed with bits=8"):
        sqdist.create_activation_quantizer("esb", bits=8, linear_bits=1)


def test_esb_activation_step_is_used_as_its_absolute_value():
    """An SGD step across 0 must not kill an unsigned layer (3 of 10 digits W4A4 seeds did before)."""
    import sqdist

    x = torch.linspace(0, 2, 41)[None, :]
    outs = []
    for step in (0.1, -0.1):
        q = sqdist.create_activation_quantizer("esb", bits=4, linear_bits=1)
        with torch.no_grad():
            q.init_from(x)
            q.step.fill_(step)
        q._signed, q._calibrated = False, True
        q.train()
        outs.append(q.fake_quantize(x))
        assert float(q.scale()) == pytest.approx(0.1)
    assert torch.equal(outs[0], outs[1]) and float(outs[1].max()) > 0


# ---------------------------------------------------------------- the scale search: every N steps against every step
def drift(w, step):
    """Weights as training moves them: a small step of noise per optimizer step."""
    return w + 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(100 + step)) * w.std()


def test_search_every_step_is_the_reference():
    """search_every=1: a search from scratch at every quantization, the values of esb_quantize_reference."""
    q = create_quantizer("esb", bits=4, linear_bits=1, search_every=1)
    w = rows("laplace")
    q.calibrate(w)
    table = sqdist_esb.table_alpha(4, 1) * w.std(dim=1, unbiased=False)
    for step in range(4):
        w = drift(w, step)
        q.set_progress(step, 100, 10)
        table = sqdist_esb.table_alpha(4, 1) * w.std(dim=1, unbiased=False)
        assert torch.equal(q.quantize(w)[0], sqdist_esb.esb_quantize_reference(w, q.levels, table))
        codes, scale = q.quantize_codes(w)
        assert torch.equal(codes * scale[:, None], q.quantize(w)[0])


def test_search_every_n_steps_keeps_the_scale_between_and_stays_close_to_the_reference():
    """search_every=4: searches at steps 0, 4, 8 only (after calibrate, warm-started); between them the kept scale,
    refitted in closed form to the current weights: never worse than the kept scale, and within
    5% of the every-step search's squared error on weights drifting by 2% of their std per step
    (1-3% measured)."""
    q = create_quantizer("esb", bits=4, linear_bits=1, search_every=4)
    w = rows("normal")
    q.calibrate(w)
    searched = []
    for step in range(10):
        w = drift(w, step)
        q.set_progress(step, 100, 10)
        before = q.fitted_scale.clone()
        Q, _ = q.quantize(w)
        q.quantize(w)  # a second quantization in the same step (SQ's error, a log line): no second search
        if not torch.equal(before, q.fitted_scale):
            searched.append(step)
        assert int(q.searched_at[0]) == (step // 4) * 4
        kept = q.fitted_scale
        err = (Q - w).square().sum(1)
        err_kept = (sqdist_esb.project(w / kept[:, None], q.levels) * kept[:, None] - w).square().sum(1)
        assert (err <= err_kept * (1 + 1e-5)).all()
        table = sqdist_esb.table_alpha(4, 1) * w.std(dim=1, unbiased=False)
        err_ref = (sqdist_esb.esb_quantize_reference(w, q.levels, table) - w).square().sum(1)
        assert err.sum() <= err_ref.sum() * 1.05
    assert searched == [0, 4, 8]


def test_warm_search_is_never_worse_than_the_previous_scale():
    w = rows("outlier")
    levels = torch.tensor(sqdist_esb.esb_levels(3, 1))
    previous = sqdist_esb.esb_fit_scale(w, levels) * torch.linspace(0.7, 1.3, 32)  # some rows far off
    s = sqdist_esb.esb_refit_scale(w, levels, previous, 1)

    def err(scale):
        return (sqdist_esb.project(w / scale[:, None], levels) * scale[:, None] - w).square().sum(1)

    assert (err(s) <= err(previous)).all() and (err(s) < err(previous)).sum() >= 16
    assert ((s / previous - 1).abs() <= sqdist_esb.WARM_SPAN + 1e-6).all()


def test_a_new_sq_stage_searches_from_scratch_and_the_scale_is_checkpointed():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    cfg = QuantConfig(quantizer="esb", params={"bits": 4, "linear_bits": 1},
                      sq=SQConfig(ratios=(0.5, 1.0), stage_length=2, unit="step"))
    sq = quantize_model(model, cfg)
    name, layer = next(iter(sq.layers.items()))
    q = layer.quantizer
    assert q.fitted_scale.shape == (layer.weight.shape[0],)  # calibrate searched it
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for step in range(3):
        for m in model.modules():
            if hasattr(m, "set_progress"):
                m.set_progress(step, 100, 10)
        sq.draw_masks()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sq.advance("step")
    # step 2 began stage 1: searched from scratch on the weights of that step
    assert q.searched_at.tolist() == [2, 1]
    state = model.state_dict()
    assert f"{name}.quantizer.fitted_scale" in state and f"{name}.quantizer.searched_at" in state
    torch.manual_seed(1)
    other = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    quantize_model(other, cfg).selector.units_done = 2
    other.load_state_dict(state)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    assert torch.equal(dict(other.named_modules())[name].quantizer.quantize(w)[0], q.quantize(w)[0])
    # a state dict saved before the scale was kept still loads: the scale is searched again
    old = {k: v for k, v in state.items() if not k.endswith(("fitted_scale", "searched_at"))}
    other.load_state_dict(old)
    q2 = dict(other.named_modules())[name].quantizer
    assert q2.fitted_scale.numel() == 0 and q2.quantize(w)[0].shape == w.shape


def test_search_every_must_be_a_positive_integer():
    with pytest.raises(ValueError) as exc:
        create_quantizer("esb", search_every=0)
    assert str(exc.value) == "esb search_every=0; allowed: an integer >= 1"


@pytest.mark.parametrize("bits, m", [(2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2), (5, 2), (5, 3), (8, 5)])
def test_arithmetic_level_lookup_is_the_nearest_level(bits, m):
    """esb_round (mantissa rounding) against project (binary search over the midpoints): the
    same level for random values over the whole range, for every level and for midpoints
    (which both round down, towards 0)."""
    levels = torch.tensor(sqdist_esb.esb_levels(bits, m))
    top = float(levels[-1])
    g = torch.Generator().manual_seed(bits * 10 + m)
    v = torch.cat([(torch.rand(20000, generator=g) * 2 - 1) * top * 1.3, torch.randn(20000, generator=g),
                   levels, -levels, torch.zeros(1)])
    grid = torch.cat([torch.zeros(1), levels])
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([v, mids[mids >= 1], -mids[mids >= 1]])  # exact midpoints (from 1 up; below 1 a + 1 rounds first)
    assert torch.equal(sqdist_esb.esb_round(v, m, top), sqdist_esb.project(v, levels))


def test_a_free_standing_quantizer_searches_at_every_call():
    """One instance handed the weights of one layer after another (as post-training quantization
    does): no scale carried from a layer to the next, even at the same number of rows."""
    q = create_quantizer("esb", bits=4, linear_bits=1)
    levels = torch.tensor(sqdist_esb.esb_levels(4, 1))
    for kind in ("normal", "uniform", "outlier"):
        w = rows(kind) * (10.0 if kind == "uniform" else 1.0)
        s = sqdist_esb.esb_fit_scale(w, levels, sqdist_esb.table_alpha(4, 1) * w.std(dim=1, unbiased=False))
        assert torch.equal(q.fitted(w), s)


@pytest.mark.parametrize("bits, m", [(3, 0), (4, 1), (5, 2), (8, 5)])
def test_refined_kernel_is_the_reference(bits, m, monkeypatch):
    """``esb_codes_refined`` by the compiled kernel (``esb_cpu.cpp``) against its PyTorch form: the
    same levels and refitted scales (both sum in double), ``values=True`` the levels times the scales,
    a row with scale 0 all zero, a row of zeros keeping its scale; with ``SQDIST_KERNELS=reference``
    the PyTorch form itself."""
    if sqdist_esb.kernel() is None:
        pytest.skip("no C++ toolchain: the CPU kernel cannot be built")
    levels = torch.tensor(sqdist_esb.esb_levels(bits, m))
    g = torch.Generator().manual_seed(bits + m)
    w = torch.randn(40, 1153, generator=g) * 0.05
    w[3] = 0.0
    grid = torch.cat([torch.zeros(1), levels])
    exact = torch.cat([levels, (grid[1:] + grid[:-1]) / 2])  # levels and midpoints for the scale 0.01
    w[7, :exact.numel()] = exact * 0.01
    scale = sqdist_esb.esb_fit_scale(w, levels) * (0.9 + 0.2 * torch.rand(40, generator=g))
    scale[5] = 0.0
    scale[7] = 0.01
    ref_c, ref_s = sqdist_esb.esb_codes_refined_reference(w, levels, scale, m)
    for mode in ("cpu", "reference"):
        monkeypatch.setenv("SQDIST_KERNELS", mode)
        c, s = sqdist_esb.esb_codes_refined(w, levels, scale, m)
        q, s2 = sqdist_esb.esb_codes_refined(w, levels, scale, m, values=True)
        assert torch.equal(c, ref_c) and torch.equal(s, ref_s) and torch.equal(s2, ref_s)
        assert torch.equal(q, ref_c * ref_s[:, None])
    assert not ref_c[5].any() and s[5] == 0 and s[3] == scale[3] and ref_c.abs().sum() > 0
