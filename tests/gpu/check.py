"""`make gpu-check`: everything a lent GPU machine must verify, in one prepared command.

Uses the python that runs it (no venv, no downloads), builds pf_kernels._C in place for the local
GPU's arch with every core, then runs, each part under its own time limit:
  tests         the tests of the GPU backends on the GPU (cuda and triton against the reference,
                autocast, torch.compile, opcheck, convert), one fixed Triton config per kernel
  configs       every Triton autotune config of every kernel on a few shapes
  differential  random shapes/layouts/dtypes/activations per GPU backend vs a float64 reference,
                plus the size limits (grids, shared memory, 32-bit offsets)
  memcheck, racecheck, initcheck
                compute-sanitizer over tiny calls of every CUDA kernel (tests/gpu/cuda_kernel_calls.py)
  graphs        a ProgressiveFusion training step captured in a CUDA graph and replayed vs eager
  bench         python -m benchmarks --device cuda --quick (results in bench/)
  profile       (on request) python -m benchmarks.profile: what bounds each op (results in profile/)
  ncu           (on request) python -m benchmarks.ncu: hardware counters of our kernels (profile/ncu.txt)
The parts after the build run side by side (16 cores), then the timing parts one at a time, in the
order --parts names them. A second call on the same machine with the same sources skips the compile.
Prints one PASS/FAIL/SKIPPED line per part, writes summary.txt and the logs and benchmark files
into one folder (results/gpu, or $OUT where that is set: at most 8 files). With no GPU every part
says SKIPPED and why, and it exits 0 (CI runs that dry run). Exit 1 if any part failed.

  make gpu-check [PYTHON=python3] [GPU_CHECK_ARGS="--parts build,tests --out DIR"]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


@dataclass
class Part:
    name: str
    limit_s: int
    log: str  # log file name in the output folder
    command: Callable[["Context"], Optional[List[List[str]]]]  # commands, or None = skip
    summarize: Callable[[str, int], str]  # (log text, return code) -> counts for the summary line
    parallel: bool = True
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    out: str
    gpu: Optional[str]
    arch: Optional[str]
    cores: int
    skip_reason: Optional[str] = None
    deadline: float = float("inf")  # time.time() after which no part starts and every part stops


def probe() -> Context:
    cores = os.cpu_count() or 1
    try:
        import torch
    except ImportError as exc:
        return Context("", None, None, cores, f"torch is not importable ({exc})")
    if not torch.cuda.is_available():
        return Context("", None, None, cores, f"no CUDA GPU visible to torch {torch.__version__}")
    major, minor = torch.cuda.get_device_capability()
    return Context("", torch.cuda.get_device_name(), f"{major}.{minor}", cores)


def _pytest_counts(text: str, rc: int) -> str:
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    return lines[-1].strip("= ") if lines else f"no pytest summary (exit {rc})"


def _last_lines(pattern: str):
    def summarize(text: str, rc: int) -> str:
        found = [l.strip() for l in text.splitlines() if re.search(pattern, l)]
        return "; ".join(found[-6:]) if found else f"exit {rc}, no summary line"
    return summarize


BUILD_STAMP = os.path.join(ROOT, "build", "gpu-check.stamp")


def _build_stamp(ctx: Context) -> str:
    """What the build depends on: the sources, the build script, torch and the GPU's arch."""
    digest = hashlib.sha256(f"{_versions()} {ctx.arch}".encode())
    paths = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True))
    for path in paths + [os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "pyproject.toml")]:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _built_library(root: str) -> str:
    """Which _C is in place (name, size, time): a stamp vouches for this one only."""
    return " ".join(f"{os.path.basename(p)}:{os.path.getsize(p)}:{os.stat(p).st_mtime_ns}"
                    for p in sorted(glob.glob(os.path.join(root, "pf_kernels", "_C*.so"))))


def write_build_stamp(sources: str, stamp: str, root: str) -> None:
    """After a build whose import check passed: what it was built from, and the _C it made."""
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(f"{sources} {_built_library(root)}")


_IMPORT_CHECK = ("import pf_kernels, json; r = pf_kernels.available_backends(); "
                 "print(json.dumps({k: v['available'] or v['reason'] for k, v in r.items()})); "
                 "assert r['cuda']['available'] and r['triton']['available'], 'a GPU backend is missing'")


