#pragma once
// Scalar coefficients of exponential integrators, in double, written so the two hazards
// are handled on purpose: h -> 0 (use expm1, never e^h - 1) and lambda_t = +inf (a final
// node with sigma_t = 0, where sigma_t (e^h - 1) is 0 * inf and must be taken as its limit).
#include <cmath>

#include "diffgrad/schedule/node.hpp"

namespace diffgrad::coeffs {

/// h = lambda_t - lambda_s (positive when sampling towards data).
inline double step_h(const Node& s, const Node& t) { return t.lambda - s.lambda; }

/// sigma_t * (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t, finite in the sigma_t = 0 limit.
inline double sigma_expm1(const Node& s, const Node& t) {
  const double h = step_h(s, t);
  if (t.sigma == 0.0 || !std::isfinite(h)) return t.alpha * s.sigma / s.alpha - t.sigma;
  return t.sigma * std::expm1(h);
}

/// alpha_t * (e^{-h} - 1) = sigma_t alpha_s / sigma_s - alpha_t, the data-prediction twin.
inline double alpha_expm1_neg(const Node& s, const Node& t) {
  const double h = step_h(s, t);
  if (!std::isfinite(h)) return -t.alpha; // e^{-inf} - 1 = -1
  return t.alpha * std::expm1(-h);
}

/// phi_k(h) = sum_{n >= 0} h^n / (n + k)!:  phi_1(h) = (e^h - 1)/h, phi_2(h) = (phi_1(h) - 1)/h,
/// phi_3(h) = (phi_2(h) - 1/2)/h; phi_k(0) = 1/k!, phi_k(-inf) = 0.
///
/// The recurrences subtract nearly equal numbers when |h| is small: phi_2 loses about
/// log2(2/|h|) bits and phi_3 about log2(6/|h|) (a Taylor series truncated after a few terms
/// below a fixed switch point left relative errors of 2.9e-13 in phi_2 near |h| = 1e-3 and
/// 1.1e-12 in phi_3 near |h| = 2e-2). So for |h| <= 1 every phi_k is the power series itself, summed by
/// Horner to 1/(k + 19)! < 2^-61, which is accurate to a few ulps for every such h (for h < 0
/// the alternating terms shrink monotonically from 1/k!, so the sum loses at most about one
/// bit); for |h| > 1 the recurrences lose at most a few bits and are used as they stand.
namespace detail_phi {
/// sum_{n=0}^{19} h^n / (n + k)! by Horner, for |h| <= 1.
inline double phi_series(double h, int k) {
  constexpr int kTerms = 20;
  double sum = 0.0;
  // Horner from the highest term: sum = 1/(k)! (1 + h/(k+1) (1 + h/(k+2) (1 + ...))).
  for (int n = kTerms - 1; n >= 1; --n) sum = (1.0 + sum) * h / static_cast<double>(n + k);
  double inv_factorial = 1.0;
  for (int j = 2; j <= k; ++j) inv_factorial /= static_cast<double>(j);
  return (1.0 + sum) * inv_factorial;
}
} // namespace detail_phi

inline double phi1(double h) {
  if (std::abs(h) <= 1.0) return detail_phi::phi_series(h, 1);
  return std::expm1(h) / h;
}
inline double phi2(double h) {
  if (std::abs(h) <= 1.0) return detail_phi::phi_series(h, 2);
  return (phi1(h) - 1.0) / h;
}
inline double phi3(double h) {
  if (std::abs(h) <= 1.0) return detail_phi::phi_series(h, 3);
  return (phi2(h) - 0.5) / h;
}

} // namespace diffgrad::coeffs
