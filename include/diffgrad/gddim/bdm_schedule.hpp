#pragma once
// Blurring diffusion (BDM) schedule for gDDIM, host side, in double.
//
// Sources: "Blurring Diffusion Models" (the blur schedule and per-frequency forward process)
// and "gDDIM: Generalized denoising diffusion implicit models" (the sampler, and the
// parameterisation of its official BDM code). Work in the orthonormal 2-D DCT basis
// (gddim/dct.hpp): y = DCT(x). Every frequency k = (i, j) (i along H, j along W; flattened
// k = i W + j) is an independent scalar diffusion
//
//   y_t(k) = alpha_k(t) y_0(k) + sigma(t) z(k),     z ~ N(0, I)
//   alpha_k(t) = a(t) d_k(t),                       a(t) = sqrt(abar(t)), sigma(t) of a base
//   schedule d_k(t) = (1 - d_min) exp(-lambda_k tau(t)) + d_min,   tau(t) = sigma_blur(t)^2 / 2,
//   sigma_blur(t) = sigma_blur_max sin^2(pi t / 2),      lambda_k = pi^2 (i^2/H^2 + j^2/W^2).
//
// The noise is isotropic (the same sigma(t) for every frequency), so the kernel covariance is
// Sigma_t = sigma(t)^2 I and gDDIM's R_t (dR/dt = (F + G G^T Sigma^{-1}/2) R, R R^T = Sigma)
// is R_t = sigma(t) I: it coincides with the Cholesky factor, and the deterministic gDDIM step
// is DDIM run per frequency, with the per-frequency log-SNR lambda_k(t) = log(alpha_k/sigma):
//
//   y_t = Psi_k(t,s) y_s + C_k(t,s) eps_y,   Psi_k = alpha_k(t)/alpha_k(s),
//   C_k(t,s) = R_t - Psi_k R_s = sigma_t - Psi_k sigma_s = -sigma_t expm1(lambda_k(t) -
//   lambda_k(s)).
//
// eps_y = DCT(eps_theta(IDCT(y_s), s)): the network predicts pixel-space noise, and the DCT is
// orthonormal, so eps in either basis is the same standard normal. Coefficients are computed
// from the two times (not from two stored nodes) so that short steps keep full relative
// accuracy: the blur ratio d_k(t)/d_k(s) and the step h_k are formed without subtracting nearly
// equal numbers. With sigma_blur_max = 0 every d_k is exactly 1 and the coefficients are
// exactly the library's scalar DDIM coefficients of the base schedule.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numbers>
#include <span>
#include <utility>
#include <vector>

#include "diffgrad/coeffs/deis.hpp"
#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/schedule/detail_vp.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::gddim {

