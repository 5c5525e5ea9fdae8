"""The time-series demo on a tiny setting: it runs, and its JSON has the promised structure."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demo():
    spec = importlib.util.spec_from_file_location("timeseries_demo", os.path.join(ROOT, "python", "timeseries_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_shapes_and_target():
    demo = load_demo()
    xs, y = demo.make_data(7, seed=3, modalities=3, channels=4, steps=5)
    assert [tuple(x.shape) for x in xs] == [(7, 5, 4)] * 3
    assert tuple(y.shape) == (7, 1)
    again, y_again = demo.make_data(7, seed=3, modalities=3, channels=4, steps=5)
    assert all((a == b).all() for a, b in zip(xs, again)) and (y == y_again).all()
    other, _ = demo.make_data(7, seed=4, modalities=3, channels=4, steps=5)
    assert not (other[0] == xs[0]).all()


def test_demo_tiny_run_writes_json(tmp_path):
    demo = load_demo()
    report = demo.main(["--tiny", "--backend", "auto", "--out", str(tmp_path)])
    with open(tmp_path / "timeseries_demo.json") as fh:
        saved = json.load(fh)
    assert saved.keys() == json.loads(json.dumps(report)).keys()
    for name in ("late_fusion", "progressive_fusion_r2", "progressive_fusion_r3"):
        entry = saved[name]
        for key in ("mse_mean", "mse_std", "params", "robust_mse"):
            assert key in entry, (name, key)
        assert math.isfinite(entry["mse_mean"]) and entry["mse_mean"] > 0
        assert entry["mse_std"] >= 0
        assert isinstance(entry["params"], int) and entry["params"] > 0
        assert len(entry["robust_mse"]) == len(demo.NOISE_LEVELS)
        assert entry["robust_mse"][0] == pytest.approx(entry["mse_mean"], rel=1e-6)
    # The back-projections (and the context inputs) cost parameters; late fusion has none.
    assert saved["progressive_fusion_r2"]["params"] > saved["late_fusion"]["params"]
    timing = saved["epoch_time"]
    assert timing["fused_s"] > 0 and timing["torch_s"] > 0
    # the demo's encoders begin with a Sequential(Linear, ...): every one is hoisted
    assert timing["hoisted"] == [0, 1, 2] and timing["pf_cost_hoisted"] > 0 and timing["pf_cost_unhoisted"] > 0
