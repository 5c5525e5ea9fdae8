"""The one build entry. Builds pf_kernels._C from csrc/ with torch's BuildExtension and ninja: the
CPU kernels always, the CUDA kernels too when a CUDA toolkit and a CUDA build of torch are present
and a GPU is visible (or PF_KERNELS_FORCE_CUDA=1). Knobs, all read from the environment:
  PF_KERNELS_FORCE_CUDA=1     build the CUDA kernels even where no GPU is visible (needs nvcc and
                              a CUDA build of torch); fails if it cannot
  PF_KERNELS_SKIP_EXTENSION=1 build no extension: a pure-Python install on the torch backend
  TORCH_CUDA_ARCH_LIST        CUDA archs; unset: the visible GPUs' archs, else "8.0;9.0"
  MAX_JOBS                    parallel compile jobs; unset: from the cores and the memory

The kernels are compiled against the torch that is importable here, and the wheel's metadata pins
that torch version (its C++ ABI is only stable within one version). So install with torch already
installed and without build isolation: `pip install --no-build-isolation .`. Where torch is not
importable (pip's default isolated build environment has none), building the kernels stops with an
error that says so; PF_KERNELS_SKIP_EXTENSION=1 asks for a pure-Python install instead.
"""
import glob
import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext
from setuptools.command.build_py import build_py as setuptools_build_py
from setuptools.errors import SetupError

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(ROOT, "pf_kernels")
# The torch versions the test suite runs on (CI: 2.13 and 2.11; the CUDA build check: 2.11 in CI, 2.14.1 by hand). The
# dependency of a pure-Python install and of an sdist's metadata; a built wheel pins its own torch.
TORCH_TESTED = (2, 11), (2, 14)
TORCH_RANGE = "torch>={}.{},<{}.{}".format(*TORCH_TESTED[0], TORCH_TESTED[1][0], TORCH_TESTED[1][1] + 1)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
INSTALL = "pip install --no-build-isolation ."
# Written into the package next to _C and read at import by pf_kernels/_extension.py (not in git).
BUILD_INFO = "_build_info.py"


