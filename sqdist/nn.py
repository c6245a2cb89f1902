"""Quantized Conv/Linear layers and the one verb that makes a model use them.

``quantize_model(model, QuantConfig(...))`` turns the selected ``nn.Conv*d`` /
``nn.Linear`` modules of any model (timm or not) into SQ layers *in place*: the
module keeps its parameters, its name and its place; only its forward now
uses the hybrid weight ``W~ = where(mask, q(W), W)`` (straight-through for the
quantized rows). Building ``W~`` inside the layer's own forward means the
layer sees whatever full weight the engine hands it (DeepSpeed ZeRO-3 gathers
parameters before a module's forward), so prefetching keeps working.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dist as sqdist_dist
from .quant.activations import ActivationQuantizer
from .quant.weights import Quantizer, layer_errors, quantization_error
from .quant.registry import create_activation_quantizer, create_quantizer
from .sq import SQConfig, SQSelector


class SQLayer:
    """Mixin of the SQ layers: builds the weight the forward uses and quantizes its input."""

    quantizer: Quantizer
    input_quantizer: ActivationQuantizer | None
    sq_mask: Tensor | None
    _sq: "SQController | None"

    def quantize_input(self, x: Tensor) -> Tensor:
        """The layer's input as the layer sees it: through the activation quantizer, if any."""
        x = self.quantizer.quantize_input(x)
        act = getattr(self, "input_quantizer", None)
        return x if act is None else act(x)

    def sq_weight(self) -> Tensor:
        w = self.weight
        ctl = self._sq
        ratio = 1.0 if ctl is None else ctl.selector.ratio
        if ratio <= 0.0:
            if self.training and torch.is_grad_enabled() and self.quantizer.learns:
                # nothing quantized, but the quantizer's parameters stay in the graph (zero
                # gradient): DDP and ZeRO expect a gradient for every parameter
                return self.quantizer.hybrid(w, torch.zeros(w.shape[0], dtype=torch.bool, device=w.device))
            return w
        if ratio >= 1.0 or not self.training:
            return self.quantizer(w)  # straight-through
        if ctl.draw_in_forward:
            ctl.draw_for_layer(self)
        if self.sq_mask is None:
            raise RuntimeError("SQ layer has no mask: call SQController.draw_masks() before the forward of each training step")
        return self.quantizer.hybrid(w, self.sq_mask)  # where(mask, q(W), W), fused when compiled


