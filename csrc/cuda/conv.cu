// CUDA convolution with a fused bias (+ residual) (+ ReLU) epilogue.
//
// Route "cudnn": cuDNN's fused conv-bias-(add)-ReLU through ATen (at::cudnn_convolution_relu,
// at::cudnn_convolution_add_relu; TF32 follows torch.backends.cudnn.allow_tf32 inside them).
// Route "aten": at::convolution (cuDNN or not) followed by our epilogue kernel, for what those
// ops don't cover (no ReLU, float64, cuDNN disabled or absent).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cuda {
namespace {

// '' when the fused cuDNN ops run this dtype, else why not.
std::string cudnn_problem(at::ScalarType dtype) {
  auto& ctx = at::globalContext();
  if (!ctx.hasCuDNN()) return "torch is built without cuDNN";
  if (!ctx.userEnabledCuDNN()) return "torch.backends.cudnn.enabled is False";
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return std::string("fused cuDNN ops do not take ") + c10::toString(dtype);
  }
  return "";
}

}  // namespace

std::string conv_route(at::ScalarType dtype) {
  const std::string why = cudnn_problem(dtype);
  if (why.empty()) return "cudnn (cudnn_convolution_[add_]relu; no-ReLU convs: at::convolution with bias)";
  return "aten (at::convolution + resnet_fast epilogue kernel; cuDNN fusion off: " + why + ")";
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  // cuDNN runs NHWC only when the weight is NHWC too.
  const auto w_ = w.contiguous(cl);
  if (relu && cudnn_problem(x.scalar_type()).empty()) {
    if (residual.has_value()) {
      return at::cudnn_convolution_add_relu(x, w_, *residual, /*alpha=*/at::Scalar(1.0), b, stride, padding,
                                            dilation, groups)
          .contiguous(cl);
    }
    return at::cudnn_convolution_relu(x, w_, b, stride, padding, dilation, groups).contiguous(cl);
  }
  if (!relu && !residual.has_value()) {
    return at::convolution(x, w_, b, stride, padding, dilation, false, {0, 0}, groups).contiguous(cl);
  }
  auto out = at::convolution(x, w_, std::nullopt, stride, padding, dilation, false, {0, 0}, groups).contiguous(cl);
  const auto shift = b.has_value() ? b->to(at::toOpMathType(x.scalar_type())).contiguous() : at::Tensor();
  scale_shift_act_out(out, out, at::Tensor(), shift, residual, relu);
  return out;
}

}  // namespace cuda
}  // namespace resnet_fast
