// The module pf_kernels._C. `import pf_kernels._C` loads this library, whose static initialisers
// (csrc/ops/*.cpp) register the ops: torch.ops.pf_kernels.*, the entry points torch.compile traces.
//
// Its functions are the eager entry points of pf_kernels.ops for backend="auto" on CPU and CUDA
// tensors: the Python path's checks of a valid call (the *_ok functions of pf_kernels/_validation.py)
// and what auto then runs (pf_kernels/_dispatch.py's _AUTO_ORDER: on the CPU, fusion_head by torch's
// ops and the back-projections by the cpu kernels; on a GPU, every op by the cuda kernels), with no
// Python between the call and the ops. The Python path costs ~15 us a call on a CPU, as much as a
// small op.
//
// Each returns None for any call it does not serve: another device or dtype, autocast on, a tensor
// subclass or a torch function mode (whose __torch_function__ the Python path honours), a
// transform's wrapper tensor (vmap, functionalize), or anything invalid. pf_kernels.ops then takes
// its Python path, which serves or names what is wrong. torch.compile never gets here
// (pf_kernels.ops asks first): it traces the Python path.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <limits>
#include <vector>

#include "cpu/activation_ops.h"

namespace pf_kernels {
namespace {

namespace py = pybind11;
using OptionalTensor = c10::optional<at::Tensor>;

PyObject* parameter_class = nullptr;       // torch.nn.Parameter
PyObject* device_context_class = nullptr;  // torch.utils._device.DeviceContext, or nullptr

// Torch function modes on the stack, if any, are all torch.set_default_device's (or `with
// torch.device(...)`'s) DeviceContext: it only sets the device of factory calls made without one,
// and the ops make none, so the call is served as without it.
bool only_default_device_modes() {
  if (!at::impl::torch_function_mode_enabled()) return true;
  const int64_t n = at::impl::PythonTorchFunctionTLS::stack_len();
  for (int64_t i = 0; i < n; ++i) {
    const std::shared_ptr<c10::SafePyObject>& mode = at::impl::PythonTorchFunctionTLS::get_stack_at(i);
    PyObject* obj = mode->ptr(&mode->pyinterpreter());
    if (device_context_class == nullptr || reinterpret_cast<PyObject*>(Py_TYPE(obj)) != device_context_class) {
      return false;
    }
  }
  return true;
}

// What auto would serve on tensors like t by the Python path with nothing for it to honour
// (pf_kernels.ops has checked PF_KERNELS_BACKEND: it reads os.environ, which the C environment need
// not match).
bool auto_serves_here(const at::Tensor& t) {
  return !at::autocast::is_autocast_enabled(t.device().type()) && only_default_device_modes();
}

// The devices served: the CPU, and CUDA where the cuda kernels are built (else auto picks torch).
bool served_device(const c10::Device& device) {
#ifdef PF_KERNELS_WITH_CUDA
  return device.is_cpu() || device.is_cuda();
#else
  return device.is_cpu();
#endif
}

// Tensors that are a transform's or a tracer's wrappers though their Python type is torch.Tensor
// (vmap, grad/jvp, functionalize, Python-dispatched), whose sizes may be symbolic: the Python path
// reads them as symbolic sizes, which at::Tensor::size() cannot.
const c10::DispatchKeySet kWrapperKeys{c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                       c10::DispatchKey::Functionalize, c10::DispatchKey::Python,
                                       c10::DispatchKey::PythonTLSSnapshot};

// The tensor of a torch.Tensor or nn.Parameter (not a subclass), strided, on a served device, of a
// dtype the kernels take; nullptr for anything else.
const at::Tensor* served_tensor(PyObject* o) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(o));
  if (type != THPVariableClass && type != parameter_class) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || !served_device(t.device()) || t.layout() != at::kStrided || t.is_nested() ||
      t.key_set().has_any(kWrapperKeys) || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    return nullptr;
  }
  const auto dtype = t.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) return nullptr;
  return &t;
}

