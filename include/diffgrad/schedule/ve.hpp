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
    detail::require(sigma_max > sigma_min, "VESchedule", "sigma_max", "sigma_max > sigma_min",
                    sigma_max);
    detail::require(t_min >= 0 && t_min < t_max, "VESchedule", "t_min", "0 <= t_min < t_max",
                    t_min);
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
