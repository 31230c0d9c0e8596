#pragma once
// CPU backend on Eigen. The batched state is a row-major B x d matrix (B samples of
// dimension d). Every update is one Eigen expression, so Eigen's evaluator fuses it into a
// single vectorised loop with no temporaries: `lincomb` is the whole solver step.
//
// Threads (docs/threading.md): a backend may run its passes on T threads of a shared pool
// (detail/thread_pool.hpp): lincomb of every coefficient kind with and without noise, the noise
// draw, copy, fill, gather / scatter_add, all_finite and the reductions. Every result has the
// same bits for every T: elementwise passes split at fixed element or row boundaries (each
// element computed by the same code wherever the split falls), reductions sum fixed chunks of
// kThreadChunk elements whose partials are added in chunk order. T comes from the constructor
// or DIFFGRAD_NUM_THREADS (default 1); passes smaller than the parallel thresholds run inline.
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/index_map.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/gaussian_batch.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/detail/thread_pool.hpp"

namespace diffgrad {

template <class Scalar> class EigenBackend {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad::EigenBackend supports float and double");

public:
  using scalar_type = Scalar;
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using index_type = Eigen::Index;

  /// Threads from the environment: DIFFGRAD_NUM_THREADS (unset: 1; "0" or "auto": all hardware
  /// threads; docs/threading.md says why 1 is the default).
  EigenBackend() : threads_(detail::threads_from_environment()) {}
  /// `threads` participants (1..64): the calling thread plus threads - 1 workers of the
  /// process-wide pool of that size, shared by every backend and model asking for it. Copies of
  /// a backend share its pool (copying is a shared_ptr copy).
  explicit EigenBackend(int threads) : threads_(threads) {}
  void set_num_threads(int threads) { threads_ = detail::ThreadHandle(threads); }
  int num_threads() const { return threads_.threads(); }
  /// The pool (null when single-threaded), e.g. to give a model the same threads or to read
  /// its participation counters in tests.
  detail::ThreadPool* thread_pool() const { return threads_.pool(); }
  const detail::ThreadHandle& threads() const { return threads_; }

  /// Elements per parallel task of the flat passes and per reduction chunk: fixed, independent
  /// of T (a multiple of the noise chunk and of every SIMD width).
  static constexpr index_type kThreadChunk = 8192;
  /// Below these sizes (elements of the output) a pass runs inline on the calling thread: waking
  /// the workers costs tens of microseconds.
  static constexpr index_type kParallelMinElements = index_type{1} << 16;
  static constexpr index_type kParallelMinNoisyElements = index_type{1} << 14;

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
    const state_type& first = *std::get<0>(std::tie(terms...)).vec;
    if (!parallel(first.size(), kParallelMinElements)) {
      out.noalias() = (... + (Scalar(terms.coeff) * *terms.vec));
      return;
    }
    if (out.rows() != first.rows() || out.cols() != first.cols())
      out.resize(first.rows(), first.cols()); // aliasing out with a term implies equal shapes
    // Chunk boundaries are multiples of kThreadChunk elements from a 64-byte aligned start, so
    // Eigen peels and vectorises every element exactly as in the one-expression form above.
    using Chunk = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    using ConstChunk = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    Scalar* dst = out.data();
    for_flat_chunks(first.size(), [&](index_type begin, index_type len) {
      Chunk(dst + begin, len) =
          (... + (Scalar(terms.coeff) * ConstChunk(terms.vec->data() + begin, len)));
    });
  }

