"""The triton backend's ops as torch.compile sees them on a GPU, checked with no GPU.

A stand-in Triton driver reports an sm_90 target, so pf_kernels.triton registers its real
torch.library.triton_ops (not the interpreter's custom_ops). AOTAutograd then traces every op and
its backward on fake tensors, through torch's analysis of what each kernel writes
(identify_mutated_tensors) and functionalization, as torch.compile does on a GPU. Checked:
- every graph output that a kernel produces is the one buffer passed in the slot that writes it:
  no other slot of that launch that the kernel may store through holds the same tensor (else
  functionalization returns the copy of one slot, taken before the kernel ran);
- kernels write only buffers the op allocated, never an input, and the launch that produces a
  returned buffer has programs to write it;
- no returned non-empty buffer is an allocation that nothing wrote;
- the fake implementation the interpreter's custom_op uses gives the same shapes, strides and
  dtypes as the real implementation run on fake tensors;
- nothing reads tensor data (fake tensors raise on it; no _local_scalar_dense in the graphs).

It runs in a subprocess (`python -m tests.test_triton_graph`): the interpreter session of the
other tests cannot switch drivers or re-register the ops.
"""
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_graphs_of_the_real_triton_ops_with_a_stand_in_driver():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("PF_KERNELS_TRITON_CONFIG", None)  # every config's grid is traced
    env.pop("PF_KERNELS_TRITON_AUTOTUNE", None)
    done = subprocess.run([sys.executable, "-m", "tests.test_triton_graph"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    report = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and report, (
        f"graph check failed (exit {done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    problems = [f"{r['case']}: {p}" for r in report for p in r["problems"]]
    assert not problems, "\n".join(problems)
    assert {r["case"] for r in report} >= {"fake:backproj_concat", "fake:fusion_head_backward",
                                           "fake:refine_step", "fake:context_linear_backward",
                                           "context_linear-chunks", "fake:refine_step_hoisted",
                                           "refine_step_hoisted-4mod-float32", "refine_step_hoisted-5mod-float32"}


# ---------------------------------------------------------------- the child process from here on

_VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "alias", "detach",
          "expand", "reshape", "as_strided", "unsqueeze", "squeeze", "split", "split_with_sizes",
          "contiguous", "clone", "_to_copy"}
_ALLOCS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "zeros_like"}


def _name(node):
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


def _source(node):
    """The node a value comes from, through views and getitem of a split."""
    while node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[1], int):
            node = node.args[0]
        elif _name(node) in _VIEWS:
            node = node.args[0]
        else:
            break
    return node


def check_graph(gm, what: str):
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    hop_target = torch.ops.higher_order.triton_kernel_wrapper_functional
    problems = []
    hops = [n for n in gm.graph.nodes if n.target is hop_target]

    def kernel_name(hop):
        kernel = kernel_side_table.get_kernel(hop.kwargs["kernel_idx"])
        kernel = getattr(kernel, "fn", kernel)
        return getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "?"))

    for n in gm.graph.nodes:
        if n.op == "call_function" and _name(n) in ("_local_scalar_dense", "item"):
            problems.append(f"{what}: reads tensor data ({n.format_node()})")
        if n.op == "call_function" and str(n.target).startswith("pf_kernels_triton."):
            problems.append(f"{what}: the op {n.target} stayed opaque (registered as custom_op, not triton_op)")
    for hop in hops:
        kwargs, written = hop.kwargs["kwargs"], hop.kwargs["tensors_to_clone"]
        for slot in written:
            src = _source(kwargs[slot])
            if src.op == "placeholder":
                problems.append(f"{what}: {kernel_name(hop)} writes through {slot} into an input of the op")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for i, value in enumerate(torch.utils._pytree.tree_leaves(out.args[0])):
        if not isinstance(value, torch.fx.Node):
            continue
        meta = value.meta.get("val")
        numel = meta.numel() if isinstance(meta, torch.Tensor) else 1
        src = _source(value)
        if src.target is operator.getitem and src.args[0] in hops:
            hop, slot = src.args[0], src.args[1]
            kwargs, written = hop.kwargs["kwargs"], hop.kwargs["tensors_to_clone"]
            buffer = kwargs[slot]
            shared = [s for s in written if s != slot and kwargs[s] is buffer]
            if shared and numel > 0:
                problems.append(f"{what}: output {i} is {kernel_name(hop)}'s slot {slot}, but its buffer is "
                                f"also passed in {shared}, which the kernel may write: the graph returns one "
                                f"slot's copy")
            empty_grid = [g for g in hop.kwargs["grid"] if 0 in tuple(g)]
            if empty_grid and numel > 0:
                problems.append(f"{what}: output {i} comes from {kernel_name(hop)} launched on an empty grid "
                                f"{empty_grid[0]}: nothing writes it")
        elif src.op == "call_function" and _name(src) in _ALLOCS and numel > 0:
            problems.append(f"{what}: output {i} ({tuple(meta.shape)}) is an allocation nothing writes")
    return problems, len(hops)


