"""Shared by the Triton ops; every op file (and any new one) builds on these helpers:

- `autotune(name, kernel, options, key)`: a kernel with its autotune configs (a `Tuned`);
  `size_class(*sizes)` buckets sizes for its key, so new batch sizes or sequence lengths within a
  power of two reuse the tuned config instead of benchmarking again.
- `launch(tuned, grid, *args, **kwargs)`: the one way a launcher starts a kernel: checks the grid
  against CUDA's limits, runs on the tensors' device, and wraps the kernel for torch.compile.
- `pointer_slots(tensors, n)` / `scalar_slots(values, n, fill)`: fixed-size argument lists for
  kernels that take up to n inputs; unused pointer slots get a dummy tensor of their own.
- `define_op(name, impl, fake)`: registers a launcher as the op pf_kernels_triton::name.
- `dot_precision(dtype)`, `act_code(activation)`, `positions(t)`.

Knobs (environment variables, read at import):
- PF_KERNELS_TRITON_AUTOTUNE=0: every kernel runs one fixed, safe config (its `safe` index)
  without benchmarking.
- PF_KERNELS_TRITON_CONFIG=i: every kernel runs its config i (modulo its number of configs);
  `forced_config(i)` does the same within a `with` block (tests sweep every config that way).
Under TRITON_INTERPRET=1 a kernel runs its safe config unless one is forced (the interpreter has no
GPU to time configs with).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
import triton

from ._activations import CODES

# Fixed when the kernels are decorated: @triton.jit returns an interpreted function then.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programs a launch aims for where the positions of a row block can be split among several: enough
# to fill a large GPU. The interpreter runs programs one after another, and every split recomputes
# its row block's head and contexts: there, a few (tests set it where they need more).
PROGRAMS_TARGET = 4 if INTERPRET else 512


def _interpreter_scalars_for_numpy_2() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with int(),
    which NumPy >= 2.4 refuses for arrays with a dimension ("only 0-dimensional arrays can be
    converted"); every `range(..., n, ...)` over a kernel argument fails. Triton 3.9 squeezes the
    array first: the same here, for the interpreter only."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_pf_kernels", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._pf_kernels = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _interpreter_rounds_bf16_to_nearest() -> None:
    """The interpreter (triton 3.6 and 3.9) casts fp32 to bf16 by truncating the mantissa; the GPU
    rounds to nearest even (cvt.rn.bf16.f32). Truncation errs by up to 1 ulp, one-sided, where
    torch and the GPU err by half: enough to move a relu kink past its reference (context_linear's
    relu' after a bf16 context). The same rounding as the GPU, through torch's cast."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_pf_kernels", False):
        return
    import triton.language as tl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._pf_kernels = True
    builder.cast_impl = cast_impl


