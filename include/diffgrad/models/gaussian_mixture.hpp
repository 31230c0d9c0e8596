#pragma once
// Exact eps of an isotropic Gaussian mixture: data ~ sum_k pi_k N(m_k, s_k^2 I). Diffused,
// x_t | k ~ N(alpha m_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, so with e_k = (x - alpha
// m_k)/v_k
//   r_k = l_k - (d/2) log v_k - |x - alpha m_k|^2 / (2 v_k),   w = softmax(r),  l = log pi + z,
//   eps = -sigma grad log p_t = sigma sum_k w_k e_k,
//   d eps/dx = sigma [ (sum_k w_k / v_k) I - Cov_w(e) ]   (symmetric).
// K = 1 is GaussianData (docs/math.md, problem 1); s_k -> 0 is the Dirac mixture (problem 3).
// Conditioning z: K logits added to the log-weights. Parameters: the means, flat row-major
// (m_k[j] at k*d + j). The stds s_k are fixed at construction.
// Evaluation is GEMM-shaped (|x - alpha m_k|^2 = |x|^2 - 2 alpha x.m_k + alpha^2 |m_k|^2 with one
// matrix product for the batch, clamped at 0) and the softmax is shifted by its row maximum.
// Threads (docs/threading.md): as DiracMixture, fixed blocks of impl::kRowBlock rows (one GEMM
// each) and, for the batch sums of the VJP, of impl::kComponentBlock components: the same bits
// for every thread count.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "diffgrad/core/error.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

