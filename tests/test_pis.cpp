// Path Integral Sampler (include/diffgrad/pis/) and the Mlp features it needs.
//   - the closed-form optimal controls (Gaussian, Gaussian mixture) against grad log phi_t
//     computed here by quadrature of phi_t(x) = E[mu_hat / mu^0 (x_T) | x_t = x];
//   - the Euler chain's terminal law under the affine optimal control against its exact
//     mean/variance recursion (written here);
//   - Z_hat = mean(e^{-S}) unbiased (E[Z_hat]/Z = 1 within Monte-Carlo error) for the
//     optimal control, u = 0 and a bad control, N = 10 and 100; log Z_hat's low bias vs
//     Var(w)/(2 n Z^2) (printed); E[-S] = log Z - KL(mu^0 || mu) under u = 0;
//   - exact discrete gradients of the PIS loss (affine control, PIS-NN, PIS-Grad) w.r.t.
//     parameters and x_0 against finite differences, identical across memory modes;
//   - targets' gradients / Hessian-vector products and the Mlp's new shapes against FD;
//   - divergence errors, explicit clipping, reproducible and stoppable training.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#include "diffgrad/detail/philox.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/pis/pis.hpp"

namespace {

using diffgrad::MemoryMode;
using diffgrad::pis::Matrix;
using namespace diffgrad::pis;

constexpr double kPi = std::numbers::pi;

double normal_pdf(double y, double mean, double var) {
  return std::exp(-(y - mean) * (y - mean) / (2.0 * var)) / std::sqrt(2.0 * kPi * var);
}

/// Unit system: d/dx log phi_tau(x) and log phi_tau(x), with phi_tau(x) = int N(y; x, Tu -
/// tau) rho(y) dy, rho = mu_hat / N(0, Tu), by the trapezoid rule on [-30, 30] (spectrally
/// accurate for these smooth, fast-decaying integrands).
void quadrature_phi(const std::function<double(double)>& mu_hat, double tu, double tau, double x,
                    double& grad_log_phi, double& log_phi) {
  const int n = 120000;
  const double lo = -30.0, hi = 30.0, dy = (hi - lo) / n;
  double z0 = 0, z1 = 0;
  for (int k = 0; k <= n; ++k) {
    const double y = lo + dy * k;
    const double w = (k == 0 || k == n) ? 0.5 : 1.0;
    const double f = normal_pdf(y, x, tu - tau) * mu_hat(y) / normal_pdf(y, 0.0, tu);
    z0 += w * f;
    z1 += w * f * (y - x) / (tu - tau);
  }
  grad_log_phi = z1 / z0;
  log_phi = std::log(z0 * dy);
}

Matrix row(double a) { return Matrix::Constant(1, 1, a); }

/// Relative FD error of <grad, v> along random directions, fourth-order central differences.
double directional_fd_error(const std::function<double(const Eigen::VectorXd&)>& f,
                            const Eigen::VectorXd& at, const Eigen::VectorXd& grad,
                            double h = 1e-3, int directions = 4) {
  double num = 0, den = 0;
  for (int k = 0; k < directions; ++k) {
    Eigen::VectorXd v(at.size());
    for (Eigen::Index j = 0; j < at.size(); ++j)
      v(j) = diffgrad::detail::gaussian(4242, static_cast<std::uint64_t>(k),
                                        static_cast<std::uint64_t>(j));
    const auto phi = [&](double s) { return f(at + s * v); };
    const double fd = (8 * (phi(h) - phi(-h)) - (phi(2 * h) - phi(-2 * h))) / (12 * h);
    const double exact = grad.dot(v);
    num += (fd - exact) * (fd - exact);
    den += exact * exact;
  }
  return std::sqrt(num / den);
}

} // namespace

