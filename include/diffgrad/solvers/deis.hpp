#pragma once
// The DEIS family as step-plan schemes (Zhang & Chen 2022, thesis ch. 6; coefficient math in
// coeffs/deis.hpp). All of them integrate dv/drho = eps for v = x/alpha, rho = sigma/alpha:
//
//   DeisTab(r)     tAB-DEIS: eps interpolated by a degree-r polynomial in t     order r + 1
//   DeisRhoAb(r)   rhoAB-DEIS: the same in rho (Adams-Bashforth on v(rho))       order r + 1
//   DeisLogRho(k)  diffusers' DEISMultistepScheduler: k points in log rho        order k
//   IPndm(k)       improved PNDM: uniform-step AB-k weights times the rho step   see below
//   DeisRhoRk(m)   explicit Runge-Kutta (Heun 2, Kutta 3, RK4) on v(rho)         order 2/3/4
//
// Multistep schemes warm up with lower order: step i uses min(order, i) earlier outputs, as
// the authors' code does. DeisTab(0) = DeisLogRho(1) = IPndm(1) = DDIM.
//
// iPNDM keeps the fixed uniform-step AB weights on any grid, so it is AB-k exactly only on
// grids uniform in rho; on other smooth grids (uniform t, uniform lambda) its global order
// is min(k, 2): the fixed weights integrate the grid's rho-stretching only to second order.
// Both facts are measured in tests/test_deis.cpp.
#include <algorithm>
#include <cmath>
#include <span>
#include <string>

#include "diffgrad/coeffs/deis.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

namespace detail {

/// x_{i+1} = c.x x_i + sum_k c.eps[k] e_{i-k} as a one-stage plan.
inline StepPlan multistep_plan(const Node& start, const coeffs::MultistepCoeffs& c) {
  StepPlan p;
  p.stage_node[0] = start;
  p.output.x = c.x;
  p.output.e[0] = c.eps[0];
  for (int k = 1; k < c.points; ++k) p.output.hist_e[k - 1] = c.eps[static_cast<std::size_t>(k)];
  return p;
}

inline void require_order(int order, int lo, int hi, const char* where) {
  require(order >= lo && order <= hi, where, "order", concat("an integer in [", lo, ", ", hi, "]"),
          order);
}

inline const Node& node_ref(std::span<const Node> nodes, int k) {
  return nodes[static_cast<std::size_t>(k)];
}

} // namespace detail

/// tAB-DEIS of order r (polynomial degree r in t; convergence order r + 1), r in 0..3.
/// Needs sigma > 0 at every node (the t-integral must stay inside the schedule's domain).
class DeisTab {
public:
  explicit DeisTab(int order = 3) : order_(order) { detail::require_order(order, 0, 3, "DeisTab"); }
  int order() const { return order_; }
  int history() const { return order_; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const {
    validate_nodes(nodes, "DeisTab");
    if (order_ == 0) return;
    for (std::size_t k = 0; k < nodes.size(); ++k)
      if (!std::isfinite(nodes[k].lambda))
        detail::throw_argument(
            "DeisTab", "nodes",
            detail::concat("finite lambda (sigma > 0) at every node for order >= 1, since the "
                           "t-integral is evaluated through the schedule; node ",
                           k, " has lambda"),
            nodes[k].lambda);
  }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda node_at_lambda) const {
    const int points = std::min(order_, i) + 1;
    const auto c =
        coeffs::deis_tab(nodes, i, points, [&](double lambda) { return node_at_lambda(lambda).t; });
    return detail::multistep_plan(detail::node_ref(nodes, i), c);
  }

private:
  int order_;
};

/// rhoAB-DEIS of order r (polynomial degree r in rho; convergence order r + 1), r in 1..3.
class DeisRhoAb {
public:
  explicit DeisRhoAb(int order = 3) : order_(order) {
    detail::require_order(order, 1, 3, "DeisRhoAb");
  }
  int order() const { return order_; }
  int history() const { return order_; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "DeisRhoAb"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const auto c = coeffs::deis_rho_ab(nodes, i, std::min(order_, i) + 1);
    return detail::multistep_plan(detail::node_ref(nodes, i), c);
  }

private:
  int order_;
};

/// diffusers' DEISMultistepScheduler ("logrho" solver type), order k in 1..3 = number of
/// points. Warm-up as diffusers: step 0 uses 1 point, step 1 at most 2. lower_order_final
/// (diffusers' default true) drops to 1 point on the last step and at most 2 on the one
/// before, but, as in diffusers, only when the run has fewer than 15 steps.
class DeisLogRho {
public:
  static constexpr int kLowerOrderFinalBelowSteps = 15; ///< diffusers' threshold