template <class Scalar> class GaussianMixture {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_type = state_type;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using means_view = Eigen::Map<const matrix_type>;

  /// Equal weights. `means` is K x d, `stds` has K entries (each >= 0; 0 is a Dirac component).
  GaussianMixture(const matrix_type& means, const Eigen::VectorXd& stds)
      : GaussianMixture(means, stds, Eigen::VectorXd::Ones(means.rows())) {}

  /// Weights are positive and finite; they are normalised here.
  GaussianMixture(const matrix_type& means, const Eigen::VectorXd& stds,
                  const Eigen::VectorXd& weights)
      : k_(means.rows()), dim_(means.cols()), stds_(stds), params_(means.size()),
        cond_(vector_type::Zero(means.rows())) {
    if (k_ < 1 || dim_ < 1)
      diffgrad::detail::throw_argument("GaussianMixture", "means",
                                       "at least one component of dimension >= 1",
                                       diffgrad::detail::concat(k_, " x ", dim_));
    impl::require_size(stds, k_, "GaussianMixture", "stds");
    impl::require_size(weights, k_, "GaussianMixture", "weights");
    for (Eigen::Index k = 0; k < k_; ++k) {
      diffgrad::detail::require(stds(k) >= 0 && std::isfinite(stds(k)), "GaussianMixture", "stds",
                                "non-negative finite stds", stds(k));
      diffgrad::detail::require(weights(k) > 0 && std::isfinite(weights(k)), "GaussianMixture",
                                "weights", "positive finite weights", weights(k));
    }
    if (!means.allFinite())
      throw invalid_argument(
          "GaussianMixture: argument 'means' expected finite coordinates, got NaN or Inf");
    Eigen::Map<matrix_type>(params_.data(), k_, dim_) = means;
    log_weights_ = (weights / weights.sum()).array().log().matrix().template cast<Scalar>();
  }

  /// Threads (fixed blocks: the same bits for every count); default DIFFGRAD_NUM_THREADS.
  void set_num_threads(int threads) { threads_ = diffgrad::detail::ThreadHandle(threads); }
  void set_threads(const diffgrad::detail::ThreadHandle& threads) { threads_ = threads; }
  int num_threads() const { return threads_.threads(); }

  std::int64_t dim() const { return dim_; }
  std::int64_t num_components() const { return k_; }
  std::int64_t cond_size() const { return k_; }
  std::int64_t param_size() const { return k_ * dim_; }
  const Eigen::VectorXd& stds() const { return stds_; }

  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  void set_cond(const vector_type& z) {
    impl::require_size(z, k_, "GaussianMixture::set_cond", "z");
    cond_ = z;
  }
  const vector_type& params() const { return params_; }
  vector_type& params() { return params_; }
  void set_params(const vector_type& p) {
    impl::require_size(p, k_ * dim_, "GaussianMixture::set_params", "params");
    params_ = p;
  }
  means_view means() const { return means_view(params_.data(), k_, dim_); }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    forward(x, n, "GaussianMixture::eps");
    // eps = sigma [ (sum_k p_k) x - alpha p M ] with p = w ./ v.
    const auto sigma = static_cast<Scalar>(n.sigma);
    if (out.rows() != x.rows() || out.cols() != x.cols()) out.resize(x.rows(), x.cols());
    impl::for_fixed_blocks(
        threads_, x.rows(), impl::kRowBlock, [&](Eigen::Index r0, Eigen::Index rows) {
          auto o = out.middleRows(r0, rows);
          o = sigma * (x.middleRows(r0, rows).array().colwise() * p_sum_.segment(r0, rows).array())
                          .matrix();
          o.noalias() -= Scalar(n.sigma * n.alpha) * (p_.middleRows(r0, rows) * means());
        });
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dz)^T a, *dparams += (d eps/dM)^T a (batch sums).
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    const char* where = "GaussianMixture::vjp";
    impl::require_same_shape(a, x, where, "cotangent");
    if (dcond) impl::require_size(*dcond, k_, where, "dcond");
    if (dparams) impl::require_size(*dparams, k_ * dim_, where, "dparams");
    forward(x, n, where);
    const auto m = means();
    const auto alpha = static_cast<Scalar>(n.alpha), sigma = static_cast<Scalar>(n.sigma);
    impl::for_fixed_blocks(
        threads_, x.rows(), impl::kRowBlock, [&](Eigen::Index r0, Eigen::Index rows) {
          const auto a_rows = a.middleRows(r0, rows);
          const auto x_rows = x.middleRows(r0, rows);
          auto ce = ce_.middleRows(r0, rows);
          auto dr = dr_.middleRows(r0, rows);
          auto q = q_.middleRows(r0, rows);
          auto cx = cx_.segment(r0, rows), cebar = cebar_.segment(r0, rows),
               q_sum = q_sum_.segment(r0, rows);
          // c . e_k = (c . x - alpha c . m_k)/v_k; the logits' cotangent is
          // dR = sigma w .* (c.e - (c.ebar) 1^T), ebar = sum_k w_k e_k.
          ce.noalias() = (-alpha) * (a_rows * m.transpose());
          cx = a_rows.cwiseProduct(x_rows).rowwise().sum();
          ce.colwise() += cx;
          ce = ce.array().rowwise() * inv_var_.transpose().array();
          cebar = w_.middleRows(r0, rows).cwiseProduct(ce).rowwise().sum();
          dr = sigma * w_.middleRows(r0, rows).cwiseProduct(ce.colwise() - cebar);
          // q_k = dR_k / v_k; sum_k dR_k e_k = (sum_k q_k) x - alpha q M.
          q = dr.array().rowwise() * inv_var_.transpose().array();
          q_sum = q.rowwise().sum();
          // dx = sigma (sum_k p_k) a - sum_k dR_k e_k, in tmp_ (dx is written after every read of
          // a).
          auto t = tmp_.middleRows(r0, rows);
          t = (sigma * (a_rows.array().colwise() * p_sum_.segment(r0, rows).array()) -
               x_rows.array().colwise() * q_sum.array())
                  .matrix();
          t.noalias() += alpha * (q * m);
        });
    if (dcond || dparams) {
      // Batch sums, in fixed blocks of components (each a sum over the whole batch).
      impl::for_fixed_blocks(
          threads_, k_, impl::kComponentBlock, [&](Eigen::Index k0, Eigen::Index kn) {
            if (dcond) dcond->segment(k0, kn) += dr_.middleCols(k0, kn).colwise().sum().transpose();
            if (dparams) {
              // dm_k = -sigma alpha (p^T a)_k + alpha [ (q^T x)_k - alpha (sum_b q_bk) m_k ].
              Eigen::Map<matrix_type> dm_all(dparams->data(), k_, dim_);
              auto dm = dm_all.middleRows(k0, kn);
              dm.noalias() -= (sigma * alpha) * (p_.middleCols(k0, kn).transpose() * a);
              dm.noalias() += alpha * (q_.middleCols(k0, kn).transpose() * x);
              auto col_sum = col_sum_.segment(k0, kn);
              col_sum = (alpha * alpha) * q_.middleCols(k0, kn).colwise().sum().transpose();
              dm -= col_sum.asDiagonal() * m.middleRows(k0, kn);
            }
          });
    }
    dx = tmp_; // last: `a` may alias dx, and the batch sums above read a
  }

  /// E[x0 | x_t = x] = sum_k w_k (m_k + (alpha s_k^2 / v_k)(x - alpha m_k)).
  void x0_hat(const state_type& x, const Node& n, state_type& out) const {
    impl::require_positive_alpha(n, "GaussianMixture::x0_hat");
    state_type e(x.rows(), x.cols());
    eps(x, n, e);
    out = (x - Scalar(n.sigma) * e) / Scalar(n.alpha);
  }

  /// The posterior component weights w (B x K).
  void posterior_weights(const state_type& x, const Node& n, matrix_type& out) const {
    forward(x, n, "GaussianMixture::posterior_weights");
    out = w_;
  }

  /// log p_t(x) per sample in double: logsumexp_k(log pi_k - (d/2) log(2 pi v_k) - |x - alpha
  /// m_k|^2/(2 v_k)).
  Eigen::VectorXd log_density(const state_type& x, const Node& n) const {
    forward(x, n, "GaussianMixture::log_density");
    const Eigen::VectorXd prior = log_prior_.template cast<double>();
    const double m = prior.maxCoeff();
    const double log_norm = m + std::log((prior.array() - m).exp().sum());
    return (row_max_.template cast<double>().array() +
            row_sum_.template cast<double>().array().log() - log_norm -
            0.5 * static_cast<double>(dim_) * std::log(2.0 * std::numbers::pi))
        .matrix();
  }

