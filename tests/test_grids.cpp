// Time grids: exact endpoints, strictly decreasing times, N + 1 points, and each grid uniform in
// its own variable (t, lambda, sqrt(t), rho^(1/7)). The Karras grid is compared with the
// formula of docs/math.md ('Time grids') written out here.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_cosine.hpp"
#include "diffgrad/schedule/vp_linear.hpp"

using namespace diffgrad;

namespace {

const GridKind kAllKinds[] = {GridKind::uniform_t, GridKind::uniform_lambda, GridKind::quadratic_t,
                              GridKind::karras};

/// The variable in which grid `kind` is uniform, as a function of t.
template <class S> double uniform_variable(const S& s, GridKind kind, double t) {
  switch (kind) {
  case GridKind::uniform_t: return t;
  case GridKind::uniform_lambda: return s.lambda(t);
  case GridKind::quadratic_t: return std::sqrt(t);
  case GridKind::karras: return std::pow(std::exp(-s.lambda(t)), 1.0 / 7.0); // rho^(1/7)
  }
  return 0.0;
}

template <class S> void check_grids(const std::string& name, const S& s) {
  const double t_start = s.t_max(), t_end = s.t_min();
  // A sub-interval too: grids must honour t_start/t_end, not just the domain.
  const double t_mid_start = s.t_min() + 0.8 * (s.t_max() - s.t_min());
  const double t_mid_end = s.t_min() + 0.1 * (s.t_max() - s.t_min());
  for (GridKind kind : kAllKinds) {
    for (int n : {1, 2, 7, 50}) {
      for (auto [a, b] : {std::pair{t_start, t_end}, std::pair{t_mid_start, t_mid_end}}) {
        INFO(name << ", grid kind " << static_cast<int>(kind) << ", " << n << " steps, from " << a
                  << " to " << b);
        const auto t = make_grid(s, kind, n, a, b);
        REQUIRE(t.size() == static_cast<std::size_t>(n) + 1);
        CHECK(t.front() == a);
        CHECK(t.back() == b);
        bool decreasing = true;
        for (std::size_t i = 1; i < t.size(); ++i) decreasing = decreasing && t[i] < t[i - 1];
        CHECK(decreasing);
        // Uniform in its own variable: every increment equals the mean increment.
        const double u0 = uniform_variable(s, kind, a), u1 = uniform_variable(s, kind, b);
        const double step = (u1 - u0) / n;
        double worst = 0;
        for (std::size_t i = 1; i < t.size(); ++i) {
          const double du = uniform_variable(s, kind, t[i]) - uniform_variable(s, kind, t[i - 1]);
          worst = std::max(worst, std::abs(du - step) / std::abs(step));
        }
        INFO("worst relative deviation of an increment: " << worst);
        CHECK(worst < 1e-8);
        // make_nodes keeps the times and evaluates the schedule at them.
        const auto nodes = make_nodes(s, t);
        REQUIRE(nodes.size() == t.size());
        for (std::size_t i = 0; i < t.size(); ++i) CHECK(nodes[i].t == t[i]);
      }
    }
    // The default span is the whole domain, noise to data.
    const auto whole = make_grid(s, kind, 10);
    CHECK(whole.front() == s.t_max());
    CHECK(whole.back() == s.t_min());
  }
}

} // namespace

TEST_CASE("Every grid kind on every schedule: endpoints, order, uniformity", "[grid]") {
  check_grids("VPLinear", VPLinearSchedule());
  check_grids("VPCosine", VPCosineSchedule());
  check_grids("VE", VESchedule());
  check_grids("SubVP", SubVPSchedule());
  check_grids("EDM", EDMSchedule());
  check_grids("Discrete(linear)", DiscreteSchedule::from_beta_schedule(BetaSchedule::linear));
}

