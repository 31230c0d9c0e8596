#pragma once
// Exact velocity of the rectified flow to a Dirac mixture (docs/math.md, exact test problem 4).
// Flow time t runs from 0 (noise) to 1 (data): X_t = (1 - t) X_0 + t X_1, X_0 ~ N(0, I),
// X_1 = y_i with probability pi_i. Then E[X_1 | X_t = x] is the Dirac posterior mean at
// alpha = t, sigma = 1 - t and
//   v(x, t) = (sum_i w_i y_i - x) / (1 - t),   w = softmax_i( l_i - |x - t y_i|^2 / (2 (1-t)^2) ),
//   l = log(weights) + z.
// Domain: 0 <= t < 1. At t = 1 the field is singular (it snaps x onto the nearest point and
// divides by 0), so t >= 1 is refused with diffgrad::invalid_argument; a sampler ends at
// t_end < 1 (the remaining (1 - t_end) v is the jump to the posterior mean). Near t = 1 the
// evaluation stays finite (the Dirac posterior's shifted log-sum-exp).
// Conditioning z: K logits; parameters: the points, flat row-major (K*d).
#include <Eigen/Core>
#include <cmath>
#include <cstdint>

#include "diffgrad/core/error.hpp"
#include "diffgrad/models/dirac_mixture.hpp"

namespace diffgrad::models {

template <class Scalar> class RectifiedFlowMixture {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_type = state_type;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using points_view = Eigen::Map<const matrix_type>;

  explicit RectifiedFlowMixture(const matrix_type& points)
      : RectifiedFlowMixture(points, vector_type::Ones(points.rows())) {}
  RectifiedFlowMixture(const matrix_type& points, const vector_type& weights)
      : mixture_(points, weights) {}

  std::int64_t dim() const { return mixture_.dim(); }
  std::int64_t num_points() const { return mixture_.num_points(); }
  std::int64_t cond_size() const { return mixture_.cond_size(); }
  std::int64_t param_size() const { return mixture_.param_size(); }
  const vector_type& cond() const { return mixture_.cond(); }
  vector_type& cond() { return mixture_.cond(); }
  void set_cond(const vector_type& z) { mixture_.set_cond(z); }
  const vector_type& params() const { return mixture_.params(); }
  vector_type& params() { return mixture_.params(); }
  void set_params(const vector_type& p) { mixture_.set_params(p); }
  points_view points() const { return mixture_.points(); }

  /// The equivalent diffusion: a Dirac mixture seen at alpha = t, sigma = 1 - t.
  const DiracMixture<Scalar>& dirac_mixture() const { return mixture_; }

  void velocity(const state_type& x, double t, state_type& out) const {
    const Node n = node(t, "RectifiedFlowMixture::velocity");
    mixture_.x0_hat(x, n, x0_);
    out = (x0_ - x) * impl::finite_scalar<Scalar>(1.0 / n.sigma);
  }

  /// dx = (dv/dx)^T a; *dcond += (dv/dz)^T a, *dparams += (dv/dY)^T a (batch sums).
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dcond, vector_type* dparams) const {
    const Node n = node(t, "RectifiedFlowMixture::velocity_vjp");
    // v = (x0_hat - x)/(1 - t).
    mixture_.linear_vjp(x, n, a, -1.0 / n.sigma, 1.0 / n.sigma, dx, dcond, dparams,
                        "RectifiedFlowMixture::velocity_vjp");
  }

  /// Flow time t as a diffusion node (alpha = t, sigma = 1 - t); refuses t outside [0, 1).
  static Node node(double t, const char* where = "RectifiedFlowMixture") {
    if (!(t >= 0.0 && t < 1.0))
      diffgrad::detail::throw_argument(
          where, "t", "flow time in [0, 1) (t = 1 is the singular data end)", t);
    Node n;
    n.t = t;
    n.model_t = t;
    n.alpha = t;
    n.sigma = 1.0 - t;
    n.lambda = std::log(t / (1.0 - t));
    return n;
  }

private:
  DiracMixture<Scalar> mixture_;
  mutable state_type x0_;
};

} // namespace diffgrad::models
