#pragma once
// VP cosine schedule (Nichol & Dhariwal 2021, s = 0.008):
// alpha_t = cos((t + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2).
// As t -> 1 alpha -> 0 and lambda -> -inf; like the official DPM-Solver code the default end
// time is T = 0.9946, where alpha = 0.0084 and lambda = -4.78 (diffusers instead clips
// lambda at lambda_min_clipped, -5.1 in its cosine-schedule setups).
#include <cmath>
#include <numbers>

#include "diffgrad/schedule/detail_vp.hpp"

namespace diffgrad {

class VPCosineSchedule {
public:
  explicit VPCosineSchedule(double s = 0.008, double t_min = 1e-3, double t_max = 0.9946)
      : s_(s), t_min_(t_min), t_max_(t_max),
        log_alpha0_(std::log(std::cos(s / (1.0 + s) * std::numbers::pi / 2.0))) {
    detail::require(s > 0 && s < 1, "VPCosineSchedule", "s", "0 < s < 1", s);
    detail::require(t_min > 0 && t_min < 1.0, "VPCosineSchedule", "t_min", "0 < t_min < 1", t_min);
    detail::require(t_max < 1.0 && t_max > t_min, "VPCosineSchedule", "t_max",
                    "t_min < t_max < 1 (alpha vanishes at t = 1)", t_max);
    // alpha(t_max) > 0 for every t_max < 1 in double, but a t_min so small that 1 - alpha^2
    // rounds to 0 (t_min < ~1e-321) gives lambda(t_min) = +inf.
    detail::check_vp_extremes("VPCosineSchedule", log_alpha(t_min), "'s', 't_min'",
                              "log(cos((t_min + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2))",
                              log_alpha(t_max), "'s', 't_max'",
                              "log(cos((t_max + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2))",
                              detail::concat("s = ", s, ", t_min = ", t_min, ", t_max = ", t_max));
  }
  double t_min() const { return t_min_; }
  double t_max() const { return t_max_; }
  /// log(cos(a + d)/cos(a)) with a = s/(1+s) pi/2, d = t/(1+s) pi/2, written as
  /// log1p(-2 sin(a + d/2) sin(d/2) / cos(a)): the difference of two logs would cancel as
  /// t -> 0 (about 1e-12 relative error in sigma at t = 1e-3, 1e-6 at t = 1e-9).
  double log_alpha(double t) const {
    const double a = s_ / (1.0 + s_) * std::numbers::pi / 2.0;
    const double d = t / (1.0 + s_) * std::numbers::pi / 2.0;
    return std::log1p(-2.0 * std::sin(a + 0.5 * d) * std::sin(0.5 * d) / std::cos(a));
  }
  double alpha(double t) const { return std::exp(log_alpha(t)); }
  double sigma(double t) const { return detail::vp_sigma(log_alpha(t)); }
  double lambda(double t) const { return detail::vp_lambda(log_alpha(t)); }
  double t_of_lambda(double lambda) const {
    const double la = detail::vp_log_alpha_of_lambda(lambda);
    return 2.0 * (1.0 + s_) / std::numbers::pi * std::acos(std::exp(la + log_alpha0_)) - s_;
  }
  double f(double t) const {
    return -std::numbers::pi / (2.0 * (1.0 + s_)) *
           std::tan((t + s_) / (1.0 + s_) * std::numbers::pi / 2.0);
  }
  double g2(double t) const { return -2.0 * f(t); } // VP: g^2 = beta = -2 f
  double model_time(double t) const { return t; }
  Node node(double t) const {
    detail::check_time(t, t_min_, t_max_, "VPCosineSchedule::node");
    const double la = log_alpha(t);
    return Node{t, std::exp(la), detail::vp_sigma(la), detail::vp_lambda(la), model_time(t)};
  }

private:
  double s_, t_min_, t_max_, log_alpha0_;
};

} // namespace diffgrad
