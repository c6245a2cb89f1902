"""8-bit activations at export: the network onnxruntime runs in integer arithmetic.

A run trained with float activations deploys faster once its layers' inputs are 8-bit too:
onnxruntime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` (integer weights, int32
bias) into ``QLinearConv``, ``DequantizeLinear -> Add -> QuantizeLinear`` into
``QLinearAdd``, and so on, and runs them on integers. :func:`integer_deployable` builds that
network from a model prepared by :func:`sqdist.quantize_model`:

1. every BatchNorm that directly follows a Conv with integer weights is folded into it:
   per-row scale ``s * g / sqrt(var + eps)`` and a bias (exact for per-row scales);
2. per-tensor uint8 ranges (min/max, zero point for a signed tensor) are calibrated on
   batches of training data for the input and the output of every layer with integer
   weights (each quantized layer; with ``keep_fp_bits=8`` the stem and classifier too);
3. a ReLU right after such a layer moves into it (its output range starts at 0), a tensor
   that a layer reads is quantized where it is produced (the ReLU after a residual add, a
   pooling), so that every consumer, the next add included, sees the same codes;
4. the input of a global average pool (``nn.AdaptiveAvgPool2d(1)``) is quantized where it is
   produced (a ResNet's last residual add then runs as ``QLinearAdd`` too); when a layer with
   integer weights reads the pool's output (the classifier at ``keep_fp_bits=8``), the pool's
   output is quantized as well and it runs as ``QLinearGlobalAveragePool``;
5. a module that hands its input's values on unchanged (MaxPool, Flatten, Identity, Dropout;
   :data:`PASS_THROUGH`) quantizes its output with its input's scale and zero point: the same
   codes, so onnxruntime drops that ``DequantizeLinear -> MaxPool -> QuantizeLinear`` and pools
   the uint8 codes (a ReLU between the stem conv and its MaxPool moves into the conv).

With these, the optimized graph of a ResNet holds no float tensor between the input's
``QuantizeLinear`` and the logits' ``DequantizeLinear`` (tests/export/test_onnx.py), the structure
onnxruntime's own ``quantize_static`` gives the FP32 model.

Each layer becomes an :class:`IntegerLayer` (each such pool an :class:`IntegerGlobalAvgPool`,
likewise). Its forward computes what the fused kernel computes, bit for bit: the int32
accumulator of input codes times weight codes (exact, in float64), plus the int32 bias, times
the float32 multiplier ``(x_scale * w_scale) / y_scale``, rounded half to even, saturated to
uint8 (onnxruntime's ``QLinearConv`` requantization).
Traced to ONNX it is the QDQ pattern onnxruntime fuses. The export check compares onnxruntime
with this network exactly, and this network with the trained model one rounding at a time
(:mod:`sqdist.export.parity`; :func:`integer_deployable` records where it rounds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .format import ExportError
from .module_trace import _passes_through, _set_module, _trace, fold_batchnorm, read_only_by
from .qdq import _DequantizeRows, _FakeQuantize, round_codes

QMIN, QMAX = 0, 255  # uint8: onnxruntime's fastest integer kernels on x86 (u8 activations, s8 weights)
ACTIVATIONS = ("float", "int8")


def check_activations(value, name: str = "activations") -> str:
    """``value`` if it is an allowed export activation mode (``"float"`` or ``"int8"``), else :class:`ExportError`."""
    if value not in ACTIVATIONS:
        raise ExportError(f"{name}={value!r}; allowed: {', '.join(ACTIVATIONS)} (int8: calibrate 8-bit inputs "
                          f"and outputs of the integer layers so that onnxruntime runs them on integers)")
    return value


class NotInteger(ExportError):
    """Layer ``layer`` cannot run as an integer kernel (why: ``reason``); it can stay float."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"layer {layer}: {reason}")
        self.layer = layer


