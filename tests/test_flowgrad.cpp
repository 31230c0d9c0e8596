// FlowGrad (flow/flowgrad.hpp, flow/controls.hpp, flow/straightness.hpp):
// - straightness and segmentation against hand-computed values;
// - xi = 0 gradients against the generic exact discrete adjoint (gradients/gradient.hpp on
//   the sampler with the controls folded into the model, ControlledModel) and against
//   central finite differences, for both control conventions, on the rectified flow to a
//   Dirac mixture, an MLP velocity network and DDIM on a Dirac-mixture eps model;
// - a constant velocity field is one segment and its merged gradient is the full one;
// - N = 100 Dirac-mixture flow: VJP counts and gradient errors for xi in {0, 1e-3, 5e-3, 1e-2};
// - the optimiser loop: monotone descent on a quadratic target at a small step, best
//   controls, cost totals; DDIM is Euler in (x/alpha, rho); errors.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <span>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/flow/controls.hpp"
#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/flowgrad.hpp"
#include "diffgrad/flow/heun.hpp"
#include "diffgrad/flow/straightness.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/models/rectified_flow_mixture.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "fd_check.hpp"
#include "test_support.hpp"

namespace {

using namespace diffgrad;
using B = EigenBackend<double>;
using State = B::state_type;
using Controls = std::vector<State>;

const B backend;

// Four unequal-weight points in 2-D: trajectories bend while the posterior decides.
State mixture_points() {
  State p(4, 2);
  p << 1.5, 0.5, -1.0, 1.2, 0.3, -1.4, -1.2, -0.8;
  return p;
}
models::RectifiedFlowMixture<double> flow_mixture() {
  Eigen::VectorXd w(4);
  w << 1.0, 2.0, 1.5, 0.7;
  return models::RectifiedFlowMixture<double>(mixture_points(), w);
}

State start_batch() { return testing::test_batch<double>(3, 2); }

// N uniform steps on [0, 0.99]. The Dirac-mixture field is singular at t = 1, and a grid that
// ends there makes the last Euler step land exactly on the posterior mean, whose Jacobian is
// ~0 once the posterior has committed: every gradient but the last velocity control's would
// be rounding noise.
std::vector<double> flow_times(int n) { return uniform_flow_grid(n, 0.0, 0.99); }

State target_state(Eigen::Index batch, Eigen::Index dim) {
  State t(batch, dim);
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index j = 0; j < dim; ++j)
      t(b, j) = 0.4 * std::cos(0.9 * static_cast<double>(b * dim + j)) + 0.2;
  return t;
}

// Nonzero controls with a pattern that varies over steps and entries.
Controls pattern_controls(int n, Eigen::Index batch, Eigen::Index dim, double scale) {
  Controls u;
  for (int k = 0; k < n; ++k) {
    State s(batch, dim);
    for (Eigen::Index b = 0; b < batch; ++b)
      for (Eigen::Index j = 0; j < dim; ++j)
        s(b, j) = scale *
                  std::sin(0.37 * k + 1.1 * static_cast<double>(b) - 0.6 * static_cast<double>(j));
    u.push_back(s);
  }
  return u;
}

Eigen::VectorXd stack(const Controls& u) {
  Eigen::VectorXd v(static_cast<Eigen::Index>(u.size()) * u.front().size());
  for (std::size_t k = 0; k < u.size(); ++k)
    v.segment(static_cast<Eigen::Index>(k) * u.front().size(), u.front().size()) =
        testing::flatten(u[k]);
  return v;
}
Controls unstack(const Eigen::VectorXd& v, int n, Eigen::Index batch, Eigen::Index dim) {
  Controls u;
  for (int k = 0; k < n; ++k)
    u.push_back(testing::unflatten(v.segment(k * batch * dim, batch * dim), batch, dim));
  return u;
}

double rel(const Eigen::VectorXd& a, const Eigen::VectorXd& b) { return (a - b).norm() / b.norm(); }

