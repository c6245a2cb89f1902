"""Compression of a trained network by product quantization (Stock et al., *And the Bit Goes
Down: Revisiting the Quantization of Neural Networks*, ICLR 2020).

Three small pieces, as in the paper's code:

- :mod:`.pq`: the codebook of one layer, fitted by EM to the layer's outputs;
- :mod:`.walk`: the walk over a network (layer by layer, each fitted on the inputs of the
  partially compressed network, then its codebook fine-tuned against the uncompressed
  teacher) and the global fine-tuning;
- :mod:`.file`: the compressed file (indices + float16 codebooks + the rest in fp32) and
  its loaders.

Command line: ``python -m sqdist.compress RUN OUT.safetensors`` (:mod:`.cli`). From Python::

    from sqdist.compress import CompressConfig, compress_model, finetune, save_compressed, load_compressed

    teacher = copy.deepcopy(model).eval()
    compress_model(model, train_set, CompressConfig(blocks="small"), device="cpu", batch_size=64, teacher=teacher)
    finetune(model, teacher, train_set, CompressConfig(finetune_steps=500), device="cpu", batch_size=64)
    save_compressed(model, "out.safetensors", model_name="resnet18", model_kwargs={"num_classes": 10})
    plain = load_compressed("out.safetensors")     # a plain timm model, same logits
"""
from .file import (CompressError, apply_compressed_, load_compressed, load_pq_model, pack_indices, read_compressed,
                   save_compressed, size_report, unpack_indices)
from .layers import compress_layer_, compressed_layers, round_codebooks_
from .pq import PQFit, block_size, codebook_size, fit_codebook, reconstruct, subvectors
from .walk import CompressConfig, compress_model, finetune, plan_layers

__all__ = [
    "CompressConfig", "CompressError", "PQFit", "apply_compressed_", "block_size", "codebook_size",
    "compress_layer_", "compress_model", "compressed_layers", "finetune", "fit_codebook", "load_compressed",
    "load_pq_model", "pack_indices", "plan_layers", "read_compressed", "reconstruct", "round_codebooks_",
    "save_compressed", "size_report", "subvectors", "unpack_indices",
]
