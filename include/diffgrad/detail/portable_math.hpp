#pragma once
// log, sin and cos that give the SAME BITS on the host (any IEEE-754 C++ compiler) and on a
// CUDA device, for the Box-Muller transform of the counter-based noise (detail/philox.hpp).
//
// Why not std::log / std::sin / std::cos: the libraries differ. glibc's log is accurate to
// about 0.52 ulp and its sin/cos to under 1 ulp, CUDA's double log to 1 ulp and sin/cos to
// 2 ulp (CUDA Math API, table of maximum ulp errors); neither is correctly rounded, so the
// same uniform gives a Gaussian that differs in the last bit between the CPU and the GPU
// backend for some fraction of the draws. Bit-identical noise (docs/architecture.md) therefore
// needs one implementation written only with operations that IEEE-754 rounds correctly on
// both sides:
//   - +, -, *, / and sqrt, each rounded once (on the device through the __d*_rn intrinsics,
//     which the compiler never contracts into an FMA);
//   - no fused multiply-add: every product is rounded on its own and made opaque before it
//     is added (mul_rn), so neither nvcc's default --fmad=true nor a host compiler with
//     -ffp-contract=fast and FMA instructions can fuse it. (Explicit fma() on both sides
//     would also be exact, but without FMA instructions in the host build std::fma is a
//     library call: the noise was 1.75x slower that way on x86-64);
//   - exact bit manipulation of the exponent and exact power-of-two scalings.
// Accuracy (tests/test_portable_math.cpp, against long double): log and sin/cos within
// about 1 ulp over their whole range here, enough for N(0, 1) noise.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "diffgrad/config.hpp"

namespace diffgrad::detail::portable {

/// a * b rounded once, and kept apart from any later addition: on the device through
/// __dmul_rn (never contracted), on the host behind an empty asm statement that makes the
/// product opaque to the optimiser, so -ffp-contract=fast cannot fuse it into an FMA.
DIFFGRAD_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile double opaque = p; // other compilers: a volatile round trip does the same
  p = opaque;
#endif
  return p;
#endif
}
/// a + b rounded once (on the device never contracted with an earlier product).
DIFFGRAD_HOST_DEVICE inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
/// a * b + c as two roundings, identical on both sides (an FMA would be one rounding on
/// the device and a slow library call on hosts built without FMA instructions).
DIFFGRAD_HOST_DEVICE inline double mul_add_rn(double a, double b, double c) {
  return add_rn(mul_rn(a, b), c);
}
DIFFGRAD_HOST_DEVICE inline double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
DIFFGRAD_HOST_DEVICE inline double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

DIFFGRAD_HOST_DEVICE inline std::uint64_t to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<std::uint64_t>(__double_as_longlong(x));
#else
  std::uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}
