// The SDE stepping layer (include/diffgrad/sde/): coefficients of both methods against their
// formulas written here; strong and weak convergence orders of Euler-Maruyama on an
// Ornstein-Uhlenbeck process against its exact transition (strong: the exact solution driven
// by the same Brownian path, built from fine increments whose sums are the coarse noise);
// the running-cost columns against the Gaussian log-density ratio of the path, computed
// here; exact discrete gradients (x_0, theta, with running costs in the loss) against finite
// differences; identical gradients across memory modes; no noise stored; divergence errors.
// Eigen heap allocations are counted (tests/alloc_probe.hpp must precede every Eigen include;
// the define also keeps this file off the shared precompiled header).
#define EIGEN_RUNTIME_NO_MALLOC
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/sde/sde.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
using diffgrad::GradientOptions;
using diffgrad::MemoryMode;
using diffgrad::sde::SdeMethod;
using diffgrad::sde::SdeOptions;
using diffgrad::sde::SdeScheme;

/// f(x, t) = p0 tanh(p1 x + p2 t) + p3 x, elementwise; theta = (p0, p1, p2, p3).
struct TanhDrift {
  Vector theta = Vector::Zero(4);
  std::int64_t param_size() const { return 4; }
  void drift(const State& x, double t, State& out) const {
    out = (theta(0) * (theta(1) * x.array() + theta(2) * t).tanh() + theta(3) * x.array())
              .matrix();
  }
  void drift_vjp(const State& x, double t, const State& a, State& dx, Vector* dp) const {
    const Eigen::ArrayXXd th = (theta(1) * x.array() + theta(2) * t).tanh();
    const Eigen::ArrayXXd sech2 = 1.0 - th.square();
    dx = (a.array() * (theta(0) * theta(1) * sech2 + theta(3))).matrix();
    if (dp) {
      (*dp)(0) += (a.array() * th).sum();
      (*dp)(1) += (a.array() * theta(0) * sech2 * x.array()).sum();
      (*dp)(2) += (a.array() * theta(0) * sech2 * t).sum();
      (*dp)(3) += (a.array() * x.array()).sum();
    }
  }
};

TanhDrift linear_drift(double rate) {
  TanhDrift m;
  m.theta << 0.0, 0.0, 0.0, -rate;
  return m;
}

double slope(const std::vector<double>& n, const std::vector<double>& err) {
  // Least-squares slope of log err against log h = -log n.
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  const double k = static_cast<double>(n.size());
  for (std::size_t i = 0; i < n.size(); ++i) {
    const double x = -std::log(n[i]), y = std::log(err[i]);
    sx += x, sy += y, sxx += x * x, sxy += x * y;
  }
  return (k * sxy - sx * sy) / (k * sxx - sx * sx);
}

} // namespace

TEST_CASE("SdeScheme: step coefficients of both methods", "[sde]") {
  const Backend backend;
  const std::vector<double> times{0.0, 0.1, 0.35, 1.0};
  const auto g = [](double t) { return 0.5 + t; };
  SdeScheme<Backend> em(backend, times, g, 3, {.ou_rate = 2.0});
  SdeScheme<Backend> ex(backend, times, g, 3, {.method = SdeMethod::exponential, .ou_rate = 2.0});
  for (int i = 0; i < 3; ++i) {
    const double t = times[static_cast<std::size_t>(i)];
    const double h = times[static_cast<std::size_t>(i) + 1] - t;
    CHECK(em.decay(i) == Approx(1.0 - 2.0 * h).epsilon(1e-15));
    CHECK(em.drift_weight(i) == Approx(h).epsilon(1e-15));
    CHECK(em.noise_scale(i) == Approx((0.5 + t) * std::sqrt(h)).epsilon(1e-15));
    CHECK(ex.decay(i) == Approx(std::exp(-2.0 * h)).epsilon(1e-14));
    CHECK(ex.drift_weight(i) == Approx((1.0 - std::exp(-2.0 * h)) / 2.0).epsilon(1e-14));
    CHECK(ex.noise_scale(i) ==
          Approx((0.5 + t) * std::sqrt((1.0 - std::exp(-4.0 * h)) / 4.0)).epsilon(1e-14));
  }
  CHECK(em.width() == 3);
  SdeScheme<Backend> aug(backend, times, g, 3, {.running_costs = true});
  CHECK(aug.width() == 5);
  CHECK_THROWS_AS(aug.validate(em.nodes().subspan(0, 3)), diffgrad::invalid_argument);
  CHECK_THROWS_AS(SdeScheme<Backend>(backend, std::vector<double>{0.0, 0.5, 0.5}, 1.0, 1),
                  diffgrad::invalid_argument);
  CHECK_THROWS_AS(SdeScheme<Backend>(backend, times, 0.0, 1, {.running_costs = true}),
                  diffgrad::invalid_argument);
}

