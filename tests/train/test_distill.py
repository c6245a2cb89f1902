"""Knowledge distillation (``train.distill``): the loss against one computed by hand, the recipe keys,
a teacher that does not fit refused in one line, and a distilled run that resumes bit for bit."""
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from sqdist.config import RecipeError, load_recipe
from sqdist.train.distill import distill_loss, load_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
RECIPE = os.path.join(ROOT, "recipes", "digits_twn.yaml")
FAST = ["train.progress=false", "train.log_every=1"]


def run_train(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sqdist.train", *args, *FAST], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kw)


def test_loss_is_cross_entropy_mixed_with_the_softened_kl_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2, 2])
    weight, temp = 0.3, 2.5
    ce = kl = 0.0
    for i in range(5):
        zs = [math.exp(v) for v in s[i].tolist()]
        ce -= math.log(zs[y[i]] / sum(zs))
        ps = [math.exp(v / temp) for v in s[i].tolist()]
        pt = [math.exp(v / temp) for v in t[i].tolist()]
        ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = (1 - weight) * ce / 5 + weight * temp ** 2 * kl / 5
    got = distill_loss(s, t, y, weight, temp)
    assert got.dtype == torch.float64 and abs(got.item() - expected) < 1e-12
    assert distill_loss(s, t, y, 0.0, temp).item() == pytest.approx(ce / 5, abs=1e-12)


def test_the_soft_terms_gradient_is_temperature_times_the_difference_of_the_softmaxes():
    """Hinton et al.: d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t) per example (here over the batch mean)."""
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t, y, temp = torch.randn(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 3.0
    distill_loss(s, t, y, 1.0, temp).backward()
    expected = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("override, expected", [
    ("train.distill.temp=2", "unknown recipe key 'train.distill.temp'; allowed in train.distill: teacher, weight, temperature"),
    ("train.distill.weight=1.5", "train.distill.weight=1.5: expected a number in [0, 1]"),
    ("train.distill.weight=true", "train.distill.weight=True: expected a number in [0, 1]"),
    ("train.distill.temperature=0", "train.distill.temperature=0: expected a number > 0"),
    ("train.distill.teacher=3", "train.distill.teacher=3: expected a run or checkpoint folder, or null"),
    ("train.distill=3", "train.distill=3: expected a mapping"),
])
def test_bad_distill_keys_are_one_line(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, [override])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_distill_is_read_from_a_recipe_mapping_and_keeps_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": {"distill": {"teacher": "runs/fp", "temperature": 2}}}))
    cfg = load_recipe(str(path))["train"]["distill"]
    assert cfg == {"teacher": "runs/fp", "weight": 0.5, "temperature": 2.0}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A short full-precision digits run: the teacher."""
    out = tmp_path_factory.mktemp("teacher") / "fp"
    proc = run_train(os.path.join(ROOT, "recipes", "digits_fp.yaml"), "train.max_steps=6", f"run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _student(recipe):
    return timm.create_model(recipe["model"]["name"], **recipe["model"]["kwargs"])


@pytest.mark.slow
def test_a_teacher_that_does_not_fit_is_refused_in_one_line(teacher_run, tmp_path):
    x = torch.randn(4, 1, 8, 8)
    ok = load_recipe(RECIPE, [f"train.distill.teacher={teacher_run}"])
    teacher = load_teacher(ok, _student(ok), x, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    cases = [
        ([f"train.distill.teacher={tmp_path / 'none'}"], "no such run or checkpoint folder"),
        ([f"train.distill.teacher={teacher_run}", "model.kwargs.num_classes=12"],
         "gives 10 logits, the student 12; allowed: a teacher with the student's number of classes"),
        ([f"train.distill.teacher={teacher_run}", "data.image_size=16"],
         "the teacher was trained with data.image_size=8, this recipe has 16"),
    ]
    for overrides, expected in cases:
        recipe = load_recipe(RECIPE, overrides)
        with pytest.raises(RecipeError) as err:
            load_teacher(recipe, _student(recipe), x, torch.device("cpu"))
        assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="cannot run this recipe's inputs"):
        load_teacher(ok, _student(ok), torch.randn(4, 3, 8, 8), torch.device("cpu"))
    # the command: one line on stderr, exit 2, before any training
    proc = run_train(RECIPE, f"train.distill.teacher={tmp_path / 'none'}", f"run.dir={tmp_path / 'refused'}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("sqdist: recipe error: train.distill.teacher=")


@pytest.mark.slow
def test_a_distilled_run_records_its_teacher_and_resumes_bit_for_bit(teacher_run, tmp_path):
    common = [RECIPE, f"train.distill.teacher={teacher_run}", "train.distill.weight=0.7", "train.max_steps=8",
              "train.checkpoint_every=4"]
    full = run_train(*common, f"run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = run_train(*common, f"run.dir={tmp_path / 'resumed'}",
                        f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-0000004'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    plain = run_train(RECIPE, "train.max_steps=2", f"run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]

    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["distill"] == {"teacher": str(teacher_run), "weight": 0.7, "temperature": 4.0}
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["distill"] is None
    config = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert config["train"]["distill"]["teacher"] == str(teacher_run)

    def losses(run):
        return {r["step"]: r["train/loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in r}
    full_losses, resumed_losses, plain_losses = losses("full"), losses("resumed"), losses("plain")
    assert [resumed_losses[s] for s in range(5, 9)] == [full_losses[s] for s in range(5, 9)]
    assert full_losses[1] != plain_losses[1]  # the same first batch and weights: the teacher's term is in the loss
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_each_run_the_teacher(teacher_run, tmp_path):
    port = str(29500 + (os.getpid() + 17) % 1000)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", port, "-m", "sqdist.train", RECIPE, f"train.distill.teacher={teacher_run}",
           "train.max_steps=3", f"run.dir={tmp_path / 'ddp'}", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["total_steps"] == 3 and summary["distill"]["teacher"] == str(teacher_run)
