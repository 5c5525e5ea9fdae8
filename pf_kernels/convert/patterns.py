"""The patterns convert() swaps, read off the torch.fx graph that torch.compile captures.

The graph is torch-level (torch.cat, F.linear, torch.relu, Tensor.unsqueeze, ...: dynamo inlines
nn.Module calls, parameters arrive as graph inputs) and every node carries its example value, so
a pattern can check dims, dtypes and devices instead of guessing them from the code.

A pattern scans the graph and proposes
- Matches: one fused call that would compute `anchor` and make the nodes in `nodes` dead, and
- Misses: a cat/linear that looks like the pattern but must not be swapped, with the reason.
The rewrite keeps the non-overlapping matches that save the most ops (views are free), a tie going
to the pattern listed first in PATTERNS. To add a pattern: subclass Pattern, write find(), insert
an instance in PATTERNS at its rank, and give FusedCalls (rewrite.py) the function it emits.
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
from dataclasses import dataclass
from collections import Counter
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree
from torch.fx.experimental.symbolic_shapes import statically_known_true

SUPPORTED_ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", F.relu: "relu", F.relu_: "relu",
                         torch.tanh: "tanh", torch.tanh_: "tanh", F.tanh: "tanh",
                         torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
                         F.gelu: "gelu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh",
                       "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
# Activations the fused ops do not apply: named in the report when they sit where ours would.
_OTHER_ACTIVATIONS = {F.leaky_relu, F.leaky_relu_, F.elu, F.selu, F.celu, F.silu, F.mish, F.softplus,
                      F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
# Ops that carry a fused vector z unchanged in meaning (what a back-projection may read z through).
_TRANSPARENT_FUNCTIONS = {F.dropout, torch.dropout, F.alpha_dropout, F.feature_alpha_dropout,
                          F.layer_norm}
_TRANSPARENT_METHODS = {"clone", "contiguous"}
# Ops a context may reach the cat through: each only inserts, expands or repeats singleton dims
# (checked per op by _broadcast_axes).
_BROADCAST_METHODS = {"unsqueeze", "expand", "expand_as", "repeat", "view", "reshape", "contiguous",
                      "clone", "to"}
_BROADCAST_FUNCTIONS = {torch.unsqueeze, torch.reshape, torch.broadcast_to, operator.getitem}


# ---------------------------------------------------------------------------------------------
# Reading nodes
def value(node) -> Optional[torch.Tensor]:
    """The example value dynamo recorded for node (a FakeTensor), if node is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value")
    return v if isinstance(v, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def same_size(a, b) -> bool:
    """a == b for sizes that may be symbolic (dynamic batch), without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _is_one(size) -> bool:
    return same_size(size, 1)


@dataclass
class Linear:
    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]


def as_linear(node) -> Optional[Linear]:
    """F.linear(input, weight, bias) (nn.Linear once dynamo has inlined it), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not F.linear:
        return None
    inp, weight, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if value(inp) is None or value(weight) is None or value(weight).dim() != 2:
        return None
    if bias is not None and (value(bias) is None or tuple(value(bias).shape) != (value(weight).shape[0],)):
        return None  # (a bias F.linear broadcasts, (1, out) or 0-d: the fused ops take (out,))
    return Linear(node, inp, weight, bias)


def sole_activation(linear: Linear) -> Optional[Tuple[str, fx.Node]]:
    """(name, node) of a supported activation that alone reads the linear's output (what a fused
    op may apply as its epilogue)."""
    users = list(linear.node.users)
    if len(users) != 1:
        return None
    act = as_activation(users[0])
    if act is None or act[0] not in SUPPORTED_ACTIVATIONS or act[1] is not linear.node:
        return None
    return act[0], users[0]


@dataclass
class Cat:
    node: fx.Node
    tensors: List[fx.Node]
    dim: int  # normalised: 0 <= dim < ndim


def as_cat(node) -> Optional[Cat]:
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return None
    dim = _arg(node, 1, "dim", node.kwargs.get("axis", 0))  # torch.concatenate(..., axis=k) too
    tensors, out = _arg(node, 0, "tensors"), value(node)
    if out is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    if not all(value(t) is not None and value(t).dim() == out.dim() for t in tensors):
        return None
    return Cat(node, list(tensors), dim % out.dim())


def as_activation(node) -> Optional[Tuple[str, fx.Node]]:
    """(name, input) if node applies an activation to one tensor. The name is one of
    SUPPORTED_ACTIVATIONS, or another activation's name (which no fused op applies)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1:
        return _ACTIVATION_METHODS[node.target], node.args[0]
    if node.op != "call_function":
        return None
    if node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        if name == "gelu" and _arg(node, 1, "approximate", "none") != "none":
            return "gelu(approximate='tanh')", node.args[0]
        return name, node.args[0]
    if node.target in _OTHER_ACTIVATIONS:
        return node.target.__name__, node.args[0]
    return None


def _transparent_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a dropout/norm/copy/activation node (z read through it keeps its meaning)."""
    act = as_activation(node)
    if act is not None:
        return act[1]
    if node.op == "call_function" and node.target in _TRANSPARENT_FUNCTIONS or \
            node.op == "call_method" and node.target in _TRANSPARENT_METHODS:
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None
    return None


def _is_pf_kernels_fusion(node: fx.Node) -> bool:
    """The output of a pf_kernels fusion op (a FusionHead or ProgressiveFusion in the model)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    name = str(node.target) if node.op == "call_function" else ""
    return name.startswith("pf_kernels") and (".fusion_head" in name or ".refine_step" in name)


def is_fused_vector(node: fx.Node) -> bool:
    """Whether node is a late-fusion output: linear(cat(>= 2 tensors, last dim)) or a pf_kernels
    fusion op, read through dropout, layer norm, copies or activations."""
    for _ in range(16):  # a short walk: z is close to the head that made it
        if _is_pf_kernels_fusion(node):
            return True
        linear = as_linear(node)
        if linear is not None:
            cat = as_cat(linear.input)
            return cat is not None and len(cat.tensors) >= 2 and cat.dim == value(cat.node).dim() - 1
        node = _transparent_input(node)
        if node is None:
            return False
    return False


# ---------------------------------------------------------------------------------------------
# Describing nodes for the report
def _module_path(source: str) -> str:
    """'enc.0' from dynamo's source names of a submodule: `enc[0]`, or `__dict__['_modules']['enc'].0`
    where the forward reached it another way (a recapture, a comprehension over the ModuleList)."""
    source = re.sub(r"(?:__dict__\[(['\"])_modules\1\]|_modules)\[(['\"])([^'\"]+)\2\]", r".\3", source)
    source = re.sub(r"\[(['\"]?)([^'\"\]]+)\1\]", r".\2", source)
    return re.sub(r"\.{2,}", ".", source).strip(".")


def where(node: fx.Node) -> str:
    """'module.path (file.py:line)' of the user code that made node."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = list(stack.values())[-1][0]
        # dynamo names the root L['self'] (or whatever forward's first parameter is called)
        if path.startswith("L['"):
            path = path.split("]", 1)[1].lstrip(".")
        path = _module_path(path)
    trace = node.meta.get("stack_trace") or ""
    source = ""
    for line in reversed(trace.strip().splitlines()):
        line = line.strip()
        if line.startswith("File "):
            parts = line.split('"')
            lineno = line.split(", line ")[1].split(",")[0] if ", line " in line else "?"
            if len(parts) >= 2:
                source = f"{parts[1].rsplit('/', 1)[-1]}:{lineno}"
            break
    if not path:  # code of the converted model's own forward
        owner = node.graph.owning_module
        path = f"{owner.meta.get('pf_kernels_root', '')}.forward" if owner is not None else "forward"
    return f"{path} ({source})" if source else path


def shape_text(node) -> str:
    v = value(node)
    if v is None:
        return "?"
    dims = ["B" if i == 0 else (str(s) if isinstance(s, int) else "?") for i, s in enumerate(v.shape)]
    return "(" + ", ".join(dims) + ")"


def _applied(activation: str, inner: str) -> str:
    return inner if activation == "none" else f"{activation}({inner})"


# ---------------------------------------------------------------------------------------------
# Matches and misses
@dataclass(eq=False)
class Match:
    op: str                 # the fused op, e.g. "fusion_head"
    pivot: fx.Node          # the node that defines the pattern (its cat or linear)
    anchor: fx.Node         # the node whose value the fused call replaces
    nodes: Set[fx.Node]     # computed by the fused call alone (dead once anchor is replaced)
    inputs: List[fx.Node]   # what the fused call reads
    walked: List[fx.Node]   # every node of the pattern (shared ones are erased if left unused)
    emit: Callable          # emit(graph, remap, calls) -> the fused call node, inserted at the cursor
    formula: str
    where: str
    rank: int = 0           # the pattern's place in PATTERNS: lower wins a tie
    shared: Optional["SharedProjection"] = None  # the hoisted projection the fused call reads

    @property
    def score(self) -> int:
        """How many ops the fused call saves: the nodes it takes over, views (which move no data)
        not counted."""
        return sum(not _is_view(n) for n in self.nodes)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("unsqueeze", "view", "expand", "expand_as", "to") or \
            node.target == "reshape" and _keeps_storage(node)
    if node.op == "call_function":
        return node.target in (torch.unsqueeze, torch.broadcast_to, operator.getitem) or \
            node.target is torch.reshape and _keeps_storage(node)
    return False


def _keeps_storage(node: fx.Node) -> bool:
    before = value(node.args[0])
    return before is not None and before.is_contiguous()


# ---------------------------------------------------------------------------------------------
# What a swap must respect beyond the dataflow: writes in place, grad mode and autocast
_WRITING_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}
# Ops whose result may share its first argument's memory (views; dropout and .to()/.contiguous()
# may return their input itself).
_ALIASING_METHODS = {"view", "view_as", "reshape", "reshape_as", "unsqueeze", "squeeze", "expand", "expand_as",
                     "transpose", "permute", "t", "narrow", "select", "flatten", "unflatten", "unbind", "split",
                     "chunk", "as_strided", "contiguous", "detach", "to", "type", "type_as", "float", "double",
                     "half", "bfloat16", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold",
                     "__getitem__", "view_as_real", "view_as_complex", "squeeze_", "unsqueeze_", "align_as",
                     "tensor_split", "hsplit", "vsplit", "dsplit", "split_with_sizes", "unsafe_split",
                     "unsafe_chunk", "unsafe_split_with_sizes", "mT", "mH", "T", "H", "real", "imag", "data",
                     "indices", "values", "adjoint", "conj", "resolve_conj", "resolve_neg", "positive",
                     "ravel", "broadcast_to", "sum_to_size"}
