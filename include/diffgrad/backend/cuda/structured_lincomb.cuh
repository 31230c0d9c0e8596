#pragma once
// The fused update with structured coefficients (backend/coefficient.hpp) on the device:
//
//   Block2       out_x = sum_t (xx_t x_t + xv_t v_t) + (L.xx xi_x + L.xv xi_v)
//                out_v = sum_t (vx_t x_t + vv_t v_t) + (L.vx xi_x + L.vv xi_v)
//                over the halves [x (d) | v (d)] of every row of a B x 2d state;
//   ColumnCoeff  out[r][k] = sum_t c_t[k] x_t[r][k] + c_xi[k] xi[r][k],
//                c[k] = scale * values[k] (values: a device table), or scale alone.
//
// Like LincombFunctor (lincomb.cuh): host/device functors run by the generic launcher, ONE
// pass over the batch for any number of terms (1..kMaxLincombTerms, a runtime count: the term
// loop is unrolled to the maximum with a uniform guard, so every array index is a compile-time
// constant and the kernel parameters are never copied to local memory), and the same functor
// runs on the host in the tests. `out` may alias any input: an item reads every input it needs
// (for a block: both halves of its element pairs) before it writes.
//
// Items: a Block2 item is up to W = 16 / sizeof(Scalar) consecutive element pairs (r, j0..)
// of one row, loaded as one 128-bit packet per half and term when d is a multiple of W (both
// halves of every row are then 16-byte aligned), element by element otherwise. A ColumnCoeff
// item is W consecutive elements of the flat state (128-bit packets, as the scalar update),
// whose columns are tracked incrementally (one 64-bit modulo per item).
//
// Noise: xi is the standard normal state of lincomb_term.hpp, element (r, c) drawn at the
// global index (row_offset + r) * width + c; a block row reads xi_x at (row_offset + r) * 2d + j
// and xi_v at (row_offset + r) * 2d + d + j. Full packets draw whole Box-Muller pairs
// (detail::gaussian_packet: one extra pair when the packet starts at an odd global index, i.e.
// the v half of an odd d, or a ColumnCoeff batch with odd row_offset * width); the element-wise
// tail of a row draws single values.
//
// Rounding mirrors EigenBackend's structured lincombs operation for operation, each product
// and sum rounded once and never contracted (mul_rn/add_rn: __dmul_rn/__dadd_rn and the float
// versions on the device):
//   Block2:      acc = 0; per term acc += (Scalar(xx) x + Scalar(xv) v) in Scalar;
//                noise acc += Scalar(L.xx xi_x + L.xv xi_v), the bracket in double;
//   ColumnCoeff: acc = 0; per term acc += Scalar(scale * values[k]) x (the product of scale
//                and the table entry in double), or Scalar(scale) x;
//                noise acc += Scalar((scale * values[k]) xi) in double.
// So the device result is bit-identical to EigenBackend on hosts that do not contract these
// expressions into FMAs (the default x86-64 flags); a host build with FMA contraction can
// differ in the last bit. The noise values themselves are bit-identical everywhere.
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/cuda/config.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/detail/philox.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

/// One summand B (x) I_d applied to the halves of a state on raw memory.
template <class Scalar> struct Block2Term {
  Block2 coeff;
  const Scalar* data;
};
/// One summand diag(c) applied to the columns of a state on raw memory (coeff.values: device
/// memory on the device, host memory in host runs).
template <class Scalar> struct ColumnTerm {
  ColumnCoeff coeff;
  const Scalar* data;
};