/// The base (scalar, VP) schedule of the official gDDIM BDM code:
///   abar(t) = cos^2(theta),  theta = (t + s)/(1 + 2 s) pi/2,  s = 0.004,
/// i.e. alpha = cos(theta), sigma = sin(theta). Note the offset 0.004 over 1.008 and that abar(0)
/// is not normalised to 1 (unlike VPCosineSchedule's improved-DDPM form). The network time
/// input of the official code is 999 t (model_time_scale). A diffgrad Schedule.
class BdmCosineSchedule {
public:
  explicit BdmCosineSchedule(double s = 0.004, double t_min = 1e-5, double t_max = 1.0,
                             double model_time_scale = 999.0)
      : s_(s), t_min_(t_min), t_max_(t_max), scale_(model_time_scale) {
    const char* where = "BdmCosineSchedule";
    diffgrad::detail::require(s >= 0.0 && s < 1.0, where, "s", "0 <= s < 1", s);
    diffgrad::detail::require(t_min > 0.0 && std::isfinite(t_min), where, "t_min",
                              "a finite t_min > 0", t_min);
    // theta(t_max) < pi/2 keeps alpha(t_max) > 0 (lambda finite): t_max < 1 + s.
    diffgrad::detail::require(t_max > t_min && t_max < 1.0 + s, where, "t_max",
                              "t_min < t_max < 1 + s (alpha = cos(theta) vanishes at t = 1 + s)",
                              t_max);
    diffgrad::detail::require(model_time_scale > 0.0 && std::isfinite(model_time_scale), where,
                              "model_time_scale", "a positive finite number", model_time_scale);
  }
  double t_min() const { return t_min_; }
  double t_max() const { return t_max_; }
  double s() const { return s_; }
  double theta(double t) const { return (t + s_) / (1.0 + 2.0 * s_) * (std::numbers::pi / 2.0); }
  /// pi/2 - theta = ((1 - t) + s)/(1 + 2 s) pi/2, formed so that 1 - t is exact near t = 1.
  double phi(double t) const {
    return ((1.0 - t) + s_) / (1.0 + 2.0 * s_) * (std::numbers::pi / 2.0);
  }
  /// alpha = cos(theta) = sin(pi/2 - theta) and sigma = sin(theta): each is a sine of a small
  /// angle where it is small, so both keep full relative precision at both ends (cos(theta)
  /// near theta = pi/2 would lose ~1e-14 at t = 1; 1 - abar would cancel as t -> 0).
  double alpha(double t) const { return std::sin(phi(t)); }
  double sigma(double t) const { return std::sin(theta(t)); }
  double abar(double t) const { return alpha(t) * alpha(t); }
  double lambda(double t) const { return std::log(alpha(t) / sigma(t)); }
  double t_of_lambda(double lambda) const {
    return std::atan(std::exp(-lambda)) * (1.0 + 2.0 * s_) * (2.0 / std::numbers::pi) - s_;
  }
  /// lambda(t) - lambda(s) = log(tan theta_s / tan theta_t) without subtracting two logs:
  /// tan theta_s / tan theta_t - 1 = sin(theta_s - theta_t) / (cos theta_s sin theta_t), and
  /// theta_s - theta_t comes from s - t directly, so a step of 1e-8 keeps full relative
  /// accuracy (the difference of two lambdas would lose ~8 digits). BdmSchedule uses it.
  double step_h(double s, double t) const {
    const double dth = (s - t) / (1.0 + 2.0 * s_) * (std::numbers::pi / 2.0);
    const double q = std::sin(dth) / (alpha(s) * sigma(t));
    if (q >= -0.5) return std::log1p(q);
    // Far apart the other way round (t noisier than s): the reciprocal ratio is >= 1.
    return -std::log1p(std::sin(-dth) / (alpha(t) * sigma(s)));
  }
  /// The official sampler's start time ("rho2t"): the t where sigma/alpha = (rho + sigma(0)) /
  /// alpha(0), an EDM-like noise level rho measured from t = 0 of this unnormalised schedule
  /// (rho = 80 gives t = 0.99598, abar = 1.562e-4; sampling does not start at t_max = 1).
  double t_start(double rho = 80.0) const {
    diffgrad::detail::require(rho > 0.0 && std::isfinite(rho), "BdmCosineSchedule::t_start", "rho",
                              "a positive finite noise level", rho);
    return t_of_lambda(-std::log((rho + sigma(0.0)) / alpha(0.0)));
  }
  /// d log alpha / dt = -theta' tan(theta).
  double f(double t) const {
    return -(sigma(t) / alpha(t)) * (std::numbers::pi / 2.0) / (1.0 + 2.0 * s_);
  }
  double g2(double t) const { return -2.0 * f(t); } // VP: d sigma^2/dt - 2 f sigma^2 = -2 f
  double model_time(double t) const { return scale_ * t; }
  Node node(double t) const {
    diffgrad::detail::check_time(t, t_min_, t_max_, "BdmCosineSchedule::node");
    return Node{t, alpha(t), sigma(t), lambda(t), model_time(t)};
  }

private:
  double s_, t_min_, t_max_, scale_;
};

/// One grid point of a BDM schedule: the base node (a(t), sigma(t), base log-SNR, model time)
/// and the per-frequency signal scales and log-SNRs (length H W, k = i W + j). Built once per
/// grid, outside the step loop (it holds two vectors).
struct BdmNode {
  Node base;
  Eigen::VectorXd alpha;  ///< alpha_k(t) = a(t) d_k(t)
  Eigen::VectorXd lambda; ///< lambda_k(t) = log(alpha_k(t) / sigma(t))
};

/// Per-frequency coefficients of one deterministic (q = 0, DDIM-like) gDDIM step s -> t:
/// y_t = x (.) y_s + eps (.) eps_y, (.) the element-wise product broadcast over batch rows.
struct BdmStepCoeffs {
  Eigen::VectorXd x;   ///< Psi_k(t, s) = alpha_k(t) / alpha_k(s)
  Eigen::VectorXd eps; ///< C_k(t, s) = R_t - Psi_k R_s = sigma_t - Psi_k sigma_s
};

