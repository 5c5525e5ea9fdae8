"""Tables from benchmark results: the console tables, the README's markdown, the targets, and the
comparison of two runs.

    python -m benchmarks.report show RESULTS.json               # the console tables again
    python -m benchmarks.report markdown RESULTS.json           # README tables (ops summary + end to end)
    python -m benchmarks.report compare NEW.json BASELINE.json  # per-row change; exit 0
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Dict, Iterable, List, Optional

import torch

import pf_kernels._dispatch as dispatch

OPS = ("backproj_concat", "fusion_head", "refine_step")


def geomean(values: Iterable[Optional[float]]) -> float:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def short_dtype(dtype: str) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
            "torch.float64": "fp64"}.get(dtype, dtype)


def auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """What backend="auto" resolves to for each op on this device and dtype."""
    try:
        chosen = {op: dispatch.resolve_backend("auto", op, device, dtype) for op in OPS}
    except TypeError:  # a rule that needs the sizes: each row says what ran
        return "per call (see each row)"
    names = set(chosen.values())
    return names.pop() if len(names) == 1 else ", ".join(f"{op}: {b}" for op, b in chosen.items())


def header(meta: dict) -> str:
    mm = ", ".join(f"{short_dtype(k)} {v:.0f}" for k, v in meta["matmul_gflops"].items())
    return (f"pf_kernels {meta['pf_kernels']} ({meta.get('commit') or 'no git'}) | torch {meta['torch']} | "
            f"triton {meta['triton']} | {meta['device']} ({meta['device_name']}) | threads {meta['threads']} | "
            f"{meta['date']}\nmeasured now: copy bandwidth {meta['copy_gbps']:.1f} GB/s (read + write), "
            f"matmul {mm} GFLOP/s (fp32 matmul precision: {meta['fp32_matmul_precision']})" + _fixed_cost_note(meta)
            + _load_note(meta))


def _fixed_cost_note(meta: dict) -> str:
    floor = meta.get("host_floor") or {}
    if "one_op_fwd_s" not in floor or "one_op_fwd_bwd_s" not in floor:
        return ""
    return (f"\nfixed costs here: one small op from Python {floor['one_op_fwd_s'] * 1e6:.1f} us, "
            f"under torch.autograd.grad {floor['one_op_fwd_bwd_s'] * 1e6:.1f} us (every fwd+bwd row pays the latter)")


def autograd_ceiling(rows: List[dict], meta: dict) -> Optional[float]:
    """The geometric mean over fwd+bwd rows of eager's time over one small op's forward+backward
    (meta host_floor): the speed-up a provider whose op cost nothing but autograd's fixed cost would show."""
    floor = (meta.get("host_floor") or {}).get("one_op_fwd_bwd_s")
    bounds = [r["speedup_vs_eager"] * r["median_s"] / floor for r in rows] if floor else []  # eager's time / floor
    return geomean(bounds) if bounds else None


def _load_note(meta: dict) -> str:
    load, cores = meta.get("load_average"), meta.get("cores")
    if load is None or not cores:
        return ""
    note = f"\nload average {load} on {cores} cores"
    if load > 0.75 * cores:
        note += (": other work shares this machine, so timings are noisy; multi-threaded code (OpenMP, inductor's "
                 "C++) suffers most, --threads 1 less")
    return note


# ---------------------------------------------------------------- per-op rows

def _mark(status: str) -> str:
    """A short cell for a row that was not timed; the reason is printed under the table."""
    for prefix, tag in (("compile fell back", "FELLBACK"), ("error", "ERROR"), ("wrong result", "WRONG"),
                        ("not compiled", "-q"), ("skipped", "skip"), ("n/a", "n/a")):
        if status.startswith(prefix):
            return tag
    return "?"


def _not_timed(notes) -> list:
    """The lines under a table naming each reason a row was not timed, with its rows (first 4)."""
    if not notes:
        return []
    out = ["", "not timed:"]
    for status, where in notes.items():
        shown = "; ".join(where[:4]) + (f"; and {len(where) - 4} more" if len(where) > 4 else "")
        out.append(f"  [{_mark(status)}] {status}\n      {shown}")
    return out


_WORDS = {"FELLBACK": "compile fell back", "ERROR": "error", "WRONG": "wrong result", "-q": "not compiled (--quick)",
          "skip": "skipped (time limit)", "n/a": "n/a"}


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 1e4 else f"{us:.0f}"


