"""convert() on models written the way multimodal repositories write them (tests/convert_cases.py):
the model stays the user's (class, attributes, parameters, state_dict, methods), outputs and
gradients equal the unconverted model's on every backend that runs here, the fused ops are called
as often as the patterns say, and training code keeps working."""
import copy
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn

import pf_kernels as pk
from pf_kernels.convert import count_fused_calls
from pf_kernels.nn import ProgressiveFusion
from tests.convert_cases import fresh_dynamo  # noqa: F401  (a fixture)
from tests.convert_cases import (MMDL, TanhProgressive, assert_same_model, conv_transformer_inputs,
                                 conv_transformer_model, cpu_backends,
                                 late_fusion_inputs, late_fusion_model, progressive_inputs, progressive_model,
                                 ops_calls, small_progressive_inputs, small_progressive_model,
                                 tanh_progressive_inputs, tanh_progressive_model)

BACKENDS = cpu_backends()
# triton runs under the interpreter here: ~0.3 s per kernel launch, so on one small model only
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _check_every_backend(model, reference, args, expected, backends=FAST_BACKENDS):
    for backend in backends:
        pk.convert(model, backend=backend)  # a converted model: switches backend, no new capture
        with count_fused_calls() as calls:
            assert_same_model(reference, model, args)
        assert dict(calls) == ops_calls(expected), backend


def test_late_fusion_mmdl_stays_the_users_model():
    model, expected = late_fusion_model()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    args = late_fusion_inputs()
    converted, report = pk.convert(model, backend="torch", example_inputs=args)
    assert converted is model and type(model) is MMDL and isinstance(model, nn.Module)
    assert report.counts == expected, str(report)
    _check_every_backend(model, reference, args, expected)
    assert len(report.captures) == 1, str(report)  # switching backends captured nothing new
    # The same Parameter objects (an optimizer made before convert() still trains the model),
    # the attributes MultiBench's training loop reads, the other methods.
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert len(model.reps) == 3 and model.fuseout.shape == (5, 22)
    for rep, rep_ref in zip(model.reps, reference.reps):
        torch.testing.assert_close(rep, rep_ref)
    torch.testing.assert_close(model.fuseout, reference.fuseout)
    assert model.num_modalities() == 3
    assert set(vars(model)) - set(vars(reference)) == {"forward"}  # the instance's forward, nothing else
    fresh, _ = late_fusion_model()
    fresh.load_state_dict(model.state_dict())  # the state_dict still loads into the plain model


def test_progressive_mmdl_swaps_heads_and_back_projections():
    model, expected = progressive_model()
    reference = copy.deepcopy(model)
    args = progressive_inputs()
    _, report = pk.convert(model, backend="cpu" if "cpu" in BACKENDS else "torch", example_inputs=args)
    assert report.counts == expected, str(report)
    # The image's per-pixel Linear and ReLU over cat([img, context], dim=3) is hoisted: in step 1
    # (zeros) it is x's projection, in steps 2 and 3 context_linear (the cat, the Linear, the ReLU
    # and the context's Linear and ReLU: 5 ops) beats the head and back-projection readings (3 each;
    # the view and expand are free and do not count).
    lost = [line for line in report.left_alone if "read as context_linear instead" in line]
    assert len(lost) == 4 and all("fuses 5 ops to this reading's 3" in line for line in lost), str(report)
    assert sum("x's projection computed once for 3 sites" in line for line in report.replaced) == 3
    _check_every_backend(model, reference, args, expected)
    assert len(report.captures) == 1


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run on CPU tensors here")
def test_triton_backend_under_the_interpreter():
    model, expected = small_progressive_model()
    reference = copy.deepcopy(model)
    args = small_progressive_inputs()
    _, report = pk.convert(model, backend="triton", example_inputs=args)
    assert report.counts == expected, str(report)
    _check_every_backend(model, reference, args, expected, ["triton"])


def test_channels_first_image_and_transformer():
    model, expected = conv_transformer_model()
    reference = copy.deepcopy(model)
    args = conv_transformer_inputs()
    _, report = pk.convert(model, backend="torch", example_inputs=args)
    assert report.counts == expected, str(report)
    assert any("dim=1" in line and "backproj_concat" in line for line in report.replaced)
    _check_every_backend(model, reference, args, expected)


