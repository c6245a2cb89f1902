"""Post-training quantization of a full-precision network: GPTQ and round-to-nearest.

- :mod:`.gptq`: one weight matrix on the quantizer's fixed per-row grid (GPTQ's column-wise
  rounding with error compensation, or the quantizer applied once);
- :mod:`.calib`: each layer's input statistics (plain or centred Hessian), collected while the
  network runs once over the cached calibration activations (``torch.fx``), or layer by layer
  where it cannot be traced;
- :mod:`.walk`: the walk over a network (each layer on the inputs of the partly quantized
  network, BatchNorm statistics re-estimated on the way), ending in SQ layers that
  ``sqdist.export`` packs;
- :mod:`.budget`: bits per layer under a size budget (each layer's sensitivity per width, a
  multiple-choice knapsack by dynamic programming over bytes).

Command line: ``python -m sqdist.ptq RUN OUT.safetensors --bits 3`` (:mod:`.cli`). From Python::

    from sqdist.ptq import PTQConfig, ptq_model
    records = ptq_model(model, train_set, PTQConfig(quantizer="kbit", params={"bits": 3}, method="gptq"),
                        device="cpu", batch_size=64)
    sqdist.export_model(model, "out.safetensors", model_name="resnet10t", model_kwargs={...})
"""
from .gptq import METHODS, RowGrid, damped_inverse_factor, gptq_quantize, quantize_weight, row_grid
from .calib import InputStatistics
from .budget import WIDTHS, choose_widths, knapsack, layer_bytes
from .walk import MIXED, QUANTIZERS, FixedCodes, PTQConfig, ptq_layers, ptq_model

__all__ = ["FixedCodes", "InputStatistics", "METHODS", "MIXED", "PTQConfig", "QUANTIZERS", "RowGrid", "WIDTHS",
           "choose_widths", "damped_inverse_factor", "gptq_quantize", "knapsack", "layer_bytes", "ptq_layers",
           "ptq_model", "quantize_weight", "row_grid"]
