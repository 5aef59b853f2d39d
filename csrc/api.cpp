// Python bindings of resnet_fast._C: input checks, device guard, then the cpu/ or cuda/ kernel.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace {

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": shapes differ: ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ: ", a.scalar_type(), " vs ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": devices differ: ", a.device(), " vs ", b.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op,
              ": expected a floating-point tensor (float32, float16, bfloat16, float64), got ",
              a.scalar_type());
}

}  // namespace

at::Tensor add_relu(const at::Tensor& a, const at::Tensor& b) {
  check_same(a, b, "add_relu");
  // Kernels walk flat memory: both inputs dense in the same format (a's).
  const auto format = a.suggest_memory_format();
  const auto a_ = a.contiguous(format);
  const auto b_ = b.contiguous(format);
  if (a.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(a.device());
    return cuda::add_relu(a_, b_);
#else
    TORCH_CHECK(false, "add_relu: resnet_fast._C was built without CUDA sources");
#endif
  }
  TORCH_CHECK(a.is_cpu(), "add_relu: unsupported device ", a.device());
  return cpu::add_relu(a_, b_);
}

namespace {

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", the input on ", x.device());
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": expected a floating-point input (float32, float16, bfloat16, float64), got ", x.scalar_type());
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), op, ": unsupported device ", x.device());
#ifndef WITH_CUDA
  TORCH_CHECK(x.is_cpu(), op, ": resnet_fast._C was built without CUDA sources");
#endif
}

// A per-channel vector: 1-D, `channels` floats on the input's device, as the kernels' math type.
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), op, ": ", name, " must be 1-D with ", x.size(1),
              " elements (the input's channels), got shape ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": ", name, " must be floating point, got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " is on ", v.device(), ", the input on ", x.device());
  return v.to(at::toOpMathType(x.scalar_type())).contiguous();
}

void check_pair(const std::vector<int64_t>& v, const char* op, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 values (h, w), got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " values must be >= ", min, ", got [", v[0], ", ", v[1],
              "]");
}

}  // namespace

at::Tensor scale_shift_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "scale_shift_act";
  check_input(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input [N, C, ...], got shape ", x.sizes());
  const auto scale_ = channel_vector(scale, x, op, "scale");
  const auto shift_ = channel_vector(shift, x, op, "shift");
  // Kernels walk flat memory: input, residual and output dense in the input's format.
  const auto format = x.suggest_memory_format();
  const auto x_ = x.contiguous(format);
  std::optional<at::Tensor> res_;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual shape ", residual->sizes(), " differs from the input's ",
                x.sizes());
    check_like(*residual, x, op, "residual");
    res_ = residual->contiguous(format);
  }
  auto out = at::empty_like(x_);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    cuda::scale_shift_act_out(out, x_, scale_, shift_, res_, relu);
#endif
    return out;
  }
  cpu::scale_shift_act_out(out, x_, scale_, shift_, res_, relu);
  return out;
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& residual, bool relu, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  const char* op = "conv_bias_act";
  check_input(x, op);
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D input [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 4, op, ": expected a 4-D weight [Cout, Cin/groups, KH, KW], got shape ", w.sizes());
  check_like(w, x, op, "weight");
  TORCH_CHECK(!w.is_mkldnn() || x.is_cpu(), op, ": a oneDNN-prepacked weight needs a CPU input");
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t cout = w.size(0);
  TORCH_CHECK(x.size(1) == w.size(1) * groups && cout % groups == 0, op, ": input ", x.sizes(), ", weight ",
              w.sizes(), " and groups ", groups, " do not match (need C == weight.size(1) * groups and ",
              "weight.size(0) divisible by groups)");
  std::vector<int64_t> out_size{x.size(0), cout, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (w.size(2 + d) - 1) + 1;
    const int64_t padded = x.size(2 + d) + 2 * padding[d];
    TORCH_CHECK(padded >= extent, op, ": input ", x.sizes(), " with padding [", padding[0], ", ", padding[1],
                "] is smaller than the dilated kernel ", w.sizes());
    out_size[2 + d] = (padded - extent) / stride[d] + 1;
  }
  std::optional<at::Tensor> b_;
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == cout, op, ": bias must be 1-D with ", cout, " elements, got shape ",
                b->sizes());
    check_like(*b, x, op, "bias");
    b_ = b->contiguous();
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  std::optional<at::Tensor> res_;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_size), op, ": residual shape ", residual->sizes(),
                " differs from the output's ", at::IntArrayRef(out_size));
    check_like(*residual, x, op, "residual");
    res_ = residual->contiguous(cl);
  }
  if (c10::multiply_integers(out_size) == 0 || x.numel() == 0) {
    return at::empty(out_size, x.options().memory_format(cl));
  }
  const auto x_ = x.contiguous(cl);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    return cuda::conv_bias_act(x_, w, b_, res_, relu, stride, padding, dilation, groups);