class SQConv1d(SQLayer, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(self.quantize_input(x), self.sq_weight(), self.bias)


class SQConv2d(SQLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.quantize_input(x), self.sq_weight(), self.bias)


class SQConv3d(SQLayer, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(self.quantize_input(x), self.sq_weight(), self.bias)


class SQLinear(SQLayer, nn.Linear):
    def forward(self, x):
        return F.linear(self.quantize_input(x), self.sq_weight(), self.bias)


SQ_CLASSES: dict[type, type] = {nn.Conv1d: SQConv1d, nn.Conv2d: SQConv2d, nn.Conv3d: SQConv3d, nn.Linear: SQLinear}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        quantizer: registered quantizer name (``sqdist.list_quantizers()``).
        params: keyword parameters of that quantizer.
        include, exclude: glob patterns on module names (``"layer1.*"``); a layer is
            quantized when it matches an include and no exclude pattern.
        keep_stem_and_classifier: keep the model's first conv and classifier full
            precision (timm's ``pretrained_cfg`` names them; else the first and last layer).
        sq: the SQ selection (ratios, schedule, probability rule, granularity).
        broadcast: every rank applies the same masks. They are drawn from generators seeded by
            (``sq.seed``, step, layer), so ranks holding the same weights agree with no collective;
            with ``SQDIST_DEBUG=1`` rank 0's masks are broadcast and compared, and a difference
            stops the run (:func:`sqdist.dist.check_masks_agree`). Off only to show why agreement
            is needed (the trainer then seeds rank r with ``sq.seed + r``).
        draw_in_forward: draw each layer's mask inside its forward (DeepSpeed ZeRO-3, FSDP2,
            where the full weight exists only there) instead of in ``draw_masks``.
        activations: registered activation quantizer name (``sqdist.list_activation_quantizers()``)
            for the input of every quantized layer except the model's stem (its input is
            the image), or None (weights only).
        activation_params: keyword parameters of that activation quantizer (``bits``, ...).
    """

    quantizer: str = "twn"
    params: Mapping = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_stem_and_classifier: bool = True
    sq: SQConfig = SQConfig()
    broadcast: bool = True
    draw_in_forward: bool = False
    activations: str | None = None
    activation_params: Mapping = field(default_factory=dict)


class SQController:
    """The SQ state of one model: its SQ layers, the selector, the last errors and masks.

    Training loop use::

        sq = quantize_model(model, config)
        for batch in loader:
            sq.draw_masks()          # new selection every step (the same on every rank)
            loss = ...; loss.backward(); opt.step()
            sq.advance("step")
        sq.advance("epoch")
    """

    def __init__(self, layers: dict[str, SQLayer], config: QuantConfig):
        self.layers = layers
        self.config = config
        self.selector = SQSelector(config.sq)
        self.draw_in_forward = config.draw_in_forward
        self.last_errors: dict[str, float] = {}
        for index, layer in enumerate(layers.values()):
            layer._sq = self
            layer.sq_index = index  # the layer's number in the (seed, step, layer) key of its draw

    @property
    def ratio(self) -> float:
        return self.selector.ratio

    @property
    def activation_quantizers(self) -> dict[str, ActivationQuantizer]:
        """The activation quantizers of the SQ layers that have one, by layer name."""
        return {name: layer.input_quantizer for name, layer in self.layers.items()
                if getattr(layer, "input_quantizer", None) is not None}

    @property
    def stage(self) -> int:
        return self.selector.stage

    def advance(self, unit: str = "step") -> bool:
        """Count one finished step or epoch; True when a new SQ stage begins."""
        return self.selector.advance(unit)

    @torch.no_grad()
    def errors(self) -> dict[str, Tensor]:
        """Per-layer quantization error at the configured granularity, (m,) or (m, n)."""
        layers = list(self.layers.values())
        w2d = [layer.weight.detach().reshape(layer.weight.shape[0], -1) for layer in layers]
        errors = layer_errors([layer.quantizer for layer in layers], w2d, self.config.sq.granularity)
        return dict(zip(self.layers, errors))  # one fused call for all layers where compiled

    @torch.no_grad()
    def draw_masks(self) -> None:
        """Draw a new mask for every layer at the current ratio and step (no collective)."""
        ratio = self.selector.ratio
        if self.draw_in_forward or ratio <= 0.0 or ratio >= 1.0:
            for layer in self.layers.values():
                layer.sq_mask = None
            return
        errors = self.errors()
        shapes = [e.shape for e in errors.values()]
        # one device->host copy for all layers; the draw runs on the CPU generator
        flat = torch.cat([e.reshape(-1) for e in errors.values()]).cpu()
        host_errors = flat.split([s.numel() for s in shapes])
        masks = [self.selector.draw(e.reshape(s), i) for i, (e, s) in enumerate(zip(host_errors, shapes))]
        if self.config.broadcast and sqdist_dist.debug_checks():
            sqdist_dist.check_masks_agree(masks, list(self.layers))
        # all masks to the weights' device in one copy; the same on every rank with no collective
        masks = sqdist_dist.masks_to(masks, next(iter(self.layers.values())).weight.device)
        for (name, layer), e, mask in zip(self.layers.items(), host_errors, masks):
            layer.sq_mask = _layer_mask(mask, layer)
            self.last_errors[name] = _mean_error(e)  # from the host copy: no sync per layer

    @torch.no_grad()
    def draw_for_layer(self, layer: SQLayer) -> None:
        """Draw ``layer``'s mask inside its forward, once per step (ZeRO-3 and FSDP2)."""
        step = self.selector.step
        if getattr(layer, "_sq_mask_step", None) == step and layer.sq_mask is not None:
            return
        w2d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        error = layer.quantizer.error(w2d, self.config.sq.granularity)
        mask = self.selector.draw(error, layer.sq_index)
        if self.config.broadcast and sqdist_dist.debug_checks():
            sqdist_dist.check_masks_agree([mask], [layer.sq_name])
        layer.sq_mask = _layer_mask(mask, layer)
        layer._sq_mask_step = step
        self.last_errors[layer.sq_name] = _mean_error(error)

    def mean_errors(self) -> dict[str, float]:
        """Per layer: mean quantization error of the current weights (for logging).

        Reuses this step's draw when there was one; under ``draw_in_forward`` (ZeRO-3,
        weights sharded outside forward) it is the error seen at the last draw.
        """
        if self.draw_in_forward or 0.0 < self.selector.ratio < 1.0:
            return dict(self.last_errors)
        return {name: _mean_error(e) for name, e in self.errors().items()}

    def quantized_fraction(self) -> dict[str, float]:
        """Per layer: fraction of rows (or elements) quantized in the current step."""
        ratio = self.selector.ratio
        out = {}
        for name, layer in self.layers.items():
            if ratio <= 0.0 or ratio >= 1.0 or layer.sq_mask is None:
                out[name] = float(ratio >= 1.0)
            else:
                out[name] = float(layer.sq_mask.float().mean())
        return out

    def state_dict(self) -> dict:
        return {"selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state["selector"])


def _mean_error(error: Tensor) -> float:
    """Mean of the finite errors (a zero weight BWN makes nonzero has an infinite one)."""
    finite = error[torch.isfinite(error)]
    return float(finite.mean()) if finite.numel() else float("inf")


def _layer_mask(mask: Tensor, layer: SQLayer) -> Tensor:
    """A drawn mask on the layer's device: (m,) per channel, or the weight's shape per element."""
    if mask.dim() > 1:  # element errors are (m, n); a conv weight is (m, c, kh, kw)
        mask = mask.reshape(layer.weight.shape)
    return mask.to(layer.weight.device)


def stem_and_classifier(model: nn.Module, candidates: list[str]) -> set[str]:
    """The layers of ``candidates`` that are the stem or the classifier (timm's ``first_conv`` and
    ``classifier``; else the first and the last candidate)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names: set[str] = set()
    for key in ("first_conv", "classifier"):
        value = cfg.get(key)
        for v in ([value] if isinstance(value, str) else list(value or [])):
            names.update(n for n in candidates if n == v or n == f"{v}.conv" or n.startswith(f"{v}."))
    if not names and candidates:
        names = {candidates[0], candidates[-1]}
    return names


def stem_layer(model: nn.Module, candidates: list[str]) -> str | None:
    """The layer that reads the model's input (timm's ``first_conv``; else the first candidate)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    first = cfg.get("first_conv")
    for v in ([first] if isinstance(first, str) else list(first or [])):
        for n in candidates:
            if n == v or n == f"{v}.conv" or n.startswith(f"{v}."):
                return n
    return candidates[0] if candidates else None


def check_sq_ratios(quantizer: Quantizer, name: str, ratios) -> None:
    """Refuse SQ ratios below 1 for a quantizer that keeps no full-precision weight (``uses_weight`` False)."""
    if not quantizer.uses_weight and min(ratios) < 1.0:
        raise ValueError(f"sq.ratios={list(ratios)}: quantizer {name!r} has no full-precision weight for the rows "
                         f"SQ leaves unquantized; allowed: [1.0]")


def _module_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: its presence keeps a layer off PyTorch's fused fast path."""


def _keep_module_path(model: nn.Module, names: list[str]) -> None:
    """Keep every ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) that holds one of the layers
    ``names`` on its module path.

    In eval under ``no_grad`` PyTorch runs such a layer as one fused kernel that reads
    ``linear1.weight`` and ``linear2.weight`` directly: their forward, and with it the quantized
    weight and input, would be skipped, so evaluation and export would measure the float network.
    The fused path is not taken while the layer has a forward hook (``TransformerEncoderLayer.forward``
    checks for one); the global switch ``torch.backends.mha.set_fastpath_enabled`` would also change
    the user's other models.
    """
    for prefix, module in model.named_modules():
        if not any(prefix == "" or n.startswith(prefix + ".") for n in names):
            continue
        if isinstance(module, nn.TransformerEncoder):  # its nested-tensor path feeds the layers inputs the
            module.use_nested_tensor = False  # module path cannot take (the same values where not padded)
        if isinstance(module, nn.TransformerEncoderLayer) and _module_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_module_path)


