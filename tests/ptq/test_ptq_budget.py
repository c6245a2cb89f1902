"""PTQ bits per layer under a budget (``--avg-bits``, ``--size-budget``).

The knapsack is held to brute force; each layer's bytes to what the packed file stores; the
sensitivity to a direct computation (only that layer quantized, BN re-estimated, KL from the
FP network); the command to a real digits run whose budgeted file ``load_quantized``,
``python -m sqdist.export --check`` and onnxruntime read.
"""
import copy
import itertools
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sqdist
from sqdist import create_quantizer, export_model, load_quantized
from sqdist.export import read_packed
from sqdist.ptq import PTQConfig, ptq_model
from sqdist.ptq.budget import choose_widths, knapsack, layer_bytes
from sqdist.ptq.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
NET = {"num_classes": 10, "in_chans": 1, "channels": [4, 8, 16, 32], "stem_width": 8}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force(costs, values, budget):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[j] for c, j in zip(costs, picks))
        value = sum(v[j] for v, j in zip(values, picks))
        if cost <= budget and (best is None or value < best - 1e-12):
            best = value
    return best


def test_knapsack_matches_brute_force_on_small_cases():
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        items, options = 1 + case % 5, 1 + case % 4
        costs = torch.randint(0, 12, (items, options), generator=g).tolist()
        values = torch.rand(items, options, generator=g).tolist()
        budget = int(torch.randint(0, 40, (1,), generator=g))
        picks = knapsack(costs, values, budget)
        best = brute_force(costs, values, budget)
        if best is None:
            assert picks is None, case
            continue
        assert sum(c[j] for c, j in zip(costs, picks)) <= budget, case
        assert sum(v[j] for v, j in zip(values, picks)) == pytest.approx(best, abs=1e-12), case


def test_choose_widths_never_exceeds_a_large_budget_and_refuses_one_below_the_narrowest():
    g = torch.Generator().manual_seed(1)
    names = [f"l{i}" for i in range(6)]
    nbytes = {n: {b: int(1000 * (i + 1) * b) + 37 for b in (1, 2, 4, 8)} for i, n in enumerate(names)}
    draws = torch.rand(len(names), 4, generator=g)
    sens = {n: {b: float(draws[i, k] + 1) / b for k, b in enumerate((1, 2, 4, 8))} for i, n in enumerate(names)}
    for budget in (21 * 1000 + 6 * 37, 50_000, 77_777, 168_222):   # units of several bytes when above 20000
        widths = choose_widths(sens, nbytes, budget)
        assert sum(nbytes[n][b] for n, b in widths.items()) <= budget
        exact = brute_force([list(nbytes[n].values()) for n in names], [list(sens[n].values()) for n in names],
                            budget)
        got = sum(sens[n][b] for n, b in widths.items())
        assert got <= exact + 0.05 * sum(max(v.values()) for v in sens.values())   # byte units rounded up
    assert choose_widths(sens, nbytes, 10**9) == dict.fromkeys(names, 8)          # everything at its best
    with pytest.raises(ValueError, match="narrowest widths need"):
        choose_widths(sens, nbytes, 21 * 1000 + 6 * 37 - 1)