def _cases(torch, tr):
    """(name, function of tensors, tensors, kernels expected in the forward graph)."""
    def t(*shape, dtype=torch.float32, grad=True, transposed=False):
        if transposed:
            return torch.randn(*reversed(shape), dtype=dtype).t().requires_grad_(grad)
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    # fp32, and bf16 where a case's pointer types could matter
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).split(".")[-1]
        all_cases = dtype == torch.float32
        yield (f"backproj_concat-{tag}", lambda x, z, w, b: tr.backproj_concat(x, z, w, b, "gelu"),
               [t(3, 4, 5, dtype=dtype), t(3, 6, dtype=dtype), t(7, 6, dtype=dtype, transposed=True),
                t(7, dtype=dtype)])
        if all_cases:  # one batch row, many positions: the position sum in two stages
            yield ("backproj_concat-chunks", lambda x, z, w: tr.backproj_concat(x, z, w, None, "none"),
                   [t(1, 3000, 2), t(1, 5), t(4, 5)])
        for dims in ((3, 4), (1, 2, 3, 4, 5, 6, 7, 8), tuple(range(1, 11)), (0,))[:4 if all_cases else 1]:
            yield (f"fusion_head-K{len(dims)}-{'w0' if sum(dims) == 0 else sum(dims)}-{tag}",
                   lambda w, b, *hs: tr.fusion_head(list(hs), w, b, "tanh"),
                   [t(7, sum(dims), dtype=dtype), t(7, dtype=dtype)] + [t(5, d, dtype=dtype) for d in dims])
        if all_cases:
            yield ("fusion_head-nobias", lambda w, h0: tr.fusion_head([h0], w, None, "none"),
                   [t(4, 5, transposed=True), t(3, 5)])
        for n in (1, 2, 4, 5) if all_cases else (2,):  # 5 modalities: composed from the other ops
            shapes = [(3, 4), (3, 2, 5), (3, 2, 2, 3), (3, 6), (3, 1, 2)][:n]

            def step(hw, hb, h0, h1, *rest, n=n):
                xs, ws = list(rest[:n]), list(rest[n:2 * n])
                bs = [rest[2 * n] if j == 0 else None for j in range(n)]
                z, outs = tr.refine_step([h0, h1], hw, hb, xs, ws, bs, "gelu", "sigmoid")
                return (z, *outs)

            yield (f"refine_step-{n}mod-{tag}", step,
                   [t(6, 7, dtype=dtype), t(6, dtype=dtype), t(3, 3, dtype=dtype), t(3, 4, dtype=dtype)]
                   + [t(*s, dtype=dtype) for s in shapes] + [t(j + 2, 6, dtype=dtype) for j in range(n)]
                   + [t(2, dtype=dtype)])
        # context_linear: every out_act' path (none: grad_p is grad_out; relu: from the output; gelu:
        # from p), a transposed bp_weight, no bias; one batch row with many positions: the sum in two stages
        for out_act in ("none", "relu", "gelu") if all_cases else ("gelu",):
            yield (f"context_linear-{out_act}-{tag}",
                   lambda p, z, w, b, pw, out_act=out_act: tr.context_linear(p, z, w, b, pw, "tanh", out_act),
                   [t(3, 4, 5, dtype=dtype), t(3, 6, dtype=dtype), t(7, 6, dtype=dtype, transposed=True),
                    t(7, dtype=dtype), t(5, 7, dtype=dtype)])
        # refine_step_hoisted: 1, 2 and 4 modalities in one launch, 5 composed; out_act' from the output
        # (relu), from p (gelu) and none
        for n in (1, 2, 4, 5) if all_cases else (2,):
            shapes = [(3, 4), (3, 2, 5), (3, 2, 2, 3), (3, 6), (3, 1, 2)][:n]

            def hoisted(hw, hb, h0, h1, *rest, n=n):
                ps, ws, vs = list(rest[:n]), list(rest[n:2 * n]), list(rest[2 * n:3 * n])
                bs = [rest[3 * n] if j == 0 else None for j in range(n)]
                z, outs = tr.refine_step_hoisted([h0, h1], hw, hb, ps, ws, bs, vs, "gelu", "sigmoid",
                                                 ["relu", "gelu", "none", "tanh", "relu"][:n])
                return (z, *outs)

            yield (f"refine_step_hoisted-{n}mod-{tag}", hoisted,
                   [t(6, 7, dtype=dtype), t(6, dtype=dtype), t(3, 3, dtype=dtype), t(3, 4, dtype=dtype)]
                   + [t(*s, dtype=dtype) for s in shapes] + [t(j + 2, 6, dtype=dtype) for j in range(n)]
                   + [t(s[-1], j + 2, dtype=dtype) for j, s in enumerate(shapes)] + [t(2, dtype=dtype)])
        if all_cases:
            yield ("context_linear-chunks", lambda p, z, w, pw: tr.context_linear(p, z, w, None, pw, "none", "sigmoid"),
                   [t(1, 3000, 2), t(1, 5), t(4, 5), t(2, 4)])
    # Dz beyond the one-launch limit: composed
    yield ("refine_step-wide", lambda hw, h0, x, w: tr.refine_step([h0], hw, None, [x], [w], [None])[0],
           [t(130, 3), t(2, 3), t(2, 3, 4), t(5, 130)])


