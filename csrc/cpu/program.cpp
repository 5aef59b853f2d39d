// A recorded CPU forward replayed in one call (nn.replay): its steps, each a kernel of this extension with
// every argument but its input and residual bound, run in order without Python between them.
//
// The Python replay spent ~23 us per step on ResNet-50 at batch 1 (Xeon, 1.6 GHz: 1.2 ms of a 50 ms
// forward) around the kernels: plan closures, buffer lookups, argument conversion. Here a step's output
// buffer, scratch and staging copy are the ones the same Buffers gave it when the program was captured
// (nn.replay): the same memory, reused in the same order, so a replay writes where the Python replay would.
// A step with no kernel here (a close call still timed in the model's forwards, a non-finite weight) calls
// its Python plan, and Winograd calls its Python fallback where its input is not finite.

#include <torch/extension.h>

#include "resnet_fast.h"

namespace resnet_fast {
namespace cpu {
namespace {

enum class Kind { kGemm, kAmx, kWinograd, kOneDnn, kMaxPool, kPython };
enum class Stage { kNone, kPad, kPick };

Kind parse_kind(const std::string& kind) {
  if (kind == "gemm") return Kind::kGemm;
  if (kind == "amx") return Kind::kAmx;
  if (kind == "winograd") return Kind::kWinograd;
  if (kind == "onednn") return Kind::kOneDnn;
  if (kind == "max_pool") return Kind::kMaxPool;
  TORCH_CHECK(false, "Program.add: unknown step kind '", kind, "'");
}

Stage parse_stage(const std::string& stage) {
  if (stage.empty()) return Stage::kNone;
  if (stage == "pad") return Stage::kPad;
  if (stage == "pick") return Stage::kPick;
  TORCH_CHECK(false, "Program.add: unknown stage '", stage, "'");
}

struct Step {
  Kind kind = Kind::kPython;
  int64_t x = -1, residual = -2;  // value indices: -1 the program's input, -2 none (residual)
  std::vector<int64_t> drops;     // values whose last reader this step is
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  bool relu = false;
  std::vector<int64_t> stride, padding, dilation, kernel;
  int64_t groups = 1;
  std::optional<at::Tensor> out;  // where the kernel writes (none: oneDNN's fresh output)
  bool in_place = false;          // writes into the residual instead
  std::optional<at::Tensor> workspace;
  // Before the kernel: x zero-padded by stage_args into staged (pad), or its pixels at stride stage_args
  // copied there (pick); the kernel then reads staged, or its view of view_sizes and view_strides.
  Stage stage = Stage::kNone;
  std::vector<int64_t> stage_args, view_sizes, view_strides;
  at::Tensor staged;
  py::object python;  // the plan (kPython), or Winograd's fallback: f(x, residual, buffers) -> Tensor
};

class Program {
 public:
  void add(const std::string& kind, int64_t x, std::optional<int64_t> residual, std::vector<int64_t> drops,
           std::optional<at::Tensor> weight, std::optional<at::Tensor> bias, bool relu, std::vector<int64_t> stride,
           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, std::vector<int64_t> kernel,
           std::optional<at::Tensor> out, bool in_place, std::optional<at::Tensor> workspace, const std::string& stage,
           std::vector<int64_t> stage_args, std::optional<at::Tensor> staged, std::vector<int64_t> view_sizes,
           std::vector<int64_t> view_strides, py::object fallback) {
    Step s;
    s.kind = parse_kind(kind);
    set_sources(s, x, residual, std::move(drops));
    TORCH_CHECK(s.kind == Kind::kMaxPool || weight.has_value(), "Program.add: a ", kind, " step needs its weight");
    TORCH_CHECK(s.kind == Kind::kOneDnn || in_place || out.has_value(), "Program.add: a ", kind,
                " step writes into out or its residual");
    TORCH_CHECK(!in_place || s.residual >= -1, "Program.add: an in-place step needs a residual");
    TORCH_CHECK(s.kind != Kind::kWinograd || !fallback.is_none(), "Program.add: Winograd needs its fallback");
    // As the checked conv_bias_act passes them on (the kernels' own checks run on every call).
    if (weight.has_value()) s.weight = weight->is_mkldnn() ? *weight : weight->contiguous();
    if (bias.has_value()) s.bias = bias->contiguous();
    s.relu = relu;
    s.stride = std::move(stride);
    s.padding = std::move(padding);
    s.dilation = std::move(dilation);
    s.groups = groups;
    s.kernel = std::move(kernel);
    s.out = std::move(out);
    s.in_place = in_place;
    s.workspace = std::move(workspace);
    s.stage = parse_stage(stage);
    TORCH_CHECK(s.stage == Stage::kNone || staged.has_value(), "Program.add: a ", stage, " stage needs its tensor");
    s.stage_args = std::move(stage_args);
    if (staged.has_value()) s.staged = *staged;
    s.view_sizes = std::move(view_sizes);
    s.view_strides = std::move(view_strides);
    s.python = std::move(fallback);
    steps_.push_back(std::move(s));
  }

  void add_python(py::object run, int64_t x, std::optional<int64_t> residual, std::vector<int64_t> drops) {
    Step s;
    set_sources(s, x, residual, std::move(drops));
    s.python = std::move(run);
    steps_.push_back(std::move(s));
  }

  at::Tensor run(const at::Tensor& input, const py::object& buffers) const {
    TORCH_CHECK(!steps_.empty(), "Program.run: no steps");
    std::vector<at::Tensor> values(steps_.size());
    for (size_t i = 0; i < steps_.size(); ++i) {
      const Step& s = steps_[i];
      const at::Tensor& x = s.x < 0 ? input : values[s.x];
      std::optional<at::Tensor> residual;
      if (s.residual >= -1) residual = s.residual < 0 ? input : values[s.residual];
      values[i] = run_step(s, x, residual, buffers);
      for (const int64_t d : s.drops) values[d] = at::Tensor();  // freed as the Python replay frees it
    }
    return values.back();
  }

