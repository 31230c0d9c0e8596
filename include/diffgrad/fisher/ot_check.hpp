#pragma once
// OT check of the PF-ODE map (Diffusion Fisher paper, Sec. 6; docs/math.md): the Jacobian
// A(t) = d x_t / d x_{t_start} of the flow solves the variational equation
//   dA/dt = (f I + (g^2/2) F(x_t, t)) A,   A(t_start) = I,
// with F the exact diffusion Fisher (exact_fisher.hpp). A gradient map of a convex potential
// (a Brenier / optimal-transport map) has a symmetric PSD Jacobian, so the map from
// x_{t_start} to x_{t_end} can be OT only if A(t_end) is symmetric; the report is the
// asymmetry index |A - A^T|_F / (sqrt 2 |A|_F) and the smallest eigenvalue of the symmetric
// part. With A = S + K (symmetric + antisymmetric) the index is sqrt(2) |K|_F / |A|_F: 0 for a
// symmetric A, |K|/|A| times sqrt 2 in general (at most sqrt 2, for an antisymmetric A).
//
// Integration: classical RK4 on (x, A) together, on a grid uniform in lambda (as the
// likelihood integrator, likelihood.hpp): with c = dlog(alpha)/dlambda = -2 sigma^2 f/g^2,
//   dx/dlambda = c x - sigma eps,   dA/dlambda = (c I - sigma^2 F) A.
// RK4's stages for A are the linearisation of its stages for x, so A is exactly the
// derivative of the discrete RK4 map (tests check it against finite differences of the map).
// For affine data (points on a line, any orientation) every F(t) along the path shares the
// eigenvectors of the line, all stage matrices commute and A stays symmetric to rounding.
// A diagnostic for small d: the loop forms d x d matrices per sample and allocates.
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <array>
#include <cmath>
#include <numbers>
#include <vector>

#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/fisher/exact_fisher.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::fisher {

/// |A - A^T|_F / (sqrt 2 |A|_F) (0 for |A| = 0).
inline double asymmetry_index(const Eigen::MatrixXd& a) {
  const double norm = a.norm();
  return norm == 0.0 ? 0.0 : (a - a.transpose()).norm() / (std::numbers::sqrt2 * norm);
}

struct OtCheckOptions {
  int steps = 400; ///< RK4 steps, uniform in lambda from t_start to t_end
};

template <class State> struct OtCheckResult {
  std::vector<Eigen::MatrixXd> jacobian;    ///< per sample: d x_{t_end} / d x_{t_start} (d x d)
  Eigen::VectorXd asymmetry;                ///< per sample: asymmetry_index(jacobian)
  Eigen::VectorXd min_symmetric_eigenvalue; ///< per sample: min eigenvalue of (A + A^T)/2
  State x_end;                              ///< the states at t_end
  int steps = 0;
};