// The exact gradient of J = L + lambda |u|^2 w.r.t. the stacked controls and x_start, from
// the generic discrete adjoint with the controls folded into the model.
template <class Scheme, class Model>
std::pair<Eigen::VectorXd, State>
reference_gradient(const Scheme& scheme, std::span<const Node> nodes, Model& model, const State& x0,
                   const Controls& u, const SquaredDistanceLoss<B>& loss, ControlMode mode,
                   double lambda) {
  ControlledModel<Model, B> controlled(scheme, nodes, model, std::span<const State>(u), mode);
  GradientResult<B> r;
  if constexpr (DifferentiableVelocityModel<Model, State, B::vector_type>) {
    std::vector<double> times;
    for (const Node& n : nodes) times.push_back(n.t);
    r = gradient_flow(scheme, backend, std::span<const double>(times), controlled, x0, loss,
                      {.wrt_params = true});
  } else {
    const VPLinearSchedule schedule;
    r = gradient(scheme, backend, schedule, nodes, controlled, x0, loss, {.wrt_params = true});
  }
  Eigen::VectorXd g = r.grad_params.template cast<double>() + 2.0 * lambda * stack(u);
  return {g, r.grad_x};
}

// J(u) through flowgrad_objective (a fresh workspace: nothing carried between calls).
template <class Scheme, class Field>
double objective(const Scheme& scheme, std::span<const Node> nodes, Field field, const State& x0,
                 const Controls& u, const SquaredDistanceLoss<B>& loss,
                 const FlowGradOptions& options) {
  auto ws = make_flowgrad_workspace(backend, static_cast<int>(nodes.size()) - 1, x0);
  return flowgrad_objective_with(scheme, backend, nodes, field, x0, std::span<const State>(u), loss,
                                 options, ws)
      .objective;
}

struct GradientCheck {
  double vs_exact = 0.0;   // controls, relative to the generic discrete adjoint
  double x_vs_exact = 0.0; // dJ/dx_start, likewise
  double fd = 0.0;         // fd_check's relative error along random directions
};

template <class Scheme, class Model, class Field, class Vjp>
GradientCheck check_exact(const Scheme& scheme, std::span<const Node> nodes, Model& model,
                          Field field, Vjp vjp, const State& x0, const Controls& u,
                          const SquaredDistanceLoss<B>& loss, const FlowGradOptions& options) {
  const int n = static_cast<int>(nodes.size()) - 1;
  auto ws = make_flowgrad_workspace(backend, n, x0);
  const auto& r = flowgrad_gradient_with(scheme, backend, nodes, field, vjp, x0,
                                         std::span<const State>(u), loss, options, ws);
  REQUIRE(r.segments() == n);
  const Eigen::VectorXd mine = stack(r.grad_controls);
  const auto [ref, ref_x] =
      reference_gradient(scheme, nodes, model, x0, u, loss, options.control, options.lambda);
  GradientCheck c;
  c.vs_exact = rel(mine, ref);
  c.x_vs_exact = testing::relative_error<double>(r.grad_x_start, ref_x);
  const auto rows = x0.rows(), cols = x0.cols();
  const auto result = testing::check_vjp(
      [&](const Eigen::VectorXd& in, Eigen::VectorXd& out) {
        out.resize(1);
        out(0) = objective(scheme, nodes, field, x0, unstack(in, n, rows, cols), loss, options);
      },
      [&](const Eigen::VectorXd&, const Eigen::VectorXd& w) { return (w(0) * mine).eval(); },
      stack(u), {.directions = 4});
  c.fd = result.fd_error;
  return c;
}

// v(x, t) = c, whatever x and t: straight, zero Jacobian.
struct ConstantVelocity {
  State c;
  void velocity(const State& x, double, State& out) const {
    out = c.replicate(x.rows() / c.rows(), 1);
  }
  void velocity_vjp(const State& x, double, const State&, State& dx, B::vector_type*,
                    B::vector_type*) const {
    dx = State::Zero(x.rows(), x.cols());
  }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
};

} // namespace

// Thrown as diffgrad::invalid_argument, with a message that matches.
#define REJECTS(expr, matcher)                                                                     \
  do {                                                                                             \
    CHECK_THROWS_AS(expr, diffgrad::invalid_argument);                                             \
    CHECK_THROWS_WITH(expr, matcher);                                                              \
  } while (false)

// ---- straightness and segmentation ---------------------------------------------------------