// o's tensor if it is served and of ref's dtype and device; nullptr otherwise.
const at::Tensor* like(PyObject* o, const at::Tensor& ref) {
  const at::Tensor* t = served_tensor(o);
  return t != nullptr && t->scalar_type() == ref.scalar_type() && t->device() == ref.device() ? t : nullptr;
}

// An activation's name as the ops take it (a static string, valid with the GIL released), or
// nullptr where o is not exactly one of them.
const char* activation_name(PyObject* o) {
  static const char* const kNames[] = {"none", "relu", "gelu", "tanh", "sigmoid"};
  if (!PyUnicode_CheckExact(o)) return nullptr;
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &size);
  if (s == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  for (const char* name : kNames) {
    if (static_cast<size_t>(size) == std::strlen(name) && std::memcmp(s, name, size) == 0) return name;
  }
  return nullptr;
}

// A list or tuple (exactly, as _validation's checks) of n items (n < 0: any), or nullptr.
PyObject** items_of(PyObject* o, Py_ssize_t* n) {
  if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return nullptr;
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(o);
  if (*n >= 0 && size != *n) return nullptr;
  *n = size;
  return PySequence_Fast_ITEMS(o);
}

// weight (out, in_features) and bias None or (out,), both of ref's dtype.
bool read_linear(PyObject* w, PyObject* b, int64_t in_features, const at::Tensor& ref, at::Tensor* weight,
                 OptionalTensor* bias) {
  const at::Tensor* wt = like(w, ref);
  if (wt == nullptr || wt->dim() != 2 || wt->size(1) != in_features) return false;
  *weight = *wt;
  if (b == Py_None) {
    *bias = c10::nullopt;
    return true;
  }
  const at::Tensor* bt = like(b, ref);
  if (bt == nullptr || bt->dim() != 1 || bt->size(0) != wt->size(0)) return false;
  *bias = *bt;
  return true;
}

struct Head {
  std::vector<at::Tensor> hs;
  at::Tensor weight;
  OptionalTensor bias;
  const char* activation = nullptr;
};

bool read_head(PyObject* hs, PyObject* weight, PyObject* bias, PyObject* activation, Head* head) {
  head->activation = activation_name(activation);
  Py_ssize_t k = -1;
  PyObject** items = items_of(hs, &k);
  if (head->activation == nullptr || items == nullptr || k == 0) return false;
  const at::Tensor* first = served_tensor(items[0]);
  if (first == nullptr || first->dim() != 2) return false;
  int64_t in_features = 0;
  head->hs.reserve(k);
  for (Py_ssize_t j = 0; j < k; ++j) {
    const at::Tensor* h = like(items[j], *first);
    // (widths that overflow int64 together: no weight fits them, the Python path says so)
    if (h == nullptr || h->dim() != 2 || h->size(0) != first->size(0) ||
        h->size(1) > std::numeric_limits<int64_t>::max() - in_features) {
      return false;
    }
    in_features += h->size(1);
    head->hs.push_back(*h);
  }
  return read_linear(weight, bias, in_features, *first, &head->weight, &head->bias);
}

// A back-projection of a z (batch, dz) read with the modality's input x (batch, *positions, D), all
// of ref's dtype and device: the checks of _validation._projection_ok.
struct Projection {
  at::Tensor x, weight;
  OptionalTensor bias;
};

bool read_projection(PyObject* x, PyObject* weight, PyObject* bias, const at::Tensor& ref, int64_t batch,
                     int64_t dz, Projection* out) {
  const at::Tensor* xt = like(x, ref);
  if (xt == nullptr || xt->dim() < 2 || xt->size(0) != batch) return false;
  out->x = *xt;
  return read_linear(weight, bias, dz, ref, &out->weight, &out->bias);
}

