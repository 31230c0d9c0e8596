// Counter-based noise (detail/philox.hpp and EigenBackend's noise terms):
//   - Philox4x32-10 reproduces the Random123 known-answer vectors;
//   - gaussian(seed, step, index) matches an independent implementation (Python, integers and
//     50-digit decimals: tests/data/philox_reference.py) on seeds, steps and indices that set
//     every 32-bit half of the counter and key: the Philox words exactly, the double within a
//     few ulps of the correctly rounded value, the float exactly. This pins the counter layout,
//     the uniform's bits and the Box-Muller mapping: changing any of them changes every seeded
//     sample, a breaking change (docs/architecture.md, CHANGELOG.md);
//   - a draw depends only on (seed, step, index): reproducible, independent of batch shape,
//     and each of the three keys changes it (including their high 32 bits);
//   - 10^6 draws have mean 0, variance 1, zero skewness and excess kurtosis, and pass a
//     Kolmogorov-Smirnov test, within bounds of about five standard errors;
//   - streams for different seeds, steps and neighbouring indices are uncorrelated;
//   - the float backend's noise is the double noise rounded once.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "data/philox_reference.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/detail/philox.hpp"

using namespace diffgrad;
using detail::gaussian;

namespace {

constexpr std::uint64_t key(std::uint32_t k0, std::uint32_t k1) {
  return static_cast<std::uint64_t>(k0) | (static_cast<std::uint64_t>(k1) << 32);
}

std::vector<double> draws(std::uint64_t seed, std::uint64_t step, std::uint64_t first,
                          std::size_t n) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = gaussian(seed, step, first + i);
  return v;
}