_ALIASING_FUNCTIONS = {operator.getitem, getattr, torch.reshape, torch.unsqueeze, torch.squeeze, torch.transpose,
                       torch.permute, torch.narrow, torch.select, torch.flatten, torch.split, torch.chunk,
                       torch.unbind, torch.broadcast_to, torch.movedim, torch.moveaxis, torch.t, torch.detach,
                       torch.as_strided, torch.swapaxes, torch.swapdims, torch.diagonal, torch.tensor_split,
                       torch.hsplit, torch.vsplit, torch.dsplit, torch.split_with_sizes, torch.unsafe_split,
                       torch.unsafe_chunk, torch.adjoint, torch.conj, torch.resolve_conj, torch.resolve_neg,
                       torch.positive, torch.real, torch.imag, torch.view_as_real, torch.view_as_complex, F.dropout,
                       F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                       torch.ravel, torch.unflatten, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d,
                       torch.broadcast_tensors, torch.meshgrid,
                       getattr(torch._C._autograd, "_get_data_attr", F.dropout)}  # (what dynamo makes of t.data)
# Deterministic views and casts: two calls with the same inputs give the same value (a modality
# sliced or cast again in every step of a loop is one x).
_REPEATABLE_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "transpose", "permute", "narrow", "select",
                       "flatten", "contiguous", "to", "float", "double", "half", "bfloat16", "__getitem__"}
