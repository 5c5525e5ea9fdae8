"""The activations as Triton helpers, written once: act(y) and act'(y) from the pre-activation y.

ACT is a tl.constexpr code (see CODES), so every kernel is specialised on its activation.
"""
import triton
import triton.language as tl

CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(y):
    # exp of a non-positive argument only: no overflow, no cancellation near 0 beyond fp32's.
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _sigmoid(y):
    e = tl.exp(-tl.abs(y))
    s = 1.0 / (1.0 + e)
    return tl.where(y < 0, 1.0 - s, s)


@triton.jit
def act(y, ACT: tl.constexpr):
    """act(y) on fp32 values."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * _SQRT1_2))
    elif ACT == 3:
        y = _tanh(y)
    elif ACT == 4:
        y = _sigmoid(y)
    return y


@triton.jit
def act_grad(y, ACT: tl.constexpr):
    """d act / d y at the pre-activation y (fp32)."""
    if ACT == 0:
        d = tl.full(y.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(y > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(y * _SQRT1_2)) + y * _INV_SQRT_2PI * tl.exp(-0.5 * y * y)
    elif ACT == 3:
        t = _tanh(y)
        d = 1.0 - t * t
    else:
        s = _sigmoid(y)
        d = s * (1.0 - s)
    return d
