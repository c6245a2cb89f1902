"""The walk over a network: quantize every Conv2d/Linear in turn (GPTQ or round-to-nearest).

For each layer, in the order the forward runs them (the stem conv and the classifier stay
full precision, as ``sqdist.quantize_model`` keeps them):

1. its unfolded inputs are collected from the *partially quantized* network (the layers before
   it already hold their quantized weights) on calibration images, as the Gram matrix
   ``X^T X`` per conv group (``sqdist.compress``'s :func:`~sqdist.compress.layers.input_statistics`);
   under data parallelism each rank forwards its share and the Gram matrices are summed;
2. rank 0 quantizes the weight (:func:`sqdist.ptq.gptq.quantize_weight`) and broadcasts the
   codes and scales, so every rank holds the same network;
3. the layer's weight becomes ``scale * codes``; its relative output error
   ``||X W - X Q|| / ||X W||`` on those inputs is recorded.

Then the layers become SQ layers of the registered quantizer (:func:`sqdist.quantize_model`)
whose quantizer returns the decided codes and scales (:class:`FixedCodes`): the model evaluates
the quantized network and :func:`sqdist.export.export_model` packs it like a trained run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from .. import QuantConfig, Quantizer, SQConfig, create_quantizer, quantize_model
from ..compress.layers import candidate_layers, execution_order, input_statistics, output_error
from ..compress.walk import _all_reduce, _broadcast, _world, calibration_chunks
from ..data import loader
from .gptq import METHODS, quantize_weight

QUANTIZERS = ("kbit", "twn", "bwn")


@dataclass(frozen=True)
class PTQConfig:
    """How to quantize after training.

    quantizer, params: a registered quantizer with a fixed per-row grid (``kbit``, ``twn``, ``bwn``)
        and its parameters (``{"bits": 3}``).
    method: ``gptq`` or ``rtn`` (the quantizer applied once).
    calib_images: training images whose layer inputs make the Hessians (and the reported errors).
    damp: GPTQ's dampening, a fraction of the mean Hessian diagonal added to the diagonal.
    block: GPTQ's columns per lazy update.
    act_order: GPTQ's columns by decreasing Hessian diagonal.
    seed: which calibration images.
    """

    quantizer: str = "kbit"
    params: Mapping = field(default_factory=lambda: {"bits": 4})
    method: str = "gptq"
    calib_images: int = 512
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "params": dict(self.params)}


class FixedCodes(Quantizer):
    """A layer's quantizer after PTQ: the decided ``codes`` (m, n) and ``scale`` (m,), whatever the weight.

    It names itself as the quantizer it stands for (``quantizer_name``, ``bits``, ``config()``), so
    an export records that quantizer and its parameters.
    """

    def __init__(self, base: Quantizer, codes: Tensor, scale: Tensor):
        super().__init__()
        self.quantizer_name, self.bits, self._config = base.quantizer_name, base.bits, base.config()
        self.register_buffer("codes", codes.detach().clone(), persistent=False)
        self.register_buffer("scale", scale.detach().clone(), persistent=False)

    def quantize_codes(self, w):
        if w.shape != self.codes.shape:
            raise ValueError(f"FixedCodes holds codes of shape {tuple(self.codes.shape)}, asked for {tuple(w.shape)}")
        return self.codes.to(w.dtype), self.scale.to(w.dtype)

    def config(self):
        return dict(self._config)


def ptq_layers(model: nn.Module, x: Tensor) -> list[str]:
    """The layers PTQ quantizes, in execution order on the batch ``x``: the plain ``nn.Conv2d`` /
    ``nn.Linear`` layers except the stem conv and the classifier."""
    candidates, stem, classifier = candidate_layers(model)
    modules = dict(model.named_modules())
    names = [n for n in candidates if n != stem and n not in classifier and type(modules[n]) in (nn.Conv2d, nn.Linear)]
    return execution_order(model, names, x)


def ptq_model(model: nn.Module, train_set, config: PTQConfig, *, device, batch_size: int, workers: int = 0,
              log=None, progress: bool = False) -> list[dict]:
    """Quantize ``model`` (a full-precision network on ``device``, the same on every rank) in place.

    Args:
        train_set: dataset of ``(image, label)``: the calibration images.
        config: :class:`PTQConfig`.
        batch_size: per-rank calibration chunk.
        log: ``log(record)`` per layer (rank 0).

    Returns:
        One record per layer: ``layer``, ``shape``, ``groups``, ``output_error`` (relative
        ``||X W - X Q|| / ||X W||`` on the calibration inputs the layer saw) and, for GPTQ,
        ``output_error_rtn`` (round-to-nearest's on the same inputs).
        ``model``'s quantized layers are then SQ layers holding :class:`FixedCodes`.
    """
    from tqdm import tqdm

    if config.method not in METHODS:
        raise ValueError(f"method={config.method!r}; allowed: {', '.join(METHODS)}")
    quantizer = create_quantizer(config.quantizer, **dict(config.params)).to(device)
    rank, world = _world()
    chunks = calibration_chunks(train_set, config.calib_images, batch_size, config.seed)
    mine = [chunks[c] for c in range(rank, len(chunks), world)]
    first, _ = next(iter(loader(train_set, chunks[:1], 0, seed=config.seed)))
    names = ptq_layers(model, first.to(device))
    if not names:
        raise ValueError("the model has no Conv2d/Linear layer besides the stem and the classifier: "
                         "nothing to quantize")
    modules = dict(model.named_modules())
    decided: dict[str, tuple[Tensor, Tensor]] = {}
    records = []
    for name in tqdm(names, desc=f"ptq {config.method}", disable=not (progress and rank == 0), dynamic_ncols=True):
        module = modules[name]
        calib = (x for x, _ in loader(train_set, mine, workers, seed=config.seed))
        _, grams, seen = input_statistics(model, module, calib, 1, device)
        if seen != sum(len(c) for c in mine):
            raise RuntimeError(f"layer {name} saw the inputs of {seen} calibration images, expected "
                               f"{sum(len(c) for c in mine)}")
        _all_reduce(grams)
        weight = module.weight.detach().clone()
        rows = weight.shape[0]
        codes = torch.zeros(rows, weight[0].numel(), dtype=weight.dtype, device=weight.device)
        scale = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
        if rank == 0:
            c, s = quantize_weight(weight, grams, quantizer, config.method, damp=config.damp, block=config.block,
                                   act_order=config.act_order)
            codes.copy_(c)
            scale.copy_(s)
        _broadcast(codes)
        _broadcast(scale)
        with torch.no_grad():
            module.weight.copy_((codes * scale[:, None]).reshape(weight.shape))
        error = math.sqrt(output_error(weight, module.weight, grams))
        decided[name] = (codes, scale)
        record = {"layer": name, "shape": list(weight.shape), "groups": grams.shape[0], "output_error": error}
        if config.method != "rtn":  # the baseline on the same inputs: what the error compensation gained
            q, _ = quantizer.quantize(weight.reshape(rows, -1))
            record["output_error_rtn"] = math.sqrt(output_error(weight, q.reshape(weight.shape), grams))
        records.append(record)
        if log is not None and rank == 0:
            log(record)
    quantize_model(model, QuantConfig(quantizer=config.quantizer, params=dict(config.params), include=tuple(names),
                                      keep_stem_and_classifier=False, sq=SQConfig(ratios=(1.0,))))
    for name, (codes, scale) in decided.items():
        modules[name].quantizer = FixedCodes(quantizer, codes, scale)
    return records
