"""Multimodal models written the way research repositories write them, with no pf_kernels in sight:
what convert() must handle. The style is MultiBench's (pliang279/MultiBench): a wrapper that runs a
list of unimodal encoders over a list of inputs in a Python loop and keeps their outputs as
attributes, fusion modules that take that list (a concat, a concat with a Linear), small encoders
(MLP, GRU, LSTM, Transformer, conv) and heads (an MLP, an nn.Sequential); the progressive variant
adds backward connections by hand. The code is ours.
"""
from __future__ import annotations

from typing import List, Sequence

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import pf_kernels as pk


# --- encoders ---------------------------------------------------------------------------------
class MLP(nn.Module):
    """Two layers with a ReLU between them, optional dropout."""

    def __init__(self, indim, hiddim, outdim, dropout=False, dropoutp=0.1):
        super().__init__()
        self.fc = nn.Linear(indim, hiddim)
        self.fc2 = nn.Linear(hiddim, outdim)
        self.dropout = dropout
        self.drop = nn.Dropout(dropoutp)

    def forward(self, x):
        hidden = F.relu(self.fc(x))
        if self.dropout:
            hidden = self.drop(hidden)
        return self.fc2(hidden)


class NormMLP(nn.Module):
    """LayerNorm, then an MLP: an encoder whose first layer is no Linear."""

    def __init__(self, indim, hiddim, outdim):
        super().__init__()
        self.norm = nn.LayerNorm(indim)
        self.mlp = MLP(indim, hiddim, outdim)

    def forward(self, x):
        return self.mlp(self.norm(x))


class GRUEncoder(nn.Module):
    """A batch-first GRU; the final hidden state, or every step flattened."""

    def __init__(self, indim, hiddim, last_only=True):
        super().__init__()
        self.gru = nn.GRU(indim, hiddim, batch_first=True)
        self.last_only = last_only

    def forward(self, x):
        outputs, final = self.gru(x)
        if self.last_only:
            return final[-1]
        return torch.flatten(outputs, 1)


class LSTMEncoder(nn.Module):
    """A batch-first LSTM over (B, T, D), or over (B, T) read as one feature per step."""

    def __init__(self, indim, hiddim):
        super().__init__()
        self.lstm = nn.LSTM(indim, hiddim, batch_first=True)

    def forward(self, x):
        if x.dim() == 2:
            x = x[..., None]
        _, (h_n, _) = self.lstm(x)
        return h_n.transpose(0, 1).reshape(x.shape[0], -1)