#endif
  }
  return cpu::conv_bias_act(x_, w.is_mkldnn() ? w : w.contiguous(), b_, res_, relu, stride, padding, dilation,
                            groups);
}

at::Tensor prepack_conv_weight(const at::Tensor& w, const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                               int64_t groups, const std::vector<int64_t>& input_size) {
  const char* op = "prepack_conv_weight";
  TORCH_CHECK(w.dim() == 4 && at::isFloatingType(w.scalar_type()) && !w.is_mkldnn(), op,
              ": expected a dense 4-D floating-point weight, got ", w.sizes(), " ", w.scalar_type());
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must be [N, C, H, W]");
  // CUDA: cuDNN's NHWC kernels want an NHWC weight; making it once saves a copy per call.
  if (w.is_cuda()) return w.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(w.is_cpu(), op, ": unsupported device ", w.device());
  return cpu::prepack_conv_weight(w, stride, padding, dilation, groups, input_size);
}

std::string conv_route(const std::string& device_type, at::ScalarType dtype) {
  if (device_type == "cuda") {
#ifdef WITH_CUDA
    return cuda::conv_route(dtype);
#else
    return "none (resnet_fast._C was built without CUDA sources)";
#endif
  }
  TORCH_CHECK(device_type == "cpu", "conv_route: expected device type 'cpu' or 'cuda', got '", device_type, "'");
  return cpu::conv_route(dtype);
}

namespace {

// Batch-norm inputs: x [N, C, *] non-empty; dy and residual shaped like x, in x's dtype and device.
void check_bn(const at::Tensor& x, const char* op) {
  check_input(x, op);
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input [N, C, ...], got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": expected a non-empty input, got shape ", x.sizes());
}

at::Tensor like_input(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " shape ", t.sizes(), " differs from the input's ", x.sizes());
  check_like(t, x, op, name);
  return t.contiguous(x.suggest_memory_format());
}

std::optional<at::Tensor> like_input(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* op,
                                     const char* name) {
  if (!t.has_value()) return std::nullopt;
  return like_input(*t, x, op, name);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x) {
  const char* op = "bn_stats";
  check_bn(x, op);
  const auto x_ = x.contiguous(x.suggest_memory_format());
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    return cuda::bn_stats(x_);
#endif
  }
  return cpu::bn_stats(x_);
}

at::Tensor bn_apply(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "bn_apply";
  check_bn(x, op);
  const auto x_ = x.contiguous(x.suggest_memory_format());
  const auto res_ = like_input(residual, x, op, "residual");
  const auto scale_ = channel_vector(scale, x, op, "scale");
  const auto shift_ = channel_vector(shift, x, op, "shift");
  auto y = at::empty_like(x_);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    cuda::scale_shift_act_out(y, x_, scale_, shift_, res_, relu);
#endif
  } else {
    cpu::bn_apply_out(y, x_, scale_, shift_, res_, relu);
  }
  return y;
}

namespace {

// The inputs both backward passes share, checked and made dense like x.
struct BwdInputs {
  at::Tensor dy, x, scale, shift, mean;
  std::optional<at::Tensor> output;
  BwdInputs(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& scale_, const at::Tensor& shift_,
            const std::optional<at::Tensor>& output_, const at::Tensor& mean_, const char* op) {
    check_bn(x_, op);
    x = x_.contiguous(x_.suggest_memory_format());
    dy = like_input(dy_, x_, op, "grad");
    output = like_input(output_, x_, op, "output");
    scale = channel_vector(scale_, x_, op, "scale");
    shift = channel_vector(shift_, x_, op, "shift");
    mean = channel_vector(mean_, x_, op, "mean");
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& output,
                                                      const at::Tensor& mean, bool relu) {
  const BwdInputs in(dy, x, scale, shift, output, mean, "bn_backward_reduce");
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    return cuda::bn_backward_reduce(in.dy, in.x, in.scale, in.shift, in.output, in.mean, relu);
#endif
  }
  return cpu::bn_backward_reduce(in.dy, in.x, in.scale, in.shift, in.output, in.mean, relu);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> bn_backward_elemt(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& output, const at::Tensor& mean, const at::Tensor& ka, const at::Tensor& kb,
    const at::Tensor& kc, bool relu, bool residual_grad) {
  const char* op = "bn_backward_elemt";
  const BwdInputs in(dy, x, scale, shift, output, mean, op);
  const auto ka_ = channel_vector(ka, x, op, "ka");
  const auto kb_ = channel_vector(kb, x, op, "kb");
  const auto kc_ = channel_vector(kc, x, op, "kc");
  auto dx = at::empty_like(in.x);
  std::optional<at::Tensor> dres;
  if (residual_grad) dres = at::empty_like(in.x);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::DeviceGuard guard(x.device());
    cuda::bn_backward_elemt_out(dx, dres, in.dy, in.x, in.scale, in.shift, in.output, in.mean, ka_, kb_, kc_,
                                relu);
#endif
  } else {
    cpu::bn_backward_elemt_out(dx, dres, in.dy, in.x, in.scale, in.shift, in.output, in.mean, ka_, kb_, kc_, relu);
  }
  return {dx, dres};
}

bool all_finite(const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), "all_finite: expected a CPU tensor, got one on ", t.device());
  return cpu::all_finite(t);
}

