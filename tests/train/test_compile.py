"""``torch.compile``: every quantizer traces with no graph break, the compiled ops have fake kernels,
and ``train.compile=true`` trains the same network as eager, writes the same files and resumes."""
import json

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file
from torch import nn

from sqdist import calibrate_activations, quantize_model
from sqdist.config import load_recipe
from sqdist.nn import QuantConfig
from sqdist.sq import SQConfig

# (weight quantizer, its params, activation quantizer, its params, SQ ratios): every registered
# quantizer, core and plugin, with SQ below ratio 1 wherever the quantizer keeps a full-precision weight
CASES = {
    "bwn": ("bwn", {}, None, {}, [0.5, 1.0]),
    "twn": ("twn", {}, None, {}, [0.5, 1.0]),
    "twn layer threshold": ("twn", {"threshold": "layer"}, None, {}, [0.5, 1.0]),
    "kbit4 max": ("kbit", {"bits": 4, "scale": "max"}, None, {}, [0.5, 1.0]),
    "kbit4 mse": ("kbit", {"bits": 4, "scale": "mse"}, None, {}, [0.5, 1.0]),
    "kbit4 lsq step": ("kbit", {"bits": 4, "scale": "lsq"}, None, {}, [0.5, 1.0]),
    "twn + lsq4": ("twn", {}, "lsq", {"bits": 4}, [0.5, 1.0]),
    "twn + pact4": ("twn", {}, "pact", {"bits": 4}, [0.5, 1.0]),
    "slb2": ("slb", {"bits": 2}, None, {}, [1.0]),
    "slb1": ("slb", {"bits": 1}, None, {}, [1.0]),
    "esb + esb act": ("esb", {}, "esb", {}, [0.5, 1.0]),
    "srq + srq act": ("srq", {}, "srq", {}, [0.5, 1.0]),
    "srq dropbits + srq act dropbits": ("srq", {"bits": 3, "drop_prob": 0.3}, "srq", {"bits": 3, "drop_prob": 0.3},
                                        [0.5, 1.0]),
    "srq dropbits linear": ("srq", {"bits": 4, "drop_prob": 0.5, "drop_schedule": "linear", "drop_min_bits": 2},
                            "srq", {"bits": 3, "drop_prob": 0.4, "drop_schedule": "linear"}, [0.5, 1.0]),
    "srq learned widths": ("srq", {"bits": 4, "learn_bits": True, "min_bits": 2}, None, {}, [0.5, 1.0]),
    "srq learned widths + dropbits": ("srq", {"bits": 5, "learn_bits": True, "min_bits": 2, "drop_prob": 0.25},
                                      "srq", {"bits": 2, "drop_prob": 0.3}, [0.5, 1.0]),
    "pow2 + act_pow2": ("kbit_pow2", {}, "act_pow2", {}, [0.5, 1.0]),
    "pow2 learned": ("kbit_pow2_learned", {}, None, {}, [0.5, 1.0]),
}
# known graph breaks, still to remove (strict: the test fails once one traces whole, to drop it from here)
BREAKS: dict[str, str] = {}


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=f"graph break: {BREAKS[k]}"))
                                  if k in BREAKS else k for k in CASES])
