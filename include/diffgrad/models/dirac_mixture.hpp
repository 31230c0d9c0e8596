#pragma once
// Exact eps of a Dirac mixture (docs/math.md, exact test problem 3): data = point y_i with
// probability pi_i, so x_t = alpha y_i + sigma n and
//   w_i(x) = softmax_i( l_i - |x - alpha y_i|^2 / (2 sigma^2) ),   l = log(weights) + z,
//   x0_hat = sum_i w_i y_i,   eps = (x - alpha x0_hat) / sigma,
//   d eps/dx = I/sigma - (alpha^2/sigma^3) Cov_w(y) = sigma F   (F: the diffusion Fisher).
// The conditioning z is K logits added to the log-weights (class guidance is differentiable);
// the parameters are the points, flat row-major (y_i[j] at index i*d + j).
//
// Evaluation is GEMM-shaped: |x - alpha y_i|^2 = |x|^2 - 2 alpha x.y_i + alpha^2 |y_i|^2 with
// the cross terms of the whole batch in one matrix product. |x|^2 is the same for every i and
// cancels in the softmax, so the logits use q_i = alpha^2|y_i|^2 - 2 alpha x.y_i, shifted by
// the row minimum BEFORE the 1/(2 sigma^2) scaling: the nearest point then has exponent 0
// exactly, so far-away points and tiny sigma give underflow to 0 (never Inf - Inf = NaN).
// Rounding: the GEMM form carries an absolute logit error of about
// u (|x| + alpha |y|)^2 / (2 sigma^2) (u = unit roundoff), the price of the matrix product.
//
// Threads (docs/threading.md): the batch is evaluated in fixed blocks of kRowBlock rows (one
// GEMM per block) and the batch sums of the parameter/conditioning VJP in fixed blocks of
// kComponentBlock points (one GEMM over the whole batch per block). The blocks do not depend on
// the thread count, so eps, x0_hat and the VJPs have the same bits on 1 or T threads (a batch
// of at most kRowBlock rows and at most kComponentBlock points is one block: the single-GEMM
// evaluation of earlier versions).
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>

#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/thread_pool.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

namespace impl {

/// Rows per block of a mixture's batch evaluation, and points (components) per block of its
/// batch sums: fixed, so the result does not depend on how many threads run the blocks.
inline constexpr Eigen::Index kRowBlock = 64;
inline constexpr Eigen::Index kComponentBlock = 32;

/// body(begin, count) for the fixed blocks of `block` items covering [0, total), run on the
/// threads of `threads` (inline when there is one block or one thread).
template <class Body>
void for_fixed_blocks(const diffgrad::detail::ThreadHandle& threads, Eigen::Index total,
                      Eigen::Index block, Body&& body) {
  const Eigen::Index blocks = (total + block - 1) / block;
  const auto run = [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) {
      const Eigen::Index begin = static_cast<Eigen::Index>(b) * block;
      body(begin, std::min(block, total - begin));
    }
  };
  if (blocks <= 1 || threads.threads() <= 1) {
    run(0, blocks);
    return;
  }
  // Blocks are handed out one at a time from a shared counter, not in T contiguous ranges: a
  // participant that is slowed down (another process, a hypervisor) leaves its blocks to the
  // others. Which thread computes a block does not change its bits (each block is computed
  // alone, by the same code, into its own rows).
  std::atomic<std::int64_t> next{0};
  threads.parallel_for(threads.threads(), [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p)
      for (std::int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) run(b, b + 1);
  });
}

/// Checks a node for a model that divides by sigma: sigma > 0 and finite, alpha finite.
inline void require_noisy_node(const Node& n, const char* where) {
  if (!(n.sigma > 0.0) || !std::isfinite(n.sigma))
    diffgrad::detail::throw_argument(where, "node.sigma", "a positive finite noise level", n.sigma);
  diffgrad::detail::require(std::isfinite(n.alpha), where, "node.alpha", "a finite number",
                            n.alpha);
}

