// EigenBackend: the fused lincomb against a naive element loop for every arity 1..9, with and
// without noise, through the fixed-arity and the runtime-arity entry points, with the output
// aliasing an input; reductions in double; the small helpers; argument errors.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "test_support.hpp"

using namespace diffgrad;

static_assert(Backend<EigenBackend<double>>);
static_assert(Backend<EigenBackend<float>>);

namespace {

template <class Scalar> using StateOf = typename EigenBackend<Scalar>::state_type;

/// Input k: a distinct, sign-changing pattern, so a swapped or dropped term shows up.
template <class Scalar> StateOf<Scalar> input(int k, Eigen::Index rows, Eigen::Index cols) {
  StateOf<Scalar> x(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c)
      x(r, c) =
          Scalar(std::cos(0.37 * static_cast<double>(k + 1) * static_cast<double>(r * cols + c) +
                          0.9 * k) *
                 (1.0 + 0.25 * k));
  return x;
}
double coefficient(int k) { return (k % 2 ? -1.0 : 1.0) * (0.6 + 0.45 * k); }

/// The naive loop the fused pass must agree with, accumulated in long double, and the sum of
/// |terms| at each element (the scale of the rounding error).
template <class Scalar>
std::pair<Eigen::MatrixXd, Eigen::MatrixXd> naive(const std::vector<StateOf<Scalar>>& xs,
                                                  const std::vector<double>& cs, NoiseTerm noise) {
  const auto rows = xs.front().rows(), cols = xs.front().cols();
  Eigen::MatrixXd sum(rows, cols), scale(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c) {
      long double acc = 0, mag = 0;
      for (std::size_t k = 0; k < xs.size(); ++k) {
        acc += static_cast<long double>(cs[k]) * static_cast<long double>(xs[k](r, c));
        mag += std::abs(static_cast<long double>(cs[k]) * static_cast<long double>(xs[k](r, c)));
      }
      if (noise.coeff != 0.0) {
        const double xi = noise.coeff * detail::gaussian(noise.seed, noise.step,
                                                         static_cast<std::uint64_t>(r * cols + c));
        acc += static_cast<long double>(static_cast<Scalar>(xi));
        mag += std::abs(static_cast<long double>(xi));
      }
      sum(r, c) = static_cast<double>(acc);
      scale(r, c) = static_cast<double>(mag);
    }
  return {sum, scale};
}

/// max over elements of |out - reference| / (scale + tiny), in units of the scalar's epsilon.
template <class Scalar>
double error_in_ulps(const StateOf<Scalar>& out,
                     const std::pair<Eigen::MatrixXd, Eigen::MatrixXd>& ref) {
  const double eps = std::numeric_limits<Scalar>::epsilon();
  return ((out.template cast<double>() - ref.first).cwiseAbs().array() /
          (ref.second.array() + std::numeric_limits<double>::min()))
             .maxCoeff() /
         eps;
}

/// Calls the fixed-arity lincomb with the first K inputs.
template <class Scalar, std::size_t... Is>
void fixed_arity(const EigenBackend<Scalar>& b, StateOf<Scalar>& out,
                 const std::vector<StateOf<Scalar>>& xs, const std::vector<double>& cs,
                 NoiseTerm noise, std::index_sequence<Is...>) {
  if (noise.coeff != 0.0)
    b.lincomb(out, noise, term(cs[Is], xs[Is])...);
  else
    b.lincomb(out, term(cs[Is], xs[Is])...);
}
template <class Scalar, std::size_t K>
void fixed_arity_k(const EigenBackend<Scalar>& b, StateOf<Scalar>& out,
                   const std::vector<StateOf<Scalar>>& xs, const std::vector<double>& cs,
                   NoiseTerm noise) {
  fixed_arity(b, out, xs, cs, noise, std::make_index_sequence<K>{});
}
template <class Scalar, std::size_t... Ks>
void fixed_arity_dispatch(std::size_t k, const EigenBackend<Scalar>& b, StateOf<Scalar>& out,
                          const std::vector<StateOf<Scalar>>& xs, const std::vector<double>& cs,
                          NoiseTerm noise, std::index_sequence<Ks...>) {
  ((k == Ks + 1 ? (fixed_arity_k<Scalar, Ks + 1>(b, out, xs, cs, noise), true) : false) || ...);
}

template <class Scalar> void check_all_arities(Eigen::Index rows, Eigen::Index cols) {
  const EigenBackend<Scalar> backend;
  // float: coefficient and products are rounded to float before summing (a few ulps of the
  // float sum); double: a few ulps.
  const double ulps = 8.0;
  for (int arity = 1; arity <= kMaxLincombTerms; ++arity) {
    std::vector<StateOf<Scalar>> xs;
    std::vector<double> cs;
    for (int k = 0; k < arity; ++k) {
      xs.push_back(input<Scalar>(k, rows, cols));
      cs.push_back(coefficient(k));
    }
    std::vector<LinTerm<StateOf<Scalar>>> terms;
    for (int k = 0; k < arity; ++k)
      terms.push_back(term(cs[static_cast<std::size_t>(k)], xs[static_cast<std::size_t>(k)]));
    for (NoiseTerm noise : {NoiseTerm{}, NoiseTerm{0.7, 31, 4}}) {
      INFO("arity " << arity << ", noise coefficient " << noise.coeff << ", shape " << rows << " x "
                    << cols);
      const auto ref = naive<Scalar>(xs, cs, noise);
      StateOf<Scalar> out = backend.make_state(rows, cols);
      backend.lincomb(out, std::span<const LinTerm<StateOf<Scalar>>>(terms), noise);
      CHECK(error_in_ulps<Scalar>(out, ref) <= ulps);
      StateOf<Scalar> out_fixed = backend.make_state(rows, cols);
      fixed_arity_dispatch(static_cast<std::size_t>(arity), backend, out_fixed, xs, cs, noise,
                           std::make_index_sequence<kMaxLincombTerms>{});
      CHECK(error_in_ulps<Scalar>(out_fixed, ref) <= ulps);
      // Both entry points run the same fused expression.
      CHECK(out_fixed == out);
    }
  }
}

using diffgrad::testing::thrown;

} // namespace

