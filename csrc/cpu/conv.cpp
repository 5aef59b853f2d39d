// CPU convolution with a fused bias (+ residual) (+ ReLU) epilogue.
//
// Route "onednn": the oneDNN convolution-pointwise ops that torch's inductor uses on CPU with
// freezing (mkldnn::_convolution_pointwise and its .binary overload, post-ops run inside the
// convolution; weights prepacked once by mkldnn::_reorder_convolution_weight). They are found
// through the c10 dispatcher at first use, so a torch without them (or without oneDNN) still
// loads this extension and takes route "aten": at::convolution, then our vectorized epilogue.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <ATen/MemoryOverlap.h>

#include <atomic>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cpu {
namespace {

struct OneDnnOps {
  std::optional<c10::OperatorHandle> unary, binary, reorder;
  std::optional<c10::OperatorHandle> binary_inplace;  // optional: writes into the residual
  bool bf16 = false;
  bool fp16 = false;
  std::string problem;  // why the ops are unusable ('' when usable)
};

// Boxed calls depend only on the schema (argument order and types), which has been stable across
// torch 2.x, not on the C++ signature the kernel happens to be registered with.
c10::OperatorHandle find_op(const char* name, const char* overload, const std::vector<std::string>& args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  const auto& schema = op.schema().arguments();
  bool same = schema.size() == args.size();
  for (size_t i = 0; same && i < args.size(); ++i) same = schema[i].name() == args[i];
  TORCH_CHECK(same, "unexpected schema ", op.schema());
  return op;
}

at::Tensor call(const c10::OperatorHandle& op, std::vector<c10::IValue> args) {
  op.callBoxed(&args);
  return args.back().toTensor();
}

bool call_bool_op(const char* name) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!op.has_value()) return false;
  std::vector<c10::IValue> stack;
  op->callBoxed(&stack);
  return stack.back().toBool();
}

OneDnnOps find_onednn_ops() {
  OneDnnOps ops;
  if (!at::hasMKLDNN()) {
    ops.problem = "this torch is built without oneDNN (mkldnn)";
    return ops;
  }
  try {
    ops.unary = find_op("mkldnn::_convolution_pointwise", "",
                        {"X", "W", "B", "padding", "stride", "dilation", "groups", "attr", "scalars", "algorithm"});
    ops.binary = find_op("mkldnn::_convolution_pointwise", "binary",
                         {"X", "other", "W", "B", "padding", "stride", "dilation", "groups", "binary_attr", "alpha",
                          "unary_attr", "unary_scalars", "unary_algorithm"});
    ops.reorder = find_op("mkldnn::_reorder_convolution_weight", "",
                          {"self", "padding", "stride", "dilation", "groups", "input_size"});
  } catch (const c10::Error& error) {
    ops = OneDnnOps();
    ops.problem = std::string("mkldnn::_convolution_pointwise ops unusable in this torch: ") +
                  error.what_without_backtrace();
    return ops;
  }
  try {
    ops.binary_inplace = find_op("mkldnn::_convolution_pointwise_", "binary",
                                 {"other", "X", "W", "B", "padding", "stride", "dilation", "groups", "binary_attr",
                                  "alpha", "unary_attr", "unary_scalars", "unary_algorithm"});
  } catch (const c10::Error&) {
    ops.binary_inplace.reset();  // conv_bias_act_into_residual then writes a fresh output
  }
  ops.bf16 = call_bool_op("mkldnn::_is_mkldnn_bf16_supported");
  ops.fp16 = call_bool_op("mkldnn::_is_mkldnn_fp16_supported");
  return ops;
}

const OneDnnOps& onednn_ops() {
  static const OneDnnOps ops = find_onednn_ops();  // thread-safe, once
  return ops;
}

std::atomic<bool> force_aten{false};

// Whether act(conv(x, w) + b + residual) can hold a NaN before the ReLU: only when an input holds
// Inf or NaN (a prepacked weight was checked when it was packed), or when a finite accumulation
// overflows to both +Inf and -Inf (not checked: that needs activations near 3.4e38).
bool nan_free_before_relu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& residual) {
  return all_finite(x) && (w.is_mkldnn() || all_finite(w)) && (!b.has_value() || all_finite(*b)) &&
         (!residual.has_value() || all_finite(*residual));
}

// '' when the oneDNN route runs this dtype, else why not.
std::string onednn_problem(at::ScalarType dtype) {
  if (force_aten.load()) return "forced by set_cpu_conv_route('aten')";
  const auto& ops = onednn_ops();
  if (!ops.problem.empty()) return ops.problem;
  switch (dtype) {
    case at::kFloat:
      return "";
    case at::kBFloat16:
      return ops.bf16 ? "" : "oneDNN bfloat16 convolution is not supported on this CPU";
    case at::kHalf:
      return ops.fp16 ? "" : "oneDNN float16 convolution is not supported on this CPU";
    default:
      return std::string("oneDNN fused convolution does not take ") + c10::toString(dtype);
  }
}

}  // namespace

std::string conv_route(at::ScalarType dtype) {
  const std::string why = onednn_problem(dtype);
  if (why.empty()) return "onednn (mkldnn::_convolution_pointwise, fused post-ops, prepacked weights)";
  return "aten (at::convolution + resnet_fast epilogue; oneDNN route off: " + why + ")";
}

void set_conv_route(const std::string& route) {
  TORCH_CHECK(route == "auto" || route == "aten", "set_cpu_conv_route: expected 'auto' or 'aten', got '", route,
              "'");
  force_aten.store(route == "aten");
}

