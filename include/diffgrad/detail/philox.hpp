#pragma once
// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) keyed by the seed,
// with the counter built from (element index, step). Any element of any step can be
// regenerated independently, so CPU, GPU, inversion and gradient replays see identical
// noise without storing it. Pure integer arithmetic plus one Box-Muller transform in
// double, so results do not depend on the backend's loop order.
#include <cmath>
#include <cstdint>

#include "diffgrad/config.hpp"

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

/// Standard normal number for element `index` of the noise of `step` under `seed`.
/// Elements 2k and 2k+1 share one Philox block (the cosine and sine of one Box-Muller pair).
DIFFGRAD_HOST_DEVICE inline double gaussian(std::uint64_t seed, std::uint64_t step,
                                            std::uint64_t index) {
  const std::uint64_t pair = index >> 1;
  const Philox4x32 r = philox4x32_10(
      Philox4x32{{static_cast<std::uint32_t>(pair), static_cast<std::uint32_t>(pair >> 32),
                  static_cast<std::uint32_t>(step), static_cast<std::uint32_t>(step >> 32)}},
      seed);
  const double u1 = uniform_open0(r.v[0], r.v[1]);
  const double u2 = uniform_open0(r.v[2], r.v[3]);
  const double radius = std::sqrt(-2.0 * std::log(u1));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  return (index & 1u) ? radius * std::sin(kTwoPi * u2) : radius * std::cos(kTwoPi * u2);
}

} // namespace diffgrad::detail
