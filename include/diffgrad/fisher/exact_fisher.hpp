#pragma once
// The exact diffusion Fisher F = -Hessian_x log p_t(x) of an analytic mixture
// (docs/math.md, exact test problem 3 and its Gaussian-mixture generalisation):
//
//   data ~ sum_k pi_k N(m_k, s_k^2 I)      (s_k = 0: a Dirac mixture, models::DiracMixture)
//   x_t | k ~ N(alpha m_k, v_k I),  v_k = alpha^2 s_k^2 + sigma^2,
//   e_k = (x - alpha m_k) / v_k,    w = the posterior component weights at x,
//   F = (sum_k w_k / v_k) I - Cov_w(e),     Cov_w(e) = sum_k w_k (e_k - ebar)(e_k - ebar)^T,
//
// which for a Dirac mixture (v_k = sigma^2) is
//   F = I/sigma^2 - (alpha^2/sigma^4) [sum_k w_k y_k y_k^T - x0_hat x0_hat^T].
// The trace is tr F = d sum_k w_k/v_k - sum_k w_k |e_k - ebar|^2, and the data-prediction
// moments give DF-TM's oracle E[|x0|^2 | x_t] (df_tm.hpp). Eigenvalues are <= 1/sigma^2
// (v_k >= sigma^2 and Cov_w is PSD); d eps/dx = sigma F for the model's exact eps.
//
// Numerics. The posterior weights (the softmax: the delicate part) come from the model
// itself (posterior_weights), so there is one implementation of them. Everything else is
// written so that the subtraction in "I/sigma^2 - Cov" is the only cancellation left:
//  - coordinates are shifted by the mean of the component means before anything is
//    formed (F is translation invariant), so rounding scales with the data's spread, not
//    with its distance from the origin;
//  - the Fisher-vector product is GEMM-shaped: with c_bk = e_k . a_b (one B x K product),
//    Cov_w(e) a = (sum_k R_k) x - alpha R M,  R = w .* (c - cbar) ./ v,
//    the second product again B x K x d;
//  - trace and matrix use the centred form sum_k w_k (e_k - ebar)(e_k - ebar)^T per sample
//    (every term >= 0, no |E x0|^2 - |x0_hat|^2 cancellation), B K d and B K d^2 flops;
//  - the matrix is assembled with a rank update, so it is symmetric bit for bit.
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::fisher {

namespace detail {

/// The component means (K x d) and stds (K) of a mixture model, read through one interface.
template <class Model> struct MixtureView;

template <class Scalar> struct MixtureView<models::DiracMixture<Scalar>> {
  static auto means(const models::DiracMixture<Scalar>& m) { return m.points(); }
  static void stds(const models::DiracMixture<Scalar>& m, Eigen::VectorXd& out) {
    out.resize(m.num_points());
    out.setZero();
  }
};

template <class Scalar> struct MixtureView<models::GaussianMixture<Scalar>> {
  static auto means(const models::GaussianMixture<Scalar>& m) { return m.means(); }
  static void stds(const models::GaussianMixture<Scalar>& m, Eigen::VectorXd& out) {
    out = m.stds();
  }
};

/// Model::state_type when the model declares one, else the CPU backend's double state
/// (for plain functor models).
template <class Model> struct model_state {
  using type = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
};
template <class Model>
requires requires { typename Model::state_type; }
struct model_state<Model> {
  using type = typename Model::state_type;
};

} // namespace detail

/// The exact Fisher of a DiracMixture or GaussianMixture (held by reference; its current
/// points/means, weights and conditioning are read at every call). Batched: x is B x d.
/// Scratch buffers are members, resized only when the batch size changes, so repeated
/// calls of one shape do not allocate (apply()). Not thread-safe (neither are the models).
template <class Model> class ExactFisher {
public:
  using state_type = typename Model::state_type;
  using matrix_type = typename Model::matrix_type;
  using Scalar = typename state_type::Scalar;

  explicit ExactFisher(const Model& model) : model_(model) {}

  const Model& model() const { return model_; }
  std::int64_t dim() const { return model_.dim(); }

  /// out = F(x) a, row by row (a and out are B x d; out may alias a).
  void apply(const state_type& x, const Node& n, const state_type& a, state_type& out) const {
    const char* where = "ExactFisher::apply";
    models::impl::require_same_shape(a, x, where, "a");
    prepare(x, n, where);
    const auto alpha = static_cast<Scalar>(n.alpha);
    // c_bk = e_k . a_b = (x'_b . a_b - alpha m'_k . a_b) / v_k   (primes: shifted coordinates)
    c_.noalias() = (-alpha) * (a * means_.transpose());
    row_.noalias() = a.cwiseProduct(xs_).rowwise().sum();
    c_.colwise() += row_;
    c_ = c_.array().rowwise() * inv_var_.transpose().array();
    row_ = w_.cwiseProduct(c_).rowwise().sum(); // cbar
    // R = w .* (c - cbar) ./ v;  F a = p a - (sum_k R_k) x' + alpha R M'.
    c_ = (w_.array() * (c_.colwise() - row_).array()).rowwise() * inv_var_.transpose().array();
    row_ = c_.rowwise().sum();
    tmp_ = (a.array().colwise() * p_sum_.array() - xs_.array().colwise() * row_.array()).matrix();
    tmp_.noalias() += alpha * (c_ * means_);
    out = tmp_;
  }

  /// tr F per sample, in double.
  Eigen::VectorXd trace(const state_type& x, const Node& n) const {
    Eigen::VectorXd tr(x.rows());
    trace(x, n, tr);
    return tr;
  }
  /// Same into `out` (resized to B; no allocation when it already has B entries).
  void trace(const state_type& x, const Node& n, Eigen::VectorXd& out) const {
    prepare(x, n, "ExactFisher::trace");
    out.resize(x.rows());
    const double d = static_cast<double>(x.cols());
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      centred_scores(b, n.alpha);
      out(b) = d * static_cast<double>(p_sum_(b)) - e_.rowwise().squaredNorm().dot(wb_);
    }
  }

  /// F(x_b) for sample b as a d x d double matrix, exactly symmetric.
  Eigen::MatrixXd matrix(const state_type& x, const Node& n, Eigen::Index b) const {
    const char* where = "ExactFisher::matrix";
    diffgrad::detail::require(b >= 0 && b < x.rows(), where, "b",
                              diffgrad::detail::concat("a sample index in [0, ", x.rows(), ")"),
                              static_cast<double>(b));
    prepare(x, n, where);
    return matrix_of(b, n);
  }

  /// F(x_b) for every sample.
  std::vector<Eigen::MatrixXd> matrices(const state_type& x, const Node& n) const {
    prepare(x, n, "ExactFisher::matrices");
    std::vector<Eigen::MatrixXd> out;
    out.reserve(static_cast<std::size_t>(x.rows()));
    for (Eigen::Index b = 0; b < x.rows(); ++b) out.push_back(matrix_of(b, n));
    return out;
  }

  /// The data prediction E[x0 | x_t = x] (B x d), as the model computes it.
  void x0_hat(const state_type& x, const Node& n, state_type& out) const {
    model_.x0_hat(x, n, out);
  }

  /// E[|x0|^2 | x_t = x] per sample, in double: sum_k w_k (|mu_k|^2 + d tau_k^2) with the
  /// component posteriors mu_k = m_k + (alpha s_k^2/v_k)(x - alpha m_k), tau_k^2 = s_k^2
  /// sigma^2/v_k (mu_k = y_k, tau_k = 0 for a Dirac mixture). DF-TM's exact oracle.
  Eigen::VectorXd second_moment(const state_type& x, const Node& n) const {
    prepare(x, n, "ExactFisher::second_moment");
    const auto m = detail::MixtureView<Model>::means(model_);
    const Eigen::MatrixXd md = m.template cast<double>();
    const double d = static_cast<double>(x.cols());
    Eigen::VectorXd out(x.rows());
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::RowVectorXd xb = x.row(b).template cast<double>();
      double total = 0.0;
      for (Eigen::Index k = 0; k < md.rows(); ++k) {
        const double s2 = stds_(k) * stds_(k);
        const double gain = n.alpha * s2 * inv_var_d_(k);
        const double tau2 = s2 * n.sigma * n.sigma * inv_var_d_(k);
        const double mu_sq = gain == 0.0
                                 ? md.row(k).squaredNorm()
                                 : (md.row(k) + gain * (xb - n.alpha * md.row(k))).squaredNorm();
        total += static_cast<double>(w_(b, k)) * (mu_sq + d * tau2);
      }
      out(b) = total;
    }
    return out;
  }