DIFFGRAD_HOST_DEVICE inline double from_bits(std::uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

/// Natural logarithm of a positive NORMAL double (the noise calls it on (0, 1] with
/// arguments >= 2^-53). fdlibm's e_log.c scheme: x = 2^k m with m in [sqrt(2)/2, sqrt(2)),
/// f = m - 1 (exact), s = f / (2 + f), log(1 + f) = f - hf + s (hf + R(s^2)), hf = f^2 / 2,
/// with fdlibm's minimax coefficients for R and fdlibm's order of operations.
DIFFGRAD_HOST_DEVICE inline double log_normal(double x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01; // 0x3fe62e42fee00000: k * hi is exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kLg1 = 6.666666666666735130e-01, kLg2 = 3.999999999940941908e-01,
                   kLg3 = 2.857142874366239149e-01, kLg4 = 2.222219843214978396e-01,
                   kLg5 = 1.818357216161805012e-01, kLg6 = 1.531383769920937332e-01,
                   kLg7 = 1.479819860511658591e-01;
  constexpr std::uint64_t kMantissa = (std::uint64_t{1} << 52) - 1;
  constexpr std::uint64_t kExponentOfOne = std::uint64_t{1023} << 52;
  constexpr std::uint64_t kSqrt2Mantissa = 0x6a09e667f3bcdull; // mantissa bits of sqrt(2)
  const std::uint64_t bits = to_bits(x);
  int k = static_cast<int>((bits >> 52) & 0x7ff) - 1023;
  std::uint64_t mant = bits & kMantissa;
  double m;
  if (mant >= kSqrt2Mantissa) { // m in [sqrt(2), 2): halve it (exact) so m < sqrt(2)
    m = from_bits(mant | (kExponentOfOne - (std::uint64_t{1} << 52)));
    ++k;
  } else {
    m = from_bits(mant | kExponentOfOne);
  }
  const double f = m - 1.0; // exact (Sterbenz)
  const double s = div_rn(f, add_rn(2.0, f));
  const double z = mul_rn(s, s);
  double p = kLg7;
  p = mul_add_rn(p, z, kLg6);
  p = mul_add_rn(p, z, kLg5);
  p = mul_add_rn(p, z, kLg4);
  p = mul_add_rn(p, z, kLg3);
  p = mul_add_rn(p, z, kLg2);
  p = mul_add_rn(p, z, kLg1);
  const double half_f = 0.5 * f;                 // exact
  const double hf = mul_rn(half_f, f);           // f^2 / 2
  const double hf_plus_r = mul_add_rn(z, p, hf); // hf + R(z), R = z p
  const double dk = static_cast<double>(k);
  const double tail = mul_add_rn(s, hf_plus_r, mul_rn(dk, kLn2Lo)); // s (hf + R) + k ln2_lo
  const double log1p_f_minus_f = add_rn(tail, -hf);
  return mul_add_rn(dk, kLn2Hi, add_rn(log1p_f_minus_f, f)); // k ln2_hi is exact
}

/// sin(pi/2 r) for |r| <= 1/2 (Taylor series in r, coefficients (pi/2)^n / n! rounded to
/// double; truncation below 1e-17).
DIFFGRAD_HOST_DEVICE inline double sin_quarter_turn(double r) {
  const double z = mul_rn(r, r);
  double p = 0x1.aaec32af93359p-38;
  p = mul_add_rn(p, z, -0x1.6fadb9f155744p-31);
  p = mul_add_rn(p, z, 0x1.e8f434d018d63p-25);
  p = mul_add_rn(p, z, -0x1.e3074fde8871fp-19);
  p = mul_add_rn(p, z, 0x1.50783487ee782p-13);
  p = mul_add_rn(p, z, -0x1.32d2cce62bd86p-8);
  p = mul_add_rn(p, z, 0x1.466bc6775aae2p-4);
  p = mul_add_rn(p, z, -0x1.4abbce625be53p-1);
  // r c0 + (r z) P: the leading term rounded on its own keeps the error within 2 ulp.
  return mul_add_rn(r, 0x1.921fb54442d18p+0, mul_rn(mul_rn(r, z), p));
}

/// cos(pi/2 r) for |r| <= 1/2.
DIFFGRAD_HOST_DEVICE inline double cos_quarter_turn(double r) {
  const double z = mul_rn(r, r);
  double p = 0x1.20c62c2f2d7f5p-34;
  p = mul_add_rn(p, z, -0x1.b6e24f44b128fp-28);
  p = mul_add_rn(p, z, 0x1.f9d38a3763cc3p-22);
  p = mul_add_rn(p, z, -0x1.a6d1f2a204a8cp-16);
  p = mul_add_rn(p, z, 0x1.e1f506891babbp-11);
  p = mul_add_rn(p, z, -0x1.55d3c7e3cbffap-6);
  p = mul_add_rn(p, z, 0x1.03c1f081b5ac4p-2);
  p = mul_add_rn(p, z, -0x1.3bd3cc9be45dep+0);
  return mul_add_rn(p, z, 1.0);
}

/// Exact reduction for 2 pi u, u in [0, 1]: 4u = q + r with q an integer and |r| <= 1/2
/// (a power-of-two scaling and the subtraction of a double's integer part are exact), so
/// 2 pi u = (pi/2)(q + r); returns q mod 4 (the quadrant) and writes r.
DIFFGRAD_HOST_DEVICE inline int reduce_turn(double u, double& r) {
  const double t = 4.0 * u; // exact
  double q = std::floor(t); // exact
  r = t - q;                // exact, in [0, 1)
  if (r > 0.5) {
    r -= 1.0; // exact
    q += 1.0;
  }
  return static_cast<int>(q) & 3;
}

/// sin(2 pi u) (want_sin) or cos(2 pi u), u in [0, 1]; bit-identical to sincos_two_pi's.
DIFFGRAD_HOST_DEVICE inline double sin_or_cos_two_pi(double u, bool want_sin) {
  double r;
  const int quadrant = reduce_turn(u, r);
  // sin(a + k pi/2) cycles through sin, cos, -sin, -cos; cos(a) = sin(a + pi/2).
  const int k = (quadrant + (want_sin ? 0 : 1)) & 3;
  switch (k) {
  case 0: return sin_quarter_turn(r);
  case 1: return cos_quarter_turn(r);
  case 2: return -sin_quarter_turn(r);
  default: return -cos_quarter_turn(r);
  }
}

/// sin(2 pi u) and cos(2 pi u), u in [0, 1].
DIFFGRAD_HOST_DEVICE inline void sincos_two_pi(double u, double& sin_out, double& cos_out) {
  double r;
  const int quadrant = reduce_turn(u, r);
  const double s = sin_quarter_turn(r), c = cos_quarter_turn(r);
  switch (quadrant) {
  case 0:
    sin_out = s;
    cos_out = c;
    break;
  case 1:
    sin_out = c;
    cos_out = -s;
    break;
  case 2:
    sin_out = -s;
    cos_out = -c;
    break;
  default:
    sin_out = -c;
    cos_out = s;
    break;
  }
}

} // namespace diffgrad::detail::portable