  /// With a noise term the batch is walked in chunks: the chunk's noise is drawn in
  /// Box-Muller pairs (one Philox block, one log and one sincos per TWO elements) into a
  /// stack buffer, then the chunk's update is one fused vectorised expression. Every element
  /// gets exactly the bits of detail::gaussian(seed, step, index),
  /// index = (noise.row_offset + r) * d + c.
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
    const std::uint64_t base = noise.row_offset * static_cast<std::uint64_t>(out.cols());
    Scalar* out_data = out.data();
    // [range_begin, range_begin + range_len): the noise chunks of one task (the whole range
    // when inline). Chunks start at multiples of kNoiseChunk from element 0 whatever the split.
    const auto pass = [&](index_type range_begin, index_type range_len) {
      using Chunk = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
      using ConstChunk = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
      alignas(64) Scalar xi[kNoiseChunk];
      const index_type range_end = range_begin + range_len;
      for (index_type begin = range_begin; begin < range_end; begin += kNoiseChunk) {
        const index_type len = std::min<index_type>(kNoiseChunk, range_end - begin);
        draw_noise(xi, noise, base, begin, len);
        Chunk dst(out_data + begin, len);
        const ConstChunk noise_chunk(xi, len);
        if constexpr (sizeof...(States) == 0) {
          dst = noise_chunk;
        } else {
          dst = (... + (Scalar(terms.coeff) * ConstChunk(terms.vec->data() + begin, len))) +
                noise_chunk;
        }
      }
    };
    if (parallel(n, kParallelMinNoisyElements))
      for_flat_chunks(n, pass);
    else
      pass(0, n);
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

  /// 2x2 blocks over the halves [x | v] of each row (backend/coefficient.hpp): one pass over
  /// the batch in L1-sized chunks of a row; out may alias any input. Rows must have even
  /// width. The noise adds L (xi_x, xi_v), xi at the global indices of both halves, so the
  /// v half's noise is correlated with the x half's through L.vx.
  void lincomb(state_type& out, std::span<const LinTerm<state_type, Block2>> terms,
               BasicNoiseTerm<Block2> noise = {}) const {
    // Plain locals, not a structured binding: lambdas capture them (clang < 16 cannot capture
    // structured bindings).
    const auto shape = structured_shape(out, terms);
    const index_type rows = shape.first, cols = shape.second;
    if (cols % 2 != 0)
      detail::throw_argument("EigenBackend::lincomb", "terms",
                             "states of even width (two halves [x | v]) for 2x2 block coefficients",
                             cols);
    const bool noisy = !noise.coeff.is_zero();
    for_rows(rows, cols, noisy, [&](index_type r0, index_type r1) {
      block2_rows(out, terms, noise, noisy, cols, r0, r1);
    });
  }

  /// Per-column diagonal coefficients (backend/coefficient.hpp): column k of term t is scaled
  /// by t.coeff.at(k), the table (host memory) holding one entry per column; one pass, out
  /// may alias any input. The noise adds noise.coeff.at(k) xi at the global element index.
  void lincomb(state_type& out, std::span<const LinTerm<state_type, ColumnCoeff>> terms,
               BasicNoiseTerm<ColumnCoeff> noise = {}) const {
    const auto shape = structured_shape(out, terms);
    const index_type rows = shape.first, cols = shape.second;
    const bool noisy = !noise.coeff.is_zero();
    for_rows(rows, cols, noisy, [&](index_type r0, index_type r1) {
      column_rows(out, terms, noise, noisy, cols, r0, r1);
    });
  }

private:
  /// Rows [r0, r1) of a Block2 lincomb (each row independent of the others).
  static void block2_rows(state_type& out, std::span<const LinTerm<state_type, Block2>> terms,
                          const BasicNoiseTerm<Block2>& noise, bool noisy, index_type cols,
                          index_type r0, index_type r1) {
    const index_type d = cols / 2;
    alignas(64) Scalar acc_x[kNoiseChunk], acc_v[kNoiseChunk];
    alignas(64) double xi_x[kNoiseChunk], xi_v[kNoiseChunk];
    for (index_type r = r0; r < r1; ++r) {
      for (index_type j0 = 0; j0 < d; j0 += kNoiseChunk) {
        const index_type len = std::min<index_type>(kNoiseChunk, d - j0);
        std::fill(acc_x, acc_x + len, Scalar(0));
        std::fill(acc_v, acc_v + len, Scalar(0));
        for (const auto& t : terms) {
          const Scalar* x = t.vec->data() + r * cols + j0;
          const Scalar* v = x + d;
          const auto xx = static_cast<Scalar>(t.coeff.xx), xv = static_cast<Scalar>(t.coeff.xv),
                     vx = static_cast<Scalar>(t.coeff.vx), vv = static_cast<Scalar>(t.coeff.vv);
          for (index_type j = 0; j < len; ++j) {
            acc_x[j] += xx * x[j] + xv * v[j];
            acc_v[j] += vx * x[j] + vv * v[j];
          }
        }
        if (noisy) {
          const std::uint64_t base =
              (noise.row_offset + static_cast<std::uint64_t>(r)) * static_cast<std::uint64_t>(cols);
          const auto n = static_cast<std::size_t>(len);
          detail::gaussian_range(noise.seed, noise.step, base + static_cast<std::uint64_t>(j0), n,
                                 xi_x);
          detail::gaussian_range(noise.seed, noise.step, base + static_cast<std::uint64_t>(d + j0),
                                 n, xi_v);
          const Block2& L = noise.coeff;
          for (index_type j = 0; j < len; ++j) {
            acc_x[j] += Scalar(L.xx * xi_x[j] + L.xv * xi_v[j]);
            acc_v[j] += Scalar(L.vx * xi_x[j] + L.vv * xi_v[j]);
          }
        }
        Scalar* o = out.data() + r * cols + j0;
        std::copy(acc_x, acc_x + len, o);
        std::copy(acc_v, acc_v + len, o + d);
      }
    }
  }

