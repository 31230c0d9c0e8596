#pragma once
// Many Box-Muller pairs at once on the host, several pairs per SIMD register, with EXACTLY the
// bits of detail::gaussian_pair (so the CPU still draws what the GPU draws).
//
// Why a second implementation: the scalar noise (detail/philox.hpp + detail/portable_math.hpp)
// keeps every product apart from later additions behind an empty asm statement, so that no
// compiler can fuse it into an FMA; that barrier also keeps the compiler from vectorising the
// loop, and the noise ran at 20 to 30 ns per element, far below memory bandwidth. Here the same
// operations run on GCC/Clang vector types, the barrier is applied to the whole register, and
// each lane performs the scalar code's IEEE-754 operations in the scalar code's order:
//   - Philox4x32-10 in 64-bit lanes (products of two 32-bit words are exact in 64 bits);
//   - the uniform's 53 bits converted exactly (< 2^53), scaled by a power of two;
//   - log: the same exponent/mantissa split, fdlibm polynomial and order of operations;
//   - the quadrant reduction of 2 pi u with the same exact steps (floor of a non-negative
//     value is its truncation), both quarter-turn polynomials, and an exact selection.
// Branches of the scalar code become exact selects. tests/test_gaussian_batch.cpp compares
// every lane with the scalar functions bit for bit, on millions of draws and on the inputs
// where the branches switch.
//
// Lane count: 8 with AVX-512F, 4 with AVX2, 2 with SSE2 (every x86-64) or on AArch64;
// other compilers and targets use the scalar code. Host only: CUDA code calls gaussian_pair.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "diffgrad/detail/philox.hpp"
#include "diffgrad/detail/portable_math.hpp"
#if !defined(__CUDACC__) && defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if !defined(__CUDACC__) && defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
#if defined(__AVX512F__)
#define DIFFGRAD_NOISE_LANES 8
#elif defined(__AVX2__) // AVX without AVX2 has no 256-bit integer operations: 2 lanes are faster
#define DIFFGRAD_NOISE_LANES 4
#else
#define DIFFGRAD_NOISE_LANES 2
#endif
#else
#define DIFFGRAD_NOISE_LANES 1
#endif

