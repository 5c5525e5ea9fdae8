"""The benchmark says what ran: every provider times a tiny case, the torch.compile column is a
compiled graph (proven), and a provider that falls back or errors is marked, not timed."""
import copy
import json

import pytest
import torch

import pf_kernels as pk
from benchmarks import e2e, report
from benchmarks.cases import EAGER, tiny_cases
from benchmarks.proof import FELL_BACK, ProvenCompile, fell_back_reason, record_backend_choice, timed_region
from benchmarks.run import Deadline, add_ratios, op_providers, time_group
from benchmarks.timing import measure_side_by_side
from pf_kernels._dispatch import resolve_backend

CPU = torch.device("cpu")
BACKPROJ, FUSION, REFINE = tiny_cases()


def _time(case, mode, providers, with_compile=True):
    rows = time_group(case, mode, torch.float32, CPU, providers, with_compile, min_time=0.0, deadline=Deadline(None))
    add_ratios(rows, copy_gbps=1.0, matmul_gflops={"torch.float32": 1.0})
    return {r["provider"]: r for r in rows}


# The providers `python -m benchmarks` has on this CPU. The triton backend serves CPU tensors only under
# its interpreter (switched on for the test session by conftest): a test of that backend, not of this.
PROVIDERS = [p for p in op_providers(CPU, with_compile=True) if p != "triton"]


def test_every_provider_times_a_tiny_case_and_compile_really_compiled():
    providers = PROVIDERS
    assert providers[0] == "eager" and "auto" in providers and providers[-1] == "compile"
    rows = _time(BACKPROJ, "fwd", providers)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert row["median_s"] > 0 and row["p20_s"] <= row["median_s"] <= row["p80_s"]
        assert row["threads"] == torch.get_num_threads() and row["dtype"] == "torch.float32"
        assert row["bytes"] == BACKPROJ.bytes("fwd", torch.float32) and row["fraction_of_copy_bw"] > 0
    assert rows["compile"]["ran"] == "inductor" and rows["compile"]["graphs"] >= 1
    assert rows["compile"]["compile_s"] > 0
    assert rows["auto"]["ran"] == resolve_backend("auto", "backproj_concat", CPU, torch.float32)
    for name in providers:
        if name not in ("eager", "auto", "compile"):
            assert rows[name]["ran"] == name


@pytest.mark.parametrize("case", [FUSION, REFINE], ids=["fusion_head", "refine_step"])
def test_fused_providers_time_fwd_and_bwd_of_every_op(case):
    providers = [p for p in PROVIDERS if p != "compile"]
    for mode in ("fwd", "fwd+bwd"):
        rows = _time(case, mode, providers)
        assert all(r["status"] == "ok" for r in rows.values()), {p: r["status"] for p, r in rows.items()}


def test_a_graph_break_is_marked_fell_back_not_timed():
    case = copy.copy(BACKPROJ)

    def call_with_a_graph_break(ops, *args):
        if ops is EAGER:  # what the compile provider compiles
            torch._dynamo.graph_break()
        return BACKPROJ.call(ops, *args)

    case.call = call_with_a_graph_break
    rows = _time(case, "fwd", ["eager", "compile"])
    assert rows["eager"]["status"] == "ok"
    assert rows["compile"]["status"].startswith(FELL_BACK) and "median_s" not in rows["compile"]


def test_a_recompile_while_timing_is_caught_not_run_eagerly():
    fn = ProvenCompile(lambda x: x * 2 + 1, backend="eager")  # the check is the same for every backend
    inputs = [torch.randn(3), torch.randn(4)]  # the second shape fails the first graph's guards
    fn.warm_up(lambda: fn(inputs[0]), times=1)
    assert fn.check() is None and fn.graphs == 1
    calls = iter(range(10**6))
    with timed_region():
        result = measure_side_by_side({"compile": lambda: fn(inputs[next(calls) % 2])}, CPU, min_time_s=0.0,
                                      warmup=1)
    assert "error" in result["compile"]
    assert fell_back_reason(result["compile"]["error"]).startswith(f"{FELL_BACK}: a guard failed")
    assert fn.recompiled_since_check() is None  # it raised instead of compiling a second graph