double correlation(const std::vector<double>& a, const std::vector<double>& b) {
  double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
  const auto n = static_cast<double>(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    sa += a[i];
    sb += b[i];
    saa += a[i] * a[i];
    sbb += b[i] * b[i];
    sab += a[i] * b[i];
  }
  const double cov = sab / n - (sa / n) * (sb / n);
  return cov / std::sqrt((saa / n - sa * sa / (n * n)) * (sbb / n - sb * sb / (n * n)));
}

} // namespace

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors", "[philox]") {
  // Random123 kat_vectors: counter (4 words), key (2 words) -> output (4 words).
  struct Kat {
    detail::Philox4x32 counter;
    std::uint64_t key;
    std::uint32_t expected[4];
  };
  const Kat kats[] = {
      {{{0u, 0u, 0u, 0u}}, key(0u, 0u), {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       key(0xffffffffu, 0xffffffffu),
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       key(0xa4093822u, 0x299f31d0u),
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const detail::Philox4x32 out = detail::philox4x32_10(k.counter, k.key);
    for (int w = 0; w < 4; ++w) CHECK(out.v[w] == k.expected[w]);
  }
}

TEST_CASE("gaussian(seed, step, index) matches the independent reference table", "[philox][kat]") {
  const EigenBackend<float> flt;
  double worst_ulps = 0;
  for (const auto& k : diffgrad_test::kGaussianKats) {
    INFO("seed " << k.seed << ", step " << k.step << ", index " << k.index);
    // The Philox block of the index's Box-Muller pair, word for word.
    const detail::Philox4x32 block = detail::gaussian_block(k.seed, k.step, k.index >> 1);
    for (int w = 0; w < 4; ++w) CHECK(block.v[w] == k.words[w]);
    // The double: the library's log/sin/cos are not correctly rounded, but within a few ulps.
    const double got = gaussian(k.seed, k.step, k.index);
    const double ulp = std::nextafter(std::abs(k.value), INFINITY) - std::abs(k.value);
    const double ulps = std::abs(got - k.value) / ulp;
    worst_ulps = std::max(worst_ulps, ulps);
    INFO("got " << got << ", reference " << k.value << ", " << ulps << " ulps");
    CHECK(ulps <= 2.0);
    // gaussian_pair gives the same bits for both members of the pair.
    double even, odd;
    detail::gaussian_pair(k.seed, k.step, k.index >> 1, even, odd);
    CHECK(((k.index & 1u) != 0 ? odd : even) == got);
    // The float: the double rounded once, equal to the correctly rounded float (the script
    // checks that no entry lies near a float rounding boundary).
    CHECK(static_cast<float>(got) == k.value_float);
    // The float backend's noise state, where the index fits a small state.
    if (k.index < 4096) {
      EigenBackend<float>::state_type xf(1, static_cast<Eigen::Index>(k.index) + 1);
      flt.gaussian(xf, k.seed, k.step);
      CHECK(xf(0, static_cast<Eigen::Index>(k.index)) == k.value_float);
    }
  }
  INFO("largest difference from the correctly rounded double: " << worst_ulps << " ulps");
  CHECK(worst_ulps <= 2.0);
}

TEST_CASE("Uniforms from Philox words lie in (0, 1] and reach both ends", "[philox]") {
  CHECK(detail::uniform_open0(0u, 0u) > 0.0);
  CHECK(detail::uniform_open0(0u, 0u) == 0x1.0p-53);
  CHECK(detail::uniform_open0(0xffffffffu, 0xffffffffu) == 1.0);
  // The extreme uniform gives the largest finite normal: sqrt(-2 log 2^-53) = 8.57.
  CHECK(std::isfinite(std::sqrt(-2.0 * std::log(detail::uniform_open0(0u, 0u)))));
}

TEST_CASE("A draw depends only on (seed, step, index)", "[philox]") {
  // Reproducible.
  for (std::uint64_t i : {0ull, 1ull, 17ull, 123456789ull})
    CHECK(gaussian(42, 7, i) == gaussian(42, 7, i));

  // Independent of the batch shape: element (r, c) of a B x d state is index r d + c.
  const EigenBackend<double> backend;
  EigenBackend<double>::state_type wide(2, 6), tall(4, 3), row(1, 12);
  backend.gaussian(wide, 5, 3);
  backend.gaussian(tall, 5, 3);
  backend.gaussian(row, 5, 3);
  for (Eigen::Index k = 0; k < 12; ++k) {
    CHECK(wide(k / 6, k % 6) == gaussian(5, 3, static_cast<std::uint64_t>(k)));
    CHECK(tall(k / 3, k % 3) == wide(k / 6, k % 6));
    CHECK(row(0, k) == wide(k / 6, k % 6));
  }

  // Each key changes the value, including the high 32 bits of seed, step and index.
  const double base = gaussian(1, 2, 3);
  CHECK(gaussian(1 + (1ull << 32), 2, 3) != base);
  CHECK(gaussian(1, 2 + (1ull << 32), 3) != base);
  CHECK(gaussian(1, 2, 3 + (1ull << 33)) != base); // index pair 2^32 + 1: high counter word
  CHECK(gaussian(2, 2, 3) != base);
  CHECK(gaussian(1, 3, 3) != base);
  CHECK(gaussian(1, 2, 5) != base);
}

TEST_CASE("10^6 draws are standard normal within statistical bounds", "[philox][statistics]") {
  constexpr std::size_t n = 1000000;
  std::vector<double> x = draws(2024, 11, 0, n);
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0;
  std::size_t beyond3 = 0;
  for (double v : x) {
    m1 += v;
    m2 += v * v;
    m3 += v * v * v;
    m4 += v * v * v * v;
    if (std::abs(v) > 3.0) ++beyond3;
  }
  const auto N = static_cast<double>(n);
  m1 /= N;
  m2 /= N;
  m3 /= N;
  m4 /= N;
  const double variance = m2 - m1 * m1;
  // Standard errors for N(0,1): mean 1/sqrt(N), variance sqrt(2/N), skewness sqrt(6/N),
  // excess kurtosis sqrt(24/N). Five of them: a false alarm is a < 1e-6 event.
  INFO("mean " << m1 << ", variance " << variance << ", skewness " << m3 << ", kurtosis " << m4);
  CHECK(std::abs(m1) < 5.0 / std::sqrt(N));
  CHECK(std::abs(variance - 1.0) < 5.0 * std::sqrt(2.0 / N));
  CHECK(std::abs(m3) < 5.0 * std::sqrt(6.0 / N));
  CHECK(std::abs(m4 - 3.0) < 5.0 * std::sqrt(24.0 / N));
  // Tails: P(|x| > 3) = 0.0026998; binomial standard error sqrt(p (1 - p) / N).
  const double p3 = 0.0026997960632601866;
  CHECK(std::abs(static_cast<double>(beyond3) / N - p3) < 5.0 * std::sqrt(p3 * (1 - p3) / N));

  // Kolmogorov-Smirnov against Phi: sqrt(N) D_N < 1.95 has probability 0.999 under H0.
  std::sort(x.begin(), x.end());
  double d = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double cdf = 0.5 * std::erfc(-x[i] / std::sqrt(2.0));
    d = std::max({d, cdf - static_cast<double>(i) / N, static_cast<double>(i + 1) / N - cdf});
  }
  INFO("KS statistic sqrt(N) D = " << std::sqrt(N) * d);
  CHECK(std::sqrt(N) * d < 1.95);
}

