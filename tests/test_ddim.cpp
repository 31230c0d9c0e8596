// DDIM: order 1 on the Gaussian problem, exactness for one data point, eta > 0 statistics.
#include <catch2/catch.hpp>

#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::fitted_order;

TEST_CASE("DDIM converges with order 1 on Gaussian data (float64)", "[ddim][order]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(4, 3);
  std::vector<int> steps{20, 40, 80, 160, 320};
  std::vector<double> errors;
  for (int n : steps) {
    const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, n, 1.0, 1e-3));
    auto x = x_T;
    sample(Ddim(), backend, schedule, nodes, model, x);
    const auto exact = model.exact_flow(x_T, nodes.front(), nodes.back());
    errors.push_back(diffgrad::testing::relative_error<double>(x, exact));
  }
  const double order = fitted_order(steps, errors);
  INFO("errors " << errors[0] << " ... " << errors.back() << ", order " << order);
  CHECK(order == Approx(1.0).margin(0.2));
}

TEST_CASE("DDIM is exact for a single data point on any grid", "[ddim]") {
  // One data point y is Gaussian data with s -> 0; use a tiny s so eps is constant along paths.
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  Eigen::VectorXd y(2);
  y << 0.7, -1.2;
  models::GaussianData<double> model(y, 1e-300);
  const auto x_T = diffgrad::testing::test_batch<double>(3, 2);
  const std::vector<double> grid{1.0, 0.9, 0.31, 0.3, 0.05, 0.002};  // deliberately irregular
  const auto nodes = make_nodes(schedule, grid);
  auto x = x_T;
  sample(Ddim(), backend, schedule, nodes, model, x);
  const auto exact = model.exact_flow(x_T, nodes.front(), nodes.back());
  CHECK(diffgrad::testing::relative_error<double>(x, exact) < 1e-14);
}

TEST_CASE("DDIM in float32 stays within 1e-4 of the float64 result", "[ddim][float32]") {
  // Documented tolerance: float32 rounding of O(1) states over N steps, ~N * 2^-24 * |x|.
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 100, 1.0, 1e-3));
  auto model64 = diffgrad::testing::gaussian_problem<double>(3);
  auto model32 = diffgrad::testing::gaussian_problem<float>(3);
  auto x64 = diffgrad::testing::test_batch<double>(4, 3);
  auto x32 = diffgrad::testing::test_batch<float>(4, 3);
  sample(Ddim(), EigenBackend<double>(), schedule, nodes, model64, x64);
  sample(Ddim(), EigenBackend<float>(), schedule, nodes, model32, x32);
  const double err = (x32.cast<double>() - x64).norm() / x64.norm();
  INFO("float32 vs float64 relative difference " << err);
  CHECK(err < 1e-4);
}

TEST_CASE("DDIM eta = 1 to a sigma = 0 final node is finite and lands on x0", "[ddim][hazard]") {
  // lambda = +inf at the final node: coefficients must take their limits, not 0 * inf.
  const VPLinearSchedule schedule;
  std::vector<Node> nodes{schedule.node(0.5), schedule.node(0.1), terminal_data_node(0.0, 0.0)};
  const Node& s = nodes[1];
  for (double eta : {0.0, 0.5, 1.0}) {
    const auto c = coeffs::ddim(s, nodes[2], eta);
    CHECK(std::isfinite(c.x));
    CHECK(std::isfinite(c.eps));
    CHECK(c.noise == 0.0);
    // x_t = x0_hat exactly: x coefficient 1/alpha_s, eps coefficient -sigma_s/alpha_s.
    CHECK(c.x == Approx(1.0 / s.alpha).epsilon(1e-15));
    CHECK(c.eps == Approx(-s.sigma / s.alpha).epsilon(1e-15));
  }
}

TEST_CASE("Ddim rejects eta outside [0, 1]", "[ddim][errors]") {
  CHECK_THROWS_WITH(Ddim(-0.1), Catch::Contains("eta") && Catch::Contains("0 <= eta <= 1"));
  CHECK_THROWS_AS(Ddim(1.5), diffgrad::invalid_argument);
}