/// q = 0 coefficients of a whole grid: row i is the step times[i] -> times[i + 1], one column
/// per frequency (k = i W + j).
struct BdmDdimTable {
  Eigen::MatrixXd x;   ///< Psi_k(times[i + 1], times[i])
  Eigen::MatrixXd eps; ///< C_k(times[i + 1], times[i])
};

/// The blurring diffusion schedule over H x W images on top of a scalar base schedule `Vp`
/// (a(t) = Vp::alpha, sigma(t) = Vp::sigma; the official code's is BdmCosineSchedule). The
/// blur clock sin^2(pi t/2) rises on [0, 1] only, so the base schedule's t_max must be <= 1.
template <Schedule Vp = BdmCosineSchedule> class BdmSchedule {
public:
  explicit BdmSchedule(Eigen::Index height, Eigen::Index width, double sigma_blur_max = 10.0,
                       double d_min = 0.001, Vp vp = Vp{})
      : vp_(std::move(vp)), h_(height), w_(width), sigma_blur_max_(sigma_blur_max), d_min_(d_min) {
    const char* where = "BdmSchedule";
    diffgrad::detail::require(height >= 1, where, "height", "an image height >= 1",
                              static_cast<double>(height));
    diffgrad::detail::require(width >= 1, where, "width", "an image width >= 1",
                              static_cast<double>(width));
    diffgrad::detail::require(sigma_blur_max >= 0.0 && std::isfinite(sigma_blur_max), where,
                              "sigma_blur_max", "a finite sigma_blur_max >= 0", sigma_blur_max);
    diffgrad::detail::require(d_min >= 0.0 && d_min < 1.0, where, "d_min", "0 <= d_min < 1", d_min);
    diffgrad::detail::require(
        vp_.t_max() <= 1.0, where, "vp",
        "a base schedule with t_max <= 1 (the blur sin^2(pi t/2) rises on [0, 1])", vp_.t_max());
    diffgrad::detail::require(vp_.t_min() > 0.0, where, "vp", "a base schedule with t_min > 0",
                              vp_.t_min());
    freq_.resize(h_ * w_);
    const double hd = static_cast<double>(h_), wd = static_cast<double>(w_);
    const double pi2 = std::numbers::pi * std::numbers::pi;
    for (Eigen::Index i = 0; i < h_; ++i)
      for (Eigen::Index j = 0; j < w_; ++j) {
        const double fi = static_cast<double>(i) / hd, fj = static_cast<double>(j) / wd;
        freq_[i * w_ + j] = pi2 * (fi * fi + fj * fj);
      }
    // The most blurred frequency at t_max must keep a normal alpha_k: with d_min = 0 a large
    // sigma_blur_max underflows d_k to 0, and then lambda_k = -inf and Psi_k = 0/0.
    const double lam_max = freq_[h_ * w_ - 1];
    const double x = lam_max * tau(vp_.t_max());
    const double log_d = d_min_ > 0.0 ? log_add_exp(std::log(d_min_), std::log1p(-d_min_) - x) : -x;
    const double log_alpha = std::log(vp_.alpha(vp_.t_max())) + log_d;
    if (!(log_alpha >= diffgrad::detail::kMinLogAlpha))
      throw diffgrad::invalid_argument(diffgrad::detail::concat(
          where, ": arguments 'sigma_blur_max', 'd_min', 'height', 'width' expected ",
          "log alpha_k(t_max) = log a(t_max) + log d_k(t_max) >= ", diffgrad::detail::kMinLogAlpha,
          " for the highest frequency (a normal double; otherwise alpha_k underflows to 0), got ",
          log_alpha, " (sigma_blur_max = ", sigma_blur_max, ", d_min = ", d_min,
          ", lambda_max = ", lam_max, ")"));
  }

  const Vp& vp() const { return vp_; }
  Eigen::Index height() const { return h_; }
  Eigen::Index width() const { return w_; }
  Eigen::Index size() const { return h_ * w_; } ///< number of frequencies, H W
  double sigma_blur_max() const { return sigma_blur_max_; }
  double d_min() const { return d_min_; }
  double t_min() const { return vp_.t_min(); }
  double t_max() const { return vp_.t_max(); }

  /// lambda_k = pi^2 (i^2/H^2 + j^2/W^2), k = i W + j (the heat equation's decay rates in the
  /// DCT basis with unit pixel spacing).
  const Eigen::VectorXd& frequencies() const { return freq_; }

  /// sigma_blur(t) = sigma_blur_max sin^2(pi t / 2).
  double blur_sigma(double t) const {
    const double sn = std::sin(std::numbers::pi * t / 2.0);
    return sigma_blur_max_ * sn * sn;
  }
  /// Dissipation time tau(t) = sigma_blur(t)^2 / 2.
  double tau(double t) const {
    const double sb = blur_sigma(t);
    return 0.5 * sb * sb;
  }

  double a(double t) const { return vp_.alpha(checked(t, "BdmSchedule::a")); } ///< sqrt(abar)
  double abar(double t) const {
    const double at = a(t);
    return at * at;
  }
  /// sigma(t): the isotropic noise scale, the same for every frequency.
  double sigma(double t) const { return vp_.sigma(checked(t, "BdmSchedule::sigma")); }
  /// gDDIM's R_t = sigma(t) I (diagonal in the DCT basis, equal to the Cholesky factor).
  double r(double t) const { return sigma(t); }

  /// d_k(t) for every frequency.
  void scaling(double t, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(t, "BdmSchedule::scaling");
    check_size(out, "BdmSchedule::scaling");
    const double ta = tau(t);
    for (Eigen::Index k = 0; k < size(); ++k) out[k] = d_of(freq_[k] * ta);
  }
  /// alpha_k(t) = a(t) d_k(t).
  void alpha(double t, Eigen::Ref<Eigen::VectorXd> out) const {
    const double at = a(t);
    check_size(out, "BdmSchedule::alpha");
    const double ta = tau(t);
    for (Eigen::Index k = 0; k < size(); ++k) out[k] = at * d_of(freq_[k] * ta);
  }
  /// lambda_k(t) = log(alpha_k(t)/sigma(t)) = lambda_base(t) + log d_k(t).
  void log_snr(double t, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(t, "BdmSchedule::log_snr");
    check_size(out, "BdmSchedule::log_snr");
    const double base = vp_.lambda(t), ta = tau(t);
    for (Eigen::Index k = 0; k < size(); ++k) out[k] = base + log_d_of(freq_[k] * ta);
  }
  /// Psi_k(t, s) = alpha_k(t) / alpha_k(s) (transition factor of frequency k from s to t).
  void transition(double t, double s, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(t, "BdmSchedule::transition");
    checked(s, "BdmSchedule::transition");
    check_size(out, "BdmSchedule::transition");
    const double ratio_a = vp_.alpha(t) / vp_.alpha(s);
    for (Eigen::Index k = 0; k < size(); ++k) {
      double ratio_d, log_ratio_d;
      d_ratio(k, s, t, ratio_d, log_ratio_d);
      out[k] = ratio_a * ratio_d;
    }
  }

  /// Deterministic gDDIM (q = 0) step s -> t per frequency: x_coef = Psi_k(t, s),
  /// eps_coef = C_k(t, s) = -sigma_t expm1(h_k), h_k = lambda_k(t) - lambda_k(s)
  /// = [lambda_base(t) - lambda_base(s)] + log(d_k(t)/d_k(s)). With a base schedule without
  /// step_h the base part is formed exactly as coeffs::ddim forms it from the base nodes, so
  /// sigma_blur_max = 0 reproduces the scalar DDIM coefficients bit for bit; with step_h it is
  /// the same number up to the node difference's rounding (which it avoids on short steps).
  /// Any s, t in the domain (t > s runs the step backwards).
  void ddim_coeffs(double s, double t, Eigen::Ref<Eigen::VectorXd> x_coef,
                   Eigen::Ref<Eigen::VectorXd> eps_coef) const {
    checked(s, "BdmSchedule::ddim_coeffs");
    checked(t, "BdmSchedule::ddim_coeffs");
    check_size(x_coef, "BdmSchedule::ddim_coeffs");
    check_size(eps_coef, "BdmSchedule::ddim_coeffs");
    const Node ns = vp_.node(s), nt = vp_.node(t);
    const double ratio_a = nt.alpha / ns.alpha;
    const double h_base = base_step_h(s, t);
    for (Eigen::Index k = 0; k < size(); ++k) {
      double ratio_d, log_ratio_d;
      d_ratio(k, s, t, ratio_d, log_ratio_d);
      x_coef[k] = ratio_a * ratio_d;
      eps_coef[k] = -nt.sigma * std::expm1(h_base + log_ratio_d);
    }
  }
  BdmStepCoeffs ddim_coeffs(double s, double t) const {
    BdmStepCoeffs c{Eigen::VectorXd(size()), Eigen::VectorXd(size())};
    ddim_coeffs(s, t, c.x, c.eps);
    return c;
  }

  /// Per-frequency step in log-SNR, h_k = lambda_k(t) - lambda_k(s), formed as ddim_coeffs
  /// forms it (base step_h when the base schedule has one, plus log(d_k(t)/d_k(s)) without
  /// cancellation), so h_k keeps full relative accuracy on short steps.
  void step_h(double s, double t, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(s, "BdmSchedule::step_h");
    checked(t, "BdmSchedule::step_h");
    check_size(out, "BdmSchedule::step_h");
    const double h_base = base_step_h(s, t);
    for (Eigen::Index k = 0; k < size(); ++k) {
      double ratio_d, log_ratio_d;
      d_ratio(k, s, t, ratio_d, log_ratio_d);
      out[k] = h_base + log_ratio_d;
    }
  }

  /// Stochastic gDDIM step s -> t (t < s) with stochasticity l in [0, 1], per frequency
  /// (Prop. 9 of the gDDIM paper written for one scalar frequency; docs/gddim_bdm.md):
  ///   y_t = Psi_k y_s + sigma_t (expm1(-l^2 h_k) - expm1(h_k)) eps_y
  ///         + sigma_t sqrt(-expm1(-2 l^2 h_k)) xi,               xi ~ N(0, I).
  /// l = 0 gives ddim_coeffs (noise 0); l = 1 the DDPM ancestral step per frequency.
  void stochastic_coeffs(double s, double t, double stochasticity,
                         Eigen::Ref<Eigen::VectorXd> x_coef, Eigen::Ref<Eigen::VectorXd> eps_coef,
                         Eigen::Ref<Eigen::VectorXd> noise_coef) const {
    const char* where = "BdmSchedule::stochastic_coeffs";
    diffgrad::detail::require(stochasticity >= 0.0 && stochasticity <= 1.0, where, "stochasticity",
                              "0 <= stochasticity <= 1", stochasticity);
    diffgrad::detail::require(t < s, where, "t", "t < s (a sampling step, noise to data)", t);
    check_size(noise_coef, where);
    ddim_coeffs(s, t, x_coef, eps_coef); // also checks s, t and the other sizes
    const double sigma_t = sigma(t), l2 = stochasticity * stochasticity;
    step_h(s, t, noise_coef); // h_k, overwritten below
    for (Eigen::Index k = 0; k < size(); ++k) {
      const double h = noise_coef[k];
      eps_coef[k] = sigma_t * (std::expm1(-l2 * h) - std::expm1(h));
      noise_coef[k] = sigma_t * std::sqrt(-std::expm1(-2.0 * l2 * h));
    }
  }

  /// Multistep (Adams-Bashforth in t) eps coefficients of the step s = points[0] -> t:
  ///   C_{j,k} = int_s^t Psi_k(t, r) G_k(r)^2 / (2 sigma(r)) l_j(r) dr,
  /// l_j the Lagrange basis in t over `points` (newest first: points[0] = s, then earlier,
  /// noisier times; 1..4 distinct points). The integrand is the PF-ODE's eps term, dy/dt =
  /// F_k y + G_k^2/(2 sigma) eps, integrated exactly against the transition factor; by the
  /// partition of unity sum_j C_{j,k} = C_k(t, s) (ddim_coeffs), which the tests check.
  /// Row j of `out` (points.size() x H W) is C_j. Evaluated by adaptive Gauss-Kronrod (7, 15)
  /// on the whole vector of integrands: a panel is accepted when |K15 - G7| (a pessimistic
  /// bound on the K15 error) is below 1e-13 |C_k| times the panel's share of the step for
  /// every (j, k). Host code, allocates: for building per-grid tables before a step loop.
  void multistep_coeffs(std::span<const double> points, double t,
                        Eigen::Ref<Eigen::MatrixXd> out) const {
    const char* where = "BdmSchedule::multistep_coeffs";
    const auto q = static_cast<Eigen::Index>(points.size());
    diffgrad::detail::require(
        q >= 1 && q <= diffgrad::coeffs::kDeisMaxPoints, where, "points",
        diffgrad::detail::concat("1..", diffgrad::coeffs::kDeisMaxPoints, " points"),
        static_cast<double>(q));
    for (std::size_t j = 0; j < points.size(); ++j) {
      checked(points[j], where);
      for (std::size_t m = 0; m < j; ++m)
        if (points[m] == points[j])
          diffgrad::detail::throw_argument(where, "points", "distinct interpolation times",
                                           points[j]);
    }
    checked(t, where);
    diffgrad::detail::require(t != points[0], where, "t", "t != points[0] (a step of length > 0)",
                              t);
    if (out.rows() != q || out.cols() != size())
      diffgrad::detail::throw_argument(where, "out",
                                       diffgrad::detail::concat("a ", q, " x ", size(), " matrix"),
                                       diffgrad::detail::concat(out.rows(), " x ", out.cols()));
    const double s = points[0];
    const Eigen::Index n = size();
    Eigen::VectorXd psi(n), c_closed(n), alpha_t(n), alpha_r(n), g2_r(n);
    ddim_coeffs(s, t, psi, c_closed);
    alpha(t, alpha_t);
    // f(r) -> q x n values (row j: l_j(r) Psi_k(t, r) G_k^2(r) / (2 sigma(r))).
    const auto integrand = [&](double r, Eigen::MatrixXd& f) {
      alpha(r, alpha_r);
      diffusion2(r, g2_r);
      const double half_inv_sigma = 0.5 / sigma(r);
      std::array<double, diffgrad::coeffs::kDeisMaxPoints> l{};
      diffgrad::coeffs::lagrange_basis(points.data(), static_cast<int>(q), r, l.data());
      for (Eigen::Index k = 0; k < n; ++k) {
        const double base = alpha_t[k] / alpha_r[k] * g2_r[k] * half_inv_sigma;
        for (Eigen::Index j = 0; j < q; ++j) f(j, k) = l[static_cast<std::size_t>(j)] * base;
      }
    };
    out.setZero();
    Eigen::MatrixXd kron(q, n), gauss(q, n), f(q, n);
    const double total = std::abs(t - s);
    std::vector<std::pair<double, double>> todo{{s, t}};
    int panels = 0;
    constexpr int kMaxPanels = 20000;
    while (!todo.empty()) {
      const auto [a, b] = todo.back();
      todo.pop_back();
      ++panels;
      const double c = 0.5 * (a + b), r = 0.5 * (b - a);
      kron.setZero();
      gauss.setZero();
      for (int node = 0; node < 8; ++node) {
        const auto ns = static_cast<std::size_t>(node);
        for (int side = 0; side < (node == 7 ? 1 : 2); ++side) {
          integrand(side == 0 ? c - r * diffgrad::coeffs::detail::kXgk[ns]
                              : c + r * diffgrad::coeffs::detail::kXgk[ns],
                    f);
          kron += diffgrad::coeffs::detail::kWgk[ns] * f;
          if (node % 2 == 1) gauss += diffgrad::coeffs::detail::kWg[ns / 2] * f;
        }
      }
      kron *= r;
      gauss *= r;
      const double share = std::abs(b - a) / total;
      bool accept = true;
      for (Eigen::Index k = 0; k < n && accept; ++k) {
        const double tol = 1e-13 * std::abs(c_closed[k]) * share;
        for (Eigen::Index j = 0; j < q; ++j)
          if (std::abs(kron(j, k) - gauss(j, k)) > tol) {
            accept = false;
            break;
          }
      }
      // Stop splitting when the panel no longer halves in double or the budget is spent;
      // the K15 value is then still far more accurate than the |K15 - G7| bound says.
      if (!accept && panels < kMaxPanels && c != a && c != b) {
        todo.emplace_back(a, c);
        todo.emplace_back(c, b);
      } else {
        out += kron;
      }
    }
  }

  /// The q = 0 coefficients of a whole grid, built once before a step loop: row i of x and
  /// eps holds Psi_k and C_k of the step times[i] -> times[i + 1]. `times` must be strictly
  /// decreasing (noise to data) inside the domain, at least two points.
  BdmDdimTable ddim_table(std::span<const double> times) const {
    const char* where = "BdmSchedule::ddim_table";
    diffgrad::detail::require(times.size() >= 2, where, "times", "at least 2 time points",
                              static_cast<double>(times.size()));
    for (std::size_t i = 0; i < times.size(); ++i) {
      checked(times[i], where);
      if (i > 0 && !(times[i] < times[i - 1]))
        diffgrad::detail::throw_argument(
            where, "times",
            diffgrad::detail::concat("strictly decreasing times (noise to data); at ", "index ", i,
                                     " after ", times[i - 1]),
            times[i]);
    }
    const auto steps = static_cast<Eigen::Index>(times.size() - 1);
    BdmDdimTable table{Eigen::MatrixXd(steps, size()), Eigen::MatrixXd(steps, size())};
    Eigen::VectorXd x(size()), e(size());
    for (Eigen::Index i = 0; i < steps; ++i) {
      const auto u = static_cast<std::size_t>(i);
      ddim_coeffs(times[u], times[u + 1], x, e);
      table.x.row(i) = x.transpose();
      table.eps.row(i) = e.transpose();
    }
    return table;
  }

  /// SDE form (the gDDIM thesis' BDM equation), per frequency:
  ///   F_k(t) = d log alpha_k / dt = f_base(t) + d log d_k / dt,
  ///   G_k(t)^2 = d sigma^2/dt - 2 F_k sigma^2 = g2_base(t) - 2 sigma^2 d log d_k / dt.
  /// For the PF-ODE / Euler / Euler-Maruyama baselines; the gDDIM step itself needs neither.
  void drift(double t, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(t, "BdmSchedule::drift");
    check_size(out, "BdmSchedule::drift");
    const double f = vp_.f(t);
    for (Eigen::Index k = 0; k < size(); ++k) out[k] = f + dlog_d_dt(k, t);
  }
  void diffusion2(double t, Eigen::Ref<Eigen::VectorXd> out) const {
    checked(t, "BdmSchedule::diffusion2");
    check_size(out, "BdmSchedule::diffusion2");
    const double g2 = vp_.g2(t), sg = vp_.sigma(t);
    for (Eigen::Index k = 0; k < size(); ++k) out[k] = g2 - 2.0 * sg * sg * dlog_d_dt(k, t);
  }

  /// Everything a step engine needs at one time, per frequency (allocates two vectors).
  BdmNode node(double t) const {
    BdmNode n{vp_.node(checked(t, "BdmSchedule::node")), Eigen::VectorXd(size()),
              Eigen::VectorXd(size())};
    alpha(t, n.alpha);
    log_snr(t, n.lambda);
    return n;
  }

private:
  /// lambda_base(t) - lambda_base(s): a base schedule that knows it without cancellation
  /// provides step_h (BdmCosineSchedule does); otherwise the node difference, exactly as
  /// coeffs::ddim forms it.
  double base_step_h(double s, double t) const {
    if constexpr (requires { vp_.step_h(s, t); })
      return vp_.step_h(s, t);
    else
      return vp_.node(t).lambda - vp_.node(s).lambda;
  }

  double checked(double t, const char* where) const {
    diffgrad::detail::check_time(t, vp_.t_min(), vp_.t_max(), where);
    return t;
  }
  void check_size(const Eigen::Ref<Eigen::VectorXd>& v, const char* where) const {
    if (v.size() != size())
      diffgrad::detail::throw_argument(
          where, "out", diffgrad::detail::concat("a vector of H W = ", size(), " frequencies"),
          diffgrad::detail::concat("size ", v.size()));
  }
  static double log_add_exp(double p, double q) {
    const double m = std::max(p, q);
    return m + std::log1p(std::exp(-std::abs(p - q)));
  }

  /// d = (1 - d_min) e^{-x} + d_min. Near d = 1 (x < ln 2) it is 1 + (1 - d_min) expm1(-x): exact
  /// 1 at x = 0 and full relative precision for weak blur; for strong blur the plain sum of
  /// two positive terms has no cancellation (the expm1 form would lose digits as d -> d_min).
  double d_of(double x) const {
    return x < std::numbers::ln2 ? 1.0 + (1.0 - d_min_) * std::expm1(-x)
                                 : d_min_ + (1.0 - d_min_) * std::exp(-x);
  }
  double log_d_of(double x) const {
    return x < std::numbers::ln2 ? std::log1p((1.0 - d_min_) * std::expm1(-x))
                                 : std::log(d_min_ + (1.0 - d_min_) * std::exp(-x));
  }

  /// d_k(t)/d_k(s) and its log without cancellation for t close to s:
  ///   d_k(t) - d_k(s) = (1 - d_min) e^{-lambda_k tau(s)} expm1(-lambda_k [tau(t) - tau(s)]),
  ///   tau(t) - tau(s) = sigma_blur_max^2/2 (sin^2 A - sin^2 B)(sin^2 A + sin^2 B),
  ///   sin^2 A - sin^2 B = sin(A - B) sin(A + B),  A = pi t/2, B = pi s/2.
  void d_ratio(Eigen::Index k, double s, double t, double& ratio, double& log_ratio) const {
    const double A = std::numbers::pi * t / 2.0, B = std::numbers::pi * s / 2.0;
    const double sa = std::sin(A), sb = std::sin(B);
    const double dtau = 0.5 * sigma_blur_max_ * sigma_blur_max_ *
                        std::sin(0.5 * std::numbers::pi * (t - s)) * std::sin(A + B) *
                        (sa * sa + sb * sb);
    const double lam = freq_[k];
    const double ds = d_of(lam * tau(s));
    const double q = (1.0 - d_min_) * std::exp(-lam * tau(s)) * std::expm1(-lam * dtau) / ds;
    if (std::abs(q) < 0.5) { // 1 + q has no cancellation
      ratio = 1.0 + q;
      log_ratio = std::log1p(q);
    } else { // far from 1: the plain quotient is accurate, 1 + q would lose digits near q = -1
      ratio = d_of(lam * tau(t)) / ds;
      log_ratio = std::log(ratio);
    }
  }

  /// d log d_k / dt = -(1 - d_min) e^{-lambda_k tau} lambda_k tau'(t) / d_k, with
  /// tau' = sigma_blur sigma_blur', sigma_blur' = sigma_blur_max (pi/2) sin(pi t).
  double dlog_d_dt(Eigen::Index k, double t) const {
    const double x = freq_[k] * tau(t);
    const double dtau =
        blur_sigma(t) * sigma_blur_max_ * (std::numbers::pi / 2.0) * std::sin(std::numbers::pi * t);
    return -(1.0 - d_min_) * std::exp(-x) * freq_[k] * dtau / d_of(x);
  }

  Vp vp_;
  Eigen::Index h_, w_;
  double sigma_blur_max_, d_min_;
  Eigen::VectorXd freq_;
};