TEST_CASE("Straightness S_k = max(d(v_{k-1}, v_k), d(v_{k+1}, v_k)) by hand",
          "[flowgrad][straightness]") {
  // v = (1,0), (2,0), (2,0), (0,0): d(v0,v1) = 1/4, d(v1,v0) = 1, d(v1,v2) = d(v2,v1) = 0,
  // d(v3,v2) = 4/4 = 1, d(v2,v3) = 4/0 = inf.
  std::vector<State> v(4, State(1, 2));
  v[0] << 1, 0;
  v[1] << 2, 0;
  v[2] << 2, 0;
  v[3] << 0, 0;
  std::vector<double> s;
  flow_straightness(backend, std::span<const State>(v), BatchStraightness::max_over_samples, s);
  REQUIRE(s.size() == 4);
  CHECK(s[0] == 1.0);
  CHECK(s[1] == 0.25);
  CHECK(s[2] == 1.0);
  CHECK(std::isinf(s[3]));
  CHECK(relative_change(0.0, 0.0) == 0.0);
}

TEST_CASE("Batch straightness: max over samples vs pooled (authors' code)",
          "[flowgrad][straightness]") {
  // Sample 0 changes by 1 on a norm-1 velocity; sample 1 is constant with norm 3.
  std::vector<State> v(2, State(2, 2));
  v[0] << 1, 0, 3, 0;
  v[1] << 1, 1, 3, 0;
  std::vector<double> s;
  flow_straightness(backend, std::span<const State>(v), BatchStraightness::max_over_samples, s);
  CHECK(s[0] == Approx(1.0).epsilon(1e-15)); // d(v1, v0) of sample 0: 1/1
  CHECK(s[1] == Approx(0.5).epsilon(1e-15)); // d(v0, v1) of sample 0: 1/2
  flow_straightness(backend, std::span<const State>(v), BatchStraightness::pooled, s);
  CHECK(s[0] == Approx(1.0 / 10.0).epsilon(1e-15)); // 1 / (1 + 9)
  CHECK(s[1] == Approx(1.0 / 11.0).epsilon(1e-15)); // 1 / (2 + 9)
}

TEST_CASE("Segmentation merges steps while the swallowed straightness stays below xi",
          "[flowgrad][straightness]") {
  const std::vector<double> s{5.0, 0.1, 0.2, 0.05, 0.3, 0.01};
  std::vector<int> starts;
  segment_straight_steps(s, 0.25, starts);
  CHECK(starts == std::vector<int>{0, 2, 4, 6}); // 0.1 < .25; 0.1+0.2 >= .25 -> node 2 stays
  segment_straight_steps(s, 0.0, starts);
  CHECK(starts == std::vector<int>{0, 1, 2, 3, 4, 5, 6});
  segment_straight_steps(s, 1.0, starts);
  CHECK(starts == std::vector<int>{0, 6}); // S_0 is never swallowed
  segment_straight_steps(s, 0.04, starts);
  CHECK(starts == std::vector<int>{0, 1, 2, 3, 4, 6});
  const std::vector<double> zero(5, 0.0);
  segment_straight_steps(zero, 0.0, starts);
  CHECK(starts.size() == 6); // xi = 0 never merges, even where S = 0
  segment_straight_steps(zero, 1e-12, starts);
  CHECK(starts == std::vector<int>{0, 5});
  const std::vector<double> with_nan{0.0, 0.0, std::nan(""), 0.0};
  segment_straight_steps(with_nan, 1.0, starts);
  CHECK(starts == std::vector<int>{0, 2, 4});
}

// ---- exactness at xi = 0 -----------------------------------------------------------------

TEST_CASE("xi = 0: FlowGrad on the Dirac-mixture flow is exact backprop (both conventions)",
          "[flowgrad][exact]") {
  auto model = flow_mixture();
  const auto times = flow_times(100);
  const auto nodes = flow_nodes(times);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    for (const double lambda : {0.0, 0.05}) {
      const Controls u = pattern_controls(100, 3, 2, mode == ControlMode::velocity ? 0.4 : 0.01);
      const auto c =
          check_exact(FlowEuler(), std::span<const Node>(nodes), model,
                      VelocityField<decltype(model)>{model}, VelocityVjp<decltype(model)>{model},
                      x0, u, loss, {.control = mode, .lambda = lambda, .xi = 0.0});
      INFO(control_mode_name(mode) << " lambda " << lambda << ": vs exact " << c.vs_exact << ", x "
                                   << c.x_vs_exact << ", fd " << c.fd);
      CHECK(c.vs_exact <= 1e-10);
      CHECK(c.x_vs_exact <= 1e-10);
      CHECK(c.fd <= 1e-7);
    }
  }
}