/// out = sum_t B_t (x_t, v_t) (+ L (xi_x, xi_v) when WithNoise) over `rows` rows of width
/// 2 * half; item `it` = row it / chunks, pairs [j0, min(j0 + W, half)), j0 = (it % chunks) W.
template <class Scalar, bool WithNoise> struct Block2LincombFunctor {
  static constexpr int kWidth = detail::Packet<Scalar>::kWidth;
  static constexpr int kMaxTerms = kMaxLincombTerms;

  Scalar* out;
  const Scalar* in[kMaxTerms];
  Scalar xx[kMaxTerms], xv[kMaxTerms], vx[kMaxTerms], vv[kMaxTerms]; ///< rounded like Eigen
  int terms;
  Block2 noise; ///< L, in double
  std::uint64_t seed, step;
  std::uint64_t first_row; ///< global index of row 0 (row_offset)
  std::int64_t rows, half, chunks;
  bool packets; ///< half % kWidth == 0 (and aligned base pointers): 128-bit loads per half

  static std::int64_t chunks_per_row(std::int64_t half) { return (half + kWidth - 1) / kWidth; }
  std::int64_t items() const { return rows * chunks; }

  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t item) const {
    const std::int64_t r = item / chunks;
    const std::int64_t j0 = (item - r * chunks) * kWidth;
    const std::int64_t x_at = r * 2 * half + j0; // element (r, j0) of the x half
    // Global noise indices of the pair (r, j0): x half, and d further on for the v half.
    const std::uint64_t noise_x =
        (first_row + static_cast<std::uint64_t>(r)) * static_cast<std::uint64_t>(2 * half) +
        static_cast<std::uint64_t>(j0);
    const std::uint64_t noise_v = noise_x + static_cast<std::uint64_t>(half);
    if (j0 + kWidth <= half) {
      Scalar ax[kWidth], av[kWidth];
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) ax[e] = av[e] = Scalar(0);
      DIFFGRAD_UNROLL
      for (int t = 0; t < kMaxTerms; ++t) {
        if (t < terms) {
          detail::Packet<Scalar> x, v;
          if (packets) {
            x = detail::load_packet(in[t] + x_at);
            v = detail::load_packet(in[t] + x_at + half);
          } else {
            DIFFGRAD_UNROLL
            for (int e = 0; e < kWidth; ++e) {
              x.v[e] = in[t][x_at + e];
              v.v[e] = in[t][x_at + half + e];
            }
          }
          DIFFGRAD_UNROLL
          for (int e = 0; e < kWidth; ++e) accumulate(t, x.v[e], v.v[e], ax[e], av[e]);
        }
      }
      if constexpr (WithNoise) {
        double xi_x[kWidth], xi_v[kWidth];
        detail::gaussian_packet(seed, step, noise_x, xi_x);
        detail::gaussian_packet(seed, step, noise_v, xi_v);
        DIFFGRAD_UNROLL
        for (int e = 0; e < kWidth; ++e) add_noise(xi_x[e], xi_v[e], ax[e], av[e]);
      }
      if (packets) {
        detail::Packet<Scalar> px, pv;
        DIFFGRAD_UNROLL
        for (int e = 0; e < kWidth; ++e) {
          px.v[e] = ax[e];
          pv.v[e] = av[e];
        }
        detail::store_packet(out + x_at, px);
        detail::store_packet(out + x_at + half, pv);
      } else {
        DIFFGRAD_UNROLL
        for (int e = 0; e < kWidth; ++e) {
          out[x_at + e] = ax[e];
          out[x_at + half + e] = av[e];
        }
      }
    } else {
      // The row's last pairs: element by element (each pair read in full before it is written).
      for (std::int64_t e = 0; e < half - j0; ++e) {
        Scalar ax = Scalar(0), av = Scalar(0);
        DIFFGRAD_UNROLL
        for (int t = 0; t < kMaxTerms; ++t)
          if (t < terms) accumulate(t, in[t][x_at + e], in[t][x_at + half + e], ax, av);
        if constexpr (WithNoise) {
          const auto k = static_cast<std::uint64_t>(e);
          add_noise(diffgrad::detail::gaussian(seed, step, noise_x + k),
                    diffgrad::detail::gaussian(seed, step, noise_v + k), ax, av);
        }
        out[x_at + e] = ax;
        out[x_at + half + e] = av;
      }
    }
  }

private:
  /// acc_x += xx x + xv v, acc_v += vx x + vv v (EigenBackend's order, one rounding each).
  DIFFGRAD_HOST_DEVICE void accumulate(int t, Scalar x, Scalar v, Scalar& acc_x,
                                       Scalar& acc_v) const {
    acc_x =
        detail::add_rn(acc_x, detail::add_rn(detail::mul_rn(xx[t], x), detail::mul_rn(xv[t], v)));
    acc_v =
        detail::add_rn(acc_v, detail::add_rn(detail::mul_rn(vx[t], x), detail::mul_rn(vv[t], v)));
  }
  /// acc += Scalar(L (xi_x, xi_v)), the 2-vector computed in double.
  DIFFGRAD_HOST_DEVICE void add_noise(double xi_x, double xi_v, Scalar& acc_x,
                                      Scalar& acc_v) const {
    using detail::add_rn;
    using detail::mul_rn;
    acc_x =
        add_rn(acc_x, static_cast<Scalar>(add_rn(mul_rn(noise.xx, xi_x), mul_rn(noise.xv, xi_v))));
    acc_v =
        add_rn(acc_v, static_cast<Scalar>(add_rn(mul_rn(noise.vx, xi_x), mul_rn(noise.vv, xi_v))));
  }
};

