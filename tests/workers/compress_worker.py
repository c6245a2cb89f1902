"""Run ``python -m sqdist.compress`` twice on every rank (compress, then resume fine-tuning
from the written file) and save each rank's model state after each stage. Usage (under
accelerate launch / torchrun):

    python tests/workers/compress_worker.py DUMP RUN OUT.safetensors RESUMED.safetensors [flags ...]

writes ``DUMP.{compress,resume}.{compressed,final}.rank{r}.safetensors``.
"""
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from sqdist.compress.cli import main


def dump(prefix):
    def on_stage(stage, model):
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, f"{prefix}.{stage}.rank{rank}.safetensors")
    return on_stage


if __name__ == "__main__":
    out_dump, run, out, resumed, *flags = sys.argv[1:]
    rc = main([run, out, *flags, "--finetune-steps", "0"], on_stage=dump(f"{out_dump}.compress"))
    if rc == 0:
        rc = main([run, resumed, "--resume", out, *flags, "--finetune-steps", "2"], on_stage=dump(f"{out_dump}.resume"))
    sys.exit(rc)
