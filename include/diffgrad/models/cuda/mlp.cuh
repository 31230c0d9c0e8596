#pragma once
// The MLP eps / velocity network of models/mlp.hpp on the device, with cuBLAS GEMMs and exact
// VJPs (manual backprop) w.r.t. x, the conditioning z and the flat parameter vector.
// Same network, same parameter layout (torch nn.Sequential state_dict order: W_0 row-major
// n_1 x n_0, b_0, W_1, b_1, ...), same deterministic initialiser as the CPU Mlp, so a CPU and a
// device Mlp built from the same config and seed (or the same flat parameters) compute the
// same function, to rounding:
//   input  h_0 = [ x (d) | sin(omega_j tau), j < F | cos(omega_j tau), j < F | z (c) ]
//          tau = time_scale * t,  omega_j = pi 2^j   (features computed on the host in double)
//   hidden h_{l+1} = act(h_l W_l^T + b_l)             act = tanh or SiLU
//   output y = h_L W_L^T + b_L
//
//   diffgrad::models::gpu::Mlp<float> net(backend, {.dim = 2, .hidden = {64, 64}}, seed);
//   net.eps(x, t, out);  net.vjp(x, t, a, dx, &dcond, &dparams);   // device states
//
// The configuration mirrors models::MlpConfig (this header stays Eigen-free for nvcc; the
// CUDA tests check that both give the same parameter count and the same parameters).
// Scratch per layer is reallocated only when the batch size changes. Not thread-safe.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

#include "diffgrad/backend/cuda/cublas.cuh"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/cuda/math.cuh"
#include "diffgrad/core/error.hpp"
#include "diffgrad/models/mlp_init.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN
namespace mlp {

/// Most time features (2 F) passed by value to the input functor: F <= 60, as the CPU Mlp.
inline constexpr int kMaxTimeFeatures = 120;

/// Input row b: [x_b | time features | z].
template <class Scalar> struct Input {
  const Scalar* x;
  const Scalar* z;
  Scalar* in;
  Scalar features[kMaxTimeFeatures];
  std::int64_t dim, num_features, cond_dim;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t e) const {
    const std::int64_t width = dim + num_features + cond_dim;
    const std::int64_t b = e / width, j = e % width;
    in[e] = j < dim                  ? x[b * dim + j]
            : j < dim + num_features ? features[j - dim]
                                     : z[j - dim - num_features];
  }
};

/// pre += bias (broadcast over rows); act = activation(pre) unless `linear`.
template <class Scalar> struct BiasActivation {
  Scalar* pre;
  const Scalar* bias;
  Scalar* act; ///< null for the (linear) output layer
  std::int64_t width;
  bool use_tanh;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t e) const {
    const Scalar p = pre[e] + bias[e % width];
    pre[e] = p;
    if (act) act[e] = use_tanh ? detail::tanh_of(p) : p / (Scalar(1) + detail::exp_of(-p));
  }
};

/// g *= activation'(pre), with act = activation(pre) (tanh' = 1 - act^2;
/// SiLU' = s (1 + pre (1 - s)), s = sigmoid(pre)).
template <class Scalar> struct ActivationGrad {
  Scalar* g;
  const Scalar* pre;
  const Scalar* act;
  bool use_tanh;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t e) const {
    if (use_tanh) {
      g[e] *= Scalar(1) - act[e] * act[e];
    } else {
      const Scalar s = Scalar(1) / (Scalar(1) + detail::exp_of(-pre[e]));
      g[e] *= s * (Scalar(1) + pre[e] * (Scalar(1) - s));
    }
  }
};

} // namespace mlp
DIFFGRAD_CUDA_NAMESPACE_END

namespace diffgrad::models::gpu {

enum class Activation { tanh, silu };

/// Same fields and defaults as models::MlpConfig.
struct MlpConfig {
  int dim = 2;                     ///< d: state dimension (input x and output)
  int cond_dim = 0;                ///< c: length of the conditioning vector z
  int time_frequencies = 4;        ///< F: sin/cos features at omega_j = pi 2^j, j < F
  double time_scale = 1.0;         ///< tau = time_scale * t
  std::vector<int> hidden{64, 64}; ///< widths of the hidden layers (may be empty: linear)
  Activation activation = Activation::silu;
};

template <class Scalar> class Mlp {
public:
  using backend_type = ::diffgrad::gpu::CudaBackend<Scalar>;
  using state_type = ::diffgrad::gpu::DeviceState<Scalar>;
  using vector_type = ::diffgrad::gpu::DeviceVector<Scalar>;

  /// Initialised deterministically from `seed`, identically to models::Mlp(config, seed).
  Mlp(const backend_type& backend, MlpConfig config, std::uint64_t seed = 0)
      : backend_(backend), stream_(backend.stream()), config_(std::move(config)) {
    build_layout();
    std::vector<Scalar> p(static_cast<std::size_t>(param_size_));
    for (std::size_t l = 0; l + 1 < widths_.size(); ++l) {
      const std::int64_t end = bias_offset(l) + widths_[l + 1];
      for (std::int64_t i = offsets_[l]; i < end; ++i)
        p[static_cast<std::size_t>(i)] =
            static_cast<Scalar>(::diffgrad::models::mlp_init::parameter(i, widths_[l], seed));
    }
    params_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(p), stream_);
  }