  explicit DeisLogRho(int order = 2, bool lower_order_final = true)
      : order_(order), lower_order_final_(lower_order_final) {
    detail::require_order(order, 1, 3, "DeisLogRho");
  }
  int order() const { return order_; }
  bool lower_order_final() const { return lower_order_final_; }
  int history() const { return order_ - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  /// A zero-length last step (validate_nodes) is the identity x_t = (alpha_t/alpha_s) x_s.
  void validate(std::span<const Node> nodes) const {
    validate_nodes(nodes, "DeisLogRho", ZeroLengthLastStep::identity);
  }

  /// The same scheme for a run that starts at step `start_index` of a longer run (diffusers'
  /// set_begin_index): the warm-up restarts (no history yet), while lower_order_final still
  /// counts the full run's steps, as diffusers compares len(timesteps) with 15.
  DeisLogRho start_at(int start_index) const {
    detail::require(start_index >= 0, "DeisLogRho::start_at", "start_index", ">= 0", start_index);
    DeisLogRho s = *this;
    s.steps_before_ = start_index;
    return s;
  }
  int steps_before() const { return steps_before_; }

  /// The number of points step i of an n-step run uses (n and i counted from the start).
  int points_at(int i, int num_steps) const {
    int k = std::min(order_, i + 1);
    const int n = num_steps + steps_before_, j = i + steps_before_;
    if (lower_order_final_ && n < kLowerOrderFinalBelowSteps) {
      if (j == n - 1)
        k = 1;
      else if (j == n - 2)
        k = std::min(k, 2);
    }
    return k;
  }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const int num_steps = static_cast<int>(nodes.size()) - 1;
    const int points = is_zero_length_step(nodes, i) ? 1 : points_at(i, num_steps);
    const auto c = coeffs::deis_log_rho(nodes, i, points);
    return detail::multistep_plan(detail::node_ref(nodes, i), c);
  }

private:
  int order_;
  bool lower_order_final_;
  int steps_before_ = 0;
};

/// iPNDM (the DEIS authors' improved PNDM), order k in 1..4 with warm-up: step i uses the
/// AB-min(k, i + 1) weights. The authors' default is k = 4.
class IPndm {
public:
  explicit IPndm(int order = 4) : order_(order) { detail::require_order(order, 1, 4, "IPndm"); }
  int order() const { return order_; }
  int history() const { return order_ - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "IPndm"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const auto c = coeffs::ipndm(nodes, i, std::min(order_, i + 1));
    return detail::multistep_plan(detail::node_ref(nodes, i), c);
  }

private:
  int order_;
};

/// Runge-Kutta methods for rhoRK-DEIS (the thesis' rho2Heun, rho3Kutta, rho4RK).
enum class DeisRkMethod { heun2, kutta3, rk4 };

inline const char* to_string(DeisRkMethod m) {
  switch (m) {
  case DeisRkMethod::heun2: return "heun2";
  case DeisRkMethod::kutta3: return "kutta3";
  case DeisRkMethod::rk4: return "rk4";
  }
  return "unknown";
}

/// rhoRK-DEIS: explicit RK on dv/drho = eps(alpha(rho) v, t(rho)). Stage c sits at
/// rho_i + c (rho_{i+1} - rho_i), placed on the schedule through lambda = -log rho; stages
/// with c = 0 and c = 1 reuse the grid nodes exactly.
class DeisRhoRk {
public:
  explicit DeisRhoRk(DeisRkMethod method = DeisRkMethod::kutta3) : method_(method) {
    switch (method) {
    case DeisRkMethod::heun2: tableau_ = coeffs::rk_heun2(); break;
    case DeisRkMethod::kutta3: tableau_ = coeffs::rk_kutta3(); break;
    case DeisRkMethod::rk4: tableau_ = coeffs::rk_classic4(); break;
    default:
      detail::throw_argument("DeisRhoRk", "method", "DeisRkMethod::heun2, kutta3 or rk4",
                             static_cast<int>(method));
    }
  }
  DeisRkMethod method() const { return method_; }
  /// Convergence order = number of stages for these three methods.
  int order() const { return tableau_.stages; }
  int history() const { return 0; }
  int stages() const { return tableau_.stages; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "DeisRhoRk"); }

  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda node_at_lambda) const {
    const Node& s = detail::node_ref(nodes, i);
    const Node& t = detail::node_ref(nodes, i + 1);
    const double rho_s = s.sigma / s.alpha;
    const double drho = t.sigma / t.alpha - rho_s;
    StepPlan p;
    p.num_stages = tableau_.stages;
    p.stage_node[0] = s;
    for (int st = 1; st < tableau_.stages; ++st) {
      const std::size_t ss = static_cast<std::size_t>(st);
      const double c = tableau_.c[ss];
      const Node n = c == 1.0 ? t : node_at_lambda(-std::log(rho_s + c * drho));
      p.stage_node[ss] = n;
      // u = alpha_n (v_i + drho sum_l a_sl k_l) = (alpha_n/alpha_i) x_i + alpha_n drho sum ...
      Combo& in = p.stage_input[ss];
      in.x = n.alpha / s.alpha;
      for (int l = 0; l < st; ++l)
        in.e[l] = n.alpha * drho * tableau_.a[ss][static_cast<std::size_t>(l)];
    }
    const double step = coeffs::alpha_rho_step(s, t); // alpha_{i+1} drho, finite at sigma = 0
    p.output.x = t.alpha / s.alpha;
    for (int st = 0; st < tableau_.stages; ++st)
      p.output.e[st] = step * tableau_.b[static_cast<std::size_t>(st)];
    return p;
  }

private:
  DeisRkMethod method_;
  coeffs::RkTableau tableau_{};
};

} // namespace diffgrad