def test_encoders_ending_in_tanh_linear_keep_the_fusion_head():
    """Issue 13 item 5: the head's cat([h_1, h_2]) is a fusion head, not a back-projection of the last
    encoder's Linear. Issue 14: the encoders' Linear and Tanh over [x, context] are hoisted (x's
    projection shared by the 3 steps), beating the head readings of those Linears."""
    model, expected = tanh_progressive_model()
    reference = copy.deepcopy(model)
    args = tanh_progressive_inputs()
    _, report = pk.convert(model, backend="cpu" if "cpu" in BACKENDS else "torch", example_inputs=args)
    assert report.counts == expected, str(report)
    assert all("computed once for 3 sites" in line for line in report.replaced
               if line.startswith(("context_linear", "x_projection")))
    lost = [line for line in report.left_alone if "read as fusion_head instead" in line]
    assert not lost, str(report)  # the head's back-projection readings lose to the hoists, not to the head
    with count_fused_calls() as calls:
        assert_same_model(reference, model, args)
    assert dict(calls) == ops_calls(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the same models run on CPU above)")
@pytest.mark.parametrize("make, inputs", [(progressive_model, progressive_inputs),
                                          (conv_transformer_model, conv_transformer_inputs)],
                         ids=["progressive", "conv_transformer"])
def test_on_cuda(make, inputs):
    model, expected = make()
    model = model.cuda()
    reference = copy.deepcopy(model)
    args = torch.utils._pytree.tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, inputs())
    info = pk.available_backends()
    backends = [b for b in ("triton", "cuda") if info[b]["available"] and "cuda" in info[b]["devices"]]
    _, report = pk.convert(model, backend="auto", example_inputs=args)
    assert report.counts == expected, str(report)
    # fp32 GEMMs in another order than cuBLAS's: a little more room than on CPU
    for backend in ["auto", "torch", *backends]:
        pk.convert(model, backend=backend)
        with count_fused_calls() as calls:
            assert_same_model(reference, model, args, rtol=1e-4, atol=2e-5)
        assert dict(calls) == ops_calls(expected), backend


def _multibench_style_training(model, batches, validation):
    """A training loop as MultiBench writes it: RMSprop over model.parameters(), the objective reads
    model.reps and model.fuseout after the forward, gradient clipping; then a validation pass."""
    optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=0.01)
    objective_args = {}
    losses = []
    model.train()
    for inputs, target in batches:
        optimizer.zero_grad()
        out = model(inputs)
        objective_args["reps"], objective_args["fused"] = model.reps, model.fuseout
        loss = F.cross_entropy(out, target) + 1e-3 * sum(r.square().mean() for r in objective_args["reps"]) \
            + 1e-3 * objective_args["fused"].square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 8)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        val = F.cross_entropy(model(validation[0]), validation[1]).item()
    return losses, val


