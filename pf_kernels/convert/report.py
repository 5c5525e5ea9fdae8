"""What convert() did: every swap, every near-miss with its whole reason, every captured graph."""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterator, List, NamedTuple, Optional, Set

from torch import nn

from .. import ops


@dataclass
class ConversionReport:
    """Live: torch.compile captures the model's forward at its first call (or at convert() when
    given example_inputs) and again whenever its guards fail (a new mode, dtype, device, input
    structure), and each capture adds what it found here. Entries are listed once each."""

    replaced: List[str] = field(default_factory=list)
    left_alone: List[str] = field(default_factory=list)
    backends_set: List[str] = field(default_factory=list)
    captures: List[str] = field(default_factory=list)
    # The fused op of each entry of `replaced`, in the same order.
    replaced_ops: List[str] = field(default_factory=list)
    # What makes an entry the same as an earlier one: its site in the code, not the shapes it was
    # captured with (a capture for a new sequence length listed every site again).
    seen: Set[Hashable] = field(default_factory=set, repr=False)

    def add_replaced(self, op: str, line: str, site: Optional[Hashable] = None) -> None:
        key = ("replaced", line if site is None else site)
        if key not in self.seen:
            self.seen.add(key)
            self.replaced.append(line)
            self.replaced_ops.append(op)

    def add_left_alone(self, line: str, site: Optional[Hashable] = None) -> None:
        key = ("left alone", line if site is None else site)
        if key not in self.seen:
            self.seen.add(key)
            self.left_alone.append(line)

    @property
    def counts(self) -> Dict[str, int]:
        """Sites swapped per fused op, e.g. {"fusion_head": 3, "backproj_concat": 6}."""
        return dict(Counter(self.replaced_ops))

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {op}" for op, n in self.counts.items()) or "nothing"
        lines = [f"pf_kernels.convert: {counts} swapped, {len(self.left_alone)} left alone, "
                 f"{len(self.backends_set)} module backend(s) set, {len(self.captures)} graph(s) captured"]
        if not self.captures and not self.left_alone:
            lines.append("  (no forward captured yet: the patterns are found at the first call, "
                         "or at convert() when given example_inputs)")
        lines += [f"  captured:   {c}" for c in self.captures]
        lines += [f"  replaced:   {r}" for r in self.replaced]
        lines += [f"  backend:    {b}" for b in self.backends_set]
        lines += [f"  left alone: {a}" for a in self.left_alone]
        return "\n".join(lines)


class Converted(NamedTuple):
    """(model, report), which also serves as the model: a call, or an attribute the pair lacks, goes
    to the model (`model = pf_kernels.convert(model)` works as well as `model, report = ...`)."""
    model: nn.Module
    report: ConversionReport

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # (protocols: copy, pickle, ... are the pair's own)
            raise AttributeError(name)
        return getattr(self.model, name)


@contextlib.contextmanager
def count_fused_calls() -> Iterator[Counter]:
    """Counts the calls of the fused ops a converted model makes (pf_kernels.ops.fusion_head,
    .backproj_concat, .context_linear) while the block runs, per op:

        with count_fused_calls() as calls:
            model(inputs)
        print(dict(calls))   # e.g. {"fusion_head": 3, "context_linear": 6}

    The check that a conversion took, in numbers: every call a swap makes, and every call made
    outside torch.compile (a pf_kernels.nn module run eagerly). A pf_kernels.nn module's calls inside
    a captured forward run as part of its graph and are not counted. The ops that do several in one
    call count as what they do: refine_step as a fusion_head and a backproj_concat per modality,
    refine_step_hoisted as a fusion_head and a context_linear per modality, backproj_concat_grouped
    as a backproj_concat per modality. Counting changes nothing the
    captured graphs depend on, so it never makes torch.compile capture again."""
    counts: Counter = Counter()
    previous = ops._fused_call_counters
    ops._fused_call_counters = previous + (counts,)
    try:
        yield counts
    finally:
        ops._fused_call_counters = previous
