#pragma once
// Losses on the sampler's output x_0. A loss is any callable
//   double loss(const Backend& backend, const State& x0, State& grad)
// that returns L(x0) and writes dL/dx0 into `grad` (already shaped like x0). The stock
// losses below use only backend operations, so they run on every backend; a lambda with
// the same signature is a loss too.
#include <concepts>
#include <cstddef>
#include <utility>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"

namespace diffgrad {

template <class L, class B>
concept LossFunction = Backend<B> &&
    requires(L& loss, const B& backend, const typename B::state_type& x0,
             typename B::state_type& grad) {
  { loss(backend, x0, grad) } -> std::convertible_to<double>;
};

namespace detail {
template <Backend B>
void require_same_shape(const typename B::state_type& a, const typename B::state_type& b,
                        const char* where, const char* arg) {
  if (B::batch(a) != B::batch(b) || B::dim(a) != B::dim(b))
    throw_argument(where, arg,
                   concat("shape ", B::batch(b), " x ", B::dim(b), " (batch x dim, like x_0)"),
                   concat(B::batch(a), " x ", B::dim(a)));
}

/// With check_finite: one read pass over an input state, so a NaN/Inf input is refused by
/// name before any model call (instead of being blamed on the model's first output, or
/// passing unseen when the model ignores its input). `index` >= 0 names element arg[index];
/// the message is built only on failure, so a passing check never allocates.
template <Backend B>
void require_finite_input(const B& backend, const typename B::state_type& s, bool check_finite,
                          const char* where, const char* arg, const char* expected,
                          std::size_t index = static_cast<std::size_t>(-1)) {
  if (!check_finite || backend.all_finite(s)) return;
  if (index == static_cast<std::size_t>(-1))
    throw invalid_argument(
        concat(where, ": argument '", arg, "' expected ", expected, ", got NaN or Inf"));
  throw invalid_argument(
      concat(where, ": argument '", arg, "[", index, "]' expected ", expected, ", got NaN or Inf"));
}
} // namespace detail

/// L = (weight / 2) |x0 - target|^2, summed over the batch; dL/dx0 = weight (x0 - target).
template <Backend B> class SquaredDistanceLoss {
public:
  using state_type = typename B::state_type;
  explicit SquaredDistanceLoss(state_type target, double weight = 1.0)
      : target_(std::move(target)), weight_(weight) {
    detail::require_finite(weight, "SquaredDistanceLoss", "weight");
  }
  double operator()(const B& backend, const state_type& x0, state_type& grad) const {
    detail::require_same_shape<B>(x0, target_, "SquaredDistanceLoss", "x0");
    backend.lincomb(grad, term(weight_, x0), term(-weight_, target_));
    // grad = w (x0 - target), so L = <grad, grad> / (2 w): one reduction, no scratch state.
    return weight_ == 0.0 ? 0.0 : backend.dot(grad, grad) / (2.0 * weight_);
  }
  const state_type& target() const { return target_; }
  double weight() const { return weight_; }

private:
  state_type target_;
  double weight_;
};

/// L = <w, x0> (summed over the batch); dL/dx0 = w. With it the gradient is a plain
/// vector-Jacobian product w^T (dx0/d.): the dot-product tests use it.
template <Backend B> class LinearLoss {
public:
  using state_type = typename B::state_type;
  explicit LinearLoss(state_type weights) : w_(std::move(weights)) {}
  double operator()(const B& backend, const state_type& x0, state_type& grad) const {
    detail::require_same_shape<B>(x0, w_, "LinearLoss", "x0");
    backend.copy(grad, w_);
    return backend.dot(w_, x0);
  }
  const state_type& weights() const { return w_; }

private:
  state_type w_;
};

} // namespace diffgrad