def _fake_cases(torch, tr):
    """(op name, args, the fake function the interpreter's custom_op registers)."""
    import importlib
    bp, fh, rs, cl, rsh = (importlib.import_module(f"pf_kernels.triton.{m}") for m in (
        "backproj_concat", "fusion_head", "refine_step", "context_linear", "refine_step_hoisted"))

    def t(*shape, dtype=torch.float32, transposed=False):
        return torch.randn(*reversed(shape), dtype=dtype).t() if transposed else torch.randn(*shape, dtype=dtype)

    for dtype in (torch.float32, torch.bfloat16):
        x, z, w, b = t(3, 4, 5, dtype=dtype), t(3, 6, dtype=dtype), t(7, 6, dtype=dtype, transposed=True), t(7, dtype=dtype)
        yield "backproj_concat", (x, z, w, b, "gelu"), bp._forward_fake
        yield "backproj_concat_backward", (t(3, 4, 12, dtype=dtype), z, w, b, "gelu", 5), bp._backward_fake
        hs = [t(5, 3, dtype=dtype), t(5, 4, dtype=dtype, transposed=True)]
        hw = t(6, 7, dtype=dtype, transposed=True)
        for save in (True, False):
            yield "fusion_head", (hs, hw, None, "gelu", save), fh._forward_fake
        yield "fusion_head_backward", (t(5, 6, dtype=dtype), hs, hw, t(5, 6), True, "gelu"), fh._backward_fake
        xs = [t(5, 4, dtype=dtype), t(5, 2, 3, dtype=dtype)]
        ws = [t(2, 6, dtype=dtype, transposed=True), t(3, 6, dtype=dtype)]
        yield ("refine_step", (hs, t(6, 7, dtype=dtype), t(6, dtype=dtype), xs, ws, [t(3, dtype=dtype)], 0b10,
                               "gelu", "tanh", True), rs._forward_fake)
        ps, vs = [t(5, 4, dtype=dtype), t(5, 2, 3, dtype=dtype)], [t(4, 2, dtype=dtype), t(3, 3, dtype=dtype)]
        for save in (True, False):
            yield ("refine_step_hoisted", (hs, t(6, 7, dtype=dtype), t(6, dtype=dtype), ps, ws, [t(3, dtype=dtype)],
                                           vs, 0b10, "gelu", "tanh", 1 | 2 << 3, save), rsh._forward_fake)
        p, pw = t(3, 4, 5, dtype=dtype).transpose(1, 2), t(4, 7, dtype=dtype)  # (3, 5, 4), H = 4
        yield "context_linear", (p, z, w, b, pw, "tanh", "gelu"), cl._forward_fake
        for out_act in ("none", "relu", "gelu"):
            saved_out = t(3, 5, 4, dtype=dtype) if out_act == "relu" else None
            yield ("context_linear_backward", (t(3, 5, 4, dtype=dtype), saved_out, p if out_act == "gelu" else None,
                                               z, w, None, pw, "tanh", out_act), cl._backward_fake)


