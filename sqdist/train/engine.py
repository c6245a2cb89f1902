"""The distributed engine: one Accelerate ``Accelerator`` built from the recipe.

``engine.name=ddp`` (default) is plain data parallelism; on a machine without
CUDA the processes use the CPU and gloo.

``engine.name=deepspeed`` runs DeepSpeed ZeRO through Accelerate's
``DeepSpeedPlugin``; the recipe's ``engine`` keys become the DeepSpeed config
(:func:`deepspeed_config`), or ``engine.config`` names a DeepSpeed JSON file
whose keys win. The launch command is the same as for DDP::

    accelerate launch --multi_gpu --num_processes 2 -m sqdist.train RECIPE engine.name=deepspeed engine.zero_stage=3

``engine.name=fsdp2`` shards the model with torch's ``fully_shard`` (:mod:`sqdist.train.fsdp`)
under ``torchrun`` or ``accelerate launch``; the accelerator then only holds the process group.

Besides the accelerator, this module holds what differs between the engines
once the model is prepared: saving/loading the model+optimizer state
(:func:`save_engine_state`, :func:`load_engine_state`) and the consolidated
fp32 state_dict (:func:`full_state_dict`), which under ZeRO lives in shards.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch

from ..config import RecipeError

_we_chose_deepspeed = False  # ACCELERATE_USE_DEEPSPEED was set by make_accelerator, not by the launcher
DEEPSPEED_SUBDIR = "deepspeed"  # inside a checkpoint folder: DeepSpeed's own checkpoint
_DS_TAG = "state"


def _ensure_extension_cache() -> None:
    # DeepSpeed JIT-builds a small C++ op on first use (~35 s); keep it across runs and CI jobs
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sqdist", "torch_extensions"))


def deepspeed_config(recipe: dict, world_size: int) -> dict:
    """The DeepSpeed config (a dict) for the recipe's ``engine`` and ``data`` keys.

    ``engine.config`` (a JSON file) is read and its keys override these; the
    micro batch and accumulation must then agree with ``data.batch_size`` and
    ``engine.grad_accum`` (or be ``"auto"``), since the training loop counts
    steps with them.
    """
    eng, batch = recipe["engine"], recipe["data"]["batch_size"]
    cfg = {
        "train_micro_batch_size_per_gpu": batch,
        "train_batch_size": batch * eng["grad_accum"] * world_size,
        "gradient_accumulation_steps": eng["grad_accum"],
        # explicit: DeepSpeed (and Accelerate's "auto") would clip at 1.0, DDP does not clip
        "gradient_clipping": float(eng["gradient_clipping"]),
        "zero_optimization": {"stage": eng["zero_stage"]},
        "bf16": {"enabled": eng["mixed_precision"] == "bf16"},
        "fp16": {"enabled": eng["mixed_precision"] == "fp16", "auto_cast": False},
        # the optimizer is timm's (a client optimizer), not one from the DeepSpeed config
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if eng["mixed_precision"] != "no":
        # half-precision buffers too: DeepSpeed casts only the parameters, and BatchNorm refuses
        # half weights with fp32 running statistics
        cfg["data_types"] = {"buffer_dtype": eng["mixed_precision"]}
    if eng["offload"]:
        # ZeRO-Offload: fp32 master weights and optimizer state in CPU memory, stepped there by
        # the timm optimizer (DeepSpeedCPUAdam would be faster for Adam; SGD has no such op)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if eng["config"] is not None:
        try:
            with open(eng["config"]) as f:
                user = json.load(f)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"engine.config={eng['config']!r}: not valid JSON: {exc}") from None
        if not isinstance(user, dict):
            raise RecipeError(f"engine.config={eng['config']!r}: expected a JSON object (a DeepSpeed config)")
        if "optimizer" in user or "scheduler" in user:
            raise RecipeError(f"engine.config={eng['config']!r}: remove 'optimizer'/'scheduler'; sqdist builds them from "
                              "the recipe's optim and sched sections")
        cfg = _merge(cfg, user)
        for key, want, recipe_key in (("train_micro_batch_size_per_gpu", batch, "data.batch_size"),
                                      ("gradient_accumulation_steps", eng["grad_accum"], "engine.grad_accum")):
            if cfg[key] == "auto":
                cfg[key] = want
            elif cfg[key] != want:
                raise RecipeError(f"engine.config={eng['config']!r}: {key}={cfg[key]!r} differs from {recipe_key}={want!r}; "
                                  f"set it to {want} or \"auto\"")
        cfg["train_batch_size"] = batch * eng["grad_accum"] * world_size
        offload = cfg["zero_optimization"].get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload and "zero_force_ds_cpu_optimizer" not in user:
            cfg["zero_force_ds_cpu_optimizer"] = False  # as above: timm's optimizer on the offloaded weights
        for key, value in (("gradient_clipping", float(eng["gradient_clipping"])),):
            if cfg.get(key) == "auto":
                cfg[key] = value
    return cfg


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _sync_recipe_with_config(recipe: dict, cfg: dict) -> None:
    """Make ``recipe["engine"]`` say what the DeepSpeed config does (SQ's ZeRO-3 path depends on it)."""
    eng = recipe["engine"]
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"engine.config={eng['config']!r}: zero_optimization.stage={stage!r}: allowed: 0, 1, 2, 3")
    eng["zero_stage"] = stage
    eng["offload"] = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    eng["mixed_precision"] = ("bf16" if cfg.get("bf16", {}).get("enabled") else
                              "fp16" if cfg.get("fp16", {}).get("enabled") else "no")
    clip = cfg.get("gradient_clipping", 0.0)
    eng["gradient_clipping"] = float(clip) if clip not in (None, "auto") else 0.0


