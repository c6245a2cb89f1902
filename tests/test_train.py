"""Training end to end: recipe validation, a short run, two real processes, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sqdist.config import RecipeError, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1}}
data: {image_size: 8, batch_size: 32}
quant: {name: twn}
sq: {ratios: [0.5, 1.0], stage_length: 1}
optim: {lr: 0.05}
train: {epochs: 2, progress: false, log_every: 1}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def run_train(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "sqdist.train", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, **kw)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("override, expected", [
    ("train.epoch=3", "unknown recipe key 'train.epoch' (did you mean train.epochs?)"),
    ("train.epochs=ten", "train.epochs='ten': expected an integer"),
    ("model.name=resnet5000", "model.name='resnet5000': not a timm model"),
    ("quant.name=fourbit", "quant.name='fourbit': allowed: bwn"),
    ("quant.params={bits: 12}", "quant.params={'bits': 12}"),
    ("data.name=folder", "data.root=None: data.name=folder needs a folder"),
    ("data.root=/nonexistent/imagenet", "missing folder '/nonexistent/imagenet/train'"),
    ("sq.probability=cubic", "sq.probability='cubic': allowed: constant, linear, sigmoid, softmax"),
    ("sq.ratios=[0.5,1.5]", "sq.ratios=[0.5, 1.5]: expected a non-empty list of numbers in [0, 1]"),
    ("nonsense", "override 'nonsense': expected key=value"),
])
def test_bad_recipe_gives_one_line_and_exit_2(tiny_recipe, override, expected):
    if override.startswith("data.root"):
        override = f"data.name=folder {override}"
    if override == "quant.params={bits: 12}":
        args = [tiny_recipe, "quant.name=kbit", override]
    else:
        args = [tiny_recipe, *override.split()]
    proc = run_train(*args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("sqdist: recipe error: ") and expected in lines[-1], proc.stderr
    assert len([l for l in lines if l.startswith("sqdist:")]) == 1


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet18\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))
    section = tmp_path / "section.yaml"
    section.write_text("optimizer: {lr: 0.1}\n")
    with pytest.raises(RecipeError, match="unknown recipe section 'optimizer'"):
        load_recipe(str(section))


def test_overrides_are_typed_and_nested(tiny_recipe):
    r = load_recipe(tiny_recipe, ["train.epochs=3", "sq.ratios=[0.25,1.0]", "optim.lr=1", "model.kwargs.drop_rate=0.1"])
    assert r["train"]["epochs"] == 3 and r["sq"]["ratios"] == [0.25, 1.0]
    assert r["optim"]["lr"] == 1.0 and isinstance(r["optim"]["lr"], float)
    assert r["model"]["kwargs"] == {"num_classes": 10, "in_chans": 1, "drop_rate": 0.1}


def test_every_shipped_recipe_validates():
    for name in sorted(os.listdir(os.path.join(ROOT, "recipes"))):
        overrides = ["data.root=" + ROOT] if name.startswith("resnet50") else []
        if name.startswith("resnet50"):
            with pytest.raises(RecipeError, match="missing folder"):  # ROOT has no train/ val/
                load_recipe(os.path.join(ROOT, "recipes", name), overrides)
        else:
            assert load_recipe(os.path.join(ROOT, "recipes", name))["data"]["name"] == "digits"


# ---------------------------------------------------------------- a short run
def test_short_run_writes_summary_metrics_checkpoints_and_wandb(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny_recipe, f"run.dir={run}", "track.wandb=true",
                     env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 2 * (1347 // 32)
    assert summary["final_accuracy"] > 30.0  # far above chance (10%) after two epochs
    assert [s["ratio"] for s in summary["stages"]] == [0.5, 1.0]  # stage-end eval, then final
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "train/loss" in l]
    assert len(train_lines) == summary["total_steps"]
    first = train_lines[0]
    assert first["sq/ratio"] == 0.5 and 0.45 < first["sq/quantized_fraction"] < 0.55
    assert any(k.startswith("sq/error/") for k in first) and "lr" in first
    assert train_lines[-1]["sq/ratio"] == 1.0 and train_lines[-1]["sq/quantized_fraction"] == 1.0
    errors = {k: v for k, v in train_lines[-1].items() if k.startswith("sq/error/")}
    assert errors and all(0.2 < v < 0.8 for v in errors.values())  # TWN's error, measured at ratio 1 too
    assert errors != {k: first[k] for k in errors}  # the weights moved, so did the error
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["quant"]["name"] == "twn" and meta["sq"]["ratio"] == 1.0 and meta["quant"]["layers"]
    assert set(load_file(str(run / "final" / "model.safetensors"))) >= {"conv1.0.weight", "fc.weight"}
    assert (run / "checkpoints" / "latest").read_text().startswith("step-")
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run folder missing"
    assert "final top-1 accuracy" in proc.stdout


# ---------------------------------------------------------------- two processes
def launch_two(tiny_recipe, out, *overrides):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           os.path.join(ROOT, "tests", "workers", "mask_worker.py"), tiny_recipe, str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(open(f"{out}.rank{r}").read()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("broadcast", [True, False])
def test_two_processes_apply_rank0_masks(tiny_recipe, tmp_path, broadcast):
    """Ranks seed their SQ generators differently (seed + rank); the broadcast makes them agree."""
    ranks = launch_two(tiny_recipe, tmp_path / "masks.json", f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
                       "sq.ratios=[0.5]", f"sq.broadcast={str(broadcast).lower()}")
    rank1 = ranks[1]
    assert [r["step"] for r in rank1] == [1, 2, 3]
    for record in rank1:
        for quantized, rows in record["rows_per_layer"].values():
            assert quantized == round(0.5 * rows)
        # DDP averages gradients, so the weights agree either way; with different masks
        # the replicas compute gradients of *different* networks and the average is wrong.
        assert record["weights_equal_rank0"]
    if broadcast:
        assert all(r["masks_equal_rank0"] for r in rank1)
    else:
        assert not any(r["masks_equal_rank0"] for r in rank1)


# ---------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tiny_recipe, tmp_path):
    common = [tiny_recipe, "train.max_steps=36", "train.checkpoint_every=8", "sq.ratios=[0.5,0.75,1.0]"]
    ref = run_train(*common, f"run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sqdist.train", *common, f"run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for step 24: mid-epoch 2 (42 steps/epoch)
        if latest.exists() and latest.read_text() >= "step-0000024":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    killed_at = latest.read_text()

    resumed = run_train(*common, f"run.dir={run}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == int(killed_at.split("-")[1]) >= 24
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert summary["total_steps"] == 36


def test_folder_dataset_in_imagenet_layout(tmp_path):
    """data.name=folder reads root/train and root/val through timm's dataset and transforms."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "fox"]
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(classes):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                img = (rng.random((20, 20, 3)) * 60).astype("uint8")
                img[..., c] = 255  # the class is the dominant colour
                Image.fromarray(img).save(tmp_path / "data" / split / name / f"{i}.png")
    run = tmp_path / "run"
    proc = run_train(os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"), "data.name=folder",
                     f"data.root={tmp_path / 'data'}", "model.kwargs={num_classes: 3}", "data.batch_size=6",
                     "train.epochs=2", "train.progress=false", f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 2 * (24 // 6)
    assert 0.0 <= summary["final_accuracy"] <= 100.0 and len(summary["stages"]) >= 1


@pytest.mark.parametrize("restart", [True, False])
def test_restart_per_stage_starts_each_stage_with_a_fresh_optimizer(tiny_recipe, tmp_path, restart):
    """The SQ authors' protocol: every stage a fresh run (optimizer state and LR) from the last weights."""
    run = tmp_path / "run"
    proc = run_train(tiny_recipe, f"run.dir={run}", f"sq.restart_per_stage={str(restart).lower()}",
                     "train.max_steps=45", "train.checkpoint_every=40", "sq.ratios=[0.5,1.0]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage_change = torch.load(run / "checkpoints" / "step-0000042" / "optimizer.pt", weights_only=True)
    mid_stage = torch.load(run / "checkpoints" / "step-0000040" / "optimizer.pt", weights_only=True)
    assert len(mid_stage["state"]) > 0  # SGD momentum buffers
    assert (len(stage_change["state"]) == 0) == restart


def test_restart_per_stage_is_refused_under_deepspeed(tiny_recipe):
    with pytest.raises(RecipeError, match="sq.restart_per_stage=True: not supported with engine.name=deepspeed"):
        load_recipe(tiny_recipe, ["sq.restart_per_stage=true", "engine.name=deepspeed"])