  /// Rows [r0, r1) of a ColumnCoeff lincomb.
  static void column_rows(state_type& out, std::span<const LinTerm<state_type, ColumnCoeff>> terms,
                          const BasicNoiseTerm<ColumnCoeff>& noise, bool noisy, index_type cols,
                          index_type r0, index_type r1) {
    // Rows [r0, r1) are one contiguous range of elements, and so are their noise indices
    // ((row_offset + r) cols + j): the range goes in chunks of kNoiseChunk elements across row
    // ends, each ONE batched (SIMD) noise draw however short the rows are, and each chunk in
    // row segments so the coefficient tables are read with unit stride. Per element the sum
    // is the same as row by row (terms in order, then the noise): the same bits.
    alignas(64) Scalar acc[kNoiseChunk];
    alignas(64) double xi[kNoiseChunk];
    const index_type end = r1 * cols;
    for (index_type e0 = r0 * cols; e0 < end; e0 += kNoiseChunk) {
      const index_type len = std::min<index_type>(kNoiseChunk, end - e0);
      if (noisy)
        detail::gaussian_range(noise.seed, noise.step,
                               noise.row_offset * static_cast<std::uint64_t>(cols) +
                                   static_cast<std::uint64_t>(e0),
                               static_cast<std::size_t>(len), xi);
      for (index_type s0 = 0; s0 < len;) {
        const index_type j0 = (e0 + s0) % cols;
        const index_type seg = std::min<index_type>(len - s0, cols - j0);
        Scalar* a = acc + s0;
        std::fill(a, a + seg, Scalar(0));
        for (const auto& t : terms) {
          const Scalar* x = t.vec->data() + e0 + s0;
          if (t.coeff.values == nullptr) {
            const auto c = static_cast<Scalar>(t.coeff.scale);
            for (index_type j = 0; j < seg; ++j) a[j] += c * x[j];
          } else {
            const double* c = t.coeff.values + j0;
            for (index_type j = 0; j < seg; ++j) a[j] += Scalar(t.coeff.scale * c[j]) * x[j];
          }
        }
        if (noisy)
          for (index_type j = 0; j < seg; ++j)
            a[j] += Scalar(noise.coeff.at(j0 + j) * xi[s0 + j]);
        s0 += seg;
      }
      std::copy(acc, acc + len, out.data() + e0);
    }
  }

public:
  /// A per-grid coefficient table in this backend's memory (host): ColumnCoeff::values
  /// points into it. Built before the step loop (gDDIM schemes build theirs per grid).
  using coefficient_table = std::vector<double>;
  coefficient_table make_coefficients(std::span<const double> values) const {
    return coefficient_table(values.begin(), values.end());
  }
  static const double* coefficient_data(const coefficient_table& t) { return t.data(); }

