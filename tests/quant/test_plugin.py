"""The plugin contract (sqdist.plugin): the hooks as no-op methods of one base, a registered class whose
hook mixin would be shadowed refused, one error type every command reports, one kernel switch."""
from __future__ import annotations

import warnings

import pytest
import torch

import sqdist
from sqdist.config import RecipeError
from sqdist.export import ExportError
from sqdist.plugin import (HOOKS, ActivationQuantizer, Quantizer, QuantizerError, QuantizerHooks, kernel_mode,
                           register_quantizer, shadowed_hooks)

PLUGINS = ("sqdist_slb", "sqdist_esb", "sqdist_srq", "sqdist_pow2")


def test_both_quantizer_bases_have_every_hook_as_a_documented_no_op():
    for base in (Quantizer, ActivationQuantizer):
        assert issubclass(base, QuantizerHooks)
    q = sqdist.create_quantizer("twn")
    assert q.regularization() is None and q.metrics() == {} and q.recalibrate_bn_after_epoch(0) is False
    assert q.set_run_seed(1) is None and q.on_model_quantized("conv", {}) is None
    assert all(getattr(QuantizerHooks, hook).__doc__ for hook in HOOKS)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_no_plugin_quantizer_resolves_a_hook_it_defines_to_the_no_op(plugin):
    module = pytest.importorskip(plugin)
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, QuantizerHooks)]
    assert classes, plugin
    for cls in classes:
        assert shadowed_hooks(cls) == [], cls
    if plugin == "sqdist_srq":  # its schedule lives in a mixin listed after the quantizer base
        assert module.SRQWeight.set_progress is module._Stochastic.set_progress


def test_a_hook_mixin_listed_after_the_base_still_runs_with_a_deprecation_warning():
    class Schedule:  # defines a hook, but not as a QuantizerHooks (a plugin written before the base class)
        def set_progress(self, step, total_steps, steps_per_epoch):
            self.step = step

    class Shadowed(Quantizer, Schedule):
        pass

    assert shadowed_hooks(Shadowed) == ["set_progress"]
    with pytest.warns(DeprecationWarning, match="defines set_progress in a base listed after"):
        register_quantizer("test_shadowed_hook")(Shadowed)
    assert shadowed_hooks(Shadowed) == []
    q = Shadowed()
    q.set_progress(5, 10, 2)
    assert q.step == 5

    class GoodSchedule(QuantizerHooks):
        def set_progress(self, step, total_steps, steps_per_epoch):
            self.step = step

    @register_quantizer("test_mixin_hook")
    class Good(Quantizer, GoodSchedule):
        pass

    q = Good()
    q.set_progress(7, 10, 2)
    assert q.step == 7


def test_quantizer_error_is_reported_by_every_command():
    err = QuantizerError("slb bits=9; allowed: 1, 2, 3, 4")
    assert isinstance(err, RecipeError) and isinstance(err, ExportError) and isinstance(err, ValueError)


def test_one_kernel_switch_and_the_old_variables_still_read(monkeypatch):
    from sqdist_srq import fast

    monkeypatch.delenv("SQDIST_SRQ_KERNEL", raising=False)
    for value, srq in (("reference", "reference"), ("cpu", "cpu"), ("cuda", "torch"), ("auto", "auto")):
        monkeypatch.setenv("SQDIST_KERNELS", value)
        assert kernel_mode() == value and fast.mode() == srq
    monkeypatch.setenv("SQDIST_SRQ_KERNEL", "torch")
    monkeypatch.setattr("sqdist.plugin._warned", set())
    with pytest.warns(DeprecationWarning, match="SQDIST_SRQ_KERNEL is deprecated.*SQDIST_KERNELS"):
        assert fast.mode() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert fast.mode() == "torch"
    monkeypatch.setenv("SQDIST_SRQ_KERNEL", "fast")
    with pytest.raises(ValueError, match="SQDIST_SRQ_KERNEL='fast'; allowed: auto, cpu, torch, reference"):
        fast.mode()


def test_slb_follows_sqdist_kernels(monkeypatch):
    sqdist_slb = pytest.importorskip("sqdist_slb")
    logits = torch.randn(6, 4)
    monkeypatch.delenv("SQDIST_SLB_KERNEL", raising=False)
    monkeypatch.setenv("SQDIST_KERNELS", "reference")
    assert not sqdist_slb._use_kernel(logits)
    monkeypatch.setenv("SQDIST_KERNELS", "cpu")
    assert sqdist_slb._use_kernel(logits) == (sqdist_slb.kernel() is not None)
