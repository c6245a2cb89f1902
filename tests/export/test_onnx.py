"""ONNX export: integer weight codes (INT4 / int8) + DequantizeLinear, run by onnxruntime in a default session,
same logits as sqdist's eval forward; 8-bit activations that onnxruntime runs as integer kernels."""
import copy
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import numpy_helper
from safetensors.torch import load_file
from torch import nn

from sqdist import QuantConfig, SQConfig, create_quantizer, quantize_model
from sqdist.export import ExportError, main
from sqdist.export import OPSET, export_onnx
from sqdist.quant.weights import TWN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo

# one of each family; 32x32 inputs keep every export to a few seconds on a CPU
FAMILIES = [
    ("resnet10t", {}, "twn", {}),
    ("mobilenetv3_small_050", {}, "bwn", {}),
    ("test_vit", {"img_size": 32}, "kbit", {"bits": 4}),
]


def sq_model(name, kwargs=None, quantizer="twn", params=None, in_chans=3):
    """A timm model with SQ layers at ratio 1, BatchNorm statistics moved off their defaults, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans, **(kwargs or {}))
    sq = quantize_model(model, QuantConfig(quantizer=quantizer, params=params or {}, sq=SQConfig(ratios=(1.0,))))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, in_chans, 32, 32))
    return model.eval(), sq


def onnxruntime_logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a default session
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    return torch.from_numpy(logits)


def int8_dequantized(graph):
    """{codes initializer name: (codes as int8, scale, DequantizeLinear node)} for every integer weight
    initializer dequantized: int8 read directly, INT4 / INT2 read through ``Cast(to=INT8)``."""
    inits = {t.name: t for t in graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    out = {}
    for node in graph.node:
        name = cast_of.get(node.input[0], node.input[0]) if node.op_type == "DequantizeLinear" else None
        if name in inits and inits[name].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4,
                                                       onnx.TensorProto.INT2):
            codes = numpy_helper.to_array(inits[name]).astype(np.int8)
            out[name] = (codes, numpy_helper.to_array(inits[node.input[1]]), node)
    return out


def assert_codes_match(graph, model, layers):
    """Each quantized layer's weight is in the graph as its int8 codes (per-row scales, axis 0), not as floats."""
    dequantized = int8_dequantized(graph)
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    modules = dict(model.named_modules())
    for name in layers:
        codes, scale, node = dequantized[f"{name}.weight.codes"]
        w = modules[name].weight.detach()
        expected_codes, expected_scale = modules[name].quantizer.quantize_codes(w.reshape(w.shape[0], -1))
        assert codes.shape == tuple(w.shape)
        assert np.array_equal(codes.reshape(w.shape[0], -1), expected_codes.numpy().astype(np.int8))
        assert np.array_equal(scale, expected_scale.numpy())
        assert {a.name: a.i for a in node.attribute} == {"axis": 0}
        assert f"{name}.weight" not in floats


