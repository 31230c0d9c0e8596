#pragma once
// CPU backend on Eigen. The batched state is a row-major B x d matrix (B samples of
// dimension d). Every update is one Eigen expression, so Eigen's evaluator fuses it into a
// single vectorised loop with no temporaries: `lincomb` is the whole solver step.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <tuple>
#include <utility>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/gaussian_batch.hpp"
#include "diffgrad/detail/philox.hpp"

namespace diffgrad {

template <class Scalar> class EigenBackend {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad::EigenBackend supports float and double");

public:
  using scalar_type = Scalar;
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using index_type = Eigen::Index;

  /// Allocates a zero-initialised B x d state. Never called inside a step loop.
  state_type make_state(index_type batch, index_type dim) const {
    return state_type::Zero(batch, dim);
  }
  vector_type make_vector(index_type size) const { return vector_type::Zero(size); }

  static index_type batch(const state_type& x) { return x.rows(); }
  static index_type dim(const state_type& x) { return x.cols(); }

  /// out = sum_k c_k x_k (+ noise), one fused pass. `out` may alias any input.
  /// In every form the terms must share one shape (checked, O(1) per term: with NDEBUG Eigen
  /// would read past the smaller ones) and `out` takes that shape, resized if it has another
  /// (as an Eigen assignment resizes, and as CudaBackend does). The engines' buffers already
  /// have it, so their step loops never resize.
  template <class... States> void lincomb(state_type& out, LinTerm<States>... terms) const {
    static_assert((std::is_same_v<States, state_type> && ...), "lincomb: terms must be states");
    check_same_shapes(terms...);
    out.noalias() = (... + (Scalar(terms.coeff) * *terms.vec));
  }

  /// With a noise term the batch is walked in chunks: the chunk's noise is drawn in
  /// Box-Muller pairs (one Philox block, one log and one sincos per TWO elements) into a
  /// stack buffer, then the chunk's update is one fused vectorised expression. Every element
  /// gets exactly the bits of detail::gaussian(seed, step, index), index = r * d + c.
  template <class... States>
  void lincomb(state_type& out, NoiseTerm noise, LinTerm<States>... terms) const {
    static_assert((std::is_same_v<States, state_type> && ...), "lincomb: terms must be states");
    if constexpr (sizeof...(States) > 0) {
      check_same_shapes(terms...);
      const state_type& first = *std::get<0>(std::tie(terms...)).vec;
      if (out.rows() != first.rows() || out.cols() != first.cols())
        out.resize(first.rows(), first.cols());
    }
    const index_type n = out.size();
    using Chunk = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    using ConstChunk = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    alignas(64) Scalar xi[kNoiseChunk];
    for (index_type begin = 0; begin < n; begin += kNoiseChunk) {
      const index_type len = std::min<index_type>(kNoiseChunk, n - begin);
      draw_noise(xi, noise, begin, len);
      Chunk dst(out.data() + begin, len);
      const ConstChunk noise_chunk(xi, len);
      if constexpr (sizeof...(States) == 0) {
        dst = noise_chunk;
      } else {
        dst = (... + (Scalar(terms.coeff) * ConstChunk(terms.vec->data() + begin, len))) +
              noise_chunk;
      }
    }
  }

  /// Runtime arity (1..kMaxLincombTerms terms): dispatches to the fused fixed-arity form.
  void lincomb(state_type& out, std::span<const LinTerm<state_type>> terms,
               NoiseTerm noise = {}) const {
    if (terms.empty() || terms.size() > static_cast<std::size_t>(kMaxLincombTerms))
      detail::throw_argument("EigenBackend::lincomb", "terms",
                             detail::concat("1..", kMaxLincombTerms, " terms"), terms.size());
    for (std::size_t k = 1; k < terms.size(); ++k)
      check_term_shape(*terms[0].vec, *terms[k].vec, k);
    dispatch(out, terms, noise, std::make_index_sequence<kMaxLincombTerms>{});
  }

  void copy(state_type& dst, const state_type& src) const { dst = src; }
  void fill(state_type& dst, double value) const { dst.setConstant(Scalar(value)); }

  /// Sum over the whole batch, accumulated in double.
  double dot(const state_type& a, const state_type& b) const {
    return a.template cast<double>().cwiseProduct(b.template cast<double>()).sum();
  }
  double squared_norm(const state_type& a) const { return dot(a, a); }
  /// x * 0 is 0 for finite x and NaN for NaN/Inf, so the sum is 0 exactly when every entry is
  /// finite (it cannot overflow). One vectorised read pass: Eigen's allFinite() is a scalar
  /// loop that ran ~40x slower than a copy (benchmarks/RESULTS.md, per-step overhead).
  bool all_finite(const state_type& a) const { return (a.array() * Scalar(0)).sum() == Scalar(0); }

  /// Writes xi(seed, step) into out (for tests and for storing the noise a step used).
  void gaussian(state_type& out, std::uint64_t seed, std::uint64_t step) const {
    lincomb(out, NoiseTerm{1.0, seed, step});
  }

private:
  /// O(1) per term, so it runs on every call: a mismatch would otherwise be read out of
  /// bounds in Release builds, where Eigen's own size asserts are compiled out.
  static void check_term_shape(const state_type& first, const state_type& v, std::size_t k) {
    if (v.rows() != first.rows() || v.cols() != first.cols()) [[unlikely]]
      throw invalid_argument(detail::concat(
          "EigenBackend::lincomb: argument 'terms[", k, "]' expected shape ", first.rows(), " x ",
          first.cols(), " (that of terms[0]), got ", v.rows(), " x ", v.cols()));
  }
  template <class... States> static void check_same_shapes(const LinTerm<States>&... terms) {
    if constexpr (sizeof...(States) > 1) {
      const state_type& first = *std::get<0>(std::tie(terms...)).vec;
      std::size_t k = 0;
      (check_term_shape(first, *terms.vec, k++), ...);
    }
  }

  /// Elements per noise chunk: even (chunks start on a Box-Muller pair), 2 KiB of doubles,
  /// small enough to stay in L1 next to the chunk's inputs.
  static constexpr index_type kNoiseChunk = 256;

  /// xi[k] = coeff * gaussian(seed, step, begin + k) for k < len; begin is even. The pairs
  /// are drawn several per SIMD register (detail/gaussian_batch.hpp), bit-identical to the
  /// scalar generator and to the CUDA backend.
  static void draw_noise(Scalar* xi, const NoiseTerm& noise, index_type begin, index_type len) {
    alignas(64) double raw[kNoiseChunk];
    const index_type pairs = len / 2;
    detail::gaussian_pairs(noise.seed, noise.step, static_cast<std::uint64_t>(begin) / 2,
                           static_cast<std::size_t>(pairs), raw);
    if (len % 2 != 0) // odd tail: the even element of the last pair
      raw[len - 1] =
          detail::gaussian(noise.seed, noise.step, static_cast<std::uint64_t>(begin + len - 1));
    for (index_type k = 0; k < len; ++k) xi[k] = Scalar(noise.coeff * raw[k]);
  }

  template <std::size_t... Is>
  void dispatch(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                std::index_sequence<Is...>) const {
    // One branch per arity; each is a single fused Eigen expression.
    const bool dispatched =
        ((terms.size() == Is + 1
              ? (call_fixed(out, terms, noise, std::make_index_sequence<Is + 1>{}), true)
              : false) ||
         ...);
    (void)dispatched;
  }
  template <std::size_t... Js>
  void call_fixed(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                  std::index_sequence<Js...>) const {
    if (noise.coeff != 0.0)
      lincomb(out, noise, terms[Js]...);
    else
      lincomb(out, terms[Js]...);
  }
};

} // namespace diffgrad