TEST_CASE("lincomb matches a naive loop for every arity, with and without noise",
          "[backend][lincomb]") {
  // Shapes: a single sample, a single feature, sizes that leave a SIMD remainder, and sizes
  // around the noise path's 256-element chunks (exactly two, and an odd 513 = 2 * 256 + 1).
  for (auto [rows, cols] : {std::pair<Eigen::Index, Eigen::Index>{1, 1}, {1, 17}, {5, 1}, {3, 7},
                            {4, 16}, {6, 13}, {2, 256}, {3, 171}}) {
    check_all_arities<double>(rows, cols);
    check_all_arities<float>(rows, cols);
  }
}

TEST_CASE("lincomb output may alias any input", "[backend][lincomb]") {
  const EigenBackend<double> backend;
  const auto a0 = input<double>(0, 4, 9), b0 = input<double>(1, 4, 9), c0 = input<double>(2, 4, 9);
  for (NoiseTerm noise : {NoiseTerm{}, NoiseTerm{-0.4, 8, 2}}) {
    const auto ref = naive<double>({a0, b0, c0}, {0.5, -2.0, 1.25}, noise);
    INFO("noise coefficient " << noise.coeff);
    for (int aliased = 0; aliased < 3; ++aliased) {
      std::vector<StateOf<double>> v{a0, b0, c0};
      const std::array<LinTerm<StateOf<double>>, 3> terms{term(0.5, v[0]), term(-2.0, v[1]),
                                                          term(1.25, v[2])};
      // The runtime-arity form, writing into input `aliased`.
      backend.lincomb(v[static_cast<std::size_t>(aliased)],
                      std::span<const LinTerm<StateOf<double>>>(terms), noise);
      CHECK(error_in_ulps<double>(v[static_cast<std::size_t>(aliased)], ref) <= 8.0);
      // The fixed-arity form, x = a x + b y (the typical solver update).
      std::vector<StateOf<double>> w{a0, b0, c0};
      if (noise.coeff != 0.0)
        backend.lincomb(w[static_cast<std::size_t>(aliased)], noise, term(0.5, w[0]),
                        term(-2.0, w[1]), term(1.25, w[2]));
      else
        backend.lincomb(w[static_cast<std::size_t>(aliased)], term(0.5, w[0]), term(-2.0, w[1]),
                        term(1.25, w[2]));
      CHECK(error_in_ulps<double>(w[static_cast<std::size_t>(aliased)], ref) <= 8.0);
    }
  }
  // The same input twice, and aliased: x = 3 x - x.
  auto x = a0;
  backend.lincomb(x, term(3.0, x), term(-1.0, x));
  CHECK((x - 2.0 * a0).cwiseAbs().maxCoeff() <=
        4 * std::numeric_limits<double>::epsilon() * a0.cwiseAbs().maxCoeff());
}

TEST_CASE("A noise-only lincomb writes coefficient * xi(seed, step, index)", "[backend][noise]") {
  const EigenBackend<double> backend;
  StateOf<double> out = input<double>(3, 3, 5); // overwritten, not accumulated into
  backend.lincomb(out, NoiseTerm{2.5, 12, 9});
  for (Eigen::Index r = 0; r < 3; ++r)
    for (Eigen::Index c = 0; c < 5; ++c)
      CHECK(out(r, c) == 2.5 * detail::gaussian(12, 9, static_cast<std::uint64_t>(r * 5 + c)));
  // Bit for bit across the chunked pair-wise generation: 3 x 171 = 513 elements are two full
  // 256-element chunks and an odd tail of one; the float backend rounds the same double.
  StateOf<double> big = backend.make_state(3, 171);
  backend.lincomb(big, NoiseTerm{-0.75, 5, 1234567});
  const EigenBackend<float> float_backend;
  StateOf<float> big_float = float_backend.make_state(3, 171);
  float_backend.lincomb(big_float, NoiseTerm{-0.75, 5, 1234567});
  int mismatches = 0;
  for (Eigen::Index i = 0; i < big.size(); ++i) {
    const double expected = -0.75 * detail::gaussian(5, 1234567, static_cast<std::uint64_t>(i));
    mismatches += big.data()[i] != expected;
    mismatches += big_float.data()[i] != static_cast<float>(expected);
  }
  CHECK(mismatches == 0);
  // The runtime-arity form with a zero noise coefficient generates no noise at all.
  const auto x = input<double>(0, 3, 5);
  const std::array<LinTerm<StateOf<double>>, 1> one{term(1.0, x)};
  backend.lincomb(out, std::span<const LinTerm<StateOf<double>>>(one), NoiseTerm{0.0, 12, 9});
  CHECK(out == x);
}

