"""The GPU check's CPU twins, so that `make gpu-check` cannot rot between GPU visits: the
orchestrator (its dry run, its time limits and summary), the differential check on the CPU
backends (and that it can fail), and the graph-capture script's eager halves."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.gpu import check, differential, graph_capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU does")
def test_dry_run_skips_every_part_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, "tests/gpu/check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("gpu-check ") and "no GPU" in summary[0]
    assert [line.split()[1].rstrip(":") for line in summary[1:]] == list(check.DEFAULT_PARTS)
    assert all(line.startswith("SKIPPED") for line in summary[1:])


@pytest.mark.parametrize("help_text", ["--kernel-name --check-bulk-copy", "--kernel-name", ""])
def test_sanitizer_flags(tmp_path, monkeypatch, help_text):
    # Seen on an H100 (2026-11-27): racecheck with the kernel filter stopped on a sanitizer error;
    # initcheck flagged every read of cuBLAS's TMA-stored output unless bulk copies are tracked.
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(f"#!/bin/sh\necho '{help_text}'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 2)
    parts = {p.name: p.command(ctx)[0] for p in check.PARTS if p.name in ("memcheck", "racecheck", "initcheck")}
    filtered = "--kernel-name" in help_text
    assert ("--kernel-name" in parts["memcheck"]) == filtered
    assert "--kernel-name" not in parts["racecheck"] and "--kernel-name" not in parts["initcheck"]
    bulk = "--check-bulk-copy" in help_text
    assert ("--check-bulk-copy" in parts["initcheck"]) == bulk
    assert all("--check-bulk-copy" not in parts[name] for name in ("memcheck", "racecheck"))
    for command in parts.values():
        assert command[0] == str(tool) and command[-1] == "tests/gpu/cuda_kernel_calls.py"


def test_parts_report_pass_fail_and_time_limits(tmp_path):
    def part(name, code, limit=30, log="checks.log"):
        return check.Part(name, limit, log, lambda ctx: [[sys.executable, "-c", code]],
                          check._pytest_counts)

    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 2)
    results = {}
    ok = check.run_parts([part("good", "print('3 passed in 0.1s')"),
                          part("bad", "import sys; print('1 failed, 2 passed'); sys.exit(1)"),
                          part("slow", "import time; time.sleep(30)", limit=2)], ctx, results)
    assert not ok
    assert results["good"].startswith("PASS good: 3 passed")
    assert results["bad"].startswith("FAIL bad: 1 failed, 2 passed")
    assert results["slow"].startswith("FAIL slow:") and "timed out" in results["slow"]
    assert "##### bad: FAIL" in (tmp_path / "checks.log").read_text()


def test_a_part_out_of_time_is_killed_with_its_children(tmp_path):
    """Only the part's own process was killed: the python a bash or compute-sanitizer part had started
    went on using the GPU beside the next parts, and the check waited for it (its output pipe stayed
    open), past the part's time limit."""
    code = ("import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
            "print('child', child.pid, flush=True); time.sleep(30)")
    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 2)
    results, start = {}, time.time()
    check.run_parts([check.Part("slow", 2, "checks.log", lambda ctx: [[sys.executable, "-c", code]],
                                check._pytest_counts)], ctx, results)
    assert "timed out" in results["slow"] and time.time() - start < 20
    pid = int(re.search(r"child (\d+)", (tmp_path / "checks.log").read_text()).group(1))
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the part's child {pid} outlived it")


def test_the_summary_is_written_after_every_group_of_parts(tmp_path, monkeypatch):
    """summary.txt was written only at the end: a run killed from outside (the device command's limit)
    lost every result. A later part reads it while it runs."""
    read = ("import os, sys; print(open(os.path.join(sys.argv[1], 'summary.txt')).read()); "
            "print('1 passed in 0.1s')")
    parts = [check.Part("first", 30, "checks.log", lambda ctx: [[sys.executable, "-c", "print('2 passed in 0.1s')"]],
                        check._pytest_counts),
             check.Part("later", 30, "bench.log", lambda ctx: [[sys.executable, "-c", read, ctx.out]],
                        check._pytest_counts, parallel=False)]
    monkeypatch.setattr(check, "PARTS", parts)
    monkeypatch.setattr(check, "probe", lambda: check.Context("", "stand-in GPU", "9.0", 2))
    assert check.main(["--out", str(tmp_path), "--parts", "first,later"]) == 0
    seen = (tmp_path / "bench.log").read_text()
    assert "so far (still running)" in seen and "PASS first: 2 passed" in seen, seen
    final = (tmp_path / "summary.txt").read_text()
    assert "still running" not in final and "PASS later: 1 passed" in final, final


