#pragma once
// VP-SDE with linear beta(t) = b0 + (b1 - b0) t (Song et al., ScoreSDE):
// log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2.
#include <cmath>

#include "diffgrad/schedule/detail_vp.hpp"

namespace diffgrad {

class VPLinearSchedule {
public:
  explicit VPLinearSchedule(double beta_min = 0.1, double beta_max = 20.0, double t_min = 1e-3,
                            double t_max = 1.0)
      : VPLinearSchedule("VPLinearSchedule", beta_min, beta_max, t_min, t_max) {}
  double t_min() const { return t_min_; }
  double t_max() const { return t_max_; }
  double log_alpha(double t) const { return -0.25 * (b1_ - b0_) * t * t - 0.5 * b0_ * t; }
  double alpha(double t) const { return std::exp(log_alpha(t)); }
  double sigma(double t) const { return detail::vp_sigma(log_alpha(t)); }
  double lambda(double t) const { return detail::vp_lambda(log_alpha(t)); }
  double t_of_lambda(double lambda) const {
    const double L = -detail::vp_log_alpha_of_lambda(lambda); // L = -log alpha >= 0
    return 4.0 * L / (b0_ + std::sqrt(b0_ * b0_ + 4.0 * (b1_ - b0_) * L));
  }
  double f(double t) const { return -0.5 * (b0_ + (b1_ - b0_) * t); }
  double g2(double t) const { return b0_ + (b1_ - b0_) * t; } // beta(t)
  double model_time(double t) const { return t; }
  Node node(double t) const {
    detail::check_time(t, t_min_, t_max_, "VPLinearSchedule::node");
    const double la = log_alpha(t);
    return Node{t, std::exp(la), detail::vp_sigma(la), detail::vp_lambda(la), model_time(t)};
  }

private:
  friend class SubVPSchedule; // validates under its own name

  /// Every check names the arguments in the constructor of `where`. The extreme nodes are
  /// computed here, once, so alpha underflowing at t_max (e.g. beta_max = 3000) is refused
  /// by name instead of surfacing as a NaN model output at the first step.
  VPLinearSchedule(const char* where, double beta_min, double beta_max, double t_min, double t_max)
      : b0_(beta_min), b1_(beta_max), t_min_(t_min), t_max_(t_max) {
    detail::require(beta_min > 0 && std::isfinite(beta_min), where, "beta_min",
                    "a positive finite number", beta_min);
    detail::require(beta_max >= beta_min && std::isfinite(beta_max), where, "beta_max",
                    "a finite number >= beta_min", beta_max);
    detail::require(std::isfinite(t_max), where, "t_max", "a finite number", t_max);
    detail::require(t_min > 0 && t_min < t_max, where, "t_min", "0 < t_min < t_max", t_min);
    detail::check_vp_extremes(where, log_alpha(t_min), "'beta_min', 'beta_max', 't_min'",
                              "-(beta_max - beta_min) t_min^2 / 4 - beta_min t_min / 2",
                              log_alpha(t_max), "'beta_min', 'beta_max', 't_max'",
                              "-(beta_max - beta_min) t_max^2 / 4 - beta_min t_max / 2",
                              detail::concat("beta_min = ", beta_min, ", beta_max = ", beta_max,
                                             ", t_min = ", t_min, ", t_max = ", t_max));
  }

  double b0_, b1_, t_min_, t_max_;
};

} // namespace diffgrad
