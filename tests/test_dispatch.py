"""The backend registry: what is available, what auto picks, the environment override."""
import pytest
import torch

import pf_kernels as pk
from pf_kernels import _dispatch


def test_available_backends_reports_every_backend_with_reasons():
    report = pk.available_backends()
    assert set(report) >= {"torch", "cpu", "cuda", "triton"}
    assert report["torch"]["available"] and report["torch"]["reason"] is None
    for name, info in report.items():
        assert isinstance(info["available"], bool)
        if not info["available"]:
            assert info["reason"], f"{name} is missing without a reason"


def test_auto_on_cpu_picks_cpu_if_available_else_torch():
    picked = _dispatch.resolve_backend("auto", "backproj_concat", torch.device("cpu"), torch.float32)
    assert picked == ("cpu" if pk.available_backends()["cpu"]["available"] else "torch")


def test_auto_on_other_devices_falls_back_to_torch():
    picked = _dispatch.resolve_backend("auto", "fusion_head", torch.device("meta"), torch.float32)
    assert picked == "torch"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.resolve_backend("auto", "fusion_head", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        pk.fusion_head([torch.randn(2, 3)], torch.randn(4, 3))


def test_explicit_backend_is_used(monkeypatch):
    calls = []
    original = _dispatch.get_impl

    def spy(name, op):
        calls.append((name, op))
        return original(name, op)

    monkeypatch.setattr("pf_kernels.ops.get_impl", spy)
    pk.fusion_head([torch.randn(2, 3)], torch.randn(4, 3), backend="torch")
    assert calls == [("torch", "fusion_head")]
