"""Rewriting a captured graph: choose among the patterns' matches, swap in the fused calls."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List

import torch.nn.functional as F
from torch import fx

from .. import ops
from .._dispatch import implements
from ..reference import apply_activation
from .patterns import PATTERNS, GraphFacts, Match, Miss, value, where
from .report import ConversionReport


class FusedCalls:
    """What a rewritten graph calls: one object per converted model, so that convert() with another
    backend switches a converted model without capturing it again. The ops are looked up on
    pf_kernels.ops at each call."""

    def __init__(self, backend: str):
        self.backend = backend

    def fusion_head(self, hs, weight, bias, activation):
        lead = hs[0].shape[:-1]
        if len(lead) == 1:
            return ops.fusion_head(hs, weight, bias, activation, backend=self.backend)
        # Inputs with positions (B, *S, D_j): the same head on every position's row.
        rows = [h.reshape(-1, h.shape[-1]) for h in hs]
        out = ops.fusion_head(rows, weight, bias, activation, backend=self.backend)
        return out.reshape(*lead, out.shape[-1])

    def x_projection(self, x, weight, bias, start, stop):
        """x's part of a Linear over cat([x, context]): the weight sliced here, in the forward, so its
        gradient flows to the user's Parameter."""
        return F.linear(x, weight[:, start:stop], bias)

    def context_linear(self, p, z, bp_weight, bp_bias, weight, start, stop, activation, out_activation):
        # (a backend without context_linear: the reference ops then, like ProgressiveFusion's unhoisted path)
        backend = self.backend if implements(self.backend, "context_linear") else "torch"
        return ops.context_linear(p, z, bp_weight, bp_bias, weight[:, start:stop], activation, out_activation,
                                  backend=backend)

    @staticmethod
    def activation(y, name):
        return apply_activation(y, name)

    def backproj_concat(self, x, z, weight, bias, activation, dim):
        if dim == x.dim() - 1:
            return ops.backproj_concat(x, z, weight, bias, activation, backend=self.backend)
        # Features in another dim (a channels-first image): the op on the features-last view, made
        # contiguous as torch.cat returns it here (code after it may .view() it), channels-last
        # images included (the expanded context is in no channels-last layout).
        out = ops.backproj_concat(x.movedim(dim, -1), z, weight, bias, activation, backend=self.backend)
        return out.movedim(-1, dim).contiguous()


def _conflicts(a: Match, b: Match) -> bool:
    """Whether a and b cannot both be swapped: they fuse a node in common, or one reads a node the
    other makes dead (reading the other's anchor is fine: it is replaced by the fused call)."""
    return bool(a.nodes & b.nodes or set(a.inputs) & (b.nodes - {b.anchor})
                or set(b.inputs) & (a.nodes - {a.anchor}))


def choose(matches: List[Match], order: Dict[fx.Node, int]):
    """Greedy: the matches that fuse the most ops first (ties: pattern rank, then graph order).
    Returns (kept, [(lost, winner)])."""
    kept, lost = [], []
    for m in sorted(matches, key=lambda m: (-m.score, m.rank, order[m.pivot])):
        winner = next((k for k in kept if _conflicts(m, k)), None)
        if winner is None:
            kept.append(m)
        else:
            lost.append((m, winner))
    return kept, lost


def _numbered(items, key):
    """Numbers the sites that one line of code makes several times (an unrolled loop): ' [2/3]'."""
    totals = Counter(key(i) for i in items)
    seen: Counter = Counter()
    out = []
    for item in items:
        k = key(item)
        seen[k] += 1
        out.append((item, f" [{seen[k]}/{totals[k]}]" if totals[k] > 1 else ""))
    return out