inline void require_positive_alpha(const Node& n, const char* where) {
  if (!(n.alpha > 0.0) || !std::isfinite(n.alpha))
    diffgrad::detail::throw_argument(where, "node.alpha", "alpha > 0 (x0 = (x - sigma eps)/alpha)",
                                     n.alpha);
}

template <class State>
void require_state_dim(const State& x, std::int64_t dim, const char* where, const char* arg) {
  if (x.cols() != dim)
    diffgrad::detail::throw_argument(where, arg, diffgrad::detail::concat("dimension ", dim),
                                     x.cols());
}

template <class State>
void require_same_shape(const State& a, const State& x, const char* where, const char* arg) {
  if (a.rows() != x.rows() || a.cols() != x.cols())
    diffgrad::detail::throw_argument(
        where, arg, diffgrad::detail::concat("shape ", x.rows(), " x ", x.cols(), " (x's shape)"),
        diffgrad::detail::concat(a.rows(), " x ", a.cols()));
}

template <class Vector>
void require_size(const Vector& v, std::int64_t size, const char* where, const char* arg) {
  if (v.size() != size)
    diffgrad::detail::throw_argument(where, arg, diffgrad::detail::concat("length ", size),
                                     v.size());
}

/// Scales in double, cast to Scalar without overflowing to Inf (0 * Inf would be NaN).
template <class Scalar> Scalar finite_scalar(double v) {
  const double big = static_cast<double>(std::numeric_limits<Scalar>::max());
  return static_cast<Scalar>(std::clamp(v, -big, big));
}

