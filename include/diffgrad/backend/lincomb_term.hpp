#pragma once
// The vocabulary of the fused update: a term is (scalar coefficient, vector); an optional
// noise term adds coefficient * xi with xi regenerated from (seed, step, element index).
#include <cstdint>

namespace diffgrad {

template <class State> struct LinTerm {
  double coeff;
  const State* vec;
};

/// term(c, x): one summand c * x of a fused linear combination.
template <class State> LinTerm<State> term(double coeff, const State& vec) { return {coeff, &vec}; }

/// Gaussian noise summand coeff * xi, xi ~ N(0, I) from Philox keyed by (seed, step, index).
struct NoiseTerm {
  double coeff = 0.0;
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
};

/// The most summands a runtime-arity lincomb accepts (RK4 output and 3rd-order multistep
/// with state history need 8; one spare).
inline constexpr int kMaxLincombTerms = 9;

} // namespace diffgrad
