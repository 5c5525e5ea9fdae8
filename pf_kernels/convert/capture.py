"""Capturing the user's forward as it really runs, and putting the rewritten graph in its place.

The capture is torch.compile (dynamo) with a backend of ours that rewrites the torch-level graph it
is handed and returns it to run eagerly (no AOTAutograd, no inductor). Why dynamo:
- it runs the forward's Python with the real inputs' structure: `len(inputs)`, loops over list
  inputs, attribute reads, `if x.dim() > 2` all just work, and submodules that fx cannot trace
  alone are inlined into their parent's graph;
- attribute writes (`self.reps = outs`) are replayed after the graph runs, so the model's
  attributes after a forward are what they always were;
- the graph runs as ordinary eager ops on the model's own Parameters (they are graph inputs), so
  autograd, optimizers, DDP's gradient hooks and the state_dict are untouched;
- guards recapture when the input structure, dtype, device, train/eval or grad mode changes; the
  first change of batch size recaptures with a symbolic batch size (torch.compile's automatic
  dynamic shapes), and that graph serves every batch size after it. (Marking the example's batch
  dim dynamic up front would save that one recapture, but a symbolic capture costs 3-5x a static
  one on this CPU, paid even by models that only ever see one batch size.)
The model keeps its class: only its instance gets a `forward` attribute (a ConvertedForward) that
runs the class's forward through the compiled function. Each converted model compiles its own copy
of the forward's code, so converting many models does not use up torch.compile's recompile limit
for that code, and other compiled uses of the class are unaffected.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import types
import weakref
from typing import Optional

import torch
import torch._dynamo
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils import _pytree

from ..nn import _plain_attributes, _put_back, _shelve
from .report import ConversionReport
from .rewrite import FusedCalls, rewrite_graph


class _DynamoSettings:
    """Dynamo settings for the duration of a converted forward (they matter when it compiles).

    suppress_errors: where dynamo itself fails, the forward runs eagerly instead of raising.
    allow_rnn (models with an nn.LSTM/GRU/RNN): trace them instead of breaking the graph there (a
    break in a loop over encoders makes dynamo skip the whole forward).
    skip_nnmodule_hook_guards off: a hook added to a submodule after capture recompiles (with
    dynamo's default the captured graph would go on without it).
    optimize_ddp off (inside DDP's forward): our graphs run eager ops, so DDP's per-parameter hooks
    already overlap the all-reduce; the DDP optimizer would only cut the graph (and patterns) into
    buckets.
    """

    def __init__(self, rnn: bool):
        self.values = {"suppress_errors": True, "skip_nnmodule_hook_guards": False,
                       "allow_unspec_int_on_nn_module": True}
        if rnn:
            self.values["allow_rnn"] = True
        self.saved = []

    def __enter__(self):
        config = torch._dynamo.config
        values = self.values
        if _inside_ddp():
            values = dict(values, optimize_ddp=False)
        self.saved.append({k: getattr(config, k) for k in values})
        for k, v in values.items():
            setattr(config, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.pop().items():
            setattr(torch._dynamo.config, k, v)


def _inside_ddp() -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel._get_active_ddp_module() is not None


_copies = itertools.count(1)


def _own_copy(function: types.FunctionType) -> types.FunctionType:
    """The same function with its own code object (dynamo keeps its cache per code object) and its
    own code name: dynamo keeps what it learnt about sizes that changed (automatic dynamic shapes)
    per file, line and name, so another model of the same class would be captured with symbolic
    sizes (its feature widths too: then nothing is hoisted)."""
    code = function.__code__
    copy = types.FunctionType(code.replace(co_name=f"{code.co_name}__pf_kernels_{next(_copies)}"),
                              function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__dict__.update(function.__dict__)
    return copy


def _rewriting(converted: "weakref.ref[ConvertedForward]"):
    """The backend of a converted forward. It holds the converted forward weakly: dynamo keeps its
    backends for the rest of the process, and with them every model converted (until
    torch._dynamo.reset())."""
    def backend(gm: torch.fx.GraphModule, example_inputs):
        owner = converted()
        return gm.forward if owner is None else owner._backend(gm, example_inputs)
    return backend


class ConvertedForward:
    """Installed as `model.forward`: the model's own forward, captured and rewritten by torch.compile.

    Pickling and deepcopy give a model converted afresh (to the same backend)."""

    def __init__(self, module: nn.Module, calls: FusedCalls, report: ConversionReport,
                 previous=None):
        self.module = module
        self.calls = calls
        self.report = report
        self.previous = previous  # an instance-level forward the model had before, if any
        # the model's own forward, bound here (torch.compile cannot trace the binding itself)
        self.original = previous if previous is not None else types.MethodType(type(module).forward, module)
        functools.update_wrapper(self, self.original)  # its name, doc and signature
        self._compiled = None
        self._code = None
        self._split = False
        self._settings = None
        self._calls_that_captured = 0

    def _setup(self):
        original = self.original
        target = original
        if isinstance(original, types.MethodType) and isinstance(original.__func__, types.FunctionType):
            target = types.MethodType(_own_copy(original.__func__), original.__self__)
        self._compiled = torch.compile(target, backend=_rewriting(weakref.ref(self)))
        self._code = getattr(getattr(target, "__func__", target), "__code__", None)
        self._split = False
        self._settings = _DynamoSettings(any(isinstance(m, nn.RNNBase) for m in self.module.modules()))

    def _backend(self, gm: torch.fx.GraphModule, example_inputs):
        gm.meta["pf_kernels_root"] = type(self.module).__name__  # names the model's own code in the report
        rewrite_graph(gm, self.calls, self.report)
        return gm.forward

    @property
    def __code__(self):  # torch.export reads the forward's code object
        return self.original.__code__

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_tracing():
            # The converted model inside the user's own torch.compile, torch.export or tracer: that
            # sees the plain forward (it does not run our rewrite).
            return self.original(*args, **kwargs)
        if self._compiled is None:
            if not torch._dynamo.is_dynamo_supported():
                uninstall(self.module)
                self.report.add_left_alone("torch.compile does not run on this Python/platform: "
                                           f"{type(self.module).__name__} keeps its own forward")
                return self.original(*args, **kwargs)
            self._setup()
        before = len(self.report.captures)
        try:
            with self._settings, _dynamo_failures(self._code) as failures:
                out = self._compiled(*args, **kwargs)
        except BaseException:
            # A frame that raised while dynamo traced it (a wrong input, the model's own check) runs as
            # plain Python from then on, for every input: the fused ops would be off, silently. Its
            # captures are kept where dynamo's skip can be undone (one frame, no graph breaks, whose
            # resume functions would be skipped too); else the next call captures a fresh copy.
            if self._split or not _run_again(self._code):
                self._compiled = None
            raise
        if failures:  # dynamo gave up on the forward itself (and ran it as plain Python)
            self._report_failure(failures[-1])
            return out
        captured = len(self.report.captures) - before
        self._split = self._split or captured > 1
        if captured:
            self._calls_that_captured += 1
            if self._calls_that_captured == torch._dynamo.config.recompile_limit:
                self.report.add_left_alone(
                    f"{type(self.module).__name__}.forward was captured {self._calls_that_captured} times, "
                    "torch.compile's recompile limit: from the next new capture on, the plain forward runs. "
                    "A capture is made for each new input structure, dtype, train/eval and grad mode, and for a "
                    "batch size or length of 1 apart from the others; also at every call where the forward "
                    "changes something it reads (a list it appends to, a tensor attribute it reassigns to a new "
                    "shape). TORCH_LOGS=recompiles says which; torch._dynamo.config.recompile_limit raises the limit")
        if captured > 1:
            self.report.add_left_alone(
                f"torch.compile split {type(self.module).__name__}.forward into {captured} graphs (graph breaks; "
                "torch._dynamo.explain(model)(*inputs) says where and why): a pattern across a break is not seen")
        if not self.report.captures:  # dynamo ran the forward without capturing (a break in a loop)
            uninstall(self.module)
            self.report.add_left_alone(
                f"torch.compile captured no graph of {type(self.module).__name__}.forward (a graph break inside a "
                "loop makes it run the whole forward as it is; torch._dynamo.explain(model)(*inputs) says where): "
                "the model keeps its own forward")
        elif captured and not self.report.replaced:
            uninstall(self.module)
            self.report.add_left_alone(f"nothing to swap in {type(self.module).__name__}.forward: "
                                       "the model keeps its own forward")
        return out

    def _report_failure(self, error: str) -> None:
        name = type(self.module).__name__
        why = f"torch.compile could not capture {name}.forward ({error}; dynamo's \"WON'T CONVERT\" warning has the trace)"
        if any(isinstance(m, nn.RNNBase) for m in self.module.modules()) and \
                torch.__version__ < torch.torch_version.TorchVersion("2.13"):
            why += f"; it holds an nn.LSTM/GRU/RNN, which torch {torch.__version__} can trace with wrong shapes"
        if not self.report.replaced:
            uninstall(self.module)
            self.report.add_left_alone(why + ": the model keeps its own forward")
        else:  # earlier captures stay in use; this call's inputs ran the plain forward
            self.report.add_left_alone(why + " for some inputs: those run the plain forward")

    def __reduce__(self):
        return (_reinstalled, (self.module, self.calls.backend, self.previous))


class _FailureLog(logging.Handler):
    """The errors dynamo logs when it gives up on a frame of this code (with suppress_errors it runs
    the frame as plain Python, and would leave the report to guess why nothing was swapped)."""

    def __init__(self, code):
        super().__init__(logging.WARNING)
        # as dynamo's message names the frame: "WON'T CONVERT forward__pf_kernels_3 /path/model.py line 18"
        self.frame, self.errors = f"WON'T CONVERT {code.co_name} {code.co_filename} line {code.co_firstlineno}", []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None and str(record.msg).startswith(self.frame):
            error = record.exc_info[1]
            while type(error).__module__.startswith("torch._dynamo"):  # its wrappers of the real error
                inner = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
                if inner is None:
                    break
                error = inner
            lines = str(error).strip().splitlines()
            self.errors.append(f"{type(error).__name__}: {lines[0] if lines else ''}")


@contextlib.contextmanager
def _dynamo_failures(code):
    if code is None:
        yield []
        return
    handler = _FailureLog(code)
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    try:
        yield handler.errors
    finally:
        logger.removeHandler(handler)


def _run_again(code) -> bool:
    """Undoes dynamo's skip of a frame that raised while being traced, keeping its captures (a bad
    request then costs no new captures of the good inputs); False where this torch has no such switch."""
    if code is None:
        return False
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return False
    return True


def _reinstalled(module, backend, previous):
    return ConvertedForward(module, FusedCalls(backend), ConversionReport(), previous)


def installed(module: nn.Module) -> Optional[ConvertedForward]:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, ConvertedForward) else None


def install(module: nn.Module, calls: FusedCalls, report: ConversionReport) -> ConvertedForward:
    forward = ConvertedForward(module, calls, report, module.__dict__.get("forward"))
    module.forward = forward
    return forward


def uninstall(module: nn.Module) -> None:
    forward = installed(module)
    if forward is None:
        return
    if forward.previous is not None:
        module.forward = forward.previous
    else:
        del module.forward


def _state(module: nn.Module):
    """What a forward may change on a module: its buffers and parameters by name (an EMA written
    `self.ema = 0.9 * self.ema + ...` replaces the tensor), the values in them and in its tensor
    attributes (a momentum encoder's weights, a counter, updated in place under no_grad), its plain
    attributes (a call counter, a cached output) and the contents of its lists, dicts and sets.
    Lazy modules are left to initialise themselves."""
    if isinstance(module, LazyModuleMixin):
        return None
    buffers, parameters = dict(module._buffers), dict(module._parameters)
    attributes = tuple((k, v) for k, v in _plain_attributes(module) if k != "forward")
    tensors = [t for t in (*buffers.values(), *parameters.values(), *(v for _, v in attributes))
               if isinstance(t, torch.Tensor)]
    values = [(t, t.detach().clone()) for t in tensors if not t.is_inference()]  # (those, only inference_mode writes)
    return buffers, parameters, values, attributes, _shelve(attributes)


def _restore(module: nn.Module, state) -> None:
    buffers, parameters, values, attributes, shelf = state
    for now, then in ((module._buffers, buffers), (module._parameters, parameters)):
        now.clear()
        now.update(then)
    for tensor, value in values:
        tensor.copy_(value)
    _put_back(module, attributes, shelf, keep=("forward",))  # (ours: installed, or uninstalled by the run)


def run_example(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """One forward on the example inputs, so that the graph is captured (and the report written)
    now. What the forward changes on the model (its buffers and parameters, the values in them and
    in its tensor attributes, its plain attributes and their lists, dicts and sets) and the RNG state
    are restored afterwards: the model is as it was. (Its tensors are copied for that, for the
    length of the run.)"""
    saved = [(m, _state(m)) for m in module.modules()]
    devices = sorted({t.device.index or 0 for t in _pytree.tree_leaves((args, kwargs, list(module.parameters())))
                      if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        module(*args, **kwargs)
    with torch.no_grad():
        for m, state in saved:
            if state is not None:
                _restore(m, state)
