"""What really ran: the backend pf_kernels resolved for each call, and whether a torch.compile'd
function ran its compiled graph.

torch.compile can quietly run eager PyTorch instead of a graph: after `recompile_limit` guard
failures of one frame, on a graph break, or when a frame holds nothing to compile. A benchmark that
prints such a number as "torch.compile" misstates the comparison, so every compiled caller here is
compiled fresh, with fullgraph=True (a graph break raises), its graphs are counted from dynamo's
counters, and it is timed under the stance "fail_on_recompile" (a guard failure raises instead of
recompiling or falling back). A row whose check fails is marked "compile fell back", never timed.
"""
from __future__ import annotations

import contextlib
import logging
import time
import types
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import pf_kernels._dispatch as dispatch
import pf_kernels.ops as ops
from pf_kernels.convert.capture import _own_copy  # a function with a code object (dynamo cache) of its own

FELL_BACK = "compile fell back"


@contextlib.contextmanager
def record_backend_choice() -> Iterator[List[str]]:
    """Lists the backend names pf_kernels resolves while the block runs (backend="auto" included).

    Listens inside resolve_backend itself, so that what the list says is what the ops dispatched
    to, whatever rule `auto` follows; a graph compiled inside the block still runs after it (dynamo
    guards on resolve_backend's code, which a wrapper in its place would change).
    """
    chosen: List[str] = []
    dispatch._resolution_listeners.append(chosen)
    eager = ops._eager_ops()
    if eager:  # the eager entry points resolve nothing: each says what it serves a call with
        ops._eager = _RecordingEager(eager, chosen)
    try:
        yield chosen
    finally:
        listeners = dispatch._resolution_listeners
        del listeners[next(i for i, l in enumerate(listeners) if l is chosen)]  # (remove() compares contents)
        ops._eager = eager


class _RecordingEager:
    """pf_kernels._C's eager entry points, listing the backends of each call they serve."""

    def __init__(self, eager, chosen: List[str]):
        self._eager, self._chosen = eager, chosen

    def __getattr__(self, op: str):
        serve = getattr(self._eager, op)

        def call(*args):
            out = serve(*args)
            if out is not None:
                first = out
                while not isinstance(first, torch.Tensor):  # (z, [outs]) or [outs]: z or the first
                    first = first[0]
                self._chosen.extend(self._eager.eager_backends[first.device.type][op])
            return out
        return call


def describe_backends(chosen: List[str]) -> str:
    """'cpu', or 'cpu+torch' where one call's ops resolved to several backends."""
    return "+".join(sorted(set(chosen))) if chosen else "none"


class DynamoWarnings(logging.Handler):
    """Counts the warnings torch._dynamo / torch._inductor log (recompile limit, graph breaks ...)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().splitlines()[0][:200])

    def install(self) -> "DynamoWarnings":
        for name in ("torch._dynamo", "torch._inductor"):
            logging.getLogger(name).addHandler(self)
        return self


def _graph_counts() -> Dict[str, int]:
    return {"graphs": counters["stats"]["unique_graphs"], "ops": counters["stats"]["calls_captured"],
            "graph_breaks": sum(counters["graph_break"].values())}


class ProvenCompile:
    """torch.compile(fn, fullgraph=True), compiled fresh, that can say whether it really compiled.

    Call warm_up(call) first (it compiles, outside any timing); check() then returns None when at
    least one graph holding at least one op was compiled with no graph break, else the reason. Time the calls
    inside timed_region(): a recompile there raises instead of running eager code.
    """

    def __init__(self, fn: Callable, fresh: bool = True, **compile_kwargs):
        # fresh: a fresh dynamo cache, every compiled case starts from zero (no recompile limit carried
        # over from an earlier case). Not where other compiled providers of the same row are already
        # built: the reset would drop their graphs, and they would recompile while timed. Each
        # compiles its own copy of fn's code (dynamo's cache is per code object).
        if fresh:
            torch._dynamo.reset()
        self._before = _graph_counts()
        own = _own_copy(fn) if isinstance(fn, types.FunctionType) else fn
        self._code = getattr(own, "__code__", None)
        self._entries: Optional[int] = None
        self.compiled = torch.compile(own, fullgraph=True, **compile_kwargs)
        self.compile_s: Optional[float] = None
        self.graphs = 0

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    def warm_up(self, call: Callable[[], object], times: int = 2) -> None:
        """Runs call (which invokes this compiled fn) `times` times; the first compiles."""
        start = time.perf_counter()
        call()
        self.compile_s = time.perf_counter() - start
        for _ in range(times - 1):
            call()

    def check(self) -> Optional[str]:
        self._entries = self._cache_entries()
        now = _graph_counts()
        self.graphs = now["graphs"] - self._before["graphs"]
        breaks = now["graph_breaks"] - self._before["graph_breaks"]
        if breaks:
            return f"{FELL_BACK}: {breaks} graph break(s)"
        if self.graphs < 1 or now["ops"] == self._before["ops"]:
            return f"{FELL_BACK}: dynamo compiled no graph with an op in it (the frame ran eagerly)"
        return None

    def recompiled_since_check(self) -> Optional[str]:
        entries = self._cache_entries()
        if entries is not None and self._entries is not None:
            more = entries - self._entries  # this function's own graphs (others may compile meanwhile)
        else:
            more = _graph_counts()["graphs"] - self._before["graphs"] - self.graphs
        if more:
            return f"{FELL_BACK}: {more} more graph(s) compiled while timing"
        return None

    def _cache_entries(self) -> Optional[int]:
        """How many graphs dynamo holds for this function's code (None where that cannot be read)."""
        if self._code is None:
            return None
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
            return len(_debug_get_cache_entry_list(self._code))
        except (ImportError, AttributeError, RuntimeError):
            return None


@contextlib.contextmanager
def timed_region() -> Iterator[None]:
    """While timing: a compiled frame whose guards fail raises (it would recompile or run eagerly)."""
    with torch.compiler.set_stance("fail_on_recompile"):
        yield


def fell_back_reason(error: str, compiled: bool = True) -> str:
    """The row's mark for an error a provider raised: a compiled one did not run its graph."""
    if not compiled:
        return f"error: {error}"
    if "fail_on_recompile" in error:
        return f"{FELL_BACK}: a guard failed while timing, it would recompile ({error[:200]})"
    return f"{FELL_BACK}: torch.compile raised ({error[:200]})"