def summarize(rows: List[dict]) -> Dict[str, dict]:
    """Per op, mode, dtype and provider: the geometric mean speed-up over eager (and over B <= 256),
    the worst and best row, and how many rows were timed or marked."""
    summary = {}
    keys = sorted({(r["op"], r["mode"], r["dtype"], r["provider"]) for r in rows if r["provider"] != "eager"})
    for op, mode, dtype, provider in keys:
        sel = [r for r in rows if (r["op"], r["mode"], r["dtype"], r["provider"]) == (op, mode, dtype, provider)]
        ok = [r["speedup_vs_eager"] for r in sel if r["status"] == "ok" and r.get("speedup_vs_eager")]
        small = [r["speedup_vs_eager"] for r in sel if r["status"] == "ok" and r.get("speedup_vs_eager")
                 and r["params"]["B"] <= 256]
        summary[f"{op} {mode} {short_dtype(dtype)} {provider}"] = dict(
            op=op, mode=mode, dtype=dtype, provider=provider, geomean=geomean(ok),
            min=min(ok) if ok else None, max=max(ok) if ok else None, geomean_B_le_256=geomean(small),
            rows=len(ok), marked=len(sel) - len(ok))
    return summary


def summary_text(summary: Dict[str, dict]) -> str:
    lines = ["speed-up vs eager (geometric mean over the timed rows; min; max; geomean over B <= 256):"]
    for key, s in summary.items():
        if not s["rows"]:
            lines.append(f"  {key:40s} no timed rows ({s['marked']} marked)")
            continue
        lines.append(f"  {key:40s} geomean {s['geomean']:5.2f}x  min {s['min']:5.2f}x  max {s['max']:5.2f}x  "
                     f"B<=256 {s['geomean_B_le_256']:5.2f}x  ({s['rows']} rows"
                     + (f", {s['marked']} marked)" if s["marked"] else ")"))
    return "\n".join(lines)


def ops_table(rows: List[dict], providers: List[str]) -> str:
    """One table per dtype: time per provider (us), speed-up vs eager, what auto ran, and auto's GB/s,
    share of the copy bandwidth and of the floor. Marked cells are explained below the table."""
    out, notes = [], {}
    others = [p for p in providers if p != "eager"]
    for dtype in sorted({r["dtype"] for r in rows}, key=lambda d: d != "torch.float32"):
        head = (f"{'op':15s} {'case':20s} {'mode':7s} {'MB':>8s} {'MFLOP':>8s} |"
                + "".join(f"{p + ' us':>12s}" for p in providers) + " |"
                + "".join(f"{'x' + p:>9s}" for p in others)
                + f" | {'auto ran':9s} {'GB/s':>7s} {'%copy':>6s} {'%floor':>6s}")
        out += ["", f"== {short_dtype(dtype)} ==", head, "-" * len(head)]
        keyed: Dict[tuple, Dict[str, dict]] = {}
        for r in rows:
            if r["dtype"] == dtype:
                keyed.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r
        for (op, case, mode), by in keyed.items():
            any_row = next(iter(by.values()))
            line = f"{op:15s} {case:20s} {mode:7s} {any_row['bytes'] / 1e6:8.2f} {any_row['flops'] / 1e6:8.1f} |"
            for p in providers:
                r = by.get(p)
                if r is None:
                    cell = "-"
                elif r["status"] == "ok":
                    cell = _us(r["median_s"])
                else:
                    cell = _mark(r["status"])
                    notes.setdefault(r["status"], []).append(f"{op} {case} {mode} {short_dtype(dtype)} {p}")
                line += f"{cell:>12s}"
            line += " |"
            for p in others:
                r = by.get(p)
                line += f"{r['speedup_vs_eager']:9.2f}" if r and r["status"] == "ok" and r.get("speedup_vs_eager") \
                    else f"{'-':>9s}"
            auto = by.get("auto")
            if auto and auto["status"] == "ok":
                line += (f" | {str(auto.get('ran')):9s} {auto['gbps']:7.2f} {100 * auto['fraction_of_copy_bw']:5.1f}% "
                         f"{100 * auto['fraction_of_floor']:5.1f}%")
            else:
                line += f" | {'-':9s}"
            out.append(line)
    out += _not_timed(notes)
    return "\n".join(out).lstrip("\n")


# ---------------------------------------------------------------- end to end

