// The batched (SIMD) noise of detail/gaussian_batch.hpp must give exactly the bits of the
// scalar detail::gaussian_pair that the CUDA backend also implements: compared on millions of
// consecutive pairs, at 64-bit counter and seed boundaries, and lane by lane on the inputs
// where the scalar code's branches switch (log's mantissa test, the quarter-turn wrap).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "data/philox_reference.hpp"
#include "diffgrad/detail/gaussian_batch.hpp"

using namespace diffgrad::detail;

namespace {

std::uint64_t bits_of(double x) {
  std::uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

/// Number of pairs in [first, first + count) whose batched bits differ from gaussian_pair's.
long mismatches(std::uint64_t seed, std::uint64_t step, std::uint64_t first, std::size_t count) {
  std::vector<double> batch(2 * count);
  gaussian_pairs(seed, step, first, count, batch.data());
  long bad = 0;
  for (std::size_t k = 0; k < count; ++k) {
    double even, odd;
    gaussian_pair(seed, step, first + k, even, odd);
    bad += bits_of(batch[2 * k]) != bits_of(even);
    bad += bits_of(batch[2 * k + 1]) != bits_of(odd);
  }
  return bad;
}

} // namespace

TEST_CASE("gaussian_pairs equals gaussian_pair bit for bit", "[philox][noise]") {
  INFO("SIMD lanes in this build: " << DIFFGRAD_NOISE_LANES);
  // 2^21 consecutive pairs (4.2 million Gaussians): every branch of log and sincos is taken
  // hundreds of thousands of times.
  CHECK(mismatches(2024, 7, 0, std::size_t{1} << 21) == 0);
  // Counts that leave a scalar tail, offsets that are not lane-aligned.
  for (std::size_t count : {0, 1, 3, 7, 9, 17}) CHECK(mismatches(1, 2, 5, count) == 0);
  // Counter words that carry across 32 bits, and extreme seeds and steps.
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  CHECK(mismatches(max, max, (std::uint64_t{1} << 32) - 8, 64) == 0);
  CHECK(mismatches(0, 0, max - 63, 63) == 0);
  CHECK(mismatches(0x0123456789abcdefull, 1ull << 40, 1ull << 50, 1000) == 0);
}

TEST_CASE("gaussian_pairs matches the independent reference table in every lane",
          "[philox][noise][kat]") {
  // The SIMD path on its own against tests/data/philox_reference.py's values (not only against
  // the scalar code, so a layout change made consistently in both paths is caught here too):
  // each reference pair is drawn in every lane position of a full SIMD block.
  constexpr std::size_t kBlock = 2 * DIFFGRAD_NOISE_LANES; // at least one whole block
  std::vector<double> out(2 * kBlock);
  for (const auto& k : diffgrad_test::kGaussianKats) {
    const std::uint64_t pair = k.index >> 1;
    const double ulp = std::nextafter(std::abs(k.value), INFINITY) - std::abs(k.value);
    for (std::uint64_t lane = 0; lane < DIFFGRAD_NOISE_LANES; ++lane) {
      gaussian_pairs(k.seed, k.step, pair - lane, kBlock, out.data()); // wraps like the counter
      const double got = out[2 * lane + (k.index & 1u)];
      INFO("seed " << k.seed << ", step " << k.step << ", index " << k.index << ", lane " << lane
                   << ": got " << got << ", reference " << k.value);
      CHECK(std::abs(got - k.value) <= 2.0 * ulp);
      CHECK(static_cast<float>(got) == k.value_float);
    }
  }
}

TEST_CASE("gaussian_pairs output is standard normal", "[philox][noise]") {
  // A plain sanity check on the statistics of 2^20 draws (the bit identity above is the real
  // contract): mean 0 and variance 1 within 5 standard errors.
  const std::size_t pairs = std::size_t{1} << 19;
  std::vector<double> x(2 * pairs);
  gaussian_pairs(99, 3, 0, pairs, x.data());
  double sum = 0, sum_sq = 0;
  for (double v : x) {
    sum += v;
    sum_sq += v * v;
  }
  const double n = static_cast<double>(x.size());
  CHECK(std::abs(sum / n) < 5.0 / std::sqrt(n));
  CHECK(std::abs(sum_sq / n - 1.0) < 5.0 * std::sqrt(2.0 / n));
}

#if DIFFGRAD_NOISE_LANES > 1
TEST_CASE("SIMD log and sincos equal the portable scalar functions on branch edges",
          "[philox][noise][portable_math]") {
  namespace simd = simd_noise;
  constexpr double kSqrt2 = 1.4142135623730951;
  // log: mantissas just below, at and above sqrt(2)'s; the smallest argument the noise uses
  // (2^-53), 1, and values across many binades.
  std::vector<double> log_inputs{0x1.0p-53, 1.0, 0.5, 0.75, 0.999999999999, 1e-300, 0.1};
  for (double v : {kSqrt2 / 2, kSqrt2 / 4, kSqrt2 * 0x1.0p-20})
    for (double w : {std::nextafter(v, 0.0), v, std::nextafter(v, 1.0)}) log_inputs.push_back(w);
  // sincos: u at and beside the quadrant boundaries and the r = 1/2 wrap points (4u = q + 1/2).
  std::vector<double> turn_inputs{0x1.0p-53, 1.0, 0.5};
  for (double edge : {0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0})
    for (double w : {std::nextafter(edge, 0.0), edge, std::nextafter(edge, 2.0)})
      if (w > 0.0 && w <= 1.0) turn_inputs.push_back(w);
  for (std::size_t i = 0; i < log_inputs.size(); ++i) {
    const simd::f64 lanes = simd::splat(log_inputs[i]);
    const simd::f64 result = simd::log_normal(lanes);
    INFO("log(" << log_inputs[i] << ")");
    CHECK(bits_of(result[0]) == bits_of(portable::log_normal(log_inputs[i])));
  }
  for (double u : turn_inputs) {
    simd::f64 s, c;
    simd::sincos_two_pi(simd::splat(u), s, c);
    double sin_ref, cos_ref;
    portable::sincos_two_pi(u, sin_ref, cos_ref);
    INFO("sincos(2 pi " << u << ")");
    CHECK(bits_of(s[simd::kLanes - 1]) == bits_of(sin_ref));
    CHECK(bits_of(c[simd::kLanes - 1]) == bits_of(cos_ref));
  }
}
#endif
