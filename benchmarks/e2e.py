"""End to end: whole models, one training step (forward + backward + Adam) and inference, per provider.

The models are a table (VARIANTS): a new row is a few lines. A variant that this install cannot
build (an option ProgressiveFusion does not have yet, such as hoist=) gives rows marked n/a.
Providers (E2E_PROVIDERS): the model on the torch backend (eager), on each fused backend, on auto,
torch.compile of the eager model (proven compiled, see proof.py), and on a GPU the step captured in
a CUDA graph (torch.cuda.graph, static shapes, after warm-up) with our ops inside, and without.
A PF variant's rows are also quoted against its baselines (Variant.baselines: the same PF unhoisted,
and late fusion, both on eager), timed in the same rounds as its providers: every ratio a row states
comes from one side-by-side measurement, none from two rows timed apart.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pf_kernels.nn import FusionHead, ProgressiveFusion

from .cases import TOLERANCE, relative_error
from .proof import FELL_BACK, ProvenCompile, describe_backends, fell_back_reason, record_backend_choice, timed_region
from .timing import error_text, measure_side_by_side

# Feature widths per modality: a vector and two sequences (T positions).
INPUTS = {"narrow": (32, 16, 8), "wide": (768, 512, 64)}
CONTEXT, ENCODED, FUSED, HIDDEN = 16, 64, 64, 64


class NotAvailable(Exception):
    """This install cannot build the variant (the row is marked n/a, with this reason)."""


class MeanOverPositions(nn.Module):
    """(B, *positions, H) -> (B, H); (B, H) stays."""

    def forward(self, y):
        return y.flatten(1, -2).mean(1) if y.dim() > 2 else y


def encoder(d_in: int, d_out: int) -> nn.Sequential:
    """A per-position MLP, then the mean over positions. An nn.Sequential that begins with a Linear:
    the form ProgressiveFusion can hoist."""
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d_out), MeanOverPositions())


class LateFusion(nn.Module):
    """Late fusion (R = 1, no context): encoders over the raw inputs, then the fusion head."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.encoders = nn.ModuleList(encoder(d, ENCODED) for d in dims)
        self.fusion_head = FusionHead([ENCODED] * len(dims), FUSED)

    @property
    def backend(self) -> str:
        return self.fusion_head.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.fusion_head.backend = value

    def forward(self, xs):
        return self.fusion_head([enc(x) for enc, x in zip(self.encoders, xs)])


@dataclass(frozen=True)
class PFBuild:
    """Builds ProgressiveFusion over `encoder`s (dims -> model); raises NotAvailable for an option
    this version lacks."""
    iterations: int
    options: Tuple[Tuple[str, object], ...] = ()

    def __call__(self, dims):
        options = dict(self.options)
        accepted = inspect.signature(ProgressiveFusion.__init__).parameters
        missing = [k for k in options if k not in accepted]
        if missing:
            raise NotAvailable(f"ProgressiveFusion has no option {', '.join(missing)} in this version")
        return ProgressiveFusion([encoder(d + CONTEXT, ENCODED) for d in dims], [ENCODED] * len(dims), FUSED,
                                 CONTEXT, iterations=self.iterations, **options)

    def plain(self) -> Optional["PFBuild"]:
        """The same model without hoisting (None where this one is it)."""
        options = dict(self.options)
        if options.get("hoist") is False:
            return None
        return PFBuild(self.iterations, tuple({**options, "hoist": False}.items()))


def progressive_fusion(iterations: int, **options) -> PFBuild:
    return PFBuild(iterations, tuple(options.items()))


def late_fusion(dims):
    return LateFusion(dims)


@dataclass
class Variant:
    name: str
    description: str
    inputs: str                                  # a key of INPUTS
    sizes: Tuple[Tuple[int, int], ...]           # (B, T)
    build: Callable[[Sequence[int]], nn.Module]  # dims -> model; raises NotAvailable
    quick: bool = False
    autocast: Optional[torch.dtype] = None       # forward under torch.autocast in this dtype (fp32 weights)

    def baselines(self) -> Dict[str, Callable[[Sequence[int]], nn.Module]]:
        """The models a PF variant's rows are also quoted against, each on eager and timed in the
        same rounds as the row's providers: the same PF without hoisting, and late fusion."""
        if not isinstance(self.build, PFBuild):
            return {}
        plain = self.build.plain()
        return {**({"plain_pf": plain} if plain is not None else {}), "late_fusion": late_fusion}