namespace diffgrad::detail {

#if DIFFGRAD_NOISE_LANES > 1
namespace simd_noise {

inline constexpr int kLanes = DIFFGRAD_NOISE_LANES;
using f64 = double __attribute__((vector_size(8 * DIFFGRAD_NOISE_LANES)));
using u64 = std::uint64_t __attribute__((vector_size(8 * DIFFGRAD_NOISE_LANES)));
using i64 = std::int64_t __attribute__((vector_size(8 * DIFFGRAD_NOISE_LANES)));

/// Every lane's a * b rounded once and opaque to the optimiser (no FMA contraction), like
/// portable::mul_rn.
inline f64 mul_rn(f64 a, f64 b) {
  f64 p = a * b;
#if defined(__aarch64__)
  __asm__("" : "+w"(p));
#elif DIFFGRAD_NOISE_LANES == 8
  __asm__("" : "+v"(p));
#else
  __asm__("" : "+x"(p));
#endif
  return p;
}
inline f64 mul_add_rn(f64 a, f64 b, f64 c) { return mul_rn(a, b) + c; }
inline f64 splat(double v) { return f64{} + v; }

inline f64 from_bits(u64 bits) {
  f64 x;
  __builtin_memcpy(&x, &bits, sizeof x);
  return x;
}
inline u64 to_bits(f64 x) {
  u64 b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
}

/// Exact conversions and products that the target may lack as single instructions (u64 -> f64
/// and 64-bit multiplies need AVX-512DQ; without it the compiler emulates them lane by lane).

/// Lane-wise a * b for a, b < 2^32 (the 64-bit product of two 32-bit words).
inline u64 mul_32x32(u64 a, u64 b) {
  // AVX-512: the compiler's 64-bit multiply is as fast here (and GCC 12 warns inside
  // _mm512_mul_epu32).
#if defined(__x86_64__) && DIFFGRAD_NOISE_LANES == 4
  return (u64)_mm256_mul_epu32((__m256i)a, (__m256i)b);
#elif defined(__x86_64__) && DIFFGRAD_NOISE_LANES == 2
  return (u64)_mm_mul_epu32((__m128i)a, (__m128i)b);
#else
  return a * b;
#endif
}

/// Exactly the double of an integer 0 <= v < 2^52: 2^52 + v has v as its mantissa.
inline f64 small_to_double(u64 v) {
  constexpr std::uint64_t kTwo52Bits = 0x4330000000000000ull;
  return from_bits(v | kTwo52Bits) - 0x1.0p52;
}
/// Exactly the double of an integer 0 <= v < 2^53: twice (v >> 1), plus v's low bit (each
/// step exact, so any contraction gives the same value).
inline f64 to_double_53(u64 v) { return small_to_double(v >> 1) * 2.0 + small_to_double(v & 1); }
/// Exactly the double of a signed integer |v| < 2^51 (2^52 + 2^51 + v keeps v in the mantissa).
inline f64 signed_to_double(i64 v) {
  constexpr std::int64_t kMagicBits = 0x4338000000000000ll;
  return from_bits((u64)(v + kMagicBits)) - 0x1.8p52;
}
/// floor(t) and its integer value for 0 <= t < 2^51: adding 2^52 rounds t to an integer; one
/// correction makes it the floor. All steps exact.
inline f64 floor_small(f64 t, i64& as_integer) {
  const f64 shifted = t + 0x1.0p52; // 2^52 + nearest integer to t, exactly representable
  f64 q = shifted - 0x1.0p52;
  const i64 too_big = (i64)(q > t);
  q = too_big ? q - 1.0 : q;
  as_integer = (i64)(to_bits(shifted) & ((std::uint64_t{1} << 52) - 1)) + too_big;
  return q;
}

/// portable::log_normal, lane-wise.
inline f64 log_normal(f64 x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  constexpr std::uint64_t kMantissa = (std::uint64_t{1} << 52) - 1;
  constexpr std::uint64_t kExponentOfOne = std::uint64_t{1023} << 52;
  constexpr std::uint64_t kSqrt2Mantissa = 0x6a09e667f3bcdull;
  const u64 bits = to_bits(x);
  const i64 exponent = (i64)((bits >> 52) & 0x7ff) - 1023;
  const u64 mant = bits & kMantissa;
  // Scalar branch "mant >= sqrt(2)'s mantissa": halve m (exponent of 1/2) and add 1 to k.
  const i64 halve = (i64)(mant >= kSqrt2Mantissa); // -1 where true, 0 where false
  constexpr std::uint64_t kMinusOneExponent = std::uint64_t{0} - (std::uint64_t{1} << 52);
  const u64 exponent_bits = kExponentOfOne + ((u64)halve & kMinusOneExponent);
  const f64 m = from_bits(mant | exponent_bits);
  const i64 k = exponent - halve;
  const f64 f = m - 1.0;
  const f64 s = f / (2.0 + f);
  const f64 z = mul_rn(s, s);
  f64 p = splat(1.479819860511658591e-01);
  p = mul_add_rn(p, z, splat(1.531383769920937332e-01));
  p = mul_add_rn(p, z, splat(1.818357216161805012e-01));
  p = mul_add_rn(p, z, splat(2.222219843214978396e-01));
  p = mul_add_rn(p, z, splat(2.857142874366239149e-01));
  p = mul_add_rn(p, z, splat(3.999999999940941908e-01));
  p = mul_add_rn(p, z, splat(6.666666666666735130e-01));
  const f64 half_f = 0.5 * f;
  const f64 hf = mul_rn(half_f, f);
  const f64 hf_plus_r = mul_add_rn(z, p, hf);
  const f64 dk = signed_to_double(k);
  const f64 tail = mul_add_rn(s, hf_plus_r, mul_rn(dk, splat(kLn2Lo)));
  const f64 log1p_f_minus_f = tail + (-hf);
  return mul_add_rn(dk, splat(kLn2Hi), log1p_f_minus_f + f);
}

/// portable::sin_quarter_turn, lane-wise.
inline f64 sin_quarter_turn(f64 r) {
  const f64 z = mul_rn(r, r);
  f64 p = splat(0x1.aaec32af93359p-38);
  p = mul_add_rn(p, z, splat(-0x1.6fadb9f155744p-31));
  p = mul_add_rn(p, z, splat(0x1.e8f434d018d63p-25));
  p = mul_add_rn(p, z, splat(-0x1.e3074fde8871fp-19));
  p = mul_add_rn(p, z, splat(0x1.50783487ee782p-13));
  p = mul_add_rn(p, z, splat(-0x1.32d2cce62bd86p-8));
  p = mul_add_rn(p, z, splat(0x1.466bc6775aae2p-4));
  p = mul_add_rn(p, z, splat(-0x1.4abbce625be53p-1));
  return mul_add_rn(r, splat(0x1.921fb54442d18p+0), mul_rn(mul_rn(r, z), p));
}

/// portable::cos_quarter_turn, lane-wise.
inline f64 cos_quarter_turn(f64 r) {
  const f64 z = mul_rn(r, r);
  f64 p = splat(0x1.20c62c2f2d7f5p-34);
  p = mul_add_rn(p, z, splat(-0x1.b6e24f44b128fp-28));
  p = mul_add_rn(p, z, splat(0x1.f9d38a3763cc3p-22));
  p = mul_add_rn(p, z, splat(-0x1.a6d1f2a204a8cp-16));
  p = mul_add_rn(p, z, splat(0x1.e1f506891babbp-11));
  p = mul_add_rn(p, z, splat(-0x1.55d3c7e3cbffap-6));
  p = mul_add_rn(p, z, splat(0x1.03c1f081b5ac4p-2));
  p = mul_add_rn(p, z, splat(-0x1.3bd3cc9be45dep+0));
  return mul_add_rn(p, z, splat(1.0));
}

/// portable::sincos_two_pi, lane-wise, for u in (0, 1].
inline void sincos_two_pi(f64 u, f64& sin_out, f64& cos_out) {
  const f64 t = 4.0 * u; // exact
  i64 q_integer;
  const f64 q = floor_small(t, q_integer);
  f64 r = t - q;                   // exact, in [0, 1)
  const i64 wrap = (i64)(r > 0.5); // -1 where r > 1/2
  r = wrap ? r - 1.0 : r;          // exact
  const i64 quadrant = (q_integer - wrap) & 3;
  const f64 s = sin_quarter_turn(r), c = cos_quarter_turn(r);
  // quadrant 0: (s, c), 1: (c, -s), 2: (-s, -c), 3: (-c, s): odd quadrants swap, the upper
  // two negate (negation and selection are exact).
  const i64 odd = quadrant & 1;
  const f64 sin_lo = odd != 0 ? c : s;
  const f64 cos_lo = odd != 0 ? -s : c;
  sin_out = quadrant >= 2 ? -sin_lo : sin_lo;
  cos_out = quadrant >= 2 ? -cos_lo : cos_lo;
}

/// kLanes consecutive pairs starting at `first_pair`; out gets even, odd interleaved.
// Forced inline into gaussian_pairs' loop: out of line, GCC 12 kept the block's lanes in memory
// between the Philox rounds and the transform and the noise ran 1.5x slower (5.5 vs 3.5 ns per
// element, AVX-512, measured in bench_solver_step's translation unit).
inline __attribute__((always_inline)) void gaussian_pairs_block(std::uint64_t seed,
                                                                std::uint64_t step,
                                                                std::uint64_t first_pair,
                                                                double* out) {
  constexpr std::uint64_t kLow32 = 0xffffffffull;
  u64 pair;
  for (int lane = 0; lane < kLanes; ++lane)
    pair[lane] = first_pair + static_cast<std::uint64_t>(lane);
  // The counter of detail::gaussian_block, one 32-bit word per 64-bit lane.
  u64 c0 = pair & kLow32, c1 = pair >> 32;
  u64 c2 = u64{} + (step & kLow32), c3 = u64{} + (step >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) { // detail::philox4x32_10
    const u64 p0 = mul_32x32(c0, u64{} + 0xD2511F53ull), p1 = mul_32x32(c2, u64{} + 0xCD9E8D57ull);
    const u64 next0 = (p1 >> 32) ^ c1 ^ k0, next2 = (p0 >> 32) ^ c3 ^ k1;
    c1 = p1 & kLow32;
    c3 = p0 & kLow32;
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  constexpr std::uint64_t k53 = (std::uint64_t{1} << 53) - 1;
  const f64 u1 = (to_double_53(((c0 << 21) ^ (c1 >> 11)) & k53) + 1.0) * 0x1.0p-53; // uniform_open0
  const f64 u2 = (to_double_53(((c2 << 21) ^ (c3 >> 11)) & k53) + 1.0) * 0x1.0p-53;
  f64 sin_v, cos_v;
  sincos_two_pi(u2, sin_v, cos_v);
  f64 radius = -2.0 * log_normal(u1);
  for (int lane = 0; lane < kLanes; ++lane) radius[lane] = std::sqrt(radius[lane]);
  const f64 even = mul_rn(radius, cos_v), odd = mul_rn(radius, sin_v);
  for (int lane = 0; lane < kLanes; ++lane) {
    out[2 * lane] = even[lane];
    out[2 * lane + 1] = odd[lane];
  }
}

} // namespace simd_noise
#endif

/// out[2k] and out[2k + 1] = gaussian_pair(seed, step, first_pair + k) for k < pairs,
/// bit for bit, several pairs per SIMD register where the target allows.
inline void gaussian_pairs(std::uint64_t seed, std::uint64_t step, std::uint64_t first_pair,
                           std::size_t pairs, double* out) {
  std::uint64_t pair = first_pair;
  const std::uint64_t end = first_pair + pairs; // pair indices wrap modulo 2^64, as the counter's
#if DIFFGRAD_NOISE_LANES > 1
  for (std::size_t left = pairs; left >= simd_noise::kLanes; left -= simd_noise::kLanes) {
    simd_noise::gaussian_pairs_block(seed, step, pair, out);
    pair += simd_noise::kLanes;
    out += 2 * simd_noise::kLanes;
  }
#endif
  for (; pair != end; ++pair, out += 2) gaussian_pair(seed, step, pair, out[0], out[1]);
}

/// out[k] = gaussian(seed, step, first + k) for k < len, bit for bit, for any first index
/// (odd starts and ends are drawn singly, the pairs in between in batches).
inline void gaussian_range(std::uint64_t seed, std::uint64_t step, std::uint64_t first,
                           std::size_t len, double* out) {
  if (len == 0) return;
  if (first % 2 != 0) {
    out[0] = gaussian(seed, step, first);
    ++first, ++out, --len;
  }
  gaussian_pairs(seed, step, first / 2, len / 2, out);
  if (len % 2 != 0) out[len - 1] = gaussian(seed, step, first + len - 1);
}

} // namespace diffgrad::detail
