#pragma once
// DF-EA, the diffusion-Fisher endpoint approximation (Diffusion Fisher paper, Sec. 5;
// docs/math.md, "Diffusion Fisher"): the exact Fisher of a Dirac mixture is
//   F a = a/sigma^2 - (alpha^2/sigma^4) [ sum_i w_i <y_i, a> y_i - <x0_hat, a> x0_hat ],
// and DF-EA replaces the posterior second moment sum_i w_i y_i y_i^T by the outer product of
// the trajectory's endpoint x0_end:
//   F_EA a = a/sigma^2 - (alpha^2/sigma^4) [ <x0_end, a> x0_end - <x0_hat, a> x0_hat ].
// Two dot products and one fused update per sample: no network derivative. It is exact for
// a single data point and its error vanishes as sigma -> 0 along a trajectory that ends at
// x0_end (the posterior collapses onto the endpoint).
//
// DfEaModel wraps any noise model (only eps is needed) into a DifferentiableNoiseModel whose
// vjp w.r.t. x is sigma F_EA a, the DF-EA stand-in for (d eps/dx)^T a. It therefore plugs
// into every gradient path unchanged: the exact discrete adjoint (gradients/gradient.hpp),
// AdjointDEIS (gradients/adjoint_deis.hpp), checkpointing, ... The result is the gradient of
// the sampler with the Fisher replaced by F_EA: approximate, with the error measured in
// docs/fisher.md.
//
// The endpoint. x0_end is settable (set_x0_end). Two ways to get it without an extra pass:
//  - continuous adjoint from a cached trajectory: x0_end = the cached sample;
//  - exact discrete adjoint: wrap the loss in DfEaEndpointLoss; the engine calls the loss on
//    the sampler's output before the first VJP, and the wrapper sets x0_end there.
// A sampler that stops at sigma_min > 0 returns x_{t_min} = alpha y + O(sigma_min), and the
// O(sigma_min) offset is amplified by alpha^2/sigma^4 at the last steps. Pass the denoised
// endpoint x0_hat(x_{t_min}) instead (set_x0_end_denoised, or DfEaEndpointLoss with
// denoise_at): docs/fisher.md measures both.
//
// Cost of one vjp: one eps evaluation of the wrapped model (for x0_hat) plus O(B d). The
// eps is not cached across calls (the engines do not keep model outputs).
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/fisher/exact_fisher.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad::fisher {

namespace detail {
/// dfea_apply with caller-owned scratch (two B-vectors): no allocation in steady state.
template <class State, class Column>
void dfea_apply_into(const Node& n, const State& x0_end, const State& x0_hat, const State& a,
                     State& out, double scale, Column& end_dot, Column& hat_dot) {
  using Scalar = typename State::Scalar;
  const double s2 = n.sigma * n.sigma;
  const auto c = models::impl::finite_scalar<Scalar>(scale * n.alpha * n.alpha / (s2 * s2));
  // The dot products are read before out is written (out may alias a).
  end_dot.noalias() = x0_end.cwiseProduct(a).rowwise().sum();
  hat_dot.noalias() = x0_hat.cwiseProduct(a).rowwise().sum();
  end_dot *= c;
  hat_dot *= c;
  out = a * models::impl::finite_scalar<Scalar>(scale / s2);
  out.array() -= x0_end.array().colwise() * end_dot.array();
  out.array() += x0_hat.array().colwise() * hat_dot.array();
}
} // namespace detail

/// out = F_EA a for each row: a/sigma^2 - (alpha^2/sigma^4)[<x0_end,a> x0_end - <x0_hat,a> x0_hat],
/// scaled by `scale` (1 for F_EA, sigma for the eps-VJP). All four states are B x d; out may
/// alias a. Sigma must be positive.
template <class State>
void dfea_apply(const Node& n, const State& x0_end, const State& x0_hat, const State& a, State& out,
                double scale = 1.0) {
  const char* where = "dfea_apply";
  models::impl::require_noisy_node(n, where);
  models::impl::require_same_shape(x0_end, a, where, "x0_end");
  models::impl::require_same_shape(x0_hat, a, where, "x0_hat");
  Eigen::Matrix<typename State::Scalar, Eigen::Dynamic, 1> end_dot(a.rows()), hat_dot(a.rows());
  detail::dfea_apply_into(n, x0_end, x0_hat, a, out, scale, end_dot, hat_dot);
}

/// The DF-EA matrix for one sample (d x d, double): I/sigma^2 - (alpha^2/sigma^4)(e e^T - h h^T).
inline Eigen::MatrixXd dfea_matrix(const Node& n, const Eigen::VectorXd& x0_end,
                                   const Eigen::VectorXd& x0_hat) {
  diffgrad::detail::require(x0_end.size() == x0_hat.size(), "dfea_matrix", "x0_hat",
                            diffgrad::detail::concat("length ", x0_end.size()),
                            static_cast<double>(x0_hat.size()));
  models::impl::require_noisy_node(n, "dfea_matrix");
  const double s2 = n.sigma * n.sigma;
  const double c = n.alpha * n.alpha / (s2 * s2);
  const auto d = x0_end.size();
  return Eigen::MatrixXd::Identity(d, d) / s2 -
         c * (x0_end * x0_end.transpose() - x0_hat * x0_hat.transpose());
}

/// Hilbert-Schmidt (Frobenius) error |F_EA - F|_F of DF-EA against the exact Fisher of a
/// mixture, per sample, with x0_end given per sample (B x d) and x0_hat from the model.
template <class Model>
Eigen::VectorXd dfea_hilbert_schmidt_error(const ExactFisher<Model>& fisher,
                                           const typename Model::state_type& x, const Node& n,
                                           const typename Model::state_type& x0_end) {
  models::impl::require_same_shape(x0_end, x, "dfea_hilbert_schmidt_error", "x0_end");
  typename Model::state_type hat;
  fisher.x0_hat(x, n, hat);
  const auto exact = fisher.matrices(x, n);
  Eigen::VectorXd err(x.rows());
  for (Eigen::Index b = 0; b < x.rows(); ++b) {
    const Eigen::MatrixXd ea = dfea_matrix(n, x0_end.row(b).transpose().template cast<double>(),
                                           hat.row(b).transpose().template cast<double>());
    err(b) = (ea - exact[static_cast<std::size_t>(b)]).norm();
  }
  return err;
}

/// A noise model whose VJP w.r.t. x is the DF-EA operator sigma F_EA a (see the header note).
/// eps is the wrapped model's (eps(x, t|Node, out); no vjp needed). Only the state VJP
/// exists: asking for dcond or dparams throws. Holds the model by reference; x0_end is a
/// copy (set it before the first vjp). State defaults to Model::state_type, or the Eigen
/// backend's double state for models that do not declare one.
template <class Model, class State = typename detail::model_state<Model>::type> class DfEaModel {
public:
  using state_type = State;
  using vector_type = Eigen::Matrix<typename state_type::Scalar, Eigen::Dynamic, 1>;

  explicit DfEaModel(Model& base) : base_(base) {}

  Model& base() { return base_; }
  const Model& base() const { return base_; }

  /// The trajectory endpoint, one row per sample of the batch the VJPs will see.
  void set_x0_end(const state_type& x0_end) {
    if (!x0_end.allFinite())
      throw invalid_argument(
          "DfEaModel::set_x0_end: argument 'x0_end' expected finite values, got NaN or Inf");
    x0_end_ = x0_end;
    has_end_ = true;
  }
  /// x0_end = x0_hat(x_end) at `end_node` (the data prediction at the sampler's last node):
  /// the endpoint for samplers that stop at sigma_min > 0. One eps evaluation.
  void set_x0_end_denoised(const state_type& x_end, const Node& end_node) {
    models::impl::require_noisy_node(end_node, "DfEaModel::set_x0_end_denoised");
    x0_hat(x_end, end_node, end_scratch_);
    set_x0_end(end_scratch_);
  }
  bool has_x0_end() const { return has_end_; }
  const state_type& x0_end() const { return x0_end_; }

  std::int64_t cond_size() const {
    if constexpr (requires { base_.cond_size(); })
      return static_cast<std::int64_t>(base_.cond_size());
    else
      return 0;
  }
  std::int64_t param_size() const {
    if constexpr (requires { base_.param_size(); })
      return static_cast<std::int64_t>(base_.param_size());
    else
      return 0;
  }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    EpsField<Model>{base_}(x, n, out);
    ++evals_;
  }

  /// x0_hat = (x - sigma eps)/alpha from the wrapped model.
  void x0_hat(const state_type& x, const Node& n, state_type& out) const {
    eps(x, n, out);
    const auto inv_alpha = models::impl::finite_scalar<typename state_type::Scalar>(1.0 / n.alpha);
    out = (x - typename state_type::Scalar(n.sigma) * out) * inv_alpha;
  }

  /// dx = sigma F_EA(x) a.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const {
    const char* where = "DfEaModel::vjp";
    if (dcond != nullptr || dparams != nullptr)
      throw invalid_argument(
          "DfEaModel::vjp: argument 'dcond/dparams' expected null (DF-EA approximates only the "
          "state VJP d eps/dx; request gradients w.r.t. x only), got a vector");
    if (!has_end_)
      throw invalid_argument("DfEaModel::vjp: argument 'x0_end' expected a trajectory endpoint "
                             "set by set_x0_end (or DfEaEndpointLoss), got none");
    models::impl::require_same_shape(a, x, where, "cotangent");
    models::impl::require_same_shape(x0_end_, x, where, "x0_end (set_x0_end)");
    models::impl::require_noisy_node(n, where);
    x0_hat(x, n, hat_);
    end_dot_.resize(x.rows()); // no-op when the batch size is unchanged
    hat_dot_.resize(x.rows());
    detail::dfea_apply_into(n, x0_end_, hat_, a, dx, n.sigma, end_dot_, hat_dot_);
    ++vjps_;
  }

  /// Counters: eps evaluations of the wrapped model (forward calls and the x0_hat of every
  /// VJP) and DF-EA VJPs.
  std::int64_t model_evals() const { return evals_; }
  std::int64_t vjps() const { return vjps_; }
  void reset_counters() { evals_ = vjps_ = 0; }

private:
  Model& base_;
  state_type x0_end_, end_scratch_;
  bool has_end_ = false;
  mutable state_type hat_;
  mutable vector_type end_dot_, hat_dot_;
  mutable std::int64_t evals_ = 0, vjps_ = 0;
};

/// A loss wrapper for the exact discrete adjoint: sets the DF-EA endpoint from the sampler's
/// output (optionally denoised at `denoise_at`, the grid's last node) and evaluates `loss`.
/// The engine calls the loss before any VJP, so the whole reverse pass sees this endpoint.
template <class DfEa, class Loss> class DfEaEndpointLoss {
public:
  DfEaEndpointLoss(DfEa& model, Loss loss, std::optional<Node> denoise_at = std::nullopt)
      : model_(model), loss_(std::move(loss)), denoise_at_(denoise_at) {}

  template <class B, class State>
  double operator()(const B& backend, const State& x0, State& grad) {
    if (denoise_at_)
      model_.set_x0_end_denoised(x0, *denoise_at_);
    else
      model_.set_x0_end(x0);
    return static_cast<double>(loss_(backend, x0, grad));
  }

private:
  DfEa& model_;
  Loss loss_;
  std::optional<Node> denoise_at_;
};

} // namespace diffgrad::fisher
