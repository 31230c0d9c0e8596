// detail/portable_math.hpp: the log / sin / cos behind the Box-Muller noise, written with
// correctly rounded operations only so that the CPU and the CUDA backend draw the same bits.
//   - accuracy against long double references (x86-64: 64-bit significand), in ulps;
//   - special arguments: log(1) = 0, the smallest uniform 2^-53, the quadrant boundaries;
//   - the single-element and the pair forms of the noise agree bit for bit;
//   - the noise is N(0, 1)-shaped (the statistics live in test_philox.cpp; here only that
//     the new transform agrees with the C library's to a few ulps).
#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "diffgrad/detail/philox.hpp"
#include "diffgrad/detail/portable_math.hpp"

using namespace diffgrad::detail;

namespace {

/// |got - ref| in units of the last place of ref rounded to double.
double ulp_error(double got, long double ref) {
  const double r = static_cast<double>(ref);
  const double ulp =
      r == 0.0 ? DBL_TRUE_MIN : std::nextafter(std::fabs(r), INFINITY) - std::fabs(r);
  return static_cast<double>(std::fabs(static_cast<long double>(got) - ref) /
                             static_cast<long double>(ulp));
}

/// A reproducible stream of 64-bit words (SplitMix64), independent of the code under test.
struct SplitMix {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
};

constexpr long double kHalfPi = 1.570796326794896619231321691639751442L;

} // namespace

TEST_CASE("portable log is within 1 ulp on (0, 1] and on other binades", "[portable_math]") {
  if (LDBL_MANT_DIG < 64) SUCCEED("long double is double here: accuracy not measurable");
  SplitMix rng{1};
  double worst = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const std::uint64_t b = rng.next();
    // A Philox-style uniform in (0, 1], every third one scaled into a lower binade, and
    // every fifth one a number above 1.
    double u = uniform_open0(static_cast<std::uint32_t>(b >> 32), static_cast<std::uint32_t>(b));
    if (i % 3 == 0) u = std::ldexp(u, -static_cast<int>(b % 60));
    if (i % 5 == 0) u = std::ldexp(u, static_cast<int>(b % 200));
    worst =
        std::max(worst, ulp_error(portable::log_normal(u), std::log(static_cast<long double>(u))));
  }
  INFO("max error " << worst << " ulp");
  if (LDBL_MANT_DIG >= 64) CHECK(worst < 1.0);
  CHECK(portable::log_normal(1.0) == 0.0);
  CHECK(portable::log_normal(2.0) == std::log(2.0));
  CHECK(portable::log_normal(0x1.0p-53) == static_cast<double>(-53.0L * std::log(2.0L)));
  CHECK(std::fabs(portable::log_normal(std::nextafter(1.0, 0.0)) + 0x1.0p-53) <= 0x1.0p-106);
}

TEST_CASE("portable sin/cos of a quarter turn are within 2 ulp", "[portable_math]") {
  SplitMix rng{2};
  double worst_sin = 0.0, worst_cos = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const double r = static_cast<double>(rng.next() >> 11) * 0x1.0p-53 - 0.5; // [-1/2, 1/2)
    const long double x = kHalfPi * static_cast<long double>(r);
    worst_sin = std::max(worst_sin, ulp_error(portable::sin_quarter_turn(r), std::sin(x)));
    worst_cos = std::max(worst_cos, ulp_error(portable::cos_quarter_turn(r), std::cos(x)));
  }
  INFO("max error sin " << worst_sin << " ulp, cos " << worst_cos << " ulp");
  if (LDBL_MANT_DIG >= 64) {
    CHECK(worst_sin < 2.0);
    CHECK(worst_cos < 1.5);
  }
  CHECK(portable::sin_quarter_turn(0.0) == 0.0);
  CHECK(portable::cos_quarter_turn(0.0) == 1.0);
}

TEST_CASE("sin/cos of a full turn: exact reduction and quadrants", "[portable_math]") {
  double s, c;
  portable::sincos_two_pi(1.0, s, c);
  CHECK(s == 0.0);
  CHECK(c == 1.0);
  portable::sincos_two_pi(0.25, s, c);
  CHECK(s == 1.0);
  CHECK(c == 0.0);
  portable::sincos_two_pi(0.5, s, c);
  CHECK(s == 0.0);
  CHECK(c == -1.0);
  portable::sincos_two_pi(0.75, s, c);
  CHECK(s == -1.0);
  CHECK(c == 0.0);
  // Against the C library over the whole turn (absolute: its own 2 pi u rounding is larger
  // than ours near the zeros), and the one-output form against the two-output form.
  SplitMix rng{3};
  double worst = 0.0;
  int mismatches = 0;
  for (int i = 0; i < 100000; ++i) {
    const double u = static_cast<double>(rng.next() >> 11) * 0x1.0p-53;
    portable::sincos_two_pi(u, s, c);
    const long double x = 4.0L * kHalfPi * static_cast<long double>(u);
    worst = std::max({worst, static_cast<double>(std::fabs(s - std::sin(x))),
                      static_cast<double>(std::fabs(c - std::cos(x)))});
    if (s != portable::sin_or_cos_two_pi(u, true) || c != portable::sin_or_cos_two_pi(u, false))
      ++mismatches;
  }
  CHECK(worst < 3e-16);
  CHECK(mismatches == 0);
}

TEST_CASE("gaussian_pair equals two gaussian calls bit for bit", "[portable_math][philox]") {
  int mismatches = 0;
  for (std::uint64_t pair = 0; pair < 50000; ++pair) {
    double even, odd;
    gaussian_pair(11, 3, pair, even, odd);
    if (even != gaussian(11, 3, 2 * pair) || odd != gaussian(11, 3, 2 * pair + 1)) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("the noise agrees with a C-library Box-Muller to a few ulp", "[portable_math][philox]") {
  // Same Philox words, textbook transform with std::log/std::sin/std::cos in long double.
  double worst = 0.0;
  for (std::uint64_t i = 0; i < 100000; ++i) {
    const Philox4x32 r = gaussian_block(5, 9, i >> 1);
    const long double u1 = uniform_open0(r.v[0], r.v[1]), u2 = uniform_open0(r.v[2], r.v[3]);
    const long double radius = std::sqrt(-2.0L * std::log(u1));
    const long double angle = 4.0L * kHalfPi * u2;
    const long double ref = (i & 1u) ? radius * std::sin(angle) : radius * std::cos(angle);
    // Absolute error in units of the ulp of the radius (the factor that sets the scale).
    const double got = gaussian(5, 9, i);
    const double ulp_radius =
        std::nextafter(static_cast<double>(radius), INFINITY) - static_cast<double>(radius);
    worst = std::max(worst, static_cast<double>(std::fabs(got - ref) / ulp_radius));
  }
  INFO("max error " << worst << " ulp of the radius");
  if (LDBL_MANT_DIG >= 64) CHECK(worst < 4.0);
}