TEST_CASE("Reductions accumulate in double", "[backend][reduction]") {
  const EigenBackend<float> backend;
  StateOf<float> big = StateOf<float>::Ones(2, 3);
  big(0, 0) = 16777216.0f; // 2^24: squared 2^48, and 2^48 + 5 is not a float
  CHECK(backend.squared_norm(big) == 16777216.0 * 16777216.0 + 5.0);
  CHECK(backend.dot(big, big) == 16777216.0 * 16777216.0 + 5.0);

  const EigenBackend<double> dbl;
  const auto a = input<double>(0, 3, 7), b = input<double>(1, 3, 7);
  long double expected = 0;
  for (Eigen::Index r = 0; r < 3; ++r)
    for (Eigen::Index c = 0; c < 7; ++c)
      expected += static_cast<long double>(a(r, c)) * static_cast<long double>(b(r, c));
  CHECK(dbl.dot(a, b) == Approx(static_cast<double>(expected)).epsilon(1e-14));
  CHECK(dbl.squared_norm(a) == Approx(a.squaredNorm()).epsilon(1e-14));
}

TEST_CASE("Backend helpers: make_state, copy, fill, all_finite, shape", "[backend]") {
  const EigenBackend<double> backend;
  auto x = backend.make_state(3, 4);
  CHECK(EigenBackend<double>::batch(x) == 3);
  CHECK(EigenBackend<double>::dim(x) == 4);
  CHECK(x.isZero(0.0));
  CHECK(backend.make_vector(5).isZero(0.0));
  CHECK(backend.make_vector(5).size() == 5);

  backend.fill(x, -1.5);
  CHECK(x == StateOf<double>::Constant(3, 4, -1.5));
  const auto y = input<double>(2, 3, 4);
  backend.copy(x, y);
  CHECK(x == y);
  CHECK(backend.all_finite(x));
  x(2, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_FALSE(backend.all_finite(x));
  x(2, 3) = -std::numeric_limits<double>::infinity();
  CHECK_FALSE(backend.all_finite(x));
}

TEST_CASE("A noisy lincomb rejects terms of different shapes; out takes the terms' shape",
          "[backend][errors]") {
  // One rule for every lincomb form (as CudaBackend): all terms share terms[0]'s shape and
  // `out` is resized to it.
  const EigenBackend<double> backend;
  StateOf<double> out = backend.make_state(3, 4);
  const StateOf<double> a = backend.make_state(3, 4);
  const StateOf<double> wrong = backend.make_state(4, 3);
  const std::string message = thrown(
      [&] { backend.lincomb(out, NoiseTerm{1.0, 1, 1}, term(1.0, a), term(1.0, wrong)); });
  CHECK(message.find("terms[1]") != std::string::npos);
  CHECK(message.find("3 x 4") != std::string::npos);
  CHECK(message.find("4 x 3") != std::string::npos);
  const StateOf<double> b = input<double>(1, 4, 3);
  backend.lincomb(out, NoiseTerm{0.0, 1, 1}, term(2.0, b));
  REQUIRE(out.rows() == 4);
  REQUIRE(out.cols() == 3);
  CHECK(out.isApprox(2.0 * b, 0.0));
}

TEST_CASE("lincomb rejects 0 or more than kMaxLincombTerms terms", "[backend][errors]") {
  const EigenBackend<double> backend;
  auto out = backend.make_state(2, 2);
  const auto x = input<double>(0, 2, 2);
  std::vector<LinTerm<StateOf<double>>> terms;
  const auto span_of = [&] { return std::span<const LinTerm<StateOf<double>>>(terms); };
  using Catch::Matchers::Contains;
  CHECK_THAT(thrown([&] { backend.lincomb(out, span_of()); }),
             Contains("EigenBackend::lincomb: argument 'terms'") && Contains("1..9") &&
                 Contains("got 0"));
  for (int k = 0; k <= kMaxLincombTerms; ++k) terms.push_back(term(1.0, x));
  CHECK_THAT(thrown([&] { backend.lincomb(out, span_of()); }),
             Contains("argument 'terms'") && Contains("got 10"));
}