_REPEATABLE_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.transpose,
                         torch.permute, torch.narrow, torch.select, torch.flatten}
# Calls that change the mode the ops after them run in (dynamo records `with torch.no_grad():`,
# `with torch.inference_mode():` and `with torch.autocast(...):` as these).
_MODE_FUNCTIONS = {torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                   torch.amp.autocast_mode._exit_autocast, torch.autograd.grad_mode._enter_inference_mode,
                   torch.autograd.grad_mode._exit_inference_mode}


@functools.lru_cache(maxsize=None)
def _inplace_position(function) -> Optional[int]:
    """Where a function takes an `inplace` flag by position (F.relu(x, True), F.dropout(x, p, t, True))."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def _written_lists(node: fx.Node) -> List[fx.Node]:
    """The tensors a foreach op writes into (torch._foreach_add_([a, b], 1.0))."""
    first = node.args[0] if node.op == "call_function" and node.args else None
    name = getattr(node.target, "__name__", "")
    if isinstance(first, (list, tuple)) and name.endswith("_") and not name.startswith("__"):
        return [t for t in first if isinstance(t, fx.Node)]
    return []


def written_in_place(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node writes into (x.add_(y), x[i] = v, x += y, F.relu(x, inplace=True), out=x), or None."""
    if node.op not in ("call_method", "call_function"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("__") else None
    name = getattr(node.target, "__name__", "")
    if node.target in _WRITING_OPERATORS or (name.endswith("_") and not name.startswith("__")) \
            or _inplace_flag(node):
        return first
    return None


class GraphFacts:
    """Which nodes may share memory (views of one another), which nodes write into which, and the
    grad-mode/autocast region of every node: what decides whether a fused call may compute a
    pattern's value at its anchor from its inputs."""

    def __init__(self, graph: fx.Graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        parent = {}

        def root(n):
            while parent.get(n, n) is not n:
                n = parent[n]
            return n

        writes, list_writes, region, self.region = [], [], 0, {}
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _MODE_FUNCTIONS:
                region += 1
            self.region[node] = region
            first = node.args[0] if node.args else None
            aliasing = node.op == "call_method" and node.target in _ALIASING_METHODS or \
                node.op == "call_function" and node.target in _ALIASING_FUNCTIONS
            written = written_in_place(node)
            if written is not None:
                writes.append((node, written))
                first, aliasing = written, True  # its result is the tensor it wrote
            list_writes += [(node, t) for t in _written_lists(node)]
            if aliasing and isinstance(first, fx.Node):
                parent[root(node)] = root(first)
        self._root = root
        self.written = dict(writes)  # writer -> the tensor it writes into
        self.writers = {}
        for writer, written in writes + list_writes:
            self.writers.setdefault(root(written), []).append(writer)
        # Only in a graph that writes nothing in place: a write may reach a take of x through memory
        # the graph does not see shared (a copy written itself, an alias made by an op outside the
        # view lists, two inputs viewing one tensor).
        self._earliest_equal = {}
        first_of = {}
        for node in graph.nodes if not writes + list_writes else ():
            key = self._repeat_key(node)
            if key is not None:
                self._earliest_equal[node] = first_of.setdefault(key, node)
        # The memory the graph hands back to its caller (who may write into it).
        self.returned = {root(n) for out in graph.nodes if out.op == "output"
                         for n in _pytree.tree_leaves(out.args) if isinstance(n, fx.Node)}

    def _repeat_key(self, node: fx.Node):
        """What identifies node's value among the graph's deterministic views and casts (the same call
        of the same inputs in the same mode), or None."""
        if not (node.op == "call_method" and node.target in _REPEATABLE_METHODS
                or node.op == "call_function" and node.target in _REPEATABLE_FUNCTIONS):
            return None

        def key(a):
            if isinstance(a, fx.Node):
                return ("node", self._earliest_equal.get(a, a))
            if isinstance(a, slice):
                return ("slice", key(a.start), key(a.stop), key(a.step))
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, *map(key, a))
            if a is None or a is Ellipsis or isinstance(a, (bool, int, float, str, torch.dtype, torch.device)):
                return (type(a).__name__, a)
            raise TypeError

        try:
            return (node.op, node.target, key(node.args), key(sorted(node.kwargs.items())), self.region[node])
        except TypeError:  # an argument this cannot compare
            return None

    def earliest_equal(self, node):
        """The first node of the graph that computes node's value by the same deterministic views and
        casts of the same inputs (x sliced in every step of a loop: the first step's slice), in a
        graph with no write in place; else node."""
        return self._earliest_equal.get(node, node)

    def writes_to(self, node, exclude=()) -> List[fx.Node]:
        """The nodes that write into node's memory (node, a view of it, or what it views), in order."""
        if not isinstance(node, fx.Node):
            return []
        return [w for w in self.writers.get(self._root(node), []) if w not in exclude]

    def version(self, node, at: fx.Node) -> int:
        """How many writes into node's memory come before `at`: two reads of one node see the same
        values only where this is the same."""
        return sum(self.order[w] < self.order[at] for w in self.writes_to(node))

    def problem(self, match: "Match") -> Optional[str]:
        """Why match's fused call cannot replace it, or None."""
        own = set(match.walked) | {match.anchor}
        if len({self.region[n] for n in own}) > 1:
            return ("its ops are not all in one grad mode / autocast region (a `with torch.no_grad()` or "
                    "`torch.autocast` boundary runs through it)")
        first, anchor = min(self.order[n] for n in own), self.order[match.anchor]
        anchor_root = self._root(match.anchor)
        for writer in own:
            # (an in-place activation: c = lin(z); relu_(c); ... c read again after the fused call)
            written = self.written.get(writer)
            if written is not None and (written not in own or any(u not in own for u in written.users)):
                return (f"{where(writer)} writes in place into a value that is read outside the pattern (the "
                        f"fused call would not write it)")
        for node in own:
            for writer in self.writes_to(node, own):
                if self._root(node) is anchor_root and self.order[writer] > anchor:
                    continue  # a write into the result: it goes to the fused call's result instead
                return f"a value it computes is written in place at {where(writer)}"
        for node in match.inputs:
            for writer in self.writes_to(node, own):
                if first <= self.order[writer] <= anchor:
                    return f"an input is written in place at {where(writer)}, while the pattern reads it"
                if self.order[writer] > anchor:  # (the pattern's own ops may have saved a copy: a concat)
                    return (f"an input is written in place at {where(writer)}, after it (the fused op keeps that "
                            "input for its backward)")
        return None

    def result_written_later(self, match_nodes: Set[fx.Node], anchor: fx.Node) -> bool:
        """Whether anchor's memory is written after it: in the graph, or by the caller it is returned to."""
        return self._root(anchor) in self.returned or \
            any(self.order[w] > self.order[anchor] for w in self.writes_to(anchor, match_nodes))


@dataclass
class Miss:
    pivot: fx.Node
    formula: str
    where: str
    reason: str


def _exclusive(chain: Sequence[fx.Node], owners: Set[fx.Node]) -> Set[fx.Node]:
    """The prefix of chain (ordered from the pattern's output inwards) that only the pattern uses."""
    inside = set(owners)
    for node in chain:
        if all(user in inside for user in node.users):
            inside.add(node)
        else:
            break
    return inside


def _dtype_reason(operands: Sequence[Optional[fx.Node]], result: fx.Node, what: str) -> Optional[str]:
    """Why the fused op cannot take these operands (mixed dtypes or devices, autocast), or None."""
    values = [value(n) for n in operands if n is not None]
    dtypes = {v.dtype for v in values}
    devices = {v.device for v in values}
    if len(devices) > 1:
        return f"its operands are on several devices ({', '.join(sorted(str(d) for d in devices))})"
    if len(dtypes) > 1:
        return f"its operands have mixed dtypes ({', '.join(sorted(str(d) for d in dtypes))})"
    out = value(result)
    if out is not None and dtypes and out.dtype not in dtypes:
        return (f"the {what} returns {out.dtype} from {dtypes.pop()} operands (autocast): the fused "
                "ops compute in their operands' dtype")
    return None


class Pattern:
    op: str = ""
    rank: int = 0

    def find(self, graph: fx.Graph, facts: GraphFacts) -> Iterable[Union[Match, Miss]]:
        raise NotImplementedError


class FusionHeadPattern(Pattern):
    """act(linear(cat([h_1..h_K], last dim))) -> fusion_head. N-D inputs (B, *S, D_j) run as
    (B*S, D_j) rows, so early fusion over positions (a cat on dim 2 of 3-D inputs) fuses too."""

    op = "fusion_head"

    def find(self, graph, facts):
        for node in graph.nodes:
            linear = as_linear(node)
            cat = as_cat(linear.input) if linear is not None else None
            if cat is None:
                continue
            out = value(cat.node)
            act = sole_activation(linear)
            act_name = act[0] if act else "none"
            formula = _applied(act_name, f"linear(cat({len(cat.tensors)} inputs, dim={cat.dim}))")
            site = f"cat at {where(cat.node)}, linear at {where(linear.node)}"
            if cat.dim != out.dim() - 1:
                yield Miss(linear.node, formula, site,
                           f"the cat joins dim {cat.dim} of {out.dim()}-D tensors (positions, not features): "
                           "fusion_head concatenates features (the last dim)")
                continue
            if out.dim() < 2:
                yield Miss(linear.node, formula, site, "the inputs are 1-D: fusion_head takes (B, D_j) rows")
                continue
            reason = _dtype_reason([*cat.tensors, linear.weight, linear.bias], linear.node, "linear")
            if reason:
                yield Miss(linear.node, formula, site, reason)
                continue
            anchor = act[1] if act else linear.node
            nodes = {linear.node} | ({act[1]} if act else set())
            if all(user is linear.node for user in cat.node.users):
                nodes.add(cat.node)
            hs, weight, bias = list(cat.tensors), linear.weight, linear.bias

            def emit(graph, remap, calls, hs=hs, weight=weight, bias=bias, act_name=act_name):
                return graph.call_function(calls.fusion_head,
                                           ([remap(h) for h in hs], remap(weight), remap(bias), act_name))

            if out.dim() > 2:
                formula += f" over positions {shape_text(cat.node)}"
            yield Match(self.op, linear.node, anchor, nodes, [*hs, weight] + ([bias] if bias is not None else []),
                        [anchor, linear.node, cat.node], emit, formula, site, self.rank)



def _under_broadcasts(node: fx.Node) -> Optional[Tuple[fx.Node, List[fx.Node]]]:
    """(the node under the broadcast ops that node is, those ops from node inwards), or None where
    one of them does not read a node."""
    chain = []
    for _ in range(16):
        if not (node.op == "call_method" and node.target in _BROADCAST_METHODS or
                node.op == "call_function" and node.target in _BROADCAST_FUNCTIONS):
            break
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        chain.append(node)
        node = node.args[0]
    return node, chain


def _trace_context(node: fx.Node):
    """Walks back from a cat input through broadcast ops to act(linear(z)).
    Returns (linear, activation name, [broadcast nodes from the cat inwards], [act node]) or None."""
    under = _under_broadcasts(node)
    if under is None:
        return None
    node, chain = under
    act_nodes = []
    act = as_activation(node)
    if act is not None:
        act_nodes.append(node)
        name, node = act
    else:
        name = "none"
    linear = as_linear(node)
    if linear is None:
        return None
    return linear, name, chain, act_nodes


def _broadcast_axes(chain: List[fx.Node]):
    """Follows the context (B, Dc) through the broadcast ops of chain (ordered from the cat inwards).
    Returns its axes as a list of 'B' (batch), 'F' (features), 1 (singleton) or 'E' (expanded
    singleton), or a str naming the op that is not a pure broadcast and why."""
    axes: List[Union[str, int]] = ["B", "F"]
    for node in reversed(chain):
        kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        before, after = value(node.args[0]), value(node)
        if before is None or after is None:
            return f"`{kind}`, whose result is no tensor"
        if after.dtype != before.dtype or after.device != before.device:
            return f"`{kind}`, which changes its dtype or device"
        if kind in ("contiguous", "clone", "to"):
            continue
        if kind == "unsqueeze":
            dim = _arg(node, 1, "dim")
            if not isinstance(dim, int):
                return "`unsqueeze`, with a dim computed at run time"
            axes.insert(dim % (len(axes) + 1), 1)
        elif kind == "getitem":
            new = _index_axes(node.args[1], axes)
            if isinstance(new, str):
                return new
            axes = new
        elif kind in ("expand", "expand_as", "broadcast_to", "repeat"):
            grown = after.dim() - len(axes)
            if grown < 0:
                return f"`{kind}`, which drops dims"
            new = [1 if _is_one(s) else "E" for s in after.shape[:grown]]
            for axis, old, size in zip(axes, before.shape, after.shape[grown:]):
                if axis in ("B", "F"):
                    if not same_size(old, size):
                        return f"`{kind}`, which repeats its {'batch' if axis == 'B' else 'feature'} dim"
                    new.append(axis)
                else:
                    new.append(1 if _is_one(size) else "E")
            axes = new
        elif kind in ("view", "reshape"):
            if "E" in axes:
                return f"`{kind}`, applied to an already expanded context"
            # Only singleton dims may move: the batch and feature dims keep their order. One of size 1
            # (a capture at batch size 1) is itself a singleton: it is put first (the batch) or last
            # (the features), which reads the same values.
            big = [i for i, s in enumerate(after.shape) if not _is_one(s)]
            b_size, f_size = before.shape[axes.index("B")], before.shape[axes.index("F")]
            kept = [size for size in (b_size, f_size) if not _is_one(size)]
            b_axis = 0 if _is_one(b_size) else big[0] if big else -1
            f_axis = after.dim() - 1 if _is_one(f_size) else big[-1] if big else -1
            if len(big) != len(kept) or not all(same_size(after.shape[i], size) for i, size in zip(big, kept)) \
                    or not 0 <= b_axis < f_axis:
                return f"`{kind}` to {tuple(after.shape)}, which moves more than singleton dims"
            axes = [1] * after.dim()
            axes[b_axis], axes[f_axis] = "B", "F"
        else:
            return f"`{kind}`, which is not a broadcast"
    return axes


def _index_axes(index, axes):
    """Axes after indexing with full slices, None and Ellipsis only (c[:, None, :] and the like)."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index):
        return "`getitem`, which selects elements instead of only inserting dims"
    named = sum(isinstance(i, slice) for i in index)
    if sum(i is Ellipsis for i in index) > 1 or named > len(axes):
        return "`getitem`, with more dims than the context has"
    rest, new = list(axes), []
    for i in index:
        if i is None:
            new.append(1)
        elif i is Ellipsis:  # every axis the slices do not name
            new.extend(rest[:len(axes) - named])
            rest = rest[len(axes) - named:]
        else:
            new.append(rest.pop(0))
    return new + rest


@dataclass
class BackprojRead:
    """A cat read as [x, broadcast(act(linear(z)))] (x_index 0) or the other way round (x_index 1)."""
    cat: Cat
    x: fx.Node
    x_index: int
    linear: Linear          # the context's linear, z -> Dc
    activation: str
    walked: List[fx.Node]   # the context's nodes, from the cat inwards: broadcasts, act, linear
    broadcast: bool         # whether the context reaches the cat through broadcast ops
    formula: str
    site: str
    reason: Optional[str]   # why backproj_concat cannot take it, or None


class BackprojConcatPattern(Pattern):
    """cat([x, broadcast(act(linear(z)))], feature dim) -> backproj_concat: the context is one
    vector per example, broadcast over every position of x (none for a vector modality; (T,) for a
    sequence; (H, W) for an image, channels-last (B, H, W, C) or channels-first (B, C, H, W) with
    dim=1). Without positions to broadcast over, z must be a fused vector (a late-fusion output):
    otherwise the cat is an ordinary layer's output joined to x, not a back-projection."""

    op = "backproj_concat"

    def find(self, graph, facts):
        for node in graph.nodes:
            cat = as_cat(node)
            read = self.read(cat) if cat is not None else None
            if read is None:
                continue
            if isinstance(read, Miss):
                yield read
                continue
            if read.x_index != 0:
                if not read.broadcast:
                    continue  # [linear(z), x] of vectors: too common to be worth a line
                yield Miss(cat.node, read.formula, read.site,
                           "the context comes first in the cat: backproj_concat writes [x, context] "
                           "(x first, one context)")
                continue
            if read.reason:
                yield Miss(cat.node, read.formula, read.site, read.reason)
                continue
            x, linear, act_name = read.x, read.linear, read.activation
            nodes = _exclusive(read.walked, {cat.node})
            z, weight, bias, dim = linear.input, linear.weight, linear.bias, cat.dim

            def emit(graph, remap, calls, x=x, z=z, weight=weight, bias=bias, act_name=act_name, dim=dim):
                return graph.call_function(calls.backproj_concat,
                                           (remap(x), remap(z), remap(weight), remap(bias), act_name, dim))

            yield Match(self.op, cat.node, cat.node, nodes,
                        [x, z, weight] + ([bias] if bias is not None else []),
                        [cat.node, *read.walked], emit, read.formula, read.site, self.rank)

    @classmethod
    def read(cls, cat: Cat) -> Union["BackprojRead", Miss, None]:
        """cat read as a back-projection: [x, context] or [context, x] (the context reached through
        broadcasts from act(linear(z))), with the reason it cannot be fused (or None); a Miss for a
        cat of more tensors with a broadcast context in it; None for any other cat."""
        traced = [_trace_context(t) for t in cat.tensors]
        x_index = 0
        if len(cat.tensors) == 2 and traced[1] is None and traced[0] is not None:
            x_index = 1  # the context first
        elif len(cat.tensors) != 2 or traced[1] is None:
            # Near-misses worth a line: a broadcast context in the wrong place.
            broadcast = [i for i, t in enumerate(traced) if t and t[2]]
            if broadcast:
                return Miss(cat.node, f"cat({len(cat.tensors)} tensors, dim={cat.dim}) with a broadcast "
                            f"linear output as input {broadcast[0]}", f"cat at {where(cat.node)}",
                            f"a cat of {len(cat.tensors)} tensors: backproj_concat writes [x, context] "
                            "(x first, one context)")
            return None
        x = cat.tensors[x_index]
        linear, act_name, chain, act_nodes = traced[1 - x_index]
        context = f"{_applied(act_name, 'linear(z)')}{' broadcast' if value(cat.node).dim() > 2 else ''}"
        parts = [f"x {shape_text(x)}", context]
        formula = f"cat([{', '.join(parts if x_index == 0 else parts[::-1])}], dim={cat.dim})"
        site = f"cat at {where(cat.node)}, context linear at {where(linear.node)}"
        return BackprojRead(cat, x, x_index, linear, act_name, [*chain, *act_nodes, linear.node], bool(chain),
                            formula, site, cls._reason(cat, x, linear, act_name, chain))

    @staticmethod
    def _reason(cat: Cat, x: fx.Node, linear: Linear, act_name: str, chain) -> Optional[str]:
        out = value(cat.node)
        if act_name not in SUPPORTED_ACTIVATIONS:
            return (f"the context is {act_name}(linear(z)): backproj_concat applies "
                    f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if value(linear.node).dim() != 2:
            return (f"the context linear's output is {value(linear.node).dim()}-D: backproj_concat "
                    "projects one vector z (B, Dz) per example")
        if cat.dim == 0:
            return "the cat joins the batch dim"
        axes = _broadcast_axes(chain)
        if isinstance(axes, str):
            return f"the context reaches the cat through {axes}"
        expected = ["B"] + [None] * (out.dim() - 1)
        expected[cat.dim] = "F"
        if len(axes) != out.dim() or axes[0] != "B" or axes[cat.dim] != "F" or \
                any(a not in (1, "E") for i, a in enumerate(axes) if i not in (0, cat.dim)):
            return (f"the context's batch and feature dims end up at {axes.index('B') if 'B' in axes else '?'} "
                    f"and {axes.index('F') if 'F' in axes else '?'}, not at 0 and {cat.dim}")
        if out.dim() == 2 and not (is_fused_vector(linear.input) or _made_as_zeros(linear.input)):
            return ("nothing is broadcast and z is not a late-fusion output (linear over a concat, or a "
                    "pf_kernels fusion op, or the zeros of a first step): this is an ordinary layer's output "
                    "joined to x, not a back-projection")
        return _dtype_reason([x, linear.input, linear.weight, linear.bias], linear.node, "context linear")


_ZEROS_FUNCTIONS = {torch.zeros, torch.zeros_like}


def _made_as_zeros(node) -> bool:
    """torch.zeros(...), zeros_like(t) or t.new_zeros(...), through broadcasts: a first step's z_0."""
    under = _under_broadcasts(node) if isinstance(node, fx.Node) else None
    if under is None:
        return False
    zeros = under[0]
    return zeros.op == "call_function" and zeros.target in _ZEROS_FUNCTIONS or \
        zeros.op == "call_method" and zeros.target == "new_zeros"


def _is_zeros(node: fx.Node) -> bool:
    """torch.zeros(...), torch.zeros_like(t) or t.new_zeros(...), or such a tensor reshaped,
    expanded or repeated (`zeros_like(x[..., :1]).repeat(1, 1, C)`), that only cats read, each step
    of the way read by the next alone (nothing writes into it in place): a context of zeros."""
    if not (isinstance(node, fx.Node) and value(node) is not None
            and all(as_cat(user) is not None for user in node.users)):
        return False
    under = _under_broadcasts(node)
    if under is None:
        return False
    zeros, chain = under
    if any(len(n.users) != 1 for n in (*chain[1:], zeros) if n is not node):
        return False
    return _made_as_zeros(zeros)


class SharedProjection:
    """x's part of a first Linear, x @ W[:, columns].T + b: one node per (x, W, b, columns) in the
    rewritten graph, made where its first user is (the earliest site, which every later one follows)."""

    def __init__(self, x: fx.Node, weight: fx.Node, bias: Optional[fx.Node], columns: Tuple[int, int]):
        self.x, self.weight, self.bias, self.columns = x, weight, bias, columns
        self.node: Optional[fx.Node] = None

    def emit(self, graph, remap, calls) -> fx.Node:
        if self.node is None:
            self.node = graph.call_function(calls.x_projection, (remap(self.x), remap(self.weight),
                                                                 remap(self.bias), *self.columns))
        return self.node

    def text(self) -> str:
        start, stop = self.columns
        return f"linear(x {shape_text(self.x)}, W[:, {start}:{stop}], {'b' if self.bias is not None else 'no bias'})"


class _HoistSite(NamedTuple):
    projection: SharedProjection
    linear: Linear
    cat: Cat
    x_index: int
    context: Union[BackprojRead, fx.Node]  # the back-projection read, or the zeros node
    act: Optional[Tuple[str, fx.Node]]      # the activation to fuse
    formula: str
    site: str


class ContextLinearPattern(Pattern):
    """linear(cat([x, broadcast(act(linear(z)))], last dim)) -> context_linear(p, z, ...), with
    p = linear(x, W[:, :Dx], b) computed once for every site that reads the same x through the same
    Linear (the unrolled steps of a progressive model); a linear(cat([x, zeros])) (the first step's
    zero context) is p itself (op "x_projection"). A supported activation that alone reads the linear
    is fused. [context, x] slices W the other way. Without positions to broadcast over, a site is
    only taken when its p is shared (else the plain readings are as good)."""

    op = "context_linear"
    zero_op = "x_projection"

    def find(self, graph, facts):
        sites = []  # (linear, cat, x_index, the BackprojRead or zeros node)
        for node in graph.nodes:
            linear = as_linear(node)
            cat = as_cat(linear.input) if linear is not None else None
            if cat is None or len(cat.tensors) != 2 or cat.dim != value(cat.node).dim() - 1:
                continue
            zeros = [i for i, t in enumerate(cat.tensors) if _is_zeros(t)]
            if len(zeros) == 1:
                context = cat.tensors[zeros[0]]
                x_index = 1 - zeros[0]
            else:
                context = BackprojConcatPattern.read(cat)
                if not isinstance(context, BackprojRead) or context.reason:
                    continue  # (BackprojConcatPattern reports a near-miss)
                x_index = context.x_index
            sites.append((linear, cat, x_index, context))
        shared = {}
        found = []
        for linear, cat, x_index, context in sites:
            x = facts.earliest_equal(cat.tensors[x_index])
            dx, width = value(x).shape[-1], value(cat.node).shape[-1]
            act = sole_activation(linear)
            is_zeros = not isinstance(context, BackprojRead)
            formula = (_applied(act[0] if act else "none",
                                f"linear(cat([x {shape_text(x)}, zeros], dim={cat.dim}))") if is_zeros else
                       _applied(act[0] if act else "none", f"linear({context.formula})"))
            site = f"linear at {where(linear.node)}" + ("" if is_zeros else f", {context.site}")
            reason = None
            if not isinstance(dx, int) or not isinstance(width, int):
                reason = "x's feature count is symbolic: the Linear's weight cannot be split by columns"
            elif any(user is not linear.node for user in cat.node.users):
                writer = next((u for u in cat.node.users if written_in_place(u) is cat.node), None)
                reason = (f"the concat is written in place at {where(writer)}, so it is written anyway"
                          if writer is not None else "the concat is read elsewhere too, so it would be written anyway")
            else:
                operands = [x, linear.weight, linear.bias] + ([context] if is_zeros else [])
                reason = _dtype_reason(operands, linear.node, "linear")
            if reason:
                found.append(Miss(linear.node, formula, site, f"x's projection is not hoisted: {reason}"))
                continue
            columns = (0, dx) if x_index == 0 else (width - dx, width)
            key = (x, linear.weight, linear.bias, columns)
            # Sites share x's projection only where they read the same values in the same mode: not
            # across a write into x (or W, b), a `no_grad` or autocast boundary.
            when = (facts.region[linear.node], *(facts.version(n, linear.node) for n in key[:3]))
            projection = shared.setdefault((key, when), SharedProjection(*key))
            found.append(_HoistSite(projection, linear, cat, x_index, context, act, formula, site))
        sharers = Counter(item.projection for item in found if not isinstance(item, Miss))
        for item in found:
            if isinstance(item, Miss):
                yield item
            elif value(item.cat.node).dim() > 2 or sharers[item.projection] > 1:
                yield self._match(*item, facts)
            # else nothing broadcast, nothing shared: no work saved (the plain readings serve)

    def _match(self, projection, linear, cat, x_index, context, act, formula, site, facts) -> Match:
        out_act = act[0] if act else "none"
        anchor = act[1] if act else linear.node
        owners = {linear.node, cat.node} | ({anchor} if act else set())
        x, weight, bias = projection.x, linear.weight, linear.bias
        if not isinstance(context, BackprojRead):
            nodes = _exclusive([context], owners)
            # p itself is what this site returns: where the code after it (or the caller it is
            # returned to) may write into that in place, it gets a copy (p is kept for other sites).
            copy = out_act == "none" and facts.result_written_later(owners | {context}, anchor)

            def emit(graph, remap, calls, projection=projection, out_act=out_act, copy=copy):
                p = projection.emit(graph, remap, calls)
                if out_act != "none":
                    return graph.call_function(calls.activation, (p, out_act))
                # A view otherwise: a distinct autograd node (a hook on this step's value must not
                # see the later steps' gradients of the shared p).
                return graph.call_method("clone" if copy else "view_as", (p,) if copy else (p, p))

            return Match(self.zero_op, linear.node, anchor, nodes, [x, weight] + ([bias] if bias is not None else []),
                         [anchor, linear.node, cat.node, context], emit, f"{formula} -> {projection.text()}",
                         site, self.rank, projection)
        nodes = _exclusive(context.walked, owners)
        bp = context.linear
        width = value(cat.node).shape[-1]
        columns = (projection.columns[1], width) if x_index == 0 else (0, projection.columns[0])

        def emit(graph, remap, calls, projection=projection, bp=bp, columns=columns, act_name=context.activation,
                 out_act=out_act, weight=weight):
            p = projection.emit(graph, remap, calls)
            return graph.call_function(calls.context_linear, (p, remap(bp.input), remap(bp.weight), remap(bp.bias),
                                                              remap(weight), *columns, act_name, out_act))

        inputs = [x, bp.input, bp.weight, weight] + [b for b in (bp.bias, bias) if b is not None]
        return Match(self.op, linear.node, anchor, nodes, inputs, [anchor, linear.node, cat.node, *context.walked],
                     emit, f"{formula} with x's projection {projection.text()} hoisted", site, self.rank, projection)


# In rank order: the first wins a tie. The hoist first (it also shares x's projection across sites),
# then the fusion head (a reading that fuses as much as the back-projection).
PATTERNS: List[Pattern] = [ContextLinearPattern(), FusionHeadPattern(), BackprojConcatPattern()]
for _rank, _pattern in enumerate(PATTERNS):
    _pattern.rank = _rank