/// Integrates the PF-ODE of the mixture `model` (DiracMixture or GaussianMixture, with its
/// exact eps and exact Fisher) and its Jacobian from t_start to t_end (t_start > t_end: noise
/// to data) for every row of x_start, and reports the OT diagnostics of the map.
template <Schedule S, class Model>
OtCheckResult<typename Model::state_type>
ot_check(const S& schedule, const Model& model, const typename Model::state_type& x_start,
         double t_start, double t_end, const OtCheckOptions& options = {}) {
  using State = typename Model::state_type;
  using Scalar = typename State::Scalar;
  const char* where = "ot_check";
  diffgrad::detail::require(options.steps >= 1, where, "options.steps", "at least 1 step",
                            options.steps);
  diffgrad::detail::require(
      t_start > t_end && t_start <= schedule.t_max() && t_end >= schedule.t_min(), where,
      "t_start/t_end",
      diffgrad::detail::concat("t_min = ", schedule.t_min(),
                               " <= t_end < t_start <= t_max = ", schedule.t_max()),
      t_start);
  models::impl::require_state_dim(x_start, model.dim(), where, "x_start");
  const auto batch = x_start.rows(), dim = x_start.cols();
  const ExactFisher<Model> fisher(model);
  const Node first = schedule.node(t_start), last = schedule.node(t_end);
  models::impl::require_noisy_node(last, where);
  const double l0 = first.lambda, h = (last.lambda - l0) / options.steps;
  const auto node_at = [&](int i, double frac) {
    if (i == options.steps && frac == 0.0) return last;
    if (i == 0 && frac == 0.0) return first;
    return schedule.node(schedule.t_of_lambda(l0 + (static_cast<double>(i) + frac) * h));
  };
  const auto c_of = [&](const Node& n) {
    const double g2 = schedule.g2(n.t);
    return g2 == 0.0 ? 0.0 : -2.0 * n.sigma * n.sigma * schedule.f(n.t) / g2;
  };

  OtCheckResult<State> r;
  r.x_end = x_start;
  const Eigen::MatrixXd identity = Eigen::MatrixXd::Identity(dim, dim);
  r.jacobian.assign(static_cast<std::size_t>(batch), identity);
  constexpr std::array<double, 4> kStage{0.0, 0.5, 0.5, 1.0};
  constexpr std::array<double, 4> kWeight{1.0 / 6, 2.0 / 6, 2.0 / 6, 1.0 / 6};
  std::array<State, 4> u, e;
  std::array<std::vector<Eigen::MatrixXd>, 4> a_stage, ka; // per stage, per sample
  for (auto& v : a_stage) v.assign(static_cast<std::size_t>(batch), identity);
  for (auto& v : ka) v.assign(static_cast<std::size_t>(batch), identity);
  for (int i = 0; i < options.steps; ++i) {
    std::array<Node, 4> nodes{};
    std::array<double, 4> c{};
    for (std::size_t s = 0; s < 4; ++s) {
      nodes[s] = node_at(s == 3 ? i + 1 : i, s == 3 ? 0.0 : kStage[s]);
      c[s] = c_of(nodes[s]);
      if (s == 0) {
        u[0] = r.x_end;
        for (Eigen::Index b = 0; b < batch; ++b)
          a_stage[0][static_cast<std::size_t>(b)] = r.jacobian[static_cast<std::size_t>(b)];
      } else {
        // Stage s reads stage s - 1's slopes: u_s = x + a_s h k_{s-1}, A_s = A + a_s h K_{s-1}.
        const double a = kStage[s] * h;
        u[s] =
            r.x_end + Scalar(a * c[s - 1]) * u[s - 1] - Scalar(a * nodes[s - 1].sigma) * e[s - 1];
        for (Eigen::Index b = 0; b < batch; ++b) {
          const auto k = static_cast<std::size_t>(b);
          a_stage[s][k] = r.jacobian[k] + a * ka[s - 1][k];
        }
      }
      model.eps(u[s], nodes[s], e[s]);
      const auto f = fisher.matrices(u[s], nodes[s]);
      const double s2 = nodes[s].sigma * nodes[s].sigma;
      for (Eigen::Index b = 0; b < batch; ++b) {
        const auto k = static_cast<std::size_t>(b);
        ka[s][k] = c[s] * a_stage[s][k] - s2 * (f[k] * a_stage[s][k]);
      }
    }
    State next = r.x_end;
    for (std::size_t s = 0; s < 4; ++s) {
      const double w = h * kWeight[s];
      next += Scalar(w * c[s]) * u[s] - Scalar(w * nodes[s].sigma) * e[s];
      for (Eigen::Index b = 0; b < batch; ++b) {
        const auto k = static_cast<std::size_t>(b);
        r.jacobian[k] += w * ka[s][k];
      }
    }
    r.x_end = next;
    ++r.steps;
  }
  r.asymmetry.resize(batch);
  r.min_symmetric_eigenvalue.resize(batch);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const Eigen::MatrixXd& a = r.jacobian[static_cast<std::size_t>(b)];
    r.asymmetry(b) = asymmetry_index(a);
    r.min_symmetric_eigenvalue(b) = symmetric_eigen_range(0.5 * (a + a.transpose()))(0);
  }
  return r;
}

} // namespace diffgrad::fisher