TEST_CASE("xi = 0: FlowGrad with an MLP velocity network is exact backprop", "[flowgrad][exact]") {
  models::MlpConfig cfg;
  cfg.dim = 3;
  cfg.hidden = {16, 16};
  cfg.activation = models::Activation::tanh;
  models::Mlp<double> net(cfg, 11);
  const auto times = uniform_flow_grid(20);
  const auto nodes = flow_nodes(times);
  const State x0 = testing::test_batch<double>(2, 3);
  const SquaredDistanceLoss<B> loss(target_state(2, 3));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    const Controls u = pattern_controls(20, 2, 3, 0.2);
    const auto c = check_exact(FlowEuler(), std::span<const Node>(nodes), net,
                               VelocityField<decltype(net)>{net}, VelocityVjp<decltype(net)>{net},
                               x0, u, loss, {.control = mode, .lambda = 0.01, .xi = 0.0});
    INFO(control_mode_name(mode) << ": vs exact " << c.vs_exact << ", fd " << c.fd);
    CHECK(c.vs_exact <= 1e-10);
    CHECK(c.x_vs_exact <= 1e-10);
    CHECK(c.fd <= 1e-7);
  }
}

TEST_CASE("FlowGrad on DDIM (diffusion ODE): xi = 0 is exact backprop", "[flowgrad][exact][ddim]") {
  models::DiracMixture<double> model(mixture_points());
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 40, 1.0, 1e-3));
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    const Controls u = pattern_controls(40, 3, 2, mode == ControlMode::velocity ? 0.3 : 0.01);
    const auto c = check_exact(Ddim(), std::span<const Node>(nodes), model,
                               EpsField<decltype(model)>{model}, EpsVjp<decltype(model)>{model}, x0,
                               u, loss, {.control = mode, .lambda = 0.02, .xi = 0.0});
    INFO(control_mode_name(mode) << ": vs exact " << c.vs_exact << ", fd " << c.fd);
    CHECK(c.vs_exact <= 1e-10);
    CHECK(c.x_vs_exact <= 1e-10);
    CHECK(c.fd <= 1e-7);
  }
}

TEST_CASE("DDIM with velocity controls is Euler in (x/alpha, rho = sigma/alpha)",
          "[flowgrad][ddim]") {
  models::DiracMixture<double> model(mixture_points());
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 30, 1.0, 1e-3));
  const State x0 = start_batch();
  const Controls u = pattern_controls(30, 3, 2, 0.3);
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  auto ws = make_flowgrad_workspace(backend, 30, x0);
  const auto& r = flowgrad_objective_with(Ddim(), backend, std::span<const Node>(nodes),
                                          EpsField<decltype(model)>{model}, x0,
                                          std::span<const State>(u), loss, {}, ws);
  // y' = eps(alpha y) + u in rho, by hand.
  State y = x0 / nodes[0].alpha, e;
  for (std::size_t k = 0; k < 30; ++k) {
    model.eps((nodes[k].alpha * y).eval(), nodes[k], e);
    const double drho = nodes[k + 1].sigma / nodes[k + 1].alpha - nodes[k].sigma / nodes[k].alpha;
    y += drho * (e + u[k]);
    CHECK(testing::relative_error<double>(ws.x[k + 1] / nodes[k + 1].alpha, y) <= 1e-12);
  }
  CHECK(testing::relative_error<double>(r.x_end, (nodes.back().alpha * y).eval()) <= 1e-12);
}

// ---- merging -------------------------------------------------------------------------------