TEST_CASE("Euler-Maruyama on an OU process: strong order 1 against the exact solution on the "
          "same Brownian path",
          "[sde][convergence]") {
  // dx = -a x dt + g dW, x_0 = 1, T = 1. The Brownian path is given by F = 1024 fine
  // increments dW_j = sqrt(delta) z_j; the coarse step i uses xi_i = sum_{j in step i} dW_j /
  // sqrt(h) (exactly N(0, 1)). The reference integrates the fine path with the exact OU
  // transition (its stochastic integral with a midpoint weight: strong error O(delta), 1/32
  // of the finest coarse step's).
  const Backend backend;
  const double a = 1.5, g = 0.8, T = 1.0;
  const int fine = 1024, paths = 1500;
  const double delta = T / fine;
  Eigen::MatrixXd dw(paths, fine);
  for (int r = 0; r < paths; ++r)
    for (int j = 0; j < fine; ++j)
      dw(r, j) = std::sqrt(delta) * diffgrad::detail::gaussian(11, static_cast<std::uint64_t>(j),
                                                               static_cast<std::uint64_t>(r));
  Eigen::VectorXd ref = Eigen::VectorXd::Ones(paths);
  for (int j = 0; j < fine; ++j)
    ref = std::exp(-a * delta) * ref + g * std::exp(-a * delta / 2) * dw.col(j);
  auto model = linear_drift(a);
  std::vector<double> ns, errs;
  for (int n : {8, 16, 32, 64}) {
    const int per = fine / n;
    const double h = T / n;
    std::vector<State> noise(static_cast<std::size_t>(n), State(paths, 1));
    for (int i = 0; i < n; ++i)
      noise[static_cast<std::size_t>(i)] = dw.middleCols(i * per, per).rowwise().sum() / std::sqrt(h);
    SdeScheme<Backend> scheme(backend, diffgrad::sde::uniform_times(n, 0.0, T), g, 1);
    State x = State::Ones(paths, 1);
    diffgrad::sde::simulate(scheme, backend, model, x, {}, std::span<const State>(noise));
    const double err = (x.col(0) - ref).cwiseAbs().mean();
    ns.push_back(n);
    errs.push_back(err);
  }
  const double p = slope(ns, errs);
  INFO("strong errors " << errs[0] << " " << errs[1] << " " << errs[2] << " " << errs[3]
                        << ", order " << p);
  CHECK(p > 0.85);
  CHECK(p < 1.15);
}

TEST_CASE("Euler-Maruyama on an OU process: weak order 1 of the mean and variance; the "
          "exponential method is exact in law",
          "[sde][convergence]") {
  const Backend backend;
  const double a = 1.5, g = 0.8, T = 1.0, x0 = 1.0;
  const int batch = 20000, d = 2; // 40000 samples
  const double mean_exact = std::exp(-a * T) * x0;
  const double var_exact = g * g * (1.0 - std::exp(-2.0 * a * T)) / (2.0 * a);
  auto model = linear_drift(a);
  const auto moments = [&](const State& x, double& mean, double& var) {
    const Eigen::Map<const Eigen::ArrayXd> v(x.data(), x.size());
    mean = v.mean();
    var = (v - mean).square().sum() / static_cast<double>(v.size() - 1);
  };
  std::vector<double> ns, errs;
  for (int n : {4, 8, 16}) {
    SdeScheme<Backend> scheme(backend, diffgrad::sde::uniform_times(n, 0.0, T), g, d);
    State x = State::Constant(batch, d, x0);
    diffgrad::sde::simulate(scheme, backend, model, x, {.seed = 5});
    double mean = 0, var = 0;
    moments(x, mean, var);
    ns.push_back(n);
    errs.push_back(std::abs(mean - mean_exact) + std::abs(var - var_exact));
  }
  const double p = slope(ns, errs);
  INFO("weak errors " << errs[0] << " " << errs[1] << " " << errs[2] << ", order " << p);
  CHECK(p > 0.75);
  CHECK(p < 1.25);

  // Exponential method, zero drift network, OU part exact: mean and variance within 4
  // standard errors of the exact law even with 2 steps.
  TanhDrift zero;
  SdeScheme<Backend> ex(backend, diffgrad::sde::uniform_times(2, 0.0, T), g, d,
                        {.method = SdeMethod::exponential, .ou_rate = a});
  State x = State::Constant(batch, d, x0);
  diffgrad::sde::simulate(ex, backend, zero, x, {.seed = 9});
  double mean = 0, var = 0;
  moments(x, mean, var);
  const double m = static_cast<double>(batch * d);
  CHECK(std::abs(mean - mean_exact) < 4.0 * std::sqrt(var_exact / m));
  CHECK(std::abs(var - var_exact) < 4.0 * var_exact * std::sqrt(2.0 / m));
}