TEST_CASE("Mlp: output size independent of the input, a network of t alone, linear time "
          "embedding, save/load version 2",
          "[pis][mlp]") {
  using diffgrad::models::Mlp;
  using diffgrad::models::MlpConfig;
  for (auto [in, out] : {std::pair{2, 1}, std::pair{0, 3}, std::pair{3, 5}}) {
    MlpConfig c;
    c.dim = in;
    c.output_dim = out;
    c.hidden = {7, 5};
    c.time_frequencies = 3;
    c.time_embedding = diffgrad::models::TimeEmbedding::linear;
    c.activation = diffgrad::models::Activation::tanh;
    Mlp<double> net(c, 3);
    CHECK(net.output_dim() == out);
    CHECK(net.input_size() == in + 6);
    CHECK(net.frequency(1) == Approx(0.1 + (100.0 - 0.1) / 2.0));
    const Matrix x = Matrix::NullaryExpr(4, in, [](Eigen::Index r, Eigen::Index k) {
      return 0.3 * static_cast<double>(r) - 0.2 * static_cast<double>(k) + 0.1;
    });
    Matrix y;
    net.drift(x, 0.37, y);
    REQUIRE(y.rows() == 4);
    REQUIRE(y.cols() == out);
    // VJP vs FD in (x, theta) for the linear loss <a, y>.
    const Matrix a = Matrix::NullaryExpr(4, out, [](Eigen::Index r, Eigen::Index k) {
      return std::sin(1.0 + static_cast<double>(r + 3 * k));
    });
    Matrix dx;
    Eigen::VectorXd dp = Eigen::VectorXd::Zero(net.param_size());
    net.drift_vjp(x, 0.37, a, dx, &dp);
    const Eigen::Index nx = x.size(), np = net.param_size();
    Eigen::VectorXd at(nx + np), grad(nx + np);
    at << Eigen::Map<const Eigen::VectorXd>(x.data(), nx), net.params();
    grad << Eigen::Map<const Eigen::VectorXd>(dx.data(), nx), dp;
    const auto f = [&](const Eigen::VectorXd& p) {
      Mlp<double> m(c, Eigen::VectorXd(p.tail(np)));
      Matrix xx = Eigen::Map<const Matrix>(p.data(), 4, in);
      Matrix yy;
      m.drift(xx, 0.37, yy);
      return (yy.array() * a.array()).sum();
    };
    CHECK(directional_fd_error(f, at, grad, 1e-4) < 1e-8);
    // Save/load round trip (version 2).
    std::stringstream ss;
    net.save(ss);
    CHECK(ss.str().rfind("diffgrad-mlp 2", 0) == 0);
    const Mlp<double> back = Mlp<double>::load(ss);
    CHECK(back.output_dim() == out);
    CHECK(back.config().time_embedding == diffgrad::models::TimeEmbedding::linear);
    CHECK((back.params() - net.params()).cwiseAbs().maxCoeff() == 0.0);
    Matrix y2;
    back.drift(x, 0.37, y2);
    CHECK((y2 - y).cwiseAbs().maxCoeff() == 0.0);
  }
  // Default configurations are still written as version 1.
  std::stringstream ss;
  Mlp<double>(MlpConfig{}, 1).save(ss);
  CHECK(ss.str().rfind("diffgrad-mlp 1\ndim 2\ncond_dim 0\n", 0) == 0);
  MlpConfig bad;
  bad.dim = 0; // no output size given: nothing to predict
  CHECK_THROWS_AS(Mlp<double>(bad), diffgrad::invalid_argument);
}