class TransformerPool(nn.Module):
    """Input projection, a Transformer encoder, the mean over positions."""

    def __init__(self, indim, d_model, heads=2):
        super().__init__()
        self.proj = nn.Linear(indim, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(self.proj(x)).mean(dim=1)


class PixelMLP(nn.Module):
    """A channels-last image (B, H, W, C): a Linear and ReLU per pixel (after a LayerNorm, if
    pre_norm), then the mean over pixels."""

    def __init__(self, indim, outdim, pre_norm=False):
        super().__init__()
        self.norm = nn.LayerNorm(indim) if pre_norm else nn.Identity()
        self.pixel = nn.Linear(indim, outdim)

    def forward(self, img):
        return F.relu(self.pixel(self.norm(img))).mean(dim=(1, 2))


class ConvEncoder(nn.Module):
    """A (B, C, H, W) image (stored channels-last): conv, ReLU, global average pool."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, img):
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(img)), 1), 1)


# --- fusions ----------------------------------------------------------------------------------
class Concat(nn.Module):
    """Flattens every modality and concatenates them."""

    def forward(self, modalities):
        flat = []
        for modality in modalities:
            flat.append(torch.flatten(modality, start_dim=1))
        return torch.cat(flat, dim=1)


class ConcatWithLinear(nn.Module):
    def __init__(self, indim, outdim, concat_dim=1):
        super().__init__()
        self.fc = nn.Linear(indim, outdim)
        self.concat_dim = concat_dim

    def forward(self, modalities):
        return self.fc(torch.cat(modalities, dim=self.concat_dim))


# --- wrappers ---------------------------------------------------------------------------------
class MMDL(nn.Module):
    """Encoders over a list of inputs, a fusion over their outputs, a head. The training loop reads
    `reps` (the encoders' outputs) and `fuseout` (the fusion's output) after every forward."""

    def __init__(self, encoders, fusion, head):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.fuse = fusion
        self.head = head
        self.reps: List[torch.Tensor] = []
        self.fuseout = None

    def forward(self, inputs):
        outs = []
        for i in range(len(inputs)):
            outs.append(self.encoders[i](inputs[i]))
        self.reps = outs
        out = self.fuse(outs)
        self.fuseout = out
        if isinstance(out, tuple):
            out = out[0]
        return self.head(out)

    def num_modalities(self):
        return len(self.encoders)


class ProgressiveMMDL(MMDL):
    """MMDL with backward connections added by hand: after each pass the fused vector is projected
    for every modality (a Linear and ReLU), broadcast over the modality's positions and
    concatenated to its input (in its feature dim) for the next pass. Pass 1 sees zeros."""

    def __init__(self, encoders, fusion, head, fused_dim, context_dims: Sequence[int],
                 feature_dims: Sequence[int], steps=3):
        super().__init__(encoders, fusion, head)
        self.back = nn.ModuleList(nn.Linear(fused_dim, c) for c in context_dims)
        self.context_dims = list(context_dims)
        self.feature_dims = list(feature_dims)
        self.steps = steps

    def forward(self, inputs):
        z = None
        for _ in range(self.steps):
            outs = []
            for i in range(len(inputs)):
                x = inputs[i]
                dim = self.feature_dims[i] % x.dim()  # written positively, e.g. dim=2 on 3-D
                if z is None:
                    shape = list(x.shape)
                    shape[dim] = self.context_dims[i]
                    context = x.new_zeros(shape)
                else:
                    context = self.broadcast(torch.relu(self.back[i](z)), x, dim)
                outs.append(self.encoders[i](torch.cat([x, context], dim=dim)))
            self.reps = outs
            z = self.fuse(outs)
            self.fuseout = z
        return self.head(z)

    @staticmethod
    def broadcast(c, x, dim):
        """(B, Dc) -> x's shape with Dc features in `dim`: a view with singleton positions, expanded."""
        shape = [c.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = c.shape[1]
        target = list(x.shape)
        target[dim] = c.shape[1]
        return c.view(shape).expand(target)


class TanhProgressive(nn.Module):
    """A plain progressive model over vector modalities whose encoders end in tanh(Linear(...)):
    the fusion head's cat([h_1, h_2]) must be read as a fusion head, not as a back-projection of
    the last encoder's Linear."""

    def __init__(self, dims=(5, 4), context=3, hidden=8, fused=6, steps=3):
        super().__init__()
        self.steps, self.context = steps, context
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d + context, hidden), nn.Tanh()) for d in dims)
        self.head = nn.Sequential(nn.Linear(hidden * len(dims), fused), nn.ReLU())
        self.back = nn.ModuleList(nn.Linear(fused, context) for _ in dims)

    def forward(self, xs):
        contexts = [x.new_zeros(x.shape[0], self.context) for x in xs]
        for _ in range(self.steps):
            hs = [enc(torch.cat([x, c], -1)) for enc, x, c in zip(self.encoders, xs, contexts)]
            z = self.head(torch.cat(hs, -1))
            contexts = [torch.sigmoid(back(z)) for back in self.back]
        return z


# --- the models the tests use, with inputs and the fused calls one forward makes ----------------
def late_fusion_model():
    """MLP, GRU and LSTM encoders, Concat, an nn.Sequential head: one fusion head."""
    model = MMDL([MLP(6, 10, 8), GRUEncoder(4, 8), LSTMEncoder(3, 6)], Concat(),
                 nn.Sequential(nn.Linear(8 + 8 + 6, 12), nn.ReLU(), nn.Linear(12, 3)))
    return model, {"fusion_head": 1}


def late_fusion_inputs(B=5, T=7):
    return ([torch.randn(B, 6), torch.randn(B, T, 4), torch.randn(B, T, 3)],)


def progressive_model(steps=3):
    """A vector (LayerNorm+MLP), a sequence (GRU, cat on dim=2) and a channels-last image (per-pixel
    MLP, cat on dim=3); ConcatWithLinear fuses, an MLP heads. Per forward: a fusion head per step;
    the image's per-pixel Linear and ReLU over [img, context] hoisted (its x projection in step 1,
    where the context is zeros, and a context_linear in every later step); a back-projection of
    the vector and of the sequence in every step after the first."""
    context = [3, 4, 2]
    encoders = [NormMLP(5 + 3, 12, 8), GRUEncoder(4 + 4, 8), PixelMLP(3 + 2, 8)]
    model = ProgressiveMMDL(encoders, ConcatWithLinear(24, 10), MLP(10, 8, 2), 10, context,
                            feature_dims=[-1, 2, 3], steps=steps)
    return model, {"fusion_head": steps, "backproj_concat": 2 * (steps - 1), "x_projection": 1,
                   "context_linear": steps - 1}


