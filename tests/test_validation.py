"""Every bad input raises the right exception, with a message naming the argument, on every backend."""
import re

import pytest
import torch

import pf_kernels as pk


def good_backproj():
    return dict(x=torch.randn(2, 3, 4), z=torch.randn(2, 5), weight=torch.randn(6, 5), bias=torch.randn(6))


def good_fusion():
    return dict(hs=[torch.randn(2, 3), torch.randn(2, 4)], weight=torch.randn(5, 7), bias=torch.randn(5))


BACKPROJ_BAD = [
    ("x 1-D", dict(x=torch.randn(4)), ValueError, "x"),
    ("z 3-D", dict(z=torch.randn(2, 5, 1)), ValueError, "z"),
    ("batch mismatch", dict(z=torch.randn(3, 5)), ValueError, "batch"),
    ("weight 1-D", dict(weight=torch.randn(5)), ValueError, "weight"),
    ("weight width", dict(weight=torch.randn(6, 4)), ValueError, "weight"),
    ("bias length", dict(bias=torch.randn(5)), ValueError, "bias"),
    ("bias 2-D", dict(bias=torch.randn(6, 1)), ValueError, "bias"),
    ("mixed dtype", dict(z=torch.randn(2, 5, dtype=torch.float64)), TypeError, "dtype"),
    ("bias dtype", dict(bias=torch.randn(6, dtype=torch.bfloat16)), TypeError, "bias"),
    ("int x", dict(x=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x"),
    ("not a tensor", dict(weight=[[1.0]]), TypeError, "weight"),
    ("mixed device", dict(z=torch.randn(2, 5, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("name,override,exc,word", BACKPROJ_BAD, ids=[c[0] for c in BACKPROJ_BAD])
def test_backproj_concat_bad_input(name, override, exc, word):
    args = {**good_backproj(), **override}
    with pytest.raises(exc, match=word):
        pk.backproj_concat(**args)


FUSION_BAD = [
    ("empty list", dict(hs=[]), ValueError, "hs"),
    ("tensor not list", dict(hs=torch.randn(2, 7)), TypeError, "hs"),
    ("h 3-D", dict(hs=[torch.randn(2, 3, 1), torch.randn(2, 4)]), ValueError, r"hs\[0\]"),
    ("batch mismatch", dict(hs=[torch.randn(2, 3), torch.randn(3, 4)]), ValueError, "batch"),
    ("width mismatch", dict(weight=torch.randn(5, 8)), ValueError, "in_features"),
    ("bias length", dict(bias=torch.randn(4)), ValueError, "bias"),
    ("mixed dtype", dict(hs=[torch.randn(2, 3), torch.randn(2, 4).half()]), TypeError, "dtype"),
    ("int h", dict(hs=[torch.ones(2, 3, dtype=torch.int32), torch.randn(2, 4)]), TypeError, r"hs\[0\]"),
]


@pytest.mark.parametrize("name,override,exc,word", FUSION_BAD, ids=[c[0] for c in FUSION_BAD])
def test_fusion_head_bad_input(name, override, exc, word):
    args = {**good_fusion(), **override}
    with pytest.raises(exc, match=word):
        pk.fusion_head(**args)


@pytest.mark.parametrize("activation,exc", [("swish", ValueError), ("RELU", ValueError), (None, TypeError)])
def test_unknown_activation(activation, exc):
    with pytest.raises(exc, match="activation"):
        pk.backproj_concat(**good_backproj(), activation=activation)
    with pytest.raises(exc, match="activation"):
        pk.fusion_head(**good_fusion(), activation=activation)


@pytest.mark.parametrize("backend,exc", [("cudnn", ValueError), (3, TypeError)])
def test_unknown_backend(backend, exc):
    with pytest.raises(exc, match="backend"):
        pk.backproj_concat(**good_backproj(), backend=backend)


def test_backend_that_cannot_serve_the_device_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        pk.backproj_concat(**good_backproj(), backend="cuda")


def refine_args():
    fusion = good_fusion()
    return dict(hs=fusion["hs"], head_weight=fusion["weight"], head_bias=fusion["bias"],
                xs=[torch.randn(2, 3), torch.randn(2, 6, 2)],
                bp_weights=[torch.randn(4, 5), torch.randn(1, 5)], bp_biases=[torch.randn(4), None])


# Each message names the caller's own arguments; z, which the caller never passes, only as the
# head's output.
REFINE_BAD = [
    ("lists differ", dict(bp_weights=[torch.randn(4, 5)]), ValueError,
     "modality: got 2 xs, 1 bp_weights, 2 bp_biases"),
    ("bp biases short", dict(bp_biases=[torch.randn(4)]), ValueError, "2 bp_weights, 1 bp_biases"),
    ("bp biases tensor", dict(bp_biases=torch.randn(4)), TypeError, "bp_biases must be None or a list"),
    ("bp weight width", dict(bp_weights=[torch.randn(4, 5), torch.randn(1, 6)]), ValueError,
     r"bp_weights\[1\] has in_features 6 .* but z = fusion_head\(hs\) .* has 5 features"),
    ("bp weight dtype", dict(bp_weights=[torch.randn(4, 5).double(), torch.randn(1, 5)]), TypeError,
     r"bp_weights\[0\] has dtype torch.float64 but xs\[0\]"),
    ("x batch", dict(xs=[torch.randn(2, 3), torch.randn(3, 6, 2)]), ValueError,
     r"batch sizes differ: xs\[1\] \(3, 6, 2\) vs z = fusion_head\(hs\)"),
    ("bp bias length", dict(bp_biases=[torch.randn(3), None]), ValueError,
     r"bp_biases\[0\] must have shape \(4,\) to match bp_weights\[0\]"),
    ("head weight", dict(head_weight=torch.randn(5, 6)), ValueError, "head_weight"),
    ("x dtype", dict(xs=[torch.randn(2, 3).double(), torch.randn(2, 6, 2)]), TypeError,
     r"xs\[0\] has dtype torch.float64 but hs\[0\]"),
    ("empty xs", dict(xs=[], bp_weights=[], bp_biases=[]), ValueError, "xs"),
    ("backproj activation", dict(backproj_activation="elu"), ValueError, "^backproj_activation must be"),
    ("head activation", dict(head_activation="elu"), ValueError, "^head_activation must be"),
]


def assert_names_only_the_callers_arguments(message):
    assert not re.search(r"(?<![a-z]_)(weights|biases)\b", message), message  # bp_weights, proj_weights
    assert not message.startswith("activation"), message
    assert not re.search(r"\bz\b", message) or "z = fusion_head(hs)" in message, message


@pytest.mark.parametrize("name,override,exc,word", REFINE_BAD, ids=[c[0] for c in REFINE_BAD])
def test_refine_step_bad_input(name, override, exc, word):
    with pytest.raises(exc, match=word) as error:
        pk.refine_step(**{**refine_args(), **override})
    assert_names_only_the_callers_arguments(str(error.value))


def test_grouped_bad_input():
    with pytest.raises(ValueError, match="modality"):
        pk.backproj_concat_grouped([torch.randn(2, 3)], torch.randn(2, 5), [torch.randn(4, 5)] * 2)


def hoisted_args():
    refine = refine_args()
    return dict(hs=refine["hs"], head_weight=refine["head_weight"], head_bias=refine["head_bias"],
                ps=[torch.randn(2, 8), torch.randn(2, 6, 9)], bp_weights=refine["bp_weights"],
                bp_biases=refine["bp_biases"], proj_weights=[torch.randn(8, 4), torch.randn(9, 7)[:, 2:3]],
                head_activation="relu", backproj_activation="tanh", out_activations=["gelu", "none"])


HOISTED_CASES = [
    ("good", {}), ("one out activation", dict(out_activations="sigmoid")), ("no biases", dict(bp_biases=None)),
    ("tuples", dict(ps=tuple(hoisted_args()["ps"]))),
    ("proj width", dict(proj_weights=[torch.randn(8, 4), torch.randn(9, 2)])),
    ("proj height", dict(proj_weights=[torch.randn(7, 4), torch.randn(9, 1)])),
    ("proj dtype", dict(proj_weights=[torch.randn(8, 4).double(), torch.randn(9, 1)])),
    ("proj 1-D", dict(proj_weights=[torch.randn(8), torch.randn(9, 1)])),
    ("proj missing", dict(proj_weights=[torch.randn(8, 4)])), ("proj None", dict(proj_weights=None)),
    ("out activation", dict(out_activations=["gelu", "swish"])),
    ("out activations count", dict(out_activations=["gelu"])),
    ("out activations type", dict(out_activations=3)),
    ("ps tensor", dict(ps=torch.randn(2, 8))), ("ps empty", dict(ps=[])),
    ("p batch", dict(ps=[torch.randn(3, 8), torch.randn(2, 6, 9)])),
    ("p 1-D", dict(ps=[torch.randn(8), torch.randn(2, 6, 9)])),
    ("p device", dict(ps=[torch.randn(2, 8), torch.randn(2, 6, 9, device="meta")])),
    ("bp width", dict(bp_weights=[torch.randn(4, 5), torch.randn(1, 6)])),
    ("bp bias", dict(bp_biases=[torch.randn(3), None])), ("bp biases type", dict(bp_biases=torch.randn(4))),
    ("backproj activation", dict(backproj_activation="swish")),
    ("head", dict(head_weight=torch.randn(5, 6))),
]


HOISTED_MESSAGES = {
    "backproj activation": "^backproj_activation must be",
    "bp width": r"bp_weights\[1\] has in_features 6 .* but z = fusion_head\(hs\) .* has 5 features",
    "bp bias": r"bp_biases\[0\] must have shape \(4,\) to match bp_weights\[0\]",
    "p batch": r"batch sizes differ: ps\[0\] \(3, 8\) vs z = fusion_head\(hs\)",
    "proj dtype": r"proj_weights\[0\] has dtype torch.float64 but ps\[0\]",
}


@pytest.mark.parametrize("name", sorted(HOISTED_MESSAGES))
def test_refine_step_hoisted_names_the_callers_arguments(name):
    override = dict(HOISTED_CASES)[name]
    with pytest.raises((TypeError, ValueError), match=HOISTED_MESSAGES[name]) as error:
        pk.refine_step_hoisted(**{**hoisted_args(), **override})
    assert_names_only_the_callers_arguments(str(error.value))


@pytest.mark.parametrize("hoisted", [False, True])
def test_the_fast_step_check_agrees_with_the_full_one(monkeypatch, hoisted):
    """refine_step(_hoisted)'s few-attribute check of valid calls passes exactly the calls that the
    full checks (the ones that name the culprit) pass."""
    from pf_kernels import _validation as checks
    fast = checks._step_ok
    cases = HOISTED_CASES if hoisted else [("good", {}), ("no biases", dict(bp_biases=None))] + \
        [(name, override) for name, override, _, _ in REFINE_BAD]
    agreed = []
    for name, override in cases:
        if hoisted:
            args = {**hoisted_args(), **override}
            order = ("hs", "head_weight", "head_bias", "ps", "bp_weights", "bp_biases", "proj_weights",
                     "head_activation", "backproj_activation", "out_activations")
            fast_ok = fast(args["hs"], args["head_weight"], args["head_bias"], args["head_activation"],
                           args["backproj_activation"], args["ps"], args["bp_weights"], args["bp_biases"],
                           True, args["proj_weights"], args["out_activations"])
            full = lambda: checks.check_refine_step_hoisted(*(args[k] for k in order))  # noqa: E731
        else:
            args = {**refine_args(), **override}
            fast_ok = fast(args["hs"], args["head_weight"], args["head_bias"], "relu", "relu", args["xs"],
                           args["bp_weights"], args["bp_biases"])
            full = lambda: checks.check_refine_step(args["hs"], args["head_weight"], args["head_bias"],  # noqa: E731
                                                    args["xs"], args["bp_weights"], args["bp_biases"], "relu", "relu")
        with monkeypatch.context() as m:
            m.setattr(checks, "_step_ok", lambda *a, **k: False)
            try:
                full_result, full_ok = full(), True
            except (TypeError, ValueError):
                full_ok = False
        assert fast_ok == full_ok, name
        if full_ok:
            assert full() == full_result, name  # the fast path returns what the full checks return
        agreed.append(full_ok)
    assert any(agreed) and not all(agreed)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_sparse_and_nested_inputs_are_refused_by_name(backend):
    # They reached the kernels: "Could not run 'pf_kernels::backproj_concat' with arguments from the
    # 'SparseCPU' backend", "NestedTensorImpl doesn't support sizes. Please file an issue." A sparse
    # weight did on auto, while backend="torch" computed with it.
    x, z, w, b = torch.randn(2, 3, 4), torch.randn(2, 5), torch.randn(6, 5), torch.randn(6)
    nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(2, 4)], layout=torch.jagged)
    strided_nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(2, 4)])
    for args, name, got in [((x.to_sparse(), z, w, b), "x", "layout torch.sparse_coo"),
                            ((x, z.to_sparse_csr(), w, b), "z", "layout torch.sparse_csr"),
                            ((nested, z, w, b), "x", "a nested tensor"),
                            ((strided_nested, z, w, b), "x", "a nested tensor")]:
        with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor, got {got}"):
            pk.backproj_concat(*args, backend=backend)
    h = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"hs\[1\] must be a dense \(strided\) tensor"):
        pk.fusion_head([h, h.to_sparse()], torch.randn(3, 8), None, backend=backend)
    with pytest.raises(TypeError, match="p must be a dense"):
        pk.context_linear(torch.randn(2, 3, 7).to_sparse(), z, w, b, torch.randn(7, 6), backend=backend)
    with pytest.raises(TypeError, match=r"xs\[0\] must be a dense"):
        pk.refine_step([h], torch.randn(5, 4), None, [strided_nested], [w], [b], backend=backend)
    for args, name in [((x, z, w.to_sparse(), b), "weight"), ((x, z, w, b.to_sparse()), "bias")]:
        with pytest.raises(TypeError, match=f"{name} must be a dense"):
            pk.backproj_concat(*args, backend=backend)
    with pytest.raises(TypeError, match="weight must be a dense"):
        pk.fusion_head([h, h], torch.randn(3, 8).to_sparse(), None, backend=backend)
    with pytest.raises(TypeError, match="proj_weight must be a dense"):
        pk.context_linear(torch.randn(2, 3, 7), z, w, b, torch.randn(7, 6).to_sparse(), backend=backend)
