"""convert(model, backend): put the fused ops into a model users already have.

(a) Every pf_kernels.nn module in the model is switched to `backend`.
(b) Plain-PyTorch code is rewritten with torch.fx: the late-fusion head
    act(linear(cat([h_1..h_K], -1))) becomes fusion_head, and the back-projection
    cat([x, act(linear(z)) broadcast over x's positions], -1) becomes backproj_concat, whether
    written with modules (nn.Linear, nn.ReLU, ...) or functions (F.linear, torch.relu, ...).
    The nn.Linear modules stay where they are, so the state_dict keeps its keys and still loads into
    the original model. A model fx cannot trace is searched child by child; what cannot be traced is
    left unchanged, with the reason in the report.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from ._dispatch import check_backend_name
from .nn import BackProjection, FusionHead, ProgressiveFusion

_ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "none"}
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
# Ops that only insert singleton dims or replicate along them: the context's broadcast over positions.
_BROADCAST_METHODS = {"unsqueeze", "expand", "expand_as", "repeat", "view", "reshape"}


@dataclass
class ConversionReport:
    replaced: List[str] = field(default_factory=list)
    left_alone: List[str] = field(default_factory=list)
    backends_set: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pf_kernels.convert: {len(self.replaced)} pattern(s) replaced, "
                 f"{len(self.backends_set)} module backend(s) set, {len(self.left_alone)} note(s)"]
        lines += [f"  replaced:   {r}" for r in self.replaced]
        lines += [f"  backend:    {r}" for r in self.backends_set]
        lines += [f"  left alone: {r}" for r in self.left_alone]
        return "\n".join(lines)


class Converted(NamedTuple):
    model: nn.Module
    report: ConversionReport


# The functions the rewritten graphs call. fx records them as leaves; they check the one thing the
# pattern cannot show statically and otherwise call the fused op.
@fx.wrap
def fused_fusion_head(hs, weight, bias, activation: str, backend: str, cat_dim: int):
    if all(h.dim() == 2 for h in hs) and cat_dim in (1, -1):
        return ops.fusion_head(list(hs), weight, bias, activation, backend=backend)
    # Not the late-fusion shape after all: the plain computation, as the original graph did it.
    from .reference import apply_activation
    return apply_activation(F.linear(torch.cat(list(hs), cat_dim), weight, bias), activation)


@fx.wrap
def fused_backproj_concat(x, z, weight, bias, activation: str, backend: str):
    return ops.backproj_concat(x, z, weight, bias, activation, backend=backend)


# Where each fused call keeps its backend argument.
_BACKEND_ARG = {fused_fusion_head: 4, fused_backproj_concat: 5}


def _activation_of(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The activation name if node applies one of ours to its single input, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, nn.GELU):
            return "gelu" if module.approximate == "none" else None
        for cls, name in _ACT_MODULES.items():
            if type(module) is cls:
                return name
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        if node.kwargs.get("inplace") or node.kwargs.get("approximate", "none") != "none":
            return None
        if node.target in (F.relu,) and len(node.args) > 1 and node.args[1]:
            return None
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target]
    return None


def _linear_parts(node: fx.Node, modules, graph: fx.Graph):
    """(input, weight node, bias node or None, description) if node is a linear map, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.Linear:
        linear = modules[node.target]
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if linear.bias is not None else None
        return node.args[0], weight, bias, f"nn.Linear '{node.target}'"
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * (3 - len(node.args))
        bias = node.kwargs.get("bias", args[2])
        weight = node.kwargs.get("weight", args[1])
        return args[0], weight, bias, "F.linear"
    return None


def _is_linear(node, modules) -> bool:
    return (node.op == "call_module" and type(modules.get(node.target)) is nn.Linear) or \
        (node.op == "call_function" and node.target is F.linear)