def build_commands(ctx: Context):
    check = [PY, "-c", _IMPORT_CHECK]
    sources = _build_stamp(ctx)
    if os.path.exists(BUILD_STAMP):
        with open(BUILD_STAMP) as f:
            stamped = f.read()
        os.remove(BUILD_STAMP)  # written again only after a check that passes
        if stamped == f"{sources} {_built_library(ROOT)}":  # a second call on a machine still warm: ~80 s saved
            return [[PY, "-c", "print('_C is up to date: built from these sources by an earlier call here')"],
                    check, _stamp_command(sources)]
    # setup.py builds for the visible GPU's arch; FORCE_CUDA makes a silent CPU-only build
    # impossible; every core (setup.py's default reads memory, which a fresh VM may understate).
    env = ["env", "PF_KERNELS_FORCE_CUDA=1", f"MAX_JOBS={os.environ.get('MAX_JOBS', ctx.cores)}"]
    has_pip = subprocess.run([PY, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:  # the path a user takes (README): pip, no build isolation, offline, editable in place
        build = [*env, PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
    else:  # a venv made without pip: the same build, not through pip
        build = [*env, PY, "setup.py", "build_ext", "--inplace"]
    return [build, check, _stamp_command(sources)]


def _stamp_command(sources: str) -> List[str]:
    return [PY, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import check; check.write_build_stamp({sources!r}, {BUILD_STAMP!r}, {ROOT!r})"]


def test_commands(ctx: Context):
    # The tests a GPU adds to CI's: every test of a GPU backend or of mixed precision (CI runs the
    # CPU-only rest on every commit). Autotune sweeps are the configs part's.
    args = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests",
            "--ignore=tests/test_triton_aot.py", "--ignore=tests/gpu", "-m", "not slow",
            "-k", "(cuda or triton or autocast) and not every_autotune_config", "--durations", "15"]
    if importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(max(1, min(12, ctx.cores - 4)))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "240"]
    return [args]


def config_commands(ctx: Context):
    return [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             "tests/test_backend_triton.py", "-k", "every_autotune_config"]]


def differential_commands(ctx: Context):
    return [[PY, "tests/gpu/differential.py", "--device", "cuda", "--backends", "cuda,triton",
             "--seconds", "30", "--limits"]]


def sanitizer_commands(tool_name: str, filtered: bool):
    def commands(ctx: Context):
        tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        if not os.path.exists(tool):
            return None
        help_text = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
        # memcheck: our kernels only (torch's own are not ours to check). racecheck unfiltered: with
        # the filter it stopped on an internal error after a call that passes unfiltered (H100,
        # 2026-11-27). initcheck unfiltered, since memory written by unchecked kernels (randn, casts,
        # cuBLAS) would look uninitialised.
        flags = ["--kernel-name", "kns=pf_kernels"] if filtered and "--kernel-name" in help_text else []
        if tool_name == "initcheck" and "--check-bulk-copy" in help_text:
            # Hopper cuBLAS stores its output with TMA bulk copies, which initcheck only tracks when asked.
            flags += ["--check-bulk-copy", "yes"]
        return [[tool, "--tool", tool_name, "--error-exitcode", "1", "--print-limit", "20", *flags,
                 PY, "tests/gpu/cuda_kernel_calls.py"]]
    return commands


def graph_commands(ctx: Context):
    return [[PY, "tests/gpu/graph_capture.py", "--device", "cuda"]]


def bench_commands(ctx: Context):
    # --time-limit marks rows it cannot start in time as skipped (the part's limit is the backstop)
    return [[PY, "-m", "benchmarks", "--device", "cuda", "--quick", "--time-limit", "125",
             "--out", os.path.join(ctx.out, "bench")]]


def profile_commands(ctx: Context):
    # The end-to-end steps first: the ops' rows were profiled on earlier visits; what bounds a whole
    # launch-bound training step (issue 12's end-to-end target) was not.
    return [[PY, "-m", "benchmarks.profile", "--device", "cuda", "--dtype", "bf16", "--time-limit", "90",
             "--e2e", "pf-r3", "pf-r3-wide",
             "--out", os.path.join(ctx.out, "profile")]]


def ncu_commands(ctx: Context):
    # Hardware counters of our kernels (benchmarks/ncu.py): what bounds the slow ones, from a profile.
    # ncu writes its report only when the program ends: its timeout (and the workload's, 40 s less)
    # must end before the part's limit or --deadline kills it with nothing written.
    seconds = int(min(150, ctx.deadline - time.time() - 15))
    if seconds < 60:
        return [[PY, "-c", f"print('benchmarks.ncu: not run: {seconds} s left before --deadline, too few for ncu')"]]
    return [[PY, "-m", "benchmarks.ncu", "--out", os.path.join(ctx.out, "profile"), "--timeout", str(seconds)]]


def paths_commands(ctx: Context):
    return [["bash", "benchmarks/gpu.sh", "paths"]]


def _sanitizer_summary(text: str, rc: int) -> str:
    # memcheck and initcheck end with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK SUMMARY: N hazards
    # displayed (E errors, W warnings)".
    errors = re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)
    errors = [a or b for a, b in errors]
    calls = [l.strip() for l in text.splitlines() if l.startswith(("cuda_kernel_calls:", "FAIL"))]
    # Which kernels the printed reports are in (the first line after each report names it), so that
    # one run tells ours from cuBLAS's or torch's without a second visit.
    sites = re.findall(r"^=+ +(?:Uninitialized|Invalid|Race|Error|Warning|Malloc|Leaked)[^\n]*\n=+ +at (.*)$", text,
                       flags=re.MULTILINE)
    kernels = [re.split(r"[<(]", re.sub(r"^(0x[0-9a-f]+ in )?(void )?|\(anonymous namespace\)::", "", site))[0]
               .rsplit("::", 1)[-1] for site in sites]
    where = ", ".join(f"{name} x{count}" for name, count in Counter(kernels).most_common(4))
    return f"{'+'.join(errors) or '?'} errors" + (f" (printed ones in: {where})" if where else "") + "; " + \
        "; ".join(calls[-3:])