def _interpreter_patches_once_per_launch() -> None:
    """The interpreter (triton 3.6 and 3.9) patches triton.language for each launch, and again on
    every call of a @triton.jit helper inside it: about 3 ms a call of inspect.getmembers over
    modules the launch has patched already, a quarter of the interpreter's time in our tests.
    Inside a launch, a helper whose language modules were patched in it (by the launch, or by an
    earlier helper: a helper's patches are never restored) skips the repeat."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or getattr(original, "_pf_kernels", False) \
            or not hasattr(interpreter, "tl"):
        return
    languages = (interpreter.tl, interpreter.tl.core)
    launches = []  # per launch in progress: the language modules it patched (None until it has)
    launch = executor.__call__

    def used_languages(fn):
        return {id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages)}

    def patch_lang(fn):
        if not launches:
            return original(fn)
        used = used_languages(fn)
        if launches[-1] is not None and used <= launches[-1]:
            return None  # a helper's call, whose result is dropped
        launches[-1] = used | (launches[-1] or set())
        return original(fn)

    def call(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang._pf_kernels = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


if INTERPRET:
    _interpreter_scalars_for_numpy_2()
    _interpreter_rounds_bf16_to_nearest()
    _interpreter_patches_once_per_launch()

# fp32 matmuls: exact ("ieee") unless tf32 is allowed explicitly.
TF32_ENV = "PF_KERNELS_TRITON_TF32"
AUTOTUNE_ENV = "PF_KERNELS_TRITON_AUTOTUNE"
CONFIG_ENV = "PF_KERNELS_TRITON_CONFIG"
AUTOTUNE = os.environ.get(AUTOTUNE_ENV, "1") != "0"
NAMESPACE = "pf_kernels_triton"
MAX_POS_DIMS = 3  # position dims the kernels index with strides; more are merged by reshape
# CUDA's grid limits per axis. Launchers put every program count on axis 0.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
# Positions per batch row: int32 in the kernels, whose strided loops step past the last one by up to
# 65535 programs x a block (< 2^23) before they stop.
MAX_POSITIONS = 2 ** 31 - 2 ** 23


def _config_from_env() -> Optional[int]:
    value = os.environ.get(CONFIG_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{CONFIG_ENV} must be a config index (0, 1, ...), got {value!r}")
    return int(value)


_forced: Optional[int] = _config_from_env()


def configs(options: Sequence[dict]) -> List[triton.Config]:
    """triton.Config objects from dicts of meta-parameters plus num_warps / num_stages."""
    return [triton.Config({k: v for k, v in o.items() if k not in ("num_warps", "num_stages")},
                          num_warps=o.get("num_warps", 4), num_stages=o.get("num_stages", 2))
            for o in options]


class Tuned:
    """A @triton.jit kernel with its autotune configs (dicts, as `configs` takes them).

    `tuner()` is what a launch runs: a triton.autotune over every config, keyed on `key` (names of
    kernel arguments: bucket sizes with `size_class`); or, when a config is forced or autotuning is
    off, an autotuner over that one config, which never benchmarks. `safe` is the config used when
    autotuning is off: the one that fits every input the launcher passes.
    """

    def __init__(self, name: str, kernel, options: Sequence[dict], key: Sequence[str], safe: int = 0):
        self.name = name
        self.kernel = kernel
        self.options = [dict(o) for o in options]
        self.configs = configs(options)
        self.key = list(key)
        self.safe = safe
        self._tuners = {}

    def index(self) -> Optional[int]:
        """The config a launch runs now, or None for all of them (autotuned)."""
        if _forced is not None:
            return _forced % len(self.configs)
        if INTERPRET or not AUTOTUNE:
            return self.safe
        return None

    def tuner(self):
        i = self.index()
        tuner = self._tuners.get(i)
        if tuner is None:
            chosen = self.configs if i is None else [self.configs[i]]
            tuner = self._tuners[i] = triton.autotune(chosen, key=self.key)(self.kernel)
            names = list(tuner.arg_names)
            tuner.pf_key_slots = [(names.index(k), k) for k in self.key]
            tuner.pf_chosen = {}  # autotune key -> the config the autotuner chose (see _run)
        return tuner

    def __repr__(self):
        return f"Tuned({self.name}, {len(self.configs)} configs)"


TUNED: List[Tuned] = []  # every kernel of this backend, for tests and the AOT compile


def autotune(name: str, kernel, options: Sequence[dict], key: Sequence[str], safe: int = 0) -> Tuned:
    tuned = Tuned(name, kernel, options, key, safe)
    TUNED.append(tuned)
    return tuned


def max_configs() -> int:
    """The largest number of configs of any kernel: forcing 0..max_configs()-1 runs them all."""
    return max(len(t.configs) for t in TUNED)


@contextlib.contextmanager
def forced_config(index: Optional[int]) -> Iterator[None]:
    """Within the block, every kernel runs config `index` (modulo its count); None: as configured."""
    global _forced
    previous, _forced = _forced, index
    try:
        yield
    finally:
        _forced = previous


def _hint(n) -> int:
    """n's value; for a symbolic size under torch.compile its example value (reading it adds no
    guard, so the graph does not specialise on it)."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else 0