class RangeObserver:
    """Running min/max of a tensor over calibration batches -> per-tensor uint8 ``(scale, zero_point)``."""

    def __init__(self):
        self.low, self.high = float("inf"), float("-inf")

    def update(self, x: Tensor) -> None:
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))

    def qparams(self) -> tuple[Tensor, int]:
        low, high = min(self.low, 0.0), max(self.high, 0.0)  # 0 exactly representable (ReLU, padding)
        scale = torch.tensor((high - low) / (QMAX - QMIN) if high > low else 1.0, dtype=torch.float32)
        zero_point = int(round(-low / float(scale)))
        return scale, max(QMIN, min(QMAX, zero_point))


class OutputQuantizer(nn.Module):
    """Per-tensor uint8 quantization of a module's output (a forward hook): ``QuantizeLinear -> DequantizeLinear``."""

    def __init__(self, scale: Tensor, zero_point: int):
        super().__init__()
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        return _FakeQuantize.apply(x, self.scale, self.zero_point, QMIN, QMAX)


def _quantize_output_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return module.output_quantizer(output)


def input_codes(x: Tensor, scale: Tensor, zero_point: float, input_quantized: bool) -> Tensor:
    """The uint8 codes of an integer layer's input: those of the graph's ``QuantizeLinear``, or, for
    an input that already is ``(q - zp) * scale`` (``input_quantized``), its own codes, exactly."""
    if input_quantized:
        return torch.clamp(torch.round(x.float() / scale) + zero_point, QMIN, QMAX)
    return round_codes(x.float() / scale, zero_point, QMIN, QMAX)