PARTS = [
    Part("build", 180, "tests.log", build_commands, _last_lines(r"^\{|Successfully installed|up to date|error"),
         parallel=False),
    Part("tests", 240, "tests.log", test_commands, _pytest_counts,
         env={"PF_KERNELS_TRITON_AUTOTUNE": "0", "PF_KERNELS_FAILURE_LOG": "{out}/failures.txt"}),
    Part("configs", 120, "checks.log", config_commands, _pytest_counts),
    Part("differential", 120, "checks.log", differential_commands, _last_lines(r"^differential |^FAIL"),
         env={"PF_KERNELS_TRITON_AUTOTUNE": "0"}),  # else every new case shape autotunes every config
    # Without torch's caching allocator every tensor is its own allocation: an access past a small
    # tensor's end is then out of bounds, not inside the allocator's larger block.
    Part("memcheck", 170, "checks.log", sanitizer_commands("memcheck", True), _sanitizer_summary,
         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    Part("racecheck", 200, "checks.log", sanitizer_commands("racecheck", False), _sanitizer_summary),
    Part("initcheck", 170, "checks.log", sanitizer_commands("initcheck", False), _sanitizer_summary),
    Part("graphs", 90, "checks.log", graph_commands, _last_lines(r"^graph ")),
    Part("bench", 180, "bench.log", bench_commands, _last_lines(r"geomean|wrote|rows"), parallel=False),
    # issue 12: the B=4096 rows on the plan's path, then forced to our kernels and to cuBLAS (--parts ...,paths)
    Part("paths", 200, "bench.log", paths_commands, _last_lines(r"^== |backproj_concat .* fwd \w+ cuda "), parallel=False,
         env={"OUT": "{out}", "PYTHON": PY}),
    # issue 12's profile: not run by default (--parts ...,profile), for a visit with time to spare
    Part("profile", 150, "bench.log", profile_commands, _last_lines(r"bound|wrote"), parallel=False),
    # issue 12: ncu over our kernels (--parts ...,ncu); with profile, a second call's worth
    Part("ncu", 180, "bench.log", ncu_commands, _last_lines(r"^benchmarks\.ncu"), parallel=False),
]
DEFAULT_PARTS = ("build", "tests", "configs", "differential", "memcheck", "racecheck", "initcheck", "graphs",
                 "bench")


class Running:
    def __init__(self, part: Part, ctx: Context, scratch: str):
        self.part, self.ctx = part, ctx
        self.commands = part.command(ctx)
        self.rc, self.start, self.index, self.proc = 0, time.time(), 0, None
        self.timed_out = False
        # Output goes to a file, not a pipe: the part ends when its process exits, whatever children
        # it left holding their stdout open (those are killed with its group).
        self.output = os.path.join(scratch, part.name + ".out")

    @property
    def text(self) -> str:
        with open(self.output, errors="replace") as f:
            return f.read()

    def start_next(self) -> bool:
        if self.index >= len(self.commands):
            return False
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                   **{k: v.format(out=self.ctx.out) for k, v in self.part.env.items()})
        with open(self.output, "a") as log:
            log.write(f"$ {' '.join(self.commands[self.index])}\n")
            log.flush()
            # Its own process group, killed whole when the part ends or runs out of time (the python
            # under bash or compute-sanitizer would go on using the GPU beside the next parts).
            self.proc = subprocess.Popen(self.commands[self.index], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.index += 1
        return True

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def poll(self) -> bool:
        """True when the part is finished."""
        if self.proc.poll() is None:
            left = min(self.part.limit_s - (time.time() - self.start), self.ctx.deadline - time.time())
            if left > 0:
                return False
            self._kill_group()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the driver: leave it, go on with the others
                pass
            with open(self.output, "a") as log:
                log.write(f"\n[timed out after {time.time() - self.start:.0f} s]\n")
            self.timed_out, self.rc = True, 124
            return True
        self._kill_group()  # what it left running
        self.rc = self.proc.returncode
        return self.rc != 0 or not self.start_next()  # a part stops at its first failing command


def run_parts(parts: List[Part], ctx: Context, results: Dict[str, str], tails: Optional[Dict[str, str]] = None,
              on_finish: Callable[[], None] = lambda: None) -> bool:
    """Runs the parts (side by side when parallel), writes their logs; True if all passed."""
    tails = {} if tails is None else tails
    ok = True
    running = []
    # the parts' raw output, outside the output folder (which brings back 8 files)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for part in parts:
            if ctx.skip_reason or ctx.deadline - time.time() < 20:
                why = ctx.skip_reason or "no time left before --deadline"
                results[part.name] = f"SKIPPED {part.name}: {why}"
                print(results[part.name], flush=True)
                continue
            r = Running(part, ctx, scratch)
            if r.commands is None:
                results[part.name] = f"SKIPPED {part.name}: its tool is not installed"
                print(results[part.name], flush=True)
                continue
            r.start_next()
            running.append(r)
        while any(r.proc is not None for r in running):
            for r in running:
                if r.proc is not None and r.poll():
                    r.proc = None
                    ok &= _finish(r, ctx, results, tails)
                    on_finish()  # the summary now: a run killed later keeps this part's line
            time.sleep(0.2)
    return ok


def _finish(r: Running, ctx: Context, results: Dict[str, str], tails: Dict[str, str]) -> bool:
    elapsed = time.time() - r.start
    status = "PASS" if r.rc == 0 else "FAIL"
    text = r.text
    counts = r.part.summarize(text, r.rc)
    results[r.part.name] = f"{status} {r.part.name}: {counts} ({elapsed:.0f} s" + \
        (", timed out)" if r.timed_out else ")")
    with open(os.path.join(ctx.out, r.part.log), "a") as f:
        f.write(f"##### {r.part.name}: {status}\n{text}\n")
    if status == "FAIL":  # the summary quotes it, so that the summary alone says why
        tails[r.part.name] = "\n".join(text.splitlines()[-40:])
    print(results[r.part.name], flush=True)
    return r.rc == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "results", "gpu"))
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS))
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from the start after which no part starts and running parts stop")
    args = parser.parse_args(argv)
    wanted = args.parts.split(",")
    unknown = set(wanted) - {p.name for p in PARTS}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; parts: {[p.name for p in PARTS]}")
    os.makedirs(args.out, exist_ok=True)
    for p in PARTS:
        log = os.path.join(args.out, p.log)
        if os.path.exists(log):
            os.remove(log)
    ctx = probe()
    ctx.out = args.out
    start = time.time()
    if args.deadline is not None:
        ctx.deadline = start + args.deadline
    versions = _versions()
    print(f"gpu-check: {ctx.gpu or 'no GPU'}; {versions}; {ctx.cores} cores", flush=True)

    results: Dict[str, str] = {}
    tails: Dict[str, str] = {}  # the last lines of each failed part's output
    # The timing parts run one at a time in the order asked for (a second call's `build,ncu,profile`
    # gives ncu the time first).
    by_name = {p.name: p for p in PARTS}
    selected = [by_name[name] for name in dict.fromkeys(wanted)]

    def write_summary(final: bool) -> float:
        """summary.txt after every part, so a run killed from outside keeps what finished."""
        total = time.time() - start
        lines = [f"gpu-check {datetime.date.today().isoformat()}: {ctx.gpu or 'no GPU'}; {versions}; "
                 f"{ctx.cores} cores; {total:.0f} s" + ("" if final else " so far (still running)")]
        lines += [results[p.name] for p in selected if p.name in results]
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
            for p in selected:  # (only failed parts have a tail)
                if p.name in tails:
                    f.write(f"\n--- {p.name}: last lines of its output ({p.log} has it all)\n{tails[p.name]}\n")
        return total

    def run(parts: List[Part]) -> bool:
        return run_parts(parts, ctx, results, tails, on_finish=lambda: write_summary(final=False))

    ok = True
    build = [p for p in selected if p.name == "build"]
    if build:
        ok &= run(build)
        if not ok:
            ctx.skip_reason = "the build failed"
    ok &= run([p for p in selected if p.parallel])
    for part in selected:  # the timing parts one at a time: side by side they would time each other
        if not part.parallel and part.name != "build":
            ok &= run([part])

    total = write_summary(final=True)
    print(f"gpu-check: {'all passed' if ok and not ctx.skip_reason else 'FAILED' if not ok else 'SKIPPED'}"
          f" in {total:.0f} s; summary in {os.path.join(args.out, 'summary.txt')}")
    return 0 if ok else 1


def _versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "triton"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except Exception:
            parts.append(f"{name} missing")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        parts.append(f"nvcc {m.group(1) if m else '?'}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