def e2e_table(e2e: List[dict]) -> str:
    providers = list(dict.fromkeys(r["provider"] for r in e2e))
    head = (f"{'variant':20s} {'task':9s} {'B':>5s} {'T':>4s} |" + "".join(f"{p:>24s}" for p in providers)
            + f" | {'plain PF':>8s} {'late':>6s} {'auto/late':>9s} {'GEMMs/late':>10s} | {'auto ran':9s}")
    out = ["end to end (fp32, or the autocast its variant names): ms per step (speed-up vs the same model on eager; "
           "[vs the plain unhoisted PF on eager] where it differs); plain PF, late: those baselines on eager, ms, "
           "timed in the same rounds; auto/late: the auto step's cost relative to late fusion; GEMMs/late: the "
           "model's matrix-product FLOPs relative to late fusion's (the floor of auto/late where GEMMs dominate)",
           head, "-" * len(head)]
    notes: Dict[str, List[str]] = {}
    keyed: Dict[tuple, Dict[str, dict]] = {}
    for r in e2e:
        keyed.setdefault((r["variant"], r["task"], r["B"], r["T"]), {})[r["provider"]] = r
    for (variant, task, B, T), by in keyed.items():
        line = f"{variant:20s} {task:9s} {B:5d} {T:4d} |"
        for p in providers:
            r = by.get(p)
            if r is None:
                cell = "-"
            elif r["status"] == "ok":
                cell = f"{r['median_s'] * 1e3:.2f}"
                if r.get("speedup_vs_eager"):
                    cell += f" ({r['speedup_vs_eager']:.2f}x)"
                plain = r.get("speedup_vs_plain_pf")
                if plain and r.get("speedup_vs_eager") and abs(plain - r["speedup_vs_eager"]) > 1e-9:
                    cell += f"[{plain:.2f}]"
            else:
                cell = _mark(r["status"])
                notes.setdefault(r["status"], []).append(f"{variant} {task} B={B} {p}")
            line += f"{cell:>24s}"
        auto = by.get("auto") or {}
        base = next((r["baseline_s"] for r in by.values() if r.get("baseline_s")), {})
        line += " | " + " ".join(f"{base[k] * 1e3:{w}.2f}" if base.get(k) else f"{'-':>{w}s}"
                                 for k, w in (("plain_pf", 8), ("late_fusion", 6)))
        cost = auto.get("cost_vs_late_fusion")
        floor = next((r["flops_vs_late_fusion"] for r in by.values() if r.get("flops_vs_late_fusion")), None)
        line += f" {f'{cost:.2f}x' if cost else '-':>9s} {f'{floor:.2f}x' if floor else '-':>10s}"
        line += f" | {auto.get('ran') or '-'}"
        out.append(line)
    out += _not_timed(notes)
    compiles = [r for r in e2e if r.get("compile_s")]
    if compiles:
        out.append("compile time (outside the timing): " + ", ".join(
            f"{r['variant']} {r['task']} B={r['B']} {r['compile_s']:.1f} s" for r in compiles))
    return "\n".join(out)


# ---------------------------------------------------------------- targets (issues 12 and 14)

def _label(r: dict) -> str:
    if "op" in r:
        return f"{r['op']} {r['case']} {r['mode']} {short_dtype(r['dtype'])} {r['provider']}"
    return f"{r['variant']} {r['task']} B={r['B']} {r['provider']}"


