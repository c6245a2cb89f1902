"""``engine.name=fsdp2`` (``fully_shard``) with SQ, held to DDP on two real CPU processes (gloo).

One ``torchrun`` launch of tests/workers/fsdp2_worker.py trains every configuration twice,
under DDP and under FSDP2 (same recipe, same seed, 4 steps, SQ at ratio 0.5; with
``SQDIST_DEBUG=1``, so rank 0's masks are also broadcast and compared at every draw),
resumes some FSDP2 runs from their step-2 checkpoint, and writes results.json. The tests
below assert on it. The fast tests at the end need no processes.
"""
import json
import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch

from sqdist import QuantConfig, SQConfig, quantize_model
from sqdist.config import RecipeError, load_recipe
from sqdist.sq import SQSelector, draw_generator
from sqdist.train import fsdp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<package>/ -> repo
sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
from fsdp2_worker import BF16, CONFIGS, TINY  # noqa: E402

RESUMED = [name for name, (_, resume) in CONFIGS.items() if resume]


def torchrun(*args, timeout=2400):
    port = str(29600 + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp2")
    proc = torchrun(os.path.join(ROOT, "tests", "workers", "fsdp2_worker.py"), str(workdir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((workdir / "results.json").read_text())
    out["_workdir"] = workdir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != BF16])
def test_fsdp2_trains_as_ddp(results, name):
    """Same masks as DDP at every step, the same losses, the same final weights (float tolerance)."""
    ddp, fsdp2 = results[name]["ddp"], results[name]["fsdp2"]
    assert [s["step"] for s in fsdp2["steps"]] == [1, 2, 3, 4]
    for d, f in zip(ddp["steps"], fsdp2["steps"]):
        assert f.get("masks") == d.get("masks"), f"step {f['step']}: FSDP2 drew other masks than DDP"
        assert f.get("masks_equal_rank0", True) and d.get("masks_equal_rank0", True)
    assert fsdp2["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    diffs = results[name]["fsdp2_vs_ddp"]
    assert "keys_differ" not in diffs, diffs
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-5, (worst, diffs[worst])
    assert fsdp2["summary"]["world_size"] == 2 and fsdp2["summary"]["total_steps"] == 4


@pytest.mark.slow
def test_bf16_fsdp2_trains_close_to_ddp_bf16_with_fp32_weights(results):
    """bf16 compute (MixedPrecisionPolicy; BatchNorm kept fp32), fp32 shards: the same masks at every step
    on every rank, losses near DDP's autocast run (the SQ layers see bf16 weights under FSDP2, fp32 ones
    under autocast: errors, masks and weights part), an fp32 consolidated model."""
    from safetensors.torch import load_file

    ddp, fsdp2 = results[BF16]["ddp"], results[BF16]["fsdp2"]
    assert all(s["masks_equal_rank0"] for s in fsdp2["steps"])
    assert fsdp2["losses"] == pytest.approx(ddp["losses"], abs=0.15)
    final = load_file(str(results["_workdir"] / f"{BF16}-fsdp2" / "final" / "model.safetensors"))
    assert {str(v.dtype) for v in final.values()} <= {"torch.float32", "torch.int64"}


@pytest.mark.slow
def test_rank1_applies_rank0_masks_without_a_broadcast(results):
    """Rank 1's view, every FSDP2 step with a partial selection (ratio 0.5): the same masks as rank 0."""
    for name, steps in results["_rank1_fsdp2_steps"].items():
        partial = [s for s in steps if "masks_equal_rank0" in s]
        assert len(partial) == 4 or name == "slb2", name  # SLB trains at ratio 1: no masks
        assert all(s["masks_equal_rank0"] for s in partial), name


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_fsdp2_resume_is_bitwise(results, name):
    """Resumed from the step-2 checkpoint (torch.distributed.checkpoint shards) into a new folder:
    the same final model bit for bit, the same losses for steps 3-4."""
    diffs = results[name]["resumed_vs_fsdp2"]
    assert "keys_differ" not in diffs and max(diffs.values()) == 0.0, diffs
    assert results[name]["resumed"]["losses"] == results[name]["fsdp2"]["losses"][2:]
    assert results[name]["resumed"]["summary"]["resumed_from_step"] == 2


@pytest.mark.slow
def test_fsdp2_distils_from_a_whole_teacher_as_ddp_does(results):
    """train.distill under FSDP2: the teacher (loaded before the student is sharded) on every rank; the steps
    and final model are held to DDP's and the resume to the uninterrupted run by the tests above (twn_distill);
    here: it is recorded, and the teacher's term is in the loss."""
    distilled, plain = results["twn_distill"]["fsdp2"], results["twn"]["fsdp2"]
    assert distilled["summary"]["distill"] == {"teacher": results["_teacher"], "weight": 0.7, "temperature": 4.0}
    assert plain["summary"]["distill"] is None
    # step 1 has the plain run's student, masks and batch, so its loss is 0.3 * the plain run's cross-entropy
    # + 0.7 * T^2 * KL(teacher || student): what is left after the first term is the teacher's (0 if ignored)
    assert distilled["losses"][0] - 0.3 * plain["losses"][0] > 1e-3


@pytest.mark.slow
def test_uneven_shards_of_a_7_class_classifier(results):
    from safetensors.torch import load_file

    folder = results["_workdir"] / "twn_7classes_layer_units-fsdp2"
    final = load_file(str(folder / "final" / "model.safetensors"))
    assert final["fc.weight"].shape[0] == 7  # 4 rows on rank 0, 3 on rank 1
    assert max(results["twn_7classes_layer_units"]["fsdp2_vs_ddp"].values()) <= 1e-5


@pytest.mark.slow
def test_fsdp2_final_model_exports_as_a_ddp_one(results, tmp_path):
    """final/model.safetensors is consolidated: export reads it, and gives DDP's logits."""
    from sqdist.export import export_run, load_run

    work = results["_workdir"]
    fsdp2_model, meta = load_run(work / "twn-fsdp2" / "final", force=True)
    ddp_model, _ = load_run(work / "twn-ddp" / "final", force=True)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fsdp2_model(x), ddp_model(x), atol=1e-4)
    export_run(work / "twn-fsdp2" / "final", tmp_path / "twn.safetensors", force=True)
    assert (tmp_path / "twn.safetensors").stat().st_size > 0 and meta["ratio"] == 0.5


@pytest.mark.slow
def test_debug_check_stops_ranks_that_drew_different_masks(results):
    """SQDIST_DEBUG=1's check: masks two ranks drew from different seeds raise on every rank."""
    assert results["_debug_check_caught"] is True


# ---------------------------------------------------------------- the launchers
@pytest.mark.slow
def test_accelerate_launch_with_use_fsdp_on_the_cpu(tmp_path):
    """Accelerate 1.16 would run FSDP on the CPU as DDP or as two unsynchronised processes: with
    engine.name=fsdp2 sqdist shards itself (one group of 2, said once); with ddp it refuses in one line."""
    (tmp_path / "tiny.yaml").write_text(TINY.replace("checkpoint_every: 2", "checkpoint_every: 0"))
    base = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes",
            "2", "--main_process_port", str(29900 + os.getpid() % 90), "-m", "sqdist.train", str(tmp_path / "tiny.yaml"),
            "train.max_steps=2"]
    proc = subprocess.run([*base, "engine.name=ddp", f"run.dir={tmp_path / 'ddp'}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("sqdist: recipe error")]
    assert len(errors) == 1 and "engine.name=fsdp2" in errors[0] and not (tmp_path / "ddp" / "final").exists()
    proc = subprocess.run([*base, "engine.name=fsdp2", f"run.dir={tmp_path / 'fsdp2'}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("ignoring the launcher's FSDP settings") == 1
    summary = json.loads((tmp_path / "fsdp2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["total_steps"] == 2
    assert proc.stdout.count("final top-1 accuracy") == 1  # one run, not two


# ---------------------------------------------------------------- no processes
def test_draws_do_not_depend_on_order_or_path():
    """All layers at once (DDP's draw_masks) and layer by layer in the forward (ZeRO-3, FSDP2)
    give the same masks: each comes from the generator of (seed, step, layer)."""
    def build(in_forward):
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
        return model, quantize_model(model, QuantConfig(sq=SQConfig(ratios=(0.5,), seed=7), draw_in_forward=in_forward))

    (_, sq_a), (b, sq_b) = build(False), build(True)
    x = torch.randn(2, 1, 8, 8)
    for _ in range(2):
        sq_a.draw_masks()
        b(x)
        for name in sq_a.layers:
            assert torch.equal(sq_a.layers[name].sq_mask, sq_b.layers[name].sq_mask), name
        sq_a.advance("step"), sq_b.advance("step")


def test_draw_generator_is_a_function_of_seed_step_and_layer():
    def draw(*key):
        return torch.rand(8, generator=draw_generator(*key))

    assert torch.equal(draw(0, 5, 3), draw(0, 5, 3))
    others = [draw(1, 5, 3), draw(0, 6, 3), draw(0, 5, 4), draw(0, 3, 5)]
    assert all(not torch.equal(draw(0, 5, 3), o) for o in others)
    s = SQSelector(SQConfig(ratios=(0.5,), seed=2))
    error = torch.rand(32)
    assert torch.equal(s.draw(error, 1), s.draw(error, 1)) and not torch.equal(s.draw(error, 1), s.draw(error, 2))


def test_block_units_are_a_resnets_blocks():
    model = timm.create_model("resnet10t", num_classes=7, in_chans=1)
    quantize_model(model, QuantConfig())
    blocks = fsdp.shard_units(model, "block")
    assert blocks == [model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]]
    layers = fsdp.shard_units(model, "layer")
    assert model.layer1[0].conv1 in layers and model.fc not in layers  # the classifier stays full precision
    assert fsdp.shard_units(model, "root") == []


def test_bf16_maps_to_fsdp2_mixed_precision():
    policy = fsdp.mixed_precision_policy("bf16")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert fsdp.mixed_precision_policy("no").param_dtype is None


@pytest.mark.parametrize("override, message", [
    ("engine.fsdp_unit=blocks", "engine.fsdp_unit='blocks': allowed: block, layer, root"),
    ("engine.name=fsdp", "engine.name='fsdp': allowed: ddp, deepspeed, fsdp2"),
])
def test_bad_fsdp2_keys_say_what_is_allowed(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(None, [override])


def test_fp16_under_fsdp2_is_refused_in_one_line():
    recipe = load_recipe(None, ["engine.name=fsdp2", "engine.mixed_precision=fp16"])
    with pytest.raises(RecipeError, match="engine.mixed_precision='fp16'.*allowed: bf16, no"):
        fsdp.make_accelerator(recipe)


def test_checkpoint_metadata_with_other_globals_is_refused(tmp_path):
    """DCP's .metadata is a pickle: one naming anything but DCP's own classes is not unpickled."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        fsdp.SafeMetadataUnpickler(f).load()
