#pragma once
// CountingBackend<B>: wraps any backend, forwards every operation unchanged and counts the
// passes over memory. It exists so that cost claims are checked by tests, not asserted in
// comments: "one fused lincomb per stage", "no make_state inside the step loop", "two
// reductions per adjoint step". Results are bit-identical to the wrapped backend's.
//
//   diffgrad::CountingBackend<diffgrad::EigenBackend<double>> backend;
//   diffgrad::sample(scheme, backend, schedule, nodes, model, x);
//   backend.counts().lincomb_passes;  // == model evaluations for every scheme
//
// The counters are plain integers behind a const interface (backends are passed as const&):
// one CountingBackend must not be used from several threads at once.
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/index_map.hpp"
#include "diffgrad/backend/lincomb_term.hpp"

namespace diffgrad {

/// What a CountingBackend has seen since construction or the last reset().
struct BackendCounts {
  std::int64_t lincomb_passes = 0; ///< fused lincomb calls (any arity, with or without noise)
  std::int64_t noise_passes = 0;   ///< of those, the ones that generated Gaussian noise
  std::int64_t make_state = 0;     ///< state allocations
  std::int64_t make_vector = 0;    ///< vector allocations
  std::int64_t reductions = 0;     ///< dot / squared_norm (one pass each)
  std::int64_t finite_checks = 0;  ///< all_finite (one read pass each)
  std::int64_t copies = 0;         ///< copy
  std::int64_t fills = 0;          ///< fill

