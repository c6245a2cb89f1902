"""Quantizer registry: names, plugins through entry points, clear errors, user quantizers.

A quantizer is a class plus one decorator line; ``create_quantizer(name, **params)``
builds it, ``list_quantizers()`` names everything reachable (built-in and plugin).
"""
from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

from sqdist import QuantConfig, Quantizer, SQConfig, create_quantizer, list_quantizers, quantize_model, register_quantizer
from sqdist.quant.registry import ENTRY_POINT_GROUP, quantizer_params


@register_quantizer("test_halfmax_sign")
class HalfMaxSign(Quantizer):
    """A user quantizer: ``Q_i = (max |W_i| / 2) * sign(W_i)``."""

    bits = 1

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def quantize_codes(self, w):
        return torch.where(w >= 0, 1.0, -1.0), self.factor * w.abs().amax(dim=1)

    def config(self):
        return {"factor": self.factor}


def test_builtins_and_plugin_are_listed():
    names = list_quantizers()
    assert {"bwn", "twn", "kbit", "kbit_pow2", "test_halfmax_sign"} <= set(names)
    assert names == sorted(names)


def test_plugin_comes_from_its_entry_point():
    plugins = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert plugins.get("kbit_pow2") == "sqdist_pow2:KBitPow2"
    quantizer = create_quantizer("kbit_pow2", bits=3)
    assert type(quantizer).__module__ == "sqdist_pow2"
    assert quantizer.quantizer_name == "kbit_pow2" and quantizer.config() == {"bits": 3}


def test_parameters_are_introspectable():
    assert list(quantizer_params("twn")) == ["delta", "threshold"]
    assert quantizer_params("kbit")["bits"].default == 4
    assert quantizer_params("bwn") == {}


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown quantizer 'tnw'; allowed: bwn, .*kbit, kbit_pow2, .*twn"):
        create_quantizer("tnw")


@pytest.mark.parametrize("name, params, message", [
    ("kbit", {"bit": 4}, r"quantizer 'kbit' has no parameter 'bit'; allowed: bits"),
    ("twn", {"alpha": 1}, r"quantizer 'twn' has no parameter 'alpha'; allowed: delta, threshold"),
    ("bwn", {"bits": 1}, r"quantizer 'bwn' has no parameter 'bits'; allowed: none"),
])
def test_unknown_parameter_lists_the_allowed_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        create_quantizer(name, **params)


@pytest.mark.parametrize("name, params, message", [
    ("kbit", {"bits": 9}, r"kbit bits=9; allowed: an integer from 2 to 8"),
    ("kbit", {"bits": 4.0}, r"kbit bits=4.0; allowed: an integer from 2 to 8"),
    ("kbit_pow2", {"bits": 1}, r"kbit_pow2 bits=1; allowed: an integer from 2 to 8"),
    ("twn", {"threshold": "channel"}, r"twn threshold='channel'; allowed: 'row', 'layer'"),
    ("twn", {"delta": -0.7}, r"twn delta=-0.7; allowed: a number in \(0, 2\)"),
])
def test_bad_value_names_parameter_value_and_allowed(name, params, message):
    with pytest.raises(ValueError, match=message):
        create_quantizer(name, **params)


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match=r"quantizer name 'twn' is already registered by sqdist.quant.weights.TWN"):
        register_quantizer("twn")(type("OtherTWN", (Quantizer,), {}))


def test_quantize_model_rejects_unknown_quantizer_before_touching_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        quantize_model(model, QuantConfig(quantizer="nope"))
    assert all(type(m) is nn.Linear for m in model)


def test_user_quantizer_works_end_to_end_in_quantize_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    sq = quantize_model(model, QuantConfig(quantizer="test_halfmax_sign", params={"factor": 0.25},
                                           sq=SQConfig(ratios=(0.5, 1.0), unit="step")))
    assert list(sq.layers) == ["2"]  # first conv and last linear stay full precision
    layer = model[2]
    assert isinstance(layer.quantizer, HalfMaxSign) and layer.quantizer.factor == 0.25

    sq.draw_masks()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert int(layer.sq_mask.sum()) == 4 and torch.isfinite(layer.weight.grad).all()

    sq.advance("step")  # ratio 1: every row is the user's Q
    w = layer.weight.detach()
    expected = 0.25 * w.abs().amax(dim=(1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(layer.sq_weight().detach(), expected)


def test_plugin_reusing_a_builtin_name_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info folder on sys.path) whose entry point
    claims the name 'twn': the built-in keeps it, and the user is told why the plugin is not used."""
    from sqdist.quant import registry

    info = tmp_path / "clash_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clash-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntwn = clash_plugin:MyTernary\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "clash_plugin:MyTernary" in {ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match=r"quantizer plugin 'twn' \(clash_plugin:MyTernary\) skipped: the name is "
                                         r"already registered by sqdist.quant.weights.TWN"):
        registry._load_entry_points()
    assert type(create_quantizer("twn")).__module__ == "sqdist.quant.weights"