TEST_CASE("Streams for different seeds, steps and indices are uncorrelated",
          "[philox][statistics]") {
  constexpr std::size_t n = 200000;
  const double bound = 5.0 / std::sqrt(static_cast<double>(n));
  const auto a = draws(9, 4, 0, n);
  CHECK(std::abs(correlation(a, draws(10, 4, 0, n))) < bound);               // next seed
  CHECK(std::abs(correlation(a, draws(9, 5, 0, n))) < bound);                // next step
  CHECK(std::abs(correlation(a, draws(9 + (1ull << 32), 4, 0, n))) < bound); // high seed bits
  CHECK(std::abs(correlation(a, draws(9, 4 + (1ull << 32), 0, n))) < bound); // high step bits
  // Neighbouring indices: the cosine and sine of one Box-Muller pair (2k, 2k+1), and the
  // pairs (2k+1, 2k+2) that straddle two Philox blocks.
  std::vector<double> even, odd, odd_next;
  for (std::size_t k = 0; k + 2 < n; k += 2) {
    even.push_back(a[k]);
    odd.push_back(a[k + 1]);
    odd_next.push_back(a[k + 2]);
  }
  const double pair_bound = 5.0 / std::sqrt(static_cast<double>(even.size()));
  CHECK(std::abs(correlation(even, odd)) < pair_bound);
  CHECK(std::abs(correlation(odd, odd_next)) < pair_bound);
  // The squares of a Box-Muller pair are uncorrelated too (they would not be if the radius
  // were shared incorrectly): E[x^2 y^2] = 1 for independent normals.
  std::vector<double> even2(even.size()), odd2(odd.size());
  for (std::size_t k = 0; k < even.size(); ++k) {
    even2[k] = even[k] * even[k];
    odd2[k] = odd[k] * odd[k];
  }
  CHECK(std::abs(correlation(even2, odd2)) < pair_bound);
}

TEST_CASE("Float and double backends draw the same noise", "[philox][backend]") {
  const EigenBackend<double> dbl;
  const EigenBackend<float> flt;
  EigenBackend<double>::state_type xd(7, 13);
  EigenBackend<float>::state_type xf(7, 13);
  dbl.gaussian(xd, 77, 5);
  flt.gaussian(xf, 77, 5);
  // The draw is computed in double and rounded once to the state's scalar type.
  CHECK(xf == xd.cast<float>());
  // Through a scaled noise term as well: the coefficient multiplies in double first.
  dbl.lincomb(xd, NoiseTerm{0.3, 77, 5});
  flt.lincomb(xf, NoiseTerm{0.3, 77, 5});
  for (Eigen::Index r = 0; r < xd.rows(); ++r)
    for (Eigen::Index c = 0; c < xd.cols(); ++c) {
      CHECK(xd(r, c) == 0.3 * gaussian(77, 5, static_cast<std::uint64_t>(r * 13 + c)));
      CHECK(xf(r, c) == static_cast<float>(xd(r, c)));
    }
}