private:
  // Weights from the model; shifted coordinates x' = x - alpha c, M' = M - c with c the mean
  // of the component means; v_k, 1/v_k, p_b = sum_k w_bk / v_k.
  void prepare(const state_type& x, const Node& n, const char* where) const {
    models::impl::require_noisy_node(n, where);
    model_.posterior_weights(x, n, w_); // checks x's dimension
    const auto m = detail::MixtureView<Model>::means(model_);
    detail::MixtureView<Model>::stds(model_, stds_);
    const auto k = m.rows();
    // Plain vectors in the broadcasts: a broadcast expression would allocate a temporary.
    centre_ = m.colwise().mean();
    means_ = m.rowwise() - centre_;
    centre_ *= Scalar(n.alpha);
    xs_ = x.rowwise() - centre_;
    inv_var_.resize(k);
    inv_var_d_.resize(k);
    for (Eigen::Index i = 0; i < k; ++i) {
      inv_var_d_(i) = 1.0 / (n.alpha * n.alpha * stds_(i) * stds_(i) + n.sigma * n.sigma);
      inv_var_(i) = models::impl::finite_scalar<Scalar>(inv_var_d_(i));
    }
    p_sum_.noalias() = w_ * inv_var_;
    c_.resize(x.rows(), k);
    row_.resize(x.rows());
    tmp_.resize(x.rows(), x.cols());
  }

  // e_ = rows e_k - ebar for sample b (K x d, double), wb_ = w_b (K). Member buffers only.
  void centred_scores(Eigen::Index b, double alpha) const {
    wb_ = w_.row(b).transpose().template cast<double>();
    xb_ = xs_.row(b).template cast<double>();
    e_ = -alpha * means_.template cast<double>();
    e_.rowwise() += xb_;
    e_ = e_.array().colwise() * inv_var_d_.array();
    ebar_.noalias() = wb_.transpose() * e_;
    e_.rowwise() -= ebar_;
  }

  Eigen::MatrixXd matrix_of(Eigen::Index b, const Node& n) const {
    centred_scores(b, n.alpha);
    const auto d = e_.cols();
    // Cov_w(e) = G^T G with G = diag(sqrt(w)) (E - ebar): a rank update of the lower
    // triangle, mirrored, so F is exactly symmetric.
    const Eigen::MatrixXd g = e_.array().colwise() * wb_.array().sqrt();
    Eigen::MatrixXd lower = Eigen::MatrixXd::Identity(d, d) * static_cast<double>(p_sum_(b));
    lower.template selfadjointView<Eigen::Lower>().rankUpdate(g.transpose(), -1.0);
    Eigen::MatrixXd f = lower.template selfadjointView<Eigen::Lower>();
    return f;
  }

  const Model& model_;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  mutable matrix_type w_, c_, means_;
  mutable state_type xs_, tmp_;
  mutable Eigen::Matrix<Scalar, 1, Eigen::Dynamic> centre_;
  mutable vector_type inv_var_, p_sum_, row_;
  mutable Eigen::VectorXd stds_, inv_var_d_, wb_;
  mutable Eigen::MatrixXd e_;
  mutable Eigen::RowVectorXd xb_, ebar_;
};

