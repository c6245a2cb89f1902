"""The walk over a network: quantize every Conv2d/Linear in turn (GPTQ, AdaRound or round-to-nearest).

For each layer, in the order the forward runs them (the stem conv and the classifier stay
full precision, as ``sqdist.quantize_model`` keeps them):

1. its unfolded inputs are collected from the *partially quantized* network (the layers before
   it already hold their quantized weights) on calibration images, as the Gram matrix
   ``X^T X``, row sum and row count per conv group (:class:`~sqdist.ptq.calib.InputStatistics`),
   on cached activations (the network runs once over the calibration set,
   :func:`~sqdist.ptq.calib.staged_walk`) or, when ``torch.fx`` cannot trace it, by running the
   network up to the layer; under data parallelism each rank forwards its share and the
   statistics are summed;
2. the Hessian is centred, ``(X - mean)^T (X - mean)``, when the layer's output goes straight
   into a BatchNorm: the BN statistics are re-estimated after PTQ, which removes each output
   channel's mean error, so GPTQ does not spend its compensation on it (the mean of post-ReLU
   inputs is the dominant direction of ``X^T X``);
3. rank 0 quantizes the weight (:func:`sqdist.ptq.gptq.quantize_weight`) and broadcasts the
   codes and scales, so every rank holds the same network;
4. the layer's weight becomes ``scale * codes``; its relative output error
   ``||X W - X Q|| / ||X W||`` under that Hessian is recorded.

Then the layers become SQ layers of the registered quantizer (:func:`sqdist.quantize_model`)
whose quantizer returns the decided codes and scales (:class:`FixedCodes`): the model evaluates
the quantized network and :func:`sqdist.export.export_model` packs it like a trained run.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from .. import QuantConfig, Quantizer, SQConfig, create_quantizer, quantize_model
from ..calibration import calibration_chunks, candidate_layers, execution_order, output_error
from ..dist import all_reduce_, broadcast_, rank_and_world
from ..data import loader
from .calib import InputStatistics, NotTraceable, call_counts, per_layer_statistics, staged_walk, trace
from .adaround import AdaRoundConfig
from .gptq import METHODS, quantize_weight

QUANTIZERS = ("kbit", "twn", "bwn")


@dataclass(frozen=True)
class PTQConfig:
    """How to quantize after training.

    quantizer, params: a registered quantizer with a fixed per-row grid (``kbit``, ``twn``, ``bwn``)
        and its parameters (``{"bits": 3}``).
    method: ``gptq``, ``rtn`` (the quantizer applied once) or ``adaround`` (k-bit and TWN).
    calib_images: training images whose layer inputs make the Hessians (and the reported errors).
    damp: GPTQ's dampening, a fraction of the mean Hessian diagonal added to the diagonal.
    block: GPTQ's columns per lazy update.
    act_order: GPTQ's columns by decreasing Hessian diagonal (the default since round 2: it was
        above RTN at every width on digits, ``benchmarks/results/ptq_objective.md``).
    seed: which calibration images.
    centred: the Hessian of a layer whose output goes straight into a BatchNorm is
        ``(X - mean)^T (X - mean)`` (the BN re-estimated after PTQ absorbs the mean error);
        ``X^T X`` otherwise, or everywhere when false.
    walk_bn: re-estimate each BatchNorm's statistics from the calibration inputs as the walk
        reaches it, so later layers see the statistics the final re-estimation would give
        (on cached activations only: with ``cache`` false, or a network ``torch.fx`` cannot trace
        (a warning), the walk goes without it).
    adaround_iters, adaround_reg: AdaRound's Adam steps per layer and its regulariser's lambda.
    cache: walk on cached activations (one forward of the calibration set in all,
        :func:`sqdist.ptq.calib.staged_walk`); false, or a network ``torch.fx`` cannot trace: the
        network runs up to each layer (one partial forward per layer, one chunk's memory).
    """

    quantizer: str = "kbit"
    params: Mapping = field(default_factory=lambda: {"bits": 4})
    method: str = "gptq"
    calib_images: int = 512
    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    seed: int = 0
    centred: bool = True
    walk_bn: bool = True
    cache: bool = True
    adaround_iters: int = 1000
    adaround_reg: float = 0.01

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
        One record per layer: ``layer``, ``shape``, ``groups``, ``centred`` (the Hessian was
        centred), ``output_error`` (relative ``||X W - X Q|| / ||X W||`` on the calibration inputs
        the layer saw, ``X`` centred where the Hessian was), ``walk`` (``cached`` or
        ``per-layer``), ``walk_bn`` (BN re-estimated on the way) and, for GPTQ and AdaRound,
        ``output_error_rtn`` (round-to-nearest's, the same way). ``model``'s quantized layers
        are then SQ layers holding :class:`FixedCodes`.
    """
    from tqdm import tqdm

    if config.method not in METHODS:
        raise ValueError(f"method={config.method!r}; allowed: {', '.join(METHODS)}")
    if config.method == "adaround" and config.quantizer == "bwn":
        raise ValueError("method='adaround' with quantizer 'bwn' (no zero code to round to); allowed: kbit, twn")
    quantizer = create_quantizer(config.quantizer, **dict(config.params)).to(device)
    rank, world = rank_and_world()
    chunks = calibration_chunks(train_set, config.calib_images, batch_size, config.seed)
    mine = [x.to(device) for x, _ in loader(train_set, chunks[rank::world], workers, seed=config.seed)]
    first = mine[0] if mine else next(iter(loader(train_set, chunks[:1], 0, seed=config.seed)))[0].to(device)
    was_training = model.training
    model.eval()
    names = ptq_layers(model, first.clone())   # clones: the cached images stay as loaded whatever a forward does
    if not names:
        raise ValueError("the model has no Conv2d/Linear layer besides the stem and the classifier: "
                         "nothing to quantize")
    calls, feeds_bn = call_counts(model, names, first.clone())
    modules = dict(model.named_modules())
    decided: dict[str, tuple[Tensor, Tensor]] = {}
    records = []
    bar = tqdm(total=len(names), desc=f"ptq {config.method}", disable=not (progress and rank == 0), dynamic_ncols=True)

    def quantize(name: str, stats: InputStatistics) -> None:
        for t in stats.tensors():
            all_reduce_(t)
        module = modules[name]
        centred = config.centred and name in feeds_bn
        hessian = stats.hessian(centred)
        weight = module.weight.detach().clone()
        rows = weight.shape[0]
        codes = torch.zeros(rows, weight[0].numel(), dtype=weight.dtype, device=weight.device)
        scale = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
        if rank == 0:
            c, s = quantize_weight(weight, hessian, quantizer, config.method, damp=config.damp, block=config.block,
                                   act_order=config.act_order, rows=float(stats.rows),
                                   adaround=AdaRoundConfig(iters=config.adaround_iters, reg=config.adaround_reg))
            codes.copy_(c)
            scale.copy_(s)
        broadcast_(codes)
        broadcast_(scale)
        with torch.no_grad():
            module.weight.copy_((codes * scale[:, None]).reshape(weight.shape))
        decided[name] = (codes, scale)
        record = {"layer": name, "shape": list(weight.shape), "groups": stats.groups, "centred": centred, **walk,
                  "output_error": math.sqrt(output_error(weight, module.weight, hessian))}
        if config.method != "rtn":  # the baseline on the same inputs: what the error compensation gained
            q, _ = quantizer.quantize(weight.reshape(rows, -1))
            record["output_error_rtn"] = math.sqrt(output_error(weight, q.reshape(weight.shape), hessian))
        records.append(record)
        bar.update(1)
        if log is not None and rank == 0:
            log(record)

    graph = None
    if config.cache:
        try:
            again = [f"{n} ({k} calls)" for n, k in calls.items() if k > 1]
            if again:
                raise NotTraceable(f"layers run more than once per forward: {', '.join(again[:3])}")
            graph = trace(model, names)
        except NotTraceable as exc:
            if config.walk_bn:
                warnings.warn(f"sqdist.ptq: {exc}; walking layer by layer, BatchNorm statistics not re-estimated on "
                              f"the way")
    walk = {"walk": "cached" if graph is not None else "per-layer", "walk_bn": graph is not None and config.walk_bn}
    try:
        if graph is not None:
            def on_layer(name, inputs):
                stats = InputStatistics(modules[name])
                for x in inputs:
                    stats.add(x)
                quantize(name, stats)

            on_layer.names = set(names)
            staged_walk(graph, mine, on_layer, reestimate_batchnorm if config.walk_bn else None)
        else:  # every call of a layer that runs more than once per forward is accumulated
            for name in names:
                stats = InputStatistics(modules[name])
                seen = per_layer_statistics(model, modules[name], mine, stats, calls[name])
                if seen != len(mine):
                    raise RuntimeError(f"layer {name} ran in {seen} of {len(mine)} calibration forwards")
                quantize(name, stats)
    finally:
        bar.close()
        model.train(was_training)
    quantize_model(model, QuantConfig(quantizer=config.quantizer, params=dict(config.params), include=tuple(names),
                                      keep_stem_and_classifier=False, sq=SQConfig(ratios=(1.0,))))
    for name, (codes, scale) in decided.items():
        modules[name].quantizer = FixedCodes(quantizer, codes, scale)
    return records


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, inputs: list[Tensor]) -> None:
    """Set a BatchNorm's running mean and (unbiased) variance to those of ``inputs`` (per channel,
    over every rank's chunks), as a re-estimation on those images would."""
    if module.running_mean is None:
        return
    c = module.num_features
    sums = torch.zeros(2, c, dtype=torch.float64, device=module.running_mean.device)
    count = torch.zeros(1, dtype=torch.float64, device=sums.device)
    for x in inputs:
        flat = x.transpose(0, 1).reshape(c, -1).double()
        sums[0] += flat.sum(1)
        sums[1] += (flat * flat).sum(1)
        count += flat.shape[1]
    all_reduce_(sums)
    all_reduce_(count)
    if not bool(count > 1):
        return
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0) * count / (count - 1)
    module.running_mean.copy_(mean)
    module.running_var.copy_(var)