def test_sanitizer_summary_names_the_kernels_of_the_printed_reports():
    # So that one GPU run says whose reads initcheck flags (on the first visit: ours, of cuBLAS output).
    report = "\n".join([
        "========= Uninitialized __global__ memory read of size 4 bytes",
        "=========     at void pf_kernels::cuda::(anonymous namespace)::context_grad_kernel<c10::Half, float>"
        "(const T1 *, long)+0x1a0 in backproj_concat_cuda.cu:167",
        "=========     by thread (0,0,0) in block (0,0,0)",
        "========= Uninitialized __global__ memory read of size 4 bytes",
        "=========     at 0x3a0 in void at::native::reduce_kernel<512, 1>(T2)",
        "========= Uninitialized __global__ memory read of size 2 bytes",
        "=========     at void pf_kernels::cuda::(anonymous namespace)::context_grad_kernel<c10::Half, float>(long)+0x10",
        "cuda_kernel_calls: 186 calls 186 passed, 0 failed",
        "========= ERROR SUMMARY: 73872 errors"])
    summary = check._sanitizer_summary(report, 1)
    assert summary.startswith("73872 errors (printed ones in: context_grad_kernel x2, reduce_kernel x1)"), summary
    assert check._sanitizer_summary("========= ERROR SUMMARY: 0 errors", 0).startswith("0 errors;")
    racecheck = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
    assert check._sanitizer_summary(racecheck, 0).startswith("0 errors;")  # it said '? errors' on a clean run


def test_timing_parts_run_one_at_a_time(tmp_path, monkeypatch):
    # bench, paths and profile time the GPU: started together they would slow each other down.
    stamp = "import time; a = time.time(); time.sleep(0.4); print('span', a, time.time())"
    parts = [check.Part(name, 30, "bench.log", lambda ctx: [[sys.executable, "-c", stamp]], check._last_lines("^span"),
                        parallel=name == "side")
             for name in ("side", "first", "second", "third")]
    monkeypatch.setattr(check, "PARTS", parts)
    monkeypatch.setattr(check, "probe", lambda: check.Context("", "stand-in", "9.0", 2))
    assert check.main(["--out", str(tmp_path), "--parts", "side,first,second,third"]) == 0
    spans = {}
    for line in (tmp_path / "summary.txt").read_text().splitlines()[1:]:
        name, _, a, b = line.split()[1].rstrip(":"), *line.split()[2:5]
        spans[name] = (float(a), float(b))
    order = ["first", "second", "third"]
    assert all(spans[x][1] <= spans[y][0] for x, y in zip(order, order[1:])), spans


def test_a_failed_parts_summary_quotes_its_own_output(tmp_path, monkeypatch):
    """Parts share a log; the summary quoted the log's end from the failed part's header on, which was
    whichever part wrote last (a passing one's lines under the failed one's name)."""
    fail = "import sys; print('the reason it failed'); sys.exit(1)"
    chatty = "import time; time.sleep(1); print('\\n'.join(f'graph line {i}' for i in range(60)))"
    parts = [check.Part("failing", 30, "checks.log", lambda ctx: [[sys.executable, "-c", fail]], check._pytest_counts),
             check.Part("chatty", 30, "checks.log", lambda ctx: [[sys.executable, "-c", chatty]], check._pytest_counts)]
    monkeypatch.setattr(check, "PARTS", parts)
    monkeypatch.setattr(check, "probe", lambda: check.Context("", "stand-in GPU", "9.0", 2))
    assert check.main(["--out", str(tmp_path), "--parts", "failing,chatty"]) == 1
    quoted = (tmp_path / "summary.txt").read_text().split("--- failing:")[1]
    assert "the reason it failed" in quoted and "graph line" not in quoted, quoted


def test_a_part_ends_when_its_process_ends(tmp_path):
    """A child that outlives a part's process (a daemon in its own session) and holds its stdout kept
    the part open until the child ended: later parts and the summary waited on it."""
    code = ("import subprocess, sys; child = subprocess.Popen(['sleep', '60'], start_new_session=True); "
            "print('child', child.pid, '1 passed in 0.1s', flush=True)")
    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 2)
    results, start = {}, time.time()
    try:
        assert check.run_parts([check.Part("daemon", 30, "checks.log", lambda ctx: [[sys.executable, "-c", code]],
                                           check._pytest_counts)], ctx, results)
        assert time.time() - start < 10 and results["daemon"].startswith("PASS daemon"), results
    finally:
        found = re.search(r"child (\d+)", (tmp_path / "checks.log").read_text())
        if found:
            os.kill(int(found.group(1)), 9)