def progressive_inputs(B=4, T=6, H=3, W=5):
    return ([torch.randn(B, 5), torch.randn(B, T, 4), torch.randn(B, H, W, 3)],)


def conv_transformer_model():
    """A channels-first image stored channels-last (conv encoder, cat on dim=1) and a sequence
    (Transformer encoder, cat on dim=-1), two steps. Per forward: a fusion head per step, the
    Transformer's input projection hoisted (x's projection in step 1, a context_linear in step 2),
    the image's back-projection in step 2."""
    encoders = [ConvEncoder(3 + 2, 6), TransformerPool(4 + 3, 8)]
    model = ProgressiveMMDL(encoders, ConcatWithLinear(14, 6), nn.Linear(6, 2), 6, [2, 3],
                            feature_dims=[1, -1], steps=2)
    return model, {"fusion_head": 2, "backproj_concat": 1, "x_projection": 1, "context_linear": 1}


def conv_transformer_inputs(B=3, T=5, H=4, W=4):
    img = torch.randn(B, 3, H, W).contiguous(memory_format=torch.channels_last)
    return ([img, torch.randn(B, T, 4)],)


def small_progressive_model():
    """A vector (LayerNorm+MLP) and a channels-last image (LayerNorm, per-pixel MLP), two steps. Per
    forward: a fusion head per step, a back-projection per modality in step 2."""
    encoders = [NormMLP(5 + 3, 8, 8), PixelMLP(4 + 2, 8, pre_norm=True)]
    model = ProgressiveMMDL(encoders, ConcatWithLinear(16, 6), nn.Linear(6, 2), 6, [3, 2],
                            feature_dims=[-1, 3], steps=2)
    return model, {"fusion_head": 2, "backproj_concat": 2}


def small_progressive_inputs(B=4):
    return ([torch.randn(B, 5), torch.randn(B, 2, 3, 4)],)


def tanh_progressive_model(steps=3):
    """Per forward: the fusion head in every step; every encoder's first Linear and Tanh over
    [x, context] hoisted (x's projection in step 1, a context_linear in each later step); no
    back-projection."""
    return TanhProgressive(steps=steps), {"fusion_head": steps, "x_projection": 2, "context_linear": 2 * (steps - 1)}


def tanh_progressive_inputs(B=4):
    return ([torch.randn(B, 5), torch.randn(B, 4)],)


# --- checks -----------------------------------------------------------------------------------
def cpu_backends():
    """The backends that run these models on CPU tensors here: torch, cpu (when built), and triton
    when its kernels run on CPU tensors under TRITON_INTERPRET=1."""
    info = pk.available_backends()
    names = ["torch"] + (["cpu"] if info["cpu"]["available"] else [])
    if info["triton"]["available"] and "cpu" in info["triton"]["devices"]:
        names.append("triton")
    return names


def ops_calls(counts):
    """The op calls one forward makes for a report's counts: an x_projection site is a plain Linear."""
    return {op: n for op, n in counts.items() if op != "x_projection"}


def assert_same_model(reference: nn.Module, converted: nn.Module, args, rtol=1e-5, atol=1e-5):
    """Outputs, every parameter's gradient (a fresh random output gradient) and the state_dict of
    the converted model equal the unconverted model's. Returns both outputs."""
    out_ref, out = reference(*args), converted(*args)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(out_ref)
    named_ref = dict(reference.named_parameters())
    named = dict(converted.named_parameters())
    assert named.keys() == named_ref.keys()
    grads_ref = torch.autograd.grad(out_ref, list(named_ref.values()), grad_out, allow_unused=True)
    grads = torch.autograd.grad(out, [named[k] for k in named_ref], grad_out, allow_unused=True)
    for name, g_ref, g in zip(named_ref, grads_ref, grads):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")
    state_ref, state = reference.state_dict(), converted.state_dict()
    assert list(state) == list(state_ref)
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], rtol=0, atol=0)
    return out_ref, out


@pytest.fixture
def fresh_dynamo():
    """Forget what torch.compile learnt from earlier tests (sizes that changed make it capture
    later models with symbolic sizes, which costs several times a static capture)."""
    torch._dynamo.reset()
    yield
