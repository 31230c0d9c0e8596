#pragma once
// Exact eps of a Dirac mixture on the device: models::DiracMixture (models/dirac_mixture.hpp,
// docs/math.md, exact test problem 3) with cuBLAS GEMMs and a numerically stable softmax.
//   w_i(x) = softmax_i( l_i - |x - alpha y_i|^2 / (2 sigma^2) ),  l = log(weights) + z,
//   x0_hat = sum_i w_i y_i,   eps = (x - alpha x0_hat) / sigma.
// Same algorithm and parameter layout as the CPU model (so results agree to rounding):
//   q_i = alpha^2 |y_i|^2 - 2 alpha x.y_i        (one B x K GEMM for the cross terms)
//   logits = l_i - (q_i - min_i q_i) / (2 sigma^2) (shift BEFORE scaling: the nearest point
//            has exponent 0 exactly, far points underflow to 0, never Inf - Inf)
//   softmax with the row maximum subtracted; x0_hat = W Y (a B x d GEMM).
// VJP w.r.t. x, the conditioning logits z (K) and the points (K x d, flat row-major), as the
// CPU model: dR = w .* (c Y^T - (c . x0_hat) 1^T),  dx += (alpha/sigma^2) dR Y,
// dz += colsum(dR),  dY += w^T c + (alpha/sigma^2) dR^T x - (alpha^2/sigma^2) diag(colsum dR) Y.
//
//   diffgrad::gpu::CudaBackend<double> backend(stream);
//   diffgrad::models::gpu::DiracMixture<double> model(backend, points, K, d);  // host points
//   diffgrad::sample(scheme, backend, schedule, nodes, model, x);               // x on device
//
// Scratch (B x K and B x d buffers) is reallocated only when the batch size changes; the
// softmax runs one thread per sample (K sequential), the GEMMs dominate for K, d >> 1.
// Not thread-safe (mutable scratch), like the CPU model.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cuda/std/limits>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "diffgrad/backend/cuda/cublas.cuh"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/cuda/math.cuh"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN
namespace dirac {

/// out[i] = |y_i|^2 for the K rows of y (K x d).
template <class Scalar> struct SquaredRowNorm {
  const Scalar* y;
  Scalar* out;
  std::int64_t dim;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t i) const {
    Scalar s = 0;
    for (std::int64_t j = 0; j < dim; ++j) s += y[i * dim + j] * y[i * dim + j];
    out[i] = s;
  }
};

/// Row b of the posterior weights w (B x K) from the cross terms xy_bi = x_b . y_i.
template <class Scalar> struct Softmax {
  const Scalar* xy;
  Scalar* w;
  const Scalar* y_sq;      ///< |y_i|^2
  const Scalar* log_prior; ///< l_i
  Scalar minus_two_alpha, alpha_sq, inv_two_var;
  std::int64_t k;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t b) const {
    const Scalar* cross = xy + b * k;
    Scalar* row = w + b * k;
    Scalar q_min = ::cuda::std::numeric_limits<Scalar>::infinity();
    for (std::int64_t i = 0; i < k; ++i) {
      row[i] = minus_two_alpha * cross[i] + alpha_sq * y_sq[i]; // q_i
      q_min = detail::min_of(q_min, row[i]);
    }
    Scalar l_max = -::cuda::std::numeric_limits<Scalar>::infinity();
    for (std::int64_t i = 0; i < k; ++i) {
      row[i] = -(row[i] - q_min) * inv_two_var + log_prior[i]; // logit
      l_max = detail::max_of(l_max, row[i]);
    }
    Scalar sum = 0;
    for (std::int64_t i = 0; i < k; ++i) {
      row[i] = detail::exp_of(row[i] - l_max);
      sum += row[i];
    }
    for (std::int64_t i = 0; i < k; ++i) row[i] = row[i] / sum;
  }
};

/// out = (x - alpha x0) * inv_sigma, elementwise.
template <class Scalar> struct EpsFromX0 {
  const Scalar* x;
  const Scalar* x0;
  Scalar* out;
  Scalar alpha, inv_sigma;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t i) const {
    out[i] = (x[i] - alpha * x0[i]) * inv_sigma;
  }
};