def log(msg: str) -> None:
    print(f"[pf_kernels setup] {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def default_max_jobs() -> int:
    # Each c++/nvcc job can take ~2 GiB; do not oversubscribe small machines.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(cores(), int(mem_gib // 2)))


def sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def cxx_runtime_link_args():
    """Links the shared C++ runtime this process (with torch) has loaded, by its path: `-lstdc++`
    wants the unversioned libstdc++.so, which a system without the dev package lacks, and then a
    compiler of its own (the GPU machine's /opt/gcc) takes its static libstdc++.a instead."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        paths = set()
    if len(paths) == 1:
        return [paths.pop()]
    return ["-Wl,--push-state,-Bdynamic", "-lstdc++", "-Wl,--pop-state"]


def cuda_archs(torch):
    """The CUDA archs to build for, and where that choice came from."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given, "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():  # build for this machine only: one arch halves the nvcc time
        devices = range(torch.cuda.device_count())
        caps = sorted({torch.cuda.get_device_capability(i) for i in devices})
        names = sorted({torch.cuda.get_device_name(i) for i in devices})
        return ";".join(f"{major}.{minor}" for major, minor in caps), f"the visible GPU ({', '.join(names)})"
    return DEFAULT_CUDA_ARCHS, "the default (no GPU visible)"


class Plan:
    """What this run of setup.py builds. `error` says why pf_kernels._C cannot be built: it is raised
    when the build runs (build_ext), not here, so that an sdist or the metadata still build."""

    def __init__(self):
        self.skip = env_flag("PF_KERNELS_SKIP_EXTENSION")
        self.error = None
        self.torch = None
        self.ext = None
        self.with_cuda = False
        self.archs = self.archs_from = None
        self.config = []  # (name, value) lines of the build configuration
        if not self.skip:
            self._plan_extension()

    def _fail(self, why: str, fix: str) -> None:
        self.error = (f"pf_kernels: cannot build its compiled kernels (pf_kernels._C): {why}\n{fix}\n"
                      "For a pure-Python install on purpose (the torch backend only, no compiled "
                      "kernels):\n    PF_KERNELS_SKIP_EXTENSION=1 pip install .")

    def _plan_extension(self):
        cpp_sources = sources("csrc/*.cpp", "csrc/ops/*.cpp", "csrc/cpu/*.cpp")
        cuda_sources = sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
        # Placeholder until torch is found: it makes the wheel a platform wheel and runs build_ext,
        # which raises self.error.
        self.ext = setuptools.Extension("pf_kernels._C", cpp_sources)
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
        except ImportError as exc:
            return self._fail(
                f"torch is not importable in this build environment ({exc}). pip builds in an isolated "
                "environment by default, which has no torch (it would have to download one, not "
                "necessarily the torch you run, and kernels built against another torch do not load).",
                "Install torch first, then pf_kernels without build isolation, so that the kernels are "
                f"compiled against the torch that will run them:\n    pip install torch\n    {INSTALL}"
                "        (or the sdist's path instead of '.')")
        self.torch = torch
        if not cpp_sources:
            return self._fail("no C++ sources under csrc/.", "This source tree or sdist is incomplete.")
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return self._fail(f"no C++ compiler ({cxx!r}, or $CXX) was found.",
                              f"Install one (e.g. g++), then {INSTALL}")

        force_cuda = env_flag("PF_KERNELS_FORCE_CUDA")
        has_cuda_torch = torch.version.cuda is not None
        self.with_cuda = bool(cuda_sources) and CUDA_HOME is not None and has_cuda_torch and (
            force_cuda or torch.cuda.is_available())
        if force_cuda and not self.with_cuda:
            return self._fail(
                f"PF_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: CUDA_HOME={CUDA_HOME}, "
                f"torch {torch.__version__} built with CUDA {torch.version.cuda}, "
                f"{len(cuda_sources)} CUDA sources.",
                "Install the CUDA toolkit (nvcc) and a CUDA build of torch, or unset PF_KERNELS_FORCE_CUDA.")
        os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

        # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 since 2.14,
        # whose ATen.h rejects C++17); a flag here would override it.
        # -g0: Python's CFLAGS carry -g, whose debug info for torch's templates makes the compile
        # about 4x slower (565 → 143 s of CPU here) and the library 25 MB instead of 0.8 MB.
        cxx_flags = ["-O3", "-g0", "-fopenmp", "-DPF_KERNELS_BUILD"]
        extra_compile_args = {"cxx": cxx_flags}
        include_dirs = [os.path.join(ROOT, "csrc")]
        link_args = ["-fopenmp"]
        if sys.platform.startswith("linux"):
            # The C++ runtime shared, as torch's: a compiler wrapper that links libstdc++ statically
            # (seen on a GPU machine) makes a second copy that crashes on the first error message.
            link_args += cxx_runtime_link_args()
        kwargs = dict(include_dirs=include_dirs, extra_compile_args=extra_compile_args,
                      extra_link_args=link_args)
        if self.with_cuda:
            self.archs, self.archs_from = cuda_archs(torch)
            os.environ["TORCH_CUDA_ARCH_LIST"] = self.archs  # what torch's BuildExtension compiles for
            # The CUDA build of torch ships headers (e.g. cusparse.h) that a bare toolkit may lack.
            site = os.path.dirname(os.path.dirname(torch.__file__))
            include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
            # No --use_fast_math: it turns tanhf into tanh.approx.f32 (relative error ~5e-4), too
            # coarse for fp32 outputs; precise math is a few instructions per output element (not measured).
            nvcc_flags = ["-O3", "-lineinfo", "-DPF_KERNELS_WITH_CUDA"]
            if env_flag("PF_KERNELS_PTXAS_VERBOSE"):
                nvcc_flags.append("-Xptxas=-v")
            extra_compile_args["nvcc"] = nvcc_flags
            cxx_flags.append("-DPF_KERNELS_WITH_CUDA")
            self.ext = CUDAExtension("pf_kernels._C", cpp_sources + cuda_sources, **kwargs)
        else:
            self.ext = CppExtension("pf_kernels._C", cpp_sources, **kwargs)

        lo, hi = TORCH_TESTED
        tested = lo <= tuple(int(p) for p in torch.__version__.split(".")[:2]) <= hi
        self.config = [
            ("torch", f"{torch.__version__} at {os.path.dirname(torch.__file__)}"
                      + ("" if tested else f"  (WARNING: outside the tested range {TORCH_RANGE})")),
            ("python", f"{sys.version.split()[0]} at {sys.executable}"),
            ("CPU kernels", f"yes ({len(cpp_sources)} sources, {cxx})"),
            ("CUDA kernels", f"yes, archs {self.archs} from {self.archs_from}" if self.with_cuda else
             "no" + (" (no CUDA sources)" if not cuda_sources else " (torch is a CPU build)"
                     if not has_cuda_torch else " (no CUDA toolkit found)" if CUDA_HOME is None else
                     " (no GPU visible; PF_KERNELS_FORCE_CUDA=1 builds them anyway)")),
            ("CUDA", f"CUDA_HOME={CUDA_HOME}, torch built with CUDA {torch.version.cuda}"),
            ("MAX_JOBS", f"{os.environ['MAX_JOBS']} ({cores()} cores)"),
            ("ninja", shutil.which("ninja") or "NOT FOUND: torch falls back to a slow serial build"),
            ("requires", f"torch=={public_version(torch.__version__)} (the torch built against)"),
        ]

    def install_requires(self):
        # A built wheel holds kernels for exactly this torch: pin it, as torchvision does. An sdist
        # is rebuilt where it is installed, so its metadata keeps the tested range.
        if self.torch is not None and self.error is None and "sdist" not in sys.argv[1:]:
            return [f"torch=={public_version(self.torch.__version__)}"]
        return [TORCH_RANGE]

    def build_info(self) -> str:
        built = self.torch is not None and self.error is None
        fields = {
            "EXTENSION": "skipped" if self.skip else "built",
            "TORCH_VERSION": self.torch.__version__ if built else None,
            "CUDA_VERSION": self.torch.version.cuda if built and self.with_cuda else None,
            "CUDA_ARCHS": self.archs if built and self.with_cuda else None,
        }
        return ("# Generated by setup.py when pf_kernels was built (not in git): what pf_kernels._C was\n"
                "# built against. Read at import by pf_kernels/_extension.py. EXTENSION is \"skipped\"\n"
                "# where PF_KERNELS_SKIP_EXTENSION=1 asked for a pure-Python install.\n"
                + "".join(f"{k} = {v!r}\n" for k, v in fields.items()))


def _elf():
    """pf_kernels/_elf.py, loaded by path: the package itself is not importable while it builds."""
    spec = importlib.util.spec_from_file_location("pf_kernels_elf", os.path.join(PACKAGE_DIR, "_elf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def public_version(version: str) -> str:
    return version.split("+")[0]  # 2.13.0+cpu -> 2.13.0, which torch==2.13.0 matches


PLAN = Plan()


def write_build_info(package_dir: str) -> None:
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_INFO), "w") as f:
        f.write(PLAN.build_info())


class BuildPy(setuptools_build_py):
    """Also writes the build info: into the wheel, or into the source tree for an editable install."""

    def run(self):
        super().run()
        if PLAN.skip:
            log("PF_KERNELS_SKIP_EXTENSION=1: building no extension; a pure-Python install, the torch "
                "backend serves every op (pf_kernels says so once at import)")
        if PLAN.error:
            return  # build_ext raises it; keep what an earlier build wrote
        editable = getattr(self, "editable_mode", False)
        write_build_info(PACKAGE_DIR if editable else os.path.join(self.build_lib, "pf_kernels"))


def build_ext_class():
    base = setuptools_build_ext
    if PLAN.torch is not None and PLAN.error is None:
        # ninja is BuildExtension's default. Not with_options(use_ninja=True): its keyword reaches
        # Command.__init__, which setuptools 77 rejects.
        from torch.utils.cpp_extension import BuildExtension as base

    class BuildExt(base):
        """Fails with PLAN.error where _C cannot be built; prints the build configuration; writes
        the build info next to _C (in place for `build_ext --inplace` and editable installs)."""

        def run(self):
            if PLAN.error:
                raise SetupError("\n" + PLAN.error)
            width = max(len(name) for name, _ in PLAN.config)
            banner = "=" * 30 + " pf_kernels._C build " + "=" * 30
            log("\n".join([banner] + [f"  {name:<{width}} : {value}" for name, value in PLAN.config]
                          + ["=" * len(banner)]))
            super().run()
            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built) and _elf().static_cxx_runtime(built):
                    raise SetupError(
                        f"\n{built} carries its own static copy of the C++ standard library "
                        f"(compiler {os.environ.get('CXX', 'c++')!r} links it statically): beside the "
                        "shared one torch uses it crashes the process on the first error message. "
                        f"Build with a compiler that links libstdc++ dynamically, e.g. CXX=g++ {INSTALL}")
            write_build_info(PACKAGE_DIR if self.inplace else os.path.join(self.build_lib, "pf_kernels"))

    return BuildExt


# project.license as an SPDX string needs setuptools >= 77 (PEP 639); older ones take it as the
# License field. So the license is given here (pyproject lists it as dynamic), in the form this
# setuptools understands.
if int(setuptools.__version__.split(".")[0]) >= 77:
    license_kwargs = {"license_expression": "BSD-3-Clause"}
else:
    license_kwargs = {"license": "BSD-3-Clause"}

setup(
    packages=find_packages(include=["pf_kernels", "pf_kernels.*"]),
    ext_modules=[] if PLAN.skip else [PLAN.ext],
    cmdclass={"build_py": BuildPy, "build_ext": build_ext_class()},
    install_requires=PLAN.install_requires(),
    # A wheel without _C runs anywhere (py3-none-any is its true tag), but its name says it holds
    # no kernels, and pf_kernels says so at import.
    options={"bdist_wheel": {"build_number": "0pure"}} if PLAN.skip else {},
    **license_kwargs,
)
