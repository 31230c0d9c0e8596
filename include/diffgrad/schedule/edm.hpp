#pragma once
// EDM (Karras et al. 2022): alpha = 1, sigma = t, t in [sigma_min, sigma_max]. The model is
// fed sigma itself; apply EDM's c_noise preconditioning inside the model if it expects it.
#include <cmath>

#include "diffgrad/schedule/detail_vp.hpp"

namespace diffgrad {

class EDMSchedule {
public:
  explicit EDMSchedule(double sigma_min = 0.002, double sigma_max = 80.0)
      : smin_(sigma_min), smax_(sigma_max) {
    detail::require(sigma_min > 0, "EDMSchedule", "sigma_min", "sigma_min > 0", sigma_min);
    // Both ends finite and positive: lambda = -log sigma is then finite on the whole domain.
    detail::require(sigma_max > sigma_min && std::isfinite(sigma_max), "EDMSchedule", "sigma_max",
                    "a finite sigma_max > sigma_min", sigma_max);
  }
  double t_min() const { return smin_; }
  double t_max() const { return smax_; }
  double alpha(double) const { return 1.0; }
  double sigma(double t) const { return t; }
  double lambda(double t) const { return -std::log(t); }
  double t_of_lambda(double lambda) const { return std::exp(-lambda); }
  double f(double) const { return 0.0; }
  double g2(double t) const { return 2.0 * t; }
  double model_time(double t) const { return t; }
  Node node(double t) const {
    detail::check_time(t, smin_, smax_, "EDMSchedule::node");
    return Node{t, 1.0, t, -std::log(t), t};
  }

private:
  double smin_, smax_;
};

} // namespace diffgrad