  /// Index maps (backend/index_map.hpp) in this backend's memory: the host map itself.
  /// Built before the step loop, like coefficient tables.
  using index_map_type = IndexMap;
  index_map_type make_index_map(const IndexMap& map) const { return map; }

  /// pieces(b*P + p, k) = scale [* w_p] * big(b, map.index(p, k)): one pass, sample-major.
  /// `pieces` takes the shape (B*P) x n (resized only if it has another shape). It must not
  /// be `big` itself. With the same scale and PieceWeights it is the transpose of scatter_add.
  void gather(const state_type& big, const IndexMap& map, state_type& pieces, double scale = 1.0,
              PieceWeights piece_weights = PieceWeights::ignore) const {
    const char* where = "EigenBackend::gather";
    check_index_map_big(big, map, where, "big");
    if (&big == &pieces)
      detail::throw_argument(where, "pieces", "a state other than 'big'", "the same object");
    const index_type rows = big.rows(), p_count = map.pieces(), n = map.width();
    if (pieces.rows() != rows * p_count || pieces.cols() != n) pieces.resize(rows * p_count, n);
    const std::int64_t* idx = map.indices().data();
    const double* w = map.weights().data();
    const bool plain =
        scale == 1.0 && (piece_weights == PieceWeights::ignore || map.unit_weights());
    for_rows(rows, p_count * n, false, [&](index_type b0, index_type b1) {
      for (index_type b = b0; b < b1; ++b) {
        const Scalar* src = big.data() + b * big.cols();
        for (index_type p = 0; p < p_count; ++p) {
          Scalar* dst = pieces.data() + (b * p_count + p) * n;
          const std::int64_t* ip = idx + p * n;
          if (plain) {
            for (index_type k = 0; k < n; ++k) dst[k] = src[ip[k]];
          } else {
            const auto c =
                static_cast<Scalar>(piece_weights == PieceWeights::apply ? scale * w[p] : scale);
            for (index_type k = 0; k < n; ++k) dst[k] = c * src[ip[k]];
          }
        }
      }
    });
  }

  /// big(b, map.index(p, k)) += scale [* w_p] * pieces(b*P + p, k): one pass, sample-major,
  /// accumulating each big row's pieces in piece order (deterministic). `big` keeps its
  /// shape: it must be B x D with B*P = pieces.rows(), and must not be `pieces` itself.
  void scatter_add(const state_type& pieces, const IndexMap& map, double scale, state_type& big,
                   PieceWeights piece_weights = PieceWeights::apply) const {
    const char* where = "EigenBackend::scatter_add";
    check_index_map_big(big, map, where, "big");
    if (&big == &pieces)
      detail::throw_argument(where, "pieces", "a state other than 'big'", "the same object");
    const index_type rows = big.rows(), p_count = map.pieces(), n = map.width();
    if (pieces.rows() != rows * p_count || pieces.cols() != n)
      detail::throw_argument(where, "pieces",
                             detail::concat("shape (B*P) x n = ", rows * p_count, " x ", n,
                                            " (B = ", rows, " rows of 'big', P = ", p_count,
                                            " pieces of width ", n, ")"),
                             detail::concat(pieces.rows(), " x ", pieces.cols()));
    const std::int64_t* idx = map.indices().data();
    const double* w = map.weights().data();
    const bool plain =
        scale == 1.0 && (piece_weights == PieceWeights::ignore || map.unit_weights());
    // Parallel over the big rows: each row's pieces are still added in piece order.
    for_rows(rows, p_count * n, false, [&](index_type b0, index_type b1) {
      for (index_type b = b0; b < b1; ++b) {
        Scalar* dst = big.data() + b * big.cols();
        for (index_type p = 0; p < p_count; ++p) {
          const Scalar* src = pieces.data() + (b * p_count + p) * n;
          const std::int64_t* ip = idx + p * n;
          if (plain) {
            for (index_type k = 0; k < n; ++k) dst[ip[k]] += src[k];
          } else {
            const auto c =
                static_cast<Scalar>(piece_weights == PieceWeights::apply ? scale * w[p] : scale);
            for (index_type k = 0; k < n; ++k) dst[ip[k]] += c * src[k];
          }
        }
      }
    });
  }