TEST_CASE("PIS targets: gradients and Hessian-vector products match finite differences",
          "[pis][targets]") {
  const GaussianTarget gauss(Eigen::Vector3d(0.5, -1.0, 0.2), 0.7, 0.4);
  Matrix mm(3, 3);
  mm << 1, 0, -1, -2, 1, 0.5, 0.3, -0.7, 2;
  const GaussianMixtureTarget mix(mm, {0.6, 0.9, 1.3}, {0.2, 0.5, 0.3}, -0.3);
  const FunnelTarget funnel(3, 3.0);
  const auto check = [](const auto& t) {
    const Eigen::Index d = t.dim();
    Matrix x(2, d);
    for (Eigen::Index k = 0; k < x.size(); ++k) x.data()[k] = 0.4 * std::sin(1.7 * static_cast<double>(k) + 0.3);
    Matrix g, hv;
    t.grad_log_density(x, g);
    const Matrix v = Matrix::NullaryExpr(2, d, [](Eigen::Index r, Eigen::Index k) {
      return std::cos(0.9 * static_cast<double>(r + 2 * k));
    });
    t.hvp_log_density(x, v, hv);
    const Eigen::Map<const Eigen::VectorXd> at(x.data(), x.size());
    const auto logp_sum = [&](const Eigen::VectorXd& p) {
      Eigen::VectorXd lp;
      t.log_density(Eigen::Map<const Matrix>(p.data(), 2, d), lp);
      return lp.sum();
    };
    CHECK(directional_fd_error(logp_sum, at, Eigen::Map<const Eigen::VectorXd>(g.data(), g.size())) <
          1e-8);
    const auto gv = [&](const Eigen::VectorXd& p) {
      Matrix gg;
      t.grad_log_density(Eigen::Map<const Matrix>(p.data(), 2, d), gg);
      return (gg.array() * v.array()).sum();
    };
    CHECK(directional_fd_error(gv, at, Eigen::Map<const Eigen::VectorXd>(hv.data(), hv.size())) <
          1e-8);
  };
  check(gauss);
  check(mix);
  check(funnel);
  // Normalisation: the 9-mode grid integrates to 1 (log Z = 0), checked by a 2-D sum.
  const auto nine = GaussianMixtureTarget::nine_modes();
  const int n = 600;
  const double lo = -9.0, dy = 18.0 / n;
  Matrix grid((n + 1) * (n + 1), 2);
  for (int i = 0; i <= n; ++i)
    for (int j = 0; j <= n; ++j) grid.row(i * (n + 1) + j) << lo + dy * i, lo + dy * j;
  Eigen::VectorXd lp;
  nine.log_density(grid, lp);
  CHECK(lp.array().exp().sum() * dy * dy == Approx(1.0).epsilon(1e-6));
}

TEST_CASE("PIS: the closed-form optimal controls equal grad log phi_t by quadrature",
          "[pis][optimal]") {
  // Official parameterisation g^2 = 0.2, T = 5: unit horizon Tu = 1, u(t, x) = g u_unit(g^2 t, x).
  const PisConfig config{.dim = 1};
  const double g = config.diffusion, tu = config.prior_variance();
  REQUIRE(tu == Approx(1.0));
  const GaussianTarget gauss(Eigen::VectorXd::Constant(1, 0.5), 0.8, 1.3);
  const GaussianOptimalControl u_gauss(config, gauss);
  Matrix mm(2, 1);
  mm << -1.0, 2.0;
  const GaussianMixtureTarget mix(mm, {0.5, 0.9}, {0.3, 0.7}, 0.4);
  const MixtureOptimalControl u_mix(config, mix);
  const auto mu_gauss = [&](double y) { return std::exp(1.3) * normal_pdf(y, 0.5, 0.64); };
  const auto mu_mix = [&](double y) {
    return std::exp(0.4) * (0.3 * normal_pdf(y, -1.0, 0.25) + 0.7 * normal_pdf(y, 2.0, 0.81));
  };
  double worst = 0;
  for (double t : {0.0, 1.2, 3.1, 4.6})
    for (double x : {-1.5, 0.0, 0.7, 2.2}) {
      double grad = 0, logphi = 0;
      Matrix u;
      quadrature_phi(mu_gauss, tu, g * g * t, x, grad, logphi);
      u_gauss.control(row(x), t, u);
      const auto record = [&](double value) { // NaN-safe: a NaN error is the worst
        const double err = std::abs(value - g * grad) / (1e-3 + std::abs(g * grad));
        if (!(err <= worst)) worst = std::isnan(err) ? INFINITY : err;
      };
      record(u(0, 0));
      quadrature_phi(mu_mix, tu, g * g * t, x, grad, logphi);
      u_mix.control(row(x), t, u);
      record(u(0, 0));
    }
  INFO("worst relative control error " << worst);
  CHECK(worst < 1e-8);
  // log phi_0(0) = log Z.
  double grad = 0, logphi = 0;
  quadrature_phi(mu_gauss, tu, 0.0, 0.0, grad, logphi);
  CHECK(logphi == Approx(1.3).epsilon(1e-9));
  quadrature_phi(mu_mix, tu, 0.0, 0.0, grad, logphi);
  CHECK(logphi == Approx(0.4).epsilon(1e-9));
}

