#pragma once
// Schedule: the forward process x_t = alpha_t x0 + sigma_t n as functions of a time t in
// [t_min, t_max]; lambda = log(alpha/sigma) must be strictly decreasing in t.
#include <concepts>

#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

template <class S>
concept Schedule = requires(const S& s, double t) {
  { s.t_min() } -> std::convertible_to<double>;
  { s.t_max() } -> std::convertible_to<double>;
  { s.alpha(t) } -> std::convertible_to<double>;
  { s.sigma(t) } -> std::convertible_to<double>;
  { s.lambda(t) } -> std::convertible_to<double>;
  { s.t_of_lambda(t) } -> std::convertible_to<double>;  ///< inverse of lambda(t)
  { s.f(t) } -> std::convertible_to<double>;            ///< d log alpha / dt
  { s.g2(t) } -> std::convertible_to<double>;           ///< g^2 = d sigma^2/dt - 2 f sigma^2
  { s.model_time(t) } -> std::convertible_to<double>;   ///< what the network is fed
  { s.node(t) } -> std::same_as<Node>;
};

} // namespace diffgrad
