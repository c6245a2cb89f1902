"""Training: the loop, the run it drives, and what the run is built from.

- :mod:`sqdist.train.loop`: :func:`train` and the command line (``python -m sqdist.train``);
- :mod:`sqdist.train.run`: :class:`Run`, :func:`setup`, checkpoints, stage evaluations, the summary;
- :mod:`sqdist.train.build`: the model, the LR schedule, parameter groups, RNG state, quantizer hooks;
- :mod:`sqdist.train.evaluation`: BatchNorm re-estimation and top-1 accuracy;
- :mod:`sqdist.train.engine`: Accelerate / DeepSpeed; :mod:`sqdist.train.checkpoint`: checkpoint
  folders; :mod:`sqdist.train.preempt`: SLURM preemption; :mod:`sqdist.train.tracking`: logs, wandb.
"""
from .build import (HOOK_BN_BATCHES, build_model, call_hooks, layer_bits, lr_factor, model_meta, optimizer_param_groups,
                    quantizer_modules, reset_optimizer_state, rng_state, set_rng_state)
from .evaluation import evaluate, recalibrate_bn, set_bn_train_only
from .run import Run, finish, save, setup, stage_eval
from .loop import log_step, main, train, train_step

__all__ = [
    "HOOK_BN_BATCHES", "build_model", "call_hooks", "layer_bits", "lr_factor", "model_meta", "optimizer_param_groups",
    "quantizer_modules", "reset_optimizer_state", "rng_state", "set_rng_state",
    "evaluate", "recalibrate_bn", "set_bn_train_only",
    "Run", "finish", "save", "setup", "stage_eval",
    "log_step", "main", "train", "train_step",
]
