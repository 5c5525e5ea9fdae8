"""Drop-in modules. Parameters are named and laid out as nn.Linear's, so state_dicts are shared
between backends and with the plain-PyTorch modules they replace."""
from __future__ import annotations

import collections
import dis
import functools
import inspect
import math
import operator
import sys
import sysconfig
import types
import weakref
from collections.abc import Iterable, Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules import module as _module_globals  # the hooks registered for every module

from . import ops
from ._dispatch import check_backend_name, implements
from ._validation import ACTIVATIONS, check_activation
from .reference import apply_activation


def _int_arg(value, name: str, minimum: int = 1) -> int:
    """value as an int >= minimum. Integer scalars (numpy's, a one-element integer tensor) are taken;
    a bool or a float is refused, never truncated."""
    try:
        index = None if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool \
            else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if index < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {index}")
    return index


def _int_list(values, name: str, minimum: int = 1) -> List[int]:
    """A non-empty sequence of ints >= minimum, each checked as _int_arg does."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of ints, got {values!r} ({type(values).__name__})")
    values = [_int_arg(v, f"{name}[{j}]", minimum) for j, v in enumerate(values)]
    if not values:
        raise ValueError(f"{name} must hold at least one int, got an empty list")
    return values


class _LinearParams(nn.Module):
    """weight (out, in) and optional bias (out,), initialised exactly as nn.Linear. The subclasses
    check the sizes, under their own argument names."""

    def __init__(self, in_features: int, out_features: int, activation: str, bias: bool,
                 backend: str, device=None, dtype=None):
        super().__init__()
        check_activation(activation)
        check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.numel() == 0:
            return  # no outputs (a context of width 0): nothing to draw, and nn.init warns on empty tensors
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)


class BackProjection(_LinearParams):
    """x~ = cat([x, act(z @ weight.T + bias) over every position of x], -1).

    Parameters as nn.Linear(fused_dim, context_dim). forward(x: (B, *S, Dx), z: (B, fused_dim))
    returns (B, *S, Dx + context_dim). context_dim may be 0 (as nn.Linear's out_features): the
    output is then a copy of x.
    """

    def __init__(self, fused_dim: int, context_dim: int, activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(_int_arg(fused_dim, "fused_dim"), _int_arg(context_dim, "context_dim", 0), activation,
                         bias, backend, device, dtype)

    @property
    def fused_dim(self) -> int:
        return self.in_features

    @property
    def context_dim(self) -> int:
        return self.out_features

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.backproj_concat(x, z, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"fused_dim={self.in_features}, context_dim={self.out_features}, "
                f"activation={self.activation!r}, bias={self.bias is not None}, backend={self.backend!r}")


class FusionHead(_LinearParams):
    """z = act(cat(hs, -1) @ weight.T + bias). Parameters as nn.Linear(sum(in_dims), out_dim)."""

    def __init__(self, in_dims: Sequence[int], out_dim: int, activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        in_dims = _int_list(in_dims, "in_dims")
        super().__init__(sum(in_dims), _int_arg(out_dim, "out_dim"), activation, bias, backend, device, dtype)
        self.in_dims = in_dims

    def forward(self, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(hs, (list, tuple)) and len(hs) != len(self.in_dims):
            raise ValueError(f"FusionHead expects {len(self.in_dims)} inputs (in_dims={self.in_dims}), "
                             f"got {len(hs)}")
        if isinstance(hs, (list, tuple)):
            for j, (h, d) in enumerate(zip(hs, self.in_dims)):
                if isinstance(h, torch.Tensor) and h.dim() == 2 and h.shape[1] != d:
                    raise ValueError(f"FusionHead: hs[{j}] has {h.shape[1]} features "
                                     f"({tuple(h.shape)}), in_dims[{j}] = {d}")
        return ops.fusion_head(hs, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_dims={self.in_dims}, out_dim={self.out_features}, activation={self.activation!r}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class _OpaqueTracer(fx.Tracer):
    """Traces an encoder's own forward: nn.Sequential is looked into, and the modules named in
    `through` (the user's own modules the input goes into first); every other submodule is an
    opaque call (it may be untraceable, and what it does with its input is its business)."""

    # Buffers read by the traced code become get_attr nodes, read live by the tails, as parameters
    # are: one read as a number (float(self.temperature), `if self.step > 0`) fails the trace
    # instead of being kept as the constant it was at planning.
    proxy_buffer_attributes = True

    def __init__(self, through: frozenset = frozenset()):
        super().__init__()
        self.through = through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.Sequential) and module_qualified_name not in self.through

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _TracedValue(node, self)


class _InPlaceOperator(Exception):
    """`h += t` on a traced value: fx would record it out of place (a view of h would miss the write)."""


class _CheckedUnpacking:
    def __iter__(self):
        # fx traces `B, T, _ = x.shape` as three indexings, which on an input of another rank raise
        # IndexError or pass where the forward's own unpacking raises ValueError: check the count.
        count = _unpacked_count(inspect.currentframe().f_back)
        if count is None:
            return self.tracer.iter(self)  # (fx's error: iterating a traced value)
        checked = self.tracer.create_proxy("call_function", _unpack, (self, count), {})
        return (checked[i] for i in range(count))


class _TracedValue(_CheckedUnpacking, fx.Proxy):
    """A proxy on which an in-place operator stops the trace (on a number it stays a number's)."""

    def __getattr__(self, name: str) -> fx.proxy.Attribute:
        return _TracedAttribute(self, name)


class _TracedAttribute(_CheckedUnpacking, fx.proxy.Attribute):
    """x.shape and other attributes of a traced value (a node only once used as a value)."""


def _unpacked_count(frame) -> Optional[int]:
    """n where the frame's current instruction is an unpacking into n names, else None."""
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset >= frame.f_lasti:
            return instruction.argval if instruction.opname == "UNPACK_SEQUENCE" else None
    return None


def _unpack(values, count: int):
    """values, checked as `a, b, c = values` checks them."""
    n = len(values)
    if n < count:
        raise ValueError(f"not enough values to unpack (expected {count}, got {n})")
    if n > count:
        raise ValueError(f"too many values to unpack (expected {count}, got {n})")
    return values


def _refuse_in_place(symbol: str):
    def operator_(self, other):
        raise _InPlaceOperator(symbol)
    return operator_


for _name, _symbol in (("iadd", "+="), ("isub", "-="), ("imul", "*="), ("itruediv", "/="), ("ifloordiv", "//="),
                       ("imod", "%="), ("ipow", "**="), ("imatmul", "@="), ("iand", "&="), ("ior", "|="),
                       ("ixor", "^="), ("ilshift", "<<="), ("irshift", ">>=")):
    setattr(_TracedValue, f"__{_name}__", _refuse_in_place(_symbol))


def _is_users_module(module) -> bool:
    """A module of the user's own class (not torch's), which may hold a Linear to trace to."""
    return isinstance(module, nn.Module) and not type(module).__module__.startswith("torch.")


class _Hoisting:
    """How an encoder runs with its first Linear hoisted: encoder(x~) = tail(act(linear(x~))).

    `tails` maps the encoder's training flag to the rest of the encoder as an fx.Graph, run as a
    function of the live encoder (so .to(), load_state_dict and module swaps below the first layer
    are seen), or is None for a bare nn.Linear encoder. `fused` holds the modules
    the hoisted path replaces, as (parent, name, module): if one is swapped out, the plan no longer
    holds. `skipped`: the modules whose __call__ the hoisted path does not go through (a hook added
    to one later makes the plan not hold). `traced`: what the tails were traced from (see stale()).
    `fresh_first_input`: the tail may write into its input in place, so the first step (whose input
    is the kept projection itself where no activation is fused) gets a copy.
    """

    def __init__(self, encoder: nn.Module, linear: nn.Linear, activation: str,
                 tails: Optional[Dict[bool, fx.Graph]], fused: Dict[str, nn.Module],
                 traced: Sequence[Tuple[nn.Module, Tuple[str, ...], tuple]] = (),
                 fresh_first_input: bool = False,
                 watched: Sequence[Tuple[nn.Module, tuple]] = (), moded: Sequence[nn.Module] = (),
                 slots: Sequence[Tuple[nn.Module, str, bool]] = (),
                 containers: Sequence[Tuple[nn.Module, tuple]] = ()):
        self.encoder = encoder
        self.linear = linear
        self.activation = activation
        self.tails = tails
        self._run = _tail_functions(tails)
        # (parent, name, module, its class): a parametrization registered later changes the class.
        self.fused = tuple((encoder.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module,
                            type(module)) for name, module in fused.items())
        # The modules whose forward the trace went through: (module, its children's names, its plain
        # attributes). A child added or removed, or an attribute reassigned, and the trace is stale.
        self.traced = tuple(traced)
        # A trace may hold the parameters' dtype or device (an HF-style self.dtype): .double(), .to()
        # and the plan is made again.
        self.placed = (linear.weight.dtype, linear.weight.device)
        # (owner, attributes) watched by stale() in owner.__dict__: the traced modules', and `watched`:
        # those of the modules called live by the tails that the traced code may have read
        # (`self.pool.temperature`), of the fused modules, and the globals (owner: the Python module)
        # and class attributes (owner: the class) it reads.
        self._attributes = tuple((m, a) for m, _, a in self.traced if a) + tuple(watched)
        self.skipped = (encoder, *(m for _, _, m, _ in self.fused), *(m for m, _, _ in self.traced))
        self.fresh_first_input = fresh_first_input
        self._stale_when_copied = False
        # The modules whose mode the tails hold: the traced ones, and those whose `.training` the
        # traced code reads (self.drop.training); each must be in the encoder's mode.
        self.moded = (*(m for m, _, _ in self.traced), *moded)
        # (module, name, was None): parameters and buffers registered as None on the traced modules
        # (an optional mask), and those the traced code names on the others (`if self.out.bias is
        # not None`); one set to or from None changes the branch the trace took, and plans again.
        self.slots = tuple((m, k, True) for m, _, _ in self.traced for d in (m._parameters, m._buffers)
                           for k, v in d.items() if v is None) + tuple(slots)
        # (ParameterList or ParameterDict, its parameters): a loop over one is unrolled by the trace.
        self.containers = tuple(containers)

    def holds_for(self, encoder: nn.Module) -> bool:
        """Whether the hoisted path still computes encoder (stale() aside: that one plans again)."""
        return self.why_not_held(encoder) is None

    def why_not_held(self, encoder: nn.Module) -> Optional[str]:
        """What broke the plan for encoder, in words, or None where it holds. Checked every forward:
        dict lookups, not get_submodule's walk."""
        if encoder is not self.encoder:
            return "the encoder was replaced"
        if type(self.linear) is not nn.Linear:
            return "its hoisted Linear is no longer a plain nn.Linear (a parametrization?)"
        if not all(parent._modules.get(name) is module and type(module) is kind
                   for parent, name, module, kind in self.fused):
            return "its hoisted Linear or fused activation was replaced or parametrized"
        if _intercepted(self.skipped):
            return "it, its first layer or a module traced through got hooks or a forward of its own"
        if not all(m.training is encoder.training or type(m) in _CONTAINERS for m in self.moded):  # traced in one mode
            return "a module whose mode its forward reads is in another mode than the encoder"
        return None

    def stale(self) -> bool:
        """The traced structure changed: a child of a traced-through module added, removed or
        replaced, or a value the trace holds as a constant (a plain attribute, a global, a class
        attribute) reassigned or changed in place. Asked only of a plan that holds_for its encoder."""
        weight = self.linear.weight
        if (weight.dtype, weight.device) != self.placed or self._stale_when_copied:
            return True
        for module, children, _ in self.traced:  # (loops, not generators: this runs every forward)
            if tuple(module._modules.items()) != children:
                return True
        for module, name, was_none in self.slots:
            values = module._parameters if name in module._parameters else module._buffers
            if (values.get(name) is None) is not was_none:
                return True
        for module, parameters in self.containers:
            now = module._parameters
            if len(now) != len(parameters) or any(now.get(k) is not v for k, v in parameters):
                return True
        for owner, attributes in self._attributes:
            current = owner.__dict__
            for name, value, contents in attributes:
                if not _same_value(current.get(name, _MISSING), value) or \
                        (contents is not None and _contents(value) != contents):
                    return True
        return False

    # Copies (deepcopy, pickle) keep the Python modules and classes whose values are watched by
    # reference, and the numbers, strings and containers the tails were traced with (compared where
    # the copy runs); a function they hold is read again where the copy is made (a module object, a
    # lambda can be neither copied nor pickled). A plan stale when copied is stale in the copy.
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_run"]  # (made again from the tails)
        state["_stale_when_copied"] = self._stale_when_copied or self.stale()
        state["_attributes"] = tuple(
            (_ModuleRef(o) if isinstance(o, types.ModuleType) else o, tuple(
                (n, v, c) if isinstance(v, _ATOMIC) or c is not None else (n, _REREAD, None) for n, v, c in a))
            if isinstance(o, (types.ModuleType, type)) else (o, a) for o, a in self._attributes)
        return state

    def __setstate__(self, state):
        state["_run"] = _tail_functions(state["tails"])
        # (a plan pickled by an earlier version, which kept the traced modules' None slots apart)
        state.setdefault("slots", tuple((m, k, True) for m, k in state.pop("unset", ())))
        state.setdefault("containers", ())
        attributes = []
        for owner, watched in state["_attributes"]:
            if isinstance(owner, (_ModuleRef, type)):
                owner = owner.module if isinstance(owner, _ModuleRef) else owner
                if owner is None:  # not imported here: what the tails hold cannot be checked
                    state["_stale_when_copied"] = True
                    continue
                watched = tuple((n, owner.__dict__.get(n, _MISSING), None) if v is _REREAD else (n, v, c)
                                for n, v, c in watched)
            attributes.append((owner, watched))
        state["_attributes"] = tuple(attributes)
        self.__dict__.update(state)

    def first_input(self, p: torch.Tensor) -> torch.Tensor:
        h = apply_activation(p, self.activation)
        return h.clone() if h is p and self.fresh_first_input else h

    def tail(self, encoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h if self._run is None else self._run[encoder.training](encoder, h)


class _Missing:
    """No such attribute; one object across copies and pickles of a plan (which watch for it)."""
    __slots__ = ()  # (no contents to watch)

    def __reduce__(self):
        return "_MISSING"  # (pickle and deepcopy: the module's own object)


_MISSING = _Missing()
_REREAD = "<read again where the copy is made>"


class _ModuleRef:
    """A Python module in a copied plan: the module itself in a deepcopy, found by name again
    where the plan is unpickled (None if it is not imported there)."""
    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_module_named, (self.module.__name__,))


def _module_named(name: str) -> _ModuleRef:
    return _ModuleRef(sys.modules.get(name))


# What every nn.Module keeps in its __dict__; the rest are the user's own attributes.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _plain_attributes(module: nn.Module) -> Tuple[Tuple[str, object], ...]:
    return tuple((k, v) for k, v in module.__dict__.items() if k not in _MODULE_INTERNALS)


_ATOMIC = (int, float, bool, str, bytes, complex, type(None))


def _same_value(a, b) -> bool:
    # The same object, or an equal number or string (a copy or a pickle makes new ones of those).
    return a is b or (type(a) is type(b) and isinstance(a, _ATOMIC) and a == b)


class _Same:
    """Equal to another _Same of the very same object (what a container holds beyond plain values)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj


def _contents(value, depth: int = 3):
    """What a container attribute holds (lists, tuples, dicts, sets, plain objects such as a config,
    a few levels deep), comparable with == so that a change made in place shows; None for values
    with no contents to watch (numbers, strings, tensors, modules, functions)."""
    if depth == 0:
        return _Same(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > 64:
        return (type(value), len(value), _Same(value))  # (a vocabulary, a table: not walked every forward)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(v if isinstance(v, _ATOMIC) else _contents(v, depth - 1) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, v if isinstance(v, _ATOMIC) else _contents(v, depth - 1)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(v for v in value if isinstance(v, _ATOMIC)), len(value))
    fields = None if isinstance(value, (_ATOMIC, torch.Tensor, nn.Module, type)) or callable(value) \
        else _fields(value)
    if fields is None:
        return None if depth == 3 else (value if isinstance(value, _ATOMIC) else _Same(value))
    return (type(value), _contents(fields, depth))  # (the fields one level down, as the object)


def _fields(value) -> Optional[dict]:
    """A plain object's attributes (its __dict__, or its __slots__' values), None for other values
    (torch.dtype, enums, builtins' objects)."""
    if type(value).__module__ in ("builtins", "torch") or type(value).__module__.startswith("torch."):
        return None
    if hasattr(value, "__dict__"):
        return vars(value)
    slots = [name for cls in type(value).__mro__ for name in getattr(cls, "__slots__", ())
             if isinstance(name, str) and name not in ("__dict__", "__weakref__")]
    return {name: getattr(value, name, _MISSING) for name in slots} if slots else None


_MUTABLE = (list, dict, set, bytearray)


def _shelve(attributes: Tuple[Tuple[str, object], ...]) -> List[Tuple[str, object, object]]:
    """(name, container, a shallow copy) of the lists, dicts and sets among attributes."""
    return [(k, v, type(v)(v)) for k, v in attributes if type(v) in _MUTABLE]


def _same_contents(a, b) -> bool:
    # By identity: a trace leaves fx proxies behind, whose == is itself traced.
    if len(a) != len(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    if isinstance(a, set):
        return {id(x) for x in a} == {id(y) for y in b}
    return all(x is y for x, y in zip(a, b))


def _changed(shelf) -> List[str]:
    """The names of the shelved containers whose contents differ from their copies."""
    return [k for k, container, copy in shelf if not _same_contents(container, copy)]


def _unshelve(shelf) -> None:
    """Puts the shelved containers' changed contents back, in place (the user holds those objects)."""
    for _, container, copy in shelf:
        if _same_contents(container, copy):
            continue
        if isinstance(container, (list, bytearray)):
            container[:] = copy
        else:
            container.clear()
            container.update(copy)


def _put_back(module: nn.Module, attributes: Tuple[Tuple[str, object], ...], shelf, keep=()) -> None:
    """module's plain attributes as `attributes` (from _plain_attributes) held them, those added
    since removed (but the names in `keep`), and the shelved containers' contents (in place)."""
    _unshelve(shelf)
    for k in [k for k in module.__dict__ if k not in _MODULE_INTERNALS and k not in keep]:
        del module.__dict__[k]
    module.__dict__.update(attributes)


def _watched(attributes: Tuple[Tuple[str, object], ...]) -> Tuple[Tuple[str, object, object], ...]:
    """attributes with the contents of each container among them (None for the rest)."""
    return tuple((k, v, _contents(v)) for k, v in attributes)


def _reassigned(attributes: Tuple[Tuple[str, object], ...], module: nn.Module) -> List[str]:
    """The plain attributes of module added, removed or reassigned since `attributes` was taken."""
    before, after = dict(attributes), dict(_plain_attributes(module))
    return sorted(k for k in before.keys() | after.keys()
                  if not _same_value(before.get(k, _MISSING), after.get(k, _MISSING)))


# The dicts of hooks registered for every module (torch adds to and removes from them in place).
_GLOBAL_HOOKS = tuple(getattr(_module_globals, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if hasattr(_module_globals, name))


def _intercepted(modules: Sequence[nn.Module]) -> bool:
    """Whether a call of one of these modules runs more than its class's forward: hooks of any kind
    (the module's own or every module's), or a forward set on the instance (accelerate's hooks,
    adapters). The hoisted path does not call the modules it replaces or traced through."""
    if any(_GLOBAL_HOOKS):
        return True
    for m in modules:  # (a loop, not a generator: this runs every forward)
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks \
                or "forward" in m.__dict__:
            return True
    return False


# Modules and functions that read their input and return a new tensor (never the input itself, a
# view of it, or the input written in place): a tail that begins with only these needs no copy of
# the kept projection at the first step.
_FRESH_MODULES = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, nn.GELU, nn.SiLU, nn.ReLU,
                  nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish)
_FRESH_FUNCTIONS = frozenset([operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul,
                              torch.matmul, torch.tanh, torch.sigmoid, torch.relu, F.linear, F.layer_norm,
                              F.gelu, F.silu, F.relu])


def _writes_into_input(graph: fx.Graph, encoder: nn.Module) -> bool:
    """Whether the tail may write into its input (or return it, or a view of it, to code that may):
    anything but the known fresh-result readers above."""
    h = next(n for n in graph.nodes if n.op == "placeholder")
    for user in h.users:
        if user.op == "call_module":
            module = encoder.get_submodule(user.target)
            if type(module) in _FRESH_MODULES and not getattr(module, "inplace", False):
                continue
        elif user.op == "call_function" and user.target in _FRESH_FUNCTIONS and not user.kwargs.get("inplace"):
            continue
        return True
    return False


# The activation modules a hoisted Linear's epilogue takes (exact types: a subclass may differ).
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _epilogue_of(node: fx.Node, source: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The name of one of our activations if node applies it to source alone, else None."""
    from .convert.patterns import as_activation  # the one list of activation functions and methods

    if node.op == "call_module":
        module = modules.get(node.target)
        if node.args != (source,) or node.kwargs:
            return None
        if type(module) is nn.GELU:
            return "gelu" if module.approximate == "none" else None
        return _ACTIVATION_MODULES.get(type(module))
    found = as_activation(node)
    if found is None or found[1] is not source or found[0] not in ACTIVATIONS:
        return None
    return found[0]


# What a forward may read of its input besides handing it to the first Linear: a hoisted tail
# answers these from that Linear's output h, whose leading dims (and rank, device) are the input's
# and whose input width is the Linear's in_features (`B, T, _ = x.shape`; `self.pos[:x.size(1)]`).
_SHAPE_ATTRIBUTES = frozenset(["shape", "ndim", "device"])


def _reads_shape_only(node: fx.Node, x: fx.Node) -> bool:
    """node is x.shape, x.ndim, x.device, x.size(...) or x.dim() (x nowhere else in its arguments)."""
    if node.op == "call_function" and node.target is getattr and not node.kwargs:
        return len(node.args) == 2 and node.args[0] is x and node.args[1] in _SHAPE_ATTRIBUTES
    if node.op == "call_method" and node.target in ("size", "dim") and node.args and node.args[0] is x:
        return x not in node.args[1:] and x not in node.kwargs.values()
    return False


def _input_size(h: torch.Tensor, in_features: int, *args, **kwargs):
    """x.size(...) of the encoder input x, from its first Linear's output h: torch checks the
    arguments on h (the same rank, so the same errors); x's last dim is in_features."""
    size = h.size(*args, **kwargs)
    if isinstance(size, torch.Size):
        return torch.Size((*size[:-1], in_features))
    dim = operator.index(args[0] if args else kwargs["dim"])
    return in_features if dim % h.dim() == h.dim() - 1 else size


def _shape_read_in_tail(tail: fx.Graph, node: fx.Node, h: fx.Node, in_features: int, env) -> fx.Node:
    """node (a _reads_shape_only of the input) as the tail computes it from h."""
    args = fx.node.map_arg(node.args[1:], lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_function":  # getattr
        if node.args[1] == "shape":
            return tail.call_function(_input_size, (h, in_features))
        return tail.call_function(getattr, (h, node.args[1]))
    if node.target == "dim":
        return tail.call_method("dim", (h,))
    return tail.call_function(_input_size, (h, in_features, *args), kwargs)


def _plan_tail(encoder: nn.Module, context_dim: int, through: frozenset):
    """(linear, activation, {name: module} of the modules the hoisted path replaces, graph that
    takes the activated output of the linear), the path of a module of the user's own to trace
    into (the input goes there first), or a reason string."""

    try:
        graph = _OpaqueTracer(through).trace(encoder)
    except _InPlaceOperator as exc:
        return f"its forward assigns in place ({exc}: a trace records it out of place)"
    except fx.proxy.TraceError as exc:
        if "control flow" in str(exc):
            return "torch.fx cannot trace it (TraceError: an if or a loop on a traced value, e.g. on a shape)"
        return "torch.fx cannot trace it (TraceError)"
    except Exception as exc:  # fx raises many kinds
        return f"torch.fx cannot trace it ({type(exc).__name__})"
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"its forward takes {len(inputs)} arguments"
    shape_reads = {n for n in inputs[0].users if _reads_shape_only(n, inputs[0])}
    users = [n for n in inputs[0].users if n not in shape_reads]
    modules = dict(encoder.named_modules())
    first = users[0] if len(users) == 1 else None
    if first is not None and first.op == "call_module" and first.args == (inputs[0],) and not first.kwargs \
            and _is_users_module(modules.get(first.target)) and first.target not in through:
        return _Into(first.target)
    if first is None or first.op != "call_module" or type(modules.get(first.target)) is not nn.Linear \
            or first.args != (inputs[0],) or first.kwargs:
        module = modules.get(first.target) if first is not None and first.op == "call_module" else None
        if isinstance(module, LazyModuleMixin):
            return (f"its first layer is a {type(module).__name__}, not initialised yet (set hoist = True "
                    "after the first forward to plan it again)")
        if isinstance(module, nn.Linear) and first.args == (inputs[0],) and not first.kwargs:
            return (f"its first layer is a {type(module).__name__}, not a plain nn.Linear (a subclass or "
                    f"a parametrization such as weight_norm may compute otherwise)")
        return "its input goes to something other than one nn.Linear"
    linear = modules[first.target]
    if linear.in_features <= context_dim:
        return f"its first nn.Linear takes {linear.in_features} <= context_dims features"
    fused, activation = first, "none"
    follower = next(iter(first.users)) if len(first.users) == 1 else None
    epilogue = _epilogue_of(follower, first, modules) if follower is not None else None
    if epilogue is not None:
        fused, activation = follower, epilogue
    # Hooks of the modules the hoisted path does not call (the first layer, what was traced through).
    replaced = {n.target: modules[n.target] for n in (first, fused) if n.op == "call_module"}
    if _intercepted([encoder, *replaced.values(), *(m for _, m in _traced_modules(encoder, through))]):
        return "it, a module traced through in it, or its first layer has hooks or a forward of its own"
    # The rest: every node after the fused one, reading the fused node's output from a placeholder;
    # module and attribute paths are the encoder's (its tail function runs on the live encoder).
    tail = fx.Graph()
    h = tail.placeholder("h")
    env = {fused: h}
    for node in graph.nodes:
        if node.op == "placeholder" or node is first or node is fused:
            continue
        if node in shape_reads:
            env[node] = _shape_read_in_tail(tail, node, h, linear.in_features, env)
            continue
        env[node] = tail.node_copy(node, lambda n: env[n])
    return linear, activation, replaced, tail


# What a trace cannot replay: a with-block or a decorator (torch.no_grad, torch.autocast: fx records
# neither), random numbers drawn apart from the input (Python's, numpy's, torch's: drawn once, at trace
# time), torch.utils.checkpoint (the trace inlines it: the memory it saves would be spent).
_WITH_OPS = frozenset(["SETUP_WITH", "BEFORE_WITH", "SETUP_ASYNC_WITH", "BEFORE_ASYNC_WITH", "LOAD_SPECIAL"])
_DRAWS = frozenset(["random", "rand", "randn", "randint", "randperm", "bernoulli", "bernoulli_", "multinomial",
                    "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_",
                    "random_", "poisson",
                    # Python's random and numpy's generators (`from random import uniform`, self.rng.uniform)
                    "uniform", "gauss", "normalvariate", "choice", "choices", "shuffle", "sample", "randrange",
                    "integers", "standard_normal", "random_sample", "permutation", "binomial", "exponential"])
# Methods that change a list, dict or set in place.
_MUTATORS = frozenset(["append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add",
                       "discard", "remove", "appendleft", "extendleft", "__setitem__", "__delitem__"])


_TYPE_TESTS = frozenset(["isinstance", "is_tensor"])
# Process-wide state a forward may branch on: a trace holds what it was at planning.
_GLOBAL_STATE = frozenset(["is_grad_enabled", "is_inference_mode_enabled", "are_deterministic_algorithms_enabled",
                           "is_deterministic_algorithms_warn_only_enabled", "get_default_dtype",
                           "is_autocast_enabled", "get_autocast_dtype", "is_autocast_cpu_enabled",
                           "get_autocast_gpu_dtype", "environ", "getenv"])


# Where installed libraries and the standard library live: code there is not the user's own.
_LIBRARY_PATHS = tuple(sorted({p for k, p in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib",
                                                                                      "purelib", "platlib")}))


def _users_code(value) -> bool:
    """A Python module, or a function, of the user's own (not torch's, a library's, the stdlib's)."""
    module = value if isinstance(value, types.ModuleType) else sys.modules.get(getattr(value, "__module__", None))
    if module is None or module.__name__.partition(".")[0] in ("torch", "pf_kernels"):
        return False
    path = getattr(module, "__file__", None)
    if path is None:  # a module made in code (a settings namespace), or one built into Python
        return module.__name__ not in sys.builtin_module_names
    return not path.startswith(_LIBRARY_PATHS)


def _callees(name: str, classes, namespace: dict) -> list:
    """The functions of the user's own that code naming `name` may call: a method, property getter,
    classmethod or staticmethod of one of `classes`, or a module-level function. (Not `forward`:
    the forwards a trace goes through are read as such; other modules are called live.)"""
    if name in ("forward", "__call__"):
        return []
    found = []
    for cls in classes:
        attr = inspect.getattr_static(cls, name, None)
        if isinstance(attr, property):
            attr = attr.fget
        elif isinstance(attr, (classmethod, staticmethod)):
            attr = attr.__func__
        found.append(attr)
    found.append(namespace.get(name))
    return [c for c in found if isinstance(c, types.FunctionType) and not c.__module__.startswith("torch")
            and (_users_code(c) or c in (getattr(cls, name, None) for cls in classes))]


_LOADS = ("LOAD_ATTR", "LOAD_METHOD")
_NAME_LOADS = ("LOAD_GLOBAL", "LOAD_NAME", *_LOADS)  # a name read, global or attribute


def _read_forwards(modules: Sequence[nn.Module], encoder: nn.Module) -> Tuple[Optional[str], frozenset, list]:
    """(why the traced forwards of these modules cannot be replayed from their trace, or None; the
    names their code reads (and, as "<name>.training", the attributes whose mode it reads:
    self.drop.training); (Python module, name) of the module-level values it reads). Reads the
    forwards of the user's own classes, the functions nested in them and the functions of the
    user's own they call (methods of the encoder's modules' classes, module-level functions,
    functions of the user's own modules imported whole: `utils.scale(h)`), not what they reach
    otherwise."""
    classes = {type(m) for m in encoder.modules() if _is_users_module(m)}
    names, seen, read_globals = set(), set(), []
    # Each module's forward, and its base classes' where the one before calls super() (not torch's).
    todo = []
    for m in modules:
        for cls in type(m).__mro__ if _is_users_module(m) else ():
            forward = cls.__dict__.get("forward")
            if forward is None:
                continue
            if cls.__module__.startswith("torch"):
                break
            todo.append((forward, cls.__name__))
            if "super" not in getattr(getattr(forward, "__code__", None), "co_names", ()):
                break
    while todo:
        function, owner = todo.pop()
        if hasattr(function, "__wrapped__"):
            return f"{owner}.{function.__name__} is decorated (no_grad, autocast: a trace drops what it does)", names, []
        code = getattr(function, "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        for cell in getattr(function, "__closure__", None) or ():  # a decorator's wrapped function
            try:
                inner = cell.cell_contents
            except ValueError:  # (an empty cell)
                continue
            if isinstance(inner, types.FunctionType) and _users_code(inner):
                todo.append((inner, owner))
        namespace = getattr(function, "__globals__", {})
        home = sys.modules.get(namespace.get("__name__"))
        home = home if getattr(home, "__dict__", None) is namespace else None
        codes = [code]
        while codes:
            code = codes.pop()
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
            where = f"{owner}.{code.co_name}"
            previous, window = None, ()
            for i in dis.get_instructions(code):
                if i.opname in _LOADS and previous is not None:
                    if i.argval == "training" and previous.opname in _LOADS:
                        names.add(f"{previous.argval}.training")
                    elif i.argval == "training":  # self.training, a variable's (a loop's layer), or by an index
                        by_name = previous.opname.startswith("LOAD_FAST") or previous.opname == "LOAD_DEREF"
                        names.add(f"{previous.argval}.training" if by_name else "?.training")
                    if i.argval == "forward" and previous.opname in _LOADS:
                        return (f"{where} calls a module's forward directly ({previous.argval}.forward: the trace "
                                f"goes into it, and what it reads is not watched)"), names, []
                    elif previous.opname == "LOAD_GLOBAL" and home is not None:
                        whole = home.__dict__.get(previous.argval)
                        if isinstance(whole, types.ModuleType) and _users_code(whole):
                            called = getattr(whole, i.argval, None)
                            if isinstance(called, types.FunctionType):
                                todo.append((called, whole.__name__))
                previous = i
                if i.opname in _WITH_OPS:
                    return f"{where} has a with-block (no_grad, autocast: a trace drops it)", names, []
                # A trace passes proxies, not tensors: the branch taken at planning would be kept.
                if i.opname in _NAME_LOADS and i.argval in _TYPE_TESTS:
                    return f"{where} tests types ({i.argval}: a trace sees proxies, not tensors)", names, []
                if i.opname in _NAME_LOADS and i.argval in _GLOBAL_STATE:
                    return f"{where} reads global state ({i.argval}: a trace holds its value)", names, []
                # A write a trace would make once, at planning, and its tail never (read before any
                # trace runs: the traces' own writes into objects other than modules stay).
                if i.opname in ("STORE_ATTR", "STORE_GLOBAL", "STORE_NAME"):
                    return f"{where} sets attributes ({i.argval})", names, []
                # A global list, dict or set written (a log, stats): the trace would write proxies into it.
                container = window[-1] if window and i.opname in _LOADS and i.argval in _MUTATORS else \
                    window[0] if i.opname in ("STORE_SUBSCR", "DELETE_SUBSCR") and len(window) == 2 else None
                if container is not None and container.opname in ("LOAD_GLOBAL", "LOAD_NAME") and \
                        isinstance(namespace.get(container.argval), (list, dict, set, collections.deque)):
                    return f"{where} changes a global container ({container.argval})", names, []
                window = (*window[-1:], i)
                if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and home is not None:
                    read_globals.append((home, i.argval))
            drawn = _DRAWS.intersection(code.co_names)
            if drawn:
                return f"{where} draws random numbers ({min(drawn)}: a trace draws them once)", names, []
            if "checkpoint" in code.co_names:
                return f"{where} uses checkpoint (a trace inlines it)", names, []
            names.update(code.co_names)
            for name in code.co_names:
                todo.extend((c, getattr(c, "__qualname__", name).rpartition(".")[0] or owner)
                            for c in _callees(name, classes, namespace))
    for m in modules:  # lambdas, partials, callable objects held by the instance: their code is not read
        for name in names:
            if _unread_callable(m.__dict__.get(name)):
                return (f"{type(m).__name__}.{name} is a function of your own the instance holds (a lambda, a "
                        f"partial, a callable object): its code is not read, and a trace holds what it read"), \
                    names, []
    return None, frozenset(names), read_globals


def _unread_callable(held) -> bool:
    """A callable of the user's own held as a plain attribute (torch.relu, F.gelu are not)."""
    if held is None or isinstance(held, (nn.Module, torch.Tensor, type)) or not callable(held):
        return False
    if isinstance(held, functools.partial):
        return _unread_callable(held.func)
    if isinstance(held, (types.FunctionType, types.MethodType)):
        return _users_code(held)
    return not isinstance(held, types.BuiltinFunctionType) and _users_code(type(held))


def _held_constants(encoder: nn.Module, read: frozenset, read_globals: list) -> list:
    """(owner, watched attributes) of the values a trace holds as constants beyond the modules' own
    attributes: the module-level globals the traced code reads (a SCALE = 1.0, a config dict: the
    owner is the Python module) and the class attributes of the user's modules it names (`scale =
    1.0` in the class body: watched along the class's MRO and as an instance attribute that would
    shadow it). stale() reads owner.__dict__."""
    held = {}
    for owner, name in read_globals:
        value = owner.__dict__.get(name, _MISSING)
        if isinstance(value, (types.ModuleType, type)):
            # A namespace (torch, a settings module, a config class): its attributes the code names.
            if _users_code(value):
                for attribute in read & value.__dict__.keys():  # `settings.SCALE`, `CFG.scale`
                    held.setdefault(id(value), (value, {}))[1][attribute] = value.__dict__[attribute]
            continue
        held.setdefault(id(owner), (owner, {}))[1][name] = value  # (by identity: a function rebound too)
    for m in encoder.modules():
        if not _is_users_module(m):
            continue
        for name in read:
            if name in m.__dict__ or name in m._parameters or name in m._buffers or name in m._modules:
                continue
            owners = []
            for cls in type(m).__mro__:  # the user's classes (torch's own attributes are not config)
                if not _users_code(cls):
                    break
                owners.append(cls)
                if name in cls.__dict__:
                    break
            else:
                continue
            if not owners or name not in owners[-1].__dict__:
                continue
            # Any value, a method too (by identity: one patched on the class, or set on the instance).
            for owner in (m, *owners):
                held.setdefault(id(owner), (owner, {}))[1][name] = owner.__dict__.get(name, _MISSING)
    return [(owner, _watched(tuple(values.items()))) for owner, values in held.values()]


class _Into(str):
    """The path of the user's own module that the encoder's input goes into first: trace into it."""


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _traced_modules(encoder: nn.Module, through: frozenset) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every module the trace goes through or unrolls: the encoder, its
    containers (Sequential, ModuleList, ModuleDict) and the modules of `through`."""
    return [(path, m) for path, m in encoder.named_modules()
            if path == "" or isinstance(m, _CONTAINERS) or path in through]


# One function per distinct tail code (and the globals it names), shared by every model whose
# encoders trace alike: torch.compile guards on the function, and with one per model (as a
# GraphModule each was) it compiled every model anew (the ninth raised under fullgraph=True). Held by the
# plans using it (an encoder planned again, a value it reads annealed, drops the old one).
_TAIL_FUNCTIONS: "weakref.WeakValueDictionary[tuple, Callable]" = weakref.WeakValueDictionary()


def _tail_functions(tails: Optional[Dict[bool, fx.Graph]]) -> Optional[Dict[bool, Callable]]:
    """{mode: tail(encoder, h)}: each tail graph as a plain function of the live encoder."""
    if tails is None:
        return None
    functions = {}
    for mode, graph in tails.items():
        code = graph.python_code(root_module="self")
        key = (code.src, tuple(sorted((name, id(value)) for name, value in code.globals.items())))
        function = _TAIL_FUNCTIONS.get(key)
        if function is None:
            namespace = dict(code.globals)
            exec(compile(code.src, "<pf_kernels hoisted tail>", "exec"), namespace)
            function = _TAIL_FUNCTIONS[key] = namespace["forward"]
        functions[mode] = function
    return functions


def plan_hoisting(encoder: nn.Module, context_dim: int) -> Union[_Hoisting, str]:
    """How to hoist encoder's first Linear out of the refinement loop, or why it cannot be.

    Detected: a bare nn.Linear; any module whose forward torch.fx can trace (nn.Sequential looked
    into, nested or not; every other submodule an opaque call, except a module of the user's own
    that the input goes into first, which is traced into too) in which the input goes to exactly
    one nn.Linear and nowhere else (but reads of its shape), e.g. an nn.Sequential that begins with one, a module whose
    forward starts with `self.fc(x)`, or one that starts with `self.mlp(x)` where mlp's own forward
    starts with its Linear; one of our activations right after that Linear is fused.
    """
    if type(encoder) is nn.Linear:
        if _intercepted([encoder]):
            return "it has hooks or a forward of its own"
        if encoder.in_features <= context_dim:
            return f"it takes {encoder.in_features} <= context_dims features"
        return _Hoisting(encoder, encoder, "none", None, {})
    # The code is read before any trace runs it (a trace's writes into a config object would stay).
    why = _read_forwards([encoder], encoder)[0]
    if why is not None:
        return why
    tails = {}
    plan = None
    through = frozenset()
    was_training = encoder.training
    modes = {m: m.training for m in encoder.modules()}
    # Every module's plain attributes, put back after the traces (a forward that sets one ran with proxies).
    attributes = {m: _plain_attributes(m) for m in encoder.modules()}
    # ... and the contents of the lists, dicts and sets among them (a forward that appends to one).
    shelved = {m: _shelve(attrs) for m, attrs in attributes.items()}
    try:
        for mode in (was_training, not was_training):  # fx records `self.training` as a constant
            encoder.train(mode)
            planned = _plan_tail(encoder, context_dim, through)
            while isinstance(planned, _Into) and len(through) < 4:
                why = _read_forwards([encoder.get_submodule(planned)], encoder)[0]
                if why is not None:
                    return why
                through |= {planned}
                planned = _plan_tail(encoder, context_dim, through)
            if isinstance(planned, str):
                return planned if not isinstance(planned, _Into) else \
                    "its input goes through more than 4 nested modules of its own before a Linear"
            written = [f"{path + '.' if path else ''}{k}" for path, m in _traced_modules(encoder, through)
                       for k in _reassigned(attributes[m], m) + _changed(shelved[m])]
            if written and all(k.rpartition(".")[2].startswith("_tensor_constant") for k in written):
                return "its forward makes tensors of constants (torch.linspace, torch.tensor: a trace keeps them)"
            if written:
                # The trace ran the forward once with proxies: what it stored is not what a real call
                # would, and the tail would never store it again.
                return f"its forward sets attributes ({', '.join(written)})"
            if plan is not None and planned[:3] != plan[:3]:
                return "its first layer differs between training and evaluation"
            plan = planned
            tails[mode] = planned[3]
    finally:
        if encoder.training != was_training:
            encoder.train(was_training)  # the user's own train(), if any, undoes what its other call did
        for m, saved in attributes.items():
            m.training = modes[m]
            _put_back(m, saved, shelved[m])
    linear, activation, replaced = plan[:3]
    traced = _traced_modules(encoder, through)
    why, read, read_globals = _read_forwards([m for _, m in traced], encoder)  # (once: the code does not change with the mode)
    if why is not None:
        return why
    # A traced-through module swapped out changes the structure the tails were traced from.
    replaced = {**{path: m for path, m in traced if path}, **replaced}
    fresh = activation == "none" and any(_writes_into_input(tail, encoder) for tail in tails.values())
    traced_ids = {id(m) for _, m in traced}
    # Watched besides: every plain attribute of the user's other modules and of the fused ones (a GELU's
    # approximate), those of torch's modules that the traced code names (`self.attn_drop.p`), and the
    # globals and class attributes it reads.
    fused_ids = {id(m) for m in plan[2].values()}
    watched = [(m, _watched(attrs)) for m, attrs in (
        (m, attributes[m] if _is_users_module(m) or id(m) in fused_ids
         else tuple((k, v) for k, v in attributes[m] if k in read))
        for m in encoder.modules() if id(m) not in traced_ids) if attrs]
    watched += _held_constants(encoder, read, read_globals)
    moded = [child for _, m in traced for name, child in m._modules.items()
             if f"{name}.training" in read and child is not None and id(child) not in traced_ids]
    modes_read = {n[:-len(".training")] for n in read if n.endswith(".training")}
    if modes_read - {"self"} - {name for _, m in traced for name in m._modules}:
        # a mode read through a variable or an index (`for layer in self.layers: if layer.training`)
        moded = [m for m in encoder.modules() if id(m) not in traced_ids]
    slots = [(m, k, v is None) for m in encoder.modules() if id(m) not in traced_ids
             for values in (m._parameters, m._buffers) for k, v in values.items() if k in read]
    containers = [(m, tuple(m._parameters.items())) for m in encoder.modules()
                  if isinstance(m, (nn.ParameterList, nn.ParameterDict))]
    return _Hoisting(encoder, linear, activation, tails, replaced,
                     [(m, tuple(m._modules.items()), _watched(attributes[m])) for _, m in traced], fresh, watched,
                     moded, slots, containers)


def _plan_stale_after_load(module: "ProgressiveFusion", incompatible_keys) -> None:
    module._plan_stale()


class ProgressiveFusion(nn.Module):
    """Progressive Fusion (Shankar et al., arXiv 2209.00302) around any K encoders.

    encoders[j] takes modality j's input with context_dims[j] extra features (last dim) and returns
    (B, encoder_dims[j]). The context starts at zero; each of the `iterations` steps runs the
    encoders and fuses, and every step but the last back-projects the fused vector z into each
    modality's input (broadcast over its positions) for the next. forward(xs) returns z_R, or the
    list [z_1..z_R] with return_all_steps=True. context_dims[j] = 0 gives modality j no
    back-projection: its encoder reads its input unchanged at every step, while z still fuses its
    output (an input of any dtype: token ids for an nn.Embedding too).

    Hoisting (hoist=True, the default): where encoder j begins with an nn.Linear over its input
    (see plan_hoisting for the forms detected), W x~ + b = (W_x x + b) + W_c c, so W_x x + b is
    computed once per forward and each later step adds only the broadcast context term
    (pf_kernels.context_linear, fused with the activation that follows the Linear; with every
    encoder hoisted, the head and every context term are one pf_kernels.refine_step_hoisted). Same
    parameters and state_dict; the same outputs up to rounding. `hoisted` lists the encoders
    hoisted, `hoisting_notes` why the others were not. The plan is made at construction (and when
    `hoist` is set); an encoder whose hoisted Linear or fused activation is replaced later, or that
    gets hooks (forward or backward) or a forward set on the instance, runs unhoisted until
    `hoist = True` plans again (so does one whose first Linear gets a parametrization); one whose
    traced structure changes (a Sequential or ModuleList grown, a submodule replaced) or whose
    modules' plain attributes (a temperature, a config: the trace holds their values; also a torch
    module's attribute the forward names, the fused activation's, the globals and class attributes
    the forward reads, and the parameters' dtype or device) change is planned again at the next
    forward. An encoder whose traced forward (or a base class's forward it calls through super(),
    or a method, property or function of the user's own that it calls) sets attributes or globals,
    appends to a list of its own, has a with-block or a decorator (no_grad, autocast), draws random
    numbers, checkpoints, assigns in place (`h += t`), tests types (isinstance), reads torch's global
    state or os.environ, or reads a buffer as a number is not hoisted: a trace cannot replay those.
    """

    def __init__(self, encoders: Sequence[nn.Module], encoder_dims: Sequence[int], fused_dim: int,
                 context_dims: Union[int, Sequence[int]], iterations: int = 2,
                 fusion_activation: str = "relu", context_activation: str = "relu", bias: bool = True,
                 backend: str = "auto", device=None, dtype=None, hoist: bool = True):
        super().__init__()
        # A dict's iteration gives its keys; a lone module (but a container of them) is no list.
        if isinstance(encoders, (Mapping, torch.Tensor)) or not isinstance(encoders, Iterable) or \
                (isinstance(encoders, nn.Module) and not isinstance(encoders, (nn.ModuleList, nn.Sequential))):
            raise TypeError(f"encoders must be a list (or nn.ModuleList) of modules, one per modality in the "
                            f"order of xs, got {type(encoders).__name__}")
        encoders = list(encoders)
        if not encoders:
            raise ValueError("encoders must hold at least one module")
        for j, encoder in enumerate(encoders):
            if not isinstance(encoder, nn.Module):
                raise TypeError(f"encoders[{j}] must be an nn.Module, got {type(encoder).__name__}")
        encoder_dims = _int_list(encoder_dims, "encoder_dims")
        if len(encoder_dims) != len(encoders):
            raise ValueError(f"encoder_dims has {len(encoder_dims)} entries for {len(encoders)} encoders")
        fused_dim = _int_arg(fused_dim, "fused_dim")
        if isinstance(context_dims, Iterable) and not isinstance(context_dims, (str, bytes)):
            context_dims = _int_list(context_dims, "context_dims", 0)
        else:  # one width for every modality
            context_dims = [_int_arg(context_dims, "context_dims", 0)] * len(encoders)
        if len(context_dims) != len(encoders):
            raise ValueError(f"context_dims has {len(context_dims)} entries for {len(encoders)} encoders")
        self.iterations = iterations
        self.context_dims = context_dims
        self.encoders = nn.ModuleList(encoders)
        self.fusion_head = FusionHead(encoder_dims, fused_dim, fusion_activation, bias, backend,
                                      device, dtype)
        self.back_projections = nn.ModuleList(
            BackProjection(fused_dim, c, context_activation, bias, backend, device, dtype)
            for c in context_dims)
        self.hoist = hoist
        self.register_load_state_dict_post_hook(_plan_stale_after_load)

    def _apply(self, *args, **kwargs):
        module = super()._apply(*args, **kwargs)
        self._plan_stale()  # .to(), .cuda(), .half(), to_empty()
        return module

    def _plan_stale(self) -> None:
        """Plans again every encoder whose plan holds but is stale (the weights moved to another dtype
        or device, or were loaded with assign=True): now, not at a forward that torch.compile traces,
        where a stale plan runs unhoisted (a model moved, then compiled, ran unhoisted for good)."""
        if "_hoisting" not in self.__dict__ or torch.compiler.is_compiling():
            return
        stale = [j for j, (plan, encoder) in enumerate(zip(self._hoisting, self.encoders))
                 if plan is not None and plan.holds_for(encoder) and plan.stale()]
        if stale:
            self._plan(stale)

    @property
    def iterations(self) -> int:
        return self._iterations

    @iterations.setter
    def iterations(self, value: int) -> None:
        self._iterations = _int_arg(value, "iterations")

    @property
    def hoist(self) -> bool:
        return self._hoist

    @hoist.setter
    def hoist(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"hoist must be a bool, got {type(value).__name__}")
        self._hoist = value
        self._plan(range(len(self.encoders)))

    def _plan(self, which) -> None:
        """Plans (again) the encoders numbered in `which`; the others keep theirs."""
        plans = list(getattr(self, "_plans", [None] * len(self.encoders)))
        for j in which:
            plans[j] = plan_hoisting(self.encoders[j], self.context_dims[j]) if self._hoist else "hoist=False"
        # Plain attributes, not submodules: the plans reference the encoders' own modules.
        self._plans = tuple(plans)
        self._hoisting: Tuple[Optional[_Hoisting], ...] = tuple(p if isinstance(p, _Hoisting) else None for p in plans)

    def _status(self, j: int) -> Tuple[bool, str]:
        """Whether encoder j runs hoisted now, and its note; a stale plan is made again first, as the
        next forward would."""
        plan, encoder = self._plans[j], self.encoders[j]
        if not isinstance(plan, _Hoisting):
            return False, f"not hoisted: {plan}"
        if not implements(self.backend, "context_linear"):
            return False, f"not hoisted: backend {self.backend!r} has no context_linear"
        broken = plan.why_not_held(encoder)
        if broken is not None:
            return False, f"not hoisted: since it was planned, {broken} (set hoist = True to plan again)"
        if _intercepted([self.back_projections[j]]):
            return False, ("not hoisted while its back-projection has hooks or a forward of its own (it is "
                           "called as a module, and the encoder reads the concat it returns)")
        if plan.stale():
            if torch.compiler.is_compiling():
                return False, "not hoisted under torch.compile: its plan is stale (planned again outside)"
            self._plan([j])  # as the next forward would
            plan = self._plans[j]
            if not isinstance(plan, _Hoisting):
                return False, f"not hoisted: {plan}"
        return True, f"hoisted, {plan.activation} fused"

    @property
    def hoisting_notes(self) -> Tuple[str, ...]:
        """Per encoder, whether it runs hoisted now, and if not, why."""
        return tuple(f"encoder {j}: {self._status(j)[1]}" for j in range(len(self.encoders)))

    @property
    def hoisted(self) -> Tuple[int, ...]:
        """The encoders whose first Linear runs once per forward (empty where the backend has no
        context_linear)."""
        return tuple(j for j in range(len(self.encoders)) if self._status(j)[0])

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, context_dims={self.context_dims}, hoisted={self.hoisted}"

    @property
    def backend(self) -> str:
        return self.fusion_head.backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend_name(value)
        for module in (self.fusion_head, *self.back_projections):
            module.backend = value

    def _check_inputs(self, xs) -> List[torch.Tensor]:
        if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs must be a list or tuple of tensors, one per modality, got {type(xs).__name__}")
        if len(xs) != len(self.encoders):
            raise ValueError(f"xs has {len(xs)} tensors for {len(self.encoders)} encoders")
        for j, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"xs[{j}] must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise ValueError(f"xs[{j}] must be (B, *positions, D) with at least 2 dims, "
                                 f"got shape {tuple(x.shape)}")
            if x.shape[0] != xs[0].shape[0]:
                raise ValueError(f"xs[{j}] has batch size {x.shape[0]} ({tuple(x.shape)}) but xs[0] has "
                                 f"{xs[0].shape[0]} ({tuple(xs[0].shape)})")
            weight = self.back_projections[j].weight
            if self.context_dims[j] and x.device != weight.device:  # the context is concatenated to x
                raise ValueError(f"xs[{j}] is on {x.device} but the model's parameters are on {weight.device}: "
                                 f"move the inputs or the model (model.to(...))")
            # The back-projection concatenates to x in the model's dtype (autocast casts both).
            # A modality without context takes anything its encoder takes (token ids, another dtype).
            if not self.context_dims[j]:
                continue
            dtype = weight.dtype
            if not x.is_floating_point():
                raise TypeError(f"xs[{j}] has dtype {x.dtype}, but context_dims[{j}] = {self.context_dims[j]} "
                                f"context features are concatenated to it, which needs a floating input "
                                f"(set context_dims[{j}] = 0 for an input such as token ids)")
            if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"xs[{j}] has dtype {x.dtype} but the model's parameters are {dtype}: pass "
                                f"inputs in the parameters' dtype (or run under torch.autocast)")
        return list(xs)

    def _hoisting_for(self, xs: List[torch.Tensor]) -> Tuple[Optional[_Hoisting], ...]:
        if not any(self._hoisting) or not implements(self.backend, "context_linear"):
            return (None,) * len(xs)
        # A plan whose modules were swapped out (or parametrized) no longer holds: that encoder runs
        # unhoisted. One that holds but is stale (its traced structure, or a value the trace holds,
        # changed) is traced again.
        holds = [plan is not None and plan.holds_for(encoder) for plan, encoder in zip(self._hoisting, self.encoders)]
        stale = [held and plan.stale() for plan, held in zip(self._hoisting, holds)]
        if any(stale) and not torch.compiler.is_compiling():
            self._plan([j for j, old in enumerate(stale) if old])
            holds = [plan is not None and plan.holds_for(encoder) for plan, encoder in zip(self._hoisting, self.encoders)]
            stale = [False] * len(stale)  # (fresh plans; under torch.compile a stale one runs unhoisted)
        plans = tuple(plan if held and not old else None for plan, held, old in zip(self._hoisting, holds, stale))
        # A back-projection with hooks (or a forward of its own) is called as a module: its encoder
        # reads the concat it returns (the hoisted path would not call it).
        if any(plans) and _intercepted(self.back_projections):
            plans = tuple(None if plan is not None and _intercepted([bp]) else plan
                          for plan, bp in zip(plans, self.back_projections))
        for j, (plan, x, c) in enumerate(zip(plans, xs, self.context_dims)):
            if plan is not None and x.shape[-1] + c != plan.linear.in_features:
                raise ValueError(f"ProgressiveFusion: xs[{j}] has {x.shape[-1]} features and context_dims[{j}] = {c}, "
                                 f"but the first Linear of encoders[{j}] takes {plan.linear.in_features} "
                                 f"(xs[{j}] of shape {tuple(x.shape)})")
        return plans

    def forward(self, xs: Sequence[torch.Tensor], return_all_steps: bool = False):
        xs = self._check_inputs(xs)
        hoisting = self._hoisting_for(xs)
        # Step 1 sees a zero context: a hoisted encoder's first layer is x W_x^T + b (kept for the
        # later steps, with W_c), the others read [x, 0].
        projections: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        inputs = []
        for j, (x, plan, c) in enumerate(zip(xs, hoisting, self.context_dims)):
            if plan is None:
                inputs.append(x if self._read_as_is(j, x) else torch.cat([x, x.new_zeros(*x.shape[:-1], c)], dim=-1))
                continue
            # One split, not two slices: one backward node (a cat) instead of two zero-filled
            # slice_backwards and their sum.
            x_weight, context_weight = plan.linear.weight.split([x.shape[-1], c], dim=1)
            if not torch.compiler.is_compiling() and x.is_inference() and x_weight.requires_grad \
                    and torch.is_grad_enabled():
                x = x.clone()  # saved for the backward here, where the Linear saved its own concat
            p = F.linear(x, x_weight, plan.linear.bias)
            projections[j] = (p, context_weight)
            inputs.append(plan.first_input(p))
        steps = []
        for step in range(self.iterations):
            hs = []
            for j, (encoder, plan, x) in enumerate(zip(self.encoders, hoisting, inputs)):
                try:
                    hs.append(encoder(x) if plan is None else plan.tail(encoder, x))
                except Exception as exc:  # the encoder's own error (a shape mismatch): say whose input
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"ProgressiveFusion: raised by encoders[{j}] in step {step + 1} on its input "
                                     f"xs[{j}] {tuple(xs[j].shape)} with context_dims[{j}] = {self.context_dims[j]} "
                                     f"context features appended" + (" (its first Linear hoisted)" if plan else ""))
                    raise
            try:
                if step == self.iterations - 1:
                    z = self.fusion_head(hs)
                else:
                    z, inputs = self._refine(hs, xs, hoisting, projections)
            except (ValueError, TypeError) as exc:  # (free until raised) say which encoder, if one
                self._check_encoder_outputs(hs, xs, exc)
                raise
            steps.append(z)
        return steps if return_all_steps else steps[-1]

    def _read_as_is(self, j: int, x: torch.Tensor) -> bool:
        """Whether modality j's encoder reads x itself at every step: no context, and x no features in
        the parameters' dtype (token ids, or features its encoder casts). A floating x in that dtype
        goes through its zero-width back-projection (a copy), so that the empty parameters get
        gradients, as DistributedDataParallel expects of every parameter."""
        return not self.context_dims[j] and (not x.is_floating_point() or
                                             x.dtype != self.back_projections[j].weight.dtype)

    def _check_encoder_outputs(self, hs, xs, cause: Exception) -> None:
        for j, (h, x, width) in enumerate(zip(hs, xs, self.fusion_head.in_dims)):
            if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape != (x.shape[0], width):
                got = f"shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"ProgressiveFusion: encoders[{j}] returned {got} for xs[{j}] of shape "
                                 f"{tuple(x.shape)}; it must return (B, encoder_dims[{j}]) = "
                                 f"({x.shape[0]}, {width})") from cause

    def _refine(self, hs, xs, hoisting, projections):
        """z from hs, and every encoder's input (or hoisted first layer's output) for the next step.
        The head and back-projections are called as modules where one has hooks or a forward of its
        own (pruning, the older weight_norm, a logging hook): the fused steps read their weights."""
        head, bps = self.fusion_head, self.back_projections
        plain = [j for j, plan in enumerate(hoisting) if plan is None and not self._read_as_is(j, xs[j])]
        modules = _intercepted([head, *bps])
        if not modules and len(projections) == len(xs) and len({bp.activation for bp in bps}) == 1:
            # every encoder hoisted: one op (launch)
            ps, context_weights = zip(*(projections[j] for j in range(len(xs))))
            return ops.refine_step_hoisted(
                hs, head.weight, head.bias, list(ps), [bp.weight for bp in bps], [bp.bias for bp in bps],
                list(context_weights), head.activation, bps[0].activation, [plan.activation for plan in hoisting],
                backend=self.backend)
        inputs = [x if plan is None and self._read_as_is(j, x) else None for j, (x, plan) in enumerate(zip(xs, hoisting))]
        if not modules and plain and len({bps[j].activation for j in plain}) == 1:
            z, outs = ops.refine_step(
                hs, head.weight, head.bias, [xs[j] for j in plain], [bps[j].weight for j in plain],
                [bps[j].bias for j in plain], head.activation, bps[plain[0]].activation, backend=self.backend)
        else:
            z = head(hs)
            outs = [bps[j](xs[j], z) for j in plain]
        for j, out in zip(plain, outs):
            inputs[j] = out
        for j, (p, context_weight) in projections.items():
            bp = bps[j]
            inputs[j] = ops.context_linear(p, z, bp.weight, bp.bias, context_weight, bp.activation,
                                           hoisting[j].activation, backend=self.backend)
        return z, inputs
