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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
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
    # numeric keys have ranges: each of these trained (or crashed) before
    ("engine.gradient_clipping=-1", "engine.gradient_clipping=-1.0: expected a number >= 0"),
    ("train.log_every=0", "train.log_every=0: expected an integer >= 1"),
    ("sched.warmup_steps=-3", "sched.warmup_steps=-3: expected an integer >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: expected a number >= 0"),
    ("optim.name=sgdx", "optim.name='sgdx': not a timm optimizer"),
    ("quant.exclude=['*']", "quant.include=['*'] quant.exclude=['*']: no Conv/Linear layer of resnet10t matches"),
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


@pytest.mark.parametrize("override, expected", [
    ("momentum=1.0", "optim.momentum=1.0: expected a number in [0, 1)"),
    ("gamma=0", "sched.gamma=0.0: expected a number in (0, 1]"),
    ("zero_stage=4", "engine.zero_stage=4: expected an integer from 0 to 3"),
    ("seed=-1", "train.seed=-1: expected an integer >= 0"),
    ("milestones=[0.5,2]", "sched.milestones=[0.5, 2]: expected a list of fractions in [0, 1]"),
    ("probability=softmax", "sq.probability='softmax': sq.variant=authors draws the rows"),
])
def test_more_ranges_and_combinations(tiny_recipe, override, expected):
    key, value = override.split("=", 1)
    section = {"momentum": "optim", "gamma": "sched", "zero_stage": "engine", "seed": "train",
               "milestones": "sched", "probability": "sq"}[key]
    extra = ["sq.variant=authors"] if key == "probability" else []
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, [f"{section}.{override}", *extra])
    assert str(info.value).startswith(expected)


def test_quant_override_on_a_float_recipe_is_refused():
    """digits_fp.yaml has quant.enabled=false: quant.name=bwn alone would silently train float."""
    fp = os.path.join(ROOT, "recipes", "digits_fp.yaml")
    with pytest.raises(RecipeError, match=r"quant.name='bwn': has no effect, quant.enabled=false"):
        load_recipe(fp, ["quant.name=bwn"])
    with pytest.raises(RecipeError, match=r"sq.ratios=\[0.5, 1.0\]: has no effect"):
        load_recipe(fp, ["sq.ratios=[0.5,1.0]"])
    assert load_recipe(fp, ["quant.enabled=true", "quant.name=bwn"])["quant"]["name"] == "bwn"


def test_recipe_that_is_not_utf8_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"model: {name: resnet18}\n\xff\xfe\x00junk")
    with pytest.raises(RecipeError, match=r"not UTF-8 text"):
        load_recipe(str(path))


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