TEST_CASE("A constant velocity field is one segment and the merged gradient is the full one",
          "[flowgrad][segments]") {
  State c(1, 2);
  c << 0.7, -0.3;
  ConstantVelocity model{c};
  const auto times = uniform_flow_grid(50);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    const Controls u = pattern_controls(50, 3, 2, 0.2);
    auto ws_full = make_flowgrad_workspace(backend, 50, x0);
    const auto& full = flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times),
                                              model, x0, std::span<const State>(u), loss,
                                              {.control = mode, .lambda = 0.1, .xi = 0.0}, ws_full);
    CHECK(full.segments() == 50);
    CHECK(full.cost.vjps == 50);
    for (const SegmentGradient rule :
         {SegmentGradient::frozen_jacobian, SegmentGradient::frozen_velocity}) {
      auto ws = make_flowgrad_workspace(backend, 50, x0);
      const auto& merged = flowgrad_gradient_flow(
          FlowEuler(), backend, std::span<const double>(times), model, x0,
          std::span<const State>(u), loss,
          {.control = mode, .lambda = 0.1, .xi = 1e-3, .reassign = rule}, ws);
      CHECK(merged.segments() == 1);
      CHECK(merged.cost.vjps == 1);
      CHECK(merged.segment_starts == std::vector<int>{0, 50});
      CHECK(rel(stack(merged.grad_controls), stack(full.grad_controls)) <= 1e-14);
      CHECK(testing::relative_error<double>(merged.grad_x_start, full.grad_x_start) <= 1e-14);
    }
    // SegmentGradient::segment hands every step the segment's single-control gradient:
    // velocity C g = (t_N - t_0) g = g; kick g_a = g (J_v = 0); g = dL/dx_N.
    auto ws_seg = make_flowgrad_workspace(backend, 50, x0);
    const auto& seg = flowgrad_gradient_flow(
        FlowEuler(), backend, std::span<const double>(times), model, x0, std::span<const State>(u),
        loss, {.control = mode, .lambda = 0.0, .xi = 1e-3, .reassign = SegmentGradient::segment},
        ws_seg);
    const State g = seg.x_end - target_state(3, 2);
    for (std::size_t k = 0; k < 50; k += 7)
      CHECK(testing::relative_error<double>(seg.grad_controls[k], g) <= 1e-14);
  }
}

// v(x, t) = A x + c with A^2 = 0: Euler steps compose exactly to first order in A, so holding
// the start Jacobian over a segment is exact whatever the segmentation.
struct NilpotentLinearVelocity {
  void velocity(const State& x, double t, State& out) const {
    out.resize(x.rows(), x.cols());
    out.col(0) = 1.5 * x.col(1).array() + std::cos(3.0 * t);
    out.col(1).setConstant(0.4 - t);
  }
  void velocity_vjp(const State& x, double, const State& a, State& dx, B::vector_type*,
                    B::vector_type*) const {
    dx = State::Zero(x.rows(), x.cols());
    dx.col(1) = 1.5 * a.col(0);
  }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
};

TEST_CASE("Frozen-Jacobian re-assignment is exact on a nilpotent linear field, any segments",
          "[flowgrad][segments]") {
  NilpotentLinearVelocity model;
  const auto times = uniform_flow_grid(40);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    const Controls u = pattern_controls(40, 3, 2, 0.2);
    auto ws_full = make_flowgrad_workspace(backend, 40, x0);
    const auto& full = flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times),
                                              model, x0, std::span<const State>(u), loss,
                                              {.control = mode, .lambda = 0.1}, ws_full);
    for (const double xi : {0.05, 0.5, 1e9}) {
      auto ws = make_flowgrad_workspace(backend, 40, x0);
      const auto& merged = flowgrad_gradient_flow(
          FlowEuler(), backend, std::span<const double>(times), model, x0,
          std::span<const State>(u), loss, {.control = mode, .lambda = 0.1, .xi = xi}, ws);
      INFO(control_mode_name(mode) << " xi " << xi << ": " << merged.segments() << " segments");
      CHECK(merged.segments() < 40);
      CHECK(rel(stack(merged.grad_controls), stack(full.grad_controls)) <= 1e-13);
      CHECK(testing::relative_error<double>(merged.grad_x_start, full.grad_x_start) <= 1e-13);
      if (xi == 1e9) CHECK(merged.segments() == 1);
      // Freezing the velocity instead drops A from the interior steps: not exact.
      auto ws_v = make_flowgrad_workspace(backend, 40, x0);
      const auto& frozen_v = flowgrad_gradient_flow(
          FlowEuler(), backend, std::span<const double>(times), model, x0,
          std::span<const State>(u), loss,
          {.control = mode, .lambda = 0.1, .xi = xi, .reassign = SegmentGradient::frozen_velocity},
          ws_v);
      CHECK(rel(stack(frozen_v.grad_controls), stack(full.grad_controls)) > 1e-3);
    }
  }
}

