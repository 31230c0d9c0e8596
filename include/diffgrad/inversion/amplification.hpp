#pragma once
// Stability diagnostic of exact inversion. Every exactly invertible sampler here has a
// mode that the forward pass damps and the inverse pass therefore amplifies:
//   BDIA-DDIM   the oscillating (-1)^k mode of its two-step recurrence, by 1/gamma per step
//               (the recurrence z' = gamma z_prev + (1 - gamma) z + O(h) has roots 1 and
//               -gamma; the inverse has 1 and -1/gamma);
//   EDICT       the x - y difference, by 1/p^2 per step (the mixing layer has eigenvalues
//               1 and p^2);
//   coupling    the y - z difference, by 1/c per step (y' - z' = c (y - z) + O(h)).
// These factors are exact to leading order in the step size and independent of the model.
// Rounding errors of the inversion ride on that mode, so the latent is only as accurate as
// (machine epsilon) x (total growth); a round trip stays accurate because the forward pass
// damps the same mode again. The report lets callers warn or refuse before doing the work.
#include <cmath>
#include <functional>
#include <limits>

#include "diffgrad/core/error.hpp"

namespace diffgrad {

/// What to do when the predicted growth of an inversion exceeds the threshold.
enum class AmplificationPolicy {
  ignore, ///< compute and report only
  warn,   ///< set AmplificationReport::warned and call the on_warning callback (if any)
  refuse  ///< throw diffgrad::numerical_error before any model call
};

struct AmplificationReport {
  const char* method = "";
  double per_step = 1.0;  ///< growth factor of the amplified mode per inverse step
  int steps = 0;          ///< number of inverse steps that amplify
  double total = 1.0;     ///< per_step^steps (+inf when it overflows double)
  double threshold = 1e6; ///< the threshold it was compared against
  bool exceeded = false;  ///< total > threshold
  bool warned = false;    ///< exceeded under AmplificationPolicy::warn
  /// Decimal digits of the latent that rounding can spoil: log10(total).
  double log10_total() const { return static_cast<double>(steps) * std::log10(per_step); }
};

struct AmplificationOptions {
  double threshold = 1e6; ///< total growth that triggers the policy
  AmplificationPolicy policy = AmplificationPolicy::warn;
  std::function<void(const AmplificationReport&)> on_warning{}; ///< called under `warn`
};

namespace coeffs {
/// Leading-order growth per inverse step of the mode each method damps (see file comment).
inline double bdia_amplification_per_step(double gamma) { return 1.0 / gamma; }
inline double edict_amplification_per_step(double p) { return 1.0 / (p * p); }
inline double coupling_amplification_per_step(double c) { return 1.0 / c; }
} // namespace coeffs

/// per_step^steps, computed in log space so huge growth reads +inf instead of wrapping.
inline AmplificationReport make_amplification_report(const char* method, double per_step, int steps,
                                                     double threshold) {
  AmplificationReport r;
  r.method = method;
  r.per_step = per_step;
  r.steps = steps;
  r.threshold = threshold;
  const double log_total = static_cast<double>(steps) * std::log(per_step);
  r.total = log_total > std::log(std::numeric_limits<double>::max())
                ? std::numeric_limits<double>::infinity()
                : std::exp(log_total);
  r.exceeded = r.total > threshold;
  return r;
}

inline void validate_amplification_options(const AmplificationOptions& o, const char* where) {
  detail::require(o.threshold >= 1.0 && !std::isnan(o.threshold), where, "amplification.threshold",
                  "a threshold >= 1", o.threshold);
}

/// Applies an AmplificationPolicy to a diagnostic report that has exceeded its limit: ignore,
/// warn (set `report.warned`, call `on_warning(report)` if set) or refuse (throw
/// numerical_error with `refusal_message()`). Shared by the inversion amplification report
/// and the continuous adjoints' step-size stability report.
template <class Report, class OnWarning, class RefusalMessage>
void apply_amplification_policy(AmplificationPolicy policy, Report& report,
                                const OnWarning& on_warning, RefusalMessage&& refusal_message) {
  switch (policy) {
  case AmplificationPolicy::ignore: return;
  case AmplificationPolicy::warn:
    report.warned = true;
    if (on_warning) on_warning(report);
    return;
  case AmplificationPolicy::refuse: throw numerical_error(refusal_message());
  }
}

/// Applies the policy: may throw numerical_error (refuse) or flag and call back (warn).
inline void enforce_amplification(AmplificationReport& r, const AmplificationOptions& o) {
  if (!r.exceeded) return;
  apply_amplification_policy(o.policy, r, o.on_warning, [&] {
    return detail::concat(
        r.method, " inversion: predicted amplification ", r.total, " (", r.per_step,
        " per step over ", r.steps, " steps) exceeds the threshold ", r.threshold,
        "; rounding errors would grow by that factor. Use a parameter closer to 1 (BDIA "
        "gamma >= 0.9, EDICT p >= 0.9, coupling c >= 0.99), fewer steps, or raise "
        "amplification.threshold");
  });
}

} // namespace diffgrad