/// Row b: dr (B x K) holds c_b . y_i on entry, w_bi (c_b . y_i - c_b . x0_b) on exit.
template <class Scalar> struct LogitCotangent {
  Scalar* dr;
  const Scalar* w;
  const Scalar* c;
  const Scalar* x0;
  std::int64_t k, dim;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t b) const {
    Scalar cx0 = 0;
    for (std::int64_t j = 0; j < dim; ++j) cx0 += c[b * dim + j] * x0[b * dim + j];
    for (std::int64_t i = 0; i < k; ++i) dr[b * k + i] = w[b * k + i] * (dr[b * k + i] - cx0);
  }
};

/// dy_ij -= scale * col_sum_i * y_ij over the K x d points.
template <class Scalar> struct SubtractDiagTimesPoints {
  Scalar* dy;
  const Scalar* col_sum;
  const Scalar* y;
  Scalar scale;
  std::int64_t dim;
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t e) const {
    dy[e] -= (scale * col_sum[e / dim]) * y[e];
  }
};

} // namespace dirac
DIFFGRAD_CUDA_NAMESPACE_END

namespace diffgrad::models::gpu {

template <class Scalar> class DiracMixture {
public:
  using backend_type = ::diffgrad::gpu::CudaBackend<Scalar>;
  using state_type = ::diffgrad::gpu::DeviceState<Scalar>;
  using vector_type = ::diffgrad::gpu::DeviceVector<Scalar>;

  /// Points: K x d, row-major on the host; weights: K positive finite (empty: equal), as the
  /// CPU model (normalised here, log taken in double).
  DiracMixture(const backend_type& backend, std::span<const double> points, std::int64_t k,
               std::int64_t dim, std::span<const double> weights = {})
      : backend_(backend), stream_(backend.stream()), k_(k), dim_(dim) {
    const char* where = "gpu::DiracMixture";
    if (k < 1 || dim < 1)
      diffgrad::detail::throw_argument(where, "points", "at least one point of dimension >= 1",
                                       diffgrad::detail::concat(k, " x ", dim));
    if (static_cast<std::int64_t>(points.size()) != k * dim)
      diffgrad::detail::throw_argument(
          where, "points", diffgrad::detail::concat(k * dim, " values (K x d)"), points.size());
    for (double p : points)
      if (!std::isfinite(p))
        throw invalid_argument(std::string(where) +
                               ": argument 'points' expected finite coordinates, got NaN or Inf");
    std::vector<double> w(weights.begin(), weights.end());
    if (w.empty()) w.assign(static_cast<std::size_t>(k), 1.0);
    if (static_cast<std::int64_t>(w.size()) != k)
      diffgrad::detail::throw_argument(where, "weights", diffgrad::detail::concat("length ", k),
                                       w.size());
    double total = 0.0;
    for (double v : w) {
      diffgrad::detail::require(v > 0 && std::isfinite(v), where, "weights",
                                "positive finite weights", v);
      total += v;
    }
    std::vector<Scalar> log_w(w.size()), pts(points.size());
    for (std::size_t i = 0; i < w.size(); ++i)
      log_w[i] = static_cast<Scalar>(std::log(w[i] / total));
    for (std::size_t i = 0; i < pts.size(); ++i) pts[i] = static_cast<Scalar>(points[i]);
    params_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(pts), stream_);
    log_weights_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(log_w), stream_);
    cond_ = vector_type(k, stream_);
    log_prior_ = vector_type(k, stream_);
    y_sq_ = vector_type(k, stream_);
    col_sum_ = vector_type(k, stream_);
    blas_ = std::make_unique<::diffgrad::gpu::CublasHandle>(stream_);
  }

  std::int64_t dim() const { return dim_; }
  std::int64_t num_points() const { return k_; }
  std::int64_t cond_size() const { return k_; }
  std::int64_t param_size() const { return k_ * dim_; }

  /// The conditioning: K logits added to the log-weights (device; zeros at construction).
  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  /// The parameters: the points, flat row-major K x d (device).
  const vector_type& params() const { return params_; }
  vector_type& params() { return params_; }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    forward(x, n, "gpu::DiracMixture::eps");
    prepare(out, x);
    const ::diffgrad::gpu::dirac::EpsFromX0<Scalar> f{
        x.data(), x0_.data(), out.data(), static_cast<Scalar>(n.alpha), finite(1.0 / n.sigma)};
    launch(f, x.size(), "eps");
  }

  /// The data prediction x0_hat = sum_i w_i y_i.
  void x0_hat(const state_type& x, const Node& n, state_type& out) const {
    forward(x, n, "gpu::DiracMixture::x0_hat");
    prepare(out, x);
    ::diffgrad::gpu::host_detail::copy_device(out.data(), x0_.data(), x0_.bytes(), stream_,
                                              "gpu::DiracMixture::x0_hat");
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dz)^T a and *dparams += (d eps/dY)^T a, summed
  /// over the batch. dcond / dparams may be null. `a` may alias `dx`.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    linear_vjp(x, n, a, 1.0 / n.sigma, -n.alpha / n.sigma, dx, dcond, dparams,
               "gpu::DiracMixture::vjp");
  }

  /// VJP of f(x) = c_x x + c_x0 x0_hat(x) (eps, x0_hat and flow velocities have this form).
  void linear_vjp(const state_type& x, const Node& n, const state_type& a, double c_x, double c_x0,
                  state_type& dx, vector_type* dcond, vector_type* dparams,
                  const char* where = "gpu::DiracMixture::linear_vjp") const {
    if (a.batch() != x.batch() || a.dim() != x.dim())
      diffgrad::detail::throw_argument(
          where, "cotangent",
          diffgrad::detail::concat("shape ", x.batch(), " x ", x.dim(), " (x's shape)"),
          diffgrad::detail::concat(a.batch(), " x ", a.dim()));
    if (dcond && dcond->size() != k_)
      diffgrad::detail::throw_argument(where, "dcond", diffgrad::detail::concat("length ", k_),
                                       dcond->size());
    if (dparams && dparams->size() != k_ * dim_)
      diffgrad::detail::throw_argument(
          where, "dparams", diffgrad::detail::concat("length ", k_ * dim_), dparams->size());
    forward(x, n, where);
    const std::int64_t b = x.batch(), size = x.size();
    namespace dc = ::diffgrad::gpu;
    // Read `a` before dx is written (they may alias).
    check(dc::lincomb(cot_.data(), size, stream_, dc::Term<Scalar>{finite_d(c_x0), a.data()}),
          "cotangent");
    if (&dx != &a) prepare(dx, x);
    check(dc::lincomb(dx.data(), size, stream_, dc::Term<Scalar>{finite_d(c_x), a.data()}), "dx");
    const cublasHandle_t h = blas_->get();
    using dc::blas::Op;
    // dR = c Y^T (B x K), then w .* (dR - (c . x0_hat)).
    blas(dc::blas::gemm<Scalar>(h, Op::n, Op::t, b, k_, dim_, Scalar(1), cot_.data(), dim_,
                                params_.data(), dim_, Scalar(0), dr_.data(), k_));
    launch(
        dc::dirac::LogitCotangent<Scalar>{dr_.data(), w_.data(), cot_.data(), x0_.data(), k_, dim_},
        b, "logit cotangent");
    const Scalar a_over_var = finite(n.alpha / (n.sigma * n.sigma));
    // dx += (alpha/sigma^2) dR Y.
    blas(dc::blas::gemm<Scalar>(h, Op::n, Op::n, b, dim_, k_, a_over_var, dr_.data(), k_,
                                params_.data(), dim_, Scalar(1), dx.data(), dim_));
    if (dcond || dparams) // colsum(dR) = dR^T 1
      blas(dc::blas::gemv_t<Scalar>(h, b, k_, Scalar(1), dr_.data(), k_, ones_.data(), Scalar(0),
                                    col_sum_.data()));
    if (dcond)
      check(dc::lincomb(dcond->data(), k_, stream_, dc::Term<Scalar>{1.0, dcond->data()},
                        dc::Term<Scalar>{1.0, col_sum_.data()}),
            "dcond");
    if (dparams) {
      Scalar* dy = dparams->data();
      blas(dc::blas::gemm<Scalar>(h, Op::t, Op::n, k_, dim_, b, Scalar(1), w_.data(), k_,
                                  cot_.data(), dim_, Scalar(1), dy, dim_));
      blas(dc::blas::gemm<Scalar>(h, Op::t, Op::n, k_, dim_, b, a_over_var, dr_.data(), k_,
                                  x.data(), dim_, Scalar(1), dy, dim_));
      launch(
          dc::dirac::SubtractDiagTimesPoints<Scalar>{
              dy, col_sum_.data(), params_.data(), finite(n.alpha * n.alpha / (n.sigma * n.sigma)),
              dim_},
          k_ * dim_, "dparams");
    }
  }

