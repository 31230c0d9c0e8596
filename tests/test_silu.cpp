// SiLU of models/silu.hpp (the Mlp's hidden activation): within a few ulps of a long-double
// reference over the whole double range, the quotient's answers at the edges (+-0, +-inf,
// NaN, overflow of e^{-a}), in place, and the same bits for an element wherever it sits in a
// run (so the Mlp's bits do not depend on its row blocks or thread count). Built twice: for the
// x86-64 baseline (the plain expression) and, as test_silu_native, for this machine's
// instruction set (with AVX-512F: the division-free path).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "diffgrad/models/silu.hpp"

using diffgrad::models::impl::silu;

namespace {

template <class T> T silu_of(T a) {
  T out;
  silu(&a, &out, 1);
  return out;
}

long double reference(long double a) { return a / (1.0L + std::exp(-a)); }

/// Error of `got` against the long-double reference in units of the last place of T, or 0
/// where both are below 1e5 x T's smallest normal: there (a below about -708 in double, -88 in
/// float, where e^{-a} overflows) the quotient itself gives -0, and absolute agreement is what
/// matters.
template <class T> double ulps(T a, T got) {
  const long double ref = reference(static_cast<long double>(a));
  const long double tiny = 1e5L * std::numeric_limits<T>::min();
  if (std::fabs(ref) < tiny && std::fabs(static_cast<long double>(got)) < tiny) return 0.0;
  const long double ulp = std::numeric_limits<T>::epsilon() * std::fabs(ref);
  return static_cast<double>(std::fabs(static_cast<long double>(got) - ref) / ulp);
}

template <class T> std::vector<T> test_inputs() {
  std::vector<T> v;
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> wide(-760.0, 760.0), narrow(-40.0, 40.0),
      small(-1e-3, 1e-3);
  for (int i = 0; i < 20000; ++i) {
    v.push_back(static_cast<T>(narrow(rng)));
    v.push_back(static_cast<T>(small(rng)));
  }
  for (int i = 0; i < 5000; ++i) v.push_back(static_cast<T>(wide(rng)));
  for (double e : {1e-300, 1e-30, 1e-8, 0.5, 1.0, 36.0, 37.0, 40.0, 41.0, 87.0, 88.0, 700.0, 708.0,
                   708.5, 709.0, 709.7, 709.8, 745.0})
    if (e <= static_cast<double>(std::numeric_limits<T>::max())) {
      v.push_back(static_cast<T>(e));
      v.push_back(static_cast<T>(-e));
    }
  return v;
}

template <class T> bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

} // namespace

TEMPLATE_TEST_CASE("silu is within a few ulps of a / (1 + e^-a) over the whole range",
                   "[models][silu]", double, float) {
#if defined(__AVX512F__)
  CHECK(DIFFGRAD_SILU_AVX512 == 1); // test_silu_native on an AVX-512 machine tests that path
#endif
  INFO("AVX-512F path compiled: " << DIFFGRAD_SILU_AVX512);
  const std::vector<TestType> in = test_inputs<TestType>();
  std::vector<TestType> out(in.size());
  silu(in.data(), out.data(), static_cast<std::ptrdiff_t>(in.size()));
  double worst = 0.0;
  std::size_t worst_at = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const double e = ulps(in[i], out[i]);
    if (e > worst) {
      worst = e;
      worst_at = i;
    }
  }
  INFO("worst " << worst << " ulps at a = " << in[worst_at] << ": " << out[worst_at]);
  CHECK(worst <= 4.0);
}

TEMPLATE_TEST_CASE("silu gives the quotient's answers at the edges", "[models][silu]", double,
                   float) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  CHECK(silu_of(inf) == inf);
  CHECK(std::isnan(silu_of(-inf))); // -inf / inf
  CHECK(std::isnan(silu_of(std::numeric_limits<T>::quiet_NaN())));
  CHECK(same_bits(silu_of(T(0)), T(0)));
  CHECK(same_bits(silu_of(T(-0.0)), T(-0.0)));
  // e^{-a} overflows: the result is a (signed) zero, never a NaN or a stray tiny value.
  for (T a : {T(-800), T(-1e30), -std::numeric_limits<T>::max()}) {
    const T s = silu_of(a);
    CHECK(s == T(0));
    CHECK(std::signbit(s));
  }
  // Large positive a: the identity.
  CHECK(silu_of(T(60)) == T(60));
  CHECK(silu_of(std::numeric_limits<T>::max()) == std::numeric_limits<T>::max());
  // Smallest subnormal: a / 2.
  const T denorm = std::numeric_limits<T>::denorm_min();
  CHECK(silu_of(denorm * 4) == denorm * 2);
}

TEMPLATE_TEST_CASE("silu: in place, and an element's bits do not depend on where it sits",
                   "[models][silu]", double, float) {
  using T = TestType;
  std::vector<T> in(1000);
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(-12.0, 12.0);
  for (T& v : in) v = static_cast<T>(u(rng));
  std::vector<T> whole(in.size());
  silu(in.data(), whole.data(), static_cast<std::ptrdiff_t>(in.size()));

  std::vector<T> inplace = in;
  silu(inplace.data(), inplace.data(), static_cast<std::ptrdiff_t>(inplace.size()));
  long differ = 0;
  for (std::size_t i = 0; i < in.size(); ++i) differ += !same_bits(inplace[i], whole[i]);
  CHECK(differ == 0);

  // Runs of every length 1..17 at every offset (partial SIMD registers, misaligned starts).
  differ = 0;
  for (std::size_t len = 1; len <= 17; ++len) {
    std::vector<T> piece(in.size());
    for (std::size_t i = 0; i < in.size(); i += len) {
      const std::size_t n = std::min(len, in.size() - i);
      silu(in.data() + i, piece.data() + i, static_cast<std::ptrdiff_t>(n));
    }
    for (std::size_t i = 0; i < in.size(); ++i) differ += !same_bits(piece[i], whole[i]);
  }
  CHECK(differ == 0);
  silu<T>(nullptr, nullptr, 0); // n = 0 touches nothing
  SUCCEED();
}