def _note_ignored_launcher_settings(eng: dict) -> None:
    """``accelerate launch --use_deepspeed --zero_stage N`` etc. do not configure sqdist: say so once."""
    keys = ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE")
    launcher = {k: os.environ[k] for k in keys if os.environ.get(k, "none") != "none"}
    stage = launcher.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    differs = (stage is not None and stage != str(eng["zero_stage"])) or "ACCELERATE_DEEPSPEED_CONFIG_FILE" in launcher
    if differs and os.environ.get("RANK", "0") == "0":
        print(f"sqdist: the recipe's engine section configures DeepSpeed (zero_stage={eng['zero_stage']}); "
              f"ignoring the launcher's {', '.join(f'{k}={v}' for k, v in sorted(launcher.items()))}", file=sys.stderr)


def make_accelerator(recipe: dict):
    """The ``Accelerator`` for ``recipe["engine"]`` (also initializes the process group).

    With ``engine.config`` set, ``recipe["engine"]`` is updated to what that file
    says (stage, offload, precision, clipping), so the rest of the run, and the
    saved ``RUN/config.yaml``, see the engine actually used.
    """
    from accelerate import Accelerator

    global _we_chose_deepspeed
    eng = recipe["engine"]
    cpu = not torch.cuda.is_available()
    if cpu:  # Accelerate imports DeepSpeed, which warns on every start that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if eng["name"] == "ddp" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not _we_chose_deepspeed:
        # Accelerate would build a DeepSpeed engine from its own defaults (clipping at 1.0, no SQ ZeRO-3 path)
        raise RecipeError("engine.name='ddp' but the launcher asked for DeepSpeed (accelerate launch --use_deepspeed "
                          "or an accelerate config with DeepSpeed): drop that and set engine.name=deepspeed "
                          "(engine.zero_stage, engine.offload, ... configure it)")
    from . import fsdp

    if eng["name"] != "fsdp2" and fsdp.launcher_asked_for_fsdp():
        # Accelerate would shard with its own plugin (on the CPU: silently DDP, or unsynchronised processes)
        raise RecipeError(f"engine.name={eng['name']!r} but the launcher asked for FSDP (accelerate launch --use_fsdp "
                          "or an accelerate config with FSDP): drop that, or set engine.name=fsdp2")
    if eng["name"] == "fsdp2":
        return fsdp.make_accelerator(recipe)
    if eng["name"] == "ddp":
        return Accelerator(cpu=cpu, mixed_precision=eng["mixed_precision"],
                           gradient_accumulation_steps=eng["grad_accum"])
    if eng["name"] != "deepspeed":
        raise RecipeError(f"engine.name={eng['name']!r}: allowed: ddp, deepspeed, fsdp2")
    _ensure_extension_cache()
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" not in os.environ:  # a single process (python -m sqdist.train): a group of one
        os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(29400 + os.getpid() % 500))})
    cfg = deepspeed_config(recipe, world)
    _sync_recipe_with_config(recipe, cfg)
    _note_ignored_launcher_settings(eng)
    if cpu and eng["mixed_precision"] == "fp16":
        raise RecipeError("engine.mixed_precision='fp16': DeepSpeed's CPU accelerator has no fp16 support; "
                          "without CUDA use engine.mixed_precision=bf16 or no")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    _we_chose_deepspeed = True
    if cpu:
        # Accelerate's DeepSpeed path would pick a GPU backend; name gloo before the Accelerator exists
        PartialState(backend="gloo")
    plugin = DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)
    return Accelerator(deepspeed_plugin=plugin, mixed_precision=eng["mixed_precision"],
                       gradient_accumulation_steps=eng["grad_accum"])


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def cast_inputs_to_model_dtype(model: torch.nn.Module) -> None:
    """Under DeepSpeed bf16/fp16 the weights are half precision: cast float inputs to match.

    A forward pre-hook on the root module, so training, evaluation and BN
    recalibration all get it (DeepSpeed does not cast inputs itself).
    """
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return

    def cast(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    model.register_forward_pre_hook(cast)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Make every rank's buffers (BN running statistics) rank 0's, as DDP does each forward.

    DeepSpeed does not synchronize buffers; call before evaluating or saving so
    every rank evaluates the model that rank 0 saves.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in model.buffers():
        if buf.is_floating_point() or buf.dtype in (torch.int64, torch.int32):
            dist.broadcast(buf.data, src=0)


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's state_dict, fp32 weights, on the CPU (collective: call on every rank).

    Under ZeRO the fp32 master weights live in the optimizer's shards (and under
    ZeRO-3 the module's own parameters are empty placeholders); DeepSpeed
    assembles each one. Buffers are the module's own (rank 0's after
    :func:`broadcast_buffers`).
    """
    from . import fsdp

    net = accelerator.unwrap_model(model)
    if fsdp.is_fsdp2(net):  # consolidated on rank 0 only ({} on the others, which write nothing)
        return fsdp.full_state_dict(net)
    if not is_deepspeed(accelerator):
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    params = dict(net.named_parameters(remove_duplicate=False))
    for name, tensor in net.state_dict(keep_vars=True).items():
        if name in params:
            full = safe_get_full_fp32_param(params[name])
            if full is None:  # not trained by the optimizer (frozen): the module's own copy
                full = params[name].detach().float()
            out[name] = full.detach().cpu().clone()
        else:  # buffers: fp32 like the weights (half precision under bf16/fp16), counters as they are
            out[name] = (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).cpu().clone()
    return out


def save_engine_state(model, folder: str) -> None:
    """DeepSpeed's own checkpoint (model + optimizer shards, every rank writes its part) under ``folder``."""
    model.save_checkpoint(os.path.join(folder, DEEPSPEED_SUBDIR), tag=_DS_TAG, save_latest=False)


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and containers."""
    import importlib

    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        cls = getattr(importlib.import_module(module), name, None)  # absent in some DeepSpeed versions
        if cls is not None:
            found.append(cls)
    return found


def _check_safe_to_load(path: str) -> None:
    """DeepSpeed reads its checkpoint with ``torch.load(weights_only=False)`` (every rank may read
    every shard); first make sure the files hold only tensors, containers and the allowlisted
    DeepSpeed classes."""
    import torch.serialization

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for name in sorted(f for f in os.listdir(path) if f.endswith(".pt")):
            try:
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as exc:  # the unpickler names the global it refused
                raise RecipeError(f"train.resume={os.path.dirname(os.path.dirname(path))!r}: {name} holds objects "
                                  f"outside the safe list, refusing to load it: {str(exc).splitlines()[-1][:300]}") from None


def load_engine_state(model, folder: str) -> None:
    """Restore what :func:`save_engine_state` wrote (same world size and ZeRO stage)."""
    path = os.path.join(folder, DEEPSPEED_SUBDIR)
    if not os.path.isdir(os.path.join(path, _DS_TAG)):
        raise RecipeError(f"train.resume={folder!r}: no DeepSpeed state in it (a checkpoint of an engine.name=ddp run?)")
    _check_safe_to_load(os.path.join(path, _DS_TAG))
    load_path, _ = model.load_checkpoint(path, tag=_DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RecipeError(f"train.resume={folder!r}: DeepSpeed could not load {path!r}")
