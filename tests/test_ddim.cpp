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
  std::vector<int> steps{10, 20, 40, 80, 160};
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