/// out[i] = sum_t c_t[k] in_t[i] (+ Scalar(c_xi[k] xi_i) when WithNoise), k = i % cols, for
/// item `it` = elements [it W, min((it + 1) W, size)).
template <class Scalar, bool WithNoise> struct ColumnLincombFunctor {
  static constexpr int kWidth = detail::Packet<Scalar>::kWidth;
  static constexpr int kMaxTerms = kMaxLincombTerms;

  Scalar* out;
  const Scalar* in[kMaxTerms];
  const double* values[kMaxTerms]; ///< null: the term's coefficient is scale[t] alone
  double scale[kMaxTerms];
  int terms;
  ColumnCoeff noise;
  std::uint64_t seed, step;
  std::uint64_t first_index; ///< global index of element 0: row_offset * cols
  std::int64_t size, cols;

  static std::int64_t items(std::int64_t size) { return (size + kWidth - 1) / kWidth; }

  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t item) const {
    const std::int64_t first = item * kWidth;
    std::int64_t col = first % cols;
    if (first + kWidth <= size) {
      std::int64_t k[kWidth];
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) {
        k[e] = col;
        col = col + 1 == cols ? 0 : col + 1;
      }
      Scalar acc[kWidth];
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) acc[e] = Scalar(0);
      DIFFGRAD_UNROLL
      for (int t = 0; t < kMaxTerms; ++t) {
        if (t < terms) {
          const detail::Packet<Scalar> x = detail::load_packet(in[t] + first);
          DIFFGRAD_UNROLL
          for (int e = 0; e < kWidth; ++e) accumulate(t, k[e], x.v[e], acc[e]);
        }
      }
      if constexpr (WithNoise) {
        double xi[kWidth];
        detail::gaussian_packet(seed, step, first_index + static_cast<std::uint64_t>(first), xi);
        DIFFGRAD_UNROLL
        for (int e = 0; e < kWidth; ++e) add_noise(k[e], xi[e], acc[e]);
      }
      detail::Packet<Scalar> r;
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) r.v[e] = acc[e];
      detail::store_packet(out + first, r);
    } else {
      for (std::int64_t i = first; i < size; ++i) {
        Scalar acc = Scalar(0);
        DIFFGRAD_UNROLL
        for (int t = 0; t < kMaxTerms; ++t)
          if (t < terms) accumulate(t, col, in[t][i], acc);
        if constexpr (WithNoise)
          add_noise(
              col,
              diffgrad::detail::gaussian(seed, step, first_index + static_cast<std::uint64_t>(i)),
              acc);
        out[i] = acc;
        col = col + 1 == cols ? 0 : col + 1;
      }
    }
  }

private:
  /// acc += Scalar(scale * values[k]) x, or Scalar(scale) x (EigenBackend's order).
  DIFFGRAD_HOST_DEVICE void accumulate(int t, std::int64_t k, Scalar x, Scalar& acc) const {
    const Scalar c = values[t] == nullptr
                         ? static_cast<Scalar>(scale[t])
                         : static_cast<Scalar>(detail::mul_rn(scale[t], values[t][k]));
    acc = detail::add_rn(acc, detail::mul_rn(c, x));
  }
  /// acc += Scalar(c_xi[k] xi), in double.
  DIFFGRAD_HOST_DEVICE void add_noise(std::int64_t k, double xi, Scalar& acc) const {
    const double c =
        noise.values == nullptr ? noise.scale : detail::mul_rn(noise.scale, noise.values[k]);
    acc = detail::add_rn(acc, static_cast<Scalar>(detail::mul_rn(c, xi)));
  }
};

/// The Block2 functor for `terms` over a rows x (2 half) state (no checks: see lincomb_block2).
template <bool WithNoise, class Scalar>
Block2LincombFunctor<Scalar, WithNoise>
make_block2_functor(Scalar* out, std::int64_t rows, std::int64_t half,
                    std::span<const Block2Term<Scalar>> terms,
                    const BasicNoiseTerm<Block2>& noise) {
  Block2LincombFunctor<Scalar, WithNoise> f{};
  f.out = out;
  f.terms = static_cast<int>(terms.size());
  for (std::size_t t = 0; t < terms.size(); ++t) {
    f.in[t] = terms[t].data;
    f.xx[t] = static_cast<Scalar>(terms[t].coeff.xx);
    f.xv[t] = static_cast<Scalar>(terms[t].coeff.xv);
    f.vx[t] = static_cast<Scalar>(terms[t].coeff.vx);
    f.vv[t] = static_cast<Scalar>(terms[t].coeff.vv);
  }
  f.noise = noise.coeff;
  f.seed = noise.seed;
  f.step = noise.step;
  f.first_row = noise.row_offset;
  f.rows = rows;
  f.half = half;
  f.chunks = f.chunks_per_row(half);
  bool aligned = detail::is_aligned16(out);
  for (const auto& t : terms) aligned = aligned && detail::is_aligned16(t.data);
  f.packets = aligned && half % f.kWidth == 0;
  return f;
}