def test_a_frame_with_nothing_to_compile_is_reported():
    fn = ProvenCompile(lambda x: x, backend="eager")
    fn.warm_up(lambda: fn(torch.randn(2)), times=1)
    assert fn.check().startswith(FELL_BACK)


def test_an_erroring_or_wrong_provider_is_marked(monkeypatch):
    # The cuda backend cannot serve CPU tensors: asked for by name, it raises.
    rows = _time(BACKPROJ, "fwd", ["eager", "cuda"])
    assert rows["cuda"]["status"].startswith("error: ") and "median_s" not in rows["cuda"]
    real = pk.backproj_concat
    monkeypatch.setattr(pk, "backproj_concat", lambda x, z, w, b, act, backend: real(x, z, w * 1.1, b, act))
    rows = _time(BACKPROJ, "fwd", ["eager", "auto"])
    assert rows["auto"]["status"].startswith("wrong result")


def test_record_backend_choice_sees_what_auto_dispatched_to():
    x, z, w, b = BACKPROJ.make_inputs(CPU, torch.float32)
    with record_backend_choice() as chosen:
        pk.backproj_concat(x, z, w, b, backend="auto")
        pk.backproj_concat(x, z, w, b, backend="torch")
    assert chosen == [resolve_backend("auto", "backproj_concat", CPU, torch.float32), "torch"]
    assert pk.ops.resolve_backend is resolve_backend  # untouched


def test_a_graph_compiled_while_recording_runs_after_it_without_recompiling():
    # The e2e compile rows warm up inside record_backend_choice; they were all marked "fell back"
    # when the recording replaced resolve_backend, whose code object dynamo guards on.
    x, z, w, b = BACKPROJ.make_inputs(CPU, torch.float32)
    fn = ProvenCompile(lambda *a: pk.backproj_concat(*a, backend="auto"), backend="eager")
    with record_backend_choice() as chosen:
        fn.warm_up(lambda: fn(x, z, w, b), times=1)
    assert chosen == [resolve_backend("auto", "backproj_concat", CPU, torch.float32)]
    assert fn.check() is None
    with timed_region():
        torch.testing.assert_close(fn(x, z, w, b), pk.backproj_concat(x, z, w, b, backend="torch"))
    assert fn.recompiled_since_check() is None


def test_e2e_rows_say_what_ran_and_mark_unavailable_variants():
    tiny = e2e.Variant("tiny-pf", "tiny", "narrow", ((2, 3),), e2e.progressive_fusion(2))
    missing = e2e.Variant("tiny-x", "an option this version lacks", "narrow", ((2, 3),),
                          e2e.progressive_fusion(2, no_such_option=True))

    class Quiet:
        def step(self, what):
            pass

    providers = e2e.e2e_providers(CPU, [], with_compile=False)
    saved = []  # what a run killed later keeps: the rows after each (size, task)
    rows = e2e.e2e_rows(CPU, [tiny, missing], providers, quick=True, progress=Quiet(),
                        after_each=lambda so_far: saved.append(len(so_far)))
    assert saved == [len(providers) * k for k in range(1, 5)]
    ok = [r for r in rows if r["variant"] == "tiny-pf"]
    assert {(r["task"], r["provider"]) for r in ok} == {(t, p) for t in ("train", "inference") for p in providers}
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in ok), [r["status"] for r in ok]
    auto = next(r for r in ok if r["provider"] == "auto")
    # auto may pick per op (on a CPU: torch's fusion_head, the cpu back-projections)
    from pf_kernels._dispatch import OPS
    picks = {resolve_backend("auto", op, CPU, torch.float32) for op in OPS}
    assert auto["ran"] and set(auto["ran"].split("+")) <= picks, (auto["ran"], picks)
    assert next(r for r in ok if r["provider"] == "eager")["ran"] == "torch"
    assert all(r["status"].startswith("n/a") for r in rows if r["variant"] == "tiny-x")
    # The baselines (unhoisted PF, late fusion) were timed in the same rounds; the ratios use them.
    for r in ok:
        base = r["baseline_s"]
        assert set(base) == {"plain_pf", "late_fusion"} and "baseline_notes" not in r, r
        assert r["speedup_vs_plain_pf"] == pytest.approx(base["plain_pf"] / r["median_s"])
        assert r["cost_vs_late_fusion"] == pytest.approx(r["median_s"] / base["late_fusion"])
        # R=2 runs the encoders (after the first Linear), the head and the back-projections twice
        assert r["flops_vs_late_fusion"] > 1.0 and r["gemm_flops"] > 0, r


