"""What pf_kernels says at import about its compiled kernels (pf_kernels/_extension.py), from the build
info setup.py records (pf_kernels/_build_info.py): built for this torch, for another one, not built,
skipped on purpose. The installed flows themselves are checked by .ci/package_check.sh."""
import sys
import types
import warnings

import pytest
import torch

import pf_kernels
from pf_kernels import _extension


def build_info(extension="built", torch_version=torch.__version__, cuda=None):
    info = types.ModuleType("pf_kernels._build_info")
    info.EXTENSION, info.TORCH_VERSION, info.CUDA_VERSION, info.CUDA_ARCHS = (
        extension, torch_version, cuda, "9.0" if cuda else None)
    return info


@pytest.fixture
def install(monkeypatch):
    """Pretends an install: its build info (None: no file) and whether _C is there."""
    def pretend(info, has_c=True):
        monkeypatch.setitem(sys.modules, "pf_kernels._build_info", info)  # None: import fails
        monkeypatch.delattr(pf_kernels, "_build_info", raising=False)
        real_find_spec = _extension.importlib.util.find_spec
        monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name, *a: (
            (object() if has_c else None) if name == "pf_kernels._C" else real_find_spec(name, *a)))
        monkeypatch.setattr(_extension, "_warned", False)
        monkeypatch.delenv("PF_KERNELS_SKIP_EXTENSION", raising=False)
        _extension.build_problem.cache_clear()
    yield pretend
    _extension.build_problem.cache_clear()


def warnings_at_import():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _extension.warn_if_unusable()
        _extension.warn_if_unusable()  # said once per process
    return [str(w.message) for w in caught if w.category is _extension.KernelsUnavailableWarning]


def test_a_build_for_this_torch_is_silent(install):
    install(build_info())
    assert _extension.build_problem() is None
    assert warnings_at_import() == []


def test_a_tree_built_by_hand_without_build_info_is_left_to_loading(install):
    install(None, has_c=True)
    assert _extension.build_problem() is None


@pytest.mark.parametrize("other", ["2.0.0", "2.0.0+cpu"])
def test_a_build_for_another_torch_warns_once_and_is_not_loaded(install, monkeypatch, other):
    install(build_info(torch_version=other))
    kind, message = _extension.build_problem()
    assert kind == "mismatch"
    assert f"built against torch {other}" in message and torch.__version__ in message
    assert "pip install --no-build-isolation ." in message
    monkeypatch.setenv("PF_KERNELS_SKIP_EXTENSION", "1")  # does not silence a mismatch
    assert warnings_at_import() == [message]
    monkeypatch.setattr(_extension, "_loaded", False)
    with pytest.raises(ImportError, match="built against torch"):
        _extension.load()  # refuses before importing the library


def test_the_local_version_label_does_not_count(install):
    public = torch.__version__.split("+")[0]
    install(build_info(torch_version=public + "+somethingelse"))
    assert _extension.build_problem() is None


def test_cuda_kernels_built_for_another_cuda_are_a_mismatch(install):
    install(build_info(cuda="0.1"))
    kind, message = _extension.build_problem()
    assert kind == "mismatch" and "CUDA 0.1" in message


@pytest.mark.parametrize("info", [None, build_info()], ids=["never-built", "built-then-lost"])
def test_missing_kernels_warn_once_naming_the_fix(install, info):
    install(info, has_c=False)
    kind, message = _extension.build_problem()
    assert kind == "missing" and "pip install --no-build-isolation ." in message
    assert warnings_at_import() == [message]


def test_kernels_skipped_on_purpose_warn_unless_skipped_at_run_time_too(install, monkeypatch):
    install(build_info(extension="skipped", torch_version=None), has_c=False)
    kind, message = _extension.build_problem()
    assert kind == "skipped" and "PF_KERNELS_SKIP_EXTENSION=1" in message
    assert warnings_at_import() == [message]
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.setenv("PF_KERNELS_SKIP_EXTENSION", "1")
    assert warnings_at_import() == []


def test_the_built_library_shares_the_cpp_runtime_with_torch():
    # A _C with its own static libstdc++ segfaults on its first error message (seen on a GPU
    # machine whose $CXX wrapper linked it statically); setup.py links it dynamically and checks.
    from pf_kernels._elf import needed_libraries, static_cxx_runtime
    spec = _extension.importlib.util.find_spec("pf_kernels._C")
    if spec is None:
        pytest.skip("pf_kernels._C is not built")
    needed = needed_libraries(spec.origin)
    assert needed is not None and any(n.startswith("libstdc++") for n in needed), needed
    assert not static_cxx_runtime(spec.origin)
    assert needed_libraries(__file__) is None  # not an ELF file


def test_a_library_with_a_static_cpp_runtime_is_not_loaded(install, monkeypatch, tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"stand-in")
    install(build_info())
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(origin=str(fake)))
    import pf_kernels._elf as elf
    monkeypatch.setattr(elf, "static_cxx_runtime", lambda path: path == str(fake))
    _extension.build_problem.cache_clear()
    kind, message = _extension.build_problem()
    assert kind == "static-runtime" and "libstdc++ dynamically" in message
    assert any("static copy of the C++ standard library" in w for w in warnings_at_import())
