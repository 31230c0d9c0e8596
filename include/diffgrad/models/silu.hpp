#pragma once
// SiLU, a * sigmoid(a) = a / (1 + e^{-a}), over a contiguous run of scalars: the Mlp's hidden
// activation.
//
// Why not one Eigen expression in float64: Eigen 3.4's double exp is a rational function, so
// the plain expression costs two divisions per element, and in the reference Mlp's forward
// pass (64-128-128-64) it took about a third of the time beside the GEMMs. With AVX-512F
// (compile-time: the same binary gives the same bits on every machine it runs on) the float64
// path computes e^{-a} without a division and keeps the one quotient, which runs on the
// divider beside the FMA pipe:
//   e^{-a} = 2^k e^w, k = round(-a / ln 2), w = -a - k ln 2 (Cody-Waite, two FMAs), e^w by its
//   degree-13 Taylor polynomial (|w| <= ln 2 / 2: truncation < 5e-18 relative), 2^k from k's
//   bits; SiLU = a / (1 + e^{-a}).
// 1.56 -> 1.04 ns per element on the benchmark Xeon (one core); within 2 ulps of the correctly
// rounded quotient (tests/test_silu.cpp asserts <= 4 against long double over the whole
// range). Without AVX-512F, and in float (whose division is cheap), it is the plain
// expression on Eigen's packets. Either way an element's bits do not depend on where it sits
// in the run (no scalar head or tail code).
//
// Edge cases as the quotient: below a = -708 (where e^{-a} nears overflow) the result is a
// signed zero (the quotient's is -0 from about -709.8; the true value is below 1e-304);
// SiLU(+inf) = +inf, SiLU(-inf) = NaN (-inf / inf), NaN stays NaN, SiLU(-0) = -0.
#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__) && !defined(__CUDACC__)
#include <immintrin.h>
#define DIFFGRAD_SILU_AVX512 1
#else
#define DIFFGRAD_SILU_AVX512 0
#endif

namespace diffgrad::models::impl {

#if DIFFGRAD_SILU_AVX512
/// SiLU of 8 doubles, a / (1 + e^{-a}) (header comment).
inline __m512d silu_avx512(__m512d a) {
  // The zero-masked forms of the intrinsics with an all-ones mask: the unmasked ones pass
  // GCC 12's self-initialised _mm512_undefined_* through, which -Wuninitialized flags at -O2.
  constexpr __mmask8 all = 0xFF;
  const __m512d one = _mm512_set1_pd(1.0);
  // z = -a, clamped: below -40, 1 + e^z rounds to 1 anyway; above 708 the sigmoid is below
  // 1e-307 and the result is set to a * 0 below (-0, as the quotient a / inf). min/max return their
  // second operand for a NaN z; a NaN a stays NaN through the final product.
  const __m512d z_raw = _mm512_sub_pd(_mm512_setzero_pd(), a);
  const __mmask8 vanishing = _mm512_cmp_pd_mask(z_raw, _mm512_set1_pd(708.0), _CMP_GT_OQ);
  const __m512d z = _mm512_maskz_max_pd(all, _mm512_maskz_min_pd(all, z_raw, _mm512_set1_pd(708.0)),
                                        _mm512_set1_pd(-40.0));
  // e^z = 2^k e^w: k = round(z / ln 2) by the 1.5 * 2^52 shifter (k lands in the low bits of
  // the sum), w = z - k ln 2 in two FMA steps (Cody-Waite; |w| <= ln 2 / 2), e^w by its
  // Taylor polynomial of degree 13 (truncation < 5e-18 relative), 2^k from k's bits.
  const __m512d shifter = _mm512_set1_pd(0x1.8p52);
  const __m512d shifted = _mm512_fmadd_pd(z, _mm512_set1_pd(0x1.71547652b82fep0), shifter);
  const __m512d k = _mm512_sub_pd(shifted, shifter);
  __m512d w = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.62e42fefa3800p-1), z); // ln 2, high bits
  w = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.ef35793c76730p-45), w);        // ln 2, the rest
  constexpr double inverse_factorial[14] = {1.0,
                                            1.0,
                                            1.0 / 2,
                                            1.0 / 6,
                                            1.0 / 24,
                                            1.0 / 120,
                                            1.0 / 720,
                                            1.0 / 5040,
                                            1.0 / 40320,
                                            1.0 / 362880,
                                            1.0 / 3628800,
                                            1.0 / 39916800,
                                            1.0 / 479001600,
                                            1.0 / 6227020800};
  __m512d p = _mm512_set1_pd(inverse_factorial[13]);
  for (int j = 12; j >= 0; --j) p = _mm512_fmadd_pd(p, w, _mm512_set1_pd(inverse_factorial[j]));
  const __m512i k_bits = _mm512_sub_epi64(_mm512_castpd_si512(shifted),
                                          _mm512_castpd_si512(shifter)); // k as an int64
  const __m512d two_k = _mm512_castsi512_pd(
      _mm512_maskz_slli_epi64(all, _mm512_add_epi64(k_bits, _mm512_set1_epi64(1023)), 52));
  const __m512d y = _mm512_fmadd_pd(p, two_k, one); // 1 + e^z
  // The one division runs on the divider, beside the FMA pipe that the rest keeps busy.
  const __m512d quotient = _mm512_maskz_div_pd(all, a, y);
  return _mm512_mask_mov_pd(quotient, vanishing, _mm512_maskz_mul_pd(all, a, _mm512_setzero_pd()));
}
#endif

/// out[i] = a[i] / (1 + exp(-a[i])) for i < n; out may equal a (in place).
template <class Scalar> void silu(const Scalar* a, Scalar* out, std::ptrdiff_t n) {
  using array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
#if DIFFGRAD_SILU_AVX512
  if constexpr (std::is_same_v<Scalar, double>) {
    std::ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(out + i, silu_avx512(_mm512_loadu_pd(a + i)));
    if (i < n) { // the last partial register, under a mask: the same operations as the rest
      const auto lanes = static_cast<__mmask8>((1u << (n - i)) - 1u);
      _mm512_mask_storeu_pd(out + i, lanes, silu_avx512(_mm512_maskz_loadu_pd(lanes, a + i)));
    }
    return;
  }
#endif
  // Chunks through an aligned stack buffer padded to whole SIMD packets, so Eigen's vectorised
  // exp and division run on whole packets only (on a run's unaligned ends Eigen would switch
  // to std::exp): an element's bits do not depend on where it sits in the run.
  constexpr std::ptrdiff_t kChunk = 256, kPad = 64 / sizeof(Scalar); // a 512-bit register
  alignas(64) Scalar buffer[kChunk];
  for (std::ptrdiff_t c0 = 0; c0 < n; c0 += kChunk) {
    const std::ptrdiff_t m = std::min(kChunk, n - c0), padded = (m + kPad - 1) / kPad * kPad;
    std::copy(a + c0, a + c0 + m, buffer);
    std::fill(buffer + m, buffer + padded, Scalar(0));
    Eigen::Map<array, Eigen::Aligned64> x(buffer, padded);
    x = x / (Scalar(1) + (-x).exp());
    std::copy(buffer, buffer + m, out + c0);
  }
}

} // namespace diffgrad::models::impl
