#pragma once
// The vocabulary of the fused update: a term is (coefficient, vector); an optional noise term
// adds coefficient * xi with xi regenerated from (seed, step, global element index).
//
// The coefficient is a scalar for every isotropic scheme; structured kinds (2x2 blocks over
// channel halves, per-column diagonals) are described in backend/coefficient.hpp.
//
// Noise indexing (one scheme for every backend and coefficient kind): xi is the standard
// normal state whose element (r, c) of a B x d batch is
//   detail::gaussian(seed, step, (row_offset + r) * d + c),
// i.e. addressed by the GLOBAL sample index row_offset + r, so a batch split into shards
// (threads, MPI ranks, devices) draws exactly the noise of the whole batch when each shard
// passes its first row as row_offset. Structured coefficients only say how xi's elements are
// combined: a Block2 noise coefficient L adds L (xi_x, xi_v) to (x, v), reading xi_x at the x
// half's index for the v half, so noise correlated across the halves needs no other stream.
#include <cstdint>

namespace diffgrad {

template <class State, class Coeff = double> struct LinTerm {
  Coeff coeff;
  const State* vec;
};

/// term(c, x): one summand c * x of a fused linear combination.
template <class State> LinTerm<State> term(double coeff, const State& vec) { return {coeff, &vec}; }

/// Gaussian noise summand coeff * xi, xi ~ N(0, I) from Philox keyed by (seed, step, global
/// element index); see the indexing rule above.
template <class Coeff> struct BasicNoiseTerm {
  Coeff coeff{};
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
  std::uint64_t row_offset = 0; ///< global index of the batch's first row
};
using NoiseTerm = BasicNoiseTerm<double>;

/// The most summands a runtime-arity lincomb accepts (RK4 output and 3rd-order multistep
/// with state history need 8; one spare).
inline constexpr int kMaxLincombTerms = 9;

} // namespace diffgrad
