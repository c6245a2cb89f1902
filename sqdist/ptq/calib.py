"""Calibration for PTQ: each layer's input statistics, collected on cached activations.

:class:`InputStatistics` accumulates, for one Conv2d/Linear, the Gram matrix ``X_g^T X_g``, the
sum of the rows and their count per conv group over the layer's unfolded inputs; its
:meth:`~InputStatistics.hessian` is plain or centred (``(X - mean)^T (X - mean)``: the error a
BatchNorm right after the layer removes once its statistics are re-estimated is the per-channel
mean of ``X dW^T``, so it is left out of what GPTQ minimises there).

:func:`staged_walk` runs a network *once* over the calibration chunks, one traced graph node at
a time, keeping every chunk's live activations (``torch.fx``): when the node of a layer to
quantize comes, its cached inputs go to ``on_layer`` (which quantizes it) and only then does the
node run; a BatchNorm can be re-estimated from its cached inputs on the way (``on_batchnorm``).
The cost is one forward of the calibration set plus each layer's statistics, linear in depth,
and the memory that of the calibration set's live activations. A network ``torch.fx`` cannot
trace raises :class:`NotTraceable`; :func:`per_layer_statistics` is then the fallback (the
network run up to each layer, one partial forward per layer).
"""
from __future__ import annotations

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..calibration import input_rows

ROWS_PER_STEP = 1 << 26   # bound the unfolded (rows, width) intermediate to ~64M values


class NotTraceable(RuntimeError):
    """``torch.fx`` cannot trace the network, or a layer to quantize is not one node of its graph."""


class InputStatistics:
    """Per-group Gram matrix, row sum and row count of a layer's unfolded inputs (float64).

    ``gram``: (groups, D_g, D_g); ``total``: (groups, D_g); ``rows``: (1,) (a tensor, so the three
    can be summed over ranks).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.groups = getattr(module, "groups", 1)
        width = module.weight[0].numel()
        device = module.weight.device
        self.gram = torch.zeros(self.groups, width, width, dtype=torch.float64, device=device)
        self.total = torch.zeros(self.groups, width, dtype=torch.float64, device=device)
        self.rows = torch.zeros(1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate the layer's input ``x`` (what its forward gets)."""
        rows = input_rows(self.module, x.float())                  # (B, R, D_total)
        b, r, width = rows.shape
        step = max(1, ROWS_PER_STEP // max(1, r * width))
        for start in range(0, b, step):
            part = rows[start:start + step].reshape(-1, self.groups, width // self.groups)
            self.gram += torch.einsum("ngi,ngj->gij", part, part).double()
            self.total += part.sum(0).double()
            self.rows += part.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.gram, self.total, self.rows]

    def hessian(self, centred: bool) -> Tensor:
        """(groups, D_g, D_g): ``X^T X``, or ``(X - mean)^T (X - mean) = X^T X - s s^T / n`` (``centred``)."""
        if not centred or not bool(self.rows > 0):
            return self.gram
        return self.gram - torch.einsum("gi,gj->gij", self.total, self.total) / self.rows


class _Stop(Exception):
    """Raised once a layer's input is seen: nothing after it needs to run."""


def _is_leaf(module: nn.Module, default) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear, _BatchNorm)) or default(module)


class _Tracer(fx.Tracer):
    """The default tracer, with every Conv2d/Linear/BatchNorm (subclasses too) one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m, lambda mod: super(_Tracer, self).is_leaf_module(mod, qualname))


def trace(model: nn.Module, names: list[str]) -> fx.GraphModule:
    """The network's graph, checked to call each layer of ``names`` in exactly one node."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds on untraceable Python
        raise NotTraceable(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}") from None
    gm = fx.GraphModule(model, graph)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    odd = [n for n in names if calls.get(n, 0) != 1]
    if odd:
        raise NotTraceable(f"layers not called in exactly one node of the traced graph: {', '.join(odd[:5])}")
    return gm


@torch.no_grad()
def staged_walk(gm: fx.GraphModule, chunks: list[Tensor], on_layer, on_batchnorm=None) -> None:
    """Run the traced network ``gm`` once over ``chunks`` (image batches), node by node.

    ``on_layer(name, inputs)``: called before the node of each layer that ``on_layer`` was told
    of (``on_layer.names``), with that layer's input in every chunk; it may change the layer's
    weight, which the node then computes with. ``on_batchnorm(module, inputs)``: the same for
    each BatchNorm node (before it runs). A value is dropped after its last use.
    """
    modules = dict(gm.named_modules())
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        fx.node.map_arg((node.args, node.kwargs), lambda a: last_use.__setitem__(a, node))
    users: dict[fx.Node, list[fx.Node]] = {}
    for value, last in last_use.items():
        users.setdefault(last, []).append(value)
    env: dict[fx.Node, list] = {}
    n = len(chunks)
    placeholders = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = list(chunks) if placeholders == 0 else [node.args[0] if node.args else None] * n
            placeholders += 1
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            env[node] = [value] * n
        elif node.op == "output":
            break
        else:
            per_chunk = [fx.node.map_arg((node.args, node.kwargs), lambda a, i=i: env[a][i]) for i in range(n)]
            if node.op == "call_module":
                module = modules[node.target]
                if node.target in on_layer.names:
                    on_layer(node.target, [args[0] for args, _ in per_chunk])
                elif on_batchnorm is not None and isinstance(module, _BatchNorm):
                    on_batchnorm(module, [args[0] for args, _ in per_chunk])
                env[node] = [module(*a, **k) for a, k in per_chunk]
            elif node.op == "call_function":
                env[node] = [node.target(*a, **k) for a, k in per_chunk]
            else:  # call_method
                env[node] = [getattr(a[0], node.target)(*a[1:], **k) for a, k in per_chunk]
        for value in users.get(node, ()):
            env.pop(value, None)


@torch.no_grad()
def per_layer_statistics(model: nn.Module, module: nn.Module, chunks, stats: InputStatistics,
                         calls: int = 1) -> int:
    """Accumulate ``module``'s inputs into ``stats`` by running ``model`` up to it on each chunk.

    Each of the ``calls`` calls of the layer in a forward (:func:`call_counts`) is accumulated;
    the forward stops after the last. Returns the number of chunks whose forward reached it.
    """
    seen = [0]

    def hook(_m, args):
        stats.add(args[0])
        seen[0] += 1
        if seen[0] % calls == 0:
            raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for x in chunks:
            try:
                model(x.clone())   # the chunk is used again for the next layer
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen[0] // calls


@torch.no_grad()
def call_counts(model: nn.Module, names: list[str], x: Tensor) -> tuple[dict[str, int], set[str]]:
    """How many times each layer of ``names`` runs in ``model(x)``, and which of them feed a
    BatchNorm directly (their output is a BatchNorm's input)."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(names, 0)
    outputs: dict[int, tuple[str, Tensor]] = {}
    feeds: set[str] = set()

    def count(_m, _a, output, name):
        counts[name] += 1
        outputs[id(output)] = (name, output)  # the tensor is kept so its id is not reused

    def into_bn(_m, args):
        found = outputs.get(id(args[0]))
        if found is not None and found[1] is args[0]:
            feeds.add(found[0])

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: count(m, a, o, n)) for n in names]
    handles += [m.register_forward_pre_hook(into_bn) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return counts, feeds