NARROW_SIZES = ((8, 50), (256, 50))  # B = 8 is launch-bound, B = 256 bound by the encoders' GEMMs
WIDE_SIZES = ((8, 50), (64, 50))

VARIANTS: List[Variant] = [
    Variant("pf-r3", "ProgressiveFusion K=3 R=3 (its default options)", "narrow", NARROW_SIZES,
            progressive_fusion(3), quick=True),
    Variant("pf-r3-nohoist", "ProgressiveFusion K=3 R=3, hoist=False", "narrow", NARROW_SIZES,
            progressive_fusion(3, hoist=False)),
    Variant("pf-r3-hoist", "ProgressiveFusion K=3 R=3, hoist=True", "narrow", NARROW_SIZES,
            progressive_fusion(3, hoist=True)),
    Variant("late-r1", "late fusion (R=1)", "narrow", NARROW_SIZES, late_fusion),
    Variant("pf-r3-wide", "ProgressiveFusion K=3 R=3, wide inputs", "wide", WIDE_SIZES, progressive_fusion(3)),
    Variant("pf-r3-wide-nohoist", "ProgressiveFusion K=3 R=3, wide inputs, hoist=False", "wide", WIDE_SIZES,
            progressive_fusion(3, hoist=False)),
    Variant("pf-r3-wide-hoist", "ProgressiveFusion K=3 R=3, wide inputs, hoist=True", "wide", WIDE_SIZES,
            progressive_fusion(3, hoist=True)),
    Variant("late-r1-wide", "late fusion (R=1), wide inputs", "wide", WIDE_SIZES, late_fusion),
    Variant("pf-r3-bf16", "ProgressiveFusion K=3 R=3 under bf16 autocast", "narrow", NARROW_SIZES,
            progressive_fusion(3), autocast=torch.bfloat16),
]