def targets(result: dict) -> str:
    """The issues' targets, checked on this run's rows (GPU targets on CUDA, CPU ones on a CPU)."""
    rows, e2e, meta = result.get("rows", []), result.get("e2e", []), result["meta"]
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs_eager")]
    lines = []

    def check(what, value, bound, higher=True, fmt="{:.2f}x", untimed=()):
        """untimed: the rows the target covers that were not timed (error, fell back, skipped): the
        target is then not met on this run, whatever the timed rows say."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            lines.append(f"  [ -- ] {what}: no timed rows" + (f" ({untimed[0]['status']})" if untimed else ""))
            return
        good = value >= bound if higher else value <= bound
        target = f"(target {'>=' if higher else '<='} {fmt.format(bound)})"
        if untimed:
            lines.append(f"  [ -- ] {what}: {fmt.format(value)} over the timed rows {target}; {len(untimed)} "
                         f"row(s) not timed, e.g. {_label(untimed[0])}: {untimed[0]['status']}")
            return
        lines.append(f"  [{'PASS' if good else 'MISS'}] {what}: {fmt.format(value)} {target}")

    def ceiling(rows_):  # where autograd's fixed cost caps a fwd+bwd target, say so beside it
        bound = autograd_ceiling(rows_, meta)
        if bound is not None:
            lines.append(f"         (what autograd's fixed cost here leaves possible: {bound:.2f}x)")

    def sel(op, mode, provider="auto", dtype=None, among=None, **kw):
        return [r for r in (ok if among is None else among) if r["op"] == op and r["mode"] == mode
                and r["provider"] == provider and (dtype is None or r["dtype"] == dtype)
                and all(f(r) for f in kw.values())]

    def untimed(op, mode, dtype=None, **kw):
        return [r for r in sel(op, mode, dtype=dtype, among=rows, **kw) if r not in ok]

    if meta["device"].startswith("cuda"):
        for dt in meta.get("dtypes", []):
            d = short_dtype(dt)
            big = lambda r: r.get("bytes", 0) >= 64e6  # noqa: E731
            check(f"{d} backproj_concat fwd, rows >= 64 MB, worst share of copy bandwidth",
                  min((r["fraction_of_copy_bw"] for r in sel("backproj_concat", "fwd", dtype=dt, big=big)),
                      default=None), 0.85, fmt="{:.0%}", untimed=untimed("backproj_concat", "fwd", dt, big=big))
            rows_, missed = sel("backproj_concat", "fwd+bwd", dtype=dt), untimed("backproj_concat", "fwd+bwd", dt)
            check(f"{d} backproj_concat fwd+bwd geomean",
                  geomean(r["speedup_vs_eager"] for r in rows_) if rows_ else None, 1.5, untimed=missed)
            ceiling(rows_)
            check(f"{d} backproj_concat fwd+bwd worst row", min((r["speedup_vs_eager"] for r in rows_), default=None),
                  1.0, untimed=missed)
            small, large = (lambda r: r["params"]["B"] <= 256), (lambda r: r["params"]["B"] > 256)
            rows_ = sel("fusion_head", "fwd+bwd", dtype=dt, small=small)
            check(f"{d} fusion_head fwd+bwd geomean B <= 256",
                  geomean(r["speedup_vs_eager"] for r in rows_) if rows_ else None, 1.3,
                  untimed=untimed("fusion_head", "fwd+bwd", dt, small=small))
            ceiling(rows_)
            rows_ = sel("fusion_head", "fwd+bwd", dtype=dt, large=large)
            check(f"{d} fusion_head fwd+bwd worst row B > 256",
                  min((r["speedup_vs_eager"] for r in rows_), default=None), 0.95,
                  untimed=untimed("fusion_head", "fwd+bwd", dt, large=large))
            rows_ = sel("refine_step", "fwd", dtype=dt, small=small)
            check(f"{d} refine_step fwd worst row B <= 256", min((r["speedup_vs_eager"] for r in rows_), default=None),
                  2.0, untimed=untimed("refine_step", "fwd", dt, small=small))
            rows_ = [r for r in ok if r["provider"] == "auto" and r["dtype"] == dt]
            check(f"{d} auto vs eager, worst row of every op and mode (at most 3% slower)",
                  min((r["speedup_vs_eager"] for r in rows_), default=None), 1 / 1.03,
                  untimed=[r for r in rows if r["provider"] == "auto" and r["dtype"] == dt and r not in ok])
        train = [r for r in e2e if r["status"] == "ok" and r["variant"] == "pf-r3" and r["provider"] == "auto"]
        for task in ("train", "inference"):
            mine = [r for r in train if r["task"] == task]
            check(f"pf-r3 {task} auto vs eager, worst size",
                  min((r["speedup_vs_eager"] for r in mine), default=None), 1.3)
            for r in mine:
                comp = next((c for c in e2e if c["provider"] == "compile" and
                             (c["variant"], c["task"], c["B"], c["T"]) == ("pf-r3", task, r["B"], r["T"])), None)
                if comp is not None and comp["status"] == "ok":
                    check(f"pf-r3 {task} B={r['B']} auto vs torch.compile", comp["median_s"] / r["median_s"], 1.0)
                elif comp is not None and not comp["status"].startswith("not compiled"):
                    check(f"pf-r3 {task} B={r['B']} auto vs torch.compile", None, 1.0, untimed=[comp])
    else:
        for op in OPS:
            rows_ = sel(op, "fwd+bwd")
            if rows_:
                check(f"{op} fwd+bwd auto geomean", geomean(r["speedup_vs_eager"] for r in rows_), 1.0)
                ceiling(rows_)
                check(f"{op} fwd+bwd auto worst row", min(r["speedup_vs_eager"] for r in rows_), 0.97)
        # Issue 14: narrow inputs at every size; wide ones at B=64 (where hoisting removes most work).
        for inputs, bound, sizes in (("narrow", 1.1, None), ("wide", 2.0, {64})):
            best = [r for r in e2e if r["status"] == "ok" and r["inputs"] == inputs and r["task"] == "train"
                    and r["provider"] == "auto" and r["variant"].startswith("pf-r3") and r.get("speedup_vs_plain_pf")
                    and r.get("dtype", "float32") == "float32" and (sizes is None or r["B"] in sizes)]
            where = "worst size" if sizes is None else "B=" + ",".join(map(str, sorted(sizes)))
            if best:
                check(f"{inputs} inputs, PF training step, auto vs the plain eager model ({where}, best variant)",
                      min(max(r["speedup_vs_plain_pf"] for r in best if r["B"] == B) for B in {r["B"] for r in best}),
                      bound)
            costs = [r for r in best if r.get("cost_vs_late_fusion")]
            if inputs == "wide" and costs:
                check(f"wide inputs, PF training step (auto) relative to late fusion (eager) ({where}, best variant)",
                      max(min(r["cost_vs_late_fusion"] for r in costs if r["B"] == B) for B in {r["B"] for r in costs}),
                      1.3, higher=False)
                floored = [r for r in costs if r.get("flops_vs_late_fusion")]
                if floored:
                    below = any(r["cost_vs_late_fusion"] < 0.9 * r["flops_vs_late_fusion"] for r in floored)
                    lines.append(f"         (its GEMM FLOPs relative to late fusion's, the floor of that ratio: "
                                 f"{min(r['flops_vs_late_fusion'] for r in floored):.2f}x"
                                 + ("; a row well below it: a noisy run, time again)" if below else ")"))
    return ("targets:\n" + "\n".join(lines)) if lines else ""


# ---------------------------------------------------------------- markdown for the README

def markdown(result: dict) -> str:
    meta = result["meta"]
    rows, e2e = result.get("rows", []), result.get("e2e", [])
    out = [f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, {meta['threads']} threads, "
           f"{meta['date'][:10]}, `python -m benchmarks {' '.join(meta.get('argv') or [])}`".rstrip() +
           f" (copy bandwidth {meta['copy_gbps']:.0f} GB/s measured in the same run):", ""]
    summary = summarize(rows)
    providers = [p for p in meta["providers"] if p != "eager"]
    if summary:
        out += ["| op | mode | dtype | " + " | ".join(providers) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in providers) + " |"]
        for op in OPS:
            for mode in ("fwd", "fwd+bwd"):
                for dtype in meta["dtypes"]:
                    cells = []
                    for p in providers:
                        s = summary.get(f"{op} {mode} {short_dtype(dtype)} {p}")
                        if not s:
                            cells.append("–")
                        elif not s["rows"]:
                            cells.append("not timed")
                        else:
                            cells.append(f"{s['geomean']:.2f}x ({s['min']:.2f}–{s['max']:.2f})")
                    if any(c != "–" for c in cells):
                        out.append(f"| `{op}` | {mode} | {short_dtype(dtype)} | " + " | ".join(cells) + " |")
        out += ["", "Speed-up over eager PyTorch: geometric mean over the grid (worst – best row)."]
    if e2e:
        providers = [p for p in dict.fromkeys(r["provider"] for r in e2e) if p != "eager"]
        out += ["", "| model | task | B | eager | " + " | ".join(providers) + " | plain PF (eager) | late fusion (eager) |",
                "| --- | --- | --- | --- | " + " | ".join("---" for _ in providers) + " | --- | --- |"]
        keyed: Dict[tuple, Dict[str, dict]] = {}
        for r in e2e:
            keyed.setdefault((r["variant"], r["task"], r["B"], r["T"]), {})[r["provider"]] = r
        for (variant, task, B, T), by in keyed.items():
            eager = by.get("eager")
            if not eager or eager["status"] != "ok":
                continue
            cells = []
            for p in providers:
                r = by.get(p)
                if not r:
                    cells.append("–")
                elif r["status"] != "ok":
                    cells.append(_WORDS.get(_mark(r["status"]), r["status"][:40]))
                else:
                    cells.append(f"{r['median_s'] * 1e3:.2f} ms ({r['speedup_vs_eager']:.2f}x)")
            base = eager.get("baseline_s") or {}
            cells += [f"{base[k] * 1e3:.2f} ms" if base.get(k) else "–" for k in ("plain_pf", "late_fusion")]
            out.append(f"| {variant} | {task} | {B} | {eager['median_s'] * 1e3:.2f} ms | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------- comparison of two runs

def _key_op(r):
    return ("op", r["op"], r["case"], r["mode"], r["dtype"], r["provider"])


def _key_e2e(r):
    return ("e2e", r["variant"], r["task"], r["B"], r["T"], r["provider"])


def compare_text(new: dict, baseline: dict) -> str:
    """Per row present and timed in both runs: new median / old median. A change counts only where
    the two runs' p20-p80 ranges do not overlap (else it is printed as ~, within the noise)."""
    nm, bm = new["meta"], baseline["meta"]
    out = [f"compared with {bm.get('device_name')} {bm.get('date')} (torch {bm.get('torch')}, commit "
           f"{bm.get('commit')}): time new/old per row; 'slower'/'faster' where the p20-p80 ranges do not overlap"]
    if nm.get("device_name") != bm.get("device_name") or nm.get("threads") != bm.get("threads"):
        out.append(f"WARNING: the baseline ran on {bm.get('device_name')} ({bm.get('threads')} threads), this on "
                   f"{nm.get('device_name')} ({nm.get('threads')} threads): differences are not only the code's")
    old = {**{_key_op(r): r for r in baseline.get("rows", [])}, **{_key_e2e(r): r for r in baseline.get("e2e", [])}}
    changes, counts = [], {"slower": 0, "faster": 0, "~": 0, "status changed": 0, "new": 0}
    for r in [*new.get("rows", []), *new.get("e2e", [])]:
        key = _key_op(r) if "op" in r else _key_e2e(r)
        b = old.get(key)
        label = " ".join(str(k) for k in key[1:]).replace("torch.", "")
        if b is None:
            counts["new"] += 1
            continue
        if (r["status"] == "ok") != (b["status"] == "ok"):
            counts["status changed"] += 1
            changes.append((math.inf, f"  {label:70s} {_state(b)} -> {_state(r)}"))
            continue
        if r["status"] != "ok":
            continue
        ratio = r["median_s"] / b["median_s"]
        if r["p20_s"] > b["p80_s"]:
            verdict = "slower"
        elif r["p80_s"] < b["p20_s"]:
            verdict = "faster"
        else:
            verdict = "~"
        counts[verdict] += 1
        changes.append((abs(math.log(ratio)), f"  {label:70s} {b['median_s'] * 1e6:10.1f} -> {r['median_s'] * 1e6:10.1f} us"
                        f"  {ratio:5.2f}x time  {verdict}"))
    changes.sort(key=lambda c: -c[0])
    out += [c[1] for c in changes]
    timed = [c for c in changes if c[0] != math.inf]
    out.append("rows: " + ", ".join(f"{v} {k}" for k, v in counts.items())
               + (f"; geomean time new/old {_geo_ratio(new, old):.3f}" if timed else ""))
    return "\n".join(out)