at::Tensor prepack_conv_weight(const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size) {
  // A non-finite weight stays dense, so conv_bias_act sees it and keeps NaN where torch would.
  if (!onednn_problem(w.scalar_type()).empty() || !all_finite(w)) return w.contiguous();
  // With input_size oneDNN picks the weight format for channels_last input (what conv_bias_act feeds it).
  return call(*onednn_ops().reorder, {w.contiguous(), padding, stride, dilation, groups, input_size});
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const std::string why_not = onednn_problem(x.scalar_type());
  if (why_not.empty()) {
    const auto& ops = onednn_ops();
    const c10::List<std::optional<at::Scalar>> no_scalars;
    const c10::IValue bias = b.has_value() ? c10::IValue(*b) : c10::IValue();
    // The out-of-place binary op fuses only groups == 1 (else it runs conv, then ATen's add_relu, which
    // lacks bfloat16), and torch 2.11's oneDNN cannot run it on one-pixel outputs ("could not create a
    // memory"): there conv + bias in oneDNN, residual + ReLU in our epilogue.
    const bool fused_residual =
        residual.has_value() && groups == 1 && residual->size(2) * residual->size(3) != 1;
    if (relu && !nan_free_before_relu(x, w, b, residual)) {
      // oneDNN's ReLU post-op is max(v, 0), which turns NaN into 0; torch.relu keeps it. Here a NaN
      // may appear, so oneDNN stops at bias (+ residual) and our epilogue does the ReLU.
      auto out = fused_residual
                     ? call(*ops.binary, {x, *residual, w, bias, padding, stride, dilation, groups, "add",
                                          c10::IValue(), c10::IValue(), no_scalars, c10::IValue()})
                     : call(*ops.unary, {x, w, bias, padding, stride, dilation, groups, "none", no_scalars,
                                         c10::IValue()});
      scale_shift_act_out(out, out, at::Tensor(), at::Tensor(), fused_residual ? std::nullopt : residual, relu);
      return out;
    }
    if (residual.has_value() && !fused_residual) {
      auto out = call(*ops.unary, {x, w, bias, padding, stride, dilation, groups, "none", no_scalars, c10::IValue()});
      scale_shift_act_out(out, out, at::Tensor(), at::Tensor(), residual, relu);
      return out;
    }
    if (residual.has_value()) {
      // Binary post-op "add" reads the residual, then the unary post-op ReLU; the output is fresh.
      return call(*ops.binary, {x, *residual, w, bias, padding, stride, dilation, groups, "add", c10::IValue(),
                                relu ? c10::IValue("relu") : c10::IValue(), no_scalars, c10::IValue()});
    }
    return call(*ops.unary,
                {x, w, bias, padding, stride, dilation, groups, relu ? "relu" : "none", no_scalars, c10::IValue()});
  }
  TORCH_CHECK(!w.is_mkldnn(), "conv_bias_act: got a oneDNN-prepacked weight, but the CPU route for ",
              x.scalar_type(), " is aten (", why_not, "); pass the dense weight");
  auto out = at::convolution(x, w, std::nullopt, stride, padding, dilation, /*transposed=*/false,
                             /*output_padding=*/{0, 0}, groups)
                 .contiguous(at::MemoryFormat::ChannelsLast);
  const bool epilogue = b.has_value() || residual.has_value() || relu;
  if (epilogue) {
    // Bias kept out of the convolution so one pass does bias + residual + ReLU.
    const auto shift = b.has_value() ? b->to(at::toOpMathType(x.scalar_type())).contiguous() : at::Tensor();
    scale_shift_act_out(out, out, at::Tensor(), shift, residual, relu);
  }
  return out;
}

at::Tensor conv_bias_act_into_residual(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                       const at::Tensor& residual, bool relu, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.is_cpu() && residual.is_cpu() && residual.scalar_type() == x.scalar_type() && residual.dim() == 4 &&
                  residual.size(0) == x.size(0) && residual.size(1) == w.size(0),
              "conv_bias_act_into_residual: expected CPU tensors, the residual [N, Cout, OH, OW] in the input's dtype");
  const auto& ops = onednn_ops();
  const auto cl = at::MemoryFormat::ChannelsLast;
  // Where the in-place binary op runs as the out-of-place one would (see conv_bias_act); else a fresh output.
  const bool in_place = onednn_problem(x.scalar_type()).empty() && ops.binary_inplace.has_value() && groups == 1 &&
                        residual.size(2) * residual.size(3) != 1 && residual.is_contiguous(cl) &&
                        x.is_contiguous(cl);
  if (!in_place) return conv_bias_act(x, w, b, residual, relu, stride, padding, dilation, groups);
  at::assert_no_overlap(residual, x);
  // Checked before the residual is overwritten; oneDNN's ReLU post-op would turn a NaN into 0.
  const bool post_op_relu = relu && nan_free_before_relu(x, w, b, residual);
  const c10::List<std::optional<at::Scalar>> no_scalars;
  call(*ops.binary_inplace, {residual, x, w, b.has_value() ? c10::IValue(*b) : c10::IValue(), padding, stride,
                             dilation, groups, "add", c10::IValue(),
                             post_op_relu ? c10::IValue("relu") : c10::IValue(), no_scalars, c10::IValue()});
  auto out = residual;
  if (relu && !post_op_relu) scale_shift_act_out(out, out, at::Tensor(), at::Tensor(), std::nullopt, relu);
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
