// gDDIM samplers for the blurring diffusion (include/diffgrad/gddim/bdm_sampler.hpp), with the
// DCT adapters (gddim/spectral_field.hpp) and the exact mixture model (models/bdm_mixture.hpp).
// References are written here, independent of the sampler:
//   - one data point: each frequency's PF-ODE solution is y_k(t) = alpha_k(t) y0_k + sigma(t) z_k
//     (z constant), so every deterministic gDDIM run must land on it;
//   - sigma_blur_max = 0: the library's Ddim (eta = 0 and eta = 1 with the same noise);
//   - the multistep coefficients against their integration-by-parts form in long double;
//   - one stochastic step on the single-point marginal: moments over 1e5 samples;
//   - convergence orders against an RK4 solve of the PF-ODE with the mixture's exact eps;
//   - exact discrete gradients against central finite differences, in every memory mode.
// Errors are relative in the max norm unless stated.
#include "alloc_probe.hpp" // first: replaces operator new and hooks Eigen's allocations

#include <Eigen/Core>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/gddim/spectral_field.hpp"
#include "diffgrad/models/bdm_mixture.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "fd_check.hpp"

using diffgrad::ColumnCoeff;
using diffgrad::Node;
using diffgrad::gddim::BdmGddim;
using diffgrad::gddim::BdmGddimOptions;
using diffgrad::gddim::BdmMethod;
using diffgrad::gddim::BdmSchedule;
using diffgrad::gddim::ChannelDct;
using diffgrad::gddim::Dct2d;
using diffgrad::gddim::ImageBatch;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using Backend64 = diffgrad::EigenBackend<double>;
using Scheme = BdmGddim<Backend64>;
using ld = long double;