def test_e2e_two_compiled_providers_of_one_row_are_both_timed():
    """On a GPU each e2e row compiles the model twice (compile, compile-auto): building the second
    reset dynamo and dropped the first's graph, so the first (torch.compile of the eager model, the
    target's baseline) failed its guards while timed and was marked as fallen back."""
    tiny = e2e.Variant("tiny-pf", "tiny", "narrow", ((2, 3),), e2e.progressive_fusion(2))

    class Quiet:
        def step(self, what):
            pass

    providers = {"eager": e2e.E2EProvider("torch"), "compile": e2e.E2EProvider("torch", "compile"),
                 "compile-auto": e2e.E2EProvider("auto", "compile")}
    rows = e2e.e2e_rows(CPU, [tiny], providers, quick=True, progress=Quiet())
    assert {(r["task"], r["provider"]) for r in rows} == {(t, p) for t in ("train", "inference") for p in providers}
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows), [(r["provider"], r["status"]) for r in rows]


def test_e2e_providers_per_device():
    cpu = e2e.e2e_providers(CPU, ["cpu"], with_compile=True)
    assert {n: (p.backend, p.wrap) for n, p in cpu.items()} == {
        "eager": ("torch", None), "cpu": ("cpu", None), "auto": ("auto", None), "compile": ("torch", "compile")}
    # on a GPU also: the compiled model with auto's ops inside the graph, and both steps in a CUDA graph
    gpu = e2e.e2e_providers(torch.device("cuda"), ["cuda"], with_compile=True)
    assert {n: (p.backend, p.wrap) for n, p in gpu.items() if n not in cpu} == {
        "cuda": ("cuda", None), "compile-auto": ("auto", "compile"), "cudagraph": ("auto", "cudagraph"),
        "cudagraph-eager": ("torch", "cudagraph")}
    assert "compile-auto" not in e2e.e2e_providers(torch.device("cuda"), ["cuda"], with_compile=False)


def test_gemm_flops_counts_what_torch_flop_counter_counts_and_sees_hoisting():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    dims, B, T = (6, 5, 4), 3, 7
    xs = [torch.randn(B, dims[0])] + [torch.randn(B, T, d) for d in dims[1:]]

    def train_step(model):
        return lambda: model(xs).square().sum().backward()

    late = e2e.late_fusion(dims)
    late.backend = "torch"
    with FlopCounterMode(display=False) as reference:
        train_step(late)()
    assert e2e.gemm_flops(train_step(late)) == reference.get_total_flops() > 0
    counts = {}
    for hoist in (True, False):
        model = e2e.progressive_fusion(3, hoist=hoist)(dims)
        model.backend = "torch"
        assert bool(model.hoisted) == hoist
        counts[hoist] = e2e.gemm_flops(train_step(model))
    # x's part of each first Linear once instead of three times (forward, and its weight gradient)
    x_part = sum(2 * B * (T if j else 1) * d * e2e.HIDDEN for j, d in enumerate(dims))
    assert counts[False] - counts[True] >= 2 * 2 * x_part


def test_e2e_a_plain_baseline_left_out_is_not_replaced_by_the_variant(monkeypatch):
    # A plain PF that fails its check must leave the row without a "vs plain" ratio, not quote the
    # hoisted variant against itself.
    class Quiet:
        def step(self, what):
            pass

    def broken(dims):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(e2e.PFBuild, "plain", lambda self: broken)
    tiny = e2e.Variant("tiny-pf", "tiny", "narrow", ((2, 3),), e2e.progressive_fusion(2))
    rows = e2e.e2e_rows(CPU, [tiny], {"eager": e2e.E2EProvider("torch")}, quick=True, progress=Quiet())
    for r in rows:
        assert r["status"] == "ok" and "plain_pf" not in r["baseline_s"] and r["speedup_vs_plain_pf"] is None
        assert "cannot build" in r["baseline_notes"]["plain_pf"]


