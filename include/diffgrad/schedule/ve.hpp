#pragma once
// VE-SDE (Song et al.): alpha = 1, sigma = s_min (s_max / s_min)^t, t in [t_min, 1].
#include <cmath>

#include "diffgrad/schedule/detail_vp.hpp"

namespace diffgrad {

class VESchedule {
public:
  explicit VESchedule(double sigma_min = 0.01, double sigma_max = 50.0, double t_min = 1e-5,
                      double t_max = 1.0)
      : smin_(sigma_min), smax_(sigma_max), t_min_(t_min), t_max_(t_max),
        log_ratio_(std::log(sigma_max / sigma_min)) {
    detail::require(sigma_min > 0, "VESchedule", "sigma_min", "sigma_min > 0", sigma_min);
    detail::require(sigma_max > sigma_min && std::isfinite(sigma_max), "VESchedule", "sigma_max",
                    "a finite sigma_max > sigma_min", sigma_max);
    detail::require(std::isfinite(t_max), "VESchedule", "t_max", "a finite number", t_max);
    detail::require(t_min >= 0 && t_min < t_max, "VESchedule", "t_min", "0 <= t_min < t_max",
                    t_min);
    // sigma grows as (sigma_max/sigma_min)^t: for t_max > 1 it can overflow, and g2 = 2 log r
    // sigma^2 with it. Refuse at construction what would be an Inf node or SDE coefficient.
    const double log_sigma_max = std::log(sigma_min) + t_max * log_ratio_;
    if (!(std::isfinite(g2(t_max)) && std::isfinite(sigma(t_max))))
      throw invalid_argument(detail::concat(
          "VESchedule: arguments 'sigma_min', 'sigma_max', 't_max' expected sigma(t_max) = ",
          "sigma_min (sigma_max/sigma_min)^t_max with a finite square (log sigma(t_max) < 354), ",
          "got log sigma(t_max) = ", log_sigma_max, " (sigma_min = ", sigma_min,
          ", sigma_max = ", sigma_max, ", t_max = ", t_max, ")"));
  }
  double t_min() const { return t_min_; }
  double t_max() const { return t_max_; }
  double sigma_min() const { return smin_; }
  double sigma_max() const { return smax_; }
  double alpha(double) const { return 1.0; }
  double sigma(double t) const { return smin_ * std::exp(t * log_ratio_); }
  double lambda(double t) const { return -std::log(smin_) - t * log_ratio_; }
  double t_of_lambda(double lambda) const { return (-lambda - std::log(smin_)) / log_ratio_; }
  double f(double) const { return 0.0; }
  double g2(double t) const { return 2.0 * log_ratio_ * sigma(t) * sigma(t); }
  double model_time(double t) const { return t; }
  Node node(double t) const {
    detail::check_time(t, t_min_, t_max_, "VESchedule::node");
    return Node{t, 1.0, sigma(t), lambda(t), model_time(t)};
  }

private:
  double smin_, smax_, t_min_, t_max_, log_ratio_;
};

} // namespace diffgrad