class IntegerLayer(nn.Module):
    """A Conv/Linear layer on uint8 inputs and outputs with integer weight codes and an int32 bias.

    ``forward`` is the fused kernel's arithmetic (see the module doc); during ONNX export it is
    ``[QuantizeLinear -> DequantizeLinear] -> Conv(DequantizeLinear(codes), DequantizeLinear(bias))
    [-> Relu] -> QuantizeLinear -> DequantizeLinear``, the input pair left out when the input
    tensor is already quantized where it was produced (``input_quantized``).

    Args:
        layer: the plain Conv/Linear module (for stride, padding, groups...).
        codes: int8 weight codes, the weight's shape; ``w_scale``: (m,) per-row scales.
        bias: (m,) float bias or None; stored as ``round(bias / (x_scale * w_scale))`` in int32.
        x_qparams, y_qparams: ``(scale, zero_point)`` of the uint8 input and output.
        relu: apply ReLU before the output quantization.
        input_quantized: the input already holds codes of ``x_qparams`` (no Q/DQ of its own).
    """

    def __init__(self, layer: nn.Module, codes: Tensor, w_scale: Tensor, bias: Tensor | None,
                 x_qparams: tuple[Tensor, int], y_qparams: tuple[Tensor, int], relu: bool = False,
                 input_quantized: bool = False):
        super().__init__()
        self.is_conv = isinstance(layer, nn.modules.conv._ConvNd)
        self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                              groups=layer.groups) if self.is_conv else {}
        if self.is_conv and layer.padding_mode != "zeros":
            raise ExportError(f"padding_mode={layer.padding_mode!r}: 8-bit activations support zero padding only")
        self.relu, self.input_quantized = bool(relu), bool(input_quantized)
        codes, w_scale = codes.to(torch.int8).clone(), w_scale.float().clone()
        zero = w_scale == 0  # a zero row (a BatchNorm gain of 0 folded in): its codes must give the zero weight
        codes[zero] = 0
        # any scale then gives the zero weight (0 would divide the bias): the layer's smallest, so that
        # the row's bias keeps the precision of the others' in int32
        w_scale[zero] = float(w_scale[~zero].abs().min()) if bool((~zero).any()) else 1.0
        negative = w_scale < 0  # a BatchNorm with a negative gain: keep scales positive, negate the codes
        codes[negative] = -codes[negative]
        w_scale = w_scale.abs()
        x_scale, x_zero_point = x_qparams
        y_scale, y_zero_point = y_qparams
        self.register_buffer("codes", codes)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("x_scale", x_scale.float())
        self.register_buffer("x_zero_point", torch.tensor(x_zero_point, dtype=torch.uint8))
        self.register_buffer("y_scale", y_scale.float())
        self.register_buffer("y_zero_point", torch.tensor(y_zero_point, dtype=torch.uint8))
        self.register_buffer("b_scale", self.x_scale * w_scale)  # float32, the bias DequantizeLinear's scale
        b = torch.zeros(codes.shape[0]) if bias is None else bias.detach().float().cpu()
        b_int = torch.round(b.double() / self.b_scale.double())
        if bool((b_int.abs() > 2 ** 31 - 1).any()):
            raise ExportError("a bias does not fit int32 at the input's calibrated scale (an input range of ~0?)")
        self.register_buffer("bias_codes", b_int.to(torch.int32))
        # what int32 rounding changes in the bias (float32): the export check adds it to the model's own output
        self.register_buffer("bias_rounding", (b_int * self.b_scale.double() - b.double()).float(), persistent=False)
        self.register_buffer("w_zero_point", torch.zeros(codes.shape[0], dtype=torch.int8))
        self.register_buffer("b_zero_point", torch.zeros(codes.shape[0], dtype=torch.int32))

    @property
    def weight(self) -> Tensor:
        """The weight it computes with, dequantized: for a model that reads a layer's ``weight`` (XCiT, for its
        device and dtype)."""
        return self.codes.float() * self.w_scale.view(-1, *([1] * (self.codes.dim() - 1)))

    def _apply_op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if not self.is_conv:
            return F.linear(x, w, b)
        return getattr(F, f"conv{w.dim() - 2}d")(x, w, b, **self.conv_args)

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.graph_forward(x)
        xz, yz = float(self.x_zero_point), float(self.y_zero_point)
        xq = input_codes(x, self.x_scale, xz, self.input_quantized)
        acc = self._apply_op((xq - xz).double(), self.codes.double(), None)  # exact: integers below 2^53
        shape = (1, -1) + (1,) * (acc.dim() - 2) if self.is_conv else (-1,)
        acc = acc + self.bias_codes.double().view(shape)
        multiplier = (self.x_scale * self.w_scale) / self.y_scale  # float32, as QLinearConv computes it
        t = acc.float() * multiplier.view(shape)  # int32 -> float32, one rounding, as the kernel
        yq = round_codes(t, yz, int(yz) if self.relu else QMIN, QMAX)
        return ((yq - yz) * self.y_scale).to(x.dtype)

    def graph_forward(self, x: Tensor) -> Tensor:
        """The float QDQ form (what the ONNX graph holds)."""
        if not self.input_quantized:
            x = _FakeQuantize.apply(x, self.x_scale, self.x_zero_point, QMIN, QMAX)
        w = _DequantizeRows.apply(self.codes, self.w_scale, self.w_zero_point)
        b = _DequantizeRows.apply(self.bias_codes, self.b_scale, self.b_zero_point)
        y = self._apply_op(x, w, b)
        if self.relu:
            y = torch.relu(y)
        return _FakeQuantize.apply(y, self.y_scale, self.y_zero_point, QMIN, QMAX)

    def extra_repr(self) -> str:
        return (f"{'conv' if self.is_conv else 'linear'} {tuple(self.codes.shape)}, relu={self.relu}, "
                f"input_quantized={self.input_quantized}")


