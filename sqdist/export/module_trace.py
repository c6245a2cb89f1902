"""The module graph of a network as one forward sees it: which module handed which tensor to which
(:func:`_trace`, :func:`_passes_through`), every read of a tensor by any torch function, inside a
module or in a ``forward``'s own code (:class:`Trace`), and the BatchNorm folding built on them
(:func:`fold_batchnorm`). Used by :mod:`sqdist.export.int8` to decide where activations are quantized.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


# ---------------------------------------------------------------- tracing the module graph
class Trace(list):
    """The calls of one forward (a list, see :func:`_trace`) and ``reads``: per torch function call
    that returned a tensor, ``(modules running, [(input tensor, its version)])``, in call order.

    Module hooks see what a module was handed; only this sees a ``forward``'s own code reading a
    tensor (``half = y * 0.5`` beside ``conv2(relu(y))``), which decides whether a BatchNorm may be
    folded into the layer before it, or a ReLU moved into it, without changing what that code reads.
    """

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[tuple[str, ...], list[tuple[Tensor, int]]]] = []
        self._by_tensor: dict[int, list[tuple[tuple[str, ...], int]]] | None = None

    def readers(self, t: Tensor, version: int | None = None) -> list[tuple[str, ...]]:
        """The module stacks of the function calls that read ``t`` (at ``version``, when given)."""
        if self._by_tensor is None:  # indexed once (``reads`` holds every tensor: their ids stay unique)
            self._by_tensor = {}
            for stack, inputs in self.reads:
                for u, v in {(id(u), v): (u, v) for u, v in inputs}.values():
                    self._by_tensor.setdefault(id(u), []).append((stack, v))
        return [stack for stack, v in self._by_tensor.get(id(t), []) if version is None or v == version]


class _Reads(TorchFunctionMode):
    def __init__(self, stack: list[str], reads: list):
        super().__init__()
        self.stack, self.reads = stack, reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [(t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        out = func(*args, **kwargs)
        if inputs and any(isinstance(o, Tensor) for o in tree_leaves(out)):  # not a shape or a dtype
            self.reads.append((tuple(self.stack), inputs))
        return out


def _trace(net: nn.Module, x: Tensor, watch: set[str]) -> Trace:
    """One forward; per call of a leaf module or of a module in ``watch``, in call order:
    ``(name, input, output, input version, output version)`` (versions reveal in-place changes);
    ``.reads``: every tensor read (:class:`Trace`)."""
    calls, hooks, versions, stack = Trace(), [], {}, []
    for name, module in net.named_modules():
        if not name:
            continue

        def enter(mod, args, name=name):
            stack.append(name)

        def leave(mod, args, out, name=name):
            if stack and stack[-1] == name:
                stack.pop()

        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        if next(module.children(), None) is None or name in watch:
            def pre(mod, args, name=name):
                versions[name] = args[0]._version if args and isinstance(args[0], Tensor) else None

            def post(mod, args, out, name=name):
                x0 = args[0] if args and isinstance(args[0], Tensor) else None
                calls.append((name, x0, out, versions.get(name), out._version if isinstance(out, Tensor) else None))

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad(), _Reads(stack, calls.reads):
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def read_only_by(trace: Trace, t: Tensor, version: int | None, modules: set[str]) -> bool:
    """Whether every function call that read ``t`` (at ``version``) ran inside one of ``modules``."""
    return all(modules & set(stack) for stack in trace.readers(t, version))


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _passes_through(calls: list[tuple], i: int, layers: set[str]) -> list[tuple]:
    """The calls that last handed the input object of call ``i`` on, since the layer in ``layers``
    that produced it (that layer first), when nothing changed it in place in between; else []."""
    name, x, _, version, _ = calls[i]
    chain = [c for c in calls[:i] if c[2] is x]
    producers = [k for k, c in enumerate(chain) if c[0] in layers]
    if not producers:
        return []
    seq = chain[producers[-1]:]
    if any(b[3] != a[4] for a, b in zip(seq, seq[1:])) or seq[-1][4] != version:
        return []
    return seq


# ---------------------------------------------------------------- BatchNorm folding
def fold_batchnorm(net: nn.Module, x: Tensor, layers: set[str]) -> dict[str, tuple[str, list[str]]]:
    """Fold every BatchNorm whose input is the output of a layer in ``layers`` (weight
    parametrized by codes and per-row scales) into that layer; returns ``{layer: (folded BN, the
    names of the BN's own modules kept after it, in order)}``.

    timm's ``BatchNormAct2d`` keeps its activation (and drop) as a ``nn.Sequential``.
    """
    bns = {n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    calls = _trace(net, x, layers | bns)
    count: dict[str, int] = {}
    for c in calls:
        count[c[0]] = count.get(c[0], 0) + 1
    folded = {}
    for i, (name, *_rest) in enumerate(calls):
        if name not in bns or count[name] != 1:
            continue
        seq = _passes_through(calls, i, layers)
        if len(seq) != 1 or count[seq[0][0]] != 1:  # the BN reads the layer's output directly
            continue
        conv, bn = net.get_submodule(seq[0][0]), net.get_submodule(name)
        if not isinstance(conv, nn.modules.conv._ConvNd) or bn.running_var is None:
            continue
        if not read_only_by(calls, seq[0][2], None, {seq[0][0], name}):  # another reader sees the raw output
            continue
        gain = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_var)
        k = gain / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(k)
        conv.parametrizations.weight[0].scale.mul_(k)
        conv.bias = nn.Parameter((bias - bn.running_mean) * k + shift, requires_grad=False)
        kept = [a for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
        _set_module(net, name, nn.Sequential(*[getattr(bn, a) for a in kept]) if kept else nn.Identity())
        folded[seq[0][0]] = (name, kept)
    return folded