template <class Scalar>
ExactFisher(const models::DiracMixture<Scalar>&) -> ExactFisher<models::DiracMixture<Scalar>>;
template <class Scalar>
ExactFisher(const models::GaussianMixture<Scalar>&) -> ExactFisher<models::GaussianMixture<Scalar>>;

/// The extreme eigenvalues of a symmetric matrix (for the bound lambda_max(F) <= 1/sigma^2).
/// A template so that Eigen's eigensolver is instantiated only in translation units that call
/// it: as a plain inline function its body was compiled in every file including this header
/// (the umbrella header included), about 2 s of compile time each with GCC.
template <class Derived>
Eigen::Vector2d symmetric_eigen_range(const Eigen::MatrixBase<Derived>& f) {
  // The matrix type depends on Derived: a non-dependent SelfAdjointEigenSolver<MatrixXd> would
  // still be instantiated where the template is defined.
  using Matrix = Eigen::Matrix<double, Derived::RowsAtCompileTime, Derived::ColsAtCompileTime>;
  const Matrix m = f.template cast<double>();
  Eigen::SelfAdjointEigenSolver<Matrix> es(m, Eigen::EigenvaluesOnly);
  return {es.eigenvalues().minCoeff(), es.eigenvalues().maxCoeff()};
}

} // namespace diffgrad::fisher
