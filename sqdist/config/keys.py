"""Every recipe key with its default (and so its type), the keys with a fixed set of values, and the
numeric keys' ranges: the tables :mod:`sqdist.config` validates a recipe against."""
from __future__ import annotations

from typing import Any

# fmt: off
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "resnet18",        # any timm model name
        "kwargs": {},              # passed to timm.create_model (num_classes, in_chans, ...)
    },
    "data": {
        "name": "digits",          # digits (embedded) | fashion_mnist (idx files) | folder (ImageNet layout: root/train, root/val)
        "root": None,              # fashion_mnist: default /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
        "image_size": 16,
        "augment": False,          # fashion_mnist only: a random 2-pixel shift and a horizontal flip of the training
                                   # images (off: at 2 epochs it cost TWN 1.1-1.7 points; folder data: timm's transform)
        "batch_size": 64,          # per process
        "eval_batch_size": 256,
        "workers": 0,
        "test_fraction": 0.25,     # digits only: fixed stratified split
        "holdout_fraction": 0.0,   # > 0: evaluate on this fraction of the training split, held out of training
                                   # (stratified, fixed), not on the test set: for tuning hyperparameters
    },
    "quant": {
        "enabled": True,
        "name": "twn",             # a registered quantizer (sqdist.list_quantizers())
        "params": {},
        "activations": {},         # {} (weights only) or {name: lsq|pact|..., bits: 2, ...}: the input of every
                                   # quantized layer but the stem (sqdist.list_activation_quantizers())
        "include": ["*"],
        "exclude": [],
        "keep_stem_and_classifier": True,
    },
    "sq": {
        "ratios": [0.5, 0.75, 0.875, 1.0],
        "stage_length": 1,         # units per stage; the last stage runs to the end
        "unit": "epoch",           # epoch | step
        "probability": "linear",   # constant | linear | sigmoid | softmax
        "granularity": "channel",  # channel | element
        "variant": "paper",        # paper | authors
        "seed": 0,                 # masks drawn by (seed, step, layer): the same on every rank, no collective
        "broadcast": True,         # false: rank r draws with seed + r (only to show why ranks must agree)
        "restart_per_stage": False,  # each stage a fresh run (optimizer state + LR schedule) from the last weights
    },
    "optim": {
        "name": "sgd",             # any timm optimizer (sgd, momentum, adam, adamw, ...)
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
    },
    "sched": {
        "name": "cosine",          # cosine | step | constant
        "warmup_steps": 0,
        "milestones": [0.5, 0.75], # step: fractions of the schedule's span
        "gamma": 0.1,
    },
    "train": {
        "epochs": 10,
        "max_steps": 0,            # 0: no limit
        "seed": 0,
        "resume": "none",          # none | auto | path to a checkpoint dir
        "checkpoint_every": 0,     # steps; 0: only at stage changes and at the end
        "log_every": 10,
        "bn_recalibrate": 0,       # batches to re-estimate BN statistics before each evaluation
        "progress": True,
        "distill": {               # knowledge distillation from a finished run (sqdist.train.distill); a mapping
            "teacher": None,       # of fixed keys. teacher: a run folder (its final/) or a checkpoint folder; null: off
            "weight": 0.5,         # loss = (1 - weight) * cross-entropy + weight * temperature^2 * KL(teacher || student)
            "temperature": 4.0,    # both logits divided by it before the softmax
        },
        "compile": False,          # torch.compile the model (docs/compile.md); evaluation stays eager
        "compile_mode": "default", # inductor's mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
        "compile_backend": "inductor",  # inductor | aot_eager (traced, eager kernels) | eager
    },
    "engine": {
        "name": "ddp",             # ddp | deepspeed | fsdp2 (torch fully_shard)
        "fsdp_unit": "block",      # fsdp2: fully_shard each block | each quantized layer (layer) | the root only (root)
        "zero_stage": 2,
        "offload": False,
        "mixed_precision": "no",   # no | bf16 | fp16
        "grad_accum": 1,
        "gradient_clipping": 0.0,  # 0: off
        "config": None,            # path to a DeepSpeed JSON config (overrides the keys above)
    },
    "track": {"wandb": False, "project": "sqdist", "entity": None},
    "run": {"dir": None},          # run.dir default: runs/<recipe file stem>
}
# fmt: on

CHOICES = {
    "data.name": ("digits", "fashion_mnist", "folder"),
    "sq.unit": ("epoch", "step"),
    "sq.probability": ("constant", "linear", "sigmoid", "softmax"),
    "sq.granularity": ("channel", "element"),
    "sq.variant": ("paper", "authors"),
    "sched.name": ("cosine", "step", "constant"),
    "engine.name": ("ddp", "deepspeed", "fsdp2"),
    "engine.mixed_precision": ("no", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "engine.fsdp_unit": ("block", "layer", "root"),
}
# numeric keys: (low, high, (low included, high included)); high None: no upper bound
RANGES = {
    "data.image_size": (1, None, (True, False)),
    "data.batch_size": (1, None, (True, False)),
    "data.eval_batch_size": (1, None, (True, False)),
    "data.workers": (0, None, (True, False)),
    "data.test_fraction": (0, 1, (False, False)),
    "data.holdout_fraction": (0, 1, (True, False)),
    "sq.stage_length": (1, None, (True, False)),
    "sq.seed": (0, None, (True, False)),
    "optim.lr": (0, None, (False, False)),
    "optim.momentum": (0, 1, (True, False)),
    "optim.weight_decay": (0, None, (True, False)),
    "sched.warmup_steps": (0, None, (True, False)),
    "sched.gamma": (0, 1, (False, True)),
    "train.epochs": (1, None, (True, False)),
    "train.max_steps": (0, None, (True, False)),
    "train.seed": (0, None, (True, False)),
    "train.checkpoint_every": (0, None, (True, False)),
    "train.log_every": (1, None, (True, False)),
    "train.bn_recalibrate": (0, None, (True, False)),
    "engine.zero_stage": (0, 3, (True, True)),
    "engine.grad_accum": (1, None, (True, False)),
    "engine.gradient_clipping": (0, None, (True, False)),
}
NULLABLE = {"data.root": str, "engine.config": str, "track.entity": str, "run.dir": str}  # default None: the type when set