TEST_CASE("Dirac-mixture flow, N = 100: VJPs and gradient error against xi",
          "[flowgrad][segments][table]") {
  // The docs/flowgrad.md table (printed by `flowgrad_steer --table`): merging cuts the VJPs
  // to ~1/5 at xi = 1e-2, but the straightness test sees the velocity, not its Jacobian, and
  // this field's Jacobian -I/(1 - t) varies fast on straight committed trajectories, so the
  // merged gradient is far from the exact one in norm; it stays a descent direction.
  auto model = flow_mixture();
  const auto times = flow_times(100);
  const State x0 = testing::test_batch<double>(1, 2);
  const SquaredDistanceLoss<B> loss(target_state(1, 2));
  for (const ControlMode mode : {ControlMode::velocity, ControlMode::kick}) {
    const Controls u = make_controls(backend, 100, 1, 2);
    auto ws = make_flowgrad_workspace(backend, 100, x0);
    const auto run = [&](double xi, SegmentGradient rule) {
      const auto& r = flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times),
                                             model, x0, std::span<const State>(u), loss,
                                             {.control = mode, .xi = xi, .reassign = rule}, ws);
      return std::pair{stack(r.grad_controls), r.cost.vjps};
    };
    const auto [exact, vjps0] = run(0.0, SegmentGradient::frozen_jacobian);
    CHECK(vjps0 == 100);
    for (const SegmentGradient rule : {SegmentGradient::frozen_velocity, SegmentGradient::segment})
      CHECK(rel(run(0.0, rule).first, exact) == 0.0); // one-step segments: all rules agree
    std::int64_t previous = vjps0;
    for (const double xi : {1e-3, 5e-3, 1e-2}) {
      const auto [g, vjps] = run(xi, SegmentGradient::frozen_jacobian);
      const auto g_velocity = run(xi, SegmentGradient::frozen_velocity).first;
      const double err = rel(g, exact);
      const double cosine = g.dot(exact) / (g.norm() * exact.norm());
      INFO(control_mode_name(mode)
           << " xi " << xi << ": " << vjps << " VJPs, error " << err << ", cosine " << cosine);
      CHECK(vjps < previous);
      CHECK(cosine > 0.3);
      CHECK(err < rel(g_velocity, exact));
      previous = vjps;
    }
    CHECK(previous <= 25);
  }
}

// ---- optimisation --------------------------------------------------------------------------

TEST_CASE("The objective falls monotonically for a quadratic target at a small step size",
          "[flowgrad][optimize]") {
  auto model = flow_mixture();
  const auto times = flow_times(100);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  struct Case {
    ControlMode mode;
    double xi, lambda, lr;
  };
  // A velocity control moves x_N by dt u per step, a kick by u: step sizes differ by ~N^2.
  for (const Case c :
       {Case{ControlMode::velocity, 0.0, 0.0, 10.0}, Case{ControlMode::velocity, 5e-3, 1e-3, 10.0},
        Case{ControlMode::kick, 0.0, 0.0, 1e-3}, Case{ControlMode::kick, 5e-3, 1e-2, 1e-3}}) {
    Controls u = make_controls(backend, 100, 3, 2);
    const auto r = flowgrad_optimize_flow(FlowEuler(), backend, std::span<const double>(times),
                                          model, x0, u, loss, GradientDescent(c.lr),
                                          {.control = c.mode, .lambda = c.lambda, .xi = c.xi},
                                          {.iterations = 25});
    INFO(control_mode_name(c.mode) << " xi " << c.xi << ": J " << r.objective_history.front()
                                   << " -> " << r.objective_history.back());
    REQUIRE(r.objective_history.size() == 26);
    for (std::size_t i = 1; i < r.objective_history.size(); ++i)
      CHECK(r.objective_history[i] < r.objective_history[i - 1]);
    CHECK(r.objective_history.back() < 0.98 * r.objective_history.front());
    CHECK(r.best_iteration == 25);
    CHECK(r.best_objective == r.objective_history.back());
    // The best controls are the last iterate here, and they reproduce the best objective.
    CHECK(rel(stack(r.best_controls), stack(u)) == 0.0);
    auto ws = make_flowgrad_workspace(backend, 100, x0);
    const auto& check =
        flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times), model, x0,
                               std::span<const State>(r.best_controls), loss,
                               {.control = c.mode, .lambda = c.lambda, .xi = c.xi}, ws);
    CHECK(check.objective == r.best_objective);
    // Cost: 26 forward passes, one VJP per segment of each of the 25 gradients.
    std::int64_t segments = 0;
    for (const int s : r.segment_history) segments += s;
    CHECK(r.cost.model_evals == 26 * 100);
    CHECK(r.cost.vjps == segments);
    CHECK(r.cost.loss_evals == 26);
    if (c.xi == 0.0) CHECK(segments == 25 * 100);
  }
}