TEST_CASE("PIS: the Euler chain's terminal law under the affine optimal control follows the "
          "exact recursion",
          "[pis][optimal]") {
  // Unit system (dtau = g^2 h): mu_{k+1} = mu_k + dtau (m - kappa mu_k) / (Tu - kappa tau_k),
  // v_{k+1} = (1 - kappa dtau / (Tu - kappa tau_k))^2 v_k + dtau.
  const int n = 20000;
  Eigen::Vector2d m(0.5, -0.3);
  const double s = 0.8;
  for (int steps : {10, 100}) {
    const PisConfig config{.dim = 2, .num_steps = steps};
    const PathIntegralSampler pis(config);
    const GaussianTarget target(m, s, 1.3);
    GaussianOptimalControl control(config, target);
    const double tu = config.prior_variance(), kappa = 1.0 - s * s / tu;
    const double dtau = tu / steps;
    Eigen::Vector2d mean = Eigen::Vector2d::Zero();
    double var = 0;
    for (int k = 0; k < steps; ++k) {
      const double den = tu - kappa * dtau * k;
      mean += dtau * (m - kappa * mean) / den;
      var = std::pow(1.0 - kappa * dtau / den, 2) * var + dtau;
    }
    const PisSamples out = pis.sample(control, target, n, 17);
    for (int c = 0; c < 2; ++c) {
      const double sm = out.x.col(c).mean();
      const double sv = (out.x.col(c).array() - sm).square().sum() / (n - 1);
      CHECK(std::abs(sm - mean(c)) < 4.0 * std::sqrt(var / n));
      CHECK(std::abs(sv - var) < 4.0 * var * std::sqrt(2.0 / n));
    }
    CHECK(mean(0) == Approx(m(0)).epsilon(1e-12)); // the mean is exactly m for any N
  }
}

TEST_CASE("PIS: Z_hat is unbiased for any control and step count; log Z_hat's low bias; the "
          "lower bound under u = 0",
          "[pis][estimators]") {
  // Target Z N(0.5, 0.64) in 1-D, Tu = g^2 T = 1 (s^2 < 2 Tu: finite weight variance for u = 0).
  const double log_z = 1.3, m = 0.5, s = 0.8;
  const GaussianTarget target(Eigen::VectorXd::Constant(1, m), s, log_z);
  const int samples = 40000, group = 100;
  for (int steps : {10, 100}) {
    const PisConfig config{.dim = 1, .num_steps = steps};
    const PathIntegralSampler pis(config);
    GaussianOptimalControl optimal(config, target);
    ZeroControl zero;
    AffineControl bad(1);
    Eigen::VectorXd theta(4);
    theta << 0.4, -0.05, -0.6, 0.1; // pushes away from the target's mean
    bad.set_params(theta);
    const auto run = [&](auto& control, const char* name) {
      const PisSamples out = pis.sample(control, target, samples, 1000 + steps);
      const Eigen::ArrayXd w = (out.log_weights.array() - log_z).exp(); // w / Z
      const double mean = w.mean();
      const double sd = std::sqrt((w - mean).square().sum() / (samples - 1));
      const double se = sd / std::sqrt(static_cast<double>(samples));
      INFO(name << ", N = " << steps << ": E[Z_hat]/Z = " << mean << " +- " << se);
      CHECK(std::abs(mean - 1.0) < 4.0 * se + 1e-12);
      // log Z_hat over groups of n = 100: its bias against -Var(w)/(2 n Z^2).
      double bias = 0, bias_sq = 0;
      const int groups = samples / group;
      for (int k = 0; k < groups; ++k) {
        const auto est = estimate_log_z(out.log_weights.segment(k * group, group));
        bias += est.importance_weighted - log_z;
        bias_sq += std::pow(est.importance_weighted - log_z, 2);
      }
      bias /= groups;
      const double bias_se = std::sqrt((bias_sq / groups - bias * bias) / groups);
      const double predicted = -sd * sd / (2.0 * group);
      std::printf("PIS N=%3d %-8s E[Z_hat]/Z = %.4f +- %.4f   log Z_hat bias (n=%d) = %+.5f +- "
                  "%.5f   -Var(w)/(2nZ^2) = %+.5f   ESS = %.3f\n",
                  steps, name, mean, se, group, bias, bias_se, predicted,
                  estimate_log_z(out.log_weights).ess);
      CHECK(std::abs(bias - predicted) < 4.0 * bias_se + 0.3 * std::abs(predicted));
      return out;
    };
    run(optimal, "optimal");
    const PisSamples z = run(zero, "u=0");
    run(bad, "bad");
    // u = 0: -S = -Psi(x_N), x_N ~ N(0, Tu) exactly: E[-S] = log Z - KL(N(0, Tu) || N(m, s^2)).
    const double kl = std::log(s / std::sqrt(config.prior_variance())) +
                      (config.prior_variance() + m * m) / (2.0 * s * s) - 0.5;
    const double lb = z.log_weights.mean();
    const double lb_se = std::sqrt((z.log_weights.array() - lb).square().sum() / (samples - 1) /
                                   samples);
    CHECK(std::abs(lb - (log_z - kl)) < 4.0 * lb_se);
    CHECK(z.kinetic.cwiseAbs().maxCoeff() == 0.0);
  }
}

