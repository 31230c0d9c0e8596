#pragma once
// Shared variance-preserving arithmetic: everything follows from log alpha, computed so
// that t -> 0 (alpha -> 1, sigma -> 0) keeps full relative precision.
#include <cmath>
#include <string>

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

/// The smallest log alpha whose alpha is a normal double: below it alpha loses precision and
/// then underflows to 0, lambda goes to -inf and every step coefficient with 1/alpha is NaN.
inline constexpr double kMinLogAlpha = -708.39641853226408; // log(DBL_MIN)

/// Refuses, at construction, VP-type parameters whose extreme nodes are not representable:
/// at t_max alpha must stay a normal double (log alpha >= kMinLogAlpha), at t_min the noise
/// 1 - alpha^2 must not round to 0 (lambda(t_min) = +inf). `params_*` name the arguments
/// each end depends on and `formula_*` how, so the message says what to change.
inline void check_vp_extremes(const char* where, double log_alpha_t_min, const char* params_min,
                              const char* formula_min, double log_alpha_t_max,
                              const char* params_max, const char* formula_max,
                              const std::string& given) {
  if (!(log_alpha_t_max >= kMinLogAlpha))
    throw invalid_argument(concat(
        where, ": arguments ", params_max, " expected log alpha(t_max) = ", formula_max,
        " >= ", kMinLogAlpha, " (alpha(t_max) a normal double: below it alpha underflows to 0 and ",
        "lambda to -inf), got ", log_alpha_t_max, " (", given, ")"));
  if (!(-std::expm1(2.0 * log_alpha_t_min) > 0.0))
    throw invalid_argument(concat(
        where, ": arguments ", params_min, " expected log alpha(t_min) = ", formula_min,
        " < 0 with 1 - alpha(t_min)^2 > 0 in double (else sigma(t_min) = 0 and lambda(t_min) = ",
        "+inf), got ", log_alpha_t_min, " (", given, ")"));
}

inline void check_time(double t, double lo, double hi, const char* where) {
  if (!(t >= lo - 1e-12 * (1.0 + std::abs(lo)) && t <= hi + 1e-12 * (1.0 + std::abs(hi))))
    throw_argument(where, "t", concat("a time in the schedule's domain [", lo, ", ", hi, "]"), t);
}

} // namespace diffgrad::detail