def test_a_part_stops_at_its_first_failing_command(tmp_path):
    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 2)
    commands = [[sys.executable, "-c", "import sys; sys.exit(3)"], [sys.executable, "-c", "print('ran on')"]]
    results = {}
    assert not check.run_parts([check.Part("two", 30, "checks.log", lambda ctx: commands, check._pytest_counts)],
                               ctx, results)
    assert "ran on" not in (tmp_path / "checks.log").read_text()


def test_a_second_build_of_the_same_sources_only_checks_the_import(tmp_path, monkeypatch):
    """A second call on a machine still warm rebuilt everything (~80 s of a short call): the editable
    install builds in a fresh temporary folder each time."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "op.cu").write_text("// a kernel")
    (tmp_path / "setup.py").write_text("# setup")
    (tmp_path / "pf_kernels").mkdir()
    monkeypatch.setattr(check, "ROOT", str(tmp_path))
    monkeypatch.setattr(check, "BUILD_STAMP", str(tmp_path / "build" / "gpu-check.stamp"))
    ctx = check.Context(str(tmp_path), "stand-in", "9.0", 16)
    library = tmp_path / "pf_kernels" / "_C.cpython-312-x86_64-linux-gnu.so"

    def build(ctx=ctx, passes=True):
        """The build part's commands; the last (the stamp) runs where the build and its check pass."""
        commands = check.build_commands(ctx)
        if passes:
            library.write_text("a build") if "up to date" not in commands[0][-1] else None
            assert subprocess.run(commands[-1]).returncode == 0
        return commands

    first = build()
    assert len(first) == 3 and "MAX_JOBS=16" in first[0] and "available_backends" in first[1][-1]
    again = build()
    assert "up to date" in again[0][-1] and "available_backends" in again[1][-1], "the same sources: no build"
    assert "up to date" in build()[0][-1], "its check passed: the stamp stays"
    assert "up to date" not in build(check.Context(str(tmp_path), "stand-in", "8.0", 16))[0][-1], "another arch"
    build()
    library.write_text("a _C from elsewhere")  # (another size)
    assert "up to date" not in build()[0][-1], "the stamp vouched for another _C"
    build(passes=False)  # the build (or its check) fails: the next call builds again
    assert "up to date" not in build(passes=False)[0][-1]
    build()
    (tmp_path / "csrc" / "op.cu").write_text("// a kernel, changed")
    assert "up to date" not in build(passes=False)[0][-1]
    assert not (tmp_path / "build" / "gpu-check.stamp").exists(), "a stale stamp outlived a changed source"


def test_timing_parts_run_in_the_order_asked(tmp_path, monkeypatch):
    # A second call asks for build,ncu,profile: ncu, which must end before the deadline to write its
    # report, goes first.
    stamp = "import time; print('span', time.time())"
    parts = [check.Part(name, 30, "bench.log", lambda ctx: [[sys.executable, "-c", stamp]], check._last_lines("^span"),
                        parallel=False) for name in ("profile", "ncu")]
    monkeypatch.setattr(check, "PARTS", parts)
    monkeypatch.setattr(check, "probe", lambda: check.Context("", "stand-in", "9.0", 2))
    assert check.main(["--out", str(tmp_path), "--parts", "ncu,profile"]) == 0
    lines = (tmp_path / "summary.txt").read_text().splitlines()[1:]
    assert [line.split()[1].rstrip(":") for line in lines] == ["ncu", "profile"]
    assert float(lines[0].split()[3]) < float(lines[1].split()[3])


def test_ncu_ends_before_the_deadline():
    ctx = check.Context("/tmp/out", "stand-in", "9.0", 16, deadline=time.time() + 100)
    command = check.ncu_commands(ctx)[0]
    assert int(command[command.index("--timeout") + 1]) <= 85
    ctx.deadline = time.time() + 70  # too little for ncu to profile and write its report: not started
    assert "benchmarks.ncu" not in check.ncu_commands(ctx)[0]


def test_commands_build_through_pip_and_keep_to_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "BUILD_STAMP", str(tmp_path / "gpu-check.stamp"))  # (reading one removes it)
    ctx = check.Context("/tmp/out", "stand-in", "9.0", 16)
    build = check.build_commands(ctx)[0]
    assert "PF_KERNELS_FORCE_CUDA=1" in build and ("--no-build-isolation" in build or "build_ext" in build)
    tests = check.test_commands(ctx)[0]
    assert "--ignore=tests/gpu" in tests
    default = [p for p in check.PARTS if p.name in check.DEFAULT_PARTS]
    assert sum(p.limit_s for p in default if not p.parallel) + \
        max(p.limit_s for p in default if p.parallel) <= 600, "one device call is at most 10 minutes"