TEST_CASE("PIS: exact loss gradients w.r.t. parameters and x_0 match finite differences and "
          "agree across memory modes",
          "[pis][gradient]") {
  Matrix mm(2, 2);
  mm << 1.0, -0.5, -1.2, 0.8;
  const GaussianMixtureTarget target(mm, {0.7, 1.1}, {0.4, 0.6}, 0.2);
  const PisConfig config{.dim = 2, .num_steps = 16};
  const PathIntegralSampler pis(config);
  Matrix x0(3, 2);
  x0 << 0.1, -0.2, 0.3, 0.05, -0.4, 0.25;
  const auto check = [&](auto& control, const char* name) {
    const auto r = pis.loss_gradient(control, target, x0, 77);
    const Eigen::Index np = control.param_size(), nx = x0.size();
    Eigen::VectorXd at(np + nx), grad(np + nx);
    at << control.params(), Eigen::Map<const Eigen::VectorXd>(x0.data(), nx);
    grad << r.grad_params, Eigen::Map<const Eigen::VectorXd>(r.grad_x0.data(), nx);
    const Eigen::VectorXd theta0 = control.params();
    const auto f = [&](const Eigen::VectorXd& p) {
      control.set_params(p.head(np));
      const Matrix x = Eigen::Map<const Matrix>(p.data() + np, 3, 2);
      const double v = pis.loss_gradient(control, target, x, 77).loss;
      control.set_params(theta0);
      return v;
    };
    const double err = directional_fd_error(f, at, grad, 1e-4);
    INFO(name << ": relative FD error " << err);
    CHECK(err < 1e-7);
    for (auto mode : {MemoryMode::checkpoint(3), MemoryMode::recompute()}) {
      const auto q = pis.loss_gradient(control, target, x0, 77, mode);
      CHECK((q.grad_params - r.grad_params).cwiseAbs().maxCoeff() == 0.0);
      CHECK((q.grad_x0 - r.grad_x0).cwiseAbs().maxCoeff() == 0.0);
    }
  };
  AffineControl affine(2);
  Eigen::VectorXd theta(6);
  theta << -0.3, 0.1, 0.4, -0.2, 0.05, 0.15;
  affine.set_params(theta);
  check(affine, "affine a(t) x + b(t)");
  const PisNetOptions small{.hidden = {6}, .time_frequencies = 2,
                            .activation = diffgrad::models::Activation::tanh};
  PisNN nn(2, small, 5);
  Eigen::VectorXd p = nn.params();
  for (Eigen::Index k = 0; k < p.size(); ++k) p(k) += 0.2 * std::sin(1.3 * static_cast<double>(k)); // non-zero output
  nn.set_params(p);
  check(nn, "PIS-NN");
  PisNetOptions exact = small;
  exact.detach_target_gradient = false; // the exact loss gradient (FD-checkable)
  PisGrad<GaussianMixtureTarget> pg(target, exact, 6);
  p = pg.params();
  for (Eigen::Index k = 0; k < p.size(); ++k) p(k) += 0.2 * std::cos(0.7 * static_cast<double>(k));
  pg.set_params(p);
  STATIC_REQUIRE(PisGrad<GaussianMixtureTarget>::has_exact_x_vjp());
  CHECK(pg.uses_exact_x_vjp());
  check(pg, "PIS-Grad");
}