def select_variants(names: Optional[Sequence[str]], quick: bool) -> List[Variant]:
    if names:
        known = {v.name: v for v in VARIANTS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown --e2e variant(s) {unknown}; known: {', '.join(known)}")
        return [known[n] for n in names]
    return [v for v in VARIANTS if v.quick or not quick]


@dataclass
class E2EProvider:
    backend: str
    wrap: Optional[str] = None   # None, "compile" or "cudagraph"


def e2e_providers(device: torch.device, fused: Sequence[str], with_compile: bool) -> Dict[str, E2EProvider]:
    providers = {"eager": E2EProvider("torch"), **{b: E2EProvider(b) for b in fused}, "auto": E2EProvider("auto")}
    if with_compile:
        providers["compile"] = E2EProvider("torch", "compile")
        if device.type == "cuda":  # torch.compile with our ops inside the graph: a compiling GPU user's choice
            providers["compile-auto"] = E2EProvider("auto", "compile")
    if device.type == "cuda":
        providers["cudagraph"] = E2EProvider("auto", "cudagraph")
        providers["cudagraph-eager"] = E2EProvider("torch", "cudagraph")
    return providers


def _inputs(device, dims, B: int, T: int):
    torch.manual_seed(1)
    xs = [torch.randn(B, dims[0], device=device)] + [torch.randn(B, T, d, device=device) for d in dims[1:]]
    return xs, torch.randn(B, 1, device=device)


class _Runner:
    """One provider's callable for a task, built and warmed up; `first` is its first result (the
    loss of the first training step, or the inference output), checked against eager's."""

    def __init__(self, model, head, xs, y, task: str, provider: E2EProvider, device, autocast=None):
        self.compiled: Optional[ProvenCompile] = None
        self.status = "ok"
        model.backend = provider.backend
        params = [*model.parameters(), *head.parameters()]

        def forward(xs_):
            if autocast is None:
                return head(model(xs_))
            # A CUDA graph replays the casts it captured: autocast's cache of cast weights must be off.
            with torch.autocast(device.type, dtype=autocast, cache_enabled=provider.wrap != "cudagraph"):
                return head(model(xs_))

        if provider.wrap == "compile":
            self.compiled = ProvenCompile(forward, fresh=False)  # (_rows resets once for all its providers)
            forward = self.compiled
        opt = torch.optim.Adam(params, lr=1e-3, capturable=provider.wrap == "cudagraph")

        def train_step():
            loss = nn.functional.mse_loss(forward(xs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        def infer():
            with torch.no_grad():
                return forward(xs)

        step = train_step if task == "train" else infer
        if provider.wrap == "compile":
            with record_backend_choice() as chosen:  # (what the trace took)
                self.compiled.warm_up(lambda: self._keep_first(step), times=1)
            self.ran = "torch (inductor)" if provider.backend == "torch" else describe_backends(chosen) + " in inductor"
            self.status = self.compiled.check() or "ok"
        elif provider.wrap == "cudagraph":
            with record_backend_choice() as chosen:
                self._keep_first(step)
            self.ran = describe_backends(chosen) + " in a CUDA graph"
            step = _capture(step, device)
        else:
            with record_backend_choice() as chosen:
                self._keep_first(step)
            self.ran = describe_backends(chosen)
        self.step = step

    def _keep_first(self, step):
        self.first = step().detach().float()


def _capture(step: Callable[[], object], device) -> Callable[[], None]:
    """The step captured in a CUDA graph (warm-up on a side stream first, as torch.cuda.graph wants)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def e2e_rows(device, variants: Sequence[Variant], providers: Dict[str, E2EProvider], quick: bool, progress,
             deadline=None, compile_sizes: Optional[int] = None,
             after_each: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Rows for every variant x size x task x provider. compile_sizes: compile only at the first n
    sizes of each variant (None: all); the others are marked. after_each(rows so far) runs after each
    (size, task): the caller saves them (a run killed later keeps them)."""
    rows = []
    for variant in variants:
        for i, (B, T) in enumerate(variant.sizes):
            with_compile = compile_sizes is None or i < compile_sizes
            for task in ("train", "inference"):
                rows += _rows(device, variant, B, T, task, providers, quick, with_compile, deadline)
                progress.step(f"e2e {variant.name} {task} B={B}")
                if after_each is not None:
                    after_each(rows)
    return rows


def _row(variant: Variant, B, T, task, provider, **extra) -> dict:
    return dict(variant=variant.name, description=variant.description, inputs=variant.inputs, task=task,
                dtype="float32" + (f", {str(variant.autocast).replace('torch.', '')} autocast" if variant.autocast else ""),
                provider=provider, B=B, T=T, K=len(INPUTS[variant.inputs]), dims=list(INPUTS[variant.inputs]),
                threads=torch.get_num_threads(), **extra)


def _rows(device, variant, B, T, task, providers, quick, with_compile, deadline) -> List[dict]:
    def marked(status, names=providers):
        return [_row(variant, B, T, task, p, status=status, ran=None) for p in names]

    if deadline is not None and deadline.passed():
        return marked("skipped (time limit)")
    dims = INPUTS[variant.inputs]
    try:
        torch.manual_seed(0)
        base = variant.build(dims).to(device)
    except NotAvailable as exc:
        return marked(f"n/a: {exc}")
    torch.manual_seed(0)
    base_head = nn.Linear(FUSED, 1).to(device)
    xs, y = _inputs(device, dims, B, T)

    runners: Dict[str, _Runner] = {}
    status: Dict[str, str] = {}
    ran: Dict[str, Optional[str]] = {}
    torch._dynamo.reset()  # once: a reset between this row's compiled providers would drop the first's graphs
    for name, provider in providers.items():
        if provider.wrap == "compile" and not with_compile:
            status[name] = "not compiled in --quick (first size only)"
            continue
        try:
            runner = _Runner(copy.deepcopy(base), copy.deepcopy(base_head), xs, y, task, provider, device,
                             variant.autocast)
        except Exception as exc:  # the row says why; the others are still timed
            status[name] = fell_back_reason(error_text(exc), compiled=provider.wrap == "compile")
            continue
        ran[name] = runner.ran
        if runner.status != "ok":
            status[name] = runner.status
            continue
        runners[name] = runner

    if "eager" in runners:
        tol = TOLERANCE[variant.autocast or torch.float32]
        ref = runners["eager"].first
        for name, runner in list(runners.items()):
            err = relative_error(runner.first, ref)
            if not err <= tol:
                status[name] = f"wrong result: relative error {err:.2e} vs eager (bound {tol:g})"
                del runners[name]

    baselines, baseline_notes = _baseline_runners(variant, dims, device, base_head, xs, y, task, runners.get("eager"))
    with timed_region():
        measured = measure_side_by_side({**{n: r.step for n, r in runners.items()},
                                         **{_BASELINE + k: r.step for k, r in baselines.items()}}, device,
                                        min_time_s=0.2 if quick else 1.0, warmup=2)
    baseline_s = {k: measured[_BASELINE + k]["median_s"] for k in baselines
                  if "median_s" in measured[_BASELINE + k]}
    eager_s = measured.get("eager", {}).get("median_s")
    # After the timing: each count runs one more step, which moves those weights.
    flops = {k: gemm_flops(r.step) for k, r in (("model", runners.get("eager")),
                                                 ("late_fusion", baselines.get("late_fusion"))) if r is not None}
    if isinstance(variant.build, PFBuild) and "plain_pf" not in baselines and "plain_pf" not in baseline_notes \
            and eager_s:
        baseline_s["plain_pf"] = eager_s  # the variant is the plain PF (or this version cannot hoist)
    rows = []
    for name in providers:
        extra = dict(ran=ran.get(name))
        runner = runners.get(name)
        if runner is not None and runner.compiled is not None:
            extra.update(compile_s=runner.compiled.compile_s, graphs=runner.compiled.graphs)
        result = measured.get(name)
        if name in status:
            rows.append(_row(variant, B, T, task, name, status=status[name], **extra))
        elif "error" in result:
            why = fell_back_reason(result["error"], compiled=runner.compiled is not None)
            rows.append(_row(variant, B, T, task, name, status=why, **extra))
        elif runner.compiled is not None and runner.compiled.recompiled_since_check():
            rows.append(_row(variant, B, T, task, name, status=runner.compiled.recompiled_since_check(), **extra))
        else:
            median = result["median_s"]
            plain, late = baseline_s.get("plain_pf"), baseline_s.get("late_fusion")
            rows.append(_row(variant, B, T, task, name, status="ok", **extra, **result, baseline_s=baseline_s,
                             speedup_vs_eager=eager_s / median if eager_s else None,
                             speedup_vs_plain_pf=plain / median if plain else None,
                             cost_vs_late_fusion=median / late if late else None,
                             gemm_flops=flops.get("model"),
                             flops_vs_late_fusion=flops["model"] / flops["late_fusion"]
                             if len(flops) == 2 and flops["late_fusion"] else None,
                             **({"baseline_notes": baseline_notes} if baseline_notes else {})))
    return rows


_BASELINE = "baseline:"

_ATEN = torch.ops.aten
_GEMMS = (_ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default, _ATEN.baddbmm.default)


class _GemmFlops(TorchDispatchMode):
    """Counts the FLOPs of the matrix products a step runs. Not torch.utils.flop_counter: its module
    hooks (global ones) make ProgressiveFusion run unhoisted, and it does not see into our ops."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            a, b = args[-2], args[-1]  # (.., m, k) @ (.., k, n)
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def gemm_flops(step: Callable[[], object]) -> int:
    """The matrix-product FLOPs of one call of step, on the torch backend (our ops as ATen ops).
    Hoisting removes GEMMs, so the ratio of two models' counts is the floor of their cost ratio
    where GEMMs dominate (this class of encoder)."""
    with _GemmFlops() as counter:
        step()
    return counter.flops


def _baseline_runners(variant: Variant, dims, device, base_head, xs, y, task, eager: Optional[_Runner]
                      ) -> Tuple[Dict[str, _Runner], Dict[str, str]]:
    """The variant's baseline models on eager, built and warmed up, and why any was left out. The
    plain PF has the variant's weights (same seed, same layout): its result must equal the
    variant's eager one."""
    runners, notes = {}, {}
    for key, build in variant.baselines().items():
        try:
            torch.manual_seed(0)
            model = build(dims).to(device)
            runner = _Runner(model, copy.deepcopy(base_head), xs, y, task, E2EProvider("torch"), device,
                             variant.autocast)
        except NotAvailable:
            continue
        except Exception as exc:  # the rows say why; the providers are still timed
            notes[key] = error_text(exc)
            continue
        if key == "plain_pf":
            if eager is None:
                notes[key] = "no eager row to check it against"
                continue
            err = relative_error(runner.first, eager.first)
            if not err <= TOLERANCE[variant.autocast or torch.float32]:
                notes[key] = f"its result differs from the variant's eager one (relative error {err:.2e})"
                continue
        runners[key] = runner
    return runners, notes


__all__ = ["VARIANTS", "E2EProvider", "FELL_BACK", "e2e_providers", "e2e_rows", "select_variants"]