private:
  static Scalar finite(double v) {
    const double big = static_cast<double>(std::numeric_limits<Scalar>::max());
    return static_cast<Scalar>(v < -big ? -big : (v > big ? big : v));
  }
  static double finite_d(double v) { return static_cast<double>(finite(v)); }

  void check(cudaError_t e, const char* what) const {
    ::diffgrad::gpu::check(e, "gpu::DiracMixture", what);
  }
  void blas(cublasStatus_t s) const { ::diffgrad::gpu::check(s, "gpu::DiracMixture", "cuBLAS"); }
  template <class F> void launch(const F& f, std::int64_t n, const char* what) const {
    check(::diffgrad::gpu::launch_for_each(f, n, stream_), what);
  }

  void prepare(state_type& out, const state_type& x) const {
    if (out.batch() != x.batch() || out.dim() != x.dim())
      out = backend_.make_state(x.batch(), x.dim());
  }

  void resize(std::int64_t batch) const {
    if (batch == batch_) return; // steady state: no allocation
    namespace dc = ::diffgrad::gpu;
    xy_ = dc::DeviceBuffer<Scalar>(batch * k_, stream_);
    w_ = dc::DeviceBuffer<Scalar>(batch * k_, stream_);
    dr_ = dc::DeviceBuffer<Scalar>(batch * k_, stream_);
    x0_ = dc::DeviceBuffer<Scalar>(batch * dim_, stream_);
    cot_ = dc::DeviceBuffer<Scalar>(batch * dim_, stream_);
    ones_ = dc::DeviceBuffer<Scalar>(batch, stream_);
    check(dc::fill(ones_.data(), batch, Scalar(1), stream_), "ones");
    batch_ = batch;
  }

  void forward(const state_type& x, const Node& n, const char* where) const {
    if (x.dim() != dim_)
      diffgrad::detail::throw_argument(where, "x", diffgrad::detail::concat("dimension ", dim_),
                                       x.dim());
    if (!(n.sigma > 0.0) || !std::isfinite(n.sigma))
      diffgrad::detail::throw_argument(where, "node.sigma", "a positive finite noise level",
                                       n.sigma);
    diffgrad::detail::require(std::isfinite(n.alpha), where, "node.alpha", "a finite number",
                              n.alpha);
    if (cond_.size() != k_)
      diffgrad::detail::throw_argument(where, "cond (logits z)",
                                       diffgrad::detail::concat("length ", k_), cond_.size());
    if (params_.size() != k_ * dim_)
      diffgrad::detail::throw_argument(
          where, "params (points)", diffgrad::detail::concat("length ", k_ * dim_), params_.size());
    namespace dc = ::diffgrad::gpu;
    using dc::blas::Op;
    const std::int64_t b = x.batch();
    resize(b);
    check(dc::lincomb(log_prior_.data(), k_, stream_, dc::Term<Scalar>{1.0, log_weights_.data()},
                      dc::Term<Scalar>{1.0, cond_.data()}),
          "log prior");
    launch(dc::dirac::SquaredRowNorm<Scalar>{params_.data(), y_sq_.data(), dim_}, k_, "|y|^2");
    const cublasHandle_t h = blas_->get();
    // x.y_i for the whole batch: the one B x K GEMM.
    blas(dc::blas::gemm<Scalar>(h, Op::n, Op::t, b, k_, dim_, Scalar(1), x.data(), dim_,
                                params_.data(), dim_, Scalar(0), xy_.data(), k_));
    launch(dc::dirac::Softmax<Scalar>{xy_.data(), w_.data(), y_sq_.data(), log_prior_.data(),
                                      static_cast<Scalar>(-2.0 * n.alpha),
                                      static_cast<Scalar>(n.alpha * n.alpha),
                                      finite(0.5 / (n.sigma * n.sigma)), k_},
           b, "softmax");
    // x0_hat = W Y (B x d).
    blas(dc::blas::gemm<Scalar>(h, Op::n, Op::n, b, dim_, k_, Scalar(1), w_.data(), k_,
                                params_.data(), dim_, Scalar(0), x0_.data(), dim_));
  }

  backend_type backend_;
  cudaStream_t stream_;
  std::int64_t k_, dim_;
  vector_type params_, cond_, log_weights_;
  mutable vector_type log_prior_, y_sq_, col_sum_;
  mutable std::int64_t batch_ = -1;
  mutable ::diffgrad::gpu::DeviceBuffer<Scalar> xy_, w_, dr_, x0_, cot_, ones_;
  std::unique_ptr<::diffgrad::gpu::CublasHandle> blas_;
};

} // namespace diffgrad::models::gpu
