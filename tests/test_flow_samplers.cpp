// Flow samplers (FlowEuler, FlowHeun, sample_flow) and the exact Gaussian rectified flow:
// the model's closed forms and VJP, convergence orders, float32, input errors.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/heun.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/models/gaussian_flow.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::fitted_order;
using diffgrad::testing::relative_error;
using diffgrad::testing::State;

namespace {

/// Data N(mu, 0.3^2 I), mu non-trivial: the velocity changes by O(1) over [0, 1].
template <class Scalar> models::GaussianFlow<Scalar> flow_problem(Eigen::Index dim) {
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> mu(dim);
  for (Eigen::Index j = 0; j < dim; ++j) mu(j) = Scalar(1.0 - 0.6 * static_cast<double>(j));
  return models::GaussianFlow<Scalar>(mu, 0.3);
}

template <class Scalar, class Scheme>
State<double> flow_sample(const Scheme& scheme, int num_steps) {
  auto model = flow_problem<Scalar>(3);
  auto x = diffgrad::testing::test_batch<Scalar>(4, 3);
  const auto times = uniform_flow_grid(num_steps);
  sample_flow(scheme, EigenBackend<Scalar>(), times, model, x);
  return x.template cast<double>();
}

template <class Scheme> double flow_error(const Scheme& scheme, int num_steps) {
  const auto model = flow_problem<double>(3);
  const auto exact = model.exact_flow(diffgrad::testing::test_batch<double>(4, 3), 0.0, 1.0);
  return relative_error<double>(flow_sample<double>(scheme, num_steps), exact);
}

/// A velocity model that returns NaN at t = 1 (a flow to point masses is singular there).
struct SingularAtOne {
  models::GaussianFlow<double> inner = flow_problem<double>(3);
  int calls = 0;
  void velocity(const State<double>& x, double t, State<double>& out) {
    ++calls;
    inner.velocity(x, t, out);
    if (t == 1.0) out.setConstant(std::numeric_limits<double>::quiet_NaN());
  }
};

} // namespace

TEST_CASE("GaussianFlow: the exact flow solves dx/dt = v and maps N(0, I) to N(mu, s^2 I)",
          "[flow][model]") {
  const auto model = flow_problem<double>(3);
  const auto x0 = diffgrad::testing::test_batch<double>(4, 3);
  // End point: x1 = mu + s x0 (var_0 = 1, var_1 = s^2), the Gaussian push-forward.
  const auto x1 = model.exact_flow(x0, 0.0, 1.0);
  const State<double> expected = ((0.3 * x0).rowwise() + model.mu().transpose()).eval();
  CHECK(relative_error<double>(x1, expected) < 1e-15);
  // d/dt of the flow equals the velocity at the transported point (central differences,
  // truncation ~1e-10 at dt = 1e-5); t = 0 and 1 use one-sided differences of second order.
  for (double t : {0.0, 0.1, 0.5, 0.77, 1.0}) {
    const double dt = 1e-5;
    State<double> deriv;
    if (t == 0.0)
      deriv = (-3 * model.exact_flow(x0, 0, t) + 4 * model.exact_flow(x0, 0, t + dt) -
               model.exact_flow(x0, 0, t + 2 * dt)) / (2 * dt);
    else if (t == 1.0)
      deriv = (3 * model.exact_flow(x0, 0, t) - 4 * model.exact_flow(x0, 0, t - dt) +
               model.exact_flow(x0, 0, t - 2 * dt)) / (2 * dt);
    else
      deriv = (model.exact_flow(x0, 0, t + dt) - model.exact_flow(x0, 0, t - dt)) / (2 * dt);
    State<double> v(4, 3);
    model.velocity(model.exact_flow(x0, 0, t), t, v);
    INFO("t = " << t);
    CHECK(relative_error<double>(deriv, v) < 1e-8);
  }
  // Flows compose and invert: x_{0.3 -> 0.8 -> 0.3} = x.
  const auto back = model.exact_flow(model.exact_flow(x0, 0.3, 0.8), 0.8, 0.3);
  CHECK(relative_error<double>(back, x0) < 1e-15);
}