TEST_CASE("Adam through FlowGrad on DDIM returns the best controls it saw",
          "[flowgrad][optimize][ddim]") {
  models::DiracMixture<double> model(mixture_points());
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 50, 1.0, 1e-3));
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  Controls u = make_controls(backend, 50, 3, 2);
  const auto r = flowgrad_optimize(Ddim(), backend, std::span<const Node>(nodes), model, x0, u,
                                   loss, Adam({.learning_rate = 0.05}),
                                   {.lambda = 1e-3, .xi = 5e-3}, {.iterations = 15});
  REQUIRE(r.objective_history.size() == 16);
  double lowest = r.objective_history.front();
  for (const double j : r.objective_history) lowest = std::min(lowest, j);
  CHECK(r.best_objective == lowest);
  CHECK(r.objective_history[static_cast<std::size_t>(r.best_iteration)] == lowest);
  CHECK(r.best_objective < r.objective_history.front());
  CHECK(r.segment_history.front() < 25); // 15: the uncontrolled DDIM trajectory is straight
}

TEST_CASE("FlowGrad cost: N model evaluations, one VJP per segment, one loss evaluation",
          "[flowgrad][cost]") {
  auto model = flow_mixture();
  const auto times = flow_times(64);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  const Controls u = make_controls(backend, 64, 3, 2);
  auto ws = make_flowgrad_workspace(backend, 64, x0);
  for (const double xi : {0.0, 1e-2, 1.0}) {
    const auto& r =
        flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times), model, x0,
                               std::span<const State>(u), loss, {.xi = xi}, ws);
    CHECK(r.cost.model_evals == 64);
    CHECK(r.cost.loss_evals == 1);
    CHECK(r.cost.vjps == r.segments());
    CHECK(r.segment_starts.front() == 0);
    CHECK(r.segment_starts.back() == 64);
  }
}

TEST_CASE("FlowGrad in float32 stays within 1e-4 of float64", "[flowgrad][float32]") {
  using BF = EigenBackend<float>;
  using SF = BF::state_type;
  const BF backend_f;
  models::RectifiedFlowMixture<float> model_f(mixture_points().cast<float>(),
                                              Eigen::VectorXf::Ones(4));
  models::RectifiedFlowMixture<double> model_d(mixture_points());
  const auto times = flow_times(50);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss_d(target_state(3, 2));
  const SquaredDistanceLoss<BF> loss_f(target_state(3, 2).cast<float>());
  const Controls u = pattern_controls(50, 3, 2, 0.3);
  std::vector<SF> u_f;
  for (const State& s : u) u_f.push_back(s.cast<float>());
  auto ws_d = make_flowgrad_workspace(backend, 50, x0);
  auto ws_f = make_flowgrad_workspace(backend_f, 50, SF(x0.cast<float>()));
  const auto& rd = flowgrad_gradient_flow(FlowEuler(), backend, std::span<const double>(times),
                                          model_d, x0, std::span<const State>(u), loss_d, {}, ws_d);
  const auto& rf =
      flowgrad_gradient_flow(FlowEuler(), backend_f, std::span<const double>(times), model_f,
                             SF(x0.cast<float>()), std::span<const SF>(u_f), loss_f, {}, ws_f);
  Controls gf;
  for (const SF& s : rf.grad_controls) gf.push_back(s.cast<double>());
  CHECK(rel(stack(gf), stack(rd.grad_controls)) <= 1e-4);
  CHECK(std::abs(rf.objective - rd.objective) <= 1e-5 * std::abs(rd.objective));
}

