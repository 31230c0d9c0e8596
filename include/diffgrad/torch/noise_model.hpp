#pragma once
// diffgrad::models::TorchNoiseModel<Scalar>: a TorchScript module (or any callable on torch
// tensors) as a DifferentiableNoiseModel: eps(x, t, out) and vjp(x, t, a, dx, dcond*,
// dparams*) through torch autograd, so every diffgrad sampler, gradient() and inversion runs
// on a PyTorch-trained network. CMake: target_link_libraries(app PRIVATE diffgrad::torch).
//
//   #include "diffgrad/torch/noise_model.hpp"
//   using Net = diffgrad::models::TorchNoiseModel<double>;
//   Net net = Net::load("unet_f64.pt", {.sample_shape = {1, 8, 8},
//                                       .time_input = diffgrad::models::TorchTimeInput::integer});
//   net.set_cond(torch::tensor({3, 3}, torch::kLong));  // class labels, one per row (B = 2)
//   Net::state_type x(2, 64), out;                      // B x d, d = 1*8*8, row-major
//   net.eps(x, 999.0, out);        // module.forward(x as [2,1,8,8], t = [999, 999], labels)
//   // with a diffusion schedule whose model_t is the diffusers timestep: sample(...),
//   // gradient(...) as for any other model (docs/torch.md).
//
// Calling convention: module.forward(x, t) or, once set_cond() was called,
// module.forward(x, t, cond); x has shape {B, sample_shape...} (a view of the state's memory,
// no copy), t is a 1-D tensor of length B (or a 0-d tensor with time_per_sample = false)
// holding the node's model time: Scalar dtype (TorchTimeInput::floating) or int64
// (TorchTimeInput::integer, diffusers-trained nets; model_t must then be an integer). The
// module returns a tensor of x's shape and dtype, or a tuple/list whose first element is
// that tensor (diffusers' return_dict=False). The conditioning tensor is passed as set: a
// floating cond is differentiable (dcond is its flat gradient in row-major element order,
// cond_size() = numel), an integer cond (class labels) is not (cond_size() = 0).
// Parameters: module.named_parameters(recurse = true) order, which is the order of Python's
// torch.jit.load(file).named_parameters(); the flat gradient concatenates each parameter's
// gradient in that order, each flattened row-major (param_names(), param_size()).
// The module is put in eval mode and its parameters are marked requires_grad (eps runs
// under NoGradGuard, so that costs nothing there). The adapter never changes torch's thread
// settings (docs/torch.md, thread policy). CPU tensors only; see docs/torch.md for the
// CUDA design.
// LibTorch's c10 logging header defines a glog-style CHECK macro, which would silently
// replace a test framework's CHECK (Catch2's); the adapter's headers restore whatever CHECK
// was before they included LibTorch (docs/torch.md).
#pragma push_macro("CHECK")
#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>
#pragma pop_macro("CHECK")

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/torch/error.hpp"
#include "diffgrad/torch/tensor_view.hpp"