def test_e2e_the_unhoisted_variant_is_its_own_plain_baseline():
    plain = e2e.Variant("tiny-plain", "tiny", "narrow", ((2, 3),), e2e.progressive_fusion(2, hoist=False))
    assert set(plain.baselines()) == {"late_fusion"}
    assert e2e.progressive_fusion(2).plain() == e2e.progressive_fusion(2, hoist=False)
    late = e2e.Variant("tiny-late", "tiny", "narrow", ((2, 3),), e2e.late_fusion)
    assert late.baselines() == {}

    class Quiet:
        def step(self, what):
            pass

    providers = {"eager": e2e.E2EProvider("torch"), "auto": e2e.E2EProvider("auto")}
    rows = e2e.e2e_rows(CPU, [plain], providers, quick=True, progress=Quiet())
    for task in ("train", "inference"):
        eager = next(r for r in rows if r["task"] == task and r["provider"] == "eager")
        assert eager["status"] == "ok" and eager["baseline_s"]["plain_pf"] == eager["median_s"]
        assert eager["speedup_vs_plain_pf"] == 1.0


def test_compare_and_markdown_read_saved_runs(tmp_path):
    rows = list(_time(BACKPROJ, "fwd", ["eager", "auto"]).values())
    meta = dict(device="cpu", device_name="test cpu", threads=1, torch=torch.__version__, triton=None, date="2026-01-01",
                commit=None, providers=["eager", "auto"], dtypes=["torch.float32"], copy_gbps=1.0, argv=["--quick"])
    old = dict(meta=meta, rows=rows, e2e=[])
    slower = copy.deepcopy(old)
    for r in slower["rows"]:
        for k in ("median_s", "p20_s", "p80_s"):
            r[k] *= 10
    paths = []
    for name, result in (("old", old), ("new", slower)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    text = report.compare_text(json.loads(paths[1].read_text()), json.loads(paths[0].read_text()))
    assert text.count("slower") >= 2 and "10.00x time" in text
    table = report.markdown(old)
    assert "| `backproj_concat` | fwd | fp32 |" in table


def test_triton_host_time_runs_with_a_stand_in_driver():
    # Its own process: the stand-in must be Triton's driver before pf_kernels.triton is imported.
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PF_KERNELS_TRITON_CONFIG",
                                                            "PF_KERNELS_TRITON_AUTOTUNE")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.triton_host", "--ops", "fusion_head", "context_linear",
                           "--calls", "3"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("fusion_head"))
    # one launch forward; backward: act' and grad_h in one kernel, grad_weight/grad_bias in another
    assert " fwd " in line and "1 launches" in line and "3 launches" in line, line
    line = next(x for x in done.stdout.splitlines() if x.startswith("context_linear"))
    assert "us, 1 launches (" in line, line  # the forward in one launch


