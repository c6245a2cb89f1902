"""Metrics: always a JSONL file in the run folder; wandb too when the recipe asks.

wandb runs offline unless the user set ``WANDB_MODE`` (no network needed).
Only rank 0 writes. Each JSONL line is flushed as it is written, so a crash
loses at most the line being written.
"""
from __future__ import annotations

import json
import os
import time


class Tracker:
    def __init__(self, run_dir: str, recipe: dict, active: bool = True):
        self.active = active
        self.wandb = None
        self.file = None
        if not active:
            return
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if recipe["track"]["wandb"]:
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_DIR", run_dir)
            import wandb

            from ..config import bits_label

            name = f"{os.path.basename(os.path.normpath(run_dir))}-{bits_label(recipe)}"  # e.g. digits_w2a2-W2A2
            self.wandb = wandb.init(project=recipe["track"]["project"], entity=recipe["track"]["entity"],
                                    config=recipe, dir=os.environ["WANDB_DIR"], resume="allow",
                                    id=_run_id(run_dir), name=name)

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(run_dir: str) -> str:
    """A stable wandb id per run folder, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