@pytest.mark.parametrize("name,kwargs,quantizer,params", FAMILIES)
def test_model_families_match_the_eval_forward(tmp_path, name, kwargs, quantizer, params):
    model, sq = sq_model(name, kwargs, quantizer, params)
    path = tmp_path / f"{name}.onnx"
    info = export_onnx(model, path, input_size=(3, 32, 32))
    assert info["int2_weights"] + info["int4_weights"] + info["int8_weights"] == len(sq.layers)
    assert info["max_abs_diff"] <= 1e-4

    x = torch.randn(5, 3, 32, 32)  # traced with a batch of 2: the batch is dynamic
    with torch.no_grad():
        expected = model(x)
    logits = onnxruntime_logits(path, x)
    assert logits.shape == (5, 10)
    assert (logits - expected).abs().max() <= 1e-4

    graph_model = onnx.load(str(path))
    assert [o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    dims = graph_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert_codes_match(graph_model.graph, model, sq.layers)
    assert len(int8_dequantized(graph_model.graph)) == len(sq.layers)  # stem and classifier stay float
    meta = {p.key: json.loads(p.value) for p in graph_model.metadata_props}
    assert meta["quantizer"]["name"] == quantizer and meta["sq"]["ratio"] == 1.0 and meta["keep_fp_bits"] == 32


def with_8bit_full_precision_layers(model):
    """``model`` with its full-precision Conv/Linear weights replaced by their 8-bit per-row dequantized values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "quantizer"):
                codes, scale = create_quantizer("kbit", bits=8, scale="max").quantize_codes(m.weight.reshape(m.weight.shape[0], -1))
                m.weight.copy_((codes * scale[:, None]).reshape(m.weight.shape))
    return model


def test_keep_fp_bits_8_makes_stem_and_classifier_int8_too(tmp_path):
    model, sq = sq_model("resnet10t")
    path = tmp_path / "m.onnx"
    info = export_onnx(model, path, input_size=(3, 32, 32), keep_fp_bits=8)
    dequantized = int8_dequantized(onnx.load(str(path)).graph)
    assert info["int2_weights"] + info["int8_weights"] == len(dequantized) == len(sq.layers) + 2  # TWN: INT2
    assert info["int8_weights"] == 2  # stem and classifier: 8-bit codes do not fit INT4
    assert {"conv1.0.weight.codes", "fc.weight.codes"} <= set(dequantized)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        expected = with_8bit_full_precision_layers(model)(x)
    logits = onnxruntime_logits(path, x)
    assert (logits - expected).abs().max() <= 1e-4
    assert (logits - full).abs().max() > 1e-4  # 8 bits are not fp32: the comparison above is the meaningful one


class TWNWith4BitInputs(TWN):
    """TWN weights and signed 4-bit inputs; the step is a power of two, so ``x / step`` is exact in both runtimes."""

    step = 2.0 ** -3

    def quantize_input(self, x):
        return torch.clamp(torch.round(x / self.step), -8, 7) * self.step

    def activation_qparams(self):
        return self.step, 0, -8, 7


def test_activation_quantizers_become_quantize_clip_dequantize(tmp_path):
    model, sq = sq_model("resnet10t")
    for layer in sq.layers.values():
        layer.quantizer = TWNWith4BitInputs()
    path = tmp_path / "m.onnx"
    info = export_onnx(model, path, input_size=(3, 32, 32))
    assert info["qdq_inputs"] == len(sq.layers)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == ops.count("Clip") == len(sq.layers)  # Clip: 4 of QuantizeLinear's 8 bits
    assert len(int8_dequantized(graph)) == len(sq.layers)  # the weights are still int8 codes
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        weights_only = model.eval()
        for layer in sq.layers.values():
            layer.quantizer = TWN()
        unquantized_inputs = weights_only(x)
    logits = onnxruntime_logits(path, x)
    assert (logits - expected).abs().max() <= 1e-4
    assert (logits - unquantized_inputs).abs().max() > 1e-3  # the inputs really are quantized in the graph


class TWNWithUndeclaredInputs(TWN):
    def quantize_input(self, x):
        return torch.round(x * 4) / 4


def test_undeclared_activation_quantizer_is_refused(tmp_path):
    model, sq = sq_model("resnet10t")
    layer = next(iter(sq.layers))
    sq.layers[layer].quantizer = TWNWithUndeclaredInputs()
    with pytest.raises(ExportError, match=rf"layer {layer}: .* quantizes its input but has no activation_qparams"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert not (tmp_path / "m.onnx").exists()


def test_low_ratio_refused_from_python(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(0.5, 1.0))))  # controller at 0.5
    with pytest.raises(ExportError, match="SQ ratio is 0.5 < 1.0"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- a trained run, through the CLI
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One epoch of recipes/digits_twn.yaml (TWN, SQ ratio 1 from the first step) in a run folder."""
    from sqdist.config import load_recipe
    from sqdist.train import train

    run = tmp_path_factory.mktemp("digits") / "run"
    recipe = load_recipe(os.path.join(ROOT, "recipes", "digits_twn.yaml"),
                         ["train.epochs=1", f"run.dir={run}", "train.progress=false"])
    summary = train(recipe)
    return run, recipe, summary


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_trained_digits_run_exports_to_onnx(digits_run, tmp_path, capsys):
    from sqdist.data import build_datasets
    from sqdist.train import build_model

    run, recipe, summary = digits_run
    out = tmp_path / "digits_twn.onnx"
    code, stdout, stderr = cli(capsys, run, out)
    assert code == 0, stderr
    assert "wrote" in stdout and "input (batch, 1, 8, 8)" in stdout
    assert "onnxruntime (default session) max |logit difference|" in stdout

    # sqdist's eval forward of the trained weights
    model, sq = build_model(recipe)
    model.load_state_dict(load_file(str(run / "final" / "model.safetensors")))
    model.eval()
    x, y = build_datasets(recipe)[1].tensors
    with torch.no_grad():
        expected = model(x)
    logits = onnxruntime_logits(out, x)
    assert (logits - expected).abs().max() <= 1e-4
    accuracy = 100.0 * int((logits.argmax(1) == y).sum()) / len(y)
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)  # the file scores what training reported

    graph = onnx.load(str(out)).graph
    layers = json.loads((run / "final" / "meta.json").read_text())["quant"]["layers"]
    assert layers == list(sq.layers)
    assert_codes_match(graph, model, layers)
    ternary = [codes for codes, _, _ in int8_dequantized(graph).values()]
    assert len(ternary) == len(layers) and all(set(np.unique(c)) <= {-1, 0, 1} for c in ternary)

    code, stdout, _ = cli(capsys, "--check", out)
    assert code == 0 and f"{len(layers)} int2 + 0 int4 + 0 int8 weights" in stdout


