#pragma once
// sub-VP SDE (Song et al.): alpha as the linear VP schedule, sigma = 1 - alpha^2. The
// parameters are checked as VPLinearSchedule's (the same alpha; sigma > 0 exactly when the VP
// sigma is), under this class's name.
#include <cmath>

#include "diffgrad/schedule/vp_linear.hpp"

namespace diffgrad {

class SubVPSchedule {
public:
  explicit SubVPSchedule(double beta_min = 0.1, double beta_max = 20.0, double t_min = 1e-3,
                         double t_max = 1.0)
      : vp_("SubVPSchedule", beta_min, beta_max, t_min, t_max) {}
  double t_min() const { return vp_.t_min(); }
  double t_max() const { return vp_.t_max(); }
  double alpha(double t) const { return vp_.alpha(t); }
  double sigma(double t) const { return -std::expm1(2.0 * vp_.log_alpha(t)); }
  double lambda(double t) const { return vp_.log_alpha(t) - std::log(sigma(t)); }
  double t_of_lambda(double lambda) const {
    // alpha / (1 - alpha^2) = e^lambda  =>  alpha = 2 e^lambda / (1 + sqrt(1 + 4 e^{2 lambda})).
    const double log_alpha =
        lambda > 0
            ? std::log(2.0) - std::log(std::exp(-lambda) + std::sqrt(std::exp(-2 * lambda) + 4.0))
            : std::log(2.0) + lambda - std::log1p(std::sqrt(1.0 + 4.0 * std::exp(2 * lambda)));
    return vp_.t_of_lambda(detail::vp_lambda(log_alpha));
  }
  double f(double t) const { return vp_.f(t); }
  double g2(double t) const {
    // d sigma^2/dt - 2 f sigma^2 with sigma = 1 - alpha^2, d alpha^2/dt = 2 f alpha^2.
    const double s = sigma(t), a2 = alpha(t) * alpha(t);
    return -4.0 * f(t) * a2 * s - 2.0 * f(t) * s * s;
  }
  double model_time(double t) const { return t; }
  Node node(double t) const {
    detail::check_time(t, t_min(), t_max(), "SubVPSchedule::node");
    return Node{t, alpha(t), sigma(t), lambda(t), model_time(t)};
  }

private:
  VPLinearSchedule vp_;
};

} // namespace diffgrad
