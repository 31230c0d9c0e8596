#pragma once
// Central finite differences of a scalar loss of a sampler run on the Gaussian reference model
// models::GaussianData (data N(mu, s^2 I)): the directional derivative along a fixed direction
// in x_T, each d/dmu_j and d/ds, each checked against the gradient under test to a relative
// tolerance. Shared by the direct gradient tests of the samplers (DDIM with eta, BDIA, ...).
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>

#include "diffgrad/models/gaussian.hpp"
#include "test_support.hpp"

namespace diffgrad::testing {

struct GaussianDataGradient {
  const State<double>& x;    ///< dL/dx_T
  const Eigen::VectorXd& mu; ///< dL/dmu
  double s = 0.0;            ///< dL/ds
};

/// `loss(x_T, model)` runs the sampler from x_T on `model` and returns L(x_0).
template <class Loss>
void check_gaussian_data_gradient_fd(Loss&& loss, const State<double>& x_T,
                                     const models::GaussianData<double>& model,
                                     const GaussianDataGradient& ours, double step = 1e-5,
                                     double tolerance = 1e-7) {
  const auto check = [&](const char* what, double mine, double fd) {
    INFO(what << ": ours " << mine << ", FD " << fd << ", relative difference "
              << std::abs(mine - fd) / std::abs(fd));
    CHECK(std::abs(mine - fd) <= tolerance * std::abs(fd));
  };
  State<double> dir = x_T;
  for (Eigen::Index k = 0; k < dir.size(); ++k)
    dir.data()[k] = std::cos(1.7 * static_cast<double>(k) + 0.2);
  const State<double> x_up = x_T + step * dir, x_down = x_T - step * dir;
  auto base = model; // the loss may take its model by non-const reference
  check("directional d/dx_T", ours.x.cwiseProduct(dir).sum(),
        (loss(x_up, base) - loss(x_down, base)) / (2 * step));
  for (Eigen::Index j = 0; j < model.mu().size(); ++j) {
    auto up = model, down = model;
    up.mu()(j) += step;
    down.mu()(j) -= step;
    INFO("j = " << j);
    check("d/dmu_j", ours.mu(j), (loss(x_T, up) - loss(x_T, down)) / (2 * step));
  }
  auto up = model, down = model;
  up.set_s(model.s() + step);
  down.set_s(model.s() - step);
  check("d/ds", ours.s, (loss(x_T, up) - loss(x_T, down)) / (2 * step));
}

} // namespace diffgrad::testing