/// The posterior over the points of a Dirac mixture at one node, shared by DiracMixture and
/// RectifiedFlowMixture. Holds the scratch of the last call: buffers are resized only when
/// the batch size changes, so steady-state calls do not allocate. Not thread-safe.
template <class Scalar> class DiracPosterior {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_type = state_type;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using points_view = Eigen::Map<const matrix_type>;

  /// weights() = w (B x K) and x0_hat() = w Y (B x d) for the batch x, in fixed row blocks
  /// on the threads of `threads`.
  void forward(const state_type& x, const points_view& y, const vector_type& log_prior,
               double alpha, double sigma, const diffgrad::detail::ThreadHandle& threads = {}) {
    const auto batch = x.rows(), k = y.rows();
    resize(batch, k, y.cols());
    y_sq_norm_.noalias() = Scalar(alpha * alpha) * y.rowwise().squaredNorm();
    for_fixed_blocks(threads, batch, kRowBlock, [&](Eigen::Index r0, Eigen::Index rows) {
      forward_rows(x, y, log_prior, alpha, sigma, r0, rows);
    });
  }

  /// Rows [r0, r0 + rows) of forward().
  void forward_rows(const state_type& x, const points_view& y, const vector_type& log_prior,
                    double alpha, double sigma, Eigen::Index r0, Eigen::Index rows) {
    w_.middleRows(r0, rows).noalias() =
        Scalar(-2.0 * alpha) * (x.middleRows(r0, rows) * y.transpose()); // the GEMM: x_b . y_i
    // The softmax one row at a time: a row of K logits stays in cache for all its passes.
    const Scalar inv_two_var = finite_scalar<Scalar>(0.5 / (sigma * sigma));
    for (Eigen::Index b = r0; b < r0 + rows; ++b) {
      auto w = w_.row(b);
      w += y_sq_norm_.transpose(); // q_i = alpha^2 |y_i|^2 - 2 alpha x.y_i
      const Scalar q_min = w.minCoeff();
      w = log_prior.transpose() - (w.array() - q_min).matrix() * inv_two_var;
      const Scalar w_max = w.maxCoeff();
      w = (w.array() - w_max).exp().matrix();
      const Scalar w_sum = w.sum();
      w /= w_sum;
      row_min_(b) = q_min;
      row_max_(b) = w_max;
      row_sum_(b) = w_sum;
    }
    x0_.middleRows(r0, rows).noalias() = w_.middleRows(r0, rows) * y;
  }

  const matrix_type& weights() const { return w_; }
  const state_type& x0_hat() const { return x0_; }

  /// log sum_i exp(l_i - |x_b - alpha y_i|^2/(2 sigma^2)) per sample, after forward().
  Eigen::VectorXd log_sum_exp(const state_type& x, double sigma) const {
    const Eigen::VectorXd min_sq_dist =
        (row_min_.template cast<double>() + x.rowwise().squaredNorm().template cast<double>())
            .cwiseMax(0.0);
    return row_max_.template cast<double>() +
           row_sum_.template cast<double>().array().log().matrix() -
           min_sq_dist / (2.0 * sigma * sigma);
  }

  /// Backpropagates a cotangent c on x0_hat (after forward() at the same x):
  ///   dx += (alpha/sigma^2) dR Y,  dlog_prior += colsum(dR),
  ///   dY += w^T c + (alpha/sigma^2) dR^T x - (alpha^2/sigma^2) diag(colsum dR) Y,
  /// with dR = w .* (c Y^T - (c . x0_hat) 1^T) the cotangent of the logits.
  /// Per-row terms in fixed row blocks, then the batch sums in fixed blocks of points (each a
  /// sum over the whole batch), both on the threads of `threads`.
  void backward(const state_type& x, const points_view& y, double alpha, double sigma,
                const state_type& c, state_type& dx, vector_type* dlog_prior,
                Eigen::Map<matrix_type>* dpoints,
                const diffgrad::detail::ThreadHandle& threads = {}) {
    const Scalar a_over_var = finite_scalar<Scalar>(alpha / (sigma * sigma));
    for_fixed_blocks(threads, x.rows(), kRowBlock, [&](Eigen::Index r0, Eigen::Index rows) {
      auto dr = dr_.middleRows(r0, rows);
      const auto c_rows = c.middleRows(r0, rows);
      dr.noalias() = c_rows * y.transpose();
      cx0_.segment(r0, rows) = c_rows.cwiseProduct(x0_.middleRows(r0, rows)).rowwise().sum();
      dr = w_.middleRows(r0, rows).cwiseProduct(dr.colwise() - cx0_.segment(r0, rows));
      dx.middleRows(r0, rows).noalias() += a_over_var * (dr * y);
    });
    if (!dlog_prior && !dpoints) return;
    const Scalar a2_over_var = finite_scalar<Scalar>(alpha * alpha / (sigma * sigma));
    for_fixed_blocks(threads, y.rows(), kComponentBlock, [&](Eigen::Index k0, Eigen::Index n) {
      auto col_sum = col_sum_.segment(k0, n);
      col_sum = dr_.middleCols(k0, n).colwise().sum().transpose();
      if (dlog_prior) dlog_prior->segment(k0, n) += col_sum;
      if (dpoints) {
        auto dp = dpoints->middleRows(k0, n);
        dp.noalias() += w_.middleCols(k0, n).transpose() * c;
        dp.noalias() += a_over_var * (dr_.middleCols(k0, n).transpose() * x);
        dp -= (a2_over_var * col_sum).asDiagonal() * y.middleRows(k0, n);
      }
    });
  }

private:
  void resize(Eigen::Index batch, Eigen::Index k, Eigen::Index dim) {
    // Eigen's resize is a no-op when the size is unchanged: no steady-state allocation.
    w_.resize(batch, k);
    dr_.resize(batch, k);
    x0_.resize(batch, dim);
    row_min_.resize(batch);
    row_max_.resize(batch);
    row_sum_.resize(batch);
    cx0_.resize(batch);
    y_sq_norm_.resize(k);
    col_sum_.resize(k);
  }
  matrix_type w_, dr_;
  state_type x0_;
  vector_type row_min_, row_max_, row_sum_, cx0_, y_sq_norm_, col_sum_;
};

} // namespace impl

