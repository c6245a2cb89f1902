"""Run ``python -m sqdist.ptq`` on every rank and save each rank's quantized network. Usage
(under accelerate launch / torchrun):

    python tests/workers/ptq_worker.py DUMP RUN OUT.safetensors [flags ...]

writes ``DUMP.rank{r}.safetensors``.
"""
import sys

import torch.distributed as dist
from safetensors.torch import save_file

from sqdist.ptq.cli import main


def dump(prefix):
    def on_stage(stage, model):
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, f"{prefix}.rank{rank}.safetensors")
    return on_stage


if __name__ == "__main__":
    out_dump, run, out, *flags = sys.argv[1:]
    sys.exit(main([run, out, *flags], on_stage=dump(out_dump)))