def trained_looking_resnet(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", **NET)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(96, 1, 16, 16)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval(), TensorDataset(x, torch.randint(0, 10, (96,)))


def kl_with_only(model, name, weight, x):
    """The sensitivity written out: FP and one-layer-quantized copies, BN re-estimated on ``x``."""
    def reestimated(m):
        m = copy.deepcopy(m)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.reset_running_stats()
                bn.momentum = None
        m.train()
        with torch.no_grad():
            m(x)
        return m.eval()

    fp = reestimated(model)
    q = copy.deepcopy(model)
    dict(q.named_modules())[name].weight.data.copy_(weight)
    q = reestimated(q)
    with torch.no_grad():
        p, r = torch.log_softmax(fp(x), -1), torch.log_softmax(q(x), -1)
    return float((p.exp() * (p - r)).sum(-1).mean())


def test_budgeted_walk_keeps_to_the_budget_and_its_file_stores_the_chosen_widths(tmp_path):
    model, data = trained_looking_resnet()
    fp = copy.deepcopy(model)
    config = PTQConfig(method="rtn", avg_bits=2.5, calib_images=96, widths=(1, 2, 3, 4, 8))
    records = ptq_model(model, data, config, device="cpu", batch_size=96)   # one chunk: BN's estimate as below
    modules = dict(fp.named_modules())
    weights = sum(modules[r["layer"]].weight.numel() for r in records)
    spent = sum(layer_bytes(modules[r["layer"]], r["bits"]) for r in records)
    assert spent <= 2.5 * weights / 8 and len({r["bits"] for r in records}) > 1
    # the sensitivity the choice used, against the written-out computation (RTN: the quantizer once)
    first = records[3]
    w = modules[first["layer"]].weight.detach()
    for bits in (1, 2, 8):
        q = create_quantizer("bwn") if bits == 1 else create_quantizer("kbit", bits=bits)
        approx, _ = q.quantize(w.reshape(w.shape[0], -1))
        expected = kl_with_only(fp, first["layer"], approx.reshape(w.shape), data.tensors[0])
        assert first["sensitivity"][bits] == pytest.approx(expected, rel=1e-3, abs=1e-7), bits
    assert all(r["sensitivity"][8] < r["sensitivity"][1] for r in records)
    # the choice is the knapsack's optimum over those sensitivities and bytes
    names = [r["layer"] for r in records]
    sens = {r["layer"]: r["sensitivity"] for r in records}
    nbytes = {n: {b: layer_bytes(modules[n], b) for b in config.widths} for n in names}
    assert choose_widths(sens, nbytes, int(2.5 * weights / 8)) == {r["layer"]: r["bits"] for r in records}
    # the packed file: each layer's bits and bytes, read back with the same logits
    out = tmp_path / "mixed.safetensors"
    export_model(model, out, model_name="resnet10t", model_kwargs=NET)
    state, meta = read_packed(out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        for r in records:
            assert meta["packed"][r["layer"]]["bits"] == r["bits"]
            stored = f.get_tensor(f"{r['layer']}.weight.packed").numel() + 4 * f.get_tensor(
                f"{r['layer']}.weight.scale").numel()
            assert stored == layer_bytes(modules[r["layer"]], r["bits"]), r["layer"]
    x = data.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(x), model(x))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ptq_budget") / "fp"
    proc = subprocess.run([sys.executable, "-m", "sqdist.train", os.path.join(ROOT, "recipes", "digits_fp.yaml"),
                           "train.epochs=1", f"run.dir={run}", "train.progress=false", "track.wandb=false"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_command_avg_bits_json_export_check_and_onnx(digits_run, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    assert main([str(digits_run), str(out), "--avg-bits", "2.5", "--calib-images", "128", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "gptq" and r["quantizer"] == "ptq-mixed" and r["reload_max_abs_diff"] == 0.0
    assert set(r["bits"]) == set(r["layer_output_error"]) and set(r["bits"].values()) <= {1, 2, 3, 4, 8}
    assert r["quantized_bytes"] <= r["budget_bytes"] and r["avg_bits"] <= 2.5
    assert r["bytes"] == out.stat().st_size and 0 <= r["top1"] <= 100
    _, meta = read_packed(out)
    assert {n: meta["packed"][n]["bits"] for n in meta["layers"]} == r["bits"]
    assert isinstance(sqdist.load_quantized(out).layer1[0].conv1, nn.Conv2d)
    check = subprocess.run([sys.executable, "-m", "sqdist.export", "--check", str(out)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert check.returncode == 0 and ": ok, resnet10t with 14 ptq-mixed layers" in check.stdout, check.stderr
    # a size budget in bytes; rtn; the ONNX graph (checked by onnxruntime inside the command)
    budget = r["quantized_bytes"] + 200
    assert main([str(digits_run), str(tmp_path / "s.safetensors"), "--size-budget", str(budget), "--method", "rtn",
                 "--calib-images", "128", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["method"] == "rtn" and s["budget_bytes"] == budget and s["quantized_bytes"] <= budget
    pytest.importorskip("onnxruntime")
    assert main([str(digits_run), str(tmp_path / "b.onnx"), "--avg-bits", "3", "--calib-images", "128"]) == 0
    assert "bits per weight" in capsys.readouterr().out and (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("args, expected", [
    (["--avg-bits", "0"], "--avg-bits=0.0; allowed: a number > 0"),
    (["--avg-bits", "nan"], "--avg-bits=nan; allowed: a number > 0"),
    (["--size-budget", "0"], "--size-budget=0; allowed: an integer >= 1"),
    (["--size-budget", "1000"], "a budget of 1000 bytes"),                     # below the 1-bit layers' bytes
    (["--avg-bits", "0.5"], "at 1 bit; allowed: at least"),
    (["--avg-bits", "2", "--size-budget", "9000"], "--avg-bits=2.0 with --size-budget=9000; allowed: one of them"),
    (["--avg-bits", "2", "--quantizer", "twn"], "--avg-bits with --quantizer twn; allowed: --quantizer kbit"),
    (["--avg-bits", "2", "--bits", "3"], "--bits=3 with --avg-bits (each layer's bits are chosen)"),
    (["--method", "adaround", "--damp", "0.1"], "--damp with --method adaround (it would be ignored)"),
    (["--method", "adaround", "--no-act-order"], "--act-order with --method adaround"),
    (["--method", "rtn", "--adaround-iters", "5"], "--adaround-iters with --method rtn"),
    (["--adaround-reg", "0.1"], "--adaround-reg with --method gptq"),
])
def test_bad_budget_and_method_options_get_one_line_and_exit_2(digits_run, tmp_path, capsys, args, expected):
    assert main([str(digits_run), str(tmp_path / "out.safetensors"), "--calib-images", "64", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sqdist.ptq: error: ") and expected in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_adaround_option_is_one_line_and_exit_2(digits_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(digits_run), str(tmp_path / "o.safetensors"), "--method", "adaround", "--adaround-lr", "0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adaround-lr" in err and "adaround --adaround-iters, --adaround-reg" in err, err


@pytest.mark.slow
def test_budget_on_two_processes_chooses_one_processs_widths_and_writes_its_file(digits_run, tmp_path, capsys,
                                                                               launch_two):
    """``--avg-bits`` under two gloo processes (each rank measures the sensitivities on its half of the
    calibration images, BN statistics combined over the ranks, the KL summed): both ranks end with the
    same network, and the widths, codes and file are one process's on the same images."""
    flags = ["--avg-bits", "2.5", "--calib-images", "64", "--bn-recalibrate", "2", "--no-progress", "--json",
             "data.batch_size=32"]
    dump, two = tmp_path / "dump", tmp_path / "two.safetensors"
    proc = launch_two("ptq_worker.py", dump, digits_run, two, *flags, env={"OMP_NUM_THREADS": "1"})
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, proc.stdout  # rank 0 reports and writes
    r2 = printed[0]
    from safetensors.torch import load_file

    a, b = (load_file(f"{dump}.rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = tmp_path / "one.safetensors"
    assert main([str(digits_run), str(one), *flags]) == 0
    r1 = json.loads(capsys.readouterr().out)
    assert r2["bits"] == r1["bits"] and len(set(r1["bits"].values())) > 1, (r1["bits"], r2["bits"])
    assert r2["quantized_bytes"] == r1["quantized_bytes"] and r2["bytes"] == r1["bytes"] == one.stat().st_size
    for name, sens in r1["sensitivity"].items():
        assert r2["sensitivity"][name] == pytest.approx(sens, rel=1e-4, abs=1e-7), name
    (state_one, meta_one), (state_two, meta_two) = read_packed(one), read_packed(two)
    assert meta_one["packed"] == meta_two["packed"]
    for name in meta_one["layers"]:
        assert torch.equal(state_one[f"{name}.weight"], state_two[f"{name}.weight"]), name