TEST_CASE("PIS: divergence fails loudly; clipping is explicit", "[pis][errors]") {
  struct Exploding {
    void control(const Matrix& x, double t, Matrix& u) const {
      u = Matrix::Zero(x.rows(), x.cols());
      if (t > 2.4) u(3, 1) = std::numeric_limits<double>::infinity();
    }
  } exploding;
  const GaussianTarget target(Eigen::Vector2d(0.0, 0.0), 1.0);
  const PathIntegralSampler pis({.dim = 2, .num_steps = 10});
  try {
    (void)pis.sample(exploding, target, 6, 1, 40);
    FAIL("no error");
  } catch (const diffgrad::numerical_error& e) {
    const std::string what = e.what();
    CHECK(what.find("step 5") != std::string::npos);
    CHECK(what.find("sample 43") != std::string::npos);
  }
  struct Huge {
    void control(const Matrix& x, double, Matrix& u) const {
      u = Matrix::Constant(x.rows(), x.cols(), 1e3);
    }
  } huge;
  const PathIntegralSampler clipped({.dim = 2, .num_steps = 10, .control_clip = 1.0});
  const PisSamples s = clipped.sample(huge, target, 4, 1);
  // |u| = 1 per coordinate: K = d T / 2.
  CHECK(s.kinetic(0) == Approx(2.0 * 5.0 / 2.0).epsilon(1e-13));
  CHECK_THROWS_AS(PathIntegralSampler({.dim = 3}).sample(huge, target, 4, 1),
                  diffgrad::invalid_argument);
}

TEST_CASE("PIS: training is reproducible, lowers the loss and can be stopped", "[pis][train]") {
  const GaussianTarget target(Eigen::VectorXd::Constant(1, 1.0), 0.5);
  const PathIntegralSampler pis({.dim = 1, .num_steps = 20});
  const PisNetOptions small{.hidden = {16}, .time_frequencies = 4};
  const PisTrainOptions train{.iterations = 60, .batch = 64, .learning_rate = 1e-2, .seed = 3};
  PisNN a(1, small, 1), b(1, small, 1);
  const auto ra = pis.train(a, target, train);
  const auto rb = pis.train(b, target, train);
  CHECK((a.params() - b.params()).cwiseAbs().maxCoeff() == 0.0);
  double first = 0, last = 0;
  for (int k = 0; k < 10; ++k) first += ra.losses[static_cast<std::size_t>(k)] / 10;
  for (int k = 50; k < 60; ++k) last += ra.losses[static_cast<std::size_t>(k)] / 10;
  INFO("loss " << first << " -> " << last);
  CHECK(last < first - 0.1);
  PisNN c(1, small, 1);
  const auto rc = pis.train(c, target, train, [](int done, int, double) {
    return done == 3 ? diffgrad::ObserverAction::stop : diffgrad::ObserverAction::proceed;
  });
  CHECK(rc.stopped);
  CHECK(rc.iterations_done == 3);
  CHECK(rc.losses[2] == ra.losses[2]);
}