def size_class(*sizes) -> int:
    """An autotune key: each size's bit length (its power-of-two bucket), 6 bits each. Sizes in
    the same buckets share one tuned config."""
    key = 0
    for i, n in enumerate(sizes):
        key |= min(_hint(n).bit_length(), 63) << (6 * i)
    return key


def cdiv(n, d):
    """ceil(n / d) in host code, for ints and torch.compile's symbolic sizes. Not triton.cdiv: a
    constexpr function since Triton 3.6, it costs microseconds a call, and grids take several."""
    return (n + d - 1) // d


def smax(a, b):
    """max of two host sizes: plain for ints, torch.sym_max for torch.compile's symbolic sizes (on
    which max() would add a guard). torch.sym_max on ints costs microseconds a call."""
    return (a if a >= b else b) if type(a) is int and type(b) is int else torch.sym_max(a, b)


def smin(a, b):
    """min of two host sizes, as smax."""
    return (a if a <= b else b) if type(a) is int and type(b) is int else torch.sym_min(a, b)


def check_grid(name: str, grid: Sequence) -> None:
    """ValueError when a grid exceeds CUDA's limits (the launch would fail with 'invalid argument')."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if isinstance(n, int):
            if n > limit:
                raise ValueError(f"{name}: the input needs {n} programs on grid axis {axis}, more than "
                                 f"CUDA's limit of {limit}; split the input")
        else:  # symbolic under torch.compile: checked when the graph runs
            torch._check(n <= limit, lambda: f"{name}: too many programs on grid axis {axis}")


def grids(tuner, grid) -> List[Tuple]:
    """The grid of every config the tuner may launch."""
    if not callable(grid):
        return [tuple(grid)]
    return [tuple(grid(dict(c.kwargs))) for c in tuner.configs]


def device_guard(device: Optional[torch.device]):
    """Runs a launch on `device` when another CUDA device is current (Triton launches on the current
    device). A no-op where CUDA was never initialised (CPU, fake tensors on a machine without GPU)."""
    if (device is not None and device.type == "cuda" and device.index is not None
            and torch.cuda.is_initialized() and torch.cuda.current_device() != device.index):
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def launch(tuned: Tuned, grid, *args, **kwargs) -> None:
    """Launches `tuned` on `grid` (a tuple, or a function of the config's meta-parameters) with
    the kernel's arguments. Host work only: no synchronisation, so launches can be captured in a
    CUDA graph once every shape has been run (autotuned) before."""
    kernel = tuned.tuner()
    for g in grids(kernel, grid):
        check_grid(tuned.name, g)
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    _run(kernel, grid, args, kwargs, device)


def _autotune_key(tuner, args, kwargs) -> tuple:
    """What triton's autotuner keys its choice on: the key arguments' values and every tensor
    argument's dtype."""
    values = tuple(args[i] if i < len(args) else kwargs[k] for i, k in tuner.pf_key_slots)
    return values + tuple(a.dtype for a in args if isinstance(a, torch.Tensor)) \
        + tuple(a.dtype for a in kwargs.values() if isinstance(a, torch.Tensor))


def _run(kernel, grid, args, kwargs, device) -> None:
    # Interpreted kernels are called as they are: wrap_triton cannot take them (torch 2.11 fails on
    # them), and the interpreter's ops are opaque custom_ops anyway (see define_op). wrap_triton
    # returns the kernel itself where the op runs on real tensors, not traced.
    fn = kernel if INTERPRET or getattr(_eager, "on", False) else torch.library.wrap_triton(kernel)
    chosen = getattr(kernel, "pf_chosen", None) if fn is kernel else None
    with device_guard(device):
        if chosen is None:
            fn[grid](*args, **kwargs)
            return
        key = _autotune_key(kernel, args, kwargs)
        config = chosen.get(key)
        if config is None:  # the first launch of this key: the autotuner picks (benchmarks) and runs
            kernel[grid](*args, **kwargs)
            chosen[key] = kernel.best_config
            return
        # The config chosen before, straight to the JIT function: triton's autotuner spends ~100 us
        # of host time per launch with this backend's many arguments (it rebuilds its key from a dict
        # of all of them), more than the kernels take on a GPU at launch-bound sizes.
        kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())


