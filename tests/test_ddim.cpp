// DDIM: order 1 on the Gaussian problem, exactness for one data point, eta > 0 statistics,
// eta coefficients at vanishing steps against long double, and the exact gradient with
// 0 < eta < 1 against a closed form and central finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "gaussian_data_fd.hpp"
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
  const std::vector<double> grid{1.0, 0.9, 0.31, 0.3, 0.05, 0.002}; // deliberately irregular
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

namespace {

using ld = long double;

/// sum_{n >= 1} h^n / n! = e^h - 1 in long double (series where it converges fast).
ld expm1_ref(ld h) {
  if (std::fabs(h) >= 0.5L) return std::expm1(h);
  ld term = 1, sum = 0;
  for (int n = 1; n <= 60; ++n) sum += (term *= h / n);
  return sum;
}

/// sqrt(1 - u) - 1 in long double: its binomial series for small u, where the difference
/// would cancel.
ld sqrt1m_minus1_ref(ld u) {
  if (u >= 1e-3L) return std::sqrt(1 - u) - 1;
  ld coeff = 1, power = 1, sum = 0; // binom(1/2, n) (-u)^n
  for (int n = 1; n <= 12; ++n) {
    coeff *= (0.5L - (n - 1)) / n;
    power *= -u;
    sum += coeff * power;
  }
  return sum;
}

/// A VP node with half log-SNR exactly lambda.
Node vp_node(double lambda) {
  Node n;
  n.lambda = lambda;
  n.alpha = std::sqrt(1.0 / (1.0 + std::exp(-2.0 * lambda)));
  n.sigma = std::sqrt(1.0 / (1.0 + std::exp(2.0 * lambda)));
  n.t = n.model_t = 0.5;
  return n;
}

double rel_err(double got, ld want) {
  return static_cast<double>(std::fabs((static_cast<ld>(got) - want) / want));
}

} // namespace

TEST_CASE("DDIM eta coefficients are accurate at vanishing steps", "[ddim][coeffs][cancellation]") {
  // x_t = (alpha_t/alpha_s) x_s + eps_coef eps_s + noise_coef xi with q = 1 - e^{-2h},
  //   eps_coef = sigma_t sqrt(1 - eta^2 q) - alpha_t sigma_s/alpha_s
  //            = sigma_t [(sqrt(1 - eta^2 q) - 1) - (e^h - 1)],   noise_coef = eta sigma_t sqrt(q).
  // Both vanish like h: formed as differences of O(1) numbers (1 - exp(-2h), sqrt(...) - e^h)
  // they would lose about log10(1/h) digits, 10 of 16 at h = 1e-10. Reference: the same
  // formulas in long double with series for e^h - 1 and sqrt(1 - u) - 1.
  double worst = 0;
  for (double lambda_s : {-2.5, 0.3, 3.0})
    for (double h_target : {1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-4, 1e-2, 0.5, 3.0})
      for (double eta : {0.1, 0.5, 0.9, 1.0}) {
        const Node s = vp_node(lambda_s), t = vp_node(lambda_s + h_target);
        const ld h = static_cast<ld>(t.lambda) - static_cast<ld>(s.lambda); // exact
        const ld q = -expm1_ref(-2 * h);
        const ld eta2 = static_cast<ld>(eta) * eta;
        const ld eps_ref = t.sigma * (sqrt1m_minus1_ref(eta2 * q) - expm1_ref(h));
        const ld noise_ref = eta * static_cast<ld>(t.sigma) * std::sqrt(q);
        const auto c = coeffs::ddim(s, t, eta);
        const double e_x = rel_err(c.x, static_cast<ld>(t.alpha) / s.alpha);
        const double e_eps = rel_err(c.eps, eps_ref), e_noise = rel_err(c.noise, noise_ref);
        INFO("lambda_s " << lambda_s << ", h " << static_cast<double>(h) << ", eta " << eta
                         << ": relative errors x " << e_x << ", eps " << e_eps << ", noise "
                         << e_noise);
        CHECK(e_x <= 4e-16);
        CHECK(e_eps <= 2e-15);
        CHECK(e_noise <= 2e-15);
        worst = std::max({worst, e_eps, e_noise});
      }
  INFO("worst relative error " << worst);
  CHECK(worst <= 2e-15);
}