  size_t size() const { return steps_.size(); }

  std::vector<std::string> kinds() const {
    static const char* names[] = {"gemm", "amx", "winograd", "onednn", "max_pool", "python"};
    std::vector<std::string> out;
    for (const Step& s : steps_) out.emplace_back(names[static_cast<int>(s.kind)]);
    return out;
  }

 private:
  void set_sources(Step& s, int64_t x, std::optional<int64_t> residual, std::vector<int64_t> drops) {
    const auto n = static_cast<int64_t>(steps_.size());
    TORCH_CHECK(x >= -1 && x < n, "Program.add: step ", n, " reads value ", x, ", not made before it");
    const int64_t r = residual.value_or(-2);
    TORCH_CHECK(r >= -2 && r < n, "Program.add: step ", n, " reads value ", r, ", not made before it");
    for (const int64_t d : drops) TORCH_CHECK(d >= 0 && d < n, "Program.add: step ", n, " drops value ", d);
    s.x = x;
    s.residual = r;
    s.drops = std::move(drops);
  }

  static at::Tensor call_python(const py::object& f, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const py::object& buffers) {
    py::object r = residual.has_value() ? py::cast(*residual) : py::none();
    return f(x, r, buffers).cast<at::Tensor>();
  }

  static at::Tensor run_step(const Step& s, const at::Tensor& input, std::optional<at::Tensor> residual,
                             const py::object& buffers) {
    if (s.kind == Kind::kPython) return call_python(s.python, input, residual, buffers);
    const auto cl = at::MemoryFormat::ChannelsLast;
    // As the Python plans call the kernels: x and the residual channels_last, an in-place step writing into
    // the residual it reads.
    at::Tensor x;
    switch (s.stage) {
      case Stage::kPad:
        pad_cl(input, s.stage_args, s.staged);
        x = s.view_sizes.empty() ? s.staged : s.staged.as_strided(s.view_sizes, s.view_strides);
        break;
      case Stage::kPick:
        s.staged.copy_(input.slice(2, 0, std::nullopt, s.stage_args[0]).slice(3, 0, std::nullopt, s.stage_args[1]));
        x = s.staged;
        break;
      case Stage::kNone:
        x = input.contiguous(cl);
        break;
    }
    if (residual.has_value()) residual = residual->contiguous(cl);
    const std::optional<at::Tensor> out = s.in_place ? residual : s.out;
    switch (s.kind) {
      case Kind::kGemm:
        return conv_gemm_bias_act(x, s.weight, s.bias, residual, s.relu, s.stride, s.padding, s.dilation, out);
      case Kind::kAmx:
        return conv_amx_bias_act(x, s.weight, s.bias, residual, s.relu, s.stride, s.padding, out);
      case Kind::kWinograd: {
        auto y = conv_winograd_bias_act(x, s.weight, s.bias, residual, s.relu, s.padding, out, s.workspace);
        // Nothing written (an input not finite): the plan's fallback, as the Python plan calls it.
        return y.has_value() ? *y : call_python(s.python, input, residual, py::none());
      }
      case Kind::kOneDnn:
        if (s.in_place)
          return conv_bias_act_into_residual(x, s.weight, s.bias, *residual, s.relu, s.stride, s.padding, s.dilation,
                                             s.groups);
        return conv_bias_act(x, s.weight, s.bias, residual, s.relu, s.stride, s.padding, s.dilation, s.groups);
      case Kind::kMaxPool:
        return max_pool_cl(x, s.kernel, s.stride, s.padding, out);
      case Kind::kPython:
        break;
    }
    TORCH_CHECK(false, "Program: unhandled step");
  }

  std::vector<Step> steps_;
};

}  // namespace

void bind_program(py::module_& m) {
  py::class_<Program>(m, "Program",
                      "A recorded CPU forward's steps (nn.replay), replayed in one call: run(x, buffers) -> the last "
                      "step's output")
      .def(py::init<>())
      .def("add", &Program::add,
           "a step running one of this extension's CPU kernels (kind 'gemm', 'amx', 'winograd', 'onednn' or "
           "'max_pool') on value x (-1: the program's input; else a step's output) and residual",
           py::arg("kind"), py::arg("x"), py::arg("residual"), py::arg("drops"), py::arg("weight") = py::none(),
           py::arg("bias") = py::none(), py::arg("relu") = false, py::arg("stride") = std::vector<int64_t>{1, 1},
           py::arg("padding") = std::vector<int64_t>{0, 0}, py::arg("dilation") = std::vector<int64_t>{1, 1},
           py::arg("groups") = 1, py::arg("kernel") = std::vector<int64_t>{}, py::arg("out") = py::none(),
           py::arg("in_place") = false, py::arg("workspace") = py::none(), py::arg("stage") = "",
           py::arg("stage_args") = std::vector<int64_t>{}, py::arg("staged") = py::none(),
           py::arg("view_sizes") = std::vector<int64_t>{}, py::arg("view_strides") = std::vector<int64_t>{},
           py::arg("fallback") = py::none())
      .def("add_python", &Program::add_python, "a step calling run(x, residual, buffers) in Python", py::arg("run"),
           py::arg("x"), py::arg("residual"), py::arg("drops"))
      .def("run", &Program::run, py::arg("x"), py::arg("buffers"))
      .def("kinds", &Program::kinds, "each step's kind ('python': its plan called in Python)")
      .def("__len__", &Program::size);
}

}  // namespace cpu
}  // namespace resnet_fast