def test_differential_check_passes_on_the_cpu_backends(capsys):
    report = __import__("pf_kernels").available_backends()
    backends = [b for b in ("cpu", "triton") if report[b]["available"] and "cpu" in report[b]["devices"]]
    failures = differential.run("cpu", backends, seconds=240, seed=7, limits=False, max_cases=10,
                                budget=1 << 10)
    out = capsys.readouterr().out
    assert failures == 0, out
    for backend in backends:
        assert f"differential {backend}: 10 cases" in out


class _GradOffBy(torch.autograd.Function):
    """The identity whose backward is off by a factor: a kernel with a right forward, wrong gradients."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("dtype, off", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("where", ["output", "gradient"])
def test_differential_check_catches_a_wrong_kernel(dtype, off, where):
    import pf_kernels as pk
    import random

    class OffByALittle(differential.BackendOps):
        def __getattr__(self, op):
            fn = super().__getattr__(op)
            if where == "output":
                return lambda *args: [o * (1 + off) for o in differential._as_list(fn(*args))]
            return lambda *args: [_GradOffBy.apply(o, 1 + off) for o in differential._as_list(fn(*args))]

    rng = random.Random(3)
    case = differential.draw_case("fusion_head", dtype, "cpu", rng, 1 << 10)
    while case.tensors[0].shape[0] == 0:
        case = differential.draw_case("fusion_head", dtype, "cpu", rng, 1 << 10)
    assert differential.check_case(case, differential.BackendOps(pk, "torch"), 0) == []
    problems = differential.check_case(case, OffByALittle(pk, "torch"), 0)
    assert problems and (problems[0].startswith("output 0") if where == "output" else
                         all(p.startswith("grad") for p in problems))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_limit_checks_run_on_small_twins_and_can_fail(backend):
    # The GPU limit cases allocate gigabytes; their checkers on small inputs of the same layouts.
    import pf_kernels as pk
    if not pk.available_backends()[backend]["available"]:
        pytest.skip(f"{backend} backend not available here")
    names = [name for name, _, _ in differential.limit_cases("cpu", torch.float32)]
    assert len(names) == len(set(names)) and any(name.startswith("fusion_head") for name in names)

    def head():
        g = torch.Generator().manual_seed(5)
        return (torch.randn(37, 8, generator=g, dtype=torch.bfloat16),
                torch.randn(19, 8, generator=g, dtype=torch.bfloat16) * 8 ** -0.5,
                torch.randn(19, generator=g, dtype=torch.bfloat16))

    def backproj():
        g = torch.Generator().manual_seed(6)
        return (torch.randn(3, 5, 4, generator=g), torch.randn(3, 7, generator=g),
                torch.randn(6, 7, generator=g) * 7 ** -0.5, torch.randn(6, generator=g))

    ops = differential.BackendOps(pk, backend)
    assert differential.check_fusion_limit("twin", head, ops) == []
    assert differential.check_limit("twin", backproj, ops) == []

    class WrongGradient(differential.BackendOps):
        def __getattr__(self, op):
            fn = super().__getattr__(op)
            return lambda *args: _GradOffBy.apply(fn(*args), 1.5)

    assert [p.split(":")[0] for p in differential.check_fusion_limit("twin", head, WrongGradient(pk, backend))] \
        == ["grad_h", "grad_weight", "grad_bias"]
    assert differential.check_limit("twin", backproj, WrongGradient(pk, backend))


# Cases that failed on correct kernels before the reference rounded z and the context where the
# definition does, and before the fp32 yardsticks: 16-bit relu kinks on the other side of 0 (seed
# 20261127: 133, 3034), a one-element gradient where eager was lucky (4788), a gradient that is the
# small difference of terms 170x larger (seed 99: 1413, failed on the cpu backend only). Drawn as
# run() drew them then (its list of ops has grown since).
@pytest.mark.parametrize("seed, index, op, dtype", [
    (20261127, 133, "refine_step", torch.float16), (20261127, 3034, "context_linear", torch.float16),
    (20261127, 4788, "refine_step", torch.bfloat16), (99, 1413, "refine_step", torch.float16)])
def test_differential_check_holds_rounding_and_kinks_to_the_definition(seed, index, op, dtype):
    import itertools
    import random
    import pf_kernels as pk
    case_seed = next(itertools.islice(differential._case_seeds(seed), index, None))
    case = differential.draw_case(op, dtype, "cpu", random.Random(case_seed), differential.default_budget("cpu", "cpu"))
    report = pk.available_backends()
    for backend in [b for b in ("cpu", "torch") if report[b]["available"]]:
        assert differential.check_case(case, differential.BackendOps(pk, backend), grad_seed=index) == [], backend


def test_graph_capture_script_runs_its_eager_halves_on_cpu(capsys):
    assert graph_capture.main(["--device", "cpu", "--backends", "torch", "--steps", "2"]) == 0
    assert "graph torch: ok" in capsys.readouterr().out