  /// Given flat parameters (host, length param_size(), the layout above).
  Mlp(const backend_type& backend, MlpConfig config, std::span<const double> params)
      : backend_(backend), stream_(backend.stream()), config_(std::move(config)) {
    build_layout();
    if (static_cast<std::int64_t>(params.size()) != param_size_)
      diffgrad::detail::throw_argument(
          "gpu::Mlp", "params", diffgrad::detail::concat("length ", param_size_), params.size());
    std::vector<Scalar> p(params.begin(), params.end());
    params_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(p), stream_);
  }

  const MlpConfig& config() const { return config_; }
  std::int64_t dim() const { return config_.dim; }
  std::int64_t cond_size() const { return config_.cond_dim; }
  std::int64_t param_size() const { return param_size_; }
  /// Layer widths n_0 (input), n_1, ..., n_{L+1} = d.
  const std::vector<std::int64_t>& widths() const { return widths_; }
  std::int64_t weight_offset(std::size_t layer) const { return offsets_[layer]; }
  std::int64_t bias_offset(std::size_t layer) const {
    return offsets_[layer] + widths_[layer + 1] * widths_[layer];
  }

  /// The conditioning z (device, length cond_dim; zeros at construction).
  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  /// The flat parameters (device).
  const vector_type& params() const { return params_; }
  vector_type& params() { return params_; }

  void eps(const state_type& x, double t, state_type& out) const {
    forward(x, t, out, "gpu::Mlp::eps");
  }
  void velocity(const state_type& x, double t, state_type& out) const {
    forward(x, t, out, "gpu::Mlp::velocity");
  }
  void vjp(const state_type& x, double t, const state_type& a, state_type& dx, vector_type* dcond,
           vector_type* dparams) const {
    backward(x, t, a, dx, dcond, dparams, "gpu::Mlp::vjp");
  }
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dcond, vector_type* dparams) const {
    backward(x, t, a, dx, dcond, dparams, "gpu::Mlp::velocity_vjp");
  }