def _probe_input(model: nn.Module) -> Tensor | None:
    """A random batch of 1 at a timm model's input size (channels of its first conv; a ViT's
    ``patch_embed.img_size``, else ``pretrained_cfg["input_size"]``); None for a model without one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if not isinstance(size, (tuple, list)) or len(size) != 3 or param is None or param.device.type == "meta":
        return None
    chans, height, width = (int(v) for v in size)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else chans
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        height, width = int(img[0]), int(img[1])
    x = torch.randn(1, chans, height, width, generator=torch.Generator().manual_seed(0))
    return x.to(device=param.device, dtype=param.dtype)


def _layers_not_called(model: nn.Module, names: list[str], example_input: Tensor | None) -> set[str]:
    """The layers ``names`` whose forward does not run in one eval, no_grad forward of ``model``.

    Each layer's ``forward`` is wrapped for the probe (an instance attribute, not a hook: a hook
    would itself change which path ``nn.TransformerEncoderLayer`` takes); the model's state is
    unchanged (eval mode: BatchNorm's running statistics are only read).
    """
    x = example_input if example_input is not None else _probe_input(model)
    if x is None or not names:
        return set()
    modules = dict(model.named_modules())
    called: set[str] = set()

    def recording(name: str, forward):
        def forward_and_record(*args, **kwargs):
            called.add(name)
            return forward(*args, **kwargs)
        return forward_and_record

    for name in names:
        modules[name].forward = recording(name, modules[name].forward)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as exc:  # a model that needs another input: quantize everything selected, as before
        warnings.warn(f"sqdist: probe forward with an input of shape {tuple(x.shape)} failed "
                      f"({' '.join(str(exc).split())[:200]}); layers the model does not call are not detected; "
                      f"pass example_input to quantize_model")
        return set()
    finally:
        for name in names:
            del modules[name].forward
        for m, mode in modes.items():
            m.training = mode
    return set(names) - called


def quantize_model(model: nn.Module, config: QuantConfig = QuantConfig(), *,
                   example_input: Tensor | None = None) -> SQController:
    """Make ``model``'s Conv/Linear weights quantized and SQ-selected, in place.

    Returns the :class:`SQController` that draws the masks and holds the SQ state.
    The model's class is unchanged, and so are its ``state_dict`` keys unless a
    quantizer has state of its own: each quantized layer holds its quantizer as the
    submodule ``quantizer``, so a quantizer's parameters and buffers add keys
    ``<layer>.quantizer.<name>`` (none for BWN, TWN and k-bit with a fixed scale), and
    with ``config.activations`` its activation quantizer as ``input_quantizer``
    (``<layer>.input_quantizer.<name>``; calibrate it before training, see
    :func:`sqdist.calibrate_activations`).

    Once every layer is quantized (and its weight quantizer calibrated), a weight or
    activation quantizer that defines ``on_model_quantized(name, layers)`` gets it called
    with its layer's name and this model's SQ layers (``{name: layer}``, module order): see
    :class:`sqdist.Quantizer`.

    A layer is quantized only if the model calls it: one probe forward (eval, no_grad) on
    ``example_input`` (default: a random batch of 1 at a timm model's input size; no probe for a
    model without one) finds the selected layers whose forward never ran because the model reads
    their weight directly (timm EVA's ``F.linear(x, self.qkv.weight, ...)``); they stay full
    precision, named in one warning. ``nn.TransformerEncoderLayer`` s holding a quantized layer
    keep PyTorch's module path in eval (:func:`_keep_module_path`).
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, tuple(SQ_CLASSES))]
    kept_fp = stem_and_classifier(model, candidates) if config.keep_stem_and_classifier else set()
    probe = create_quantizer(config.quantizer, **dict(config.params))  # fail early on bad names / params
    check_sq_ratios(probe, config.quantizer, config.sq.ratios)
    if config.activations is not None:
        create_activation_quantizer(config.activations, **dict(config.activation_params))
    stem = stem_layer(model, candidates)
    layers: dict[str, SQLayer] = {}
    selected: dict[str, nn.Module] = {}
    skipped = []
    for name, module in model.named_modules():
        if name not in candidates or name in kept_fp:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        if SQ_CLASSES.get(type(module)) is None:  # a subclass with a forward of its own (e.g. timm's Conv2dSame)
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        selected[name] = module
    _keep_module_path(model, list(selected))
    unused = _layers_not_called(model, list(selected), example_input)
    for name, module in selected.items():
        if name in unused:
            continue
        module.__class__ = SQ_CLASSES[type(module)]  # same object, same Parameters: optimizers and engines keep working
        module.quantizer = create_quantizer(config.quantizer, **dict(config.params)).to(module.weight.device)
        module.quantizer.calibrate(module.weight.detach())  # a no-op unless the quantizer has state to set
        if not module.quantizer.uses_weight:  # its own parameters are the weight: W gets no gradient
            module.weight.requires_grad_(False)
        module.input_quantizer = None
        if config.activations is not None and name != stem:  # the stem's input is the image: never quantized
            module.input_quantizer = create_activation_quantizer(
                config.activations, **dict(config.activation_params)).to(module.weight.device)
        module.sq_mask = None
        module.sq_name = name  # for per-layer logs from inside the forward (ZeRO-3 draws)
        module._sq = None
        layers[name] = module
    if skipped:
        warnings.warn("sqdist: left full precision (layer type not supported): " + ", ".join(skipped))
    if unused:
        warnings.warn("sqdist: left full precision (the model reads the weight without calling the layer, so a "
                      "quantized weight would not be used): " + ", ".join(n for n in selected if n in unused))
    if not layers:
        raise ValueError(f"quantize_model: no layer matched include={list(config.include)} exclude={list(config.exclude)}")
    for name, layer in layers.items():  # the optional hook: a quantizer that needs its model's other layers or its name
        for q in (layer.quantizer, layer.input_quantizer):
            if q is not None and hasattr(q, "on_model_quantized"):
                q.on_model_quantized(name, layers)
    return SQController(layers, config)