def test_profile_says_what_each_e2e_step_and_op_row_spends(tmp_path, monkeypatch):
    from benchmarks import profile
    tiny = e2e.Variant("tiny-pf", "tiny", "narrow", ((2, 3),), e2e.progressive_fusion(2))
    monkeypatch.setattr(e2e, "VARIANTS", [tiny])
    profile.main(["--device", "cpu", "--ops", "fusion_head", "--cases", "B=8 small", "--modes", "fwd",
                  "--calls", "2", "--e2e", "tiny-pf", "--providers", "eager", "auto", "no-such-provider",
                  "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    steps = [r for r in rows if r["op"] == "e2e tiny-pf"]
    assert {(r["mode"], r["provider"]) for r in steps} == \
        {(t, p) for t in ("train", "inference") for p in ("eager", "auto", "no-such-provider")}
    for r in steps:
        if r["provider"] == "no-such-provider":
            assert "no end-to-end provider" in r["error"], r
            continue
        # A training step runs more ops than inference; each row lists them and says what ran.
        assert r["wall_us"] > 0 and r["kernels_per_call"] > 0 and r["kernels"], r
        assert r["ran"] and (r["provider"] != "eager" or r["ran"] == "torch"), r
    per_step = {(r["mode"], r["provider"]): r["kernels_per_call"] for r in steps if "error" not in r}
    assert per_step["train", "eager"] > per_step["inference", "eager"]
    ops = [r for r in rows if r["op"] == "fusion_head"]
    assert ops and all(r["case"] == "B=8 small" and r["mode"] == "fwd" for r in ops)
    text = (tmp_path / "profile.txt").read_text()
    assert "## e2e tiny-pf B=2 T=3 train float32 auto (ran: " in text and "## fusion_head B=8 small fwd" in text


# An ncu text report as Nsight Compute writes it with --nvtx (two kernels of one labelled row, one of
# another; units vary between ncu versions), and the same without NVTX lines.
_NCU_REPORT = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
[4242] python3.12@127.0.0.1
  void pf_kernels::cuda::(anonymous namespace)::backproj_concat_fwd_kernel<c10::BFloat16, float, 8, true>(pf_kernels::cuda::(anonymous namespace)::ForwardArgs<c10::BFloat16, float>) (32, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    NVTX Start/End Ranges:
      <default domain>
        <0,pf: backproj_concat B=8 T=50 typical fwd bf16 cuda>
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    Memory Throughput                 %        12.34
    DRAM Throughput                   %         1.23
    Duration                         us         9.71
    Compute (SM) Throughput           %         3.21
    ----------------------- ----------- ------------
    Section: Launch Statistics
    Registers Per Thread    register/thread              40
    Section: Occupancy
    Achieved Occupancy                %        11.52
    Section: Warp State Statistics
    Warp Cycles Per Issued Instruction           cycle        61.07
  void pf_kernels::cuda::(anonymous namespace)::context_grad_kernel<c10::BFloat16, c10::BFloat16, float, c10::BFloat16>(const T1 *, long, long, long) (1056, 1, 1)x(32, 8, 1), Context 1, Stream 13, Device 0, CC 9.0
    NVTX Start/End Ranges:
      <default domain>
        <1,pf: backproj_concat B=8 T=50 typical fwd+bwd bf16 cuda>
    Section: GPU Speed Of Light Throughput
    Duration                    nsecond        2,500
    Compute (SM) Throughput           %         1.50
  void pf_kernels::cuda::(anonymous namespace)::fusion_head_wmma_kernel<c10::BFloat16, c10::BFloat16, 32>(pf_kernels::cuda::LinearInputs) (64, 1, 1)x(128, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    NVTX Start/End Ranges:
      <default domain>
        <1,pf: backproj_concat B=8 T=50 typical fwd+bwd bf16 cuda>
    Section: GPU Speed Of Light Throughput
    Duration                    msecond         0.02
"""


def test_ncu_report_is_read_per_kernel_and_grouped_by_row():
    from benchmarks import ncu
    kernels = ncu.parse_report(_NCU_REPORT)
    assert [ncu.short_kernel_name(k["name"]) for k in kernels] == \
        ["backproj_concat_fwd_kernel", "context_grad_kernel", "fusion_head_wmma_kernel"]
    first, second, third = kernels
    assert first["label"] == "backproj_concat B=8 T=50 typical fwd bf16 cuda"
    assert (first["grid"], first["block"]) == ("32x1x1", "256x1x1")
    assert first["duration"] == pytest.approx(9.71) and first["sm_pct"] == pytest.approx(3.21)
    assert first["mem_pct"] == pytest.approx(12.34) and first["dram_pct"] == pytest.approx(1.23)
    assert first["registers"] == 40 and first["occupancy_pct"] == pytest.approx(11.52)
    assert first["cycles_per_issue"] == pytest.approx(61.07)
    assert second["duration"] == pytest.approx(2.5) and third["duration"] == pytest.approx(20.0)
    assert second["label"] == third["label"] == "backproj_concat B=8 T=50 typical fwd+bwd bf16 cuda"
    assert "registers" not in second  # a section the report lacks is left out, not made up
    lines = ncu.summary_lines(kernels, [first["label"], second["label"]])
    assert lines[1] == "## backproj_concat B=8 T=50 typical fwd bf16 cuda: 1 kernels, 9.71 us"
    assert lines[3] == "## backproj_concat B=8 T=50 typical fwd+bwd bf16 cuda: 2 kernels, 22.50 us"
    assert "?" in lines[4] and lines[4].split()[:2] == ["context_grad_kernel", "1056x1x1"]
    # Without NVTX lines: one group in launch order that lists the rows.
    bare = ncu.parse_report("\n".join(l for l in _NCU_REPORT.splitlines() if "pf: " not in l))
    assert [k["label"] for k in bare] == [None] * 3
    lines = ncu.summary_lines(bare, ["row a", "row b"])
    assert lines[1].startswith("## (no NVTX labels") and "row a; row b" in lines[1] and len(lines) == 5


def test_ncu_command_keeps_the_options_and_sections_this_ncu_has():
    from benchmarks import ncu
    args = ncu.ncu_command("ncu", "--clock-control arg\n--nvtx\n", "Identifier\nSpeedOfLight\nOccupancy\n",
                           "/o/ncu.txt", ["python", "-m", "benchmarks.ncu", "--workload"])
    assert args[args.index("--clock-control") + 1] == "none"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--section"] == ["SpeedOfLight", "Occupancy"]
    assert args[args.index("--profile-from-start") + 1] == "off" and args[-4:] == ["python", "-m", "benchmarks.ncu",
                                                                                 "--workload"]
    assert "--clock-control" not in ncu.ncu_command("ncu", "", "", "/o", ["w"])


def test_ncu_runs_its_workload_and_summarizes_what_ncu_wrote(tmp_path, monkeypatch, capsys):
    """The driver with a stand-in ncu that runs the workload (on the CPU) and writes the report above."""
    import stat
    import sys
    from benchmarks import ncu
    fake = tmp_path / "ncu"
    fake.write_text(f"""#!{sys.executable}
import subprocess, sys
args = sys.argv[1:]
if args in (["--help"], ["--list-sections"]):
    print("--clock-control" if args == ["--help"] else "SpeedOfLight")
    sys.exit(0)
log = args[args.index("--log-file") + 1]
workload = args[args.index("--section") + 2:]
open(log, "w").write({_NCU_REPORT!r})
sys.exit(subprocess.run(workload).returncode)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(ncu, "find_ncu", lambda: str(fake))
    out = tmp_path / "out"
    assert ncu.main(["--device", "cpu", "--only", "fusion_head B=8 small fwd bf16", "--e2e", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "benchmarks.ncu: 3 kernels profiled over 1 rows (exit 0)" in printed, printed
    assert "## backproj_concat B=8 T=50 typical fwd bf16 cuda: 1 kernels, 9.71 us" in printed
    assert (out / "ncu.txt").read_text() == _NCU_REPORT


def test_ncu_workload_runs_each_labelled_call_and_skips_without_ncu(monkeypatch, capsys):
    from benchmarks import ncu
    labels = ncu.run_workload(CPU, [torch.float32], ["pf-r3"], only="B=8 ", print_fn=lambda s: None)
    assert "fusion_head B=8 small fwd+bwd fp32 cpu" in labels and "e2e pf-r3 B=8 T=50 train cpu" in labels
    assert all("B=8 " in label for label in labels) and len(labels) == 9
    def listed(max_batch):  # the rows' labels, nothing built
        return [label for label, _ in ncu._rows(CPU, [torch.float32], [], max_batch)]
    # the CPU quick grid's B=4096 rows: left out by default (--max-batch 256)
    assert any("B=4096" in label for label in listed(10**6)) and not any("B=4096" in label for label in listed(256))
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    assert ncu.main(["--device", "cpu"]) == 0 and "SKIPPED" in capsys.readouterr().out


def test_ncu_workload_ends_in_time_for_ncu_to_write_its_report(tmp_path, monkeypatch, capsys):
    """ncu writes its report when the program ends: a workload still running at ncu's timeout left
    nothing. The workload stops starting rows in time, and a timed-out run keeps its row labels."""
    import stat
    import sys
    from benchmarks import ncu
    seen = []
    assert ncu.run_workload(CPU, [torch.float32], [], only="B=8 ", print_fn=seen.append, seconds=0) == []
    assert seen and "not profiled" in seen[0]
    fake = tmp_path / "ncu"  # prints a row, then outlives the timeout
    fake.write_text(f"#!{sys.executable}\nimport sys, time\n"
                    "if sys.argv[1:] in (['--help'], ['--list-sections']): sys.exit(0)\n"
                    "assert '--workload-seconds' in sys.argv\n"
                    "print('row 0: fusion_head B=8', flush=True); time.sleep(30)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(ncu, "find_ncu", lambda: str(fake))
    assert ncu.main(["--device", "cpu", "--timeout", "3", "--out", str(tmp_path / "out")]) == 1
    assert "over 1 rows (exit 124)" in capsys.readouterr().out


def test_fixed_costs_are_measured_and_bound_the_fwd_bwd_targets():
    from benchmarks.timing import host_floor
    floor = host_floor(CPU)
    assert 0 < floor["one_op_fwd_s"] < floor["one_op_fwd_bwd_s"], floor
    meta = dict(device="cuda", dtypes=["torch.bfloat16"], host_floor=dict(one_op_fwd_s=1e-5, one_op_fwd_bwd_s=2e-4))
    rows = [dict(op="fusion_head", case=f"B={B} typical", mode="fwd+bwd", dtype="torch.bfloat16", provider=p,
                 status="ok", median_s=t, speedup_vs_eager=e / t, params=dict(B=B))
            for B, e in ((8, 6e-4), (256, 2.4e-3)) for p, t in (("eager", e), ("auto", e / 1.5))]
    # eager over autograd's fixed cost: 3x and 12x, geomean 6x
    assert report.autograd_ceiling([r for r in rows if r["provider"] == "auto"], meta) == pytest.approx(6.0)
    text = report.targets(dict(meta=meta, rows=rows, e2e=[]))
    assert "fusion_head fwd+bwd geomean B <= 256: 1.50x" in text
    assert "(what autograd's fixed cost here leaves possible: 6.00x)" in text
    assert report.autograd_ceiling(rows, dict(meta, host_floor={})) is None


def test_gpu_targets_say_where_rows_they_cover_were_not_timed():
    """A target whose rows errored, fell back or were skipped read PASS or MISS from the rest (or,
    for auto vs torch.compile, vanished). Checked on the committed H100 run."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "nvidia-h100-80gb-hbm3.json")
    with open(path) as f:
        result = json.load(f)
    lines = report.targets(result).splitlines()
    assert any(line.startswith("  [PASS] bf16 fusion_head fwd+bwd geomean B <= 256") for line in lines), lines
    row = next(r for r in result["rows"] if r["op"] == "fusion_head" and r["mode"] == "fwd+bwd"
               and r["provider"] == "auto" and r["dtype"] == "torch.bfloat16" and r["params"]["B"] <= 256)
    row["status"] = "error: out of memory"
    compile_row = next(r for r in result["e2e"] if r["variant"] == "pf-r3" and r["provider"] == "compile"
                       and r["status"] == "ok")
    compile_row["status"] = "compile fell back: a guard failed while timing"
    pf = compile_row
    lines = report.targets(result).splitlines()
    head = next(line for line in lines if "bf16 fusion_head fwd+bwd geomean B <= 256" in line)
    assert head.startswith("  [ -- ]") and "1 row(s) not timed" in head and "out of memory" in head, head
    auto = next(line for line in lines if "bf16 auto vs eager" in line)
    assert auto.startswith("  [ -- ]") and "out of memory" in auto, auto
    compiled = next(line for line in lines if f"pf-r3 {pf['task']} B={pf['B']} auto vs torch.compile" in line)
    assert compiled.startswith("  [ -- ]") and "fell back" in compiled, compiled


def test_no_garbage_collection_inside_the_samples():
    import gc
    seen = []
    measure_side_by_side({"a": lambda: seen.append(gc.isenabled()), "b": lambda: None}, CPU, min_time_s=0.0,
                         warmup=1)
    assert seen[0] and not any(seen[2:]) and gc.isenabled()  # (warm-up and the calibration call run with it on)