TEST_CASE("Running-cost columns are the exact log-density ratio of the Euler chain",
          "[sde][costs]") {
  // -(K_N + M_N) = sum_i log N(x_{i+1}; D x_i, s^2) - log N(x_{i+1}; D x_i + c f_i, s^2),
  // evaluated here from the recorded path and this file's drift formula.
  const Backend backend;
  const int d = 3, batch = 5;
  TanhDrift model;
  model.theta << 0.7, -1.2, 0.4, -0.3;
  for (auto method : {SdeMethod::euler_maruyama, SdeMethod::exponential}) {
    SdeScheme<Backend> scheme(backend, std::vector<double>{0.0, 0.2, 0.3, 0.7, 1.1},
                              [](double t) { return 0.6 + 0.5 * t; }, d,
                              {.method = method, .ou_rate = 0.8, .running_costs = true});
    State x0(batch, d);
    for (int r = 0; r < batch; ++r)
      for (int c = 0; c < d; ++c) x0(r, c) = 0.3 * r - 0.2 * c;
    State x = diffgrad::sde::augment(scheme, x0);
    std::vector<State> path{x};
    diffgrad::sde::simulate(scheme, backend, model, x, {.seed = 3, .row_offset = 17}, {},
                            [&](int, int, const diffgrad::Node&, const State& s) {
                              path.push_back(s);
                            });
    REQUIRE(path.size() == 5);
    Eigen::VectorXd log_ratio = Eigen::VectorXd::Zero(batch);
    for (int i = 0; i < 4; ++i) {
      const State xi = path[static_cast<std::size_t>(i)].leftCols(d);
      const State xn = path[static_cast<std::size_t>(i) + 1].leftCols(d);
      State f;
      model.drift(xi, scheme.times()[static_cast<std::size_t>(i)], f);
      const double s2 = std::pow(scheme.noise_scale(i), 2);
      const State r0 = xn - scheme.decay(i) * xi;
      const State r1 = r0 - scheme.drift_weight(i) * f;
      log_ratio += (r1.rowwise().squaredNorm() - r0.rowwise().squaredNorm()) / (2.0 * s2);
    }
    const Eigen::VectorXd costs = x.col(d) + x.col(d + 1);
    CHECK((costs + log_ratio).cwiseAbs().maxCoeff() < 1e-12 * (1.0 + log_ratio.norm()));
  }
}

TEST_CASE("Running costs with given noise equal those with the same noise from Philox",
          "[sde][costs]") {
  const Backend backend;
  const int d = 2, batch = 3, steps = 5;
  TanhDrift model;
  model.theta << 0.6, 0.9, -0.3, -0.5;
  SdeScheme<Backend> scheme(backend, diffgrad::sde::uniform_times(steps, 0.0, 1.0), 0.8, d,
                            {.running_costs = true});
  std::vector<State> noise(static_cast<std::size_t>(steps), State(batch, d + 2));
  for (int i = 0; i < steps; ++i)
    backend.gaussian(noise[static_cast<std::size_t>(i)], 13, static_cast<std::uint64_t>(i));
  State a = diffgrad::sde::augment(scheme, State::Constant(batch, d, 0.4));
  State b = a;
  diffgrad::sde::simulate(scheme, backend, model, a, {.seed = 13});
  diffgrad::sde::simulate(scheme, backend, model, b, {.seed = 999}, std::span<const State>(noise));
  CHECK((a - b).cwiseAbs().maxCoeff() < 1e-14);
  CHECK(a.col(d + 1).cwiseAbs().maxCoeff() > 0.0);
}

