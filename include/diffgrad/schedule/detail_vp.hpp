#pragma once
// Shared variance-preserving arithmetic: everything follows from log alpha, computed so
// that t -> 0 (alpha -> 1, sigma -> 0) keeps full relative precision.
#include <cmath>

#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::detail {

/// sigma = sqrt(1 - alpha^2) without cancellation near alpha = 1.
inline double vp_sigma(double log_alpha) { return std::sqrt(-std::expm1(2.0 * log_alpha)); }

/// lambda = log alpha - 0.5 log(1 - alpha^2).
inline double vp_lambda(double log_alpha) {
  return log_alpha - 0.5 * std::log(-std::expm1(2.0 * log_alpha));
}

/// Inverse of vp_lambda: log alpha = -0.5 log(1 + e^{-2 lambda}), stable for both signs.
inline double vp_log_alpha_of_lambda(double lambda) {
  const double m = -2.0 * lambda;
  return m > 0 ? -0.5 * (m + std::log1p(std::exp(-m))) : -0.5 * std::log1p(std::exp(m));
}

inline void check_time(double t, double lo, double hi, const char* where) {
  if (!(t >= lo - 1e-12 * (1.0 + std::abs(lo)) && t <= hi + 1e-12 * (1.0 + std::abs(hi))))
    throw_argument(where, "t", concat("a time in the schedule's domain [", lo, ", ", hi, "]"), t);
}

} // namespace diffgrad::detail