// context_linear's proj_weight (H, Dc): H from p, Dc from the back-projection's weight.
bool read_proj_weight(PyObject* o, const Projection& bp, at::Tensor* out) {
  const at::Tensor* t = like(o, bp.x);
  if (t == nullptr || t->dim() != 2 || t->size(0) != bp.x.size(-1) || t->size(1) != bp.weight.size(0)) return false;
  *out = *t;
  return true;
}

// n per-modality biases: None (no bias anywhere) or a list/tuple of n tensors/None.
bool read_biases(PyObject* biases, Py_ssize_t n, std::vector<PyObject*>* out) {
  out->assign(n, Py_None);
  if (biases == Py_None) return true;
  PyObject** items = items_of(biases, &n);
  if (items == nullptr) return false;
  out->assign(items, items + n);
  return true;
}

// The fusion head auto picks: on a GPU the cuda kernel; on the CPU the torch backend's,
// pf_kernels.reference.linear_act: act(inp @ weight.T + bias) accumulated in fp32 (fp64 for fp64),
// returned in inp's dtype.
at::Tensor auto_fusion_head(const Head& head) {
  if (!head.weight.device().is_cpu()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pf_kernels::fusion_head", "")
                         .typed<at::Tensor(at::TensorList, const at::Tensor&, const OptionalTensor&,
                                           c10::string_view)>();
    return op.call(head.hs, head.weight, head.bias, head.activation);
  }
  const at::Tensor inp = at::cat(head.hs, -1);
  const auto dtype = inp.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto as_acc = [acc](const at::Tensor& t) { return t.scalar_type() == acc ? t : t.to(acc); };
  OptionalTensor bias;
  if (head.bias) bias = as_acc(*head.bias);
  at::Tensor y = activate(at::linear(as_acc(inp), as_acc(head.weight), bias), parse_activation(head.activation));
  return y.scalar_type() == dtype ? y : y.to(dtype);
}

// The back-projections: the device's kernel (pf_kernels._C's cpu or cuda backend).
at::Tensor kernel_backproj_concat(const Projection& bp, const at::Tensor& z, const char* activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::backproj_concat", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, c10::string_view)>();
  return op.call(bp.x, z, bp.weight, bp.bias, activation);
}

at::Tensor kernel_context_linear(const Projection& bp, const at::Tensor& z, const at::Tensor& proj_weight,
                              const char* activation, const char* out_activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pf_kernels::context_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, const at::Tensor&, c10::string_view,
                                         c10::string_view)>();
  return op.call(bp.x, z, bp.weight, bp.bias, proj_weight, activation, out_activation);
}