private:
  void forward(const state_type& x, const Node& n, const char* where) const {
    impl::require_state_dim(x, dim_, where, "x");
    impl::require_size(cond_, k_, where, "cond (logits z)");
    impl::require_size(params_, k_ * dim_, where, "params (means)");
    diffgrad::detail::require(std::isfinite(n.alpha) && std::isfinite(n.sigma) && n.sigma >= 0,
                              where, "node", "finite alpha and sigma >= 0", n.sigma);
    const auto batch = x.rows();
    resize(batch);
    const auto m = means();
    // v_k = alpha^2 s_k^2 + sigma^2 in double; all must be positive (sigma = 0 needs all s_k > 0).
    for (Eigen::Index k = 0; k < k_; ++k) {
      const double v = n.alpha * n.alpha * stds_(k) * stds_(k) + n.sigma * n.sigma;
      if (!(v > 0.0))
        diffgrad::detail::throw_argument(where, "node.sigma",
                                         "sigma > 0 (the mixture has a Dirac component)", n.sigma);
      inv_var_(k) = impl::finite_scalar<Scalar>(1.0 / v);
      half_log_var_(k) = Scalar(0.5 * static_cast<double>(dim_) * std::log(v));
    }
    log_prior_ = log_weights_ + cond_;
    // Broadcasts use plain vectors only (a broadcast expression would allocate a temporary).
    shifted_prior_ = log_prior_ - half_log_var_;
    neg_half_inv_var_ = Scalar(-0.5) * inv_var_;
    const auto alpha = static_cast<Scalar>(n.alpha);
    m_sq_ = (alpha * alpha) * m.rowwise().squaredNorm();
    impl::for_fixed_blocks(
        threads_, batch, impl::kRowBlock, [&](Eigen::Index r0, Eigen::Index rows) {
          const auto x_rows = x.middleRows(r0, rows);
          auto sq_dist = sq_dist_.middleRows(r0, rows);
          auto w = w_.middleRows(r0, rows);
          auto p = p_.middleRows(r0, rows);
          auto x_sq = x_sq_.segment(r0, rows), row_max = row_max_.segment(r0, rows),
               row_sum = row_sum_.segment(r0, rows);
          sq_dist.noalias() = (Scalar(-2) * alpha) * (x_rows * m.transpose());
          x_sq = x_rows.rowwise().squaredNorm();
          sq_dist.colwise() += x_sq;
          sq_dist.rowwise() += m_sq_.transpose();
          sq_dist = sq_dist.cwiseMax(Scalar(0));
          w = sq_dist.array().rowwise() * neg_half_inv_var_.transpose().array();
          w.rowwise() += shifted_prior_.transpose();
          row_max = w.rowwise().maxCoeff();
          w = (w.colwise() - row_max).array().exp().matrix();
          row_sum = w.rowwise().sum();
          w = w.array().colwise() / row_sum.array();
          p = w.array().rowwise() * inv_var_.transpose().array();
          p_sum_.segment(r0, rows) = p.rowwise().sum();
        });
  }

  void resize(Eigen::Index batch) const {
    for (matrix_type* m : {&sq_dist_, &w_, &p_, &ce_, &dr_, &q_}) m->resize(batch, k_);
    for (vector_type* v : {&x_sq_, &row_max_, &row_sum_, &p_sum_, &cx_, &cebar_, &q_sum_})
      v->resize(batch);
    tmp_.resize(batch, dim_);
    for (vector_type* v :
         {&m_sq_, &inv_var_, &half_log_var_, &col_sum_, &shifted_prior_, &neg_half_inv_var_})
      v->resize(k_);
  }

  Eigen::Index k_, dim_;
  diffgrad::detail::ThreadHandle threads_{diffgrad::detail::threads_from_environment()};
  Eigen::VectorXd stds_;
  vector_type params_, cond_, log_weights_;
  mutable vector_type log_prior_, m_sq_, inv_var_, half_log_var_, col_sum_, shifted_prior_,
      neg_half_inv_var_;
  mutable matrix_type sq_dist_, w_, p_, ce_, dr_, q_;
  mutable vector_type x_sq_, row_max_, row_sum_, p_sum_, cx_, cebar_, q_sum_;
  mutable state_type tmp_;
};

} // namespace diffgrad::models