/// The ColumnCoeff functor for `terms` over a size / cols x cols state (no checks).
template <bool WithNoise, class Scalar>
ColumnLincombFunctor<Scalar, WithNoise>
make_column_functor(Scalar* out, std::int64_t size, std::int64_t cols,
                    std::span<const ColumnTerm<Scalar>> terms,
                    const BasicNoiseTerm<ColumnCoeff>& noise) {
  ColumnLincombFunctor<Scalar, WithNoise> f{};
  f.out = out;
  f.terms = static_cast<int>(terms.size());
  for (std::size_t t = 0; t < terms.size(); ++t) {
    f.in[t] = terms[t].data;
    f.values[t] = terms[t].coeff.values;
    f.scale[t] = terms[t].coeff.scale;
  }
  f.noise = noise.coeff;
  f.seed = noise.seed;
  f.step = noise.step;
  f.first_index = noise.row_offset * static_cast<std::uint64_t>(cols);
  f.size = size;
  f.cols = cols;
  return f;
}

namespace detail {
template <class TermT> bool valid_term_count(std::span<const TermT> terms) {
  return !terms.empty() && terms.size() <= static_cast<std::size_t>(kMaxLincombTerms);
}
} // namespace detail

/// Block lincomb over a rows x (2 half) state on `stream`, one pass (status code; the host API
/// throws). cudaErrorInvalidValue: no terms, more than kMaxLincombTerms, negative sizes;
/// cudaErrorMisalignedAddress: a pointer that is not 16-byte aligned (every state is).
template <class Scalar>
cudaError_t lincomb_block2(Scalar* out, std::int64_t rows, std::int64_t half, cudaStream_t stream,
                           std::span<const Block2Term<Scalar>> terms,
                           const BasicNoiseTerm<Block2>& noise = {}) {
  if (!detail::valid_term_count(terms) || rows < 0 || half < 0) return cudaErrorInvalidValue;
  if (rows == 0 || half == 0) return cudaSuccess;
  if (!detail::is_aligned16(out)) return cudaErrorMisalignedAddress;
  for (const auto& t : terms)
    if (!detail::is_aligned16(t.data)) return cudaErrorMisalignedAddress;
  if (noise.coeff.is_zero()) {
    const auto f = make_block2_functor<false>(out, rows, half, terms, noise);
    return launch_for_each(f, f.items(), stream);
  }
  const auto f = make_block2_functor<true>(out, rows, half, terms, noise);
  return launch_for_each(f, f.items(), stream);
}

/// Per-column lincomb over a (size / cols) x cols state on `stream`, one pass (status code).
/// The tables behind coeff.values must be device memory. cudaErrorInvalidValue: no terms, more
/// than kMaxLincombTerms, or a size that is not whole rows; cudaErrorMisalignedAddress as above.
template <class Scalar>
cudaError_t lincomb_columns(Scalar* out, std::int64_t size, std::int64_t cols, cudaStream_t stream,
                            std::span<const ColumnTerm<Scalar>> terms,
                            const BasicNoiseTerm<ColumnCoeff>& noise = {}) {
  if (!detail::valid_term_count(terms) || size < 0 || cols < 0 || (cols == 0 && size != 0) ||
      (cols > 0 && size % cols != 0))
    return cudaErrorInvalidValue;
  if (size == 0) return cudaSuccess;
  if (!detail::is_aligned16(out)) return cudaErrorMisalignedAddress;
  for (const auto& t : terms)
    if (!detail::is_aligned16(t.data)) return cudaErrorMisalignedAddress;
  if (noise.coeff.is_zero()) {
    const auto f = make_column_functor<false>(out, size, cols, terms, noise);
    return launch_for_each(f, f.items(size), stream);
  }
  const auto f = make_column_functor<true>(out, size, cols, terms, noise);
  return launch_for_each(f, f.items(size), stream);
}

DIFFGRAD_CUDA_NAMESPACE_END