py::object wrap(at::Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

py::object wrap_all(std::vector<at::Tensor> ts) {
  py::list out(ts.size());
  for (size_t j = 0; j < ts.size(); ++j) out[j] = wrap(std::move(ts[j]));
  return std::move(out);
}

py::object fusion_head(py::handle hs, py::handle weight, py::handle bias, py::handle activation) {
  HANDLE_TH_ERRORS
  Head head;
  if (!read_head(hs.ptr(), weight.ptr(), bias.ptr(), activation.ptr(), &head) || !auto_serves_here(head.weight)) {
    return py::none();
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = auto_fusion_head(head);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object backproj_concat(py::handle x, py::handle z, py::handle weight, py::handle bias, py::handle activation) {
  HANDLE_TH_ERRORS
  const char* act = activation_name(activation.ptr());
  const at::Tensor* zt = served_tensor(z.ptr());
  Projection bp;
  if (act == nullptr || zt == nullptr || zt->dim() != 2 || !auto_serves_here(*zt) ||
      !read_projection(x.ptr(), weight.ptr(), bias.ptr(), *zt, zt->size(0), zt->size(1), &bp)) {
    return py::none();
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = kernel_backproj_concat(bp, *zt, act);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object context_linear(py::handle p, py::handle z, py::handle bp_weight, py::handle bp_bias,
                          py::handle proj_weight, py::handle activation, py::handle out_activation) {
  HANDLE_TH_ERRORS
  const char* act = activation_name(activation.ptr());
  const char* out_act = activation_name(out_activation.ptr());
  const at::Tensor* zt = served_tensor(z.ptr());
  Projection bp;
  at::Tensor pw;
  if (act == nullptr || out_act == nullptr || zt == nullptr || zt->dim() != 2 || !auto_serves_here(*zt) ||
      !read_projection(p.ptr(), bp_weight.ptr(), bp_bias.ptr(), *zt, zt->size(0), zt->size(1), &bp) ||
      !read_proj_weight(proj_weight.ptr(), bp, &pw)) {
    return py::none();
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = kernel_context_linear(bp, *zt, pw, act, out_act);
  }
  return wrap(std::move(out));
  END_HANDLE_TH_ERRORS_PYBIND
}

// The per-modality lists of the grouped and step ops, against z (B, Dz) or, before z exists, the
// head's (batch, out_features) and dtype. proj_weights: nullptr, or context_linear's per modality.
bool read_projections(PyObject* xs, PyObject* weights, PyObject* biases, PyObject* proj_weights,
                      const at::Tensor& ref, int64_t batch, int64_t dz, std::vector<Projection>* bps,
                      std::vector<at::Tensor>* pws) {
  Py_ssize_t n = -1;
  PyObject** x_items = items_of(xs, &n);
  if (x_items == nullptr || n == 0) return false;
  PyObject** w_items = items_of(weights, &n);
  std::vector<PyObject*> b_items;
  if (w_items == nullptr || !read_biases(biases, n, &b_items)) return false;
  PyObject** pw_items = nullptr;
  if (proj_weights != nullptr && (pw_items = items_of(proj_weights, &n)) == nullptr) return false;
  bps->resize(n);
  for (Py_ssize_t j = 0; j < n; ++j) {
    Projection& bp = (*bps)[j];
    if (!read_projection(x_items[j], w_items[j], b_items[j], ref, batch, dz, &bp)) return false;
    if (pw_items != nullptr) {
      pws->emplace_back();
      if (!read_proj_weight(pw_items[j], bp, &pws->back())) return false;
    }
  }
  return true;
}

py::object backproj_concat_grouped(py::handle xs, py::handle z, py::handle weights, py::handle biases,
                                   py::handle activation) {
  HANDLE_TH_ERRORS
  const char* act = activation_name(activation.ptr());
  const at::Tensor* zt = served_tensor(z.ptr());
  std::vector<Projection> bps;
  if (act == nullptr || zt == nullptr || zt->dim() != 2 || !auto_serves_here(*zt) ||
      !read_projections(xs.ptr(), weights.ptr(), biases.ptr(), nullptr, *zt, zt->size(0), zt->size(1), &bps,
                        nullptr)) {
    return py::none();
  }
  std::vector<at::Tensor> outs;
  {
    py::gil_scoped_release no_gil;
    for (const Projection& bp : bps) outs.push_back(kernel_backproj_concat(bp, *zt, act));
  }
  return wrap_all(std::move(outs));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object refine_step(py::handle hs, py::handle head_weight, py::handle head_bias, py::handle xs,
                       py::handle bp_weights, py::handle bp_biases, py::handle head_activation,
                       py::handle backproj_activation) {
  HANDLE_TH_ERRORS
  Head head;
  const char* act = activation_name(backproj_activation.ptr());
  std::vector<Projection> bps;
  if (act == nullptr || !read_head(hs.ptr(), head_weight.ptr(), head_bias.ptr(), head_activation.ptr(), &head) ||
      !auto_serves_here(head.weight) ||
      !read_projections(xs.ptr(), bp_weights.ptr(), bp_biases.ptr(), nullptr, head.hs[0], head.hs[0].size(0),
                        head.weight.size(0), &bps, nullptr)) {
    return py::none();
  }
  at::Tensor z;
  std::vector<at::Tensor> outs;
  {
    py::gil_scoped_release no_gil;
    z = auto_fusion_head(head);
    for (const Projection& bp : bps) outs.push_back(kernel_backproj_concat(bp, z, act));
  }
  return py::make_tuple(wrap(std::move(z)), wrap_all(std::move(outs)));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object refine_step_hoisted(py::handle hs, py::handle head_weight, py::handle head_bias, py::handle ps,
                               py::handle bp_weights, py::handle bp_biases, py::handle proj_weights,
                               py::handle head_activation, py::handle backproj_activation,
                               py::handle out_activations) {
  HANDLE_TH_ERRORS
  Head head;
  const char* act = activation_name(backproj_activation.ptr());
  std::vector<Projection> bps;
  std::vector<at::Tensor> pws;
  if (act == nullptr || !read_head(hs.ptr(), head_weight.ptr(), head_bias.ptr(), head_activation.ptr(), &head) ||
      !auto_serves_here(head.weight) ||
      !read_projections(ps.ptr(), bp_weights.ptr(), bp_biases.ptr(), proj_weights.ptr(), head.hs[0],
                        head.hs[0].size(0), head.weight.size(0), &bps, &pws)) {
    return py::none();
  }
  // One name for every modality, or a list/tuple of one per modality.
  Py_ssize_t n = static_cast<Py_ssize_t>(bps.size());
  std::vector<const char*> out_acts(n, activation_name(out_activations.ptr()));
  if (out_acts[0] == nullptr) {
    PyObject** items = items_of(out_activations.ptr(), &n);
    if (items == nullptr) return py::none();
    for (Py_ssize_t j = 0; j < n; ++j) {
      if ((out_acts[j] = activation_name(items[j])) == nullptr) return py::none();
    }
  }
  at::Tensor z;
  std::vector<at::Tensor> outs;
  {
    py::gil_scoped_release no_gil;
    z = auto_fusion_head(head);
    for (Py_ssize_t j = 0; j < n; ++j) outs.push_back(kernel_context_linear(bps[j], z, pws[j], act, out_acts[j]));
  }
  return py::make_tuple(wrap(std::move(z)), wrap_all(std::move(outs)));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace
}  // namespace pf_kernels

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using namespace pf_kernels;
  parameter_class = py::object(py::module_::import("torch.nn").attr("Parameter")).release().ptr();  // kept for good
  try {
    device_context_class =
        py::object(py::module_::import("torch.utils._device").attr("DeviceContext")).release().ptr();
  } catch (const py::error_already_set&) {  // a torch without it: every mode declines
    PyErr_Clear();
  }
  m.def("fusion_head", &fusion_head);
  m.def("backproj_concat", &backproj_concat);
  m.def("backproj_concat_grouped", &backproj_concat_grouped);
  m.def("context_linear", &context_linear);
  m.def("refine_step", &refine_step);
  m.def("refine_step_hoisted", &refine_step_hoisted);
  // What each serves a call with per device type, by pf_kernels._dispatch's backend names (the
  // benchmarks report it).
  py::dict cpu, cuda;
  cpu["fusion_head"] = py::make_tuple("torch");
  for (const char* op : {"backproj_concat", "backproj_concat_grouped", "context_linear"}) {
    cpu[op] = py::make_tuple("cpu");
  }
  for (const char* op : {"refine_step", "refine_step_hoisted"}) cpu[op] = py::make_tuple("torch", "cpu");
  for (const char* op : {"fusion_head", "backproj_concat", "backproj_concat_grouped", "context_linear",
                         "refine_step", "refine_step_hoisted"}) {
    cuda[op] = py::make_tuple("cuda");
  }
  py::dict backends;
  backends["cpu"] = cpu;
#ifdef PF_KERNELS_WITH_CUDA
  backends["cuda"] = cuda;
#endif
  m.attr("eager_backends") = backends;
}
