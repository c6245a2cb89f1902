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
from .budget import WIDTHS, choose_widths, layer_bytes, sensitivities, width_quantizer
from .gptq import METHODS, quantize_weight

QUANTIZERS = ("kbit", "twn", "bwn")
MIXED = "ptq-mixed"   # the quantizer name a file with bits per layer records (1 bit: bwn, 2-8: kbit)


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
    avg_bits, size_budget: bits per layer under a budget (at most one of them; ``quantizer``
        ``kbit``, whose ``params`` then give every width but the bits): ``avg_bits`` per weight of
        the quantized layers, or ``size_budget`` bytes of their codes and scales; each layer gets
        one of ``widths`` (1 = BWN's grid) by :mod:`sqdist.ptq.budget`.
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
    avg_bits: float | None = None
    size_budget: int | None = None
    widths: tuple = WIDTHS

    def to_dict(self) -> dict:
        return {**asdict(self), "params": dict(self.params), "widths": list(self.widths)}

    def budget_bytes(self, layers: list[nn.Module]) -> int | None:
        """The quantized layers' bytes (codes + scales) allowed: ``size_budget``, or ``avg_bits``
        bits per weight (:mod:`sqdist.ptq.budget`); None without a budget."""
        if self.size_budget is not None:
            return int(self.size_budget)
        if self.avg_bits is not None:
            return int(math.floor(self.avg_bits * sum(m.weight.numel() for m in layers) / 8))
        return None


class FixedCodes(Quantizer):
    """A layer's quantizer after PTQ: the decided ``codes`` (m, n) and ``scale`` (m,), whatever the weight.

    It names itself as the quantizer it stands for (``quantizer_name``, ``bits``, ``config()``), so
    an export records that quantizer and its parameters; with bits per layer (``identity``) every
    layer names ``MIXED`` and the file's ``packed`` metadata holds each layer's bits.
    """

    def __init__(self, base: Quantizer, codes: Tensor, scale: Tensor, identity: tuple[str, dict] | None = None):
        super().__init__()
        self.quantizer_name, self.bits, self._config = base.quantizer_name, base.bits, base.config()
        if identity is not None:   # a layer of a run with bits per layer: one name and config for every layer
            self.quantizer_name, self._config = identity[0], dict(identity[1])
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
    widths = choose_layer_widths(model, names, mine, calls, feeds_bn, config)
    quantizers = ({n: width_quantizer(b, config.params).to(device) for n, b in widths.items()} if widths
                  else dict.fromkeys(names, quantizer))
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
        method = config.method   # AdaRound has no zero code to round to at 1 bit: GPTQ there
        if method == "adaround" and quantizers[name].quantizer_name == "bwn":
            method = "gptq"
        if rank == 0:
            c, s = quantize_weight(weight, hessian, quantizers[name], method, damp=config.damp, block=config.block,
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
                  "bits": quantizers[name].bits, "method": method,
                  "output_error": math.sqrt(output_error(weight, module.weight, hessian))}
        if widths:
            record["sensitivity"] = widths.sensitivity[name]
        if config.method != "rtn":  # the baseline on the same inputs: what the error compensation gained
            q, _ = quantizers[name].quantize(weight.reshape(rows, -1))
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
    identity = (MIXED, {"1": "bwn", "2-8": {**quantizer.config(), "bits": "per layer"}}) if widths else None
    for name, (codes, scale) in decided.items():
        modules[name].quantizer = FixedCodes(quantizers[name], codes, scale, identity)
    return records


class Widths(dict):
    """``{layer: bits}`` chosen under a budget, with ``sensitivity`` (``{layer: {bits: KL}}``)."""

    sensitivity: dict


def choose_layer_widths(model: nn.Module, names: list[str], chunks: list[Tensor], calls: dict, feeds_bn: set,
                        config: PTQConfig) -> Widths | None:
    """Each layer's bits under ``config``'s budget (None without one): every layer's sensitivity per
    width on the full-precision network (its statistics by one partial forward per layer, each
    width rounded by the run's method, GPTQ for AdaRound), then :func:`~sqdist.ptq.budget.choose_widths`."""
    modules = dict(model.named_modules())
    if config.avg_bits is not None and config.size_budget is not None:
        raise ValueError("avg_bits and size_budget together; allowed: one of them")
    budget = config.budget_bytes([modules[n] for n in names])
    if budget is None:
        return None
    if config.quantizer != "kbit":
        raise ValueError(f"bits per layer with quantizer {config.quantizer!r}; allowed: kbit (1 bit is bwn's grid)")
    device = modules[names[0]].weight.device
    quantizers = {b: width_quantizer(b, config.params).to(device) for b in config.widths}
    nbytes = {n: {b: layer_bytes(modules[n], b) for b in config.widths} for n in names}
    least = sum(min(v.values()) for v in nbytes.values())
    if least > budget:
        weights = sum(modules[n].weight.numel() for n in names)
        lowest = math.ceil(8000 * least / weights) / 1000
        raise ValueError(f"a budget of {budget} bytes ({8 * budget / weights:.3f} bits per weight) is below the "
                         f"{least} bytes of codes and scales the quantized layers need at {min(config.widths)} bit; "
                         f"allowed: at least {least} bytes (--size-budget {least}, --avg-bits {lowest:g})")
    method = "gptq" if config.method == "adaround" else config.method
    held: dict[str, tuple] = {}

    def decide(name: str, bits: int):
        if held.get("name") != name:
            stats = InputStatistics(modules[name])
            per_layer_statistics(model, modules[name], chunks, stats, calls[name])
            for t in stats.tensors():
                all_reduce_(t)
            held.clear()
            held.update(name=name, stats=stats)
        stats = held["stats"]
        weight = modules[name].weight.detach()
        return quantize_weight(weight, stats.hessian(config.centred and name in feeds_bn), quantizers[bits], method,
                               damp=config.damp, block=config.block, act_order=config.act_order,
                               rows=float(stats.rows))

    sens = sensitivities(model, names, chunks, decide, config.widths, reduce=all_reduce_)
    out = Widths(choose_widths(sens, nbytes, budget))
    out.sensitivity = sens
    return out


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