namespace diffgrad::models {

/// How the model time reaches the network.
enum class TorchTimeInput {
  floating,  ///< a tensor of the state's dtype holding node.model_t
  integer,   ///< an int64 tensor (diffusers timesteps); model_t must be an integer
};

/// How the conditioning tensor relates to the batch.
enum class TorchCondLayout {
  per_row,  ///< first dimension is the batch: cond.size(0) must equal B at every call
  shared,   ///< passed as is for every batch size (e.g. one embedding broadcast by the net)
};

struct TorchModelOptions {
  /// Per-sample input layout, e.g. {1, 8, 8} for B x 1 x 8 x 8; its product must be the
  /// state width d. Empty: the flat layout {d}.
  std::vector<std::int64_t> sample_shape{};
  TorchTimeInput time_input = TorchTimeInput::floating;
  /// t as a length-B tensor (true, diffusers' UNets accept this) or a 0-d tensor (false).
  bool time_per_sample = true;
};

template <class Scalar> class TorchNoiseModel {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  /// forward(x, t, cond) -> eps; cond is an undefined tensor when no conditioning is set.
  using Forward = std::function<at::Tensor(const at::Tensor& x, const at::Tensor& t,
                                           const at::Tensor& cond)>;
  using NamedParameters = std::vector<std::pair<std::string, at::Tensor>>;

  /// Wraps a loaded TorchScript module (held by handle: torch modules share their state).
  TorchNoiseModel(torch::jit::Module module, TorchModelOptions options)
      : options_(std::move(options)) {
    detail::rethrow_torch_errors("TorchNoiseModel", [&] {
      module.eval();
      NamedParameters named;
      for (const auto& p : module.named_parameters(/*recurse=*/true))
        named.emplace_back(p.name, p.value);
      module_ = module;
      forward_ = [m = module](const at::Tensor& x, const at::Tensor& t,
                              const at::Tensor& c) mutable {
        std::vector<c10::IValue> inputs{x, t};
        if (c.defined()) inputs.emplace_back(c);
        return first_tensor(m.forward(std::move(inputs)));
      };
      init(std::move(named));
    });
  }

  /// Wraps any callable on torch tensors; `parameters` are the tensors the callable reads
  /// (leaf tensors of dtype Scalar), in the order of the flat parameter gradient.
  TorchNoiseModel(Forward forward, NamedParameters parameters, TorchModelOptions options)
      : forward_(std::move(forward)), options_(std::move(options)) {
    detail::require(static_cast<bool>(forward_), "TorchNoiseModel", "forward", "a callable", 0.0);
    detail::rethrow_torch_errors("TorchNoiseModel", [&] { init(std::move(parameters)); });
  }

  /// torch::jit::load(path) (a TorchScript archive saved by torch.jit.save), wrapped.
  static TorchNoiseModel load(const std::string& path, TorchModelOptions options) {
    if (!std::filesystem::is_regular_file(path))
      detail::throw_argument("TorchNoiseModel::load", "path", "an existing TorchScript file",
                             "'" + path + "' (not a regular file)");
    torch::jit::Module module = detail::rethrow_torch_errors(
        "TorchNoiseModel::load", [&] { return torch::jit::load(path, c10::Device(c10::kCPU)); });
    return TorchNoiseModel(std::move(module), std::move(options));
  }

  const TorchModelOptions& options() const { return options_; }
  /// The TorchScript module (empty for the callable form).
  const std::optional<torch::jit::Module>& module() const { return module_; }

  // --- conditioning ------------------------------------------------------------------

  /// Sets the tensor passed as the network's third input (held by handle, not copied; a
  /// non-contiguous tensor is made contiguous once here). Floating conditioning must have
  /// the state's dtype and is differentiable; integer conditioning (class labels) is not.
  void set_cond(at::Tensor cond, TorchCondLayout layout = TorchCondLayout::per_row) {
    const char* where = "TorchNoiseModel::set_cond";
    detail::require(cond.defined(), where, "cond", "a defined tensor", 0.0);
    if (!cond.device().is_cpu())
      detail::throw_argument(where, "cond", "a CPU tensor", cond.device().str());
    if (cond.is_floating_point() && cond.scalar_type() != torch_interop::dtype_of<Scalar>())
      detail::throw_argument(where, "cond",
                             detail::concat("dtype ", c10::toString(torch_interop::dtype_of<Scalar>()),
                                            " (the state's) or an integer dtype"),
                             c10::toString(cond.scalar_type()));
    if (layout == TorchCondLayout::per_row && cond.dim() == 0)
      detail::throw_argument(where, "cond", "a tensor with a batch dimension (per_row layout)",
                             "a 0-d tensor");
    cond_ = detail::rethrow_torch_errors(where, [&] { return cond.contiguous(); });
    cond_layout_ = layout;
  }
  void clear_cond() { cond_ = at::Tensor(); }
  const at::Tensor& cond() const { return cond_; }
  TorchCondLayout cond_layout() const { return cond_layout_; }
  /// Length of dcond: the floating conditioning's element count, 0 without (or integer).
  std::int64_t cond_size() const {
    return cond_.defined() && cond_.is_floating_point() ? cond_.numel() : 0;
  }
  /// The floating conditioning, flat (row-major), as a vector (a copy).
  vector_type cond_values() const {
    vector_type v(cond_size());
    if (v.size() > 0) std::copy_n(cond_.data_ptr<Scalar>(), v.size(), v.data());
    return v;
  }
  /// Overwrites the floating conditioning's values in place (length cond_size()).
  void set_cond_values(const vector_type& v) {
    detail::require(v.size() == cond_size(), "TorchNoiseModel::set_cond_values", "v",
                    detail::concat("length cond_size() = ", cond_size()),
                    static_cast<double>(v.size()));
    if (v.size() > 0) std::copy_n(v.data(), v.size(), cond_.data_ptr<Scalar>());
  }

  // --- parameters --------------------------------------------------------------------

  std::int64_t param_size() const { return param_size_; }
  /// Parameter names in flat-gradient order (e.g. "conv_in.weight").
  const std::vector<std::string>& param_names() const { return param_names_; }
  const std::vector<at::Tensor>& parameters() const { return params_; }
  /// All parameters, flat, in param_names() order (a copy).
  vector_type params() const {
    vector_type v(param_size_);
    std::int64_t offset = 0;
    for (const auto& p : params_) {
      const at::Tensor c = p.contiguous();
      std::copy_n(c.data_ptr<Scalar>(), c.numel(), v.data() + offset);
      offset += c.numel();
    }
    return v;
  }
  /// Overwrites all parameters in place from a flat vector (length param_size()).
  void set_params(const vector_type& v) {
    detail::require(v.size() == param_size_, "TorchNoiseModel::set_params", "params",
                    detail::concat("length param_size() = ", param_size_),
                    static_cast<double>(v.size()));
    torch::NoGradGuard no_grad;
    std::int64_t offset = 0;
    for (auto& p : params_) {
      at::Tensor src = torch::from_blob(const_cast<Scalar*>(v.data()) + offset, p.sizes(),
                                        torch::TensorOptions().dtype(p.scalar_type()));
      p.copy_(src);
      offset += p.numel();
    }
  }

  // --- the model ---------------------------------------------------------------------

  /// out = network(x, t [, cond]): one forward call without autograd, one copy into out.
  void eps(const state_type& x, double t, state_type& out) {
    const char* where = "TorchNoiseModel::eps";
    detail::rethrow_torch_errors(where, [&] {
      torch::NoGradGuard no_grad;
      const at::Tensor xt = input_view(x, where, "x");
      const at::Tensor y = call(xt, t, cond_for(x.rows(), where), where);
      torch_interop::copy_to(y, out, x.rows(), x.cols());
    });
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dcond)^T a; *dparams += (d eps/dtheta)^T a (sums
  /// over the batch), by one forward with autograd and one torch::autograd::grad call that
  /// asks only for the wanted inputs. dcond / dparams may be null.
  void vjp(const state_type& x, double t, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) {
    const char* where = "TorchNoiseModel::vjp";
    if (a.rows() != x.rows() || a.cols() != x.cols())
      detail::throw_argument(where, "a", detail::concat("shape ", x.rows(), " x ", x.cols(),
                                                        " (the shape of x)"),
                             detail::concat(a.rows(), " x ", a.cols()));
    const bool want_cond = dcond != nullptr && cond_size() > 0;
    const bool want_params = dparams != nullptr && param_size_ > 0;
    if (want_cond && dcond->size() != cond_size())
      detail::throw_argument(where, "dcond", detail::concat("length cond_size() = ", cond_size()),
                             dcond->size());
    if (want_params && dparams->size() != param_size_)
      detail::throw_argument(where, "dparams",
                             detail::concat("length param_size() = ", param_size_),
                             dparams->size());
    detail::rethrow_torch_errors(where, [&] {
      torch::AutoGradMode grad_mode(true);
      // A fresh leaf over x's memory (from_blob does not copy; requires_grad_ only flags it).
      at::Tensor xt = input_view(x, where, "x");
      xt.requires_grad_(true);
      at::Tensor cond = cond_for(x.rows(), where);
      if (want_cond) cond = cond.detach().requires_grad_(true);  // an alias, no data copy
      const at::Tensor y = call(xt, t, cond, where);
      const at::Tensor cotangent = torch_interop::view_of(a, y.sizes());

      // The inputs to differentiate, in a member vector (its capacity is kept across calls).
      grad_inputs_.clear();
      grad_inputs_.push_back(xt);
      if (want_cond) grad_inputs_.push_back(cond);
      if (want_params) grad_inputs_.insert(grad_inputs_.end(), params_.begin(), params_.end());
      const std::vector<at::Tensor> grads =
          torch::autograd::grad({y}, grad_inputs_, {cotangent}, /*retain_graph=*/false,
                                /*create_graph=*/false, /*allow_unused=*/true);
      grad_inputs_.clear();  // drop the handles to this call's tensors

      if (grads[0].defined())
        torch_interop::copy_to(grads[0], dx, x.rows(), x.cols());
      else
        dx.setZero(x.rows(), x.cols());  // eps does not depend on x
      std::size_t k = 1;
      if (want_cond) accumulate(grads[k++], dcond->data());
      if (want_params) {
        Scalar* dst = dparams->data();
        for (std::size_t p = 0; p < params_.size(); ++p, ++k) {
          accumulate(grads[k], dst);
          dst += params_[p].numel();
        }
      }
    });
  }

  /// The input tensor the adapter built at the last eps/vjp call: a view of the caller's
  /// state (tests check its data pointer; it dangles once that state is gone).
  const at::Tensor& last_input() const { return last_input_; }

private:
  static at::Tensor first_tensor(const c10::IValue& v) {
    if (v.isTensor()) return v.toTensor();
    if (v.isTuple()) {
      const auto& elements = v.toTupleRef().elements();
      if (!elements.empty() && elements[0].isTensor()) return elements[0].toTensor();
    }
    if (v.isTensorList()) {
      const auto list = v.toTensorList();
      if (list.size() > 0) return list.get(0);
    }
    if (v.isList()) {
      const auto list = v.toListRef();
      if (!list.empty() && list[0].isTensor()) return list[0].toTensor();
    }
    detail::throw_argument("TorchNoiseModel", "module output",
                           "a tensor, or a tuple/list whose first element is a tensor",
                           v.tagKind());
  }

  void init(NamedParameters named) {
    const char* where = "TorchNoiseModel";
    // The product is formed once, here, with overflow checks (input_view compares it with
    // the state's width on every call).
    sample_numel_ = 1;
    for (std::int64_t s : options_.sample_shape) {
      detail::require(s > 0, where, "options.sample_shape", "positive extents",
                      static_cast<double>(s));
      if (!detail::checked_mul(sample_numel_, s, sample_numel_))
        detail::throw_argument(where, "options.sample_shape",
                               "extents whose product fits in int64",
                               torch_interop::shape_string(options_.sample_shape));
    }
    param_size_ = 0;
    for (auto& [name, p] : named) {
      if (!p.defined())
        detail::throw_argument(where, "parameters", "defined tensors", "'" + name + "' undefined");
      if (p.scalar_type() != torch_interop::dtype_of<Scalar>())
        detail::throw_argument(
            where, "parameters",
            detail::concat("dtype ", c10::toString(torch_interop::dtype_of<Scalar>()),
                           " (the state's; export one module per dtype)"),
            detail::concat("'", name, "' of dtype ", c10::toString(p.scalar_type())));
      if (!p.device().is_cpu())
        detail::throw_argument(where, "parameters", "CPU tensors",
                               detail::concat("'", name, "' on ", p.device().str()));
      if (!p.is_leaf())
        detail::throw_argument(where, "parameters", "leaf tensors (not results of operations)",
                               "'" + name + "'");
      if (!p.requires_grad()) p.requires_grad_(true);
      if (!detail::checked_add(param_size_, p.numel(), param_size_))
        detail::throw_argument(where, "parameters", "a total size that fits in int64", name);
      param_names_.push_back(name);
      params_.push_back(p);
    }
  }

  /// The network's input: a view of x's memory with shape {B, sample_shape...}.
  at::Tensor input_view(const state_type& x, const char* where, const char* arg) {
    const std::int64_t d = x.cols();
    shape_.assign(1, x.rows());
    if (options_.sample_shape.empty()) {
      shape_.push_back(d);
    } else {
      const std::int64_t product = sample_numel_;
      if (product != d)
        detail::throw_argument(
            where, arg,
            detail::concat("B x ", product, " (the product of options.sample_shape ",
                           torch_interop::shape_string(options_.sample_shape), ")"),
            detail::concat(x.rows(), " x ", d));
      shape_.insert(shape_.end(), options_.sample_shape.begin(), options_.sample_shape.end());
    }
    if (x.rows() < 1) detail::throw_argument(where, arg, "at least one row", x.rows());
    last_input_ = torch_interop::view_of(x, shape_);
    return last_input_;
  }

  at::Tensor cond_for(std::int64_t rows, const char* where) const {
    if (cond_.defined() && cond_layout_ == TorchCondLayout::per_row && cond_.size(0) != rows)
      detail::throw_argument(where, "cond",
                             detail::concat("a first dimension equal to the batch size ", rows,
                                            " (per_row layout; set_cond with "
                                            "TorchCondLayout::shared to broadcast)"),
                             torch_interop::shape_string(cond_.sizes()));
    return cond_;
  }

  /// The time tensor, reused while the batch size and kind stay the same.
  const at::Tensor& time_tensor(std::int64_t rows, double t, const char* where) {
    if (!std::isfinite(t)) detail::throw_argument(where, "t", "a finite model time", t);
    const bool integer = options_.time_input == TorchTimeInput::integer;
    if (integer && std::abs(t - std::round(t)) > 1e-9 * std::max(1.0, std::abs(t)))
      detail::throw_argument(where, "t",
                             "an integer model time (TorchTimeInput::integer: use a grid of "
                             "integer timesteps, or TorchTimeInput::floating)",
                             t);
    const std::int64_t n = options_.time_per_sample ? rows : 0;
    if (!time_.defined() || time_rows_ != n) {
      const auto dtype = integer ? c10::ScalarType::Long : torch_interop::dtype_of<Scalar>();
      time_ = options_.time_per_sample ? torch::empty({n}, torch::TensorOptions().dtype(dtype))
                                       : torch::empty({}, torch::TensorOptions().dtype(dtype));
      time_rows_ = n;
    }
    torch::NoGradGuard no_grad;
    if (integer)
      time_.fill_(static_cast<std::int64_t>(std::llround(t)));
    else
      time_.fill_(static_cast<Scalar>(t));
    return time_;
  }

  at::Tensor call(const at::Tensor& xt, double t, const at::Tensor& cond, const char* where) {
    const at::Tensor& tt = time_tensor(xt.size(0), t, where);
    at::Tensor y = forward_(xt, tt, cond);
    if (!y.defined())
      detail::throw_argument(where, "module output", "a defined tensor", "an undefined tensor");
    if (y.scalar_type() != xt.scalar_type())
      detail::throw_argument(where, "module output",
                             detail::concat("dtype ", c10::toString(xt.scalar_type()),
                                            " (the input's)"),
                             c10::toString(y.scalar_type()));
    if (!y.device().is_cpu())
      detail::throw_argument(where, "module output", "a CPU tensor", y.device().str());
    if (y.sizes() != xt.sizes())
      detail::throw_argument(where, "module output",
                             detail::concat("shape ", torch_interop::shape_string(xt.sizes()),
                                            " (the input's)"),
                             torch_interop::shape_string(y.sizes()));
    return y;
  }

  /// dst[0 .. g.numel()) += g (row-major); an unused input (undefined g) adds nothing.
  static void accumulate(const at::Tensor& g, Scalar* dst) {
    if (!g.defined()) return;
    const at::Tensor c = g.contiguous();
    Eigen::Map<vector_type>(dst, c.numel()) +=
        Eigen::Map<const vector_type>(c.data_ptr<Scalar>(), c.numel());
  }

  Forward forward_;
  std::optional<torch::jit::Module> module_;
  TorchModelOptions options_;
  std::vector<std::string> param_names_;
  std::vector<at::Tensor> params_;
  std::int64_t param_size_ = 0;
  std::int64_t sample_numel_ = 1; ///< product of options.sample_shape (checked in init)
  at::Tensor cond_;
  TorchCondLayout cond_layout_ = TorchCondLayout::per_row;
  at::Tensor time_;
  std::int64_t time_rows_ = -1;
  std::vector<std::int64_t> shape_;
  std::vector<at::Tensor> grad_inputs_;
  at::Tensor last_input_;
};

} // namespace diffgrad::models