private:
  using Buffer = ::diffgrad::gpu::DeviceBuffer<Scalar>;

  void build_layout() {
    const char* where = "gpu::Mlp";
    diffgrad::detail::require(config_.dim >= 1, where, "config.dim", ">= 1", config_.dim);
    diffgrad::detail::require(config_.cond_dim >= 0, where, "config.cond_dim", ">= 0",
                              config_.cond_dim);
    diffgrad::detail::require(config_.time_frequencies >= 0 && config_.time_frequencies <= 60,
                              where, "config.time_frequencies", "0..60", config_.time_frequencies);
    diffgrad::detail::require(std::isfinite(config_.time_scale), where, "config.time_scale",
                              "a finite number", config_.time_scale);
    // Checked as models::Mlp does (the same limits and messages): an int input width, since
    // cuBLAS takes int sizes, and a parameter count whose byte size fits std::ptrdiff_t;
    // every sum and product is checked, as an overflow would be undefined behaviour.
    const std::int64_t input = std::int64_t{config_.dim} +
                               2 * std::int64_t{config_.time_frequencies} +
                               std::int64_t{config_.cond_dim};
    if (input > std::numeric_limits<int>::max())
      diffgrad::detail::throw_argument(
          where, "config",
          diffgrad::detail::concat("an input width dim + 2 time_frequencies + cond_dim <= ",
                                   std::numeric_limits<int>::max()),
          diffgrad::detail::concat(config_.dim, " + 2 * ", config_.time_frequencies, " + ",
                                   config_.cond_dim, " = ", input));
    widths_.assign(1, input);
    for (int w : config_.hidden) {
      diffgrad::detail::require(w >= 1, where, "config.hidden", "widths >= 1", w);
      widths_.push_back(w);
    }
    widths_.push_back(config_.dim);
    offsets_.clear();
    param_size_ = 0;
    constexpr std::int64_t max_params =
        std::numeric_limits<std::ptrdiff_t>::max() / static_cast<std::int64_t>(sizeof(Scalar));
    for (std::size_t l = 0; l + 1 < widths_.size(); ++l) {
      offsets_.push_back(param_size_);
      std::int64_t layer = 0;
      if (!diffgrad::detail::checked_mul(widths_[l + 1], widths_[l] + 1, layer) ||
          !diffgrad::detail::checked_add(param_size_, layer, param_size_) ||
          param_size_ > max_params)
        diffgrad::detail::throw_argument(
            where, config_.hidden.empty() ? "config.dim" : "config.hidden",
            diffgrad::detail::concat("layer widths whose parameter count sum_l n_{l+1} (n_l + 1) "
                                     "is at most ",
                                     max_params, " (the largest addressable array of ",
                                     sizeof(Scalar), "-byte scalars)"),
            diffgrad::detail::concat("a count beyond that at layer ", l, " (", widths_[l], " -> ",
                                     widths_[l + 1], ")"));
    }
    cond_ = vector_type(config_.cond_dim, stream_);
    const std::size_t layers = widths_.size() - 1;
    pre_.resize(layers);
    act_.resize(layers);
    grad_.resize(layers);
    blas_ = std::make_unique<::diffgrad::gpu::CublasHandle>(stream_);
  }

  std::size_t num_layers() const { return widths_.size() - 1; }
  const Scalar* weight(std::size_t l) const { return params_.data() + offsets_[l]; }
  const Scalar* bias(std::size_t l) const { return params_.data() + bias_offset(l); }

  void check_status(cudaError_t e, const char* what) const {
    ::diffgrad::gpu::check(e, "gpu::Mlp", what);
  }
  void blas(cublasStatus_t s) const { ::diffgrad::gpu::check(s, "gpu::Mlp", "cuBLAS"); }
  template <class F> void launch(const F& f, std::int64_t n, const char* what) const {
    check_status(::diffgrad::gpu::launch_for_each(f, n, stream_), what);
  }

  void check(const state_type& x, const char* where) const {
    if (x.dim() != config_.dim)
      diffgrad::detail::throw_argument(
          where, "x", diffgrad::detail::concat("dimension ", config_.dim), x.dim());
    if (cond_.size() != config_.cond_dim)
      diffgrad::detail::throw_argument(
          where, "cond (z)", diffgrad::detail::concat("length ", config_.cond_dim), cond_.size());
    if (params_.size() != param_size_)
      diffgrad::detail::throw_argument(
          where, "params", diffgrad::detail::concat("length ", param_size_), params_.size());
  }

  void resize(std::int64_t batch) const {
    if (batch == batch_) return; // steady state: no allocation
    for (std::size_t l = 0; l < num_layers(); ++l) {
      act_[l] = Buffer(batch * widths_[l], stream_);
      pre_[l] = Buffer(batch * widths_[l + 1], stream_);
      grad_[l] = Buffer(batch * widths_[l + 1], stream_);
    }
    ones_ = Buffer(batch, stream_);
    col_sum_ = Buffer(widths_[1], stream_);
    check_status(::diffgrad::gpu::fill(ones_.data(), batch, Scalar(1), stream_), "ones");
    batch_ = batch;
  }

  /// act_[0] = input rows; pre_[l] = act_[l] W_l^T + b_l; act_[l+1] = act(pre_[l]).
  void run_forward(const state_type& x, double t) const {
    namespace dc = ::diffgrad::gpu;
    using dc::blas::Op;
    const std::int64_t batch = x.batch();
    resize(batch);
    dc::mlp::Input<Scalar> input{};
    input.x = x.data();
    input.z = cond_.data();
    input.in = act_[0].data();
    input.dim = config_.dim;
    input.num_features = 2 * config_.time_frequencies;
    input.cond_dim = config_.cond_dim;
    const int f = config_.time_frequencies;
    const double tau = config_.time_scale * t;
    for (int j = 0; j < f; ++j) { // exactly models::Mlp::time_features
      const double omega = std::numbers::pi * std::ldexp(1.0, j);
      input.features[j] = static_cast<Scalar>(std::sin(omega * tau));
      input.features[f + j] = static_cast<Scalar>(std::cos(omega * tau));
    }
    launch(input, batch * widths_[0], "input");
    const cublasHandle_t h = blas_->get();
    const std::size_t layers = num_layers();
    for (std::size_t l = 0; l + 1 < layers; ++l) {
      blas(dc::blas::gemm<Scalar>(h, Op::n, Op::t, batch, widths_[l + 1], widths_[l], Scalar(1),
                                  act_[l].data(), widths_[l], weight(l), widths_[l], Scalar(0),
                                  pre_[l].data(), widths_[l + 1]));
      launch(dc::mlp::BiasActivation<Scalar>{pre_[l].data(), bias(l), act_[l + 1].data(),
                                             widths_[l + 1],
                                             config_.activation == Activation::tanh},
             batch * widths_[l + 1], "bias + activation");
    }
  }

  void forward(const state_type& x, double t, state_type& out, const char* where) const {
    namespace dc = ::diffgrad::gpu;
    using dc::blas::Op;
    check(x, where);
    run_forward(x, t);
    const std::size_t last = num_layers() - 1;
    if (out.batch() != x.batch() || out.dim() != config_.dim)
      out = backend_.make_state(x.batch(), config_.dim);
    blas(dc::blas::gemm<Scalar>(blas_->get(), Op::n, Op::t, x.batch(), widths_[last + 1],
                                widths_[last], Scalar(1), act_[last].data(), widths_[last],
                                weight(last), widths_[last], Scalar(0), out.data(),
                                widths_[last + 1]));
    launch(
        dc::mlp::BiasActivation<Scalar>{out.data(), bias(last), nullptr, widths_[last + 1], false},
        x.size(), "output bias");
  }

  void backward(const state_type& x, double t, const state_type& a, state_type& dx,
                vector_type* dcond, vector_type* dparams, const char* where) const {
    namespace dc = ::diffgrad::gpu;
    using dc::blas::Op;
    check(x, where);
    if (a.batch() != x.batch() || a.dim() != x.dim())
      diffgrad::detail::throw_argument(
          where, "cotangent",
          diffgrad::detail::concat("shape ", x.batch(), " x ", x.dim(), " (x's shape)"),
          diffgrad::detail::concat(a.batch(), " x ", a.dim()));
    if (dcond && dcond->size() != config_.cond_dim)
      diffgrad::detail::throw_argument(
          where, "dcond", diffgrad::detail::concat("length ", config_.cond_dim), dcond->size());
    if (dparams && dparams->size() != param_size_)
      diffgrad::detail::throw_argument(
          where, "dparams", diffgrad::detail::concat("length ", param_size_), dparams->size());
    run_forward(x, t);
    const std::int64_t batch = x.batch();
    const std::size_t layers = num_layers();
    const cublasHandle_t h = blas_->get();
    // Cotangent of the (linear) output layer's pre-activation.
    dc::host_detail::copy_device(grad_[layers - 1].data(), a.data(), a.size() * sizeof(Scalar),
                                 stream_, "gpu::Mlp::vjp");
    for (std::size_t l = layers; l-- > 0;) {
      const Scalar* g = grad_[l].data();
      const std::int64_t n_out = widths_[l + 1], n_in = widths_[l];
      if (dparams) {
        // dW_l += g^T act_l (n_out x n_in);  db_l += colsum(g).
        blas(dc::blas::gemm<Scalar>(h, Op::t, Op::n, n_out, n_in, batch, Scalar(1), g, n_out,
                                    act_[l].data(), n_in, Scalar(1), dparams->data() + offsets_[l],
                                    n_in));
        blas(dc::blas::gemv_t<Scalar>(h, batch, n_out, Scalar(1), g, n_out, ones_.data(), Scalar(1),
                                      dparams->data() + bias_offset(l)));
      }
      if (l == 0) break;
      // Cotangent of pre_[l-1]: (g W_l) .* act'(pre_[l-1]).
      Scalar* prev = grad_[l - 1].data();
      blas(dc::blas::gemm<Scalar>(h, Op::n, Op::n, batch, n_in, n_out, Scalar(1), g, n_out,
                                  weight(l), n_in, Scalar(0), prev, n_in));
      launch(dc::mlp::ActivationGrad<Scalar>{prev, pre_[l - 1].data(), act_[l].data(),
                                             config_.activation == Activation::tanh},
             batch * n_in, "activation gradient");
    }
    const std::int64_t d = config_.dim, c = config_.cond_dim, n0 = widths_[0], n1 = widths_[1];
    if (dcond && c > 0) {
      // dz += W_0[:, d + 2F :]^T colsum(g_0).
      blas(dc::blas::gemv_t<Scalar>(h, batch, n1, Scalar(1), grad_[0].data(), n1, ones_.data(),
                                    Scalar(0), col_sum_.data()));
      blas(dc::blas::gemv_t<Scalar>(h, n1, c, Scalar(1), weight(0) + (n0 - c), n0, col_sum_.data(),
                                    Scalar(1), dcond->data()));
    }
    if (&dx != &a && (dx.batch() != batch || dx.dim() != d)) dx = backend_.make_state(batch, d);
    // dx = g_0 W_0[:, :d].
    blas(dc::blas::gemm<Scalar>(h, Op::n, Op::n, batch, d, n1, Scalar(1), grad_[0].data(), n1,
                                weight(0), n0, Scalar(0), dx.data(), d));
  }

  backend_type backend_;
  cudaStream_t stream_;
  MlpConfig config_;
  std::vector<std::int64_t> widths_, offsets_;
  std::int64_t param_size_ = 0;
  vector_type params_, cond_;
  mutable std::int64_t batch_ = -1;
  mutable std::vector<Buffer> pre_, act_, grad_;
  mutable Buffer ones_, col_sum_;
  std::unique_ptr<::diffgrad::gpu::CublasHandle> blas_;
};

} // namespace diffgrad::models::gpu
