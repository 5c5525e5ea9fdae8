"""The one build entry. Builds pf_kernels._C from csrc/ with torch's BuildExtension and ninja:
the CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA build of torch are present
(or PF_KERNELS_FORCE_CUDA=1). Knobs, all read from the environment:
  PF_KERNELS_FORCE_CUDA=1     build the CUDA kernels even where no GPU is visible (needs nvcc)
  PF_KERNELS_SKIP_EXTENSION=1 build no extension: the package runs on the torch backend
  TORCH_CUDA_ARCH_LIST        CUDA archs, default "8.0;9.0"
  MAX_JOBS                    parallel compile jobs, default from cores and memory
Install with `pip install --no-build-isolation .` so the extension builds against the torch you run.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[pf_kernels setup] {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def default_max_jobs() -> str:
    # Each nvcc/c++ job can take ~2 GiB; do not oversubscribe small machines.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 2))))


def sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def extensions_and_cmdclass():
    if env_flag("PF_KERNELS_SKIP_EXTENSION"):
        log("PF_KERNELS_SKIP_EXTENSION=1: building no extension; the torch backend serves every op")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        log("WARNING: torch is not importable in the build environment, so pf_kernels._C is NOT built "
            "and only the torch backend will be available. Install torch first, then "
            "`pip install --no-build-isolation .`")
        return [], {}
    cpp_sources = sources("csrc/*.cpp", "csrc/ops/*.cpp", "csrc/cpu/*.cpp")
    cuda_sources = sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    if not cpp_sources:
        log("no C++ sources under csrc/: building no extension")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log("WARNING: no C++ compiler found, so pf_kernels._C is NOT built; the torch backend serves every op")
        return [], {}

    force_cuda = env_flag("PF_KERNELS_FORCE_CUDA")
    has_cuda_torch = torch.version.cuda is not None
    with_cuda = bool(cuda_sources) and CUDA_HOME is not None and has_cuda_torch and (
        force_cuda or torch.cuda.is_available())
    if force_cuda and not with_cuda:
        raise RuntimeError(
            f"PF_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: CUDA_HOME={CUDA_HOME}, "
            f"torch {torch.__version__} built with CUDA {torch.version.cuda}, "
            f"{len(cuda_sources)} CUDA sources")
    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    define_macros = []
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 since 2.14,
    # whose ATen.h rejects C++17); a flag here would override it.
    cxx_flags = ["-O3", "-fopenmp", "-DPF_KERNELS_BUILD"]
    extra_compile_args = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        # The CUDA build of torch ships headers (e.g. cusparse.h) that a bare toolkit may lack.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        # No --use_fast_math: it turns tanhf into tanh.approx.f32 (relative error ~5e-4), too coarse
        # for fp32 outputs; precise math is a few instructions per output element (not measured).
        nvcc_flags = ["-O3", "-lineinfo", "-DPF_KERNELS_WITH_CUDA"]
        if env_flag("PF_KERNELS_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
        extra_compile_args["nvcc"] = nvcc_flags
        cxx_flags.append("-DPF_KERNELS_WITH_CUDA")
        ext = CUDAExtension("pf_kernels._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                            define_macros=define_macros, extra_compile_args=extra_compile_args,
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("pf_kernels._C", cpp_sources, include_dirs=include_dirs,
                           define_macros=define_macros, extra_compile_args=extra_compile_args,
                           extra_link_args=["-fopenmp"])
    log(f"building pf_kernels._C against torch {torch.__version__}: CPU kernels yes, CUDA kernels "
        f"{'yes, archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else 'no'} "
        f"(CUDA_HOME={CUDA_HOME}, torch CUDA {torch.version.cuda}, force={force_cuda}), "
        f"MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    packages=find_packages(include=["pf_kernels", "pf_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
