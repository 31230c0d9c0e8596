#pragma once
// Backend: where the batched state lives and how the one fused update runs
// (Boost.Odeint's algebra + operations, merged into one small policy).
#include <concepts>
#include <cstdint>
#include <span>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/lincomb_term.hpp"

namespace diffgrad {

template <class B>
concept Backend = requires(const B& backend, typename B::state_type& out,
                           const typename B::state_type& in,
                           std::span<const LinTerm<typename B::state_type>> terms) {
  typename B::scalar_type;
  typename B::state_type;
  typename B::vector_type;
  { backend.make_state(std::int64_t{1}, std::int64_t{1}) } -> std::same_as<typename B::state_type>;
  { B::batch(in) } -> std::convertible_to<std::int64_t>;
  { B::dim(in) } -> std::convertible_to<std::int64_t>;
  backend.lincomb(out, terms, NoiseTerm{});
  backend.copy(out, in);
  { backend.dot(in, in) } -> std::convertible_to<double>;
  { backend.all_finite(in) } -> std::convertible_to<bool>;
};

/// A backend that runs fused updates whose coefficients are of kind Coeff (double, Block2 or
/// ColumnCoeff: backend/coefficient.hpp). Every Backend handles double.
template <class B, class Coeff>
concept BackendFor =
    Backend<B> && requires(const B& backend, typename B::state_type& out,
                           std::span<const LinTerm<typename B::state_type, Coeff>> terms) {
      backend.lincomb(out, terms, BasicNoiseTerm<Coeff>{});
    };

} // namespace diffgrad