/// Reference host step in the DCT basis: out.row(b) = x (.) y.row(b) + eps (.) e.row(b). The
/// engine will fuse this into one pass; this is the definition it is tested against.
inline void apply_diagonal_step(const Eigen::VectorXd& x_coef, const Eigen::VectorXd& eps_coef,
                                const ImageBatch& y, const ImageBatch& e, ImageBatch& out) {
  const char* where = "apply_diagonal_step";
  const Eigen::Index n = x_coef.size();
  if (eps_coef.size() != n)
    diffgrad::detail::throw_argument(where, "eps_coef",
                                     diffgrad::detail::concat("size ", n, " (that of x_coef)"),
                                     diffgrad::detail::concat("size ", eps_coef.size()));
  if (y.cols() != n)
    diffgrad::detail::throw_argument(where, "y",
                                     diffgrad::detail::concat(n, " columns (one per frequency)"),
                                     diffgrad::detail::concat(y.cols(), " columns"));
  if (e.rows() != y.rows() || e.cols() != n)
    diffgrad::detail::throw_argument(
        where, "e", diffgrad::detail::concat("the shape of 'y' (", y.rows(), " x ", n, ")"),
        diffgrad::detail::concat(e.rows(), " x ", e.cols()));
  if (out.rows() != y.rows() || out.cols() != n)
    diffgrad::detail::throw_argument(
        where, "out", diffgrad::detail::concat("the shape of 'y' (", y.rows(), " x ", n, ")"),
        diffgrad::detail::concat(out.rows(), " x ", out.cols()));
  for (Eigen::Index b = 0; b < y.rows(); ++b)
    out.row(b) =
        y.row(b).cwiseProduct(x_coef.transpose()) + e.row(b).cwiseProduct(eps_coef.transpose());
}

} // namespace diffgrad::gddim