TEST_CASE("GaussianFlow: velocity_vjp matches central finite differences", "[flow][model][vjp]") {
  auto model = flow_problem<double>(3);
  static_assert(DifferentiableVelocityModel<models::GaussianFlow<double>, State<double>,
                                            Eigen::VectorXd>);
  const auto x = diffgrad::testing::test_batch<double>(2, 3);
  State<double> a(2, 3);
  a << 0.3, -1.1, 0.7, 2.0, 0.4, -0.5;
  auto loss = [&](const models::GaussianFlow<double>& m, const State<double>& xx, double t) {
    State<double> v(2, 3);
    m.velocity(xx, t, v);
    return a.cwiseProduct(v).sum();
  };
  for (double t : {0.0, 0.35, 0.9, 1.0}) {
    State<double> dx(2, 3);
    Eigen::VectorXd dcond = Eigen::VectorXd::Zero(3), dparams = Eigen::VectorXd::Zero(1);
    model.velocity_vjp(x, t, a, dx, &dcond, &dparams);
    const double eps = 1e-6;
    INFO("t = " << t);
    for (Eigen::Index k = 0; k < x.size(); ++k) {
      State<double> xp = x, xm = x;
      xp.data()[k] += eps;
      xm.data()[k] -= eps;
      const double fd = (loss(model, xp, t) - loss(model, xm, t)) / (2 * eps);
      CHECK(dx.data()[k] == Approx(fd).epsilon(1e-7).margin(1e-9));
    }
    for (Eigen::Index j = 0; j < 3; ++j) {
      auto mp = model, mm = model;
      mp.mu()(j) += eps;
      mm.mu()(j) -= eps;
      const double fd = (loss(mp, x, t) - loss(mm, x, t)) / (2 * eps);
      CHECK(dcond(j) == Approx(fd).epsilon(1e-7).margin(1e-9));
    }
    auto mp = model, mm = model;
    mp.set_s(model.s() + eps);
    mm.set_s(model.s() - eps);
    const double fd = (loss(mp, x, t) - loss(mm, x, t)) / (2 * eps);
    CHECK(dparams(0) == Approx(fd).epsilon(1e-7).margin(1e-9));
  }
  // Null outputs are skipped; accumulation adds to what is there.
  State<double> dx(2, 3);
  Eigen::VectorXd acc = Eigen::VectorXd::Ones(3);
  model.velocity_vjp(x, 0.5, a, dx, &acc, nullptr);
  Eigen::VectorXd fresh = Eigen::VectorXd::Zero(3);
  model.velocity_vjp(x, 0.5, a, dx, &fresh, nullptr);
  CHECK((acc - fresh - Eigen::VectorXd::Ones(3)).norm() < 1e-15);
}

TEST_CASE("FlowEuler converges with order 1 and FlowHeun with order 2 (float64)",
          "[flow][order]") {
  auto check = [](const auto& scheme, int first, double theory, const char* name) {
    std::vector<int> steps;
    std::vector<double> errors;
    for (int k = 0; k < 5; ++k) {
      steps.push_back(first << k);
      errors.push_back(flow_error(scheme, steps.back()));
    }
    const double order = fitted_order(steps, errors);
    INFO(name << ": N = " << steps.front() << " .. " << steps.back() << ", errors "
              << errors.front() << " .. " << errors.back() << ", fitted order " << order);
    CHECK(order == Approx(theory).margin(0.2));
  };
  check(FlowEuler(), 20, 1.0, "FlowEuler");
  check(FlowHeun(), 20, 2.0, "FlowHeun");
  // final_euler replaces one step by Euler: a single O(dt^2) local error, order 2 is kept.
  check(FlowHeun(true), 20, 2.0, "FlowHeun(final_euler)");
}

TEST_CASE("Flow samplers in float32 stay within 1e-5 of float64", "[flow][float32]") {
  // Documented tolerance: O(1) states, one float32 rounding (6e-8) per step and stage.
  for (int n : {10, 100}) {
    const double euler = relative_error<double>(flow_sample<float>(FlowEuler(), n),
                                                flow_sample<double>(FlowEuler(), n));
    const double heun = relative_error<double>(flow_sample<float>(FlowHeun(), n),
                                               flow_sample<double>(FlowHeun(), n));
    INFO("N = " << n << ": Euler " << euler << ", Heun " << heun);
    CHECK(euler < 1e-5);
    CHECK(heun < 1e-5);
  }
}

