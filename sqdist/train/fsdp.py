"""``engine.name=fsdp2``: PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``), applied directly.

    torchrun --nproc_per_node 2 -m sqdist.train RECIPE engine.name=fsdp2
    accelerate launch --multi_gpu --num_processes 2 -m sqdist.train RECIPE engine.name=fsdp2

Every unit of ``engine.fsdp_unit`` (each block, each quantized layer, or none) and then the
root are wrapped with ``fully_shard``; between forwards a rank holds one shard of each
parameter, and inside a unit's forward the whole weight, where the SQ layer draws its mask
(as under ZeRO-3; the draw is the same on every rank, see :mod:`sqdist.sq`).
``engine.mixed_precision=bf16`` becomes ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``. Checkpoints hold the model and optimizer shards through
``torch.distributed.checkpoint`` (:func:`save_sharded`, :func:`load_sharded`) beside the
consolidated ``model.safetensors``; ``final/model.safetensors`` is consolidated too
(:func:`full_state_dict`), so export, PTQ and compress read it as a DDP run's.

The sharding is sqdist's own on every device, not Accelerate's FSDP plugin: Accelerate 1.16
silently runs FSDP on the CPU as DDP (or as unsynchronised processes), and its auto-wrap
policy would choose other units. :func:`make_accelerator` therefore takes the launcher's
``--use_fsdp`` settings out of the environment (saying so once) and builds a plain
``Accelerator`` for the process group, the device and the optimizer wrapper.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import sys

import torch
from torch import nn

from ..config import RecipeError

DCP_SUBDIR = "fsdp2"  # inside a checkpoint folder: the torch.distributed.checkpoint of model + optimizer shards


def launcher_asked_for_fsdp() -> bool:
    """``accelerate launch --use_fsdp`` (or an accelerate config with FSDP) set this for the processes."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(recipe: dict):
    """An ``Accelerator`` without Accelerate's FSDP (process group, device), for :func:`shard_model`.

    Refuses, in one line, a launch whose process group would not hold every process the
    launcher started (two unsynchronised runs writing one folder).
    """
    import torch.distributed as dist
    from accelerate import Accelerator

    eng = recipe["engine"]
    if eng["mixed_precision"] == "fp16":
        raise RecipeError("engine.mixed_precision='fp16': engine.name=fsdp2 has no loss scaling here; allowed: bf16, no")
    if launcher_asked_for_fsdp():
        ignored = sorted(k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP")
        for key in ignored:
            os.environ.pop(key)
        if os.environ.get("RANK", "0") == "0":
            print("sqdist: engine.name=fsdp2 shards the model itself (fully_shard per engine.fsdp_unit); ignoring the "
                  "launcher's FSDP settings (accelerate launch --use_fsdp)", file=sys.stderr)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available()
    if "LOCAL_RANK" not in os.environ:  # a single process (python -m sqdist.train): a group of one
        os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(29400 + os.getpid() % 500))})
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", gradient_accumulation_steps=eng["grad_accum"])
    if not dist.is_initialized():  # Accelerate starts no group for one process; fully_shard needs one
        dist.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)
    if dist.get_world_size() != world:
        raise RecipeError(f"engine.name='fsdp2': the launcher started {world} processes but the process group holds "
                          f"{dist.get_world_size()}; launch with torchrun --nproc_per_node N or accelerate launch "
                          "--multi_gpu --num_processes N")
    return accelerator