namespace {

using StateD = diffgrad::testing::State<double>;

/// L(x0) = <w, x0> + |x0 - r|^2 / 2, dL/dx0 = w + x0 - r.
struct QuadraticLoss {
  StateD w, r;
  double value(const StateD& x0) const {
    return w.cwiseProduct(x0).sum() + 0.5 * (x0 - r).squaredNorm();
  }
  double operator()(const EigenBackend<double>&, const StateD& x0, StateD& grad) const {
    grad = w + x0 - r;
    return value(x0);
  }
};

} // namespace

TEST_CASE("DDIM with 0 < eta < 1: exact gradient = closed form = central finite differences",
          "[ddim][gradient]") {
  // On Gaussian data eps(x) = sigma (x - alpha mu) / v (v = alpha^2 s^2 + sigma^2) is affine in
  // x, so with the noise fixed (Philox, seed 7) each DDIM step is
  //   x_{i+1} = m_i x_i - b_i (sigma_i alpha_i / v_i) mu + n_i xi_i,  m_i = a_i + b_i sigma_i / v_i
  // with a_i, b_i, n_i the DDIM coefficients (written out below from their definition, not
  // taken from the library). Tangents of x_N along x_T, mu and s follow by forward recursion;
  // the library's reverse-mode gradient must match them, and central differences of the
  // sampler itself.
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 12, 1.0, 1e-3));
  const std::uint64_t seed = 7;
  const auto x_T = diffgrad::testing::test_batch<double>(3, 2);
  QuadraticLoss loss{diffgrad::testing::test_batch<double>(3, 2) * 0.7,
                     diffgrad::testing::test_batch<double>(3, 2).reverse() * 0.4};
  for (double eta : {0.3, 0.8}) {
    INFO("eta " << eta);
    auto model = diffgrad::testing::gaussian_problem<double>(2);
    GradientOptions opt;
    opt.seed = seed;
    opt.wrt_cond = opt.wrt_params = true;
    const auto g = gradient(Ddim(eta), backend, schedule, nodes, model, x_T, loss, opt);

    // Closed form by forward-mode recursion.
    const double s_data = model.s();
    const Eigen::RowVectorXd mu = model.mu().transpose();
    StateD x = x_T, dx_ds = StateD::Zero(3, 2), xi(3, 2);
    double dx_dxT = 1.0, dx_dmu = 0.0; // both act as scalars on every element
    for (std::size_t i = 0; i + 1 < nodes.size(); ++i) {
      const Node &s = nodes[i], &t = nodes[i + 1];
      const double h = t.lambda - s.lambda;
      const double q = -std::expm1(-2.0 * h);
      const double a = t.alpha / s.alpha;
      const double b = t.sigma * std::sqrt(1.0 - eta * eta * q) - t.alpha * s.sigma / s.alpha;
      const double n = eta * t.sigma * std::sqrt(q);
      const double v = s.alpha * s.alpha * s_data * s_data + s.sigma * s.sigma;
      const double m = a + b * s.sigma / v;
      const double dv_ds = 2.0 * s.alpha * s.alpha * s_data;
      backend.gaussian(xi, seed, i);
      const StateD centred = x.rowwise() - s.alpha * mu;
      dx_ds = (m * dx_ds - (b * s.sigma * dv_ds / (v * v)) * centred).eval();
      dx_dmu = m * dx_dmu - b * s.sigma * s.alpha / v;
      dx_dxT *= m;
      x = (m * x).rowwise() - (b * s.sigma * s.alpha / v) * mu;
      x += n * xi;
    }
    const StateD g0 = loss.w + x - loss.r; // dL/dx_0
    CHECK(diffgrad::testing::relative_error<double>(g.x0, x) <= 1e-13);
    CHECK(diffgrad::testing::relative_error<double>(g.grad_x, StateD(dx_dxT * g0)) <= 1e-12);
    const Eigen::VectorXd grad_mu = dx_dmu * g0.colwise().sum().transpose();
    CHECK((g.grad_cond - grad_mu).norm() <= 1e-12 * grad_mu.norm());
    const double grad_s = g0.cwiseProduct(dx_ds).sum();
    CHECK(g.grad_params(0) == Approx(grad_s).epsilon(1e-12));

    // Central finite differences of the sampler (Philox noise, same seed), step 1e-5.
    const double fd_h = 1e-5;
    auto L = [&](const StateD& x_start, models::GaussianData<double>& m) {
      StateD y = x_start;
      sample(Ddim(eta), backend, schedule, nodes, m, y, SampleOptions{seed});
      return loss.value(y);
    };
    diffgrad::testing::check_gaussian_data_gradient_fd(
        L, x_T, model, {g.grad_x, g.grad_cond, g.grad_params(0)}, fd_h);
  }
}
