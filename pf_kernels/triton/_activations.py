"""The activations as Triton helpers, written once: act(y) and act'(y) from the pre-activation y.

ACT is a tl.constexpr code (see CODES), so every kernel is specialised on its activation.

fp32 precision: sigmoid, tanh and their derivatives are accurate to a few ulp *relative* over the
whole range (sigmoid down to y ~ -87, where the result leaves the normal range), not only in
absolute terms: no `1 - s` cancellation, and exp(x) for x << 0 through a range reduction, because
tl.exp lowers to ex2.approx(x * log2 e) on the GPU, whose rounded product costs ~|x| ulp.
gelu uses the erf form as torch does (with the same cancellation for y << 0).
"""
import triton
import triton.language as tl

CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4}
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2_HI = tl.constexpr(0.693145751953125)  # 16 significant bits: k * _LN2_HI is exact for |k| < 256
_LN2_LO = tl.constexpr(1.4286068203094172e-06)  # ln 2 - _LN2_HI
_TANH_SERIES = tl.constexpr(0.5)  # below this |y|, tanh from its series (1 - e cancels there)


@triton.jit
def _pow2(k):
    """2^k for int32 k in [-126, 127], built from its bits (exact)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def exp_nonpositive(x):
    """exp(x) for fp32 x <= 0: x = k ln2 + r (Cody-Waite, exact), exp(r) on |r| <= ln2 / 2, times
    2^k in two normal factors, so that results in the denormal range are rounded once."""
    x = tl.where(x < -150.0, -150.0, x)  # exp(-150) < 2^-216: 0 after rounding; NaN stays NaN
    k = tl.floor(x * _LOG2E + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    ki = k.to(tl.int32)
    k1 = ki >> 1  # floor(k / 2): both halves >= -108
    return tl.exp(r) * _pow2(k1) * _pow2(ki - k1)


@triton.jit
def _tanh(y):
    a = tl.abs(y)
    e = exp_nonpositive(-2.0 * a)
    t = tl.math.div_rn(1.0 - e, 1.0 + e)  # 1 - e >= 0.63 here: no cancellation beyond e's rounding
    # odd Taylor series in y (8 terms, truncation < 1e-8 relative at |y| = 0.5)
    s = y * y
    p = -929569.0 / 638512875.0
    p = p * s + 21844.0 / 6081075.0
    p = p * s - 1382.0 / 155925.0
    p = p * s + 62.0 / 2835.0
    p = p * s - 17.0 / 315.0
    p = p * s + 2.0 / 15.0
    p = p * s - 1.0 / 3.0
    series = y + y * (p * s)
    return tl.where(a < _TANH_SERIES, series, tl.where(y < 0, -t, t))


@triton.jit
def _sigmoid(y):
    e = exp_nonpositive(-tl.abs(y))
    return tl.math.div_rn(tl.where(y < 0, e, 1.0), 1.0 + e)  # e / (1 + e) for y < 0: no 1 - s


@triton.jit
def act(y, ACT: tl.constexpr):
    """act(y) on fp32 values."""
    if ACT == 1:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as in torch (tl.maximum would drop it)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * _SQRT1_2))
    elif ACT == 3:
        y = _tanh(y)
    elif ACT == 4:
        y = _sigmoid(y)
    return y


@triton.jit
def grad_through(g, y, ACT: tl.constexpr):
    """g * act'(y), relu's as torch's threshold_backward: where(y <= 0, 0, g), so a NaN y passes g
    on and a NaN g where y <= 0 gives 0 (a product would give NaN * 0)."""
    if ACT == 1:
        r = tl.where(y <= 0, 0.0, g)
    else:
        r = g * act_grad(y, ACT)
    return r


@triton.jit
def act_grad(y, ACT: tl.constexpr):
    """d act / d y at the pre-activation y (fp32). tanh' = 4e / (1 + e)^2 with e = exp(-2|y|) and
    sigmoid' = e / (1 + e)^2 with e = exp(-|y|): no 1 - t^2 or s (1 - s) cancellation for large |y|."""
    if ACT == 0:
        d = tl.full(y.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(y > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(y * _SQRT1_2)) + y * _INV_SQRT_2PI * tl.exp(-0.5 * y * y)
    elif ACT == 3:
        e = exp_nonpositive(-2.0 * tl.abs(y))
        q = 1.0 + e
        d = tl.math.div_rn(4.0 * e, q * q)
    else:
        e = exp_nonpositive(-tl.abs(y))
        q = 1.0 + e
        d = tl.math.div_rn(e, q * q)
    return d