def _cat_parts(node: fx.Node):
    """(tensors, dim) if node is torch.cat of a list, else None."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if isinstance(tensors, fx.Node):
        return tensors, dim  # a list that arrives as one input, e.g. forward(self, hs)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    if not isinstance(dim, int):
        return None
    return list(tensors), dim


def _context_source(node: fx.Node, modules):
    """Walks back from the cat's last input through broadcast ops to act(linear(z)).
    Returns (linear node, activation, final act-or-linear node, broadcast nodes) or None."""
    chain = []
    while node.op == "call_method" and node.target in _BROADCAST_METHODS and len(node.users) == 1:
        if node.target in ("view", "reshape") and node.args[-1] != -1:
            return None  # a reshape that might move features: not a pure broadcast
        if node.target == "unsqueeze" and node.args[1] in (0, -1):
            return None  # a new batch or feature dim, not a position dim
        chain.append(node)
        node = node.args[0]
    if node.op == "call_function" and node.target is operator.getitem and len(node.users) == 1:
        index = node.args[1]  # c[:, None, ...] style
        if isinstance(index, tuple) and index and index[0] == slice(None) and \
                all(i is None or i == slice(None) or i is Ellipsis for i in index[1:]) and \
                (index[-1] == slice(None) or index[-1] is Ellipsis):
            chain.append(node)
            node = node.args[0]
    act = _activation_of(node, modules) if len(node.users) == 1 else None
    if act is not None:
        linear = node.args[0]
        if not isinstance(linear, fx.Node) or len(linear.users) != 1 or not _is_linear(linear, modules):
            return None
        return linear, act, node, chain
    if _is_linear(node, modules) and len(node.users) == 1:
        return node, "none", node, chain
    return None


def _rewrite_graph(gm: fx.GraphModule, backend: str, report: ConversionReport, where: str) -> int:
    modules = dict(gm.named_modules())
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        parts = _cat_parts(node)
        if parts is None:
            continue
        tensors, dim = parts
        # Back-projection: cat([x, broadcast(act(linear(z)))], -1).
        if isinstance(tensors, list) and len(tensors) == 2 and dim == -1:
            source = _context_source(tensors[1], modules)
            if source is not None:
                linear, act, _, chain = source
                z, weight, bias, desc = _linear_parts(linear, modules, graph)
                with graph.inserting_before(node):
                    fused = graph.call_function(fused_backproj_concat, (tensors[0], z, weight, bias, act, backend))
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                count += 1
                report.replaced.append(f"{where}: cat([x, {act}({desc}(z)){' broadcast' if chain else ''}], -1) "
                                       f"-> backproj_concat")
                continue
        # Late-fusion head: act(linear(cat(hs, -1))).
        users = list(node.users)
        if len(users) == 1 and _is_linear(users[0], modules) and users[0].args[0] is node:
            linear = users[0]
            act_users = list(linear.users)
            act_node = act_users[0] if len(act_users) == 1 and _activation_of(act_users[0], modules) else None
            act = _activation_of(act_node, modules) if act_node is not None else "none"
            _, weight, bias, desc = _linear_parts(linear, modules, graph)
            last = act_node if act_node is not None else linear
            with graph.inserting_before(last):
                fused = graph.call_function(fused_fusion_head, (tensors, weight, bias, act, backend, dim))
            last.replace_all_uses_with(fused)
            count += 1
            inputs = f"{len(tensors)} inputs" if isinstance(tensors, list) else f"'{tensors.name}'"
            report.replaced.append(f"{where}: {act}({desc}(cat({inputs}, {dim}))) -> fusion_head "
                                   "(the plain ops run where the inputs turn out not to be 2-D)")
        else:
            report.left_alone.append(f"{where}: torch.cat node '{node.name}' matches no fused pattern")
    if count:
        graph.eliminate_dead_code()
        # get_attr nodes of weights that the linear modules still own: keep only what is used.
        graph.lint()
        gm.recompile()
    return count


def _retarget_backend(gm: fx.GraphModule, backend: str) -> int:
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _BACKEND_ARG:
            args = list(node.args)
            args[_BACKEND_ARG[node.target]] = backend
            node.args = tuple(args)
            changed += 1
    if changed:
        gm.recompile()
    return changed


class _LeafTracer(fx.Tracer):
    """fx's tracer, with some of the user's submodules kept as opaque calls."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, leaves=frozenset()) -> fx.GraphModule:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _untraceable_children(module: nn.Module) -> Dict[str, nn.Module]:
    """The user's own submodules (containers looked into) that fx cannot trace on their own, by
    qualified name; the outermost such module only."""
    found: Dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue
        if type(child).__module__.startswith("torch.nn") or isinstance(child, (BackProjection, FusionHead)):
            continue
        try:
            _trace(child)
        except Exception:  # fx raises many kinds
            found[name] = child
    return found


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__


def _convert_module(module: nn.Module, backend: str, report: ConversionReport, where: str) -> nn.Module:
    if isinstance(module, (BackProjection, FusionHead, ProgressiveFusion)):
        return module
    if isinstance(module, fx.GraphModule):
        if _retarget_backend(module, backend):
            report.backends_set.append(f"{where}: fused ops of an earlier conversion -> {backend!r}")
            return module
    # Library modules are leaves: nothing of ours inside them.
    if type(module).__module__.startswith("torch.nn"):
        return module
    label = where or type(module).__name__
    try:
        gm = _trace(module)
    except Exception as exc:  # fx raises many kinds; the model stays as it was
        # Often only a child is untraceable (an encoder with an `if` on a shape): keep such
        # children as opaque calls, trace the rest, and convert inside those children separately.
        opaque = _untraceable_children(module)
        gm = None
        if opaque:
            try:
                gm = _trace(module, {id(child) for child in opaque.values()})
            except Exception:
                gm = None
        if gm is None:
            report.left_alone.append(f"{label}: torch.fx cannot trace {type(module).__name__} ({_short(exc)}); "
                                     "trying its children")
            for name, child in list(module.named_children()):
                new = _convert_module(child, backend, report, f"{where}.{name}" if where else name)
                if new is not child:
                    setattr(module, name, new)
            return module
        report.left_alone.append(f"{label}: torch.fx cannot trace {', '.join(opaque)} "
                                 f"({type(module).__name__}'s children; {_short(exc)}): kept as opaque calls, "
                                 "converted inside separately")
        for name, child in opaque.items():
            new = _convert_module(child, backend, report, f"{where}.{name}" if where else name)
            if new is not child:
                module.set_submodule(name, new)
                gm.set_submodule(name, new)
    if _rewrite_graph(gm, backend, report, label):
        return gm
    return module


def convert(model: nn.Module, backend: str = "auto") -> Converted:
    """Switch every pf_kernels module in `model` to `backend` and rewrite the plain-PyTorch fusion
    heads and back-projections into the fused ops. Returns (model, report); modules are changed in
    place, and where the top-level model itself is rewritten, the returned model is a
    torch.fx.GraphModule sharing its parameters (same state_dict keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    report = ConversionReport()
    for name, module in model.named_modules():
        if isinstance(module, (BackProjection, FusionHead)):
            module.backend = backend
            report.backends_set.append(f"{name or type(module).__name__}: {type(module).__name__} -> {backend!r}")
    converted = _convert_module(model, backend, report, "")
    return Converted(converted, report)