def _apply(graph: fx.Graph, kept: List[Match], calls: FusedCalls) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced: Dict[fx.Node, fx.Node] = {}

    def remap(node):
        while node in replaced:
            node = replaced[node]
        return node

    for m in sorted(kept, key=lambda m: order[m.anchor]):
        with graph.inserting_before(m.anchor):
            fused = m.emit(graph, remap, calls)
        fused.meta.update({k: v for k, v in m.anchor.meta.items() if k in ("example_value", "stack_trace",
                                                                              "nn_module_stack")})
        m.anchor.replace_all_uses_with(fused)
        replaced[m.anchor] = fused
    # Erase what the fused calls made dead: only the patterns' own nodes, never anything else
    # (dynamo's graphs may hold nodes whose effect is not visible as a use).
    walked = {n for m in kept for n in m.walked}
    for node in sorted(walked, key=lambda n: -order[n]):
        if not node.users:
            graph.erase_node(node)


def rewrite_graph(gm: fx.GraphModule, calls: FusedCalls, report: ConversionReport) -> Counter:
    """Swaps the fused ops into gm in place; writes what it did and did not do into report.
    Returns the number of swaps per op."""
    graph = gm.graph
    facts = GraphFacts(graph)
    order = facts.order
    matches: List[Match] = []
    misses: List[Miss] = []
    for pattern in PATTERNS:
        for found in pattern.find(graph, facts):
            why = facts.problem(found) if isinstance(found, Match) else None
            if why:
                found = Miss(found.pivot, found.formula, found.where, why)
            (matches if isinstance(found, Match) else misses).append(found)
    kept, lost = choose(matches, order)
    covered = {n for m in kept for n in m.nodes | {m.pivot}}
    counts = Counter(m.op for m in kept)
    sharers = Counter(m.shared for m in kept if m.shared is not None)
    for m, suffix in _numbered(sorted(kept, key=lambda m: order[m.pivot]), lambda m: (m.op, m.where)):
        shared = "" if m.shared is None else f"; x's projection computed once for {sharers[m.shared]} sites" \
            if sharers[m.shared] > 1 else ("; x's projection computed for this site alone (no other step reads "
                                            "the same x in the same grad mode, with no write into it between)")
        report.add_replaced(m.op, f"{m.op}: {m.formula} | {m.where}{suffix}{shared}", site=(m.op, m.where, suffix))
    left = [(m.pivot, m.formula, m.where,
             f"read as {w.op} instead ({w.where}), which fuses {w.score} ops to this reading's "
             f"{m.score}{' (a tie goes to the pattern ranked first)' if w.score == m.score else ''}")
            for m, w in lost]
    left += [(x.pivot, x.formula, x.where, x.reason) for x in misses if x.pivot not in covered]
    left.sort(key=lambda t: order[t[0]])
    for (pivot, formula, site, reason), suffix in _numbered(left, lambda t: (t[1], t[2], t[3])):
        report.add_left_alone(f"{formula} | {site}{suffix}: not swapped: {reason}", site=(site, suffix, reason))
    for node in graph.nodes:  # a region captured as one call of a subgraph, which is not searched
        if node.op == "call_function" and "checkpoint" in getattr(node.target, "__name__", ""):
            report.add_left_alone(f"torch.utils.checkpoint region | {where(node)}: not searched: a pattern "
                                  "inside it is left as it is")
    if kept:
        backup = fx.Graph()
        backup.graph_copy(graph, {})
        try:
            _apply(graph, kept, calls)
            graph.lint()
            gm.recompile()
        except Exception as exc:  # a bug of ours must not break the user's model: run it unchanged
            gm.graph = backup
            gm.recompile()
            report.add_left_alone(f"rewriting a captured graph failed ({type(exc).__name__}: {exc}); "
                                  "it runs unchanged")
            return Counter()
    dynamic = any(not isinstance(s, int) for n in graph.nodes if n.op == "placeholder"
                  for s in (value(n).shape if value(n) is not None else ()))
    swaps = ", ".join(f"{n} {op}" for op, n in counts.items()) or "nothing to swap"
    report.captures.append(f"graph {len(report.captures) + 1} ({len(order)} nodes, "
                           f"{'dynamic' if dynamic else 'static'} shapes): {swaps}")
    return counts
