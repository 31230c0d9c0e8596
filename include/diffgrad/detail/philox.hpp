#pragma once
// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) keyed by the seed,
// with the counter built from (element index, step). Any element of any step can be
// regenerated independently, so CPU, GPU, inversion and gradient replays see identical
// noise without storing it. Pure integer arithmetic plus one Box-Muller transform in
// double whose log/sin/cos are written with correctly rounded operations only
// (detail/portable_math.hpp), so results depend neither on the backend's loop order nor on
// the math library: the CPU and the CUDA backend draw the same bits.
#include <cmath>
#include <cstdint>

#include "diffgrad/config.hpp"
#include "diffgrad/detail/portable_math.hpp"

namespace diffgrad::detail {

struct Philox4x32 {
  std::uint32_t v[4];
};

DIFFGRAD_HOST_DEVICE inline void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                           std::uint32_t& lo) {
  const std::uint64_t product = static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(b);
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product);
}

/// Ten rounds of Philox4x32 on `counter` with the 64-bit `key`.
DIFFGRAD_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 counter, std::uint64_t key) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  std::uint32_t k0 = static_cast<std::uint32_t>(key), k1 = static_cast<std::uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, counter.v[0], hi0, lo0);
    mulhilo32(kMul1, counter.v[2], hi1, lo1);
    counter = Philox4x32{{hi1 ^ counter.v[1] ^ k0, lo1, hi0 ^ counter.v[3] ^ k1, lo0}};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return counter;
}

/// Uniform in (0, 1], never 0, from 53 random bits (so log() below is finite).
DIFFGRAD_HOST_DEVICE inline double uniform_open0(std::uint32_t hi, std::uint32_t lo) {
  const std::uint64_t bits = (static_cast<std::uint64_t>(hi) << 21) ^ (lo >> 11);
  return (static_cast<double>(bits & ((std::uint64_t{1} << 53) - 1)) + 1.0) * 0x1.0p-53;
}

/// The Philox block of the Box-Muller pair `pair` (elements 2 pair and 2 pair + 1).
DIFFGRAD_HOST_DEVICE inline Philox4x32 gaussian_block(std::uint64_t seed, std::uint64_t step,
                                                      std::uint64_t pair) {
  return philox4x32_10(
      Philox4x32{{static_cast<std::uint32_t>(pair), static_cast<std::uint32_t>(pair >> 32),
                  static_cast<std::uint32_t>(step), static_cast<std::uint32_t>(step >> 32)}},
      seed);
}

/// Box-Muller radius sqrt(-2 log u1). log, sin and cos come from detail/portable_math.hpp,
/// not from the C library: the host's libm and CUDA's differ in the last bit for some
/// arguments, and the noise must be bit-identical on every backend (docs/architecture.md).
DIFFGRAD_HOST_DEVICE inline double box_muller_radius(const Philox4x32& r) {
  return portable::sqrt_rn(-2.0 * portable::log_normal(uniform_open0(r.v[0], r.v[1])));
}

/// Standard normal number for element `index` of the noise of `step` under `seed`.
/// Elements 2k and 2k+1 share one Philox block (the cosine and sine of one Box-Muller pair).
DIFFGRAD_HOST_DEVICE inline double gaussian(std::uint64_t seed, std::uint64_t step,
                                            std::uint64_t index) {
  const Philox4x32 r = gaussian_block(seed, step, index >> 1);
  return portable::mul_rn(box_muller_radius(r), portable::sin_or_cos_two_pi(
                                                    uniform_open0(r.v[2], r.v[3]), index & 1u));
}

/// Both elements of Box-Muller pair `pair` (indices 2 pair, 2 pair + 1) in one Philox call,
/// bit-identical to gaussian(seed, step, 2 pair) and gaussian(seed, step, 2 pair + 1).
DIFFGRAD_HOST_DEVICE inline void gaussian_pair(std::uint64_t seed, std::uint64_t step,
                                               std::uint64_t pair, double& even, double& odd) {
  const Philox4x32 r = gaussian_block(seed, step, pair);
  double sin_v, cos_v;
  portable::sincos_two_pi(uniform_open0(r.v[2], r.v[3]), sin_v, cos_v);
  const double radius = box_muller_radius(r);
  even = portable::mul_rn(radius, cos_v);
  odd = portable::mul_rn(radius, sin_v);
}

} // namespace diffgrad::detail