// ---- errors --------------------------------------------------------------------------------

TEST_CASE("FlowGrad rejects bad input with messages that name the argument", "[flowgrad][errors]") {
  auto model = flow_mixture();
  const auto times = uniform_flow_grid(10);
  const std::span<const double> ts(times);
  const State x0 = start_batch();
  const SquaredDistanceLoss<B> loss(target_state(3, 2));
  Controls u = make_controls(backend, 10, 3, 2);
  auto ws = make_flowgrad_workspace(backend, 10, x0);
  const auto call = [&](const Controls& c, const FlowGradOptions& o) {
    flowgrad_gradient_flow(FlowEuler(), backend, ts, model, x0, std::span<const State>(c), loss, o,
                           ws);
  };
  using Catch::Matchers::Contains;
  // Wrong number of controls, wrong shape.
  const Controls too_few = make_controls(backend, 9, 3, 2);
  REJECTS(call(too_few, {}), Contains("'controls'") && Contains("10"));
  Controls bad_shape = u;
  bad_shape[4] = State::Zero(3, 3);
  REJECTS(call(bad_shape, {}), Contains("'controls'") && Contains("controls[4]"));
  // xi < 0 or NaN, lambda < 0 or infinite.
  REJECTS(call(u, {.xi = -1e-3}), Contains("'options.xi'"));
  REJECTS(call(u, {.xi = std::nan("")}), Contains("'options.xi'"));
  REJECTS(call(u, {.lambda = -1.0}), Contains("'options.lambda'"));
  REJECTS(call(u, {.lambda = INFINITY}), Contains("'options.lambda'"));
  // Schemes FlowGrad is not defined for.
  REJECTS(flowgrad_gradient_flow(FlowHeun(), backend, ts, model, x0, std::span<const State>(u),
                                 loss, {}, ws),
          Contains("'scheme'") && Contains("one-stage"));
  models::DiracMixture<double> eps_model(mixture_points());
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 10, 1.0, 1e-3));
  REJECTS(flowgrad_gradient(Ddim(0.5), backend, std::span<const Node>(nodes), eps_model, x0,
                            std::span<const State>(u), loss, {}, ws),
          Contains("'scheme'") && Contains("stochastic"));
  // Workspace / state mismatches.
  auto ws_other = make_flowgrad_workspace(backend, 12, x0);
  REJECTS(flowgrad_gradient_flow(FlowEuler(), backend, ts, model, x0, std::span<const State>(u),
                                 loss, {}, ws_other),
          Contains("'ws'"));
  const State x_wrong = State::Zero(2, 2);
  REJECTS(flowgrad_gradient_flow(FlowEuler(), backend, ts, model, x_wrong,
                                 std::span<const State>(u), loss, {}, ws),
          Contains("'x_start'"));
  // Optimiser loop and helpers.
  REJECTS(flowgrad_optimize_flow(FlowEuler(), backend, ts, model, x0, u, loss, GradientDescent(0.1),
                                 {}, {.iterations = -1}),
          Contains("'optimize.iterations'"));
  REJECTS(flowgrad_optimize_flow(FlowEuler(), backend, ts, model, x0, u, loss, GradientDescent(0.1),
                                 {.xi = -1.0}),
          Contains("'options.xi'"));
  std::vector<int> starts;
  REJECTS(segment_straight_steps(std::vector<double>{0.1, 0.2}, -0.5, starts), Contains("'xi'"));
  REJECTS(make_controls(backend, 0, 3, 2), Contains("'num_steps'"));
  // The exact-reference adapter refuses a time that is not a step start of its grid.
  const auto fnodes = flow_nodes(times);
  ControlledModel<decltype(model), B> controlled(FlowEuler(), std::span<const Node>(fnodes), model,
                                                 std::span<const State>(u), ControlMode::velocity);
  State out;
  REJECTS(controlled.velocity(x0, 0.55, out), Contains("'t'"));
  CHECK_NOTHROW(controlled.velocity(x0, 0.5, out));
}
