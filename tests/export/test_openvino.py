"""OpenVINO IR export: a trained run written as OUT.xml + OUT.bin (ternary codes in 2 bits), run in OpenVINO's
CPU plugin on integer kernels, checked against the trained model; refusals in one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from sqdist import QuantConfig, SQConfig, quantize_model
from sqdist.export import ExportError, main

ov = pytest.importorskip("openvino")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished_digits_run(tmp_path_factory):
    """recipes/digits_twn.yaml trained to the end (~1-2 minutes on a CPU)."""
    from sqdist.config import load_recipe
    from sqdist.train import train

    run = tmp_path_factory.mktemp("digits") / "run"
    recipe = load_recipe(os.path.join(ROOT, "recipes", "digits_twn.yaml"), [f"run.dir={run}", "train.progress=false"])
    summary = train(recipe)
    return run, recipe, summary


@pytest.mark.slow
def test_finished_digits_run_in_openvino_predicts_what_the_trained_model_predicts(finished_digits_run, tmp_path,
                                                                                  capsys):
    from sqdist.data import build_datasets
    from sqdist.train import build_model

    run, recipe, summary = finished_digits_run
    out = tmp_path / "digits.xml"
    code, stdout, stderr = cli(capsys, run, out, "--activations", "int8", "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    layers = json.loads((run / "final" / "meta.json").read_text())["quant"]["layers"]
    assert out.is_file() and out.with_suffix(".bin").is_file() and not list(tmp_path.glob("tmp*"))
    assert info["int2_weights"] == len(layers)  # ternary codes in 2 bits; the stem and classifier's int8 stay
    assert info["integer_convolutions"] >= len(layers) - 1 and info["float_convolutions"] == 0  # u8 kernels
    assert info["max_abs_diff"] <= 1e-4 * 10 and info["near_flips"] == 0  # OpenVINO's codes are torch's
    assert info["top1_model"] == pytest.approx(summary["final_accuracy"], abs=1e-9)

    # independently of the command: the trained model in torch against the written IR in a default OpenVINO compile
    model, _ = build_model(recipe)
    model.load_state_dict(load_file(str(run / "final" / "model.safetensors")))
    model.eval()
    x, y = build_datasets(recipe)[1].tensors
    with torch.no_grad():
        trained = model(x).argmax(1)
    logits = ov.Core().compile_model(str(out), "CPU")(x.numpy())[0]
    theirs = torch.from_numpy(logits).argmax(1)
    agreement = 100.0 * float((theirs == trained).float().mean())
    assert agreement >= 98.0, agreement
    assert abs(100.0 * float((theirs == y).float().mean()) - summary["final_accuracy"]) <= 2.0
    assert info["agreement"] >= 98.0

    # the text summary and the stand-alone check
    code, stdout, stderr = cli(capsys, run, out, "--activations", "int8")
    assert code == 0 and f"the same prediction on {info['agreement']:.2f}% of {info['eval_examples']}" in stdout
    code, stdout, _ = cli(capsys, "--check", out)
    assert code == 0 and f"{len(layers)} 2-bit + 0 4-bit weights" in stdout


def small_model():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(1.0,))))
    return model.eval()


@pytest.mark.slow
def test_the_check_catches_a_network_that_is_not_the_one_openvino_runs(tmp_path):
    """OpenVINO's codes are compared with the converted network's at every FakeQuantize: one output scale off by
    5% in torch (a conversion error on either side) is refused; the untouched network passes."""
    from sqdist.export.onnx_writer import check_batch, deployable
    from sqdist.export.openvino import check_against_openvino, export_openvino
    from sqdist.export.int8 import IntegerLayer

    model = small_model()
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    path = tmp_path / "m.xml"
    info = export_openvino(model, path, input_size=(3, 32, 32), keep_fp_bits=8, activations="int8",
                           calibration=calibration)
    assert info["int2_weights"] == 13 and info["float_convolutions"] == 0
    net = deployable(model, 8, "int8", calibration)
    x = check_batch(calibration, (3, 32, 32))
    assert check_against_openvino(path, net, x, model, same_network=False)["near_flips"] == 0
    layer = [m for m in net.modules() if isinstance(m, IntegerLayer)][3]
    layer.y_scale.mul_(1.05)
    with pytest.raises(ExportError, match="OpenVINO's codes differ from torch's"):
        check_against_openvino(path, net, x, model, same_network=False)


def test_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    def refused(*args, words):
        code, _, stderr = cli(capsys, *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert all(w in lines[0] for w in words), lines[0]

    run = tmp_path / "run"  # refused before the run is read
    refused(run, tmp_path / "m.xml", "--opset", "25", words=["--opset='25'", "opset 21", "omit --opset"])
    refused("--check", tmp_path / "none.xml", words=["none.xml", "no such IR"])
    refused(run, tmp_path / "m.pt", words=["out=", ".safetensors, .onnx or .xml"])
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if openvino were not installed
    refused(run, tmp_path / "m.xml", "--activations", "int8", words=["openvino package", "sqdist[openvino]"])
    assert not (tmp_path / "m.xml").exists()


@pytest.mark.slow
def test_deploy_benchmark_rows_carry_their_runtime():
    """benchmarks/deploy.py on a tiny net: every network in both runtimes, each row against its own runtime's FP32,
    OpenVINO's convolutions of sqdist's and NNCF's int8 on u8."""
    proc = subprocess.run([sys.executable, "benchmarks/deploy.py", "--models", "resnet10t", "--image-size", "32",
                           "--reps", "1", "--lock", "", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    kinds = {(r["runtime"], r["weights"], r["activations"], r["batch"]) for r in rows}
    for batch in (1, 8):
        assert {("onnxruntime", "fp32", "float", batch), ("onnxruntime", "twn", "int8", batch),
                ("onnxruntime", "int8 (onnxruntime quantize_static)", "int8", batch),
                ("openvino", "fp32", "float", batch), ("openvino", "twn", "int8", batch),
                ("openvino", "int8 (NNCF nncf.quantize)", "int8", batch)} <= kinds
    for r in rows:
        base = next(b for b in rows if (b["runtime"], b["batch"], b["weights"]) == (r["runtime"], r["batch"], "fp32"))
        assert r["fp32_ms"] == base["ms"] and r["speedup"] == pytest.approx(base["ms"] / r["ms"], rel=1e-2, abs=1e-3)
        if r["runtime"] == "openvino" and r["activations"] == "int8":
            assert set(r["conv_precisions"]) <= {"u8", "i8"}, r
    ours = next(r for r in rows if (r["runtime"], r["weights"], r["activations"]) == ("openvino", "twn", "int8"))
    nncf = next(r for r in rows if r["runtime"] == "openvino" and r["weights"].startswith("int8 (NNCF"))
    assert ours["int2_weights"] == 13 and ours["bytes"] < nncf["bytes"]
    assert np.isfinite([r["ms"] for r in rows]).all()
