// gDDIM blurring diffusion (BDM), host side: the orthonormal 2-D DCT and the per-frequency
// schedule. Every closed form is checked against an independent reference written here:
// the DCT against its defining double sum, the schedule against its formulas in long double,
// the step coefficient against adaptive Gauss-Legendre quadrature of its integral, the SDE
// coefficients against finite differences, and the deterministic step against an adaptive
// Dormand-Prince solve of the PF-ODE with the exact single-point score.
#include "alloc_probe.hpp" // first: replaces operator new and hooks Eigen's allocations

#include <Eigen/Core>
#include <catch2/catch.hpp>
#include <cmath>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"

using diffgrad::gddim::BdmCosineSchedule;
using diffgrad::gddim::BdmSchedule;
using diffgrad::gddim::Dct2d;
using diffgrad::gddim::ImageBatch;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using ld = long double;

namespace {

const ld kPi = 3.141592653589793238462643383279502884L;

ImageBatch random_batch(Index rows, Index cols, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  ImageBatch x(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) x(r, c) = u(rng);
  return x;
}

double max_rel(const Eigen::Ref<const MatrixXd>& got, const Eigen::Ref<const MatrixXd>& ref) {
  return (got - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
}

/// The defining double sum of the orthonormal 2-D DCT-II, in long double, written without
/// the library's matrices: X_hat(i, j) = c_i c_j sum_{r,c} X(r, c) cos(pi (2r+1) i / 2H)
/// cos(pi (2c+1) j / 2W), c_0 = sqrt(1/n), c_k = sqrt(2/n).
std::vector<ld> naive_dct2(const std::vector<ld>& x, Index h, Index w) {
  std::vector<ld> out(static_cast<std::size_t>(h * w), 0.0L);
  for (Index i = 0; i < h; ++i)
    for (Index j = 0; j < w; ++j) {
      ld acc = 0.0L;
      for (Index r = 0; r < h; ++r)
        for (Index c = 0; c < w; ++c)
          acc += x[static_cast<std::size_t>(r * w + c)] *
                 std::cos(kPi * static_cast<ld>((2 * r + 1) * i) / static_cast<ld>(2 * h)) *
                 std::cos(kPi * static_cast<ld>((2 * c + 1) * j) / static_cast<ld>(2 * w));
      const ld ci = std::sqrt((i == 0 ? 1.0L : 2.0L) / static_cast<ld>(h));
      const ld cj = std::sqrt((j == 0 ? 1.0L : 2.0L) / static_cast<ld>(w));
      out[static_cast<std::size_t>(i * w + j)] = ci * cj * acc;
    }
  return out;
}

/// The (H W) x (H W) matrix of the same sum (row-major flattening), for the ODE reference.
MatrixXd naive_dct_kron(Index h, Index w) {
  MatrixXd k(h * w, h * w);
  for (Index p = 0; p < h * w; ++p) {
    std::vector<ld> e(static_cast<std::size_t>(h * w), 0.0L);
    e[static_cast<std::size_t>(p)] = 1.0L;
    const auto col = naive_dct2(e, h, w);
    for (Index q = 0; q < h * w; ++q)
      k(q, p) = static_cast<double>(col[static_cast<std::size_t>(q)]);
  }
  return k;
}

/// The official BDM schedule written out independently, in long double:
/// abar = cos^2(theta), theta = (t + 0.004)/1.008 pi/2, d = (1 - d_min) e^{-lambda tau} + d_min,
/// tau = (sigma_max sin^2(pi t/2))^2 / 2, lambda_ij = pi^2 (i^2/H^2 + j^2/W^2); the SDE
/// coefficients from the gDDIM thesis' per-frequency form
///   F = (1/2) abar'/abar + d'/d,   G^2 = -abar'/abar - 2 (d'/d)(1 - abar).
struct RefBdm {
  Index h, w;
  ld smax, dmin, s = 0.004L;
  ld theta(ld t) const { return (t + s) / (1.0L + 2.0L * s) * kPi / 2.0L; }
  ld dtheta() const { return kPi / 2.0L / (1.0L + 2.0L * s); }
  ld lam(Index k) const {
    const ld i = static_cast<ld>(k / w), j = static_cast<ld>(k % w);
    return kPi * kPi * (i * i / static_cast<ld>(h * h) + j * j / static_cast<ld>(w * w));
  }
  ld tau(ld t) const {
    const ld sn = std::sin(kPi * t / 2.0L), sb = smax * sn * sn;
    return sb * sb / 2.0L;
  }
  ld dtau(ld t) const { // d tau/dt = sb sb', sb' = smax (pi/2) sin(pi t)
    const ld sn = std::sin(kPi * t / 2.0L);
    return smax * sn * sn * smax * (kPi / 2.0L) * std::sin(kPi * t);
  }
  ld d(Index k, ld t) const { return (1.0L - dmin) * std::exp(-lam(k) * tau(t)) + dmin; }
  ld dd(Index k, ld t) const {
    return -(1.0L - dmin) * std::exp(-lam(k) * tau(t)) * lam(k) * dtau(t);
  }
  ld alpha(Index k, ld t) const { return std::cos(theta(t)) * d(k, t); }
  ld sigma(ld t) const { return std::sin(theta(t)); }
  ld abar_log_rate(ld t) const { return -2.0L * std::tan(theta(t)) * dtheta(); } // abar'/abar
  ld F(Index k, ld t) const { return 0.5L * abar_log_rate(t) + dd(k, t) / d(k, t); }
  ld G2(Index k, ld t) const {
    const ld ab = std::cos(theta(t)) * std::cos(theta(t));
    return -abar_log_rate(t) - 2.0L * dd(k, t) / d(k, t) * (1.0L - ab);
  }
};

/// Adaptive Gauss-Legendre (10 points, bisection until the halves agree) of f on [a, b].
template <class Fn> ld gauss_legendre10(const Fn& f, ld a, ld b) {
  static const ld x[5] = {0.1488743389816312108848260L, 0.4333953941292471907992659L,
                          0.6794095682990244062343274L, 0.8650633666889845107320967L,
                          0.9739065285171717200779640L};
  static const ld wt[5] = {0.2955242247147528701738930L, 0.2692667193099963550912269L,
                           0.2190863625159820439955349L, 0.1494513491505805931457763L,
                           0.0666713443086881375935688L};
  const ld m = (a + b) / 2.0L, r = (b - a) / 2.0L;
  ld acc = 0.0L;
  for (int i = 0; i < 5; ++i) acc += wt[i] * (f(m - r * x[i]) + f(m + r * x[i]));
  return acc * r;
}
template <class Fn> ld adaptive_gl(const Fn& f, ld a, ld b, ld whole, int depth = 0) {
  const ld m = (a + b) / 2.0L;
  const ld left = gauss_legendre10(f, a, m), right = gauss_legendre10(f, m, b);
  if (depth > 40 || std::abs(left + right - whole) <= 1e-17L * std::abs(left + right))
    return left + right;
  return adaptive_gl(f, a, m, left, depth + 1) + adaptive_gl(f, m, b, right, depth + 1);
}
template <class Fn> ld integrate(const Fn& f, ld a, ld b) {
  return adaptive_gl(f, a, b, gauss_legendre10(f, a, b));
}

/// Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction) for y' = rhs(t, y).
template <class Rhs>
VectorXd dopri45(const Rhs& rhs, double t0, double t1, VectorXd y, double rtol) {
  static const double c2 = 1.0 / 5, c3 = 3.0 / 10, c4 = 4.0 / 5, c5 = 8.0 / 9;
  static const double a21 = 1.0 / 5, a31 = 3.0 / 40, a32 = 9.0 / 40, a41 = 44.0 / 45,
                      a42 = -56.0 / 15, a43 = 32.0 / 9, a51 = 19372.0 / 6561, a52 = -25360.0 / 2187,
                      a53 = 64448.0 / 6561, a54 = -212.0 / 729, a61 = 9017.0 / 3168,
                      a62 = -355.0 / 33, a63 = 46732.0 / 5247, a64 = 49.0 / 176,
                      a65 = -5103.0 / 18656, b1 = 35.0 / 384, b3 = 500.0 / 1113, b4 = 125.0 / 192,
                      b5 = -2187.0 / 6784, b6 = 11.0 / 84;
  static const double e1 = 71.0 / 57600, e3 = -71.0 / 16695, e4 = 71.0 / 1920,
                      e5 = -17253.0 / 339200, e6 = 22.0 / 525, e7 = -1.0 / 40;
  const double dir = t1 > t0 ? 1.0 : -1.0;
  double t = t0, h = dir * std::abs(t1 - t0) * 1e-3;
  VectorXd k1 = rhs(t, y);
  for (int it = 0; it < 10000000 && dir * (t1 - t) > 0; ++it) {
    if (dir * (t + h - t1) > 0) h = t1 - t;
    const VectorXd k2 = rhs(t + c2 * h, y + h * a21 * k1);
    const VectorXd k3 = rhs(t + c3 * h, y + h * (a31 * k1 + a32 * k2));
    const VectorXd k4 = rhs(t + c4 * h, y + h * (a41 * k1 + a42 * k2 + a43 * k3));
    const VectorXd k5 = rhs(t + c5 * h, y + h * (a51 * k1 + a52 * k2 + a53 * k3 + a54 * k4));
    const VectorXd k6 = rhs(t + h, y + h * (a61 * k1 + a62 * k2 + a63 * k3 + a64 * k4 + a65 * k5));
    const VectorXd y5 = y + h * (b1 * k1 + b3 * k3 + b4 * k4 + b5 * k5 + b6 * k6);
    const VectorXd k7 = rhs(t + h, y5);
    const VectorXd err = h * (e1 * k1 + e3 * k3 + e4 * k4 + e5 * k5 + e6 * k6 + e7 * k7);
    const double scale = rtol * std::max(y.cwiseAbs().maxCoeff(), y5.cwiseAbs().maxCoeff());
    const double ratio = err.cwiseAbs().maxCoeff() / scale;
    if (ratio <= 1.0) {
      t += h;
      y = y5;
      k1 = k7;
    }
    h *= std::min(4.0, std::max(0.2, 0.9 * std::pow(std::max(ratio, 1e-10), -0.2)));
  }
  return y;
}

template <class Fn> void require_throws_naming(const Fn& fn, const std::string& needle) {
  try {
    fn();
    FAIL("expected diffgrad::invalid_argument naming " << needle);
  } catch (const diffgrad::invalid_argument& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

} // namespace

// ----------------------------------------------------------------------------------- DCT

TEST_CASE("gddim dct: the 1-D matrices are orthonormal", "[gddim][bdm][dct]") {
  for (Index n : {1, 2, 3, 5, 7, 8, 16, 31, 32, 64}) {
    const MatrixXd d = diffgrad::gddim::dct2_matrix(n);
    const double e1 = (d * d.transpose() - MatrixXd::Identity(n, n)).cwiseAbs().maxCoeff();
    const double e2 = (d.transpose() * d - MatrixXd::Identity(n, n)).cwiseAbs().maxCoeff();
    INFO("n = " << n << ": max |D D^T - I| = " << e1 << ", max |D^T D - I| = " << e2);
    CHECK(e1 <= 1e-14);
    CHECK(e2 <= 1e-14);
  }
}

TEST_CASE("gddim dct: forward equals the defining double sum (8x8, 5x7, 1x4, 3x1)",
          "[gddim][bdm][dct]") {
  const std::vector<std::pair<Index, Index>> sizes = {{8, 8}, {5, 7}, {1, 4}, {3, 1}};
  for (auto [h, w] : sizes) {
    const Dct2d dct(h, w);
    const ImageBatch x = random_batch(3, h * w, 7);
    const ImageBatch y = dct.forward(x);
    double err = 0.0;
    for (Index b = 0; b < x.rows(); ++b) {
      std::vector<ld> xb(static_cast<std::size_t>(h * w));
      for (Index p = 0; p < h * w; ++p) xb[static_cast<std::size_t>(p)] = x(b, p);
      const auto ref = naive_dct2(xb, h, w);
      ld scale = 0.0L, diff = 0.0L;
      for (Index p = 0; p < h * w; ++p) {
        scale = std::max(scale, std::abs(ref[static_cast<std::size_t>(p)]));
        diff =
            std::max(diff, std::abs(static_cast<ld>(y(b, p)) - ref[static_cast<std::size_t>(p)]));
      }
      err = std::max(err, static_cast<double>(diff / scale));
    }
    INFO(h << "x" << w << ": max-norm relative error vs the double sum = " << err);
    CHECK(err <= 1e-14);
  }
}

TEST_CASE("gddim dct: round trip, Parseval, in-place use", "[gddim][bdm][dct]") {
  for (auto [h, w] : std::vector<std::pair<Index, Index>>{{8, 8}, {5, 7}, {32, 32}, {1, 1}}) {
    const Dct2d dct(h, w);
    const ImageBatch x = random_batch(4, h * w, 11);
    const ImageBatch y = dct.forward(x);
    const ImageBatch back = dct.inverse(y);
    const double rt = max_rel(back, x);
    double parseval = 0.0;
    for (Index b = 0; b < x.rows(); ++b)
      parseval = std::max(parseval, std::abs(y.row(b).squaredNorm() - x.row(b).squaredNorm()) /
                                        x.row(b).squaredNorm());
    ImageBatch z = x;
    dct.forward(z, z); // out aliasing in
    INFO(h << "x" << w << ": round trip " << rt << ", Parseval " << parseval);
    CHECK(rt <= 1e-14);
    CHECK(parseval <= 1e-14);
    CHECK((z - y).cwiseAbs().maxCoeff() == 0.0);
  }
}

TEST_CASE("gddim dct: no heap allocation with output storage", "[gddim][bdm][dct]") {
  for (auto [h, w] : std::vector<std::pair<Index, Index>>{{8, 8}, {5, 7}, {32, 32}}) {
    const Dct2d dct(h, w);
    const ImageBatch x = random_batch(3, h * w, 5);
    ImageBatch y(3, h * w), z(3, h * w);
    const long before = alloc_probe::total_allocations();
    alloc_probe::counting = true;
    Eigen::internal::set_is_malloc_allowed(false);
    dct.forward(x, y);
    dct.inverse(y, z);
    Eigen::internal::set_is_malloc_allowed(true);
    alloc_probe::counting = false;
    INFO(h << "x" << w);
    CHECK(alloc_probe::total_allocations() - before == 0);
    CHECK(max_rel(z, x) <= 1e-14);
  }
}

TEST_CASE("gddim dct: arguments are checked by name", "[gddim][bdm][dct]") {
  require_throws_naming([] { Dct2d(0, 4); }, "'height'");
  require_throws_naming([] { Dct2d(4, 0); }, "'width'");
  require_throws_naming([] { diffgrad::gddim::dct2_matrix(0); }, "'n'");
  const Dct2d dct(4, 5);
  ImageBatch bad(2, 19), out(2, 20), good(2, 20), small(1, 20);
  require_throws_naming([&] { dct.forward(bad, out); }, "'in'");
  require_throws_naming([&] { dct.inverse(good, small); }, "'out'");
}

// ------------------------------------------------------------------------------ schedule

TEST_CASE("gddim bdm: parameters are validated by name", "[gddim][bdm]") {
  require_throws_naming([] { BdmSchedule(0, 8); }, "'height'");
  require_throws_naming([] { BdmSchedule(8, 0); }, "'width'");
  require_throws_naming([] { BdmSchedule(8, 8, -1.0); }, "'sigma_blur_max'");
  require_throws_naming([] { BdmSchedule(8, 8, std::nan("")); }, "'sigma_blur_max'");
  require_throws_naming([] { BdmSchedule(8, 8, INFINITY); }, "'sigma_blur_max'");
  require_throws_naming([] { BdmSchedule(8, 8, 10.0, -0.1); }, "'d_min'");
  require_throws_naming([] { BdmSchedule(8, 8, 10.0, 1.0); }, "'d_min'");
  require_throws_naming([] { BdmSchedule(8, 8, 10.0, std::nan("")); }, "'d_min'");
  // A base schedule running past t = 1, where sin^2(pi t/2) would un-blur.
  require_throws_naming(
      [] { BdmSchedule(8, 8, 10.0, 0.001, diffgrad::VPLinearSchedule(0.1, 20.0, 1e-3, 1.2)); },
      "'vp'");
  // d_min = 0 with strong blur: d_k(t_max) = exp(-lambda_max tau) underflows.
  require_throws_naming([] { BdmSchedule(8, 8, 100.0, 0.0); }, "'sigma_blur_max'");
  CHECK_NOTHROW(BdmSchedule(8, 8, 5.0, 0.0)); // d_min = 0 is fine while d stays normal
  require_throws_naming([] { BdmSchedule(8, 8, 10.0, 0.0); }, "'d_min'"); // 15.1 * 50 > 708
  require_throws_naming([] { BdmCosineSchedule(-0.1); }, "'s'");
  require_throws_naming([] { BdmCosineSchedule(0.004, 0.0); }, "'t_min'");
  require_throws_naming([] { BdmCosineSchedule(0.004, 1e-5, 1.004); }, "'t_max'");
  require_throws_naming([] { BdmCosineSchedule(0.004, 1e-5, 1.0, 0.0); }, "'model_time_scale'");

  const BdmSchedule sch(4, 5);
  VectorXd wrong(19), right(20);
  require_throws_naming([&] { sch.alpha(0.5, wrong); }, "'out'");
  require_throws_naming([&] { sch.ddim_coeffs(0.5, 0.4, right, wrong); }, "'out'");
  require_throws_naming([&] { sch.alpha(1.5, right); }, "'t'");
  require_throws_naming([&] { sch.ddim_coeffs(0.5, 0.0, right, right); }, "'t'");
}

TEST_CASE("gddim bdm: schedule equals its formulas written out in long double", "[gddim][bdm]") {
  for (auto [h, w] : std::vector<std::pair<Index, Index>>{{8, 8}, {5, 7}}) {
    for (double smax : {10.0, 3.0, 0.0}) {
      const double dmin = 0.001;
      const BdmSchedule sch(h, w, smax, dmin);
      const RefBdm ref{h, w, smax, dmin};
      VectorXd al(h * w), ls(h * w), dk(h * w);
      double e_alpha = 0, e_lambda = 0, e_sigma = 0, e_freq = 0, e_d = 0;
      for (double t : {1e-5, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0}) {
        sch.alpha(t, al);
        sch.log_snr(t, ls);
        sch.scaling(t, dk);
        e_sigma = std::max(
            e_sigma, static_cast<double>(std::abs(sch.sigma(t) - ref.sigma(t)) / ref.sigma(t)));
        CHECK(sch.r(t) == sch.sigma(t));
        for (Index k = 0; k < h * w; ++k) {
          const ld a = ref.alpha(k, t);
          e_alpha = std::max(e_alpha, static_cast<double>(std::abs(al[k] - a) / a));
          e_d = std::max(e_d, static_cast<double>(std::abs(dk[k] - ref.d(k, t)) / ref.d(k, t)));
          const ld l = std::log(a / ref.sigma(t));
          e_lambda = std::max(
              e_lambda, static_cast<double>(std::abs(ls[k] - l) / std::max(1.0L, std::abs(l))));
          e_freq =
              std::max(e_freq, static_cast<double>(std::abs(sch.frequencies()[k] - ref.lam(k)) /
                                                   std::max(1.0L, ref.lam(k))));
        }
      }
      INFO(h << "x" << w << ", sigma_blur_max " << smax << ": rel errors alpha_k " << e_alpha
             << ", d_k " << e_d << ", sigma " << e_sigma << ", lambda_k (rel. to max(1,|l|)) "
             << e_lambda << ", frequencies " << e_freq);
      CHECK(e_alpha <= 1e-14);
      CHECK(e_d <= 1e-14);
      CHECK(e_sigma <= 1e-14);
      CHECK(e_lambda <= 1e-14);
      CHECK(e_freq <= 1e-15);
    }
  }
}

TEST_CASE("gddim bdm: official 32x32 parameterisation, five-digit values", "[gddim][bdm]") {
  // sqrt(abar), sigma and d at frequencies (1,0), (4,4), (31,31) at t = 0.1, 0.5, 0.9 for the
  // official setup (offset 0.004, sigma_blur_max 10, d_min 0.001, 32 x 32).
  const BdmSchedule sch(32, 32);
  VectorXd d(32 * 32);
  struct Row {
    double t, a, s, d10, d44, d3131;
  };
  for (const Row& r : {Row{0.1, 0.98690, 0.16136, 0.99971, 0.99082, 0.57467},
                       Row{0.5, 0.70711, 0.70711, 0.88661, 0.02215, 0.001},
                       Row{0.9, 0.16136, 0.98690, 0.63253, 0.001, 0.001}}) {
    sch.scaling(r.t, d);
    CHECK(sch.a(r.t) == Approx(r.a).epsilon(1e-4));
    CHECK(sch.sigma(r.t) == Approx(r.s).epsilon(1e-4));
    CHECK(d[0] == 1.0);
    CHECK(d[1 * 32 + 0] == Approx(r.d10).epsilon(1e-4));
    CHECK(d[4 * 32 + 4] == Approx(r.d44).epsilon(1e-3));
    CHECK(d[31 * 32 + 31] == Approx(r.d3131).epsilon(1e-4));
  }
}

TEST_CASE("gddim bdm: base cosine schedule: lambda, its inverse, step_h, start time",
          "[gddim][bdm]") {
  const BdmCosineSchedule vp;
  double e_inv = 0, e_h = 0;
  for (double t : {1e-5, 1e-3, 0.2, 0.5, 0.9, 0.999, 1.0}) {
    e_inv = std::max(e_inv, std::abs(vp.t_of_lambda(vp.lambda(t)) - t) / t);
    CHECK(vp.node(t).model_t == 999.0 * t);
  }
  // step_h(s, t) = lambda(t) - lambda(s) = int_s^t dlambda/dtau dtau with
  // dlambda/dtau = -2 theta' / sin(2 theta), by adaptive Gauss-Legendre in long double (a
  // difference of long double logs would itself lose ~8 digits on the 1e-8 step).
  for (auto [s, t] : std::vector<std::pair<double, double>>{
           {1.0, 1e-5}, {0.5, 0.4}, {0.3, 0.3 - 1e-8}, {0.1, 0.9}, {0.7, 0.7 + 1e-6}}) {
    const auto rate = [](ld tau) {
      const ld th = (tau + 0.004L) / 1.008L * kPi / 2.0L;
      return -2.0L * (kPi / 2.0L / 1.008L) / std::sin(2.0L * th);
    };
    const ld ref = integrate(rate, s, t);
    e_h = std::max(e_h, static_cast<double>(std::abs(vp.step_h(s, t) - ref) / std::abs(ref)));
  }
  const double t0 = vp.t_start(80.0);
  const double ratio = vp.sigma(t0) / vp.alpha(t0), want = (80.0 + vp.sigma(0.0)) / vp.alpha(0.0);
  INFO("t_of_lambda round trip " << e_inv << ", step_h rel error " << e_h
                                 << ", t_start(80) = " << t0 << ", abar = " << vp.abar(t0));
  CHECK(e_inv <= 1e-12); // t = theta (1 + 2s) 2/pi - s cancels at t = 1e-5 (2e-13 measured)
  CHECK(e_h <= 1e-14);
  CHECK(std::abs(ratio - want) / want <= 1e-14);
  CHECK(t0 == Approx(0.995980).epsilon(2e-6));
  CHECK(vp.abar(t0) == Approx(1.562e-4).epsilon(1e-3));
  require_throws_naming([&] { (void)vp.t_start(0.0); }, "'rho'");
}

TEST_CASE("gddim bdm: transition and step coefficient against independent references",
          "[gddim][bdm]") {
  // C_k(t, s) = int_s^t Psi_k(t, tau) G_k(tau)^2 / (2 sigma_tau) dtau (the gDDIM step integral
  // with R = sigma I), by adaptive Gauss-Legendre in long double with the test's own F, G:
  // no cancellation at any step size, so it also checks short steps (down to 1e-8).
  const Index h = 5, w = 7;
  const BdmSchedule sch(h, w, 10.0, 0.001);
  const RefBdm ref{h, w, 10.0L, 0.001L};
  VectorXd psi(h * w), xc(h * w), ec(h * w);
  const std::vector<std::pair<double, double>> steps = {
      {0.9, 0.1},        {1.0, 1e-3},       {0.5, 0.45},         {0.3, 0.6},       {0.6, 0.59},
      {0.4, 0.4 - 1e-4}, {0.7, 0.7 - 1e-6}, {0.25, 0.25 - 1e-8}, {0.8, 0.8 + 1e-7}};
  for (auto [s, t] : steps) {
    sch.transition(t, s, psi);
    sch.ddim_coeffs(s, t, xc, ec);
    double e_psi = 0, e_c = 0, e_x = 0;
    for (Index k = 0; k < h * w; ++k) {
      const ld psi_ref = ref.alpha(k, t) / ref.alpha(k, s);
      const auto integrand = [&](ld tau) {
        return ref.alpha(k, t) / ref.alpha(k, tau) * ref.G2(k, tau) / (2.0L * ref.sigma(tau));
      };
      const ld c_ref = integrate(integrand, s, t);
      e_psi = std::max(e_psi, static_cast<double>(std::abs(psi[k] - psi_ref) / psi_ref));
      e_x = std::max(e_x, std::abs(xc[k] - psi[k]) / psi[k]);
      e_c = std::max(e_c, static_cast<double>(std::abs(ec[k] - c_ref) / std::abs(c_ref)));
    }
    INFO("s = " << s << ", t = " << t << ": rel errors Psi_k " << e_psi << ", C_k " << e_c
                << ", x_coef vs transition " << e_x);
    CHECK(e_psi <= 1e-14);
    CHECK(e_x <= 1e-15);
    CHECK(e_c <= 1e-14);
  }
}

TEST_CASE("gddim bdm: SDE coefficients match the thesis form and finite differences",
          "[gddim][bdm]") {
  const Index h = 8, w = 8;
  const BdmSchedule sch(h, w, 10.0, 0.001);
  const RefBdm ref{h, w, 10.0L, 0.001L};
  VectorXd f(h * w), g2(h * w), lp(h * w), lm(h * w);
  double e_f = 0, e_g = 0, e_fd = 0;
  for (double t : {0.05, 0.2, 0.5, 0.77, 0.95}) {
    sch.drift(t, f);
    sch.diffusion2(t, g2);
    // Central difference of log alpha_k (5-point stencil).
    const double dt = 1e-4;
    VectorXd a1(h * w), a2(h * w), a3(h * w), a4(h * w);
    sch.alpha(t - 2 * dt, a1);
    sch.alpha(t - dt, a2);
    sch.alpha(t + dt, a3);
    sch.alpha(t + 2 * dt, a4);
    for (Index k = 0; k < h * w; ++k) {
      const double fd =
          (std::log(a1[k]) - 8 * std::log(a2[k]) + 8 * std::log(a3[k]) - std::log(a4[k])) /
          (12 * dt);
      e_f = std::max(e_f, static_cast<double>(std::abs(f[k] - ref.F(k, t)) /
                                              std::max(1.0L, std::abs(ref.F(k, t)))));
      e_g = std::max(e_g, static_cast<double>(std::abs(g2[k] - ref.G2(k, t)) / ref.G2(k, t)));
      e_fd = std::max(e_fd, std::abs(f[k] - fd) / std::max(1.0, std::abs(f[k])));
    }
  }
  INFO("F_k vs formula " << e_f << ", G_k^2 vs formula " << e_g << ", F_k vs finite differences "
                         << e_fd);
  CHECK(e_f <= 1e-13);
  CHECK(e_g <= 1e-13);
  CHECK(e_fd <= 1e-6);
}

TEST_CASE("gddim bdm: sigma_blur_max = 0 is DDIM on the same abar", "[gddim][bdm]") {
  const auto check = [](const auto& sch, const auto& vp, const std::vector<double>& times) {
    const Index n = sch.size();
    VectorXd xc(n), ec(n), al(n), ls(n), d(n);
    double worst = 0.0;
    for (std::size_t i = 0; i + 1 < times.size(); ++i) {
      const double s = times[i], t = times[i + 1];
      sch.ddim_coeffs(s, t, xc, ec);
      sch.alpha(t, al);
      sch.log_snr(t, ls);
      sch.scaling(t, d);
      const auto c = diffgrad::coeffs::ddim(vp.node(s), vp.node(t), 0.0);
      const diffgrad::Node nt = vp.node(t);
      for (Index k = 0; k < n; ++k) {
        CHECK(d[k] == 1.0);
        worst = std::max({worst, std::abs(xc[k] - c.x) / std::abs(c.x),
                          std::abs(ec[k] - c.eps) / std::abs(c.eps),
                          std::abs(al[k] - nt.alpha) / nt.alpha,
                          std::abs(ls[k] - nt.lambda) / std::max(1.0, std::abs(nt.lambda))});
      }
    }
    return worst;
  };
  // Long steps for the cosine base: there BdmSchedule forms lambda(t) - lambda(s) without
  // cancellation (step_h), coeffs::ddim as a node difference; on long steps both are exact to
  // rounding. The linear base has no step_h, so there the numbers agree bit for bit.
  const std::vector<double> times = {1.0, 0.9, 0.5, 0.3, 0.1, 1e-3, 1e-5};
  const BdmCosineSchedule cosine;
  const double e1 = check(BdmSchedule(8, 8, 0.0, 0.001, cosine), cosine, times);
  const diffgrad::VPLinearSchedule linear;
  const double e2 = check(BdmSchedule(5, 7, 0.0, 0.2, linear), linear,
                          std::vector<double>{1.0, 0.7, 0.2, 0.05, 1e-3});
  INFO("max relative difference to coeffs::ddim: cosine base " << e1 << ", linear base " << e2);
  CHECK(e1 <= 1e-15);
  CHECK(e2 <= 1e-15);
}

TEST_CASE("gddim bdm: one deterministic step with the exact eps is the PF-ODE solution",
          "[gddim][bdm]") {
  // Single data image u_0. In the DCT basis frequency k follows the PF-ODE
  //   dy/dt = F_k y - (1/2) G_k^2 score,  score = -(y - alpha_k(t) y0_k) / sigma_t^2,
  // solved here by adaptive Dormand-Prince with the test's own F, G and its own DCT matrix.
  // The library path: eps = (x_s - IDCT(alpha(s) DCT u_0)) / sigma_s in pixel space, one
  // step in the DCT basis with the library's coefficients, IDCT back.
  //
  // Tolerance: 1e-10 max-norm relative, except that a step cannot be more accurate than its
  // own conditioning: it multiplies y_s by Psi_k (up to 1.3e5 for 1 -> 1e-3: a(t)/a(s) = 128
  // times deblurring d_k(t)/d_k(s) = 1000) and cancels against C_k eps to an O(1) result, so
  // rounding in y_s alone moves the result by ~1e-16 max Psi_k. The bound used is
  // max(1e-10, 1e-14 max_k Psi_k).
  for (auto [h, w] : std::vector<std::pair<Index, Index>>{{8, 8}, {5, 7}}) {
    const double smax = 10.0, dmin = 0.001;
    const BdmSchedule sch(h, w, smax, dmin);
    const RefBdm ref{h, w, smax, dmin};
    const Dct2d dct(h, w);
    const MatrixXd K = naive_dct_kron(h, w);
    const Index n = h * w;
    const ImageBatch u0 = random_batch(1, n, 21);
    const ImageBatch xs_all = random_batch(1, n, 22);
    const VectorXd y0 = K * u0.row(0).transpose();
    const std::vector<std::pair<double, double>> steps = {{0.9, 0.1},  {1.0, 1e-3}, {0.5, 0.45},
                                                          {0.7, 0.02}, {0.3, 0.6},  {0.2, 0.199}};
    for (auto [s, t] : steps) {
      // Library.
      VectorXd as(n), xc(n), ec(n);
      sch.alpha(s, as);
      ImageBatch mean_y = dct.forward(u0);
      for (Index k = 0; k < n; ++k) mean_y(0, k) *= as[k];
      const ImageBatch mean_s = dct.inverse(mean_y);
      const ImageBatch eps = (xs_all - mean_s) / sch.sigma(s);
      const ImageBatch ys = dct.forward(xs_all), ey = dct.forward(eps);
      ImageBatch yt(1, n);
      sch.ddim_coeffs(s, t, xc, ec);
      diffgrad::gddim::apply_diagonal_step(xc, ec, ys, ey, yt);
      const ImageBatch xt = dct.inverse(yt);
      // Reference.
      const auto rhs = [&](double tt, const VectorXd& y) {
        VectorXd dy(n);
        const ld sg = ref.sigma(tt);
        for (Index k = 0; k < n; ++k) {
          const ld score = -(static_cast<ld>(y[k]) - ref.alpha(k, tt) * y0[k]) / (sg * sg);
          dy[k] = static_cast<double>(ref.F(k, tt) * y[k] - 0.5L * ref.G2(k, tt) * score);
        }
        return dy;
      };
      const VectorXd yref = dopri45(rhs, s, t, VectorXd(K * xs_all.row(0).transpose()), 1e-13);
      const VectorXd xref = K.transpose() * yref;
      const double err =
          (xt.row(0).transpose() - xref).cwiseAbs().maxCoeff() / xref.cwiseAbs().maxCoeff();
      const double tol = std::max(1e-10, 1e-14 * xc.maxCoeff());
      INFO(h << "x" << w << ", s = " << s << " -> t = " << t << ": max Psi_k = " << xc.maxCoeff()
             << ", max-norm relative error vs adaptive PF-ODE = " << err << " (bound " << tol
             << ")");
      CHECK(err <= tol);
    }
  }
}

TEST_CASE("gddim bdm: N deterministic steps with the exact eps land on the same point",
          "[gddim][bdm]") {
  // Along an exact PF-ODE solution eps is constant, so any grid gives alpha_k(t) y0 + sigma_t
  // eps_0 at the end, for any N. The bound is the conditioning floor of the previous test,
  // 1e-14 times the largest amplification max_k Psi_k(t_1, t_0) of the whole interval.
  const Index h = 5, w = 7, n = h * w;
  const BdmSchedule sch(h, w);
  const Dct2d dct(h, w);
  const ImageBatch u0 = random_batch(1, n, 31), z = random_batch(1, n, 32);
  const ImageBatch y0 = dct.forward(u0), ez = dct.forward(z);
  VectorXd a(n), xc(n), ec(n);
  for (const double t0 : {0.995, 0.9}) {
    const double t1 = 1e-3;
    sch.alpha(t1, a);
    ImageBatch target(1, n);
    for (Index k = 0; k < n; ++k) target(0, k) = a[k] * y0(0, k) + sch.sigma(t1) * ez(0, k);
    sch.transition(t1, t0, xc);
    const double tol = std::max(1e-12, 1e-14 * xc.maxCoeff());
    for (int steps : {1, 2, 5, 20, 50}) {
      sch.alpha(t0, a);
      ImageBatch y(1, n), next(1, n), e(1, n);
      for (Index k = 0; k < n; ++k) y(0, k) = a[k] * y0(0, k) + sch.sigma(t0) * ez(0, k);
      for (int i = 0; i < steps; ++i) {
        const double s = t0 + (t1 - t0) * i / steps, t = t0 + (t1 - t0) * (i + 1) / steps;
        sch.alpha(s, a);
        for (Index k = 0; k < n; ++k) e(0, k) = (y(0, k) - a[k] * y0(0, k)) / sch.sigma(s);
        sch.ddim_coeffs(s, t, xc, ec);
        diffgrad::gddim::apply_diagonal_step(xc, ec, y, e, next);
        y = next;
      }
      const double err = max_rel(y, target);
      INFO("t0 = " << t0 << ", N = " << steps << ": max-norm relative error " << err << " (bound "
                   << tol << ")");
      CHECK(err <= tol);
    }
  }
}

TEST_CASE("gddim bdm: grid table and nodes agree with the per-time functions", "[gddim][bdm]") {
  const BdmSchedule sch(5, 7);
  const std::vector<double> times = {0.99, 0.7, 0.3, 0.05, 1e-3};
  const auto table = sch.ddim_table(times);
  REQUIRE(table.x.rows() == 4);
  REQUIRE(table.x.cols() == 35);
  for (std::size_t i = 0; i + 1 < times.size(); ++i) {
    const auto c = sch.ddim_coeffs(times[i], times[i + 1]);
    CHECK(table.x.row(static_cast<Index>(i)) == c.x.transpose());
    CHECK(table.eps.row(static_cast<Index>(i)) == c.eps.transpose());
  }
  const auto n = sch.node(0.3);
  VectorXd a(35), l(35);
  sch.alpha(0.3, a);
  sch.log_snr(0.3, l);
  CHECK(n.alpha == a);
  CHECK(n.lambda == l);
  CHECK(n.base.sigma == sch.sigma(0.3));
  CHECK(n.base.model_t == 999.0 * 0.3);
  require_throws_naming([&] { (void)sch.ddim_table(std::vector<double>{0.5}); }, "'times'");
  require_throws_naming([&] { (void)sch.ddim_table(std::vector<double>{0.5, 0.6}); }, "'times'");
  require_throws_naming([&] { (void)sch.ddim_table(std::vector<double>{0.5, 0.0}); }, "'t'");
}