class IntegerGlobalAvgPool(nn.Module):
    """A global average pool (``nn.AdaptiveAvgPool2d(1)``) on uint8 input and output codes.

    ``forward`` is onnxruntime's ``QLinearGlobalAveragePool`` on x86 (MLAS), bit for bit: the
    int32 sum of the input codes minus ``x_zero_point * n`` (``n`` pixels), times the float32
    multiplier ``x_scale / (y_scale * n)``, rounded half to even, saturated to uint8. During ONNX
    export it is ``[QuantizeLinear -> DequantizeLinear] -> GlobalAveragePool -> QuantizeLinear ->
    DequantizeLinear``, which onnxruntime fuses into that kernel.
    """

    def __init__(self, x_qparams: tuple[Tensor, int], y_qparams: tuple[Tensor, int],
                 input_quantized: bool = False):
        super().__init__()
        x_scale, x_zero_point = x_qparams
        y_scale, y_zero_point = y_qparams
        self.input_quantized = bool(input_quantized)
        self.register_buffer("x_scale", x_scale.float())
        self.register_buffer("x_zero_point", torch.tensor(x_zero_point, dtype=torch.uint8))
        self.register_buffer("y_scale", y_scale.float())
        self.register_buffer("y_zero_point", torch.tensor(y_zero_point, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.graph_forward(x)
        xz, yz = float(self.x_zero_point), float(self.y_zero_point)
        xq = input_codes(x, self.x_scale, xz, self.input_quantized)
        pixels = x.shape[-2] * x.shape[-1]
        acc = xq.double().sum(dim=(-2, -1), keepdim=True) - xz * pixels  # exact: integers below 2^53
        # float32, as the kernel: x_scale / (y_scale * float(n)); then float(acc) * multiplier
        multiplier = self.x_scale / (self.y_scale * torch.tensor(float(pixels), dtype=torch.float32))
        yq = round_codes(acc.float() * multiplier, yz, QMIN, QMAX)
        return ((yq - yz) * self.y_scale).to(x.dtype)

    def graph_forward(self, x: Tensor) -> Tensor:
        """The float QDQ form (what the ONNX graph holds)."""
        if not self.input_quantized:
            x = _FakeQuantize.apply(x, self.x_scale, self.x_zero_point, QMIN, QMAX)
        return _FakeQuantize.apply(F.adaptive_avg_pool2d(x, 1), self.y_scale, self.y_zero_point, QMIN, QMAX)

    def extra_repr(self) -> str:
        return f"input_quantized={self.input_quantized}"


def _is_global_avg_pool(module: nn.Module) -> bool:
    size = getattr(module, "output_size", None)
    return type(module) is nn.AdaptiveAvgPool2d and size in (1, (1, 1), [1, 1])


# ---------------------------------------------------------------- the integer network
# modules that hand their input's values on unchanged (a max, a reshape, an identity): their output is
# quantized with their input's (scale, zero point), so that it holds the same codes and onnxruntime
# runs them on the codes (it drops DequantizeLinear -> MaxPool / Flatten -> QuantizeLinear of equal parameters)
PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)


def _pool_output_qparams(x_qparams: tuple[Tensor, int], y_qparams: tuple[Tensor, int],
                         pixels: int) -> tuple[Tensor, int]:
    """``y_qparams`` of a global average pool, its scale raised where ``x_scale / (y_scale * pixels)``
    would reach 128 (onnxruntime's kernel refuses 256 and more: an output range of ~0)."""
    (x_scale, _), (y_scale, y_zero_point) = x_qparams, y_qparams
    floor = x_scale.float() / (128.0 * pixels)
    if bool(y_scale >= floor):
        return y_scale, y_zero_point
    return floor, max(QMIN, min(QMAX, int(round(y_zero_point * float(y_scale) / float(floor)))))


@torch.no_grad()
def integer_deployable(net: nn.Module, batches: list[Tensor], layers: set[str]) -> nn.Module:
    """Turn ``layers`` of ``net`` (a :func:`sqdist.export.onnx_writer.deployable` copy: weights
    parametrized by :class:`~sqdist.export.qdq.WeightFromCodes`) into :class:`IntegerLayer` s, and
    its global average pools into :class:`IntegerGlobalAvgPool` s, with ranges calibrated on
    ``batches`` (model inputs); see the module doc. Changes ``net`` in place and returns it."""
    if not batches:
        raise ExportError("8-bit activations need calibration batches; got none")
    folded = fold_batchnorm(net, batches[0], layers)
    pools = {n for n, m in net.named_modules() if _is_global_avg_pool(m)}
    ints = layers | pools  # the modules that may become integer kernels
    calls = _trace(net, batches[0], ints)
    count: dict[str, int] = {}
    for c in calls:
        count[c[0]] = count.get(c[0], 0) + 1
    pools = {n for n in pools if n in count}  # a pool the forward never calls stays as it is
    ints = layers | pools
    index = {c[0]: i for i, c in enumerate(calls)}
    relus: dict[str, list[str]] = {}  # layer -> the ReLU modules it absorbs

    def from_integer(i: int) -> str | None:
        """The integer module whose output reaches call ``i`` through Identity / ReLU modules only
        (a Conv/Linear absorbs those ReLUs, when nothing else reads its output before them)."""
        seq = _passes_through(calls, i, ints)
        if not seq or count[seq[0][0]] != 1:
            return None
        kinds = [type(net.get_submodule(c[0])) for c in seq[1:]]
        if not all(k in (nn.Identity, nn.ReLU) and count[c[0]] == 1 for k, c in zip(kinds, seq[1:])):
            return None
        found = [c[0] for k, c in zip(kinds, seq[1:]) if k is nn.ReLU]
        if found:
            chain = {c[0] for c in seq}
            last = max(k for k, c in enumerate(seq) if c[0] in found)
            handed = [(c[2], c[4]) for c in seq[:last]]  # the tensors before its last ReLU, with their versions
            # every read of them, by a module or by a forward's own code, is the chain's: else moving the
            # ReLU into the layer would change what another reader sees
            if seq[0][0] not in layers or not all(read_only_by(calls, t, v, chain) for t, v in handed):
                return None
            relus[seq[0][0]] = list(dict.fromkeys(relus.get(seq[0][0], []) + found))
        return seq[0][0]

    def maker_of(i: int) -> str | None:
        """The other module whose output is the input of call ``i``, unchanged since."""
        _name, x, _out, version, _v = calls[i]
        makers = [c for c in calls[:i] if c[2] is x and c[4] == version and c[0] not in ints]
        return makers[-1][0] if makers and count[makers[-1][0]] == 1 else None

    inherit: dict[str, str] = {}  # pass-through module -> the module whose output quantization it repeats

    def resolve(m: str) -> None:
        if m in inherit or not isinstance(net.get_submodule(m), PASS_THROUGH):
            return
        source = from_integer(index[m])
        if source is None:
            source = maker_of(index[m])
            if source is None or source == m:
                return
            resolve(source)
        inherit[m] = source

    shared: dict[str, str] = {}  # integer module -> the integer module whose quantized output is its input
    produced: dict[str, str] = {}  # integer module -> the module whose output (quantized there) is its input
    for i, (name, *_rest) in enumerate(calls):
        if name not in ints or count[name] != 1:
            continue
        source = from_integer(i)
        if source is not None:
            shared[name] = source
            continue
        maker = maker_of(i)
        if maker is not None:
            produced[name] = maker
            resolve(maker)
    read = set()  # the pools whose output a layer reads (directly or through pass-through modules)
    for n in layers:
        source = shared.get(n, produced.get(n))
        while source in inherit:
            source = inherit[source]
        read.add(source)
    pools = pools & read  # another pool stays float (before a float classifier), its input quantized all the same
    quantized = set(produced.values())  # modules whose output gets a QuantizeLinear -> DequantizeLinear
    quantized |= {s for s in inherit.values() if s not in ints}
    own = {m: RangeObserver() for m in quantized if m not in inherit}
    inputs, outputs = {n: RangeObserver() for n in ints}, {n: RangeObserver() for n in ints}
    pixels: dict[str, int] = {}

    def observe(n: str, x: Tensor, out: Tensor) -> None:
        inputs[n].update(x)
        outputs[n].update(torch.relu(out) if n in relus else out)
        if n in pools:
            pixels[n] = x.shape[-2] * x.shape[-1]

    hooks = [net.get_submodule(n).register_forward_hook(lambda mod, args, out, n=n: observe(n, args[0], out))
             for n in ints]
    hooks += [net.get_submodule(m).register_forward_hook(lambda mod, args, out, m=m: own[m].update(out) and None)
              for m in own]
    try:
        for x in batches:
            net(x)
    finally:
        for h in hooks:
            h.remove()

    y_qparams: dict[str, tuple[Tensor, int]] = {}

    def qparams(m: str) -> tuple[Tensor, int]:
        """(scale, zero point) of the quantized output of ``m`` (an integer module or a quantized one)."""
        if m in y_qparams:
            return y_qparams[m]
        if m in ints:
            y_qparams[m] = outputs[m].qparams()
            if m in pools:
                y_qparams[m] = _pool_output_qparams(x_qparams(m), y_qparams[m], pixels[m])
        else:
            y_qparams[m] = qparams(inherit[m]) if m in inherit else own[m].qparams()
        return y_qparams[m]

    def x_qparams(n: str) -> tuple[Tensor, int]:
        return qparams(shared[n]) if n in shared else qparams(produced[n]) if n in produced else inputs[n].qparams()

    for m in sorted(quantized, key=index.get):
        module = net.get_submodule(m)
        module.output_quantizer = OutputQuantizer(*qparams(m))
        module.register_forward_hook(_quantize_output_hook)
    for relu_names in relus.values():
        for r in relu_names:
            if r not in quantized:  # (a ReLU whose output is quantized keeps its hook; twice is the same)
                _set_module(net, r, nn.Identity())
    new = {}
    for n in layers | pools:
        quantized_input = n in shared or n in produced
        if n in pools:
            new[n] = IntegerGlobalAvgPool(x_qparams(n), qparams(n), input_quantized=quantized_input)
            continue
        layer = net.get_submodule(n)
        p = layer.parametrizations.weight[0]
        try:
            new[n] = IntegerLayer(layer, p.codes, p.scale, layer.bias, x_qparams(n), qparams(n),
                                  relu=n in relus, input_quantized=quantized_input)
        except ExportError as exc:
            raise NotInteger(n, str(exc)) from None
    for n, module in new.items():
        _set_module(net, n, module)
    net.rounding_points = _rounding_points(new, quantized, qparams, folded, relus)
    return net


def _rounding_points(new: dict[str, nn.Module], quantized: set[str], qparams, folded: dict,
                     relus: dict[str, list[str]]) -> list[tuple]:
    """Where the integer network rounds activations, named in the model it was converted from:
    ``(module, where, scale, zero_point, module of this network)``: a layer's own input
    (``"input"``), or the output of the module of this network (``"output"`` of the model's
    module, or ``"before"`` it: the input of what a folded ``BatchNormAct2d`` keeps after its
    normalization, drop and act). A layer's output is its folded BatchNorm's, or its absorbed
    ReLU's; the modules kept from a folded ``BatchNormAct2d`` are the BN's own."""
    kept = {f"{bn}.{i}": f"{bn}.{a}" for bn, attrs in folded.values() for i, a in enumerate(attrs)}
    points = []
    for n, module in new.items():
        if not module.input_quantized:
            points.append((n, "input", module.x_scale, int(module.x_zero_point), n))
        bn, attrs = folded.get(n, (None, []))
        end = (n, "output") if bn is None else (f"{bn}.{attrs[0]}", "before") if attrs else (bn, "output")
        for r in relus.get(n, []):
            end = (kept.get(r, r), "output")
        points.append((*end, module.y_scale, int(module.y_zero_point), n))
    for m in quantized:
        scale, zero_point = qparams(m)
        points.append((kept.get(m, m), "output", scale, zero_point, m))
    return points


def integer_layer_names(net: nn.Module) -> set[str]:
    """The Conv/Linear layers of a deployable copy whose weights are integer codes (parametrized)."""
    return {n for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and parametrize.is_parametrized(m, "weight")}
