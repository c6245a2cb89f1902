"""DeepSpeed ZeRO from the recipe, with SQ: two real CPU processes (gloo), real DeepSpeed.

Each ZeRO stage trains resnet10t on 8x8 digits for a few steps with SQ at ratio
0.5 and is held to a DDP run of the same recipe and seed: rank 1 applies rank
0's masks every step, and the consolidated fp32 model at the end equals DDP's
within float tolerance (clipping is off in both; DeepSpeed's default would clip
at 1.0). Under ZeRO-3 the test also checks that SQ really sees the gathered,
full weight inside the layer's forward while the parameter is a shard between
forwards.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sqdist.config import RecipeError, load_recipe
from sqdist.train.engine import deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
TINY = """
model: {name: resnet10t, kwargs: {num_classes: 10, in_chans: 1}}
data: {image_size: 8, batch_size: 32}
quant: {name: twn}
sq: {ratios: [0.5], stage_length: 1}
optim: {lr: 0.05}
train: {epochs: 2, max_steps: 4, progress: false, log_every: 1}
"""
# ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default; 0 shards them all
ZERO3_SHARD_ALL = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepspeed")
    (folder / "tiny.yaml").write_text(TINY)
    (folder / "zero3.json").write_text(json.dumps(ZERO3_SHARD_ALL))
    return folder


def launch(launch_two, workdir, name, *overrides):
    """Two processes through ``accelerate launch`` (conftest.py) running tests/workers/deepspeed_worker.py."""
    run = workdir / name
    launch_two("deepspeed_worker.py", workdir / "tiny.yaml", workdir / f"{name}.json", f"run.dir={run}", *overrides,
               timeout=900)
    ranks = [json.loads((workdir / f"{name}.json.rank{r}").read_text()) for r in (0, 1)]
    losses = [json.loads(l)["train/loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    return {"ranks": ranks, "losses": losses, "final": load_file(str(run / "final" / "model.safetensors")),
            "meta": json.loads((run / "final" / "meta.json").read_text()), "run": run}


def assert_same_model(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), (k, (a[k].double() - b[k].double()).abs().max())


def assert_rank1_applied_rank0_masks(result, steps=4):
    rank1 = result["ranks"][1]["steps"]
    assert [r["step"] for r in rank1] == list(range(1, steps + 1))
    for record in rank1:
        assert record["masks_equal_rank0"], record["step"]
        for quantized, rows in record["rows_per_layer"].values():
            assert quantized == round(0.5 * rows)


@pytest.fixture(scope="module")
def ddp(workdir, launch_two):
    return launch(launch_two, workdir, "ddp")


# ---------------------------------------------------------------- the recipe -> DeepSpeed config
def recipe_with(tmp_path, *overrides):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return load_recipe(str(path), ["engine.name=deepspeed", *overrides])


def test_recipe_maps_onto_deepspeed_config(tmp_path):
    cfg = deepspeed_config(recipe_with(tmp_path, "engine.zero_stage=3", "engine.offload=true",
                                       "engine.mixed_precision=bf16", "engine.grad_accum=4"), world_size=2)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # timm's optimizer steps the offloaded weights
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["train_batch_size"] == 32 * 4 * 2
    # never left to DeepSpeed/Accelerate's default of 1.0, which DDP does not apply
    assert cfg["gradient_clipping"] == 0.0


def test_deepspeed_json_overrides_the_recipe_and_must_agree_on_batches(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5,
                              "train_micro_batch_size_per_gpu": "auto"}))
    cfg = deepspeed_config(recipe_with(tmp_path, f"engine.config={ds}", "engine.zero_stage=3"), world_size=2)
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["gradient_clipping"] == 0.5
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    assert deepspeed_config(recipe_with(tmp_path, f"engine.config={ds}"), world_size=2)["zero_force_ds_cpu_optimizer"] is False
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8}))
    with pytest.raises(RecipeError, match=r"gradient_accumulation_steps=8 differs from engine.grad_accum=1"):
        deepspeed_config(recipe_with(tmp_path, f"engine.config={ds}"), world_size=2)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(RecipeError, match=r"remove 'optimizer'/'scheduler'"):
        deepspeed_config(recipe_with(tmp_path, f"engine.config={ds}"), world_size=2)


class NotATensor:
    """Stands for anything a checkpoint should not carry (unpickling runs its class's code)."""


def test_deepspeed_checkpoint_with_foreign_objects_is_refused_before_deepspeed_loads_it(tmp_path):
    from sqdist.train.engine import _check_safe_to_load

    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, tmp_path / "mp_rank_00_model_states.pt")
    _check_safe_to_load(str(tmp_path))  # tensors and containers: fine
    torch.save({"optimizer_state_dict": NotATensor()}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(RecipeError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt holds objects outside the safe list"):
        _check_safe_to_load(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; fp16 itself needs a GPU")
def test_fp16_on_cpu_is_refused_with_one_line(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    proc = subprocess.run([sys.executable, "-m", "sqdist.train", str(path), f"run.dir={tmp_path / 'run'}",
                           "engine.name=deepspeed", "engine.mixed_precision=fp16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sqdist: recipe error: engine.mixed_precision='fp16'")


def test_ddp_recipe_under_a_deepspeed_launcher_is_refused(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    proc = subprocess.run([sys.executable, "-m", "sqdist.train", str(path), f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"})
    assert proc.returncode == 2
    assert "engine.name='ddp' but the launcher asked for DeepSpeed" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- ZeRO stages with SQ
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_applies_rank0_masks_and_matches_ddp(workdir, ddp, stage, launch_two):
    engine = [f"engine.config={workdir / 'zero3.json'}"] if stage == 3 else [f"engine.zero_stage={stage}"]
    result = launch(launch_two, workdir, f"zero{stage}", "engine.name=deepspeed", *engine)
    assert_rank1_applied_rank0_masks(result)
    assert all(math.isfinite(l) for l in result["losses"]) and len(result["losses"]) == 4
    if stage < 3:  # replicated weights after every step
        assert all(r["weights_equal_rank0"] for r in result["ranks"][1]["steps"])
    else:  # sharded between forwards, whole inside SQLayer.sq_weight
        for rank in result["ranks"]:
            assert rank["inside_forward"]["calls"] > 0 and rank["inside_forward"]["full_shape"]
            for layer in rank["outside_forward"].values():
                assert layer["numel"] == 0 and 0 < layer["shard_numel"] < layer["full_numel"]
    # same seed, same masks, no clipping: the same training as DDP (ZeRO-3 draws layer by layer
    # in the forward, DDP all layers at once: each from the generator of (seed, step, layer))
    assert result["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    assert_same_model(result["final"], ddp["final"])
    assert result["meta"]["quant"]["layers"] == ddp["meta"]["quant"]["layers"]
    assert {str(v.dtype) for v in result["final"].values()} <= {"torch.float32", "torch.int64"}


@pytest.mark.slow
def test_zero3_without_broadcast_ranks_apply_different_masks(workdir, launch_two):
    """What the shared draw prevents: with sq.broadcast off, rank 1 seeds its own and draws other masks."""
    result = launch(launch_two, workdir, "zero3-no-broadcast", "engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}",
                    "sq.broadcast=false")
    assert not any(r["masks_equal_rank0"] for r in result["ranks"][1]["steps"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_matches_ddp(workdir, ddp, stage, launch_two):
    """ZeRO-Offload with timm's SGD stepping the fp32 weights in CPU memory."""
    result = launch(launch_two, workdir, f"zero{stage}-offload", "engine.name=deepspeed", f"engine.zero_stage={stage}",
                    "engine.offload=true")
    assert_rank1_applied_rank0_masks(result)
    assert_same_model(result["final"], ddp["final"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DeepSpeed fp16 needs CUDA (its CPU accelerator has no fp16), "
                    "and two processes need two GPUs")
def test_zero2_fp16_on_gpus_trains_with_identical_masks(workdir, launch_two):
    result = launch(launch_two, workdir, "zero2-fp16", "engine.name=deepspeed", "engine.zero_stage=2", "engine.mixed_precision=fp16")
    assert_rank1_applied_rank0_masks(result)
    assert all(math.isfinite(l) for l in result["losses"])
    assert {str(v.dtype) for v in result["final"].values()} <= {"torch.float32", "torch.int64"}


@pytest.mark.slow
def test_zero3_gradient_accumulation_and_clipping_match_ddp(workdir, launch_two):
    """Both set from the recipe: accumulation over 2 micro-batches, global-norm clipping at 0.5."""
    both = ["engine.grad_accum=2", "engine.gradient_clipping=0.5"]
    ddp_accum = launch(launch_two, workdir, "ddp-accum", *both)
    result = launch(launch_two, workdir, "zero3-accum", "engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}", *both)
    assert_rank1_applied_rank0_masks(result)
    assert result["losses"] == pytest.approx(ddp_accum["losses"], abs=1e-5)
    assert_same_model(result["final"], ddp_accum["final"])


@pytest.mark.slow
def test_zero3_bf16_trains_with_identical_masks(workdir, launch_two):
    result = launch(launch_two, workdir, "zero3-bf16", "engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}",
                    "engine.mixed_precision=bf16")
    assert_rank1_applied_rank0_masks(result)
    assert all(math.isfinite(l) for l in result["losses"])
    assert result["ranks"][0]["inside_forward"]["full_shape"]
    # the consolidated model is fp32 (DeepSpeed's master weights), not the bf16 module copy
    assert {str(v.dtype) for v in result["final"].values()} <= {"torch.float32", "torch.int64"}
    assert all(torch.isfinite(v.float()).all() for v in result["final"].values())


@pytest.mark.slow
def test_zero3_resume_from_deepspeed_checkpoint_is_bitwise_identical(workdir, launch_two):
    common = ["engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}", "sq.ratios=[0.5,0.75,1.0]",
              "sq.unit=step", "sq.stage_length=2", "train.max_steps=6", "train.checkpoint_every=3"]
    full = launch(launch_two, workdir, "zero3-full", *common)
    ckpt = full["run"] / "checkpoints" / "step-0000003"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "model.safetensors").is_file()
    resumed = launch(launch_two, workdir, "zero3-resumed", *common, f"train.resume={ckpt}")
    assert json.loads((resumed["run"] / "summary.json").read_text())["resumed_from_step"] == 3
    assert [r["step"] for r in resumed["ranks"][1]["steps"]] == [4, 5, 6]
    assert resumed["final"].keys() == full["final"].keys()
    for k in full["final"]:
        assert torch.equal(resumed["final"][k], full["final"][k]), k


RESTART = ["sq.restart_per_stage=true", "sq.ratios=[0.5,1.0]", "sq.unit=step", "sq.stage_length=2",
           "data.test_fraction=0.1995", "data.eval_batch_size=179", "train.bn_recalibrate=2"]


@pytest.fixture(scope="module")
def ddp_restart(workdir, launch_two):
    return launch(launch_two, workdir, "ddp-restart", *RESTART)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_restart_per_stage_resets_zero_optimizer_state_like_ddp(workdir, ddp_restart, stage, launch_two):
    """The SQ authors' protocol (each stage a fresh run: optimizer state and LR restart)
    under ZeRO, where the momentum lives in DeepSpeed's optimizer, held to DDP (momentum
    carried into stage 2 would change steps 3-4). The same run evaluates an uneven split
    (359 test samples, batches of 179: 2 batches on rank 0, 1 on rank 1 before padding)
    after re-estimating BN, under ZeRO-3 a collective in every forward."""
    engine = [f"engine.config={workdir / 'zero3.json'}"] if stage == 3 else [f"engine.zero_stage={stage}"]
    result = launch(launch_two, workdir, f"zero{stage}-restart", "engine.name=deepspeed", *engine, *RESTART)
    assert result["losses"] == pytest.approx(ddp_restart["losses"], abs=1e-5)
    assert_same_model(result["final"], ddp_restart["final"])
    stages = [json.loads((r["run"] / "summary.json").read_text())["stages"] for r in (ddp_restart, result)]
    assert [s["top1"] for s in stages[0]] == pytest.approx([s["top1"] for s in stages[1]], abs=1e-9)
    assert all(round(s["top1"] * 359 / 100, 6).is_integer() for s in stages[1])  # each sample counted once


@pytest.mark.slow
def test_zero3_summary_counts_the_full_size_of_sharded_weights(workdir, launch_two):
    """Under ZeRO-3 with every parameter sharded, a weight's ``numel()`` is 0 outside its forward;
    summary.json's ``avg_weight_bits`` is weighted by the full sizes (``ds_numel``), not 0.0."""
    result = launch(launch_two, workdir, "zero3-w2a2", "engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}",
                    "quant.name=kbit", "quant.params={bits: 2, scale: lsq}", "quant.activations={name: lsq, bits: 2}",
                    "sq.ratios=[1.0]", "train.max_steps=2")
    assert all(layer["numel"] == 0 for layer in result["ranks"][0]["outside_forward"].values())  # really sharded
    summary = json.loads((result["run"] / "summary.json").read_text())
    assert summary["bits"] == "W2A2"
    assert summary["avg_weight_bits"] == 2.0 and set(summary["layer_bits"].values()) == {2}


@pytest.mark.slow
def test_zero3_distils_from_a_whole_teacher_as_ddp_does(workdir, ddp, launch_two):
    """train.distill under ZeRO-3: the student sharded, the teacher (a plain module, not DeepSpeed's) whole on
    every rank: the same losses and final model as a distilled DDP run, the masks still rank 0's."""
    teacher = workdir / "teacher"
    proc = subprocess.run([sys.executable, "-m", "sqdist.train", str(workdir / "tiny.yaml"), "quant.enabled=false",
                           f"run.dir={teacher}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kd = [f"train.distill.teacher={teacher}", "train.distill.weight=0.7"]
    ddp_kd = launch(launch_two, workdir, "ddp-distill", *kd)
    result = launch(launch_two, workdir, "zero3-distill", "engine.name=deepspeed", f"engine.config={workdir / 'zero3.json'}",
                    *kd)
    assert_rank1_applied_rank0_masks(result)
    assert result["losses"] == pytest.approx(ddp_kd["losses"], abs=1e-5)
    assert_same_model(result["final"], ddp_kd["final"])
    # step 1 has the plain DDP run's student, masks and batch: 0.3 * its cross-entropy + 0.7 * T^2 * KL, and
    # what is left after the first term is the teacher's (0 if it were ignored)
    assert result["losses"][0] - 0.3 * ddp["losses"][0] > 1e-3
    summary = json.loads((result["run"] / "summary.json").read_text())
    assert summary["distill"] == {"teacher": str(teacher), "weight": 0.7, "temperature": 4.0}