def _meta(values):
    import torch
    return [(tuple(v.shape), tuple(v.stride()), str(v.dtype)) for v in torch.utils._pytree.tree_leaves(values)
            if isinstance(v, torch.Tensor)]


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from benchmarks.triton_host import install_stand_in_driver
    install_stand_in_driver(launches=False)  # tracing only: a launch or a benchmark raises
    import pf_kernels.triton as tr
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not tr.INTERPRET
    failed = False
    mode = FakeTensorMode()
    for name, fn, make_inputs in [(n, f, i) for n, f, i in _cases(torch, tr)]:
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm)

        problems = []
        try:
            with mode:
                inputs = [mode.from_tensor(x).requires_grad_(x.requires_grad) for x in make_inputs]
                outs = aot_function(fn, fw_compiler=capture, bw_compiler=capture)(*inputs)
                outs = [o for o in torch.utils._pytree.tree_leaves(outs) if isinstance(o, torch.Tensor)]
                torch.autograd.grad(outs, inputs, [torch.randn_like(o) for o in outs], allow_unused=True)
            if len(graphs) != 2:
                problems.append(f"expected a forward and a backward graph, got {len(graphs)}")
            for what, gm in zip(("forward", "backward"), graphs):
                found, kernels = check_graph(gm, what)
                problems += found
                if kernels == 0:
                    problems.append(f"{what}: no Triton kernel in the graph")
        except Exception as exc:  # report it as this case's failure, go on with the others
            problems.append(f"tracing raised {type(exc).__name__}: {exc}")
        failed |= bool(problems)
        print(json.dumps(dict(case=name, problems=problems)), flush=True)
    for op, args, fake in _fake_cases(torch, tr):
        problems = []
        try:
            with mode:
                args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
                real = getattr(torch.ops.pf_kernels_triton, op).default(*args)
                expected = fake(*args)
            if _meta(real) != _meta(expected):
                problems.append(f"fake {_meta(expected)} != real {_meta(real)}")
        except Exception as exc:
            problems.append(f"raised {type(exc).__name__}: {exc}")
        failed |= bool(problems)
        print(json.dumps(dict(case=f"fake:{op}", problems=problems)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
