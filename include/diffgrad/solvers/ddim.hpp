#pragma once
// DDIM (Song et al. 2021) = DPM-Solver-1 = DEIS order 0 for eta = 0:
//   x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s                     (eta = 0)
// With eta > 0 a part of the noise is fresh, with the DDPM posterior std
//   s_eta = eta sigma_t sqrt(1 - e^{-2h})        (eta = 1 is ancestral DDPM sampling)
//   x_t = alpha_t x0_s + sqrt(sigma_t^2 - s_eta^2) eps_s + s_eta xi.
#include <cmath>
#include <span>

#include "diffgrad/coeffs/exponential.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

namespace coeffs {
struct DdimCoeffs {
  double x, eps, noise;
};
/// DDIM step coefficients from node s to node t (t cleaner), eta in [0, 1].
inline DdimCoeffs ddim(const Node& s, const Node& t, double eta) {
  const double xcoef = t.alpha / s.alpha;
  if (eta == 0.0) return {xcoef, -sigma_expm1(s, t), 0.0};
  const double h = step_h(s, t);
  const double q = std::isfinite(h) ? -std::expm1(-2.0 * h) : 1.0;  // 1 - e^{-2h}
  const double noise = eta * t.sigma * std::sqrt(q);
  const double c = std::sqrt(1.0 - eta * eta * q);                   // sqrt(sigma_t^2 - s^2)/sigma_t
  // sigma_t c - alpha_t sigma_s/alpha_s = sigma_t [(c - 1) - (e^h - 1)], c - 1 without cancellation.
  const double eps = t.sigma == 0.0 ? -t.alpha * s.sigma / s.alpha
                                    : t.sigma * (-eta * eta * q / (1.0 + c) - std::expm1(h));
  return {xcoef, eps, noise};
}
} // namespace coeffs

class Ddim {
public:
  explicit Ddim(double eta = 0.0) : eta_(eta) {
    detail::require(eta >= 0.0 && eta <= 1.0, "Ddim", "eta", "0 <= eta <= 1", eta);
  }
  double eta() const { return eta_; }
  int history() const { return 0; }
  int stages() const { return 1; }
  bool stochastic() const { return eta_ > 0.0; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "Ddim"); }

  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    return step_plan(nodes[static_cast<std::size_t>(i)], nodes[static_cast<std::size_t>(i) + 1],
                     eta_);
  }
  static StepPlan step_plan(const Node& s, const Node& t, double eta) {
    const auto c = coeffs::ddim(s, t, eta);
    StepPlan p;
    p.stage_node[0] = s;
    p.output.x = c.x;
    p.output.e[0] = c.eps;
    p.noise = c.noise;
    return p;
  }

private:
  double eta_;
};

/// Naive DDIM inversion (data -> noise): the eta = 0 DDIM update run with h < 0, the model
/// evaluated at the cleaner state. Exact only as the step size goes to 0; see inversion/
/// for exact methods. Nodes run from data (high lambda) to noise (low lambda).
class DdimInversion {
public:
  int history() const { return 0; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const {
    detail::require(nodes.size() >= 2, "DdimInversion", "nodes", "at least 2 nodes",
                    static_cast<double>(nodes.size()));
    for (std::size_t i = 1; i < nodes.size(); ++i)
      if (!(nodes[i].lambda < nodes[i - 1].lambda))
        detail::throw_argument("DdimInversion", "nodes",
                               detail::concat("strictly decreasing lambda (data -> noise) at node ",
                                              i),
                               nodes[i].lambda);
  }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    return Ddim::step_plan(nodes[static_cast<std::size_t>(i)],
                           nodes[static_cast<std::size_t>(i) + 1], 0.0);
  }
};

} // namespace diffgrad
