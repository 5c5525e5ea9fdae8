// Per-element math of the CUDA kernels: activations and their derivatives, NaN and inf handled as
// torch does (forward and autograd). Compiled for the host too, in pf_kernels::_activation_reference,
// so the CPU tests exercise the same code the GPU runs.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PF_HOST_DEVICE inline
#endif

namespace pf_kernels {

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Tanh = 3, Sigmoid = 4 };

// Host only: the schema passes the activation by name.
inline Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  throw std::invalid_argument("pf_kernels: activation must be one of none, relu, gelu, tanh, sigmoid; got '" +
                              name + "'");
}

// T is float or double (accumulation types): std:: overloads on the host, CUDA's on the device.
template <typename T>
PF_HOST_DEVICE T activate(T y, Activation act) {
  using std::erfc;
  using std::exp;
  using std::tanh;
  switch (act) {
    case Activation::Relu:
      return y < T(0) ? T(0) : y;  // NaN stays NaN, as torch.relu
    case Activation::Gelu:
      // erfc, not 1 + erf: no cancellation for y << 0, where gelu(y) is tiny.
      return T(0.5) * y * erfc(-y * T(0.70710678118654752440));
    case Activation::Tanh:
      return tanh(y);
    case Activation::Sigmoid:
      return T(1) / (T(1) + exp(-y));
    default:
      return y;
  }
}

// d act(y) / dy at the pre-activation y.
template <typename T>
PF_HOST_DEVICE T activation_grad(T y, Activation act) {
  using std::erfc;
  using std::exp;
  using std::tanh;
  switch (act) {
    case Activation::Relu:
      return y <= T(0) ? T(0) : T(1);  // passes the gradient at NaN, as torch's threshold_backward
    case Activation::Gelu: {
      const T cdf = T(0.5) * erfc(-y * T(0.70710678118654752440));
      const T pdf = exp(T(-0.5) * y * y) * T(0.39894228040143267794);  // 1/sqrt(2 pi)
      return cdf + y * pdf;
    }
    case Activation::Tanh: {
      const T t = tanh(y);
      return T(1) - t * t;
    }
    case Activation::Sigmoid: {
      const T s = T(1) / (T(1) + exp(-y));
      return s * (T(1) - s);
    }
    default:
      return T(1);
  }
}

// Whether a backward reads act' from the forward's output act(y), so the output is saved for it:
// relu, tanh and sigmoid, as eager autograd keeps their results, except tanh and sigmoid in 16-bit
// dtypes, which every backward differentiates from y (the rounded output loses 1 - a^2 near
// saturation). none needs nothing, gelu needs y.
inline bool derivative_from_output(Activation act, size_t element_size) {
  return act == Activation::Relu || (element_size > 2 && (act == Activation::Tanh || act == Activation::Sigmoid));
}

// d act / dy from the activation's output a = act(y), as eager autograd does (exact while a is
// held in the accumulation type); gelu cannot be recovered from its output and needs y.
template <typename T>
PF_HOST_DEVICE T grad_from_activated(T a, Activation act) {
  switch (act) {
    case Activation::Relu:
      return a <= T(0) ? T(0) : T(1);
    case Activation::Tanh:
      return T(1) - a * a;
    case Activation::Sigmoid:
      return a * (T(1) - a);
    default:
      return T(1);
  }
}

// The gradient through the activation, g * d with d = act' from activation_grad or
// grad_from_activated; relu's as torch's threshold_backward, a select: a NaN or inf g where relu is
// off gives 0 (the product would give NaN), as the cpu and triton backends do.
template <typename T>
PF_HOST_DEVICE T apply_act_grad(T g, T d, Activation act) {
  return act == Activation::Relu ? (d == T(0) ? T(0) : g) : g * d;
}

}  // namespace pf_kernels