def _geo_ratio(new: dict, old: dict) -> float:
    ratios = []
    for r in [*new.get("rows", []), *new.get("e2e", [])]:
        b = old.get(_key_op(r) if "op" in r else _key_e2e(r))
        if b and r["status"] == "ok" and b["status"] == "ok":
            ratios.append(r["median_s"] / b["median_s"])
    return geomean(ratios)


def _state(r: dict) -> str:
    return f"{r['median_s'] * 1e6:.1f} us" if r["status"] == "ok" else f"[{r['status'][:60]}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show").add_argument("results")
    sub.add_parser("markdown").add_argument("results")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("new")
    cmp_.add_argument("baseline")
    args = parser.parse_args(argv)
    with open(args.results if args.command != "compare" else args.new) as f:
        result = json.load(f)
    if args.command == "show":
        print(header(result["meta"]))
        if result.get("rows"):
            print(ops_table(result["rows"], result["meta"]["providers"]))
            print(summary_text(summarize(result["rows"])))
        if result.get("e2e"):
            print(e2e_table(result["e2e"]))
        text = targets(result)
        if text:
            print(text)
    elif args.command == "markdown":
        print(markdown(result))
    else:
        with open(args.baseline) as f:
            print(compare_text(result, json.load(f)))


if __name__ == "__main__":
    main()