TEST_CASE("SDE gradients with running costs: finite differences, memory modes, no noise stored",
          "[sde][gradient]") {
  const Backend backend;
  const int d = 2, batch = 3, steps = 12;
  TanhDrift model;
  model.theta << 0.9, -0.8, 0.5, -0.4;
  SdeScheme<Backend> scheme(backend, diffgrad::sde::uniform_times(steps, 0.0, 1.5),
                            [](double t) { return 0.7 + 0.2 * t; }, d,
                            {.ou_rate = 0.3, .running_costs = true});
  State x0(batch, d);
  x0 << 0.1, -0.4, 0.8, 0.3, -0.6, 1.1;
  const State start = diffgrad::sde::augment(scheme, x0);
  // L = sum_r (K + 0.5 M + 0.3 |x_N|^2 + w . x_N): every column of the final state enters.
  const auto loss = [&](const Backend&, const State& xn, State& grad) {
    grad.setZero();
    double value = 0;
    for (int r = 0; r < batch; ++r) {
      value += xn(r, d) + 0.5 * xn(r, d + 1);
      grad(r, d) = 1.0;
      grad(r, d + 1) = 0.5;
      for (int c = 0; c < d; ++c) {
        const double w = 0.2 * (c + 1) - 0.1 * r;
        value += 0.3 * xn(r, c) * xn(r, c) + w * xn(r, c);
        grad(r, c) = 0.6 * xn(r, c) + w;
      }
    }
    return value;
  };
  const auto value_at = [&](const Vector& theta, const State& s) {
    TanhDrift m;
    m.theta = theta;
    State x = s;
    diffgrad::sde::simulate(scheme, backend, m, x, {.seed = 21});
    State g(batch, d + 2);
    return loss(backend, x, g);
  };
  GradientOptions opts{.memory = MemoryMode::store_all(), .wrt_params = true, .seed = 21};
  const auto r = diffgrad::sde::sde_gradient(scheme, backend, model, start, loss, opts);
  CHECK(r.loss == Approx(value_at(model.theta, start)).epsilon(1e-14));

  // Fourth-order central differences along random directions (relative error over all).
  double num = 0, den = 0;
  for (int k = 0; k < 4; ++k) {
    Vector v(4);
    State vx = State::Zero(batch, d + 2);
    for (int j = 0; j < 4; ++j) v(j) = diffgrad::detail::gaussian(99, k, j);
    for (int q = 0; q < batch * d; ++q)
      vx(q / d, q % d) = diffgrad::detail::gaussian(98, k, q);
    const double h = 1e-3;
    const auto phi = [&](double s) { return value_at(model.theta + s * v, start + s * vx); };
    const double fd = (8 * (phi(h) - phi(-h)) - (phi(2 * h) - phi(-2 * h))) / (12 * h);
    const double exact = r.grad_params.dot(v) + (r.grad_x.array() * vx.array()).sum();
    num += (fd - exact) * (fd - exact);
    den += exact * exact;
  }
  const double fd_error = std::sqrt(num / den);
  INFO("relative FD error " << fd_error);
  CHECK(fd_error < 1e-7);

  // Identical across memory modes; checkpointing holds at most its snapshots.
  for (auto mode : {MemoryMode::checkpoint(3), MemoryMode::recompute()}) {
    GradientOptions o = opts;
    o.memory = mode;
    const auto q = diffgrad::sde::sde_gradient(scheme, backend, model, start, loss, o);
    CHECK((q.grad_params - r.grad_params).cwiseAbs().maxCoeff() == 0.0);
    CHECK((q.grad_x - r.grad_x).cwiseAbs().maxCoeff() == 0.0);
    CHECK(q.loss == r.loss);
  }
  CHECK(r.cost.peak_stored_states <= steps); // store_all: one state per reversed step

  // Noise never stored: a checkpointed workspace makes the same number of (equal-sized)
  // state buffers for 12 and for 96 steps (counted as Eigen heap allocations), and the
  // snapshots it holds never exceed the budget.
  const auto workspace_buffers = [&](int n) {
    SdeScheme<Backend> s(backend, diffgrad::sde::uniform_times(n, 0.0, 1.5), 0.7, d,
                         {.running_costs = true});
    GradientOptions o = opts;
    o.memory = MemoryMode::checkpoint(4);
    const long before = alloc_probe::eigen_heap_allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    auto ws = diffgrad::sde::make_sde_gradient_workspace(s, backend, model, start, o);
    Eigen::internal::set_is_malloc_allowed(true);
    const long made = alloc_probe::eigen_heap_allocations.load() - before;
    const auto& q = diffgrad::sde::sde_gradient(s, backend, model, start, loss, o, ws);
    CHECK(q.cost.peak_stored_states <= 4);
    return made;
  };
  const long small = workspace_buffers(12), large = workspace_buffers(96);
  CHECK(small > 0);
  CHECK(small == large);
}

TEST_CASE("SDE layer: divergence is reported with its step and sample", "[sde][errors]") {
  const Backend backend;
  struct Exploding {
    void drift(const State& x, double t, State& out) const {
      out = x;
      if (t > 0.45) out(2, 0) = std::nan("");
    }
  } model;
  SdeScheme<Backend> scheme(backend, diffgrad::sde::uniform_times(10, 0.0, 1.0), 1.0, 1,
                            {.running_costs = true});
  State x = diffgrad::sde::augment(scheme, State::Zero(4, 1));
  try {
    diffgrad::sde::simulate(scheme, backend, model, x, {.row_offset = 100});
    FAIL("no error");
  } catch (const diffgrad::numerical_error& e) {
    const std::string what = e.what();
    CHECK(what.find("step 5") != std::string::npos);
    CHECK(what.find("sample 102") != std::string::npos);
  }
}