// What a fold depends on, per tensor: its data pointer, version counter, dtype, device and shape, packed
// into bytes (fold.states's fields), for nn.replay's check of every fold source before a replay: ResNet-50's
// 265 tensors took 0.42 ms of Python attribute reads per batch-1 forward, and as a list of ints ~60 us to
// make and compare. A tensor without a version counter (an inference tensor) raises, as its _version does
// in Python.
py::bytes tensor_states(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size() * 10);
  for (const at::Tensor& t : tensors) {
    out.insert(out.end(), {reinterpret_cast<int64_t>(t.data_ptr()), int64_t(t._version()), int64_t(t.scalar_type()),
                           int64_t(t.device().type()), int64_t(t.device().index()), t.dim()});
    out.insert(out.end(), t.sizes().begin(), t.sizes().end());
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(int64_t));
}

// nn.replay's guards, in one loop: whether every (kind, obj, name, expected) holds. "attr": getattr(obj, name)
// is expected; "item": the dict obj maps name to expected (absent: None); "values": the values of the dict
// getattr(obj, name), in order, are the objects of the tuple expected; "type": type(obj) is expected. A
// failed lookup is a guard that does not hold. ResNet-50 has ~1,700: 0.12 ms here with warm caches (0.9-1.2
// ms for the same loop in Python); the walk and the checks they replace took 0.3 ms warm, 1 ms in a forward.
bool guards_hold(const py::list& guards) {
  for (const py::handle guard : guards) {
    PyObject* g = guard.ptr();
    if (!PyTuple_Check(g) || PyTuple_GET_SIZE(g) != 4 || !PyUnicode_Check(PyTuple_GET_ITEM(g, 0)))
      throw py::type_error("guards_hold: expected (kind, obj, name, expected) tuples");
    const char kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(g, 0))[0];
    PyObject* obj = PyTuple_GET_ITEM(g, 1);
    PyObject* name = PyTuple_GET_ITEM(g, 2);
    PyObject* expected = PyTuple_GET_ITEM(g, 3);
    bool holds = false;
    if (kind == 't') {  // type
      holds = reinterpret_cast<PyObject*>(Py_TYPE(obj)) == expected;
    } else if (kind == 'i') {  // item
      PyObject* value = PyDict_Check(obj) ? PyDict_GetItemWithError(obj, name) : nullptr;  // borrowed
      if (value == nullptr && PyErr_Occurred()) PyErr_Clear();
      holds = (value == nullptr ? Py_None : value) == expected;
    } else {
      PyObject* value = PyObject_GetAttr(obj, name);  // new reference
      if (value == nullptr) {
        PyErr_Clear();
        return false;
      }
      if (kind == 'a') {  // attr
        holds = value == expected;
      } else if (kind == 'v' && PyDict_Check(value) && PyTuple_Check(expected)) {  // values
        holds = PyDict_GET_SIZE(value) == PyTuple_GET_SIZE(expected);
        Py_ssize_t pos = 0, i = 0;
        PyObject *key, *item;
        while (holds && PyDict_Next(value, &pos, &key, &item)) holds = item == PyTuple_GET_ITEM(expected, i++);
      }
      Py_DECREF(value);
    }
    if (!holds) return false;
  }
  return true;
}

}  // namespace resnet_fast

