#pragma once
// Shared helpers for the tests: convergence-order fitting, the Gaussian reference problem and
// the message of an expected exception.
#include <Eigen/Core>
#include <cmath>
#include <exception>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/models/gaussian.hpp"

namespace diffgrad::testing {

/// The message of the exception of type Ex that `f` throws, or a note saying what happened
/// instead (so a missing or wrong exception fails the message match with a clear text).
template <class Ex = diffgrad::invalid_argument, class F> std::string thrown(F&& f) {
  try {
    f();
  } catch (const Ex& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type: ") + e.what() + ">";
  }
  return "<no exception>";
}

/// Least-squares slope of log(error) against log(1/N): the observed convergence order.
inline double fitted_order(const std::vector<int>& steps, const std::vector<double>& errors) {
  const auto n = static_cast<double>(steps.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (std::size_t k = 0; k < steps.size(); ++k) {
    const double x = -std::log(static_cast<double>(steps[k]));
    const double y = std::log(errors[k]);
    sx += x; sy += y; sxx += x * x; sxy += x * y;
  }
  return (n * sxy - sx * sy) / (n * sxx - sx * sx);
}

template <class Scalar>
using State = typename EigenBackend<Scalar>::state_type;

/// A fixed batch of B "noise" states with a deterministic, non-symmetric pattern.
template <class Scalar> State<Scalar> test_batch(Eigen::Index batch, Eigen::Index dim) {
  State<Scalar> x(batch, dim);
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index j = 0; j < dim; ++j)
      x(b, j) = Scalar(std::sin(1.3 * static_cast<double>(b * dim + j) + 0.7) * 1.5);
  return x;
}

/// Gaussian data with a non-trivial mean and a std far from 1, so eps is strongly t-dependent.
template <class Scalar> models::GaussianData<Scalar> gaussian_problem(Eigen::Index dim) {
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> mu(dim);
  for (Eigen::Index j = 0; j < dim; ++j) mu(j) = Scalar(0.5 - 0.3 * static_cast<double>(j));
  return models::GaussianData<Scalar>(mu, 0.2);
}

template <class Scalar> double relative_error(const State<Scalar>& a, const State<Scalar>& b) {
  return (a.template cast<double>() - b.template cast<double>()).norm() /
         b.template cast<double>().norm();
}

} // namespace diffgrad::testing