def test_every_shipped_recipe_validates(tmp_path):
    from sqdist.config import fashion_mnist_files

    for path in fashion_mnist_files(str(tmp_path)):  # the check looks for the files; reading them is tests/test_data.py's
        open(path, "wb").close()
    for name in sorted(os.listdir(os.path.join(ROOT, "recipes"))):
        overrides = ["data.root=" + ROOT] if name.startswith("resnet50") else []
        if name.startswith("resnet50"):
            with pytest.raises(RecipeError, match="missing folder"):  # ROOT has no train/ val/
                load_recipe(os.path.join(ROOT, "recipes", name), overrides)
        elif name.startswith("fashion_mnist"):
            assert load_recipe(os.path.join(ROOT, "recipes", name), [f"data.root={tmp_path}"])["data"]["name"] \
                == "fashion_mnist"
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
def masks_of_two(launch_two, tiny_recipe, out, *overrides):
    """What tests/workers/mask_worker.py recorded on each of two ranks."""
    launch_two("mask_worker.py", tiny_recipe, out, *overrides)
    return [json.loads(open(f"{out}.rank{r}").read()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("broadcast", [True, False])
def test_two_processes_apply_rank0_masks(tiny_recipe, tmp_path, broadcast, launch_two):
    """sq.broadcast=true: every rank draws from the generators of (seed, step, layer) and applies the
    same masks with no collective; false: rank r seeds with seed + r, and the ranks disagree."""
    ranks = masks_of_two(launch_two, tiny_recipe, tmp_path / "masks.json", f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
                       "sq.ratios=[0.5]", f"sq.broadcast={str(broadcast).lower()}")
    rank1 = ranks[1]
    assert [r["step"] for r in rank1] == [1, 2, 3]
    for record in rank1:
        for quantized, rows in record["rows_per_layer"].values():
            assert quantized == round(0.5 * rows)
    # DDP averages gradients, so the float weights agree either way; what differs without the
    # broadcast is the network each replica runs: its hybrid weight where(mask, Q, W)
    if broadcast:
        assert all(r["masks_equal_rank0"] and r["hybrid_equal_rank0"] for r in rank1)
    else:
        assert not any(r["masks_equal_rank0"] or r["hybrid_equal_rank0"] for r in rank1)


# ---------------------------------------------------------------- kill and resume
def make_image_folder(root, n_train=20, n_val=10, classes=("cat", "dog", "fox")):
    """An ImageNet-layout folder of 20x20 PNGs whose class is the dominant colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = (rng.random((20, 20, 3)) * 60).astype("uint8")
                img[..., c] = 255
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def same_final_model(a_dir, b_dir):
    a = load_file(str(a_dir / "final" / "model.safetensors"))
    b = load_file(str(b_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_resume_with_dropout_is_bitwise_identical(tmp_path):
    """Dropout draws from the torch RNG every step: the resumed run must draw what the
    uninterrupted one drew (8 steps, checkpoint at 4, resumed from it into a new folder)."""
    common = [os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"), "model.kwargs.drop_rate=0.5",
              "train.max_steps=8", "train.checkpoint_every=4", "train.progress=false", "train.log_every=1"]
    full = run_train(*common, f"run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = run_train(*common, f"run.dir={tmp_path / 'resumed'}",
                        f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-0000004'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["resumed_from_step"] == 4
    losses = [{json.loads(l)["step"]: json.loads(l)["train/loss"] for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in l} for r in ("full", "resumed")]
    assert [losses[1][s] for s in range(5, 9)] == [losses[0][s] for s in range(5, 9)]
    assert same_final_model(tmp_path / "full", tmp_path / "resumed") == []


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    """Everything random at once: dropout, SQ draws, timm's random crop and flip in two
    data workers, BN recalibration at a stage end; killed mid-epoch, resumed, same bits."""
    data = make_image_folder(tmp_path / "data")  # 60 training images: 15 steps per epoch of 4
    common = [os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"), "data.name=folder", f"data.root={data}",
              "data.image_size=16", "data.batch_size=4", "data.workers=2", "model.kwargs.in_chans=3",
              "model.kwargs.num_classes=3", "model.kwargs.drop_rate=0.5", "sq.stage_length=2",
              "sq.ratios=[0.5,0.75,1.0]", "train.max_steps=75", "train.checkpoint_every=8", "train.bn_recalibrate=2",
              "train.progress=false"]
    ref = run_train(*common, f"run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sqdist.train", *common, f"run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # step 40: mid-epoch 3, after a stage end (30)
        if latest.exists() and latest.read_text() >= "step-0000040":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    killed_at = int(latest.read_text().split("-")[1])
    assert killed_at % 15, "the kill should land mid-epoch"

    resumed = run_train(*common, f"run.dir={run}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at >= 40 and summary["total_steps"] == 75
    assert same_final_model(tmp_path / "ref", run) == []
    assert summary["stages"][-1] == json.loads((tmp_path / "ref" / "summary.json").read_text())["stages"][-1]


def test_folder_dataset_in_imagenet_layout(tmp_path):
    """data.name=folder reads root/train and root/val through timm's dataset and transforms."""
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = run_train(os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"), "data.name=folder",
                     f"data.root={data}", "model.kwargs={num_classes: 3}", "data.batch_size=6",
                     "sq.stage_length=2", "train.epochs=8", "train.progress=false", f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 8 * (60 // 6)
    # the colour decides the class: a network that read the images learns it (chance: 33%)
    assert summary["final_accuracy"] >= 80.0, summary
    assert [s["ratio"] for s in summary["stages"]] == [0.5, 0.75, 0.875, 1.0]  # 3 stage ends, then final


def test_run_ending_on_a_stage_boundary_records_the_stage_it_trained(tmp_path):
    """3 epochs of 1-epoch stages train ratios 0.5, 0.75, 0.875: the final model is a 0.875
    model (not 1.0, the stage that would start next), so export refuses it without --force."""
    from sqdist.export import main as export_main

    run = tmp_path / "run"
    proc = run_train(os.path.join(ROOT, "recipes", "digits_sq_twn.yaml"), "sq.stage_length=1", "train.epochs=3",
                     "train.progress=false", f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run / "final" / "meta.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert meta["sq"] == {"ratio": 0.875, "stage": 2}
    assert summary["sq_ratio"] == 0.875 and summary["stages"][-1]["ratio"] == 0.875
    assert [s["ratio"] for s in summary["stages"]] == [0.5, 0.75, 0.875, 0.875]
    last_ckpt = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "meta.json").read_text())
    assert last_ckpt["sq"]["ratio"] == 0.875
    assert export_main([str(run), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()
    assert export_main([str(run), str(tmp_path / "out.safetensors"), "--force"]) == 0
    assert "No CUDA runtime is found" not in proc.stderr  # no extension builder imported on a CPU machine


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



def test_sgd_runs_use_the_fused_optimizer_with_the_foreach_values(tiny_recipe, tmp_path):
    """A run's SGD is torch's fused kernel; two steps of it give the same weights and momentum as
    the foreach form (the values the recipes' results were obtained with) on the run's own model."""
    from sqdist.config import load_recipe
    from sqdist.train import setup

    recipe = load_recipe(tiny_recipe, [f"run.dir={tmp_path / 'run'}"])
    run = setup(recipe)
    opt = run.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    ends = []
    for fused in (True, False):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        o = torch.optim.SGD([{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"], "fused": fused,
                              "foreach": None if fused else True} for g in opt.param_groups])
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            o.step()
        ends.append([p.detach().clone() for p in params] + [o.state[p]["momentum_buffer"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*ends))
    run.tracker.close()


# ---------------------------------------------------------------- quantizer hooks
def test_quantizer_hooks_schedule_loss_term_bn_and_metrics(tmp_path):
    """A quantizer's set_progress / regularization / recalibrate_bn_after_epoch / metrics / bits
    are called by the trainer (the SLB and SRQ plugins rely on them)."""
    from sqdist.quant import registry
    from sqdist.quant.weights import BWN
    from sqdist.train import train

    calls = {"progress": [], "epochs": []}

    class Hooked(BWN):
        bits = 1

        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))

        def quantize_codes(self, w):
            codes, scale = super().quantize_codes(w)
            return codes, scale * self.gain

        def set_progress(self, step, total, per_epoch):
            calls["progress"].append((step, total, per_epoch))

        def regularization(self):
            return 2.0 * (self.gain - 2.0) ** 2  # pulls gain (from 1) to 2: only the loss term can do that

        def recalibrate_bn_after_epoch(self, epoch):
            calls["epochs"].append(epoch)
            return epoch == 0

        def metrics(self):
            return {"gain": float(self.gain.detach())}

    registry._QUANTIZERS["hooked_test"] = Hooked
    try:
        recipe = load_recipe(None, ["model.name=resnet10t", "model.kwargs={num_classes: 10, in_chans: 1}",
                                    "data.image_size=8", "data.batch_size=128", "quant.name=hooked_test",
                                    "train.epochs=2", "train.progress=false", "train.log_every=5",
                                    "optim.weight_decay=0", f"run.dir={tmp_path / 'run'}"])
        summary = train(recipe)
    finally:
        del registry._QUANTIZERS["hooked_test"]
    steps = summary["total_steps"]
    layers = len(summary["layer_bits"])
    assert layers > 0 and set(summary["layer_bits"].values()) == {1} and summary["avg_weight_bits"] == 1.0
    # before every optimizer step (with the steps done so far) and before each evaluation
    done = [c[0] for c in calls["progress"]]
    assert sorted(set(done)) == list(range(steps + 1)) and all(done.count(s) % layers == 0 for s in set(done))
    assert calls["progress"][-1] == (steps, steps, steps // 2)
    assert calls["epochs"] == [0] * layers + [1] * layers
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gains = [v for l in lines for k, v in l.items() if k.startswith("quant/") and k.endswith("/gain")]
    assert len(gains) >= 2 and abs(gains[-1] - 2.0) < 0.3  # the loss term was trained


@pytest.mark.parametrize("override, expected", [
    # sklearn's ValueError traceback before: a stratified part without every class
    ("data.holdout_fraction=0.001", "data.holdout_fraction=0.001: splits 1347 samples into 2 and 1345; each part "
     "needs every class (10 classes in 1347 samples, the smallest with 131); allowed: a number from 0.0082 to 0.9918"),
    ("data.holdout_fraction=0.995", "data.holdout_fraction=0.995: splits 1347 samples into 1341 and 6;"),
    ("data.test_fraction=0.001", "data.test_fraction=0.001: splits 1797 samples into 2 and 1795;"),
    # trained to 10% (NaN) and exit 0 before
    ("quant.activations={name: pact, bits: 4, alpha: .inf}", "quant.activations.alpha=inf: expected a finite number"),
    ("quant.name=srq|quant.params={bits: 2, sigma_init: .inf}", "quant.params.sigma_init=inf: expected a finite number"),
    # trained and exit 0 before
    ("model.kwargs.num_classes=-1", "model.kwargs.num_classes=-1: expected an integer >= 10 (data.name=digits has 10 classes)"),
    ("model.kwargs.num_classes=5", "model.kwargs.num_classes=5: expected an integer >= 10"),
])
def test_bad_values_are_one_line_and_exit_2(tiny_recipe, override, expected):
    proc = run_train(tiny_recipe, *override.split("|"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sqdist: recipe error: ") and expected in lines[0], lines[0]


def test_split_fractions_inside_the_stated_range_are_accepted(tiny_recipe):
    """The ends of the range the error states both leave every class in both parts."""
    from sqdist.data import build_datasets

    for fraction in (0.0082, 0.9918):
        recipe = load_recipe(tiny_recipe, [f"data.holdout_fraction={fraction}"])
        kept, held = build_datasets(recipe)
        for part in (kept, held):
            assert {int(part[i][1]) for i in range(len(part))} == set(range(10)), fraction


def test_holdout_of_any_labelled_set_refuses_a_fraction_that_drops_a_class():
    """Folder data sets are checked when their labels are read (sqdist.data.hold_out): the same line."""
    from torch.utils.data import TensorDataset

    from sqdist.data import hold_out

    labels = torch.arange(40) % 4  # 4 classes of 10
    data = TensorDataset(torch.zeros(40, 1), labels)
    with pytest.raises(RecipeError, match=r"^data.holdout_fraction=0.05: splits 40 samples into 2 and 38; .*"
                                          r"allowed: a number from 0.1 to 0.9 \(or 0: no holdout\)$"):
        hold_out(data, 0.05)
    kept, held = hold_out(data, 0.1)
    assert sorted(int(data[i][1]) for i in held.indices) == [0, 1, 2, 3]