  /// Every pass over state-sized memory.
  std::int64_t memory_passes() const {
    return lincomb_passes + reductions + finite_checks + copies + fills;
  }
  friend bool operator==(const BackendCounts&, const BackendCounts&) = default;
};

/// Counter differences (after - before), for measuring one region of code.
inline BackendCounts operator-(const BackendCounts& a, const BackendCounts& b) {
  return {a.lincomb_passes - b.lincomb_passes,
          a.noise_passes - b.noise_passes,
          a.make_state - b.make_state,
          a.make_vector - b.make_vector,
          a.reductions - b.reductions,
          a.finite_checks - b.finite_checks,
          a.copies - b.copies,
          a.fills - b.fills};
}

/// Gather / scatter-add passes (backend/index_map.hpp) a CountingBackend has seen, kept
/// apart from BackendCounts (whose fields and comparisons other tests pin): read them with
/// index_map_counts(), clear them with reset_index_map_counts().
struct IndexMapCounts {
  std::int64_t gathers = 0;    ///< gather passes (one per call)
  std::int64_t scatters = 0;   ///< scatter_add passes (one per call)
  std::int64_t index_maps = 0; ///< make_index_map (copies of a map into the backend's memory)
  friend bool operator==(const IndexMapCounts&, const IndexMapCounts&) = default;
};
inline IndexMapCounts operator-(const IndexMapCounts& a, const IndexMapCounts& b) {
  return {a.gathers - b.gathers, a.scatters - b.scatters, a.index_maps - b.index_maps};
}

namespace detail {
/// CountingBackend<Inner>::coefficient_table is Inner's, where Inner has per-grid tables.
template <class Inner> struct CoefficientTableOf {};
template <class Inner>
  requires requires { typename Inner::coefficient_table; }
struct CoefficientTableOf<Inner> {
  using coefficient_table = typename Inner::coefficient_table;
};
} // namespace detail

template <class Inner> class CountingBackend : public detail::CoefficientTableOf<Inner> {
public:
  using inner_type = Inner;
  using scalar_type = typename Inner::scalar_type;
  using state_type = typename Inner::state_type;
  using vector_type = typename Inner::vector_type;

  CountingBackend() = default;
  explicit CountingBackend(Inner inner) : inner_(std::move(inner)) {}

  const Inner& inner() const { return inner_; }
  const BackendCounts& counts() const { return counts_; }
  void reset() const { counts_ = {}; }

  template <class Index> state_type make_state(Index batch, Index dim) const {
    ++counts_.make_state;
    return inner_.make_state(batch, dim);
  }
  template <class Index>
  vector_type make_vector(Index size) const requires requires(const Inner& b) {
    b.make_vector(size);
  }
  {
    ++counts_.make_vector;
    return inner_.make_vector(size);
  }

  static auto batch(const state_type& x) { return Inner::batch(x); }
  static auto dim(const state_type& x) { return Inner::dim(x); }

  /// Fixed arity: out = sum_k c_k x_k.
  template <class... States>
  void lincomb(state_type& out, LinTerm<States>... terms) const requires requires(const Inner& b) {
    b.lincomb(out, terms...);
  }
  {
    ++counts_.lincomb_passes;
    inner_.lincomb(out, terms...);
  }
  /// Fixed arity with noise: out = sum_k c_k x_k + c xi.
  template <class... States>
  void lincomb(state_type& out, NoiseTerm noise, LinTerm<States>... terms) const requires
      requires(const Inner& b) {
    b.lincomb(out, noise, terms...);
  }
  {
    ++counts_.lincomb_passes;
    if (noise.coeff != 0.0) ++counts_.noise_passes;
    inner_.lincomb(out, noise, terms...);
  }
  /// Runtime arity, as the sampling engine calls it.
  void lincomb(state_type& out, std::span<const LinTerm<state_type>> terms,
               NoiseTerm noise = {}) const {
    ++counts_.lincomb_passes;
    if (noise.coeff != 0.0) ++counts_.noise_passes;
    inner_.lincomb(out, terms, noise);
  }

  /// Structured coefficients (2x2 blocks, per-column diagonals): one pass each, as above.
  template <class Coeff>
  void lincomb(state_type& out, std::span<const LinTerm<state_type, Coeff>> terms,
               BasicNoiseTerm<Coeff> noise = {}) const requires(!std::is_same_v<Coeff, double> &&
                                                                requires(const Inner& b) {
                                                                  b.lincomb(out, terms, noise);
                                                                }) {
    ++counts_.lincomb_passes;
    if (!is_zero(noise.coeff)) ++counts_.noise_passes;
    inner_.lincomb(out, terms, noise);
  }
  /// The inner backend's per-grid coefficient tables (ColumnCoeff), passed through.
  template <class Values>
  auto make_coefficients(const Values& values) const requires requires(const Inner& b) {
    b.make_coefficients(values);
  }
  {
    ++counts_.make_vector;
    return inner_.make_coefficients(values);
  }
  template <class Table> static const double* coefficient_data(const Table& t) {
    return Inner::coefficient_data(t);
  }

  /// Index maps and gather / scatter_add (backend/index_map.hpp), forwarded and counted in
  /// index_map_counts().
  template <class Map>
  auto make_index_map(const Map& map) const requires requires(const Inner& b) {
    b.make_index_map(map);
  }
  {
    ++index_map_counts_.index_maps;
    return inner_.make_index_map(map);
  }
  template <class Map>
  void gather(const state_type& big, const Map& map, state_type& pieces, double scale = 1.0,
              PieceWeights piece_weights = PieceWeights::ignore) const
      requires requires(const Inner& b) { b.gather(big, map, pieces, scale, piece_weights); }
  {
    ++index_map_counts_.gathers;
    inner_.gather(big, map, pieces, scale, piece_weights);
  }
  template <class Map>
  void scatter_add(const state_type& pieces, const Map& map, double scale, state_type& big,
                   PieceWeights piece_weights = PieceWeights::apply) const
      requires requires(const Inner& b) { b.scatter_add(pieces, map, scale, big, piece_weights); }
  {
    ++index_map_counts_.scatters;
    inner_.scatter_add(pieces, map, scale, big, piece_weights);
  }
  const IndexMapCounts& index_map_counts() const { return index_map_counts_; }
  void reset_index_map_counts() const { index_map_counts_ = {}; }

  void copy(state_type& dst, const state_type& src) const {
    ++counts_.copies;
    inner_.copy(dst, src);
  }
  void fill(state_type& dst, double value) const requires requires(const Inner& b) {
    b.fill(dst, value);
  }
  {
    ++counts_.fills;
    inner_.fill(dst, value);
  }

  double dot(const state_type& a, const state_type& b) const {
    ++counts_.reductions;
    return inner_.dot(a, b);
  }
  double squared_norm(const state_type& a) const requires requires(const Inner& b) {
    b.squared_norm(a);
  }
  {
    ++counts_.reductions;
    return inner_.squared_norm(a);
  }
  bool all_finite(const state_type& a) const {
    ++counts_.finite_checks;
    return inner_.all_finite(a);
  }

  /// One noise-only pass (counted as a lincomb pass with noise).
  void gaussian(state_type& out, std::uint64_t seed, std::uint64_t step) const requires
      requires(const Inner& b) {
    b.gaussian(out, seed, step);
  }
  {
    ++counts_.lincomb_passes;
    ++counts_.noise_passes;
    inner_.gaussian(out, seed, step);
  }

private:
  Inner inner_{};
  mutable BackendCounts counts_{};
  mutable IndexMapCounts index_map_counts_{};
};

} // namespace diffgrad