def pointer_slots(tensors: Sequence[torch.Tensor], n: int, like: torch.Tensor) -> List[torch.Tensor]:
    """tensors padded to n with one empty dummy tensor (never read or written by the kernel). Unused
    slots must not alias a real tensor: torch.compile's analysis may count every slot a kernel can
    store through as written, and functionalization then returns the copy of the last slot."""
    tensors = list(tensors)
    if len(tensors) > n:
        raise ValueError(f"at most {n} tensors per launch, got {len(tensors)}")
    if len(tensors) == n:
        return tensors
    return tensors + [like.new_empty((0,))] * (n - len(tensors))


def scalar_slots(values: Sequence, n: int, fill) -> list:
    return list(values) + [fill] * (n - len(values))


def savable(*tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """What an autograd Function saves of its inputs: each as it is, or a copy of one made under
    torch.inference_mode, which autograd refuses to save (eager saves its own intermediates there:
    cat's output, p + term; inputs made that way train, so they must here too)."""
    return [t.clone() if t is not None and t.is_inference() else t for t in tensors]


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and os.environ.get(TF32_ENV) != "1":
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit inputs


def act_code(activation: str) -> int:
    return CODES[activation]


def _merged_positions(t: torch.Tensor) -> List[Tuple[int, int]]:
    """(size, stride) of t's position dims (all but the first and last), size-1 dims dropped and
    neighbours merged where their strides allow it (as a view would)."""
    merged: List[Tuple[int, int]] = []
    for size, stride in zip(t.shape[1:-1], t.stride()[1:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    return merged


def positions(t: torch.Tensor) -> Tuple[torch.Tensor, List[int], List[int]]:
    """t (B, *S, D) as (t', sizes, strides) of exactly MAX_POS_DIMS position dims: S merged where
    the strides allow (no copy), then padded with size-1 dims at the end, so that the kernels'
    position_offsets divide nothing for the usual layouts (S1 = S2 = 1 specialise to constants).
    More dims than that which cannot merge: the leading ones are merged by reshape (a copy only
    where the strides do not allow a view)."""
    merged = _merged_positions(t)
    if len(merged) > MAX_POS_DIMS:
        S = list(t.shape[1:-1])
        lead = S[: len(S) - MAX_POS_DIMS + 1]
        n = 1
        for s in lead:
            n *= s
        t = t.reshape(t.shape[0], n, *S[len(lead):], t.shape[-1])
        merged = _merged_positions(t)
    count = 1
    for size, _ in merged:
        count *= size
    if count >= MAX_POSITIONS:
        raise ValueError(f"{count} positions per batch row (shape {tuple(t.shape)}); the Triton kernels "
                         f"take fewer than 2^31 - 2^23")
    pad = MAX_POS_DIMS - len(merged)
    return t, [m[0] for m in merged] + [1] * pad, [m[1] for m in merged] + [0] * pad


def define_op(name: str, impl: Callable, fake: Callable, kernels: Sequence[Tuned] = ()) -> "TritonOp":
    """Registers impl as the op pf_kernels_triton::name; `kernels` are the Tuned kernels it launches.
    Returns the op as this backend calls it (TritonOp).

    On the GPU: torch.library.triton_op, so torch.compile sees the kernels (wrap_triton); its fake
    implementation is impl itself run on fake tensors, so impl must read no tensor data (only
    shapes, strides, dtypes). Under the interpreter triton_op cannot serve (an interpreted kernel
    reads the data of fake tensors): there the op is a torch.library.custom_op (opaque to
    torch.compile, no graph break) with `fake` as its fake implementation; fake must give the same
    shapes, strides and dtypes as impl (tests/test_triton_graph.py checks both against each other).
    """
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, impl, mutates_args=())
        op.register_fake(fake)
        return TritonOp(op, impl)
    op = torch.library.triton_op(qualname, impl, mutates_args=())
    # torch finds an op's kernels by reading impl's source for wrap_triton(<name>) calls, which
    # `launch` hides; AOTAutograd's cache hashes the kernels' source through this table, so that
    # a changed kernel is never served from a stale cache.
    table = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(table, dict):
        table[qualname] = [t.kernel for t in kernels]
    return TritonOp(op, impl)


_eager = threading.local()  # .on: launches of an eager call (no wrap_triton; see TritonOp)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def _eager_launches() -> Iterator[None]:
    previous, _eager.on = getattr(_eager, "on", False), True
    try:
        yield
    finally:
        _eager.on = previous


def _flat(args) -> Tuple[list, Tuple[int, ...]]:
    """The arguments with every Tensor[] (a list or tuple: torch.library takes either) spread out,
    and the layout _nest rebuilds them from: each argument's length where it is a sequence, else -1."""
    flat, layout = [], []
    for a in args:
        if type(a) is list or type(a) is tuple:
            flat.extend(a)
            layout.append(len(a))
        else:
            flat.append(a)
            layout.append(-1)
    return flat, tuple(layout)


def _nest(layout: Tuple[int, ...], flat) -> list:
    """The inverse of _flat (a sequence comes back as a list, as torch.library passes a Tensor[])."""
    args, i = [], 0
    for n in layout:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


class TritonOp:
    """An op of this backend, called as the registered op is.

    Eager calls on plain tensors run impl directly, under a torch.autograd.Function where a gradient
    is needed, with the same autograd contract as torch.library's (setup_context and backward see
    the op's inputs and outputs, lists included): torch.library's custom-op layers (redispatch,
    pytree flattening, a frame with dynamo disabled) cost more host time per call than the kernels
    take on a GPU at small sizes. torch.compile, fake tensors, dispatch and torch-function modes,
    functorch transforms and tensor subclasses go through the registered op, which they see.
    """

    def __init__(self, op, impl: Callable):
        self.op, self.impl = op, impl
        self.backward_fn: Optional[Callable] = None
        self.setup_context_fn: Optional[Callable] = None

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward_fn, self.setup_context_fn = backward, setup_context

    def __call__(self, *args):
        flat, layout = _flat(args)
        if _forward_ad._current_level >= 0 and any(
                isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in flat):
            # torch.library would run the op and drop the tangent: a wrong derivative, silently
            raise RuntimeError(f"{self.op._qualname}: the triton backend has no forward-mode AD (jvp); "
                               "backend='torch' has it")
        if not _eager_call(flat):
            return self.op(*args)
        if torch.is_grad_enabled() and any(type(t) in _PLAIN and t.requires_grad for t in flat):
            if self.backward_fn is None:
                return self.op(*args)  # torch.library's own behaviour for an op without autograd
            listed = []  # forward says whether impl returned a list (apply returns it as a tuple)
            result = _EagerAutograd.apply((self, layout, listed), *flat)
            return list(result) if listed[0] else result
        with _eager_launches():
            return self.impl(*args)


def _eager_call(flat) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None \
            or torch._C._get_tracing_state() is not None:  # torch.jit.trace records the op, not its kernels
        return False
    return all(type(t) in _PLAIN for t in flat if isinstance(t, torch.Tensor))


class _EagerAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: tuple, *flat):
        entry, layout, listed = call
        args = _nest(layout, flat)
        with _eager_launches():
            result = entry.impl(*args)
        entry.setup_context_fn(ctx, tuple(args), result)
        ctx.pf_entry, ctx.pf_layout, ctx.pf_listed = entry, layout, type(result) is list
        listed.append(ctx.pf_listed)
        return tuple(result) if ctx.pf_listed else result

    @staticmethod
    def backward(ctx, *grads):
        entry, layout = ctx.pf_entry, ctx.pf_layout
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_nest(layout, needs[1:]))
        try:
            result = entry.backward_fn(ctx, list(grads)) if ctx.pf_listed else entry.backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        if type(result) is not tuple:
            result = (result,)
        flat = [None]  # the call tuple's
        for n, grad in zip(layout, result):
            if n < 0:
                flat.append(grad)
            else:
                flat.extend(grad if grad is not None else [None] * n)
        return tuple(flat)