@pytest.mark.slow
def test_cli_refusals_are_one_line(digits_run, tmp_path, capsys):
    run = digits_run[0]

    def refused(*args, words):
        code, stdout, stderr = cli(capsys, *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        for word in words:
            assert word in lines[0], lines[0]

    # a run that had not reached SQ ratio 1: refused unless --force
    low = tmp_path / "low"
    (low / "final").mkdir(parents=True)
    (low / "final" / "model.safetensors").write_bytes((run / "final" / "model.safetensors").read_bytes())
    meta = json.loads((run / "final" / "meta.json").read_text())
    meta["sq"]["ratio"] = 0.875
    (low / "final" / "meta.json").write_text(json.dumps(meta))
    refused(low, tmp_path / "low.onnx", words=["sq.ratio=0.875", "--force"])
    assert not (tmp_path / "low.onnx").exists()
    code, _, stderr = cli(capsys, low, tmp_path / "low.onnx", "--force", "--input-size", "1,8,8")
    assert code == 0 and (tmp_path / "low.onnx").exists(), stderr

    refused(run, tmp_path / "m.pt", words=["out=", "allowed: a path ending in .safetensors, .onnx or .xml"])
    refused(run, tmp_path / "m.onnx", "--input-size", "8,8", words=["--input-size='8,8'", "C,H,W"])
    refused(run, tmp_path / "m.onnx", "--keep-fp-bits", "16", words=["--keep-fp-bits=16", "allowed: 8 or 32"])
    refused(run, tmp_path / "m.safetensors", "--input-size", "1,8,8", words=["--input-size", "ONNX"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    refused("--check", bad, words=[str(bad), "not a valid ONNX model"])
    # --format overrides the suffix
    code, stdout, stderr = cli(capsys, run, tmp_path / "model.bin", "--format", "onnx")
    assert code == 0, stderr
    assert len(onnx.load(str(tmp_path / "model.bin")).graph.initializer) > 0


# ---------------------------------------------------------------- layers the model does not call (W4A8)
def tiny_encoder():
    from test_quantize_model import TinyEncoder

    return TinyEncoder(), (3, 16, 16)


def eva02():
    return timm.create_model("eva02_tiny_patch14_336", num_classes=10, img_size=28), (3, 28, 28)


@pytest.mark.parametrize("build", [tiny_encoder, eva02])
def test_models_that_bypass_a_layer_forward_train_and_export(tmp_path, build):
    """EVA-02 (fused qkv read as a weight) and a model on nn.TransformerEncoderLayer (fused eval fast path), with
    4-bit weights and LSQ 8-bit inputs: calibrate, train a step (every step positive and finite), and export to
    the packed file and ONNX with the eval logits."""
    import warnings

    from sqdist import calibrate_activations
    from sqdist.export import export_model, read_packed
    from sqdist.export.qdq import InputQuantizer, _quantize_input_hook

    torch.manual_seed(0)
    model, size = build()
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left full precision are named in a warning
        sq = quantize_model(model, QuantConfig(quantizer="kbit", params={"bits": 4}, activations="lsq",
                                               activation_params={"bits": 8}, sq=SQConfig(ratios=(1.0,))))
    x = torch.randn(4, *size)
    assert calibrate_activations(model, x) == len(sq.activation_quantizers) == len(sq.layers)
    model.train()
    sq.draw_masks()
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    steps = torch.cat([q.step.detach() for q in sq.activation_quantizers.values()])
    assert bool((steps > 0).all()) and bool(torch.isfinite(steps).all())
    model.eval()
    with torch.no_grad():
        expected = model(x)
    span = float(expected.max() - expected.min())

    export_onnx(model, tmp_path / "m.onnx", input_size=size)
    assert (onnxruntime_logits(tmp_path / "m.onnx", x) - expected).abs().max() <= 1e-3 * span

    export_model(model, tmp_path / "m.safetensors", model_name="any")  # rebuilt below, without timm
    state, meta = read_packed(tmp_path / "m.safetensors")
    assert set(meta["layers"]) == set(sq.layers) and set(meta["inputs"]) == set(sq.layers)
    fresh.load_state_dict(state)  # the plain float model: dequantized weights, quantized inputs as load_quantized
    for name, info in meta["inputs"].items():
        layer = fresh.get_submodule(name)
        layer.input_quantizer = InputQuantizer(info["scale"], info["zero_point"], info["qmin"], info["qmax"])
        layer.register_forward_pre_hook(_quantize_input_hook)
    with torch.no_grad():
        assert (fresh.eval()(x) - expected).abs().max() <= 1e-3 * span


def test_weight_quantizer_input_and_activation_quantizer_are_one_qdq(tmp_path):
    """A layer whose weight quantizer quantizes its input (signed 4-bit, step 1/8) and whose activation quantizer
    (LSQ 8-bit) has the same step: one QuantizeLinear -> Clip -> DequantizeLinear with the intersected range
    computes both, as the training forward does."""
    from sqdist import calibrate_activations

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    sq = quantize_model(model, QuantConfig(quantizer="twn", activations="lsq", activation_params={"bits": 8},
                                           sq=SQConfig(ratios=(1.0,))))
    x = torch.randn(4, 3, 32, 32)
    calibrate_activations(model, x)
    for layer in sq.layers.values():
        layer.quantizer = TWNWith4BitInputs()
        layer.input_quantizer.step.data.fill_(TWNWith4BitInputs.step)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for layer in sq.layers.values():
            layer.quantizer = TWN()  # without the weight quantizer's input rule ...
        assert (model(x) - expected).abs().max() > 1e-2  # ... the logits move: `expected` holds both rules
        for layer in sq.layers.values():
            layer.quantizer = TWNWith4BitInputs()
    info = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert info["qdq_inputs"] == len(sq.layers)
    assert (onnxruntime_logits(tmp_path / "m.onnx", x) - expected).abs().max() <= 1e-4
# ---------------------------------------------------------------- rounding ties (8-bit activation quantizers)
def test_onnxruntime_quantizelinear_divides_like_torch():
    """QuantizeLinear computes round(x / scale), not round(x * (1 / scale)): on the values where the two
    differ, onnxruntime agrees with torch's division (so torch's eval forward needs no change)."""
    scale = np.float32(0.1)
    ties = ((np.arange(-2000, 2000, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.float32)
    x = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    divided = np.rint(x / scale)  # x within an ulp of (k + 1/2) * scale
    multiplied = np.rint(x * (np.float32(1) / scale))
    differ = divided != multiplied
    assert differ.sum() > 10  # the two formulas do disagree on these inputs
    node = onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    graph = onnx.helper.make_graph(
        [node], "q", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("q", onnx.TensorProto.INT16, [None])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(0, np.int16), "z")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (q,) = session.run(["q"], {"x": x[differ]})
    torch_codes = torch.round(torch.from_numpy(x[differ]) / torch.tensor(scale)).numpy()
    assert np.array_equal(q, torch_codes) and np.array_equal(q, divided[differ])


def lsq8_model(name, size, kwargs=None, seed=0):
    """4-bit weights and 8-bit LSQ inputs, calibrated, one SGD step (the step moves off its initial value)."""
    from sqdist import calibrate_activations

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **(kwargs or {}))
    quantize_model(model, QuantConfig(quantizer="kbit", params={"bits": 4}, activations="lsq",
                                      activation_params={"bits": 8}, sq=SQConfig(ratios=(1.0,))))
    x = torch.randn(8, 3, size, size)
    calibrate_activations(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    model(x).logsumexp(1).mean().backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("name,kwargs", [("test_vit", {"img_size": 64}), ("test_efficientnet_gn", {})])
def test_rounding_ties_are_the_only_difference_with_8bit_inputs(tmp_path, name, kwargs):
    """4-bit weights, 8-bit inputs: a value within float32 noise of a rounding tie rounds the other way in
    onnxruntime (it sums a LayerNorm / MatMul / conv in another order than torch), and that one code moves
    the logits by ~1e-2 to 1e-1. The export check takes onnxruntime's code at such ties only, and then
    agrees within 1e-4 (before, the check compared as is and refused these exports)."""
    model = lsq8_model(name, 64, kwargs)
    path = tmp_path / f"{name}.onnx"
    info = export_onnx(model, path, input_size=(3, 64, 64))  # a default onnxruntime session
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # the check's batch
    with torch.no_grad():
        expected = model(x)
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    assert info["max_abs_diff"] <= tolerance and info["max_abs_diff_model"] == 0.0
    # whether a value lands within float noise of a tie depends on the CPU and the thread count (the
    # order of the sums): where onnxruntime's logits as they are differ beyond the tolerance, ties
    # decided the other way are what the check found (and forcing them alone closed the gap above)
    if (onnxruntime_logits(path, x) - expected).abs().max() > tolerance:
        assert info["tie_flips"] >= 1


def test_check_still_catches_a_wrong_scale(tmp_path):
    """Forcing ties hides nothing else: against a network whose input scales are off by 1%, the check fails."""
    from sqdist.export.onnx_check import check_against_torch
    from sqdist.export.onnx_writer import deployable
    from sqdist.export.qdq import InputQuantizer

    model = lsq8_model("resnet10t", 32)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, input_size=(3, 32, 32))  # the graph passes against the right network
    net = deployable(model)
    quantizers = [m for m in net.modules() if isinstance(m, InputQuantizer)]
    assert quantizers
    for m in quantizers:
        m.scale.mul_(1.01)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ExportError, match="onnxruntime('s codes| logits) differ"):
        check_against_torch(path, net, x)


def test_codes_of_a_quantizer_moved_by_onnxruntime_are_observed(tmp_path):
    """onnxruntime's QDQ propagation moves the QuantizeLinear after a LayerNorm2d (LayerNormalization ->
    Transpose -> Q) in front of the Transpose under another name. The check still reads its codes (at its
    DequantizeLinear): every QuantizeLinear's codes are observed, and with ties forced they equal torch's
    own codes everywhere. (Before, those codes were missing, a tie flipped there went unforced and moved
    coatnet_pico_rw_224's logits by 1.9e-3.)"""
    from sqdist.export.onnx_check import onnxruntime_codes
    from sqdist.export.onnx_writer import deployable
    from sqdist.export.qdq import InputQuantizer, forced_ties

    model = lsq8_model("test_coatnet", 160)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, input_size=(3, 160, 160), check=False)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    written = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}
    kept = {n.name for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "QuantizeLinear"}
    assert written - kept  # onnxruntime did move some
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    logits, codes = onnxruntime_codes(path, x)
    assert len(codes) == len(written) and all(c is not None for c in codes)
    net = deployable(model)
    ours = []
    for m in net.modules():
        if isinstance(m, InputQuantizer):
            m.register_forward_hook(lambda m, args, out: ours.append(out / m.scale + m.zero_point.float()))
    with torch.no_grad(), forced_ties(codes):
        forced = net(x)
    assert len(ours) == len(codes)
    assert all(torch.equal(theirs.reshape(mine.shape), mine.round()) for theirs, mine in zip(codes, ours))
    assert (forced - logits).abs().max() <= 1e-4 * max(1.0, float(forced.abs().max()))


SWEEP = [pytest.param("vit_tiny_patch16_384", 64, {"img_size": 64}, id="vit_tiny_patch16_384"),
         pytest.param("coatnet_pico_rw_224", 224, {}, id="coatnet_pico_rw_224"),
         pytest.param("test_coatnet", 160, {}, id="test_coatnet"),
         pytest.param("mobileone_s0", 64, {}, id="mobileone_s0"),
         pytest.param("densenet121", 64, {}, id="densenet121"),
         pytest.param("repvit_m0_9", 64, {}, id="repvit_m0_9"),
         pytest.param("tf_efficientnet_lite3", 64, {}, id="tf_efficientnet_lite3")]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kwargs", SWEEP)
def test_8bit_inputs_match_onnxruntime_across_architectures(tmp_path, name, size, kwargs):
    model = lsq8_model(name, size, kwargs)
    info = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(3, size, size))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    assert info["max_abs_diff"] <= 1e-4 * max(1.0, float(expected.abs().max()))  # a default onnxruntime session