def test_training_loop_that_reads_model_attributes():
    model, expected = progressive_model(steps=2)
    reference = copy.deepcopy(model)
    batches = [(progressive_inputs(B=6)[0], torch.randint(0, 2, (6,))) for _ in range(3)]
    validation = (progressive_inputs(B=6)[0], torch.randint(0, 2, (6,)))
    pk.convert(model, example_inputs=(batches[0][0],))
    losses_ref, val_ref = _multibench_style_training(reference, batches, validation)
    with count_fused_calls() as calls:
        losses, val = _multibench_style_training(model, batches, validation)
    assert dict(calls) == {op: 4 * n for op, n in ops_calls(expected).items()}  # 3 steps and the validation
    torch.testing.assert_close(losses, losses_ref, rtol=1e-5, atol=1e-6)
    assert val == pytest.approx(val_ref, rel=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


class StatefulFusion(nn.Module):
    """A late-fusion head whose forward keeps state as models do: an EMA buffer reassigned, a
    buffer written in place, a call counter, a list of recent outputs, an attribute it sets, a
    momentum copy of the head (parameters updated in place, MoCo / BYOL style) and a tensor
    attribute updated in place."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([nn.Linear(3, 4), nn.Linear(5, 4)])
        self.head = nn.Linear(8, 6)
        self.target = nn.Linear(8, 6).requires_grad_(False)
        self.register_buffer("z_ema", torch.zeros(6))
        self.register_buffer("seen", torch.zeros(()))
        self.calls, self.recent = 0, []
        self.samples = torch.zeros(())

    def forward(self, xs):
        u = torch.cat([enc(x) for enc, x in zip(self.encoders, xs)], -1)
        z = torch.relu(self.head(u))
        with torch.no_grad():
            for t, p in zip(self.target.parameters(), self.head.parameters()):
                t.mul_(0.5).add_(p, alpha=0.5)
            self.samples += z.shape[0]
        self.z_ema = 0.9 * self.z_ema + 0.1 * z.detach().mean(0)
        self.seen.add_(z.shape[0])
        self.calls += 1
        self.recent.append(z.detach())
        self.last = z
        return z + self.z_ema + self.target(u.detach())


def test_example_inputs_leave_the_model_as_it_was():
    # The example run's changes were kept: a reassigned buffer (the EMA) kept its new tensor, and
    # every later output of the converted model differed from the original's.
    torch.manual_seed(0)
    model = StatefulFusion()
    reference = copy.deepcopy(model)
    inputs = [torch.randn(5, 3), torch.randn(5, 5)]
    _, report = pk.convert(model, backend="torch", example_inputs=(inputs,))
    assert report.replaced and model.calls == 0 and model.recent == [] and not hasattr(model, "last")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    for _ in range(2):
        xs = [torch.randn(5, 3), torch.randn(5, 5)]
        with count_fused_calls() as calls:
            torch.testing.assert_close(model(xs), reference(xs))
        assert dict(calls) == {"fusion_head": 1}
    torch.testing.assert_close(model.z_ema, reference.z_ema)
    assert model.calls == reference.calls == 2 and len(model.recent) == 2 and float(model.seen) == 10
    torch.testing.assert_close(model.target.weight, reference.target.weight)
    assert float(model.samples) == float(reference.samples) == 10
    # The list it appends to is a new capture at every call (dynamo guards on its length): at
    # torch.compile's recompile limit the plain forward runs, and the report says so.
    for _ in range(8):
        xs = [torch.randn(5, 3), torch.randn(5, 5)]
        torch.testing.assert_close(model(xs), reference(xs))
    assert "recompile limit" in str(report), str(report)


class CountsItsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([nn.Linear(3, 4), nn.Linear(5, 4)])
        self.head = nn.Linear(8, 6)
        self.calls = 0

    def forward(self, xs):
        self.calls += 1
        return torch.relu(self.head(torch.cat([self.encoders[j](x) for j, x in enumerate(xs)], -1)))


@pytest.mark.parametrize("example", [True, False])
def test_a_call_counter_is_not_a_new_capture_at_every_call(example):
    # dynamo specialises on a module's int attributes: each call was a new capture, and from the
    # recompile limit (8) on the plain forward ran, silently.
    torch.manual_seed(0)
    model = CountsItsCalls()
    reference = copy.deepcopy(model)
    xs = [torch.randn(5, 3), torch.randn(5, 5)]
    _, report = pk.convert(model, example_inputs=(xs,) if example else None)
    for _ in range(10):
        with count_fused_calls() as calls:
            torch.testing.assert_close(model(xs), reference(xs))
        assert dict(calls) == {"fusion_head": 1}
    assert model.calls == reference.calls == 10 and len(report.captures) <= 2, str(report)
    # modules named as the model names them (dynamo's source names differ between captures)
    assert "linear at head (" in str(report) and "__dict__" not in str(report) and "_modules" not in str(report)


def test_without_example_inputs_the_first_call_captures_and_batch_sizes_vary():
    model, expected = tanh_progressive_model(steps=2)
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend="torch")
    assert not report.captures and "no forward captured yet" in str(report)
    for B in (4, 7, 3, 9):  # the second size recaptures with a symbolic batch size, once
        with count_fused_calls() as calls:
            assert_same_model(reference, model, tanh_progressive_inputs(B))
        assert dict(calls) == ops_calls(expected)
    assert len(report.captures) == 2 and "dynamic shapes" in report.captures[1], str(report)


class _TwoModalities(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc_a, self.enc_b, self.fuse = nn.Linear(6, 8), nn.Linear(4, 8), nn.Linear(16, 10)

    def forward(self, seq, vec):
        if seq.shape[0] != vec.shape[0]:  # the model's own check
            raise ValueError("one batch size for both modalities")
        return torch.relu(self.fuse(torch.cat([F.relu(self.enc_a(seq)).mean(1), F.relu(self.enc_b(vec))], -1)))


@pytest.mark.parametrize("first", [False, True], ids=["after-a-capture", "first-call"])
@pytest.mark.parametrize("bad", ["wrong-width", "batch-mismatch"])
def test_a_call_that_raises_leaves_the_conversion_on(first, bad):
    """dynamo runs a frame that raised while it traced it as plain Python from then on: one bad call
    (before or after the first capture) turned the fused ops off for good, silently, or undid the
    conversion with a wrong reason. Nor does a bad call cost the good inputs a new capture (a bad
    request to a served model discarded every capture)."""
    torch.manual_seed(0)
    model = _TwoModalities()
    reference = copy.deepcopy(model)
    good = (torch.randn(4, 5, 6), torch.randn(4, 4))
    wrong = {"wrong-width": (torch.randn(4, 5, 7), torch.randn(4, 4)),
             "batch-mismatch": (torch.randn(4, 5, 6), torch.randn(3, 4))}[bad]
    _, report = pk.convert(model, backend="torch", example_inputs=None if first else good)
    for _ in range(2):
        with pytest.raises((RuntimeError, ValueError)) as raised, torch.no_grad():
            model(*wrong)
        with pytest.raises(raised.type):
            reference(*wrong)  # the same error as the model's own forward
        with count_fused_calls() as calls:
            assert_same_model(reference, model, good)
        assert dict(calls) == {"fusion_head": 1}, (dict(calls), str(report))
    assert "forward" in model.__dict__ and not report.left_alone, str(report)
    assert len(report.captures) == 1, str(report)


def test_counting_a_model_with_a_pf_kernels_module_counts_the_swaps_and_captures_nothing_new():
    """count_fused_calls replaced pf_kernels.ops' functions, which a captured FusionHead module's code
    reads: the model was captured again, and dynamo replayed its traced copy of the counter (1 counted
    of the 5 calls made)."""
    from pf_kernels.nn import FusionHead

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_a, self.enc_b = nn.Linear(6 + 3, 8), nn.Linear(4 + 3, 8)
            self.head, self.fuse, self.back = FusionHead([8, 8], 10), nn.Linear(16, 10), nn.Linear(10, 3)

        def forward(self, seq, vec):
            z = self.head([F.relu(self.enc_a(torch.cat([seq, seq.new_zeros(*seq.shape[:-1], 3)], -1))).mean(1),
                           F.relu(self.enc_b(torch.cat([vec, vec.new_zeros(vec.shape[0], 3)], -1)))])
            c = torch.relu(self.back(z))
            a = torch.cat([seq, c.unsqueeze(1).expand(-1, seq.shape[1], -1)], -1)
            b = torch.cat([vec, c], -1)
            return torch.relu(self.fuse(torch.cat([a.mean(1), b], -1)))

    torch.manual_seed(0)
    model, args = WithHead(), (torch.randn(4, 5, 6), torch.randn(4, 4))
    reference = copy.deepcopy(model)
    _, report = pk.convert(model, backend="torch", example_inputs=args)
    swaps = {name: n for name, n in report.counts.items() if name in ("fusion_head", "backproj_concat")}
    assert swaps == {"fusion_head": 3, "backproj_concat": 2}, report.counts
    for _ in range(2):
        with count_fused_calls() as outer, count_fused_calls() as inner:
            out = model(*args)
        assert dict(outer) == dict(inner) == swaps
        torch.testing.assert_close(out, reference(*args))
        with count_fused_calls() as eager:
            reference(*args)
        assert dict(eager) == {"fusion_head": 1}  # the FusionHead module run eagerly
    assert len(report.captures) == 1, str(report)


@pytest.mark.parametrize("hoist", [True, False])
def test_counting_a_progressive_fusion_counts_every_step(hoist):
    # Its refinement steps call refine_step(_hoisted), which went uncounted: {'fusion_head': 1} for R=3.
    torch.manual_seed(0)
    model = ProgressiveFusion([nn.Sequential(nn.Linear(5 + 2, 4), nn.ReLU()), nn.Linear(3 + 2, 4)], [4, 4], 6, 2,
                              iterations=3, hoist=hoist)
    with count_fused_calls() as calls:
        model([torch.randn(3, 5), torch.randn(3, 3)])
    assert dict(calls) == ({"fusion_head": 3, "context_linear": 4} if hoist else
                           {"fusion_head": 3, "backproj_concat": 4})
    x, z, w = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    with count_fused_calls() as calls:
        pk.backproj_concat_grouped([x, x, x], z, [w, w, w])
    assert dict(calls) == {"backproj_concat": 3}


def test_a_capture_for_new_sizes_lists_no_site_again():
    # The sites' lines hold the shapes they were captured with: each new sequence length listed every
    # site again (a model of 10 sites reported 47 swaps) and every losing reading of them.
    model, _ = progressive_model()
    _, report = pk.convert(model, backend=FAST_BACKENDS[-1], example_inputs=progressive_inputs())
    replaced, left_alone = list(report.replaced), list(report.left_alone)
    for T in (9, 3):
        model(*progressive_inputs(T=T))
    assert len(report.captures) > 1, str(report)
    assert report.replaced == replaced and report.left_alone == left_alone, str(report)


def test_what_convert_returns_also_serves_as_the_model():
    # DESIGN: convert "returns the model": `model = pk.convert(model)` then `model(x)` raised
    # "'Converted' object is not callable".
    model, _ = tanh_progressive_model()
    reference, args = copy.deepcopy(model), tanh_progressive_inputs()
    converted = pk.convert(model, backend=FAST_BACKENDS[-1], example_inputs=args)
    assert converted.model is model and converted.eval() is model and converted.training is False
    assert set(converted.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(converted(*args), reference.eval()(*args))
    same, report = converted
    assert same is model and report.replaced
    assert copy.deepcopy(converted).model is not model


def test_deepcopy_and_pickle_give_converted_models():
    model, expected = tanh_progressive_model(steps=2)
    args = tanh_progressive_inputs()
    expected_out = model(*args)
    pk.convert(model, backend="torch")  # not captured yet: the copies capture on their own
    buffer = io.BytesIO()
    torch.save(model, buffer)  # MultiBench saves whole models
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(copied) is TanhProgressive and copied is not model
        assert copied.forward.module is copied  # converted, and converting itself, not the original
        with count_fused_calls() as calls:
            torch.testing.assert_close(copied(*args), expected_out)
        assert dict(calls) == ops_calls(expected)
        assert all(a is not b for a, b in zip(copied.parameters(), model.parameters()))


def test_a_converted_model_is_freed_when_dropped():
    """Dynamo keeps the backends it compiled with for the rest of the process: a converted forward's
    backend holds it weakly, or every converted model (its parameters) stayed alive until
    torch._dynamo.reset()."""
    import gc
    import weakref
    refs = []
    for _ in range(3):
        model, _ = tanh_progressive_model(steps=2)
        args = tanh_progressive_inputs()
        report = pk.convert(model, example_inputs=args)[1]
        model(*args)
        assert report.replaced  # (converted and captured)
        refs.append(weakref.ref(model))
        del model, report
    gc.collect()
    assert [r() for r in refs] == [None] * 3


def test_the_users_own_torch_compile_of_a_converted_model():
    model, _ = tanh_progressive_model(steps=1)
    reference = copy.deepcopy(model)
    pk.convert(model, backend="torch")
    args = tanh_progressive_inputs()
    compiled = torch.compile(model, backend="eager")  # traces the plain forward: no nested capture
    torch.testing.assert_close(compiled(*args), reference(*args))
    assert not pk.convert(model, backend="torch").report.captures


def test_nothing_to_swap_leaves_the_forward_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    converted, report = pk.convert(model, example_inputs=(torch.randn(2, 3),))
    assert converted is model and "forward" not in vars(model) and not report.replaced
    assert any("nothing to swap" in line for line in report.left_alone)


def test_unconvert_and_nested_conversions():
    model, _ = tanh_progressive_model(steps=2)
    inner = model.encoders[0]
    pk.convert(inner)
    assert "forward" in vars(inner)
    _, report = pk.convert(model)  # the model's capture covers the submodule's
    assert "forward" not in vars(inner) and "forward" in vars(model)
    assert any("earlier conversion is undone" in line for line in report.left_alone)
    from pf_kernels.convert import unconvert
    assert unconvert(model) is model and "forward" not in vars(model)


def test_pf_kernels_modules_get_the_backend_and_bad_arguments_are_refused():
    model = ProgressiveFusion([nn.Linear(4 + 2, 6), nn.Linear(3 + 2, 6)], [6, 6], 5, 2)
    converted, report = pk.convert(model, backend="torch")
    assert converted is model and model.backend == "torch" and "forward" not in vars(model)
    assert len(report.backends_set) == 3
    with pytest.raises(ValueError, match="backend"):
        pk.convert(model, backend="nonsense")
    with pytest.raises(TypeError, match="model"):
        pk.convert("not a model")
    with pytest.raises(TypeError, match=r"example_inputs=\(\[x1, x2\],\)"):
        pk.convert(nn.Linear(2, 2), example_inputs=[torch.randn(1, 2)])
    with pytest.raises(TypeError, match="example_kwargs"):
        pk.convert(nn.Linear(2, 2), example_kwargs=[1])


def test_swap_into_model_program_runs(monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "python" / "swap_into_model.py"
    spec = importlib.util.spec_from_file_location("swap_into_model", path)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    # no timing rounds: one capture, the report, the counts and the differences
    monkeypatch.setattr(sys, "argv", ["swap_into_model.py", "--batch", "4", "--rounds", "0", "--steps", "2",
                                      "--device", "cpu"])
    program.main()
    out = capsys.readouterr().out
    # the fusion per step; the vector encoder's first Linear hoisted (x's projection in step 1, a
    # context_linear in step 2); the sequence's and the image's back-projections in step 2
    assert "fused calls per forward: fusion_head 2, context_linear 1, backproj_concat 2" in out, out
    assert "x_projection: relu(linear(cat([x (B, 32), zeros], dim=1)))" in out, out
    assert "max |difference| to the unconverted model: output" in out


class CheckpointedSteps(nn.Module):
    """Each refinement step inside torch.utils.checkpoint (activation memory for compute)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(6 + 3, 8), nn.Linear(4 + 3, 8)])
        self.head = nn.Linear(16, 6)
        self.back = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)])

    def step(self, xs, z):
        hs = [torch.relu(self.enc[j](torch.cat([x, torch.relu(self.back[j](z)).unsqueeze(1).expand(-1, x.shape[1], -1)],
                                                 -1))).mean(1) for j, x in enumerate(xs)]
        return torch.relu(self.head(torch.cat(hs, -1)))

    def forward(self, xs):
        z = xs[0].new_zeros(xs[0].shape[0], 6)
        for _ in range(2):
            z = torch.utils.checkpoint.checkpoint(self.step, xs, z, use_reentrant=False)
        return z


def test_a_checkpointed_region_is_named_as_not_searched():
    # its patterns are captured as one call of a subgraph: the report said "nothing to swap"
    torch.manual_seed(0)
    model = CheckpointedSteps()
    reference = copy.deepcopy(model)
    xs = [torch.randn(3, 5, 6), torch.randn(3, 5, 4)]
    _, report = pk.convert(model, example_inputs=(xs,))
    assert_same_model(reference, model, (xs,))
    assert "torch.utils.checkpoint region" in str(report) and "not searched" in str(report), str(report)
