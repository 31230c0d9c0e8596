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
  if (!std::isfinite(h)) return -t.alpha;  // e^{-inf} - 1 = -1
  return t.alpha * std::expm1(-h);
}

/// phi_1(h) = (e^h - 1)/h, phi_2(h) = (phi_1(h) - 1)/h, phi_3(h) = (phi_2(h) - 1/2)/h, with
/// Taylor series for small |h| where the recurrences cancel catastrophically.
inline double phi1(double h) {
  if (std::abs(h) < 1e-5) return 1.0 + h / 2.0 + h * h / 6.0;
  return std::expm1(h) / h;
}
inline double phi2(double h) {
  if (std::abs(h) < 1e-3) return 0.5 + h / 6.0 + h * h / 24.0 + h * h * h / 120.0;
  return (phi1(h) - 1.0) / h;
}
inline double phi3(double h) {
  if (std::abs(h) < 2e-2)
    return 1.0 / 6.0 + h / 24.0 + h * h / 120.0 + h * h * h / 720.0 + h * h * h * h / 5040.0;
  return (phi2(h) - 0.5) / h;
}

} // namespace diffgrad::coeffs