# ---------------------------------------------------------------- INT4 storage
def test_int4_storage_is_smaller_with_the_same_logits(tmp_path):
    model, sq = sq_model("resnet10t", quantizer="kbit", params={"bits": 4})
    info4 = export_onnx(model, tmp_path / "m21.onnx", input_size=(3, 32, 32), opset=21)  # INT4
    info8 = export_onnx(model, tmp_path / "m17.onnx", input_size=(3, 32, 32), opset=17)
    assert info4["opset"] == 21 and info4["int4_weights"] == len(sq.layers) and info4["int8_weights"] == 0
    assert info8["int8_weights"] == len(sq.layers) and info8["int4_weights"] == 0
    graph = onnx.load(str(tmp_path / "m21.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    for name in sq.layers:
        assert inits[f"{name}.weight.codes"].data_type == onnx.TensorProto.INT4
    codes4, codes8 = int8_dequantized(graph), int8_dequantized(onnx.load(str(tmp_path / "m17.onnx")).graph)
    assert codes4.keys() == codes8.keys() and all(np.array_equal(codes4[k][0], codes8[k][0]) for k in codes4)
    assert info4["bytes"] < 0.65 * info8["bytes"]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(onnxruntime_logits(tmp_path / "m21.onnx", x), onnxruntime_logits(tmp_path / "m17.onnx", x))


def test_ternary_codes_are_int2_at_opset_25(tmp_path):
    model, sq = sq_model("resnet10t")  # TWN
    info2 = export_onnx(model, tmp_path / "m25.onnx", input_size=(3, 32, 32))  # the default opset
    info4 = export_onnx(model, tmp_path / "m21.onnx", input_size=(3, 32, 32), opset=21)
    assert info2["opset"] == 25 and info2["int2_weights"] == len(sq.layers) and info4["int4_weights"] == len(sq.layers)
    codes2, codes4 = int8_dequantized(onnx.load(str(tmp_path / "m25.onnx")).graph), \
        int8_dequantized(onnx.load(str(tmp_path / "m21.onnx")).graph)
    assert all(np.array_equal(codes2[k][0], codes4[k][0]) for k in codes4)
    assert info2["bytes"] < info4["bytes"]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(onnxruntime_logits(tmp_path / "m25.onnx", x), onnxruntime_logits(tmp_path / "m21.onnx", x))


# ---------------------------------------------------------------- 8-bit activations: integer kernels
def optimized_graph(path):
    """The graph a default onnxruntime session runs (its saved optimized model)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def optimized_ops(path):
    """Node kinds of the graph a default onnxruntime session runs (its saved optimized model)."""
    import collections

    return collections.Counter(n.op_type for n in optimized_graph(path).node)


def test_int8_activations_run_as_integer_kernels(tmp_path):
    from sqdist.export.int8 import IntegerLayer
    from sqdist.export.onnx_check import check_against_torch
    from sqdist.export.onnx_writer import deployable

    model, sq = sq_model("resnet10t")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    path = tmp_path / "int8.onnx"
    info = export_onnx(model, path, input_size=(3, 32, 32), keep_fp_bits=8, activations="int8",
                       calibration=calibration)
    assert info["activations"] == "int8" and info["max_abs_diff"] is not None

    ops = optimized_ops(path)
    assert ops["QLinearConv"] == len(convs) and ops["Conv"] == 0  # every conv on integers
    assert ops["QLinearAdd"] >= 3 and ops["QGemm"] == 1  # residual adds and the classifier too
    graph_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in graph_ops  # folded into the convs' per-row scales and biases

    # the same network in torch (what the check compares with), built independently of the export
    net = deployable(model, 8, "int8", calibration)
    assert sum(isinstance(m, IntegerLayer) for m in net.modules()) == len(convs) + 1
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    result = check_against_torch(path, net, x)
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, float(net(x).abs().max()))
    with torch.no_grad():
        float_logits, int8_logits = model(x), net(x)
    assert (float_logits - int8_logits).abs().max() > 1e-5  # 8-bit activations are not the float model


@pytest.mark.parametrize("name,size", [("resnet10t", 32), ("resnet18", 64)])
def test_int8_resnet_runs_on_integers_from_input_to_logits(tmp_path, name, size):
    """The optimized graph of an int8 ResNet has the structure of onnxruntime's own quantize_static
    on the FP32 model: every conv, every residual add, the max pool and the global average pool run
    on uint8 codes; only the input's QuantizeLinear and the logits' DequantizeLinear touch floats."""
    from timm.models.resnet import BasicBlock, Bottleneck

    model, _ = sq_model(name)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    blocks = [n for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    calibration = [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    path = tmp_path / "int8.onnx"
    info = export_onnx(model, path, input_size=(3, size, size), keep_fp_bits=8, activations="int8",
                       calibration=calibration)  # checked against the torch network (0 codes off at a tie)
    assert info["max_abs_diff"] is not None

    graph = optimized_graph(path)
    ops = optimized_ops(path)
    assert ops["QLinearConv"] == len(convs) and ops["QGemm"] == 1
    assert ops["QLinearAdd"] == len(blocks)  # the last block's add too (it feeds the pool)
    assert ops["QLinearGlobalAveragePool"] == 1
    assert ops["NhwcMaxPool"] + ops["MaxPool"] == 1
    assert not {"Conv", "Add", "Relu", "GlobalAveragePool", "AveragePool", "Gemm", "MatMul"} & set(ops), ops
    (q,) = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert q.input[0] == "input" and dq.output[0] == "logits"  # no float tensor in between
    pool = next(n for n in graph.node if n.op_type in ("NhwcMaxPool", "MaxPool"))
    producers = {o: n for n in graph.node for o in n.output}
    assert producers[pool.input[0]].op_type == "QLinearConv"  # the stem's codes, not a re-quantization


def test_integer_global_avg_pool_is_onnxruntimes_kernel_bit_for_bit(tmp_path):
    """IntegerGlobalAvgPool's forward (the torch side of the export check) against onnxruntime's
    QLinearGlobalAveragePool, which fuses its graph form; ties included (scale ratio 1/4 on 2x2)."""
    import warnings

    from sqdist.export.int8 import IntegerGlobalAvgPool

    cases = [((7, 7), 0.05, 0, 0.02, 3), ((2, 2), 0.1, 17, 0.1, 0), ((3, 5), 0.03, 128, 0.011, 140),
             ((1, 1), 0.2, 5, 0.07, 9)]
    for k, ((h, w), x_scale, x_zp, y_scale, y_zp) in enumerate(cases):
        pool = IntegerGlobalAvgPool((torch.tensor(x_scale), x_zp), (torch.tensor(y_scale), y_zp)).eval()
        codes = torch.randint(0, 256, (5, 37, h, w), generator=torch.Generator().manual_seed(k)).float()
        x = (codes - x_zp) * torch.tensor(x_scale)  # its own QuantizeLinear gives these codes back exactly
        path = tmp_path / f"pool{k}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(pool, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"])
        assert optimized_ops(path)["QLinearGlobalAveragePool"] == 1  # the fused integer kernel runs
        with torch.no_grad():
            ours = pool(x)
        theirs = onnxruntime_logits(path, x)
        assert torch.equal(ours, theirs), (h, w, float((ours - theirs).abs().max()))
        mean = x.mean(dim=(-2, -1), keepdim=True)  # and it is a pool: within half a step of the float mean
        assert float((ours - mean.clamp((0 - y_zp) * y_scale, (255 - y_zp) * y_scale)).abs().max()) <= 0.51 * y_scale


def test_int8_activations_refuse_a_model_with_its_own_activation_quantizers(tmp_path):
    model = lsq8_model("resnet10t", 32)
    with pytest.raises(ExportError, match="quantizes its inputs itself"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32), activations="int8",
                    calibration=[torch.randn(2, 3, 32, 32)])
    with pytest.raises(ExportError, match="activations='int4'; allowed: float, int8"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32), activations="int4")


@pytest.mark.slow
def test_digits_run_with_int8_activations_keeps_its_top1(digits_run, tmp_path, capsys):
    run, recipe, summary = digits_run
    out = tmp_path / "int8.onnx"
    code, stdout, stderr = cli(capsys, run, out, "--activations", "int8", "--calib-batches", "4", "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    layers = json.loads((run / "final" / "meta.json").read_text())["quant"]["layers"]
    assert info["activations"] == "int8" and info["int2_weights"] == len(layers)  # ternary codes: INT2
    assert info["top1_model"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    assert abs(info["top1_onnx"] - info["top1_model"]) <= 1.0  # a default onnxruntime session, integer kernels
    assert info["agreement"] >= 95.0  # one epoch: more images near a decision boundary than a finished run has
    assert info["rounding_worst_share"] <= 0.01 and info["model_rel_error"] is not None
    assert optimized_ops(out)["QLinearConv"] >= len(layers)
    code, stdout, _ = cli(capsys, run, out, "--activations", "int8", "--calib-batches", "4")
    assert code == 0 and f"the same prediction on {info['agreement']:.2f}% of {info['eval_examples']}" in stdout


@pytest.mark.slow
def test_finished_digits_twn_run_with_int8_activations_predicts_what_it_predicts(tmp_path, capsys):
    """recipes/digits_twn.yaml trained to the end, exported with --activations int8: onnxruntime predicts the
    trained model's class on at least 98% of the test images (the command prints the share)."""
    from sqdist.config import load_recipe
    from sqdist.train import train

    run = tmp_path / "run"
    train(load_recipe(os.path.join(ROOT, "recipes", "digits_twn.yaml"), [f"run.dir={run}", "train.progress=false"]))
    code, stdout, stderr = cli(capsys, run, tmp_path / "int8.onnx", "--activations", "int8")
    assert code == 0, stderr
    share = float(stdout.split("the same prediction on ")[1].split("%")[0])
    assert share >= 98.0, stdout


@pytest.mark.slow
def test_cli_deploy_flags_are_refused_in_one_line(digits_run, tmp_path, capsys):
    run = digits_run[0]
    for args, words in [
        (("--activations", "int4"), ["--activations='int4'", "allowed: float, int8"]),
        (("--activations", "int8", "--calib-batches", "0"), ["--calib-batches='0'", "an integer >= 1"]),
        (("--activations", "int8", "--calib-batches", "two"), ["--calib-batches='two'", "an integer >= 1"]),
        (("--calib-batches", "4"), ["--calib-batches='4'", "--activations int8"]),
        (("--opset", "26"), ["--opset='26'", "from 13 to 25"]),
        (("--opset", "12"), ["--opset='12'", "from 13 to 25"]),
    ]:
        code, stdout, stderr = cli(capsys, run, tmp_path / "m.onnx", *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / "m.onnx").exists()
    code, _, stderr = cli(capsys, run, tmp_path / "m.safetensors", "--activations", "int8")
    assert code == 2 and "--activations='int8': only ONNX export takes it" in stderr
