#pragma once
// First-order optimisers for the variables one optimises through a sampler: x_T (a state),
// the conditioning z or the parameters theta (flat vectors). They update any contiguous
// Eigen object in place (EigenBackend's state_type and vector_type), elementwise, in double:
//
//   Adam adam({.learning_rate = 0.05});
//   for (int it = 0; it < 100; ++it) {
//     const auto& r = gradient(scheme, backend, schedule, nodes, model, x_T, loss, opts, ws);
//     adam.step(x_T, r.grad_x);
//   }
#include <Eigen/Core>
#include <cmath>
#include <cstdint>

#include "diffgrad/core/error.hpp"

namespace diffgrad {

namespace detail {
template <class X, class G> void require_matching(const X& x, const G& grad, const char* where) {
  if (x.rows() != grad.rows() || x.cols() != grad.cols())
    throw_argument(where, "grad", concat("shape ", x.rows(), " x ", x.cols(), " (like x)"),
                   concat(grad.rows(), " x ", grad.cols()));
}
template <class Derived> auto flat(Eigen::PlainObjectBase<Derived>& x) {
  return Eigen::Map<Eigen::Array<typename Derived::Scalar, Eigen::Dynamic, 1>>(x.data(),
                                                                             x.size());
}
template <class Derived> auto flat(const Eigen::PlainObjectBase<Derived>& x) {
  return Eigen::Map<const Eigen::Array<typename Derived::Scalar, Eigen::Dynamic, 1>>(x.data(),
                                                                                   x.size());
}
} // namespace detail

/// x <- x - learning_rate * grad.
class GradientDescent {
public:
  explicit GradientDescent(double learning_rate) : lr_(learning_rate) {
    detail::require(learning_rate > 0.0 && std::isfinite(learning_rate), "GradientDescent",
                    "learning_rate", "a positive finite step size", learning_rate);
  }
  template <class X, class G>
  void step(Eigen::PlainObjectBase<X>& x, const Eigen::PlainObjectBase<G>& grad) {
    detail::require_matching(x, grad, "GradientDescent::step");
    using Scalar = typename X::Scalar;
    detail::flat(x) -= Scalar(lr_) * detail::flat(grad).template cast<Scalar>();
    ++iterations_;
  }
  double learning_rate() const { return lr_; }
  std::int64_t iterations() const { return iterations_; }

private:
  double lr_;
  std::int64_t iterations_ = 0;
};

struct AdamOptions {
  double learning_rate = 1e-3;
  double beta1 = 0.9;    ///< decay of the first-moment average
  double beta2 = 0.999;  ///< decay of the second-moment average
  double epsilon = 1e-8; ///< added to sqrt(v_hat)
};

/// Adam (Kingma & Ba 2015) with bias correction; moments kept in double. The moment buffers
/// are sized by the first step (one allocation); later steps must use the same shape.
class Adam {
public:
  explicit Adam(AdamOptions options = {}) : opt_(options) {
    detail::require(options.learning_rate > 0.0 && std::isfinite(options.learning_rate), "Adam",
                    "learning_rate", "a positive finite step size", options.learning_rate);
    detail::require(options.beta1 >= 0.0 && options.beta1 < 1.0, "Adam", "beta1",
                    "0 <= beta1 < 1", options.beta1);
    detail::require(options.beta2 >= 0.0 && options.beta2 < 1.0, "Adam", "beta2",
                    "0 <= beta2 < 1", options.beta2);
    detail::require(options.epsilon > 0.0, "Adam", "epsilon", "epsilon > 0", options.epsilon);
  }

  template <class X, class G>
  void step(Eigen::PlainObjectBase<X>& x, const Eigen::PlainObjectBase<G>& grad) {
    detail::require_matching(x, grad, "Adam::step");
    if (iterations_ == 0) {
      m_ = Eigen::ArrayXd::Zero(x.size());
      v_ = Eigen::ArrayXd::Zero(x.size());
    } else if (m_.size() != x.size()) {
      detail::throw_argument("Adam::step", "x",
                             detail::concat(m_.size(), " elements (as in the first step; call "
                                                       "reset() to optimise another variable)"),
                             x.size());
    }
    ++iterations_;
    const auto g = detail::flat(grad).template cast<double>();
    m_ = opt_.beta1 * m_ + (1.0 - opt_.beta1) * g;
    v_ = opt_.beta2 * v_ + (1.0 - opt_.beta2) * g.square();
    const double it = static_cast<double>(iterations_);
    const double c1 = 1.0 - std::pow(opt_.beta1, it), c2 = 1.0 - std::pow(opt_.beta2, it);
    using Scalar = typename X::Scalar;
    detail::flat(x) -=
        (opt_.learning_rate * (m_ / c1) / ((v_ / c2).sqrt() + opt_.epsilon)).template cast<Scalar>();
  }
  void reset() { iterations_ = 0; }
  const AdamOptions& options() const { return opt_; }
  std::int64_t iterations() const { return iterations_; }

private:
  AdamOptions opt_;
  std::int64_t iterations_ = 0;
  Eigen::ArrayXd m_, v_;
};

} // namespace diffgrad