namespace resnet_fast::cpu {
void bind_program(py::module_& m);  // cpu/program.cpp: nn.replay's compiled forward
}  // namespace resnet_fast::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fast C++/CUDA fused ops";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // Whether at::parallel_for runs on OpenMP threads here (its inline code parallelises only in files
  // compiled with OpenMP; else every C++ kernel runs on one thread).
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  // Checked at load: an extension built for another torch must be rebuilt, not used.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                            "." + std::to_string(TORCH_VERSION_PATCH);
  m.def("add_relu", &resnet_fast::add_relu, "relu(a + b), elementwise", py::arg("a"), py::arg("b"));
  m.def("scale_shift_act", &resnet_fast::scale_shift_act,
        "act(x * scale[c] + shift[c] (+ residual)) over channel dim 1, in x's layout", py::arg("x"),
        py::arg("scale"), py::arg("shift"), py::arg("residual") = py::none(), py::arg("relu") = true);
  m.def("conv_bias_act", &resnet_fast::conv_bias_act,
        "act(conv2d(x, w) + b (+ residual)), channels_last out; w dense or from prepack_conv_weight", py::arg("x"),
        py::arg("w"), py::arg("b"), py::arg("residual"), py::arg("relu"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"));
  m.def("conv_bias_act_into_residual", &resnet_fast::cpu::conv_bias_act_into_residual,
        "conv_bias_act on CPU for channels_last x and residual with valid arguments (conv_bias_act checks them), "
        "written into residual where oneDNN's in-place op runs it (else fresh); returns what was written",
        py::arg("x"), py::arg("w"), py::arg("b"), py::arg("residual"), py::arg("relu"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"));
  m.def("prepack_conv_weight", &resnet_fast::prepack_conv_weight,
        "w in the layout conv_bias_act runs fastest with for inputs of input_size (a oneDNN tensor on CPU)",
        py::arg("w"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("input_size"));
  m.def("conv_route", &resnet_fast::conv_route, "which convolution route conv_bias_act takes, and why",
        py::arg("device_type"), py::arg("dtype"));
  m.def("bn_stats", &resnet_fast::bn_stats,
        "per-channel (mean, biased variance) of x [N, C, *] over all but dim 1, in x's math type", py::arg("x"));
  m.def("bn_apply", &resnet_fast::bn_apply,
        "act(x * scale[c] + shift[c] (+ residual)): the batch-norm apply pass (its arithmetic is the backward's mask's)",
        py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("residual"), py::arg("relu"));
  m.def("bn_kernels_isa", &resnet_fast::cpu::bn_kernels_isa, "which build of the CPU batch-norm kernels runs here");
  m.def("bn_backward_reduce", &resnet_fast::bn_backward_reduce,
        "per-channel (sum dy', sum dy' * (x - mean)), dy' = 0 where output <= 0, or where x*scale + shift <= 0 "
        "when output is None, else dy (dy' = dy without relu)",
        py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("output"), py::arg("mean"),
        py::arg("relu"));
  m.def("bn_backward_elemt", &resnet_fast::bn_backward_elemt,
        "(dx = ka*dy' + kb*(x - mean) + kc per channel, dy' or None): the batch-norm input and residual grads",
        py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("output"), py::arg("mean"),
        py::arg("ka"), py::arg("kb"), py::arg("kc"), py::arg("relu"), py::arg("residual_grad"));
  m.def("evict_from_cache", &resnet_fast::cpu::evict_from_cache,
        "flush a CPU tensor's memory from every cache level (x86-64 clflush; elsewhere nothing)", py::arg("t"));
  m.def("tensor_states", &resnet_fast::tensor_states,
        "per tensor: data pointer, version counter, dtype, device type and index, dim and sizes, as bytes",
        py::arg("tensors"));
  m.def("guards_hold", &resnet_fast::guards_hold,
        "whether every (kind, obj, name, expected) guard holds: kind 'attr', 'item', 'values' or 'type' (nn.replay)",
        py::arg("guards"));
  m.def("empty_huge", &resnet_fast::cpu::empty_huge,
        "an uninitialized contiguous CPU tensor, on 2 MiB pages where it spans one and RESNET_FAST_HUGE_PAGES=1",
        py::arg("sizes"), py::arg("dtype"));
  m.def("all_finite", &resnet_fast::all_finite, "no Inf or NaN in a CPU tensor (one vectorized read pass)",
        py::arg("t"));
  m.def("conv_gemm_supported", &resnet_fast::cpu::conv_gemm_supported,
        "whether conv_gemm_bias_act runs here (x86-64 CPU with AVX2 + FMA)");
  m.def("conv_gemm_isa", &resnet_fast::cpu::conv_gemm_isa,
        "the micro-kernel conv_gemm_bias_act and Winograd run here: 'avx512f', 'avx2+fma' or 'none' "
        "(RESNET_FAST_CPU_ISA=avx2 keeps AVX2 on an AVX-512 CPU)");
  m.def("conv_gemm_bf16_supported", &resnet_fast::cpu::conv_gemm_bf16_supported,
        "whether conv_gemm_bias_act takes bfloat16 here (a CPU with AVX512_BF16)");
  m.def("pack_conv_gemm_weight", &resnet_fast::cpu::pack_conv_gemm_weight,
        "[Cout, Cin, KH, KW] float32 -> [Cout/16, KH, KW, Cin, 16] panels for conv_gemm_bias_act; bfloat16 (Cin "
        "even) -> [Cout/16, KH, KW, Cin/2, 16, 2]; of w * scale[o] when a float32 [Cout] scale is given (a BN fold); "
        "None where a packed value is not finite",
        py::arg("w"), py::arg("scale") = py::none());
  m.def("conv_gemm_bias_act", &resnet_fast::cpu::conv_gemm_bias_act,
        "act(conv2d(x, w) + b (+ residual)) on float32 (or bfloat16 with a float32 b, AVX512_BF16) with contiguous channels (channels_last, or any view whose "
        "pixels are read through its strides; groups 1), one implicit GEMM with the epilogue fused; written into out "
        "when given (out may be the residual itself)",
        py::arg("x"), py::arg("packed"), py::arg("b"), py::arg("residual"), py::arg("relu"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("out") = py::none());
  m.def("conv_amx_supported", &resnet_fast::cpu::conv_amx_supported,
        "whether conv_amx_bias_act runs here (a CPU with AMX-BF16 that the OS lets this process use)");
  m.def("conv_amx_bias_act", &resnet_fast::cpu::conv_amx_bias_act,
        "act(conv2d(x, w) + b (+ residual)) on bfloat16 with a float32 b, on AMX tiles (dilation 1, output channels a "
        "multiple of 32, input channels too or an even number below 32; channels contiguous, pixels read through "
        "x's strides), w packed by pack_conv_gemm_weight; written into out when given (may be the residual)",
        py::arg("x"), py::arg("packed"), py::arg("b"), py::arg("residual"), py::arg("relu"), py::arg("stride"),
        py::arg("padding"), py::arg("out") = py::none());
  m.def("pack_winograd_weight", &resnet_fast::cpu::pack_winograd_weight,
        "[Cout, Cin, 3, 3] float32 -> Winograd F(tile x tile, 3x3) weights G w G^T as [(tile + 2)^2, Cout/16, Cin, 16] "
        "panels, tile 2 or 4; bfloat16 (tile 2, an even Cin) -> [16, Cout/16, Cin/2, 16, 2] (channel pairs); of "
        "w * scale[o] when a float32 [Cout] scale is given (a BN fold); None where a packed value is not finite",
        py::arg("w"), py::arg("tile") = 2, py::arg("scale") = py::none());
  m.def("conv_winograd_bias_act", &resnet_fast::cpu::conv_winograd_bias_act,
        "act(conv2d(x, w, stride 1) + b (+ residual)) for a 3x3 weight packed by pack_winograd_weight (either tile), "
        "channels_last float32 or bfloat16 (F(2x2, 3x3), AVX512_BF16); written into out when given (out may be the residual itself), its scratch in workspace when given; "
        "None, with nothing written, where an input it reads is Inf or NaN (or its transform overflows)",
        py::arg("x"), py::arg("packed"), py::arg("b"), py::arg("residual"), py::arg("relu"), py::arg("padding"),
        py::arg("out") = py::none(), py::arg("workspace") = py::none());
  m.def("winograd_workspace_size", &resnet_fast::cpu::winograd_workspace_size,
        "float32 elements of the (float32) workspace conv_winograd_bias_act needs for this input shape and tile, "
        "in either dtype",
        py::arg("x_shape"), py::arg("cout"), py::arg("padding"), py::arg("tile") = 2);
  m.def("pad_cl", &resnet_fast::cpu::pad_cl,
        "write x zero-padded by padding (H, W) and to out's channel count into out (channels_last), in one pass",
        py::arg("x"), py::arg("padding"), py::arg("out"));
  m.def("max_pool_cl", &resnet_fast::cpu::max_pool_cl,
        "max_pool2d (no dilation, floor mode) on a channels_last CPU tensor, written into out when given",
        py::arg("x"), py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("out") = py::none());
  m.def("set_cpu_conv_route", &resnet_fast::cpu::set_conv_route,
        "'auto' (oneDNN fused ops when available) or 'aten' (force the fallback; for tests)", py::arg("route"));
  resnet_fast::cpu::bind_program(m);
}