TEST_CASE("sample_flow counts velocity calls and reports every step", "[flow]") {
  auto model = flow_problem<double>(3);
  const EigenBackend<double> backend;
  auto x = diffgrad::testing::test_batch<double>(2, 3);
  const auto times = uniform_flow_grid(8);
  std::vector<double> seen;
  auto observer = [&](int, int, const Node& n, const State<double>&) { seen.push_back(n.t); };
  CHECK(sample_flow(FlowEuler(), backend, times, model, x, {}, observer).model_evals == 8);
  REQUIRE(seen.size() == 8);
  CHECK(seen.back() == 1.0);
  CHECK(sample_flow(FlowHeun(), backend, times, model, x).model_evals == 16);
  CHECK(sample_flow(FlowHeun(true), backend, times, model, x).model_evals == 15);
  // A partial time window works too (e.g. starting from an intermediate state).
  auto y = diffgrad::testing::test_batch<double>(2, 3);
  const auto window = uniform_flow_grid(1000, 0.25, 0.75);
  sample_flow(FlowHeun(), backend, window, model, y);
  const auto exact = model.exact_flow(diffgrad::testing::test_batch<double>(2, 3), 0.25, 0.75);
  CHECK(relative_error<double>(y, exact) < 1e-6);
}

TEST_CASE("FlowHeun(final_euler) never evaluates the velocity at the last time",
          "[flow][hazard]") {
  SingularAtOne model;
  const EigenBackend<double> backend;
  const auto times = uniform_flow_grid(10);
  auto x = diffgrad::testing::test_batch<double>(2, 3);
  CHECK_THROWS_AS(sample_flow(FlowHeun(), backend, times, model, x), diffgrad::numerical_error);
  x = diffgrad::testing::test_batch<double>(2, 3);
  const auto result = sample_flow(FlowHeun(true), backend, times, model, x);
  CHECK(result.model_evals == 19);
  CHECK(x.allFinite());
}

TEST_CASE("Flow samplers reject non-increasing or out-of-range flow times", "[flow][errors]") {
  auto model = flow_problem<double>(3);
  const EigenBackend<double> backend;
  auto x = diffgrad::testing::test_batch<double>(2, 3);
  const std::vector<double> decreasing{0.0, 0.5, 0.4, 1.0};
  CHECK_THROWS_WITH(sample_flow(FlowEuler(), backend, decreasing, model, x),
                    Catch::Contains("flow_nodes") && Catch::Contains("times") &&
                        Catch::Contains("strictly increasing") && Catch::Contains("times[2] = 0.4"));
  const std::vector<double> repeated{0.0, 0.5, 0.5};
  CHECK_THROWS_AS(sample_flow(FlowHeun(), backend, repeated, model, x), diffgrad::invalid_argument);
  const std::vector<double> outside{0.0, 0.5, 1.5};
  CHECK_THROWS_WITH(sample_flow(FlowEuler(), backend, outside, model, x),
                    Catch::Contains("[0, 1]") && Catch::Contains("times[2] = 1.5"));
  const std::vector<double> not_a_number{0.0, std::numeric_limits<double>::quiet_NaN(), 1.0};
  CHECK_THROWS_AS(sample_flow(FlowEuler(), backend, not_a_number, model, x),
                  diffgrad::invalid_argument);
  const std::vector<double> single{0.0};
  CHECK_THROWS_WITH(sample_flow(FlowEuler(), backend, single, model, x),
                    Catch::Contains("at least 2"));
  // Node sequences built by hand go through the scheme's own check.
  const std::vector<Node> nodes{flow_node(0.0), flow_node(0.7), flow_node(0.2)};
  CHECK_THROWS_WITH(FlowHeun().validate(nodes),
                    Catch::Contains("FlowHeun") && Catch::Contains("nodes[2].t = 0.2"));
  CHECK_THROWS_AS(uniform_flow_grid(0), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(uniform_flow_grid(4, 0.5, 0.5), Catch::Contains("t_end"));
  CHECK_THROWS_AS(models::GaussianFlow<double>(Eigen::VectorXd::Zero(2), 0.0),
                  diffgrad::invalid_argument);
}