template <class Scalar> class DiracMixture {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_type = state_type;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using points_view = Eigen::Map<const matrix_type>;

  /// Equal weights on the K rows of `points` (K x d).
  explicit DiracMixture(const matrix_type& points)
      : DiracMixture(points, vector_type::Ones(points.rows())) {}

  /// Weights are positive and finite; they are normalised here.
  DiracMixture(const matrix_type& points, const vector_type& weights)
      : k_(points.rows()), dim_(points.cols()), params_(points.size()),
        cond_(vector_type::Zero(points.rows())) {
    if (k_ < 1 || dim_ < 1)
      diffgrad::detail::throw_argument("DiracMixture", "points",
                                       "at least one point of dimension >= 1",
                                       diffgrad::detail::concat(k_, " x ", dim_));
    impl::require_size(weights, k_, "DiracMixture", "weights");
    for (Eigen::Index i = 0; i < k_; ++i)
      diffgrad::detail::require(weights(i) > 0 && std::isfinite(static_cast<double>(weights(i))),
                                "DiracMixture", "weights", "positive finite weights",
                                static_cast<double>(weights(i)));
    if (!points.allFinite())
      throw invalid_argument(
          "DiracMixture: argument 'points' expected finite coordinates, got NaN or Inf");
    Eigen::Map<matrix_type>(params_.data(), k_, dim_) = points;
    const double total = weights.template cast<double>().sum();
    log_weights_ =
        (weights.template cast<double>() / total).array().log().matrix().template cast<Scalar>();
  }

  /// Threads for eps / x0_hat / the VJPs (fixed row and point blocks: the same bits for
  /// every count). Default: DIFFGRAD_NUM_THREADS, as EigenBackend. Shares the process-wide
  /// pool of that size with every backend of the same count.
  void set_num_threads(int threads) { threads_ = diffgrad::detail::ThreadHandle(threads); }
  void set_threads(const diffgrad::detail::ThreadHandle& threads) { threads_ = threads; }
  int num_threads() const { return threads_.threads(); }

  std::int64_t dim() const { return dim_; }
  std::int64_t num_points() const { return k_; }
  std::int64_t cond_size() const { return k_; }
  std::int64_t param_size() const { return k_ * dim_; }

  /// The conditioning: K logits added to the log-weights (zeros = the weights as given).
  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  void set_cond(const vector_type& z) {
    impl::require_size(z, k_, "DiracMixture::set_cond", "z");
    cond_ = z;
  }
  /// The parameters: the points, flat row-major (K*d).
  const vector_type& params() const { return params_; }
  vector_type& params() { return params_; }
  void set_params(const vector_type& p) {
    impl::require_size(p, k_ * dim_, "DiracMixture::set_params", "params");
    params_ = p;
  }
  points_view points() const { return points_view(params_.data(), k_, dim_); }
  /// log of the normalised base weights (without the conditioning).
  const vector_type& log_weights() const { return log_weights_; }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    forward(x, n, "DiracMixture::eps");
    const Scalar inv_sigma = impl::finite_scalar<Scalar>(1.0 / n.sigma);
    out = (x - Scalar(n.alpha) * post_.x0_hat()) * inv_sigma;
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dz)^T a and *dparams += (d eps/dY)^T a, summed
  /// over the batch. dcond / dparams may be null.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    // eps = (x - alpha x0_hat)/sigma.
    linear_vjp(x, n, a, 1.0 / n.sigma, -n.alpha / n.sigma, dx, dcond, dparams, "DiracMixture::vjp");
  }

  /// The VJP of x0_hat: dx = (d x0_hat/dx)^T a, and the same accumulations as vjp().
  void x0_hat_vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
                  vector_type* dcond, vector_type* dparams) const {
    linear_vjp(x, n, a, 0.0, 1.0, dx, dcond, dparams, "DiracMixture::x0_hat_vjp");
  }

  /// The VJP of f(x) = c_x x + c_x0 x0_hat(x) (eps, x0_hat, a flow velocity, ... are all of
  /// this form): dx = c_x a + (d x0_hat/dx)^T (c_x0 a), *dcond/*dparams += likewise.
  /// `a` may alias `dx`.
  void linear_vjp(const state_type& x, const Node& n, const state_type& a, double c_x, double c_x0,
                  state_type& dx, vector_type* dcond, vector_type* dparams,
                  const char* where = "DiracMixture::linear_vjp") const {
    impl::require_same_shape(a, x, where, "cotangent");
    if (dcond) impl::require_size(*dcond, k_, where, "dcond");
    if (dparams) impl::require_size(*dparams, k_ * dim_, where, "dparams");
    forward(x, n, where);
    cotangent_ = a * impl::finite_scalar<Scalar>(c_x0); // read a before dx is written
    dx = a * impl::finite_scalar<Scalar>(c_x);
    if (dparams) {
      Eigen::Map<matrix_type> dy(dparams->data(), k_, dim_);
      post_.backward(x, points(), n.alpha, n.sigma, cotangent_, dx, dcond, &dy, threads_);
    } else {
      post_.backward(x, points(), n.alpha, n.sigma, cotangent_, dx, dcond, nullptr, threads_);
    }
  }

  /// The data prediction E[x0 | x_t = x] = sum_i w_i y_i.
  void x0_hat(const state_type& x, const Node& n, state_type& out) const {
    forward(x, n, "DiracMixture::x0_hat");
    out = post_.x0_hat();
  }

  /// The posterior weights w (B x K).
  void posterior_weights(const state_type& x, const Node& n, matrix_type& out) const {
    forward(x, n, "DiracMixture::posterior_weights");
    out = post_.weights();
  }

  /// log p_t(x) per sample (the density of x_t = alpha y + sigma n), in double:
  ///   logsumexp_i(log pi_i - |x - alpha y_i|^2/(2 sigma^2)) - (d/2) log(2 pi sigma^2),
  /// pi = softmax(log weights + z).
  Eigen::VectorXd log_density(const state_type& x, const Node& n) const {
    forward(x, n, "DiracMixture::log_density");
    const Eigen::VectorXd prior = effective_log_prior().template cast<double>();
    const double m = prior.maxCoeff();
    const double log_norm = m + std::log((prior.array() - m).exp().sum());
    const double gauss =
        0.5 * static_cast<double>(dim_) * std::log(2.0 * std::numbers::pi * n.sigma * n.sigma);
    return (post_.log_sum_exp(x, n.sigma).array() - log_norm - gauss).matrix();
  }

  /// tr F = d/sigma^2 - (alpha^2/sigma^4) [sum_i w_i |y_i|^2 - |x0_hat|^2] per sample, in
  /// double (F = -Hessian of log p_t; docs/math.md, problem 3).
  Eigen::VectorXd fisher_trace(const state_type& x, const Node& n) const {
    forward(x, n, "DiracMixture::fisher_trace");
    const auto y = points();
    const Eigen::VectorXd second =
        post_.weights().template cast<double>() * y.rowwise().squaredNorm().template cast<double>();
    const Eigen::VectorXd x0_sq = post_.x0_hat().rowwise().squaredNorm().template cast<double>();
    const double s2 = n.sigma * n.sigma;
    return (Eigen::VectorXd::Constant(x.rows(), static_cast<double>(dim_) / s2) -
            (n.alpha * n.alpha / (s2 * s2)) * (second - x0_sq).cwiseMax(0.0));
  }

private:
  vector_type effective_log_prior() const { return log_weights_ + cond_; }

  void check_shapes(const state_type& x, const char* where) const {
    impl::require_state_dim(x, dim_, where, "x");
    impl::require_size(cond_, k_, where, "cond (logits z)");
    impl::require_size(params_, k_ * dim_, where, "params (points)");
  }

  void forward(const state_type& x, const Node& n, const char* where) const {
    check_shapes(x, where);
    impl::require_noisy_node(n, where);
    log_prior_ = log_weights_ + cond_;
    post_.forward(x, points(), log_prior_, n.alpha, n.sigma, threads_);
  }

  Eigen::Index k_, dim_;
  diffgrad::detail::ThreadHandle threads_{diffgrad::detail::threads_from_environment()};
  vector_type params_, cond_, log_weights_;
  mutable vector_type log_prior_;
  mutable impl::DiracPosterior<Scalar> post_;
  mutable state_type cotangent_;
};

} // namespace diffgrad::models