namespace {

std::vector<double> quadratic_grid(double t0, double t1, int n) {
  std::vector<double> t(static_cast<std::size_t>(n) + 1);
  const double a = std::sqrt(t0), b = std::sqrt(t1);
  for (int i = 0; i <= n; ++i) {
    const double r = a + (b - a) * static_cast<double>(i) / n;
    t[static_cast<std::size_t>(i)] = r * r;
  }
  t.front() = t0;
  t.back() = t1;
  return t;
}

std::vector<double> uniform_grid(double t0, double t1, int n) {
  std::vector<double> t(static_cast<std::size_t>(n) + 1);
  for (int i = 0; i <= n; ++i)
    t[static_cast<std::size_t>(i)] = t0 + (t1 - t0) * static_cast<double>(i) / n;
  t.back() = t1;
  return t;
}

ImageBatch normal_batch(Index rows, Index cols, std::uint64_t seed) {
  ImageBatch x(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      x(r, c) = diffgrad::detail::gaussian(seed, 0, static_cast<std::uint64_t>(r * cols + c));
  return x;
}

double max_rel(const ImageBatch& got, const ImageBatch& ref) {
  return (got - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
}

/// Per-channel 2-D DCT with the library's Dct2d (checked against its defining sum in
/// test_gddim_bdm), one channel block at a time, for references with C channels.
ImageBatch dct_channels(const ImageBatch& x, Index h, Index w, Index channels, bool inverse) {
  const Dct2d dct(h, w);
  ImageBatch out(x.rows(), x.cols());
  for (Index ch = 0; ch < channels; ++ch) {
    const ImageBatch block = x.middleCols(ch * h * w, h * w);
    out.middleCols(ch * h * w, h * w) = inverse ? dct.inverse(block) : dct.forward(block);
  }
  return out;
}

/// Exact eps of one data image under BDM, as a pixel-space noise model:
/// eps = IDCT((DCT(x) - alpha(t) (.) DCT(x0)) / sigma(t)).
struct PointModel {
  const BdmSchedule<>& schedule;
  ImageBatch y0; // DCT of the data image (1 row)
  Index channels = 1;
  void eps(const ImageBatch& x, const Node& n, ImageBatch& out) const {
    const Index h = schedule.height(), w = schedule.width(), k = h * w;
    VectorXd alpha(k);
    schedule.alpha(n.t, alpha);
    const ImageBatch y = dct_channels(x, h, w, channels, false);
    ImageBatch e(x.rows(), x.cols());
    for (Index r = 0; r < x.rows(); ++r)
      for (Index c = 0; c < x.cols(); ++c)
        e(r, c) = (y(r, c) - alpha[c % k] * y0(0, c)) / schedule.sigma(n.t);
    out = dct_channels(e, h, w, channels, true);
  }
};

/// A differentiable pixel-space model with parameters: eps = tanh(x W^T + t c), W d x d,
/// c of length d, params = [W row-major, c]; t the model time / 1000.
struct TanhModel {
  Index d;
  VectorXd theta;
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return static_cast<std::int64_t>(theta.size()); }
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
  w() const {
    return {theta.data(), d, d};
  }
  ImageBatch pre(const ImageBatch& x, double t) const {
    ImageBatch z = x * w().transpose();
    z.rowwise() += (1e-3 * t) * theta.tail(d).transpose();
    return z;
  }
  void eps(const ImageBatch& x, double t, ImageBatch& out) const {
    out = pre(x, t).array().tanh().matrix();
  }
  void vjp(const ImageBatch& x, double t, const ImageBatch& a, ImageBatch& dx, VectorXd* dcond,
           VectorXd* dparams) const {
    (void)dcond;
    const ImageBatch th = pre(x, t).array().tanh().matrix();
    const ImageBatch delta = a.array() * (1.0 - th.array().square());
    if (dparams) {
      Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> dw(
          dparams->data(), d, d);
      dw += delta.transpose() * x;
      dparams->tail(d) += (1e-3 * t) * delta.colwise().sum().transpose();
    }
    dx = delta * w();
  }
};

template <class Fn> void require_throws_naming(const Fn& fn, const std::string& needle) {
  try {
    fn();
    FAIL("expected diffgrad::invalid_argument naming " << needle);
  } catch (const diffgrad::invalid_argument& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

/// Least-squares slope of log(err) against log(n).
double fitted_slope(const std::vector<double>& n, const std::vector<double>& err) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  const double m = static_cast<double>(n.size());
  for (std::size_t i = 0; i < n.size(); ++i) {
    const double x = std::log(n[i]), y = std::log(err[i]);
    sx += x, sy += y, sxx += x * x, sxy += x * y;
  }
  return (m * sxy - sx * sy) / (m * sxx - sx * sx);
}

} // namespace

// ---------------------------------------------------------------------- coefficients

TEST_CASE("bdm sampler: multistep coefficients sum to C_k and match their integral by parts",
          "[gddim][bdm][sampler]") {
  // Reference, in long double and written from the formulas (not the library): with
  // e(r) = sigma(r)/alpha_k(r) = exp(-lambda_k(r)) the integrand is alpha_k(t) l_j(r) e'(r),
  // so by parts C_j = alpha_k(t) ([l_j e]_s^t - int_s^t l_j'(r) e(r) dr).
  const Index h = 4, w = 4, n = h * w;
  const BdmSchedule<> schedule(h, w);
  const ld pi = 3.141592653589793238462643383279502884L;
  const auto alpha_ref = [&](Index k, ld t) {
    const ld theta = (t + 0.004L) / 1.008L * pi / 2.0L;
    const ld sn = std::sin(pi * t / 2.0L), sb = 10.0L * sn * sn, tau = sb * sb / 2.0L;
    const ld i = static_cast<ld>(k / w), j = static_cast<ld>(k % w);
    const ld lam = pi * pi * (i * i + j * j) / 16.0L;
    return std::cos(theta) * ((1.0L - 0.001L) * std::exp(-lam * tau) + 0.001L);
  };
  const auto sigma_ref = [&](ld t) { return std::sin((t + 0.004L) / 1.008L * pi / 2.0L); };
  struct Case {
    std::vector<double> points;
    double t;
  };
  const std::vector<Case> cases = {{{0.5, 0.6}, 0.45},
                                   {{0.3, 0.4, 0.5}, 0.2},
                                   {{0.9, 0.95, 0.99}, 0.8},
                                   {{0.05, 0.07, 0.1}, 0.03},
                                   {{0.2, 0.2 + 1e-4, 0.2 + 3e-4}, 0.2 - 1e-4}};
  double worst_sum = 0.0, worst_ref = 0.0;
  for (const auto& cs : cases) {
    const auto q = static_cast<Index>(cs.points.size());
    MatrixXd c(q, n);
    schedule.multistep_coeffs(cs.points, cs.t, c);
    const auto closed = schedule.ddim_coeffs(cs.points[0], cs.t);
    const VectorXd sum = c.colwise().sum().transpose();
    worst_sum =
        std::max(worst_sum, ((sum - closed.eps).array() / closed.eps.array()).abs().maxCoeff());
    for (Index k = 0; k < n; k += 5) {
      for (Index j = 0; j < q; ++j) {
        // l_j and l_j' on the points, in long double.
        const auto lj = [&](ld r) {
          ld p = 1.0L;
          for (Index m = 0; m < q; ++m)
            if (m != j)
              p *= (r - cs.points[static_cast<std::size_t>(m)]) /
                   (ld(cs.points[static_cast<std::size_t>(j)]) -
                    cs.points[static_cast<std::size_t>(m)]);
          return p;
        };
        const auto dlj = [&](ld r) {
          ld acc = 0.0L;
          for (Index m = 0; m < q; ++m) {
            if (m == j) continue;
            ld p = 1.0L / (ld(cs.points[static_cast<std::size_t>(j)]) -
                           cs.points[static_cast<std::size_t>(m)]);
            for (Index o = 0; o < q; ++o)
              if (o != j && o != m)
                p *= (r - cs.points[static_cast<std::size_t>(o)]) /
                     (ld(cs.points[static_cast<std::size_t>(j)]) -
                      cs.points[static_cast<std::size_t>(o)]);
            acc += p;
          }
          return acc;
        };
        const auto e = [&](ld r) { return sigma_ref(r) / alpha_ref(k, r); };
        const ld s = cs.points[0], t = cs.t;
        // Composite 8-point Gauss-Legendre on 400 panels (the integrand is smooth).
        static const ld gx[4] = {0.1834346424956498049394761L, 0.5255324099163289858177390L,
                                 0.7966664774136267395915539L, 0.9602898564975362316835609L};
        static const ld gw[4] = {0.3626837833783619829651504L, 0.3137066458778872873379622L,
                                 0.2223810344533744705443560L, 0.1012285362903762591525314L};
        ld integral = 0.0L;
        const int panels = 400;
        for (int p = 0; p < panels; ++p) {
          const ld a = s + (t - s) * p / panels, b = s + (t - s) * (p + 1) / panels;
          const ld mid = (a + b) / 2.0L, rad = (b - a) / 2.0L;
          for (int g = 0; g < 4; ++g)
            integral += rad * gw[g] *
                        (dlj(mid - rad * gx[g]) * e(mid - rad * gx[g]) +
                         dlj(mid + rad * gx[g]) * e(mid + rad * gx[g]));
        }
        const ld ref = alpha_ref(k, t) * (lj(t) * e(t) - lj(s) * e(s) - integral);
        worst_ref =
            std::max(worst_ref,
                     static_cast<double>(std::abs((c(j, k) - ref) / std::abs(ld(closed.eps[k])))));
      }
    }
  }
  INFO("max |sum_j C_j - C_k| / |C_k| = " << worst_sum
                                          << ", max |C_j - ref| / |C_k| = " << worst_ref);
  CHECK(worst_sum <= 1e-12);
  CHECK(worst_ref <= 1e-11);
  WARN("multistep coefficients: sum vs C_k " << worst_sum << ", vs integral by parts "
                                             << worst_ref);
}

TEST_CASE("bdm sampler: stochastic coefficients: l = 0 is the deterministic step, closed forms",
          "[gddim][bdm][sampler]") {
  const BdmSchedule<> schedule(4, 4);
  const Index n = schedule.size();
  VectorXd x(n), e(n), noise(n), x0(n), e0(n), h(n);
  schedule.ddim_coeffs(0.7, 0.5, x0, e0);
  schedule.stochastic_coeffs(0.7, 0.5, 0.0, x, e, noise);
  CHECK(x == x0);
  CHECK(e == e0);
  CHECK(noise.cwiseAbs().maxCoeff() == 0.0);
  // l = 0.6: P_k = sigma_t^2 - Psi_hat_k^2 sigma_s^2 with Psi_hat = (sigma_t/sigma_s) e^{-l^2 h}
  // (marginal preservation), mean coefficient (Psi_hat - Psi) sigma_s.
  schedule.stochastic_coeffs(0.7, 0.5, 0.6, x, e, noise);
  VectorXd lam_s(n), lam_t(n);
  schedule.log_snr(0.7, lam_s);
  schedule.log_snr(0.5, lam_t);
  const double ss = schedule.sigma(0.7), st = schedule.sigma(0.5);
  double worst = 0.0;
  for (Index k = 0; k < n; ++k) {
    const double hk = lam_t[k] - lam_s[k];
    const double psi_hat = st / ss * std::exp(-0.36 * hk);
    worst = std::max(worst, std::abs(e[k] - (psi_hat - x0[k]) * ss) / std::abs(e[k]));
    worst =
        std::max(worst, std::abs(noise[k] * noise[k] - (st * st - psi_hat * psi_hat * ss * ss)) /
                            (noise[k] * noise[k]));
  }
  CHECK(worst <= 1e-13);
}

// ---------------------------------------------------------------------- single data point

TEST_CASE("bdm sampler: one data point: deterministic gDDIM q = 1..3 is exact for any N",
          "[gddim][bdm][sampler]") {
  const Backend64 backend;
  const Index h = 8, w = 8;
  const BdmSchedule<> schedule(h, w);
  double worst = 0.0;
  for (const Index channels : {Index(1), Index(2)}) {
    const Index dim = channels * h * w;
    ImageBatch u0(1, dim);
    for (Index p = 0; p < dim; ++p) u0(0, p) = std::sin(0.3 * static_cast<double>(p)) + 0.2;
    const ImageBatch y0 = dct_channels(u0, h, w, channels, false);
    PointModel model{schedule, y0, channels};
    const ImageBatch z = normal_batch(3, dim, 11);
    const double t0 = 0.9, t1 = 1e-3;
    VectorXd a0(h * w), a1(h * w);
    schedule.alpha(t0, a0);
    schedule.alpha(t1, a1);
    ImageBatch yT(3, dim), yref(3, dim);
    for (Index r = 0; r < 3; ++r)
      for (Index c = 0; c < dim; ++c) {
        yT(r, c) = a0[c % (h * w)] * y0(0, c) + schedule.sigma(t0) * z(r, c);
        yref(r, c) = a1[c % (h * w)] * y0(0, c) + schedule.sigma(t1) * z(r, c);
      }
    const ImageBatch xT = dct_channels(yT, h, w, channels, true);
    const ImageBatch xref = dct_channels(yref, h, w, channels, true);
    for (const int steps : {1, 2, 5, 20}) {
      if (channels == 2 && steps != 5) continue;
      const auto times = quadratic_grid(t0, t1, steps);
      for (const int q : {1, 2, 3}) {
        const Scheme scheme(backend, schedule, times, {.order = q, .channels = channels});
        ImageBatch x = xT;
        const auto r = diffgrad::gddim::sample_bdm(scheme, backend, model, x);
        CHECK(r.steps_taken == steps);
        const double err = max_rel(x, xref);
        INFO("C = " << channels << ", N = " << steps << ", q = " << q << ": " << err);
        CHECK(err <= 1e-10);
        worst = std::max(worst, err);
      }
    }
  }
  WARN("single point, max relative error over N = 1, 2, 5, 20 and q = 1..3: " << worst);
}

// ---------------------------------------------------------------------- reductions

TEST_CASE("bdm sampler: sigma_blur_max = 0 is the library's DDIM (eta = 0 and eta = 1)",
          "[gddim][bdm][sampler]") {
  const Backend64 backend;
  const Index h = 4, w = 3, dim = h * w;
  const BdmSchedule<> schedule(h, w, 0.0);
  const auto& vp = schedule.vp();
  ImageBatch means(3, dim);
  for (Index k = 0; k < 3; ++k)
    for (Index p = 0; p < dim; ++p) means(k, p) = std::cos(1.3 * static_cast<double>(k * dim + p));
  const diffgrad::models::GaussianMixture<double> model(means, VectorXd::Constant(3, 0.2));
  const auto times = quadratic_grid(vp.t_start(), 1e-3, 12);
  std::vector<Node> nodes;
  for (const double t : times) nodes.push_back(vp.node(t));
  const ImageBatch xT = normal_batch(4, dim, 5);

  // eta = 0
  ImageBatch x_ddim = xT, x_bdm = xT;
  diffgrad::SamplerWorkspace<Backend64> ws(backend, 0, 1, 4, dim);
  diffgrad::run_scheme(diffgrad::Ddim(0.0), backend, std::span<const Node>(nodes),
                       diffgrad::NodeAtLambda(vp), diffgrad::EpsField<const decltype(model)>{model},
                       x_ddim, ws);
  const Scheme scheme(backend, schedule, times);
  diffgrad::gddim::sample_bdm(scheme, backend, model, x_bdm);
  const double err0 = max_rel(x_bdm, x_ddim);
  INFO("eta = 0: " << err0);
  CHECK(err0 <= 1e-13);

  // eta = 1 vs stochasticity 1 with the same noise: xi in the DCT basis for BDM, its IDCT
  // (the same standard normal draw, in pixels) for DDIM.
  std::vector<ImageBatch> xi_spec, xi_pix;
  for (int i = 0; i < 12; ++i) {
    xi_spec.push_back(normal_batch(4, dim, 100 + static_cast<std::uint64_t>(i)));
    xi_pix.push_back(dct_channels(xi_spec.back(), h, w, 1, true));
  }
  x_ddim = xT;
  x_bdm = xT;
  ws.given_noise = xi_pix;
  diffgrad::run_scheme(diffgrad::Ddim(1.0), backend, std::span<const Node>(nodes),
                       diffgrad::NodeAtLambda(vp), diffgrad::EpsField<const decltype(model)>{model},
                       x_ddim, ws);
  const Scheme ancestral(backend, schedule, times, {.stochasticity = 1.0});
  CHECK(ancestral.stochastic());
  diffgrad::gddim::sample_bdm(ancestral, backend, model, x_bdm, {},
                              std::span<const ImageBatch>(xi_spec));
  const double err1 = max_rel(x_bdm, x_ddim);
  INFO("eta = 1: " << err1);
  CHECK(err1 <= 1e-13);
  WARN("sigma_blur_max = 0 vs Ddim: eta 0 " << err0 << ", eta 1 (same noise) " << err1);
}

// ---------------------------------------------------------------------- stochastic moments

TEST_CASE("bdm sampler: one stochastic step maps the single-point marginal to the next one",
          "[gddim][bdm][sampler]") {
  // Data: one image; y_s ~ N(alpha_k(s) y0, sigma_s^2) per frequency (the Gaussian kernel).
  // One stochastic gDDIM step with the exact eps must give N(alpha_k(t) y0, sigma_t^2):
  // means within 5 standard errors (sigma_t / sqrt(n)), variances within 5 standard errors
  // (sigma_t^2 sqrt(2 / (n - 1))), per frequency, n = 1e5 samples, Philox noise of the engine.
  const Backend64 backend;
  const Index h = 4, w = 4, k = h * w, samples = 100000;
  const BdmSchedule<> schedule(h, w);
  VectorXd y0(k);
  for (Index c = 0; c < k; ++c) y0[c] = 0.5 * std::cos(0.7 * static_cast<double>(c));
  for (const double l : {0.3, 1.0}) {
    for (const auto& [s, t] : {std::pair{0.8, 0.5}, std::pair{0.3, 0.25}}) {
      VectorXd as(k), at(k);
      schedule.alpha(s, as);
      schedule.alpha(t, at);
      const double ss = schedule.sigma(s), st = schedule.sigma(t);
      ImageBatch y = normal_batch(samples, k, 77);
      for (Index r = 0; r < samples; ++r)
        y.row(r) = (as.cwiseProduct(y0) + ss * y.row(r).transpose()).transpose();
      const std::vector<double> times{s, t};
      const Scheme scheme(backend, schedule, times, {.stochasticity = l});
      diffgrad::SamplerWorkspace<Backend64> ws(backend, 0, 1, samples, k);
      auto field = [&](const ImageBatch& u, const Node& n, ImageBatch& out) {
        VectorXd a(k);
        schedule.alpha(n.t, a);
        out = (u.rowwise() - a.cwiseProduct(y0).transpose()) / schedule.sigma(n.t);
      };
      diffgrad::run_scheme(scheme, backend, scheme.nodes(), Scheme::node_at_lambda(), field, y, ws,
                           {.seed = 2024});
      const VectorXd mean = y.colwise().mean().transpose();
      const VectorXd var =
          (y.rowwise() - mean.transpose()).array().square().colwise().sum().transpose() /
          static_cast<double>(samples - 1);
      const double n = static_cast<double>(samples);
      double worst_mean = 0.0, worst_var = 0.0;
      for (Index c = 0; c < k; ++c) {
        worst_mean = std::max(worst_mean, std::abs(mean[c] - at[c] * y0[c]) / (st / std::sqrt(n)));
        worst_var =
            std::max(worst_var, std::abs(var[c] - st * st) / (st * st * std::sqrt(2.0 / (n - 1))));
      }
      INFO("l = " << l << ", step " << s << " -> " << t << ": mean " << worst_mean
                  << " SE, variance " << worst_var << " SE");
      CHECK(worst_mean <= 5.0);
      CHECK(worst_var <= 5.0);
      WARN("stochastic step l = " << l << ", " << s << " -> " << t << ": worst mean " << worst_mean
                                  << " SE, worst variance " << worst_var << " SE");
    }
  }
}

// ---------------------------------------------------------------------- mixture model

TEST_CASE("bdm mixture: eps is -sigma times the gradient of the per-frequency log density",
          "[gddim][bdm][sampler]") {
  // Reference: log p_t(y) written here per frequency in the DCT basis, differentiated by
  // central differences (step 1e-5, error ~1e-10 relative).
  const Index h = 3, w = 4, k = h * w, channels = 2, dim = channels * k;
  const BdmSchedule<> schedule(h, w);
  ImageBatch means(2, dim);
  for (Index m = 0; m < 2; ++m)
    for (Index p = 0; p < dim; ++p) means(m, p) = std::sin(0.9 * static_cast<double>(m * dim + p));
  const VectorXd stds{{0.3, 0.0}}, weights{{1.0, 3.0}};
  const diffgrad::models::BdmGaussianMixture<> model(schedule, means, stds, weights, channels);
  const ImageBatch nu = dct_channels(means, h, w, channels, false);
  const double t = 0.4;
  VectorXd alpha(k);
  schedule.alpha(t, alpha);
  const double sigma = schedule.sigma(t);
  const auto log_p = [&](const Eigen::RowVectorXd& y) {
    double acc = 0.0;
    for (Index m = 0; m < 2; ++m) {
      double r = std::log(weights[m] / 4.0);
      for (Index c = 0; c < dim; ++c) {
        const double a = alpha[c % k], v = a * a * stds[m] * stds[m] + sigma * sigma;
        r += -0.5 * std::log(2.0 * std::numbers::pi * v) -
             0.5 * (y[c] - a * nu(m, c)) * (y[c] - a * nu(m, c)) / v;
      }
      acc += std::exp(r);
    }
    return std::log(acc);
  };
  const ImageBatch y = normal_batch(2, dim, 3) * 0.5;
  ImageBatch eps;
  model.eps_spectral(y, t, eps);
  ImageBatch ref(2, dim);
  for (Index r = 0; r < 2; ++r)
    for (Index c = 0; c < dim; ++c) {
      Eigen::RowVectorXd yp = y.row(r), ym = y.row(r);
      yp[c] += 1e-5;
      ym[c] -= 1e-5;
      ref(r, c) = -sigma * (log_p(yp) - log_p(ym)) / 2e-5;
    }
  CHECK(max_rel(eps, ref) <= 1e-8);
  // The pixel-space model is the same field seen through the DCT.
  ImageBatch eps_pix;
  const ImageBatch x = dct_channels(y, h, w, channels, true);
  model.eps(x, Node{t, 0.0, 0.0, 0.0, 0.0}, eps_pix);
  CHECK(max_rel(eps_pix, dct_channels(eps, h, w, channels, true)) <= 1e-14);
}

TEST_CASE("bdm sampler: convergence orders q = 1, 2, 3 on the mixture model",
          "[gddim][bdm][sampler]") {
  // Reference: classical RK4 in t on the per-frequency PF-ODE dy/dt = F_k y + G_k^2/(2 sigma)
  // eps(y, t), 20000 steps, with the mixture's exact eps. Error: max-norm relative.
  const Backend64 backend;
  const Index h = 4, w = 4, k = h * w;
  const BdmSchedule<> schedule(h, w);
  ImageBatch means(3, k);
  for (Index m = 0; m < 3; ++m)
    for (Index p = 0; p < k; ++p)
      means(m, p) = std::sin(1.7 * static_cast<double>(m * k + p) + 0.4);
  const diffgrad::models::BdmGaussianMixture<> model(schedule, means, VectorXd::Constant(3, 0.4));
  const double t0 = 0.9, t1 = 0.1;
  const ImageBatch yT = normal_batch(4, k, 9);

  const auto rhs = [&](double t, const ImageBatch& y) {
    VectorXd f(k), g2(k);
    schedule.drift(t, f);
    schedule.diffusion2(t, g2);
    ImageBatch e;
    model.eps_spectral(y, t, e);
    ImageBatch out(y.rows(), k);
    for (Index r = 0; r < y.rows(); ++r)
      for (Index c = 0; c < k; ++c)
        out(r, c) = f[c] * y(r, c) + g2[c] / (2.0 * schedule.sigma(t)) * e(r, c);
    return out;
  };
  ImageBatch ref = yT;
  const int rk_steps = 20000;
  for (int i = 0; i < rk_steps; ++i) {
    const double t = t0 + (t1 - t0) * i / rk_steps, dt = (t1 - t0) / rk_steps;
    const ImageBatch k1 = rhs(t, ref), k2 = rhs(t + dt / 2, ref + dt / 2 * k1),
                     k3 = rhs(t + dt / 2, ref + dt / 2 * k2), k4 = rhs(t + dt, ref + dt * k3);
    ref += dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4);
  }
  const ImageBatch ref_pix = dct_channels(ref, h, w, 1, true);
  const ImageBatch xT = dct_channels(yT, h, w, 1, true);
  const std::vector<double> ns{80, 160, 320, 640};
  // q = 1..3: gDDIM; q = 0 stands for the Euler PF-ODE baseline (first order).
  for (const int q : {1, 2, 3, 0}) {
    std::vector<double> errs;
    for (const double n : ns) {
      const BdmGddimOptions options =
          q == 0 ? BdmGddimOptions{.method = BdmMethod::euler} : BdmGddimOptions{.order = q};
      const Scheme scheme(backend, schedule, uniform_grid(t0, t1, static_cast<int>(n)), options);
      ImageBatch x = xT;
      diffgrad::gddim::sample_bdm(scheme, backend, model, x);
      errs.push_back(max_rel(x, ref_pix));
    }
    const double slope = -fitted_slope(ns, errs);
    INFO("q = " << q << ": errors " << errs[0] << " " << errs[1] << " " << errs[2] << " " << errs[3]
                << ", slope " << slope);
    CHECK(std::abs(slope - std::max(q, 1)) <= 0.2);
    WARN("convergence q = " << q << ": N = 80..640 errors " << errs[0] << ", " << errs[1] << ", "
                            << errs[2] << ", " << errs[3] << "; fitted order " << slope);
  }
}

// ---------------------------------------------------------------------- gradients

TEST_CASE("bdm sampler: exact discrete gradient vs finite differences, every memory mode",
          "[gddim][bdm][sampler][gradient]") {
  const Backend64 backend;
  const Index h = 2, w = 3, channels = 2, dim = channels * h * w;
  const BdmSchedule<> schedule(h, w);
  TanhModel model{dim, VectorXd(dim * dim + dim)};
  for (Index p = 0; p < model.theta.size(); ++p)
    model.theta[p] = 0.4 * std::sin(1.1 * static_cast<double>(p) + 0.3);
  const auto times = quadratic_grid(0.9, 0.2, 6);
  const ImageBatch xT = normal_batch(2, dim, 21);
  const ImageBatch cot = normal_batch(2, dim, 22);
  // Ridders' extrapolation starts at 1e-3 (not 0.05): one long deblurring step amplifies
  // some frequencies ~1e3, so larger steps leave the region where the map is near-linear.
  const diffgrad::testing::FdOptions fd_options{.ridders_step = 1e-3};
  struct Config {
    const char* name;
    BdmGddimOptions options;
  };
  const std::vector<Config> configs{
      {"gDDIM q = 3", {.order = 3, .channels = channels}},
      {"gDDIM l = 0.5", {.stochasticity = 0.5, .channels = channels}},
      {"Euler-Maruyama l = 0.7",
       {.stochasticity = 0.7, .method = BdmMethod::euler, .channels = channels}}};
  for (const auto& cfg : configs) {
    const Scheme scheme(backend, schedule, times, cfg.options);
    const diffgrad::SampleOptions sample_options{.seed = 5};
    const auto forward = [&](const ImageBatch& x_T) {
      ImageBatch x = x_T;
      diffgrad::gddim::sample_bdm(scheme, backend, model, x, sample_options);
      return x;
    };
    std::vector<ImageBatch> grads_x, grads_p;
    for (const auto memory :
         {diffgrad::MemoryMode::store_all(), diffgrad::MemoryMode::checkpoint(2),
          diffgrad::MemoryMode::recompute()}) {
      const diffgrad::GradientOptions options{.memory = memory, .wrt_params = true, .seed = 5};
      const auto r = diffgrad::gddim::gradient_bdm(scheme, backend, model, xT, cot, options);
      CHECK(max_rel(r.x0, forward(xT)) == 0.0);
      grads_x.push_back(r.grad_x);
      grads_p.push_back(ImageBatch(r.grad_params.transpose()));
    }
    CHECK(grads_x[0] == grads_x[1]);
    CHECK(grads_x[0] == grads_x[2]);
    CHECK(grads_p[0] == grads_p[1]);
    CHECK(grads_p[0] == grads_p[2]);
    // x_T
    const auto check_x = diffgrad::testing::check_vjp(
        [&](const VectorXd& in, VectorXd& out) {
          out = diffgrad::testing::flatten(forward(diffgrad::testing::unflatten(in, 2, dim)));
        },
        [&](const VectorXd& in, const VectorXd& wv) {
          const ImageBatch c = diffgrad::testing::unflatten(wv, 2, dim);
          const auto r = diffgrad::gddim::gradient_bdm(
              scheme, backend, model, ImageBatch(diffgrad::testing::unflatten(in, 2, dim)), c,
              diffgrad::GradientOptions{.seed = 5});
          return diffgrad::testing::flatten(r.grad_x);
        },
        diffgrad::testing::flatten(xT), fd_options);
    // parameters
    const VectorXd saved = model.theta;
    const auto check_p = diffgrad::testing::check_vjp(
        [&](const VectorXd& in, VectorXd& out) {
          model.theta = in;
          out = diffgrad::testing::flatten(forward(xT));
          model.theta = saved;
        },
        [&](const VectorXd& in, const VectorXd& wv) {
          model.theta = in;
          const ImageBatch c = diffgrad::testing::unflatten(wv, 2, dim);
          const auto r = diffgrad::gddim::gradient_bdm(
              scheme, backend, model, xT, c,
              diffgrad::GradientOptions{.wrt_params = true, .seed = 5});
          model.theta = saved;
          return VectorXd(r.grad_params);
        },
        saved, fd_options);
    INFO(cfg.name << ": x_T fd " << check_x.fd_error << " dot " << check_x.dot_product_error
                  << "; params fd " << check_p.fd_error << " dot " << check_p.dot_product_error);
    CHECK(check_x.fd_error <= 1e-7);
    CHECK(check_p.fd_error <= 1e-7);
    CHECK(check_x.dot_product_error <= 1e-9);
    CHECK(check_p.dot_product_error <= 1e-9);
    WARN(cfg.name << ": FD error x_T " << check_x.fd_error << ", params " << check_p.fd_error
                  << "; dot-product " << check_x.dot_product_error << ", "
                  << check_p.dot_product_error);
  }
}

TEST_CASE("bdm sampler: gradient w.r.t. the given noise (DCT basis) vs finite differences",
          "[gddim][bdm][sampler][gradient]") {
  const Backend64 backend;
  const Index h = 2, w = 2, dim = h * w;
  const BdmSchedule<> schedule(h, w);
  TanhModel model{dim, VectorXd(dim * dim + dim)};
  for (Index p = 0; p < model.theta.size(); ++p)
    model.theta[p] = 0.5 * std::cos(0.9 * static_cast<double>(p));
  const auto times = quadratic_grid(0.9, 0.2, 4);
  const Scheme scheme(backend, schedule, times, {.stochasticity = 0.8});
  const ImageBatch xT = normal_batch(2, dim, 31), cot = normal_batch(2, dim, 32);
  std::vector<ImageBatch> noise;
  for (int i = 0; i < 4; ++i)
    noise.push_back(normal_batch(2, dim, 40 + static_cast<std::uint64_t>(i)));
  const auto pack = [&](const std::vector<ImageBatch>& v) {
    VectorXd out(static_cast<Index>(v.size()) * 2 * dim);
    for (std::size_t i = 0; i < v.size(); ++i)
      out.segment(static_cast<Index>(i) * 2 * dim, 2 * dim) = diffgrad::testing::flatten(v[i]);
    return out;
  };
  const auto unpack = [&](const VectorXd& in) {
    std::vector<ImageBatch> v;
    for (Index i = 0; i < 4; ++i)
      v.push_back(diffgrad::testing::unflatten(in.segment(i * 2 * dim, 2 * dim), 2, dim));
    return v;
  };
  const diffgrad::GradientOptions options{.wrt_noise = true};
  const auto check = diffgrad::testing::check_vjp(
      [&](const VectorXd& in, VectorXd& out) {
        const auto xi = unpack(in);
        ImageBatch x = xT;
        diffgrad::gddim::sample_bdm(scheme, backend, model, x, {}, std::span<const ImageBatch>(xi));
        out = diffgrad::testing::flatten(x);
      },
      [&](const VectorXd& in, const VectorXd& wv) {
        const auto xi = unpack(in);
        auto ws = diffgrad::gddim::make_bdm_gradient_workspace(scheme, backend, model, xT, options);
        ws.given_noise = xi;
        const ImageBatch c = diffgrad::testing::unflatten(wv, 2, dim);
        const auto& r = diffgrad::gddim::gradient_bdm(scheme, backend, model, xT, c, options, ws);
        return pack(r.grad_noise);
      },
      pack(noise), diffgrad::testing::FdOptions{.ridders_step = 1e-3});
  INFO("noise: fd " << check.fd_error << ", dot " << check.dot_product_error);
  CHECK(check.fd_error <= 1e-7);
  CHECK(check.dot_product_error <= 1e-8); // Ridders' J v is good to ~1e-9 here
  WARN("gradient w.r.t. the given noise: FD error " << check.fd_error << ", dot-product "
                                                    << check.dot_product_error);
}

// ---------------------------------------------------------------------- bad input

TEST_CASE("bdm sampler: bad input is refused by name", "[gddim][bdm][sampler]") {
  const Backend64 backend;
  const BdmSchedule<> schedule(4, 4);
  const std::vector<double> times{0.9, 0.5, 0.1};
  require_throws_naming([&] { Scheme(backend, schedule, times, {.order = 0}); }, "options.order");
  require_throws_naming([&] { Scheme(backend, schedule, times, {.order = 4}); }, "options.order");
  require_throws_naming([&] { Scheme(backend, schedule, times, {.stochasticity = -0.1}); },
                        "options.stochasticity");
  require_throws_naming([&] { Scheme(backend, schedule, times, {.stochasticity = 1.5}); },
                        "options.stochasticity");
  require_throws_naming(
      [&] { Scheme(backend, schedule, times, {.order = 2, .stochasticity = 0.5}); }, "single-step");
  require_throws_naming(
      [&] { Scheme(backend, schedule, times, {.order = 2, .method = BdmMethod::euler}); }, "Euler");
  require_throws_naming([&] { Scheme(backend, schedule, times, {.model_time_scale = 0.0}); },
                        "options.model_time_scale");
  require_throws_naming([&] { Scheme(backend, schedule, times, {.channels = 0}); },
                        "options.channels");
  // grids
  require_throws_naming([&] { Scheme(backend, schedule, std::vector<double>{0.5}); }, "times");
  require_throws_naming(
      [&] {
        Scheme(backend, schedule, std::vector<double>{0.5, 0.7});
      },
      "strictly decreasing");
  require_throws_naming(
      [&] {
        Scheme(backend, schedule, std::vector<double>{1.5, 0.5});
      },
      "domain");
  require_throws_naming(
      [&] {
        Scheme(backend, schedule, std::vector<double>{0.5, 0.0});
      },
      "domain");
  // widths
  const Scheme scheme(backend, schedule, times);
  CHECK(scheme.accepts_dim(16));
  CHECK_FALSE(scheme.accepts_dim(15));
  const ImageBatch means = ImageBatch::Zero(1, 16);
  const diffgrad::models::BdmGaussianMixture<> model(schedule, means, VectorXd::Constant(1, 0.5));
  ImageBatch wrong = ImageBatch::Zero(2, 12);
  require_throws_naming([&] { diffgrad::gddim::sample_bdm(scheme, backend, model, wrong); }, "'x'");
  require_throws_naming([&] { diffgrad::gddim::sample_bdm(scheme, backend, model, wrong); },
                        "C H W = 16");
  diffgrad::SamplerWorkspace<Backend64> ws(backend, 0, 1, 2, 12);
  auto zero_field = [](const ImageBatch& u, const Node&, ImageBatch& out) {
    out = ImageBatch::Zero(u.rows(), u.cols());
  };
  require_throws_naming(
      [&] {
        diffgrad::run_scheme(scheme, backend, scheme.nodes(), Scheme::node_at_lambda(), zero_field,
                             wrong, ws);
      },
      "C H W = 16");
  // H W mismatch between the mixture and the schedule
  require_throws_naming(
      [&] {
        diffgrad::models::BdmGaussianMixture<>(schedule, ImageBatch::Zero(1, 15),
                                               VectorXd::Constant(1, 0.5));
      },
      "means");
  // a node span that is not the scheme's grid
  const Scheme other(backend, schedule, std::vector<double>{0.9, 0.4, 0.1});
  ImageBatch x = ImageBatch::Zero(2, 16);
  diffgrad::SamplerWorkspace<Backend64> ws16(backend, 0, 1, 2, 16);
  require_throws_naming(
      [&] {
        diffgrad::run_scheme(scheme, backend, other.nodes(), Scheme::node_at_lambda(), zero_field,
                             x, ws16);
      },
      "nodes");
  // multistep coefficient arguments
  MatrixXd c(2, 16);
  require_throws_naming(
      [&] {
        schedule.multistep_coeffs(std::vector<double>{0.5, 0.5}, 0.4, c);
      },
      "distinct");
  MatrixXd c3(3, 16);
  require_throws_naming(
      [&] {
        schedule.multistep_coeffs(std::vector<double>{0.5, 0.6}, 0.4, c3);
      },
      "out");
  VectorXd v(16), v2(16), v3(16);
  require_throws_naming([&] { schedule.stochastic_coeffs(0.5, 0.4, 2.0, v, v2, v3); },
                        "stochasticity");
}

TEST_CASE("bdm sampler: a drawn x_T is the Philox prior stream; copies share the table",
          "[gddim][bdm][sampler]") {
  const Backend64 backend;
  const BdmSchedule<> schedule(4, 4);
  const ImageBatch means = ImageBatch::Zero(1, 16);
  const diffgrad::models::BdmGaussianMixture<> model(schedule, means, VectorXd::Constant(1, 0.5));
  const Scheme scheme(backend, schedule, quadratic_grid(0.9, 0.01, 5), {.order = 2});
  const Scheme copy = scheme;
  const ImageBatch drawn = diffgrad::gddim::sample_bdm(copy, backend, model, 3, 42);
  ImageBatch x(3, 16);
  for (Index r = 0; r < 3; ++r)
    for (Index c = 0; c < 16; ++c)
      x(r, c) = diffgrad::detail::gaussian(42, diffgrad::gddim::kBdmPriorStream,
                                           static_cast<std::uint64_t>(r * 16 + c));
  diffgrad::gddim::sample_bdm(scheme, backend, model, x);
  CHECK(drawn == x);
  // The plan's diagonals are the schedule's coefficients (step 0: Psi, C; later: 2 points).
  const auto p0 = scheme.plan(scheme.nodes(), 0, Scheme::node_at_lambda());
  const auto c0 = schedule.ddim_coeffs(0.9, scheme.nodes()[1].t);
  for (Index k = 0; k < 16; ++k) {
    CHECK(p0.output.x.at(k) == c0.x[k]);
    CHECK(p0.output.e[0].at(k) == c0.eps[k]);
  }
  CHECK(p0.output.hist_e[0].is_zero());
  const auto p1 = scheme.plan(scheme.nodes(), 1, Scheme::node_at_lambda());
  CHECK_FALSE(p1.output.hist_e[0].is_zero());
  CHECK(p1.stage_node[0].model_t == 999.0 * scheme.nodes()[1].t);
}

TEST_CASE("bdm sampler: the step loop does not allocate (spectral field, mixture model, q = 3)",
          "[gddim][bdm][sampler]") {
  const Backend64 backend;
  const BdmSchedule<> schedule(4, 4);
  ImageBatch means(2, 16);
  for (Index p = 0; p < 32; ++p) means(p / 16, p % 16) = std::sin(0.37 * static_cast<double>(p));
  const diffgrad::models::BdmGaussianMixture<> model(schedule, means, VectorXd::Constant(2, 0.3));
  const ChannelDct dct(4, 4);
  for (const BdmGddimOptions options :
       {BdmGddimOptions{.order = 3}, BdmGddimOptions{.stochasticity = 0.5}}) {
    const Scheme scheme(backend, schedule, quadratic_grid(0.9, 0.01, 8), options);
    diffgrad::SamplerWorkspace<Backend64> ws(backend, scheme.history(), 1, 3, 16);
    diffgrad::gddim::SpectralEpsField<const decltype(model)> field(model, dct, 3);
    ImageBatch y = normal_batch(3, 16, 4);
    diffgrad::run_scheme(scheme, backend, scheme.nodes(), Scheme::node_at_lambda(), field, y, ws);
    const long before = alloc_probe::total_allocations();
    alloc_probe::counting = true;
    Eigen::internal::set_is_malloc_allowed(false);
    diffgrad::run_scheme(scheme, backend, scheme.nodes(), Scheme::node_at_lambda(), field, y, ws);
    Eigen::internal::set_is_malloc_allowed(true);
    alloc_probe::counting = false;
    CHECK(alloc_probe::total_allocations() - before == 0);
  }
}