def shard_units(model: nn.Module, unit: str) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root, in module order.

    ``block``: each item of an ``nn.Sequential``/``nn.ModuleList`` that holds a quantized layer
    inside it (a ResNet's blocks, a ViT's ``blocks``; not a lone layer of a stem), outermost only. ``layer``: each
    quantized Conv/Linear (with its quantizers). ``root``: none.
    """
    from ..nn import SQLayer

    if unit == "root":
        return []
    if unit == "layer":
        return [m for m in model.modules() if isinstance(m, SQLayer)]
    units, taken = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or any(name.startswith(t + ".") for t in taken):
            continue
        for index, child in enumerate(module.children()):
            if not isinstance(child, SQLayer) and any(isinstance(m, SQLayer) for m in child.modules()):
                units.append(child)
                taken.add(f"{name}.{index}" if name else str(index))
    return units


def mixed_precision_policy(name: str):
    """``engine.mixed_precision`` as FSDP2's policy: bf16 compute and all-gathers, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, recipe: dict, device: torch.device) -> nn.Module:
    """Make every rank's parameters and buffers rank 0's, then ``fully_shard`` the units and the root.

    Call before the optimizer is built: ``fully_shard`` replaces each parameter by its shard
    (a DTensor). Returns ``model`` (the same object, its class now also an ``FSDPModule``).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # DDP does this when it wraps; FSDP2 shards whatever each rank holds
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(recipe["engine"]["mixed_precision"])
    if policy.param_dtype is not None:
        # BatchNorm keeps fp32 weights beside its fp32 running statistics (torch's batch_norm takes a
        # bf16 input with them, not bf16 weights): each BN its own unit, computing in fp32
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            fully_shard(bn, mesh=mesh, mp_policy=mixed_precision_policy("no"))
    for unit in shard_units(model, recipe["engine"]["fsdp_unit"]):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    # the root reshards after its forward too (torch keeps it whole by default): every parameter is a
    # shard when the loss terms a quantizer computes outside the forward are built (backward_sharded_terms)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: nn.Module, needed: bool = True):
    """Every FSDP2 unit of ``model`` gathered for the block (collective; a no-op for another model,
    or when not ``needed``): hooks that read a quantizer's parameters between forwards (metrics,
    learned bit widths for the summary) see whole tensors, as under DDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if needed else []
    for m in units:
        m.unshard()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m in units:
            m.reshard()


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def backward_sharded_terms(terms: list, model: nn.Module) -> torch.Tensor:
    """Add the gradients of loss terms computed from sharded parameters (DTensors, e.g. a quantizer's
    regularizer called outside the forward) to the shards' gradients; returns their full value.

    Call after the backward of the rest of the loss. Every rank computes the same terms, so each
    shard gets the term's gradient once (as under DDP, where every replica adds it before the
    average), laid out as the shard (DTensor's autograd may hand it back replicated).
    """
    total = torch.stack([t.full_tensor().reshape(()) for t in terms]).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if is_dtensor(g) and is_dtensor(p) and g.placements != p.placements:
                g = g.redistribute(p.device_mesh, p.placements)
            p.grad = g if p.grad is None else p.grad + g
    return total.detach()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state_dict on the CPU, fp32 weights, on rank 0 ({} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def _sharded_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper
        optimizer = optimizer.optimizer
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}, optimizer


def save_sharded(model: nn.Module, optimizer, folder: str) -> None:
    """Model and optimizer shards of every rank under ``folder/fsdp2`` (collective)."""
    import torch.distributed.checkpoint as dcp

    state, _ = _sharded_state(model, optimizer)
    dcp.save(state, checkpoint_id=os.path.join(folder, DCP_SUBDIR))


class SafeMetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: read it allowing only the classes DCP's metadata is made of."""

    SAFE_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
    SAFE = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                                      "bool", "slice", "object")} | {
        ("collections", "OrderedDict"), ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
        ("torch.serialization", "_get_layout")}  # _get_layout("torch.strided"): a layout by name

    def find_class(self, module, name):
        if (module, name) in self.SAFE or module.startswith(self.SAFE_PREFIXES) or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not among the classes of a torch.distributed.checkpoint")


def safe_reader(path: str):
    """A ``FileSystemReader`` whose metadata goes through :class:`SafeMetadataUnpickler` (its tensors are raw
    bytes, its other values ``torch.load(weights_only=True)``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = SafeMetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def load_sharded(model: nn.Module, optimizer, folder: str) -> None:
    """Restore what :func:`save_sharded` wrote into the sharded ``model`` and ``optimizer`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = os.path.join(folder, DCP_SUBDIR)
    if not os.path.isdir(path):
        raise RecipeError(f"train.resume={folder!r}: no FSDP2 state in it (a checkpoint of another engine?); "
                          "resume it with the engine.name it was saved with")
    state, inner = _sharded_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=safe_reader(path))
    except Exception as exc:  # DCP wraps the coordinator's error in a CheckpointException
        if "not among the classes" not in str(exc):
            raise
        raise RecipeError(f"train.resume={folder!r}: refusing to load {path!r}: "
                          f"{str(exc).split('UnpicklingError: ')[-1].splitlines()[0][:300]}") from None
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