  void copy(state_type& dst, const state_type& src) const {
    if (&dst == &src) return;
    if (!parallel(src.size(), kParallelMinElements)) {
      dst = src;
      return;
    }
    if (dst.rows() != src.rows() || dst.cols() != src.cols()) dst.resize(src.rows(), src.cols());
    Scalar* d = dst.data();
    const Scalar* s = src.data();
    for_flat_chunks(src.size(), [&](index_type begin, index_type len) {
      std::copy(s + begin, s + begin + len, d + begin);
    });
  }
  void fill(state_type& dst, double value) const {
    if (!parallel(dst.size(), kParallelMinElements)) {
      dst.setConstant(Scalar(value));
      return;
    }
    Scalar* d = dst.data();
    for_flat_chunks(dst.size(), [&](index_type begin, index_type len) {
      std::fill(d + begin, d + begin + len, Scalar(value));
    });
  }

  /// Sum over the whole batch, accumulated in double, over fixed chunks of kThreadChunk
  /// elements whose partial sums are added in chunk order: the same bits for every thread count
  /// (a state of at most one chunk gives the one-pass sum of earlier versions).
  double dot(const state_type& a, const state_type& b) const {
    if (a.rows() != b.rows() || a.cols() != b.cols()) [[unlikely]]
      detail::throw_argument("EigenBackend::dot", "b",
                             detail::concat("shape ", a.rows(), " x ", a.cols(), " (a's shape)"),
                             detail::concat(b.rows(), " x ", b.cols()));
    const index_type n = a.size();
    const Scalar* pa = a.data();
    const Scalar* pb = b.data();
    if (n <= kThreadChunk) return chunk_dot(pa, pb, n);
    const bool threaded = parallel(n, kParallelMinElements);
    const index_type chunks = (n + kThreadChunk - 1) / kThreadChunk;
    alignas(64) double partial[kReduceRound];
    double total = 0.0;
    for (index_type first = 0; first < chunks; first += kReduceRound) {
      const index_type m = std::min(kReduceRound, chunks - first);
      const auto body = [&](index_type c0, index_type c1) {
        for (index_type c = c0; c < c1; ++c) {
          const index_type begin = (first + c) * kThreadChunk;
          partial[c] = chunk_dot(pa + begin, pb + begin, std::min(kThreadChunk, n - begin));
        }
      };
      if (threaded)
        threads_.parallel_for(m, body);
      else
        body(0, m);
      index_type c = 0;
      if (first == 0) total = partial[c++];
      for (; c < m; ++c) total += partial[c];
    }
    return total;
  }
  double squared_norm(const state_type& a) const { return dot(a, a); }
  /// x * 0 is 0 for finite x and NaN for NaN/Inf, so the sum is 0 exactly when every entry is
  /// finite (it cannot overflow). One vectorised read pass: Eigen's allFinite() is a scalar
  /// loop that ran ~40x slower than a copy (benchmarks/RESULTS.md, per-step overhead). On
  /// threads: each chunk is checked the same way, the answers combined with "and".
  bool all_finite(const state_type& a) const {
    if (!parallel(a.size(), kParallelMinElements))
      return (a.array() * Scalar(0)).sum() == Scalar(0);
    std::atomic<bool> finite{true};
    const Scalar* p = a.data();
    for_flat_chunks(a.size(), [&](index_type begin, index_type len) {
      using ConstChunk = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
      if (!((ConstChunk(p + begin, len) * Scalar(0)).sum() == Scalar(0)))
        finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
  }

  /// Writes xi(seed, step) into out (for tests and for storing the noise a step used).
  void gaussian(state_type& out, std::uint64_t seed, std::uint64_t step) const {
    lincomb(out, NoiseTerm{1.0, seed, step});
  }

private:
  detail::ThreadHandle threads_;

  /// Chunks per reduction round: their partials live on the stack (8 KiB), so reductions of any
  /// size allocate nothing; rounds run one after another.
  static constexpr index_type kReduceRound = 1024;

  /// Whether a pass over `elements` elements goes to the pool.
  bool parallel(index_type elements, index_type threshold) const {
    return threads_.pool() != nullptr && elements >= threshold;
  }

  /// f(begin, len) over [0, n) in pieces that start at multiples of kThreadChunk, on the pool.
  template <class F> void for_flat_chunks(index_type n, F&& f) const {
    const index_type chunks = (n + kThreadChunk - 1) / kThreadChunk;
    threads_.parallel_for(chunks, [&](index_type c0, index_type c1) {
      const index_type begin = c0 * kThreadChunk;
      f(begin, std::min(n, c1 * kThreadChunk) - begin);
    });
  }

  /// f(r0, r1) over the rows [0, rows) (each row's work independent of the split), on the pool
  /// when rows * cols reaches the threshold of the pass.
  template <class F> void for_rows(index_type rows, index_type cols, bool noisy, F&& f) const {
    if (parallel(rows * cols, noisy ? kParallelMinNoisyElements : kParallelMinElements))
      threads_.parallel_for(rows, f);
    else
      f(index_type{0}, rows);
  }

  static double chunk_dot(const Scalar* a, const Scalar* b, index_type n) {
    using ConstVec = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>;
    return ConstVec(a, n)
        .template cast<double>()
        .cwiseProduct(ConstVec(b, n).template cast<double>())
        .sum();
  }

  /// The big state of a gather / scatter_add has rows of the map's width D (O(1) check).
  static void check_index_map_big(const state_type& big, const IndexMap& map, const char* where,
                                  const char* arg) {
    if (map.pieces() == 0)
      detail::throw_argument(where, "map", "a built IndexMap (P >= 1 pieces)", "an empty map");
    if (big.cols() != map.dim())
      detail::throw_argument(where, arg,
                             detail::concat("rows of width D = ", map.dim(), " (the map's dim)"),
                             detail::concat(big.cols(), " columns"));
  }

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

  /// xi[k] = coeff * gaussian(seed, step, base + begin + k) for k < len, for any start
  /// (gaussian_range draws an odd first or last index singly, never a split pair). The pairs
  /// are drawn several per SIMD register (detail/gaussian_batch.hpp), bit-identical to the
  /// scalar generator and to the CUDA backend.
  static void draw_noise(Scalar* xi, const NoiseTerm& noise, std::uint64_t base, index_type begin,
                         index_type len) {
    alignas(64) double raw[kNoiseChunk];
    detail::gaussian_range(noise.seed, noise.step, base + static_cast<std::uint64_t>(begin),
                           static_cast<std::size_t>(len), raw);
    for (index_type k = 0; k < len; ++k) xi[k] = Scalar(noise.coeff * raw[k]);
  }

  /// Shape of a structured lincomb: terms[0]'s, shared by every term (checked), out resized.
  template <class Coeff>
  static std::pair<index_type, index_type>
  structured_shape(state_type& out, std::span<const LinTerm<state_type, Coeff>> terms) {
    if (terms.empty() || terms.size() > static_cast<std::size_t>(kMaxLincombTerms))
      detail::throw_argument("EigenBackend::lincomb", "terms",
                             detail::concat("1..", kMaxLincombTerms, " terms"), terms.size());
    for (std::size_t k = 1; k < terms.size(); ++k)
      check_term_shape(*terms[0].vec, *terms[k].vec, k);
    const state_type& first = *terms[0].vec;
    if (out.rows() != first.rows() || out.cols() != first.cols())
      out.resize(first.rows(), first.cols()); // aliasing out with a term implies equal shapes
    return {first.rows(), first.cols()};
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