TEST_CASE("The Karras grid is Karras et al.'s formula", "[grid][karras]") {
  // sigma_i = (s_max^(1/r) + i/(N-1) (s_min^(1/r) - s_max^(1/r)))^r, N points, r = 7.
  const auto formula = [](double smax, double smin, int points, int i, double r) {
    const double a = std::pow(smax, 1 / r), b = std::pow(smin, 1 / r);
    return std::pow(a + static_cast<double>(i) / (points - 1) * (b - a), r);
  };
  SECTION("EDM: the grid is the sigma sequence itself") {
    const EDMSchedule edm(0.002, 80.0);
    for (int n : {1, 4, 18, 40}) {
      const auto t = karras_grid(edm, n, 80.0, 0.002);
      for (int i = 0; i <= n; ++i)
        CHECK(t[static_cast<std::size_t>(i)] ==
              Approx(formula(80.0, 0.002, n + 1, i, 7.0)).epsilon(1e-13));
    }
    // Another rho.
    const auto t3 = karras_grid(edm, 9, 80.0, 0.002, 3.0);
    for (int i = 0; i <= 9; ++i)
      CHECK(t3[static_cast<std::size_t>(i)] ==
            Approx(formula(80.0, 0.002, 10, i, 3.0)).epsilon(1e-13));
  }
  SECTION("VP: the same formula in rho = sigma/alpha") {
    const VPLinearSchedule vp;
    const double smax = vp.sigma(1.0) / vp.alpha(1.0), smin = vp.sigma(1e-3) / vp.alpha(1e-3);
    const auto t = karras_grid(vp, 20, 1.0, 1e-3);
    for (int i = 0; i <= 20; ++i) {
      const double ti = t[static_cast<std::size_t>(i)];
      CHECK(vp.sigma(ti) / vp.alpha(ti) == Approx(formula(smax, smin, 21, i, 7.0)).epsilon(1e-10));
    }
  }
}

TEST_CASE("The lambda grid has equal log-SNR steps between its endpoints", "[grid]") {
  const VPCosineSchedule s;
  const auto t = uniform_lambda_grid(s, 25, 0.9, 0.01);
  const double h = (s.lambda(0.01) - s.lambda(0.9)) / 25;
  for (std::size_t i = 1; i < t.size(); ++i)
    CHECK(s.lambda(t[i]) - s.lambda(t[i - 1]) == Approx(h).epsilon(1e-10));
}

TEST_CASE("validate_nodes refuses NaN alpha / sigma and negative sigma, naming node and field",
          "[grid][errors]") {
  const VPLinearSchedule s;
  const auto times = uniform_t_grid(s, 4, s.t_max(), s.t_min());
  const auto good = make_nodes(s, times);
  CHECK_NOTHROW(validate_nodes(good, "test"));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto bad = good;
  bad[2].alpha = nan;
  CHECK_THROWS_WITH(validate_nodes(bad, "test"),
                    Catch::Contains("node 2") && Catch::Contains("alpha"));
  bad = good;
  bad[3].sigma = nan;
  CHECK_THROWS_WITH(validate_nodes(bad, "test"),
                    Catch::Contains("node 3") && Catch::Contains("sigma"));
  bad = good;
  bad[1].sigma = -0.5;
  CHECK_THROWS_WITH(validate_nodes(bad, "test"),
                    Catch::Contains("node 1") && Catch::Contains("sigma >= 0"));
  // sigma = 0 (the data end) stays valid.
  auto terminal = good;
  terminal.back() = terminal_data_node(0.0, 0.0);
  CHECK_NOTHROW(validate_nodes(terminal, "test"));
  // A zero-length step: refused by default; as the last step only with the identity exception.
  auto zero = good;
  zero.back() = zero[zero.size() - 2];
  CHECK_THROWS_WITH(validate_nodes(zero, "test"), Catch::Contains("node 4"));
  CHECK_NOTHROW(validate_nodes(zero, "test", ZeroLengthLastStep::identity));
  CHECK(is_zero_length_step(zero, 3));
  auto two_terminal = terminal;
  two_terminal[two_terminal.size() - 2] = terminal_data_node(0.0, 0.0);
  CHECK_THROWS_WITH(validate_nodes(two_terminal, "test", ZeroLengthLastStep::identity),
                    Catch::Contains("node 4"));
  auto middle = good;
  middle[2] = middle[1];
  CHECK_THROWS_WITH(validate_nodes(middle, "test", ZeroLengthLastStep::identity),
                    Catch::Contains("node 2"));
}

TEST_CASE("Grid errors name the argument that is NaN", "[grid][errors]") {
  const VPLinearSchedule s;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (auto kind : kAllKinds) {
    CHECK_THROWS_WITH(make_grid(s, kind, 10, s.t_max(), nan), Catch::Contains("t_end"));
    CHECK_THROWS_WITH(make_grid(s, kind, 10, nan, s.t_min()), Catch::Contains("t_start"));
  }
}