def test_every_quantizer_traces_whole_and_gives_eager_gradients(case):
    """fullgraph=True under aot_eager (the whole forward and backward traced by AOTAutograd, run by
    eager kernels): no graph break anywhere, and the same outputs and gradients as eager, bit for bit,
    on four steps with a new SQ mask each (the masks are inputs of the graph, not constants in it);
    from the third step on, no recompilation (the step number is no constant of the graph). SRQ's
    draws (DropBits, learned widths) come from a key tensor the graph reads and counts its calls in:
    it is rewound between the two forwards, so the compiled one draws what the eager one drew."""
    q, params, act, act_params, ratios = CASES[case]
    model = small_net()
    sq = quantize_model(model, QuantConfig(quantizer=q, params=params, activations=act, activation_params=act_params,
                                           sq=SQConfig(ratios=ratios)), example_input=torch.randn(2, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    if act:
        calibrate_activations(model, x)
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    masks = []
    for step in range(4):
        if step == 2:  # steps 0 and 1 may each need a graph (a search due, then not); later ones reuse them
            stance = torch.compiler.set_stance("fail_on_recompile")
            stance.__enter__()
        sq.draw_masks()
        masks.append({n: None if layer.sq_mask is None else layer.sq_mask.clone() for n, layer in sq.layers.items()})
        for m in model.modules():
            if hasattr(m, "set_progress"):
                m.set_progress(step, 10, 5)
        keys = [(m._key, m._key.clone()) for m in model.modules() if hasattr(m, "_key")]  # SRQ's draws
        eager_out = model(x)
        eager_out.square().mean().backward()
        expected = grads(model)
        model.zero_grad(set_to_none=True)
        drawn = [key.clone() for key, _ in keys]
        for key, before in keys:
            key.copy_(before)
        out = compiled(x)  # fullgraph=True raises on any graph break
        out.square().mean().backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        assert all(torch.equal(key, after) for (key, _), after in zip(keys, drawn))  # the graph counted its draws
        drawing = [key for key, before in keys if not torch.equal(key, before)]
        draws = "drop_prob" in params or "learn_bits" in params or "drop_prob" in act_params
        assert len(drawing) == (len(keys) if draws else 0) and all(key[2] == step for key in drawing)
        assert torch.equal(out, eager_out)
        assert got.keys() == expected.keys() and len(got) > 0
        assert [k for k in got if not torch.equal(got[k], expected[k])] == []
        sq.advance("step")  # the next step's masks: drawn from (seed, step, layer)
    stance.__exit__(None, None, None)
    if ratios[0] < 1.0:  # two different draws really reached the graph
        assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_compiled_cpu_ops_have_fake_kernels():
    """torch.library.opcheck runs each compiled C++ op on real and fake tensors and checks that the
    fake kernel gives the real outputs' shapes, dtypes and strides (and that the op traces)."""
    from sqdist.quant import kernels

    ops = kernels.ops("cpu")
    if ops is None:
        pytest.skip("the compiled CPU kernels cannot be built here")
    w = torch.randn(6, 20)
    masks = [torch.tensor([True, False, True, True, False, True])]
    for outputs in (1, 2 | 4, 1 | 8, 16):
        torch.library.opcheck(ops.quantize.default, ([w], 1, 0.7, 1, False, masks if outputs & 1 else [], outputs),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.mse_errors.default, (w, torch.rand(6) + 0.5, torch.rand(6, 5), 7),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.kbit_codes_at_ratio.default, (w, torch.rand(6) + 0.5, 7, True),
                          test_utils=("test_schema", "test_faketensor"))
    step = torch.tensor([0.1])
    torch.library.opcheck(ops.lsq_forward.default, (w, step, -8, 7), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.lsq_backward.default, (w, torch.randn(6, 20), step, -8, 7),
                          test_utils=("test_schema", "test_faketensor"))


def test_slb_kernel_is_a_custom_op_held_to_its_reference():
    """SLB's CPU kernel as custom ops (opcheck: schema, fake kernel), and its values against the PyTorch reference."""
    import sqdist_slb

    if not sqdist_slb.kernel_available():
        pytest.skip("the SLB kernel cannot be built here")
    a = torch.randn(30, 4)
    levels = [float(v) for v in sqdist_slb.slb_levels(2).tolist()]
    torch.library.opcheck(sqdist_slb.expectation_forward, (a, levels, 1.5))
    torch.library.opcheck(sqdist_slb.expectation_backward, (a, levels, 1.5, torch.randn(30)))
    ref = sqdist_slb.expectation_reference(a, sqdist_slb.slb_levels(2), 1.5)
    torch.testing.assert_close(sqdist_slb.expectation_forward(a, levels, 1.5), ref)
    # the hard phase: the level of the first largest logit (ties, NaN as torch.argmax), zero gradient
    a[0] = torch.tensor([1.0, 3.0, 3.0, 0.0])
    a[1, 2] = float("nan")
    a[2] = torch.tensor([float("nan"), 5.0, float("nan"), 1.0])
    torch.library.opcheck(sqdist_slb.argmax_levels, (a, levels))
    assert torch.equal(sqdist_slb.argmax_levels(a, levels), sqdist_slb.slb_levels(2)[a.argmax(dim=-1)])
    logits = torch.randn(5, 3, 4, requires_grad=True)
    ref = sqdist_slb.hard_levels_reference(logits, sqdist_slb.slb_levels(2))
    got = sqdist_slb._HardLevelsKernel.apply(logits, tuple(levels))
    assert torch.equal(got, ref)
    (got * torch.randn(5, 3)).sum().backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(5, 3, 4))


# ---------------------------------------------------------------- train.compile=true through the trainer
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1}}
data: {image_size: 8, batch_size: 32}
quant: {name: twn, activations: {name: lsq, bits: 4}}
sq: {ratios: [0.5, 1.0], stage_length: 3, unit: step}
optim: {lr: 0.05}
train: {max_steps: 6, checkpoint_every: 3, progress: false, log_every: 1}
"""


def run_tiny(tmp_path, name, *overrides):
    from sqdist.train import train

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    recipe = load_recipe(str(path), [f"run.dir={tmp_path / name}", *overrides])
    return train(recipe)


def final_state(tmp_path, name):
    return load_file(str(tmp_path / name / "final" / "model.safetensors"))


def test_compiled_run_trains_the_eager_network_writes_the_same_keys_resumes_and_exports(tmp_path):
    """aot_eager: the compiled run's weights equal the eager run's bit for bit after 6 steps (SQ masks at
    ratio 0.5, then 1.0; W TWN, A LSQ 4 bits); its files have the eager run's keys (no ``_orig_mod.``);
    a compiled resume from step 3 ends where the uninterrupted run did; the export reads its final folder."""
    from sqdist.export.cli import main as export_main

    torch._dynamo.reset()
    eager = run_tiny(tmp_path, "eager")
    compiled = run_tiny(tmp_path, "compiled", "train.compile=true", "train.compile_backend=aot_eager")
    assert compiled["total_steps"] == eager["total_steps"] == 6
    a, b = final_state(tmp_path, "eager"), final_state(tmp_path, "compiled")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert compiled["final_accuracy"] == eager["final_accuracy"]
    losses = [[json.loads(l)["train/loss"] for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in l] for r in ("eager", "compiled")]
    assert losses[0] == losses[1] and len(losses[0]) == 6

    resumed = run_tiny(tmp_path, "resumed", "train.compile=true", "train.compile_backend=aot_eager",
                       f"train.resume={tmp_path / 'compiled' / 'checkpoints' / 'step-0000003'}")
    assert resumed["resumed_from_step"] == 3
    c = final_state(tmp_path, "resumed")
    assert [k for k in b if not torch.equal(b[k], c[k])] == []

    out = tmp_path / "packed.safetensors"
    assert export_main([str(tmp_path / "compiled" / "final"), str(out)]) == 0
    assert out.stat().st_size > 0


def test_compile_mode_without_its_backend_is_one_line_and_exit_2(tmp_path, capsys):
    from sqdist.train import main

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    code = main([str(path), f"run.dir={tmp_path / 'r'}", "train.compile=true", "train.compile_backend=aot_eager",
                 "train.compile_mode=max-autotune"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.compile_mode='max-autotune': has no effect with train.compile_backend='aot_eager'" in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_unwrap_compiled_gives_the_module_and_its_keys():
    """A torch.compile wrapper prefixes every key with ``_orig_mod.``; unwrap_compiled gives the module back, and
    compile_model (what train.compile uses) compiles in place: the same object, the same keys."""
    from sqdist.train.compiling import compile_model, is_compiled, unwrap_compiled

    model = small_net()
    keys = list(model.state_dict())
    wrapped = torch.compile(model, backend="aot_eager")
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    assert unwrap_compiled(wrapped) is model and unwrap_compiled(model) is model and is_compiled(wrapped)
    assert not is_compiled(model)
    assert compile_model(model, backend="aot_eager") is model and is_compiled(model)
    assert list(model.state_dict()) == keys


def test_compile_model_loads_the_kernels_first_so_the_trainers_graph_is_whole(monkeypatch):
    """A kernel library loaded for the first time inside the trace (its build check, its fake kernels'
    registration) is a graph break, and the graph stays split there for every later step: compile_model
    loads the kernels before compiling. Here with the kernels' cache emptied, as in a fresh process."""
    from torch._dynamo.utils import counters

    from sqdist.quant import kernels
    from sqdist.train.compiling import compile_model

    if kernels.ops("cpu") is None:
        pytest.skip("the compiled CPU kernels cannot be built here")
    model = small_net()
    sq = quantize_model(model, QuantConfig(quantizer="twn", activations="lsq", activation_params={"bits": 4}),
                        example_input=torch.randn(2, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    calibrate_activations(model, x)
    model.train()
    sq.draw_masks()
    monkeypatch.setattr(kernels, "_ops", {})  # nothing loaded yet
    torch._dynamo.reset()
    counters.clear()
    compile_model(model, backend="aot_eager")
    model(x).square().mean().backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_options_keep_the_mode_and_turn_layout_optimization_off_on_the_cpu():
    from sqdist.train.compiling import inductor_options

    model = small_net()
    assert inductor_options(model) == {"options": {"layout_optimization": False}}
    tuned = inductor_options(model, "max-autotune")["options"]
    assert tuned["max_autotune"] is True and tuned["layout_optimization"] is False
    assert inductor_options(model, backend="aot_eager") == {}


def test_a_new_epoch_within_an_sq_stage_does_not_recompile():
    """The SQ ratio is read in the compiled forward; its stage is kept by the schedule, not derived from the
    count of finished units, so the graph is guarded on the stage: units (epochs) inside a stage reuse it."""
    model = small_net()
    sq = quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=[0.5, 1.0], stage_length=3,
                                                                        unit="epoch")),
                        example_input=torch.randn(2, 3, 6, 6))
    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    for epoch in range(3):
        sq.draw_masks()
        if epoch == 1:
            stance = torch.compiler.set_stance("fail_on_recompile")
            stance.__enter__()
        compiled(x).square().mean().backward()
        sq.advance("step")
        sq.advance("epoch")
    stance.__exit__(None, None, None)
    assert sq.selector.units_done == 3 and sq.selector.stage == 1 and sq.selector.ratio == 1.0
