// Host-side tests of the CUDA backend: the kernel math is host/device functors, and here they
// run on the host (through run_for_each_on_host, the launcher's host twin) against
// EigenBackend (bit for bit where the CPU backend defines the result) or against formulas
// evaluated independently in the test. Also: the Backend concept, the namespace/visibility
// hygiene and the argument checks that fire before any device call. No GPU needed.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "cpu_reference.hpp"
#include "cpu_reference_collage.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/counting_backend.hpp"
#include "diffgrad/backend/cuda/cublas.cuh"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/backend/cuda/index_map.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/cuda/reduce.cuh"
#include "diffgrad/backend/cuda/structured_lincomb.cuh"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/models/cuda/dirac_mixture.cuh"
#include "diffgrad/models/cuda/mlp.cuh"

using namespace diffgrad;
using diffgrad::testing::Precision;

namespace dc = diffgrad::gpu;

static_assert(Backend<dc::CudaBackend<float>>);
static_assert(Backend<dc::CudaBackend<double>>);
static_assert(Backend<CountingBackend<dc::CudaBackend<double>>>);
static_assert(BackendFor<dc::CudaBackend<double>, Block2>);
static_assert(BackendFor<dc::CudaBackend<float>, Block2>);
static_assert(BackendFor<dc::CudaBackend<double>, ColumnCoeff>);
static_assert(BackendFor<dc::CudaBackend<float>, ColumnCoeff>);
static_assert(BackendFor<CountingBackend<dc::CudaBackend<double>>, Block2>);
static_assert(BackendFor<CountingBackend<dc::CudaBackend<float>>, ColumnCoeff>);
static_assert(std::is_copy_constructible_v<dc::CudaBackend<double>::coefficient_table>);
static_assert(std::is_same_v<dc::CudaBackend<float>::index_map_type, dc::DeviceIndexMap>);
static_assert(
    std::is_same_v<decltype(std::declval<const CountingBackend<dc::CudaBackend<double>>&>()
                                .make_index_map(std::declval<const IndexMap&>())),
                   dc::DeviceIndexMap>);
static_assert(std::is_nothrow_move_constructible_v<dc::DeviceState<float>>);
static_assert(std::is_copy_constructible_v<dc::DeviceState<double>>);

namespace {

/// Host buffers that are 16-byte aligned (as every device allocation is), so the functors
/// take their vectorised path, with an offset to exercise the element-wise tail.
template <class Scalar> struct AlignedHost {
  std::vector<Scalar> storage;
  Scalar* ptr;
  explicit AlignedHost(std::size_t n) : storage(n + 16 / sizeof(Scalar)) {
    void* p = storage.data();
    std::size_t space = storage.size() * sizeof(Scalar);
    ptr = static_cast<Scalar*>(std::align(16, n * sizeof(Scalar), p, space));
  }
};

template <class Scalar>
std::vector<double> run_lincomb_functor(const std::vector<double>& coeffs,
                                        const std::vector<std::vector<double>>& inputs,
                                        double noise_coeff, std::uint64_t seed, std::uint64_t step,
                                        std::size_t size);

template <class Scalar, int N, bool WithNoise>
std::vector<double> run_fixed(const std::vector<double>& coeffs,
                              const std::vector<std::vector<double>>& inputs, double noise_coeff,
                              std::uint64_t seed, std::uint64_t step, std::size_t size,
                              std::uint64_t first_index = 0) {
  std::vector<AlignedHost<Scalar>> in;
  for (int k = 0; k < N; ++k) {
    in.emplace_back(size);
    for (std::size_t i = 0; i < size; ++i)
      in.back().ptr[i] = static_cast<Scalar>(inputs[static_cast<std::size_t>(k)][i]);
  }
  AlignedHost<Scalar> out(size);
  dc::LincombFunctor<Scalar, N, WithNoise> f{};
  f.out = out.ptr;
  f.size = static_cast<std::int64_t>(size);
  f.noise = dc::NoiseParams{noise_coeff, seed, step, first_index};
  for (int k = 0; k < N; ++k) {
    f.in[k] = in[static_cast<std::size_t>(k)].ptr;
    f.coeff[k] = static_cast<Scalar>(coeffs[static_cast<std::size_t>(k)]);
  }
  dc::run_for_each_on_host(f, f.items(f.size));
  return std::vector<double>(out.ptr, out.ptr + size);
}

template <class Scalar, std::size_t... Ns>
std::vector<double> dispatch(std::size_t n, bool noise, const std::vector<double>& coeffs,
                             const std::vector<std::vector<double>>& inputs, double noise_coeff,
                             std::uint64_t seed, std::uint64_t step, std::size_t size,
                             std::index_sequence<Ns...>) {
  std::vector<double> r;
  ((n == Ns ? (r = noise ? run_fixed<Scalar, static_cast<int>(Ns), true>(
                               coeffs, inputs, noise_coeff, seed, step, size)
                         : (Ns == 0 ? std::vector<double>{}
                                    : run_fixed<Scalar, static_cast<int>(Ns == 0 ? 1 : Ns), false>(
                                          coeffs, inputs, noise_coeff, seed, step, size)),
               true)
            : false) ||
   ...);
  return r;
}

std::vector<double> host_values(std::size_t n, double phase) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = std::sin(0.37 * static_cast<double>(i) + phase) * (1.0 + phase);
  return v;
}

/// The Block2 functor run on the host over aligned Scalar copies of `inputs`; `out` is a fresh
/// buffer, or input number `alias` itself (alias >= 0: the in-place update of the engines).
template <class Scalar>
std::vector<double>
run_block2(const std::vector<Block2>& coeffs, const std::vector<std::vector<double>>& inputs,
           const BasicNoiseTerm<Block2>& noise, int batch, int width, int alias = -1) {
  const auto size = static_cast<std::size_t>(batch) * static_cast<std::size_t>(width);
  std::vector<AlignedHost<Scalar>> in;
  for (const auto& v : inputs) {
    in.emplace_back(size);
    for (std::size_t i = 0; i < size; ++i) in.back().ptr[i] = static_cast<Scalar>(v[i]);
  }
  AlignedHost<Scalar> fresh(size);
  Scalar* out = alias < 0 ? fresh.ptr : in[static_cast<std::size_t>(alias)].ptr;
  std::vector<dc::Block2Term<Scalar>> terms;
  for (std::size_t t = 0; t < inputs.size(); ++t) terms.push_back({coeffs[t], in[t].ptr});
  const std::span<const dc::Block2Term<Scalar>> view(terms);
  if (noise.coeff.is_zero()) {
    const auto f = dc::make_block2_functor<false>(out, batch, width / 2, view, noise);
    dc::run_for_each_on_host(f, f.items());
  } else {
    const auto f = dc::make_block2_functor<true>(out, batch, width / 2, view, noise);
    dc::run_for_each_on_host(f, f.items());
  }
  return std::vector<double>(out, out + size);
}

/// The ColumnCoeff functor run on the host; the coefficients point into `table` (host memory,
/// which is where the host run reads them).
template <class Scalar>
std::vector<double> run_columns(const std::vector<double>& table,
                                const std::vector<testing::ColumnSpec>& coeffs,
                                const std::vector<std::vector<double>>& inputs,
                                testing::ColumnSpec noise, std::uint64_t seed, std::uint64_t step,
                                std::uint64_t row_offset, int batch, int width, int alias = -1) {
  const auto size = static_cast<std::size_t>(batch) * static_cast<std::size_t>(width);
  const auto coeff = [&](const testing::ColumnSpec& c) {
    return ColumnCoeff{c.offset < 0 ? nullptr : table.data() + c.offset, c.scale};
  };
  std::vector<AlignedHost<Scalar>> in;
  for (const auto& v : inputs) {
    in.emplace_back(size);
    for (std::size_t i = 0; i < size; ++i) in.back().ptr[i] = static_cast<Scalar>(v[i]);
  }
  AlignedHost<Scalar> fresh(size);
  Scalar* out = alias < 0 ? fresh.ptr : in[static_cast<std::size_t>(alias)].ptr;
  std::vector<dc::ColumnTerm<Scalar>> terms;
  for (std::size_t t = 0; t < inputs.size(); ++t) terms.push_back({coeff(coeffs[t]), in[t].ptr});
  const std::span<const dc::ColumnTerm<Scalar>> view(terms);
  const BasicNoiseTerm<ColumnCoeff> n{coeff(noise), seed, step, row_offset};
  const auto total = static_cast<std::int64_t>(size);
  if (n.coeff.is_zero()) {
    const auto f = dc::make_column_functor<false>(out, total, width, view, n);
    dc::run_for_each_on_host(f, f.items(total));
  } else {
    const auto f = dc::make_column_functor<true>(out, total, width, view, n);
    dc::run_for_each_on_host(f, f.items(total));
  }
  return std::vector<double>(out, out + size);
}

/// A width x width matrix, row-major, in long double.
using Dense = std::vector<long double>;

/// B (x) I_d over the halves [x | v] of a row of width 2d, entry by entry.
Dense dense_block(const Block2& b, int width) {
  const int d = width / 2;
  const auto w = static_cast<std::size_t>(width);
  Dense m(w * w, 0.0L);
  for (int i = 0; i < d; ++i) {
    const auto x = static_cast<std::size_t>(i), v = static_cast<std::size_t>(d + i);
    m[x * w + x] = b.xx;
    m[x * w + v] = b.xv;
    m[v * w + x] = b.vx;
    m[v * w + v] = b.vv;
  }
  return m;
}

/// diag(scale * table[offset + k]) (or scale I when offset < 0).
Dense dense_columns(const std::vector<double>& table, const testing::ColumnSpec& c, int width) {
  const auto w = static_cast<std::size_t>(width);
  Dense m(w * w, 0.0L);
  for (std::size_t k = 0; k < w; ++k)
    m[k * w + k] = c.offset < 0 ? static_cast<long double>(c.scale)
                                : static_cast<long double>(c.scale) *
                                      table[static_cast<std::size_t>(c.offset) + k];
  return m;
}

/// Checks got against the dense reference out_r = sum_t M_t x_t[r] + M_xi xi[r] (long double;
/// xi[r][c] = detail::gaussian(seed, step, (row_offset + r) width + c), drawn one by one),
/// element by element: |got - ref| <= 2 (n + 4) u sum_j |contributions_j|, u the unit
/// roundoff of the precision (n products and sums, the rounding of inputs, coefficients and
/// the noise term). Returns the number of elements outside that bound.
std::size_t dense_violations(const std::vector<double>& got, const std::vector<Dense>& mats,
                             const std::vector<std::vector<double>>& inputs, const Dense* noise,
                             std::uint64_t seed, std::uint64_t step, std::uint64_t row_offset,
                             int batch, int width, double unit) {
  const auto w = static_cast<std::size_t>(width);
  const double tol = 2.0 * (static_cast<double>(mats.size()) + 4.0) * unit;
  std::size_t bad = 0;
  std::vector<long double> xi(w);
  for (std::size_t r = 0; r < static_cast<std::size_t>(batch); ++r) {
    for (std::size_t c = 0; c < w; ++c)
      xi[c] = detail::gaussian(seed, step, (row_offset + r) * w + c);
    for (std::size_t i = 0; i < w; ++i) {
      long double ref = 0.0L, magnitude = 0.0L;
      for (std::size_t t = 0; t < mats.size(); ++t)
        for (std::size_t j = 0; j < w; ++j) {
          const long double term = mats[t][i * w + j] * inputs[t][r * w + j];
          ref += term;
          magnitude += std::fabs(term);
        }
      if (noise != nullptr)
        for (std::size_t j = 0; j < w; ++j) {
          const long double term = (*noise)[i * w + j] * xi[j];
          ref += term;
          magnitude += std::fabs(term);
        }
      const long double err = std::fabs(static_cast<long double>(got[r * w + i]) - ref);
      if (!(err <= tol * magnitude)) {
        if (bad < 5)
          UNSCOPED_INFO("element (" << r << ", " << i << "): got " << got[r * w + i] << ", dense "
                                    << static_cast<double>(ref) << ", error "
                                    << static_cast<double>(err) << " > "
                                    << static_cast<double>(tol * magnitude));
        ++bad;
      }
    }
  }
  return bad;
}

double unit_roundoff(Precision p) { return p == Precision::f64 ? 0x1p-53 : 0x1p-24; }

/// Non-symmetric blocks (the transposes differ), one per term.
std::vector<Block2> test_blocks(std::size_t n) {
  std::vector<Block2> b;
  for (std::size_t t = 0; t < n; ++t) {
    const double s = static_cast<double>(t);
    b.push_back({0.9 - 0.2 * s, 0.35 + 0.1 * s, -0.6 + 0.15 * s, 1.1 - 0.05 * s * s});
  }
  return b;
}

} // namespace

TEST_CASE("lincomb functor == EigenBackend::lincomb bit for bit, arity 0..9, with/without noise",
          "[cuda][host][lincomb]") {
  const int batch = 5, dim = 7; // 35 elements: the float path has a 3-element tail
  const auto size = static_cast<std::size_t>(batch * dim);
  for (Precision p : {Precision::f64, Precision::f32}) {
    for (std::size_t n = 0; n <= static_cast<std::size_t>(kMaxLincombTerms); ++n) {
      for (bool noise : {false, true}) {
        if (n == 0 && !noise) continue;
        std::vector<double> coeffs;
        std::vector<std::vector<double>> inputs;
        for (std::size_t k = 0; k < n; ++k) {
          coeffs.push_back(0.3 + 0.7 * static_cast<double>(k) - 0.11 * static_cast<double>(k * k));
          inputs.push_back(host_values(size, 0.25 * static_cast<double>(k)));
        }
        const double nc = noise ? 0.37 : 0.0;
        const auto expected = testing::cpu_lincomb(p, coeffs, inputs, nc, 11, 4, batch, dim);
        const auto got = p == Precision::f64
                             ? dispatch<double>(n, noise, coeffs, inputs, nc, 11, 4, size,
                                                std::make_index_sequence<kMaxLincombTerms + 1>{})
                             : dispatch<float>(n, noise, coeffs, inputs, nc, 11, 4, size,
                                               std::make_index_sequence<kMaxLincombTerms + 1>{});
        INFO((p == Precision::f64 ? "double" : "float") << ", " << n << " terms, noise " << noise);
        CHECK(testing::bitwise_mismatches(got, expected) == 0);
      }
    }
  }
}

TEST_CASE("lincomb functor of arity 12 (beyond the runtime span limit) is the left fold",
          "[cuda][host][lincomb]") {
  // Reference: the left fold c_0 x_0 + c_1 x_1 + ... in double, every operation rounded once,
  // written out here independently of the functor.
  constexpr int kTerms = 12;
  const std::size_t size = 19;
  std::vector<double> coeffs;
  std::vector<std::vector<double>> inputs;
  for (int k = 0; k < kTerms; ++k) {
    coeffs.push_back(1.0 / (1.0 + k));
    inputs.push_back(host_values(size, 0.1 * k));
  }
  const auto got = run_fixed<double, kTerms, false>(coeffs, inputs, 0.0, 0, 0, size);
  for (std::size_t i = 0; i < size; ++i) {
    volatile double acc = coeffs[0] * inputs[0][i];
    for (int k = 1; k < kTerms; ++k) {
      volatile double prod =
          coeffs[static_cast<std::size_t>(k)] * inputs[static_cast<std::size_t>(k)][i];
      acc = acc + prod;
    }
    CHECK(got[i] == acc);
  }
}

TEST_CASE("noise: vectorised pairs and the element-wise tail give detail::gaussian",
          "[cuda][host][philox]") {
  // 2 x 9 = 18 doubles = 9 packets (pairs); 18 floats = 4 packets + a 2-element tail.
  const std::size_t size = 18;
  const auto d = run_fixed<double, 0, true>({}, {}, 1.0, 99, 123456789, size);
  const auto f = run_fixed<float, 0, true>({}, {}, 1.0, 99, 123456789, size);
  for (std::size_t i = 0; i < size; ++i) {
    const double g = detail::gaussian(99, 123456789, i);
    CHECK(d[i] == g);
    CHECK(f[i] == static_cast<double>(static_cast<float>(g)));
  }
}

TEST_CASE("gaussian_packet: any start index, even or odd, gives detail::gaussian bit for bit",
          "[cuda][host][philox]") {
  for (std::uint64_t first : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{2},
                              std::uint64_t{7}, (std::uint64_t{1} << 40) + 3}) {
    double two[2], four[4];
    dc::detail::gaussian_packet(5, 77, first, two);
    dc::detail::gaussian_packet(5, 77, first, four);
    for (int e = 0; e < 4; ++e) {
      INFO("first " << first << ", element " << e);
      const double g = detail::gaussian(5, 77, first + static_cast<std::uint64_t>(e));
      if (e < 2) CHECK(two[e] == g);
      CHECK(four[e] == g);
    }
  }
}

TEST_CASE("scalar lincomb functor: noise at the global index (row_offset + r) d + c",
          "[cuda][host][lincomb][philox]") {
  // Odd and even row_offset * d (odd starts take the unaligned-pair path of the packets).
  for (Precision p : {Precision::f64, Precision::f32}) {
    for (auto [batch, dim] : {std::pair{1, 1}, std::pair{3, 5}, std::pair{4, 4}, std::pair{2, 7}}) {
      for (std::uint64_t row_offset :
           {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{6}, (std::uint64_t{1} << 35) + 3}) {
        const auto size = static_cast<std::size_t>(batch * dim);
        const std::uint64_t first_index = row_offset * static_cast<std::uint64_t>(dim);
        const std::vector<double> coeffs{0.75, -1.25};
        const std::vector<std::vector<double>> inputs{host_values(size, 0.3),
                                                      host_values(size, 1.9)};
        INFO((p == Precision::f64 ? "double" : "float")
             << ", " << batch << " x " << dim << ", row_offset " << row_offset);
        const auto expected =
            testing::cpu_lincomb(p, coeffs, inputs, -0.4, 21, 8, batch, dim, row_offset);
        const auto got =
            p == Precision::f64
                ? run_fixed<double, 2, true>(coeffs, inputs, -0.4, 21, 8, size, first_index)
                : run_fixed<float, 2, true>(coeffs, inputs, -0.4, 21, 8, size, first_index);
        CHECK(testing::bitwise_mismatches(got, expected) == 0);
        // The noise alone, against the scalar generator at the global index.
        const auto noise = p == Precision::f64
                               ? run_fixed<double, 0, true>({}, {}, 1.0, 21, 8, size, first_index)
                               : run_fixed<float, 0, true>({}, {}, 1.0, 21, 8, size, first_index);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < size; ++i) {
          const double g = detail::gaussian(21, 8, first_index + i);
          bad += noise[i] != (p == Precision::f64 ? g : static_cast<double>(static_cast<float>(g)));
        }
        CHECK(bad == 0);
      }
    }
  }
}

TEST_CASE("Block2 lincomb functor == dense (B (x) I_d) reference and EigenBackend bit for bit",
          "[cuda][host][lincomb][structured]") {
  // Widths 2d with d odd and even, below and above the packet width (2 doubles, 4 floats),
  // with d % W == 0 (128-bit loads per half) and without; noise with odd and even row
  // offsets; out a fresh state or aliasing the first / the last term.
  const BasicNoiseTerm<Block2> no_noise{};
  for (Precision p : {Precision::f64, Precision::f32}) {
    for (auto [batch, d] : {std::pair{1, 1}, std::pair{3, 2}, std::pair{2, 3}, std::pair{4, 4},
                            std::pair{3, 5}, std::pair{2, 8}, std::pair{5, 9}}) {
      const int width = 2 * d;
      const auto size = static_cast<std::size_t>(batch * width);
      for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{kMaxLincombTerms}}) {
        const std::vector<Block2> coeffs = test_blocks(n);
        std::vector<std::vector<double>> inputs;
        std::vector<Dense> mats;
        for (std::size_t t = 0; t < n; ++t) {
          inputs.push_back(host_values(size, 0.45 * static_cast<double>(t) + 0.1));
          mats.push_back(dense_block(coeffs[t], width));
        }
        for (std::uint64_t row_offset : {std::uint64_t{0}, std::uint64_t{3}}) {
          for (bool noisy : {false, true}) {
            const BasicNoiseTerm<Block2> noise =
                noisy ? BasicNoiseTerm<Block2>{Block2{0.3, -0.1, 0.12, 0.2}, 9, 4, row_offset}
                      : no_noise;
            const Dense noise_mat = dense_block(noise.coeff, width);
            const auto expected =
                testing::cpu_lincomb_block2(p, coeffs, inputs, noise, batch, width);
            for (int alias : {-1, 0, static_cast<int>(n) - 1}) {
              INFO((p == Precision::f64 ? "double" : "float")
                   << ", " << batch << " x " << width << ", " << n << " terms, noise " << noisy
                   << ", row_offset " << row_offset << ", out aliases term " << alias);
              const auto got = p == Precision::f64
                                   ? run_block2<double>(coeffs, inputs, noise, batch, width, alias)
                                   : run_block2<float>(coeffs, inputs, noise, batch, width, alias);
              CHECK(testing::bitwise_mismatches(got, expected) == 0);
              CHECK(dense_violations(got, mats, inputs, noisy ? &noise_mat : nullptr, noise.seed,
                                     noise.step, row_offset, batch, width, unit_roundoff(p)) == 0);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("Block2 lincomb functor: shards with row offsets reproduce the whole batch",
          "[cuda][host][lincomb][structured]") {
  // Rows [0, 2) with row_offset 0 and rows [2, 5) with row_offset 2 == the 5-row batch.
  const int batch = 5, d = 3, width = 2 * d, split = 2;
  const auto size = static_cast<std::size_t>(batch * width);
  const auto cut = static_cast<std::ptrdiff_t>(split * width);
  const std::vector<Block2> coeffs = test_blocks(2);
  const std::vector<std::vector<double>> inputs{host_values(size, 0.2), host_values(size, 0.9)};
  const Block2 L{0.5, 0.0, -0.25, 0.4};
  const auto whole = run_block2<double>(coeffs, inputs, {L, 3, 11, 0}, batch, width);
  std::vector<std::vector<double>> head, tail;
  for (const auto& v : inputs) {
    head.emplace_back(v.begin(), v.begin() + cut);
    tail.emplace_back(v.begin() + cut, v.end());
  }
  auto sharded = run_block2<double>(coeffs, head, {L, 3, 11, 0}, split, width);
  const auto rest = run_block2<double>(coeffs, tail, {L, 3, 11, split}, batch - split, width);
  sharded.insert(sharded.end(), rest.begin(), rest.end());
  CHECK(testing::bitwise_mismatches(sharded, whole) == 0);
}

TEST_CASE("ColumnCoeff lincomb functor == dense diagonal reference and EigenBackend bit for bit",
          "[cuda][host][lincomb][structured]") {
  // Widths below, at and above the packet width (packets then span row ends), tables and
  // scalar (values == nullptr) coefficients mixed, noise from a table and a scalar, odd and
  // even row_offset * width, out fresh or aliasing a term.
  for (Precision p : {Precision::f64, Precision::f32}) {
    for (auto [batch, width] : {std::pair{1, 1}, std::pair{3, 1}, std::pair{2, 3}, std::pair{3, 5},
                                std::pair{4, 4}, std::pair{2, 7}, std::pair{3, 8}}) {
      const auto w = static_cast<std::size_t>(width);
      const auto size = static_cast<std::size_t>(batch) * w;
      // Four table slots of one entry per column.
      std::vector<double> table(4 * w);
      for (std::size_t i = 0; i < table.size(); ++i)
        table[i] = 0.5 + 0.4 * std::cos(0.8 * static_cast<double>(i) + 0.3);
      const std::vector<testing::ColumnSpec> coeffs{
          {0, 1.5}, {-1, -0.35}, {static_cast<std::int64_t>(w), 0.75}};
      std::vector<std::vector<double>> inputs;
      std::vector<Dense> mats;
      for (std::size_t t = 0; t < coeffs.size(); ++t) {
        inputs.push_back(host_values(size, 0.6 * static_cast<double>(t) + 0.2));
        mats.push_back(dense_columns(table, coeffs[t], width));
      }
      for (std::uint64_t row_offset : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{4}}) {
        for (int noise_kind : {0, 1, 2}) { // none, from the table, scalar
          const testing::ColumnSpec noise =
              noise_kind == 0   ? testing::ColumnSpec{-1, 0.0}
              : noise_kind == 1 ? testing::ColumnSpec{static_cast<std::int64_t>(3 * w), 0.5}
                                : testing::ColumnSpec{-1, -0.3};
          const Dense noise_mat = dense_columns(table, noise, width);
          const auto expected = testing::cpu_lincomb_columns(p, table, coeffs, inputs, noise, 13, 6,
                                                             row_offset, batch, width);
          for (int alias : {-1, 0, 2}) {
            INFO((p == Precision::f64 ? "double" : "float")
                 << ", " << batch << " x " << width << ", noise kind " << noise_kind
                 << ", row_offset " << row_offset << ", out aliases term " << alias);
            const auto got = p == Precision::f64
                                 ? run_columns<double>(table, coeffs, inputs, noise, 13, 6,
                                                       row_offset, batch, width, alias)
                                 : run_columns<float>(table, coeffs, inputs, noise, 13, 6,
                                                      row_offset, batch, width, alias);
            CHECK(testing::bitwise_mismatches(got, expected) == 0);
            CHECK(dense_violations(got, mats, inputs, noise_kind == 0 ? nullptr : &noise_mat, 13, 6,
                                   row_offset, batch, width, unit_roundoff(p)) == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("the CPU halves of the structured and gDDIM GPU cases run and are finite",
          "[cuda][host][structured][gddim]") {
  // The GPU tests compare against these; here (no device needed) they must at least run:
  // a scheme that refuses its grid or width would otherwise only show up on a GPU machine.
  const auto finite_parts = [](const testing::Parts& parts, std::size_t expected_parts,
                               std::size_t elements) {
    REQUIRE(parts.size() == expected_parts);
    for (const auto& [name, v] : parts) {
      INFO(name);
      CHECK(v.size() == elements);
      double norm = 0.0;
      for (double e : v) norm += e * e;
      CHECK(std::isfinite(norm));
      CHECK(norm > 0.0);
    }
  };
  const testing::Problem p = testing::structured_problem();
  const auto elements = static_cast<std::size_t>(p.batch * p.dim);
  // sample + (x0, grad_x, one dL/dxi per step) for two memory modes.
  const std::size_t parts = 1 + 2 * (2 + static_cast<std::size_t>(p.steps));
  for (bool columns : {false, true})
    for (Precision prec : {Precision::f64, Precision::f32})
      finite_parts(testing::cpu_structured(columns, p, prec), parts, elements);
  for (int i = 0; i < 6; ++i) {
    INFO("gDDIM case " << i);
    finite_parts(testing::cpu_gddim(i), 1, i < 3 ? 5 * 6 : 5 * 16);
  }
}

TEST_CASE("fill, dot and finite-check functors", "[cuda][host]") {
  AlignedHost<float> buf(11);
  dc::FillFunctor<float> fill{buf.ptr, 2.5f, 11};
  dc::run_for_each_on_host(fill, fill.items(11));
  for (std::size_t i = 0; i < 11; ++i) CHECK(buf.ptr[i] == 2.5f);

  const std::vector<float> a{1.0f, -2.0f, 0.5f}, b{3.0f, 4.0f, -8.0f};
  const dc::DotTransform<float> dot{a.data(), b.data()};
  CHECK(dot(0) == 3.0);
  CHECK(dot(1) == -8.0);
  CHECK(dot(2) == -4.0);

  const std::vector<double> x{1.0, std::numeric_limits<double>::infinity(), -0.0,
                              std::numeric_limits<double>::quiet_NaN(),
                              std::numeric_limits<double>::max()};
  const dc::NonFiniteTransform<double> bad{x.data()};
  CHECK(bad(0) == 0);
  CHECK(bad(1) == 1);
  CHECK(bad(2) == 0);
  CHECK(bad(3) == 1);
  CHECK(bad(4) == 0);
}

TEST_CASE("Dirac-mixture functors: stable softmax and logit cotangent", "[cuda][host][models]") {
  // Two samples, three points; q_i = alpha^2 |y_i|^2 - 2 alpha x.y_i from given cross terms.
  const std::vector<double> xy{0.5, -1.0, 2.0, 40.0, -3.0, 0.0};
  const std::vector<double> y_sq{1.0, 2.0, 0.5};
  const std::vector<double> log_prior{-1.0, -0.5, -2.0};
  const double alpha = 0.8, sigma = 0.05;
  std::vector<double> w(6);
  const dc::dirac::Softmax<double> softmax{
      xy.data(),  w.data(),      y_sq.data(),           log_prior.data(),
      -2 * alpha, alpha * alpha, 0.5 / (sigma * sigma), 3};
  dc::run_for_each_on_host(softmax, 2);
  for (int b = 0; b < 2; ++b) {
    // Reference in long double, straight from the definition (no shift).
    long double logits[3], m = -INFINITY, sum = 0;
    for (int i = 0; i < 3; ++i) {
      const long double q = alpha * alpha * y_sq[static_cast<std::size_t>(i)] -
                            2.0L * alpha * xy[static_cast<std::size_t>(b * 3 + i)];
      logits[i] = log_prior[static_cast<std::size_t>(i)] - q / (2.0L * sigma * sigma);
      m = std::max(m, logits[i]);
    }
    for (long double l : logits) sum += std::exp(l - m);
    for (int i = 0; i < 3; ++i) {
      const double expected = static_cast<double>(std::exp(logits[i] - m) / sum);
      CHECK(w[static_cast<std::size_t>(b * 3 + i)] ==
            Approx(expected).epsilon(1e-12).margin(1e-300));
    }
  }
  // Far-away points underflow to exactly 0 (no NaN): sample 1 is dominated by point 0.
  CHECK(w[4] == 0.0);
  CHECK(std::isfinite(w[3]));

  // dR_bi = w_bi (c_b . y_i - c_b . x0_b), with dr holding c_b . y_i on entry.
  std::vector<double> dr{1.0, 2.0, 3.0, -1.0, 0.0, 1.0};
  const std::vector<double> wt{0.2, 0.3, 0.5, 0.6, 0.3, 0.1};
  const std::vector<double> c{1.0, 2.0, -1.0, 0.5};  // 2 x 2
  const std::vector<double> x0{0.5, 0.25, 2.0, 1.0}; // 2 x 2
  const dc::dirac::LogitCotangent<double> lc{dr.data(), wt.data(), c.data(), x0.data(), 3, 2};
  dc::run_for_each_on_host(lc, 2);
  const double cx0_0 = 1.0 * 0.5 + 2.0 * 0.25, cx0_1 = -1.0 * 2.0 + 0.5 * 1.0;
  CHECK(dr[0] == Approx(0.2 * (1.0 - cx0_0)));
  CHECK(dr[2] == Approx(0.5 * (3.0 - cx0_0)));
  CHECK(dr[3] == Approx(0.6 * (-1.0 - cx0_1)));
  CHECK(dr[5] == Approx(0.1 * (1.0 - cx0_1)));

  std::vector<double> eps(2);
  const std::vector<double> xs{1.0, -2.0}, x0s{0.5, 0.5};
  dc::dirac::EpsFromX0<double>{xs.data(), x0s.data(), eps.data(), 0.8, 4.0}(1);
  CHECK(eps[1] == Approx((-2.0 - 0.8 * 0.5) * 4.0));
}

TEST_CASE("MLP functors: input row, bias + activation, activation gradient",
          "[cuda][host][models]") {
  std::vector<double> x{1.0, 2.0, 3.0, 4.0}, z{-1.0}, in(2 * 5);
  dc::mlp::Input<double> input{};
  input.x = x.data();
  input.z = z.data();
  input.in = in.data();
  input.features[0] = 0.25;
  input.features[1] = 0.75;
  input.dim = 2;
  input.num_features = 2;
  input.cond_dim = 1;
  dc::run_for_each_on_host(input, 10);
  CHECK(in == std::vector<double>{1.0, 2.0, 0.25, 0.75, -1.0, 3.0, 4.0, 0.25, 0.75, -1.0});

  std::vector<double> pre{0.5, -1.5, 2.0, 0.0}, bias{0.1, -0.2}, act(4);
  dc::mlp::BiasActivation<double> silu{pre.data(), bias.data(), act.data(), 2, false};
  dc::run_for_each_on_host(silu, 4);
  CHECK(pre[1] == Approx(-1.7));
  CHECK(act[0] == Approx(0.6 / (1.0 + std::exp(-0.6))));
  CHECK(act[3] == Approx(-0.2 / (1.0 + std::exp(0.2))));
  // SiLU'(p) = s (1 + p (1 - s)), checked against a central difference of SiLU.
  std::vector<double> g{1.0, 1.0, 1.0, 1.0};
  dc::mlp::ActivationGrad<double> grad{g.data(), pre.data(), act.data(), false};
  dc::run_for_each_on_host(grad, 4);
  const auto silu_f = [](double p) { return p / (1.0 + std::exp(-p)); };
  for (std::size_t i = 0; i < 4; ++i) {
    const double h = 1e-6;
    CHECK(g[i] == Approx((silu_f(pre[i] + h) - silu_f(pre[i] - h)) / (2 * h)).epsilon(1e-8));
  }
  std::vector<double> pre_t{0.3, -0.7}, act_t(2), bias0{0.0, 0.0}, g_t{2.0, 2.0};
  dc::mlp::BiasActivation<double> th{pre_t.data(), bias0.data(), act_t.data(), 2, true};
  dc::run_for_each_on_host(th, 2);
  CHECK(act_t[1] == Approx(std::tanh(-0.7)));
  dc::mlp::ActivationGrad<double> tg{g_t.data(), pre_t.data(), act_t.data(), true};
  dc::run_for_each_on_host(tg, 2);
  CHECK(g_t[0] == Approx(2.0 * (1.0 - std::tanh(0.3) * std::tanh(0.3))));
}

namespace blas_reference {

/// A plain column-major BLAS with cuBLAS's contract (C = alpha op(A) op(B) + beta C), to check
/// on the host how gpu::blas maps row-major products onto column-major calls.
struct HostColumnMajorBlas {};

template <class T>
cublasStatus_t gemm_cm(HostColumnMajorBlas, cublasOperation_t ta, cublasOperation_t tb, int m,
                       int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                       T* c, int ldc) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      T sum = 0;
      for (int p = 0; p < k; ++p) {
        const T aip = ta == CUBLAS_OP_N ? a[i + p * lda] : a[p + i * lda];
        const T bpj = tb == CUBLAS_OP_N ? b[p + j * ldb] : b[j + p * ldb];
        sum += aip * bpj;
      }
      c[i + j * ldc] = alpha * sum + beta * c[i + j * ldc];
    }
  return CUBLAS_STATUS_SUCCESS;
}

template <class T>
cublasStatus_t gemv_cm(HostColumnMajorBlas, cublasOperation_t t, int m, int n, T alpha, const T* a,
                       int lda, const T* x, T beta, T* y) {
  const int rows = t == CUBLAS_OP_N ? m : n, inner = t == CUBLAS_OP_N ? n : m;
  for (int r = 0; r < rows; ++r) {
    T sum = 0;
    for (int q = 0; q < inner; ++q)
      sum += (t == CUBLAS_OP_N ? a[r + q * lda] : a[q + r * lda]) * x[q];
    y[r] = alpha * sum + beta * y[r];
  }
  return CUBLAS_STATUS_SUCCESS;
}

} // namespace blas_reference

TEST_CASE("row-major GEMM/GEMV mapping onto column-major BLAS", "[cuda][host][blas]") {
  using blas_reference::HostColumnMajorBlas;
  using dc::blas::Op;
  // Row-major matrices stored with padded rows (leading dimension > width).
  const auto matrix = [](int rows, int cols, int ld, double phase) {
    std::vector<double> m(static_cast<std::size_t>(rows * ld), 1e300); // padding never read
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        m[static_cast<std::size_t>(r * ld + c)] = std::sin(1.1 * (r * cols + c) + phase);
    return m;
  };
  const int m = 3, n = 4, k = 5;
  for (Op op_a : {Op::n, Op::t})
    for (Op op_b : {Op::n, Op::t}) {
      // op(A) is m x k: A is stored m x k (Op::n) or k x m (Op::t); likewise B.
      const int a_rows = op_a == Op::n ? m : k, a_cols = op_a == Op::n ? k : m;
      const int b_rows = op_b == Op::n ? k : n, b_cols = op_b == Op::n ? n : k;
      const int lda = a_cols + 2, ldb = b_cols + 1, ldc = n + 3;
      const auto a = matrix(a_rows, a_cols, lda, 0.1), b = matrix(b_rows, b_cols, ldb, 0.7);
      std::vector<double> c = matrix(m, n, ldc, 1.3);
      const std::vector<double> c0 = c;
      REQUIRE(dc::blas::gemm<double>(HostColumnMajorBlas{}, op_a, op_b, m, n, k, 2.0, a.data(), lda,
                                     b.data(), ldb, 0.5, c.data(), ldc) == CUBLAS_STATUS_SUCCESS);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
          double ref = 0;
          for (int p = 0; p < k; ++p) {
            const double aip = op_a == Op::n ? a[static_cast<std::size_t>(i * lda + p)]
                                             : a[static_cast<std::size_t>(p * lda + i)];
            const double bpj = op_b == Op::n ? b[static_cast<std::size_t>(p * ldb + j)]
                                             : b[static_cast<std::size_t>(j * ldb + p)];
            ref += aip * bpj;
          }
          ref = 2.0 * ref + 0.5 * c0[static_cast<std::size_t>(i * ldc + j)];
          CHECK(c[static_cast<std::size_t>(i * ldc + j)] == Approx(ref).epsilon(1e-14));
        }
    }
  // y = A^T x (column sums when x = 1) and y = A x for a padded row-major A (m x n).
  const int lda = n + 2;
  const auto a = matrix(m, n, lda, 0.4);
  std::vector<double> x_m{1.0, -2.0, 0.5}, x_n{0.25, 1.0, -1.0, 2.0}, y_n(4, 1.0), y_m(3, 1.0);
  REQUIRE(dc::blas::gemv_t<double>(HostColumnMajorBlas{}, m, n, 1.0, a.data(), lda, x_m.data(), 1.0,
                                   y_n.data()) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(dc::blas::gemv_n<double>(HostColumnMajorBlas{}, m, n, 1.0, a.data(), lda, x_n.data(), 0.0,
                                   y_m.data()) == CUBLAS_STATUS_SUCCESS);
  for (int j = 0; j < n; ++j) {
    double ref = 1.0;
    for (int i = 0; i < m; ++i)
      ref += a[static_cast<std::size_t>(i * lda + j)] * x_m[static_cast<std::size_t>(i)];
    CHECK(y_n[static_cast<std::size_t>(j)] == Approx(ref).epsilon(1e-14));
  }
  for (int i = 0; i < m; ++i) {
    double ref = 0.0;
    for (int j = 0; j < n; ++j)
      ref += a[static_cast<std::size_t>(i * lda + j)] * x_n[static_cast<std::size_t>(j)];
    CHECK(y_m[static_cast<std::size_t>(i)] == Approx(ref).epsilon(1e-14));
  }
}

TEST_CASE("kernels live in a versioned inline namespace", "[cuda][host]") {
#define DIFFGRAD_TEST_STR_(x) #x
#define DIFFGRAD_TEST_STR(x) DIFFGRAD_TEST_STR_(x)
  const std::string ns = DIFFGRAD_TEST_STR(DIFFGRAD_CUDA_ABI_NAMESPACE);
  CHECK(ns == diffgrad::detail::concat("v", DIFFGRAD_VERSION_MAJOR, "_", DIFFGRAD_VERSION_MINOR,
                                       "_", DIFFGRAD_VERSION_PATCH));
  // The inline namespace is part of the mangled name, so two library versions never share
  // a kernel symbol.
  const std::string mangled = typeid(dc::CudaBackend<float>).name();
  CHECK(mangled.find(ns) != std::string::npos);
}

TEST_CASE("structured lincomb: argument checks on the host, before any device call",
          "[cuda][host][errors][structured]") {
  // States with zero rows allocate nothing, so the shape checks run without a device.
  using State = dc::DeviceState<double>;
  const dc::CudaBackend<double> backend;
  State odd(0, 3), even(0, 4), out;
  const std::vector<LinTerm<State, Block2>> odd_terms{{Block2::identity(), &odd}};
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, Block2>>(odd_terms)),
                    Catch::Contains("CudaBackend::lincomb") && Catch::Contains("even width") &&
                        Catch::Contains("got width 3"));
  CHECK(out.dim() == 0); // a refused call leaves out as it was
  const std::vector<LinTerm<State, Block2>> mixed{{Block2::identity(), &even},
                                                  {Block2::scalar(2.0), &odd}};
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, Block2>>(mixed)),
                    Catch::Contains("'terms[1]'") && Catch::Contains("0 x 4") &&
                        Catch::Contains("got 0 x 3"));
  const std::vector<LinTerm<State, ColumnCoeff>> none;
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(none)),
                    Catch::Contains("1..9 terms") && Catch::Contains("got 0"));
  const std::vector<LinTerm<State, ColumnCoeff>> ten(10, {ColumnCoeff::identity(), &even});
  CHECK_THROWS_AS(backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(ten)),
                  diffgrad::invalid_argument);
  // A valid call on empty states: out takes the terms' shape, no kernel is launched.
  const std::vector<LinTerm<State, ColumnCoeff>> one{{ColumnCoeff::scalar(2.0), &odd}};
  backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(one),
                  BasicNoiseTerm<ColumnCoeff>{ColumnCoeff::scalar(1.0), 1, 2, 3});
  CHECK(out.batch() == 0);
  CHECK(out.dim() == 3);
  // Raw launchers: status codes, checked before any launch.
  alignas(16) double raw[8] = {};
  const dc::Block2Term<double> block{Block2::identity(), raw};
  CHECK(dc::lincomb_block2(raw + 1, 1, 2, nullptr,
                           std::span<const dc::Block2Term<double>>(&block, 1)) ==
        cudaErrorMisalignedAddress);
  CHECK(dc::lincomb_block2(raw, 1, 2, nullptr, std::span<const dc::Block2Term<double>>()) ==
        cudaErrorInvalidValue);
  const dc::ColumnTerm<double> column{ColumnCoeff::identity(), raw + 1};
  CHECK(dc::lincomb_columns(raw, 4, 2, nullptr,
                            std::span<const dc::ColumnTerm<double>>(&column, 1)) ==
        cudaErrorMisalignedAddress);
  CHECK(dc::lincomb_columns(raw, 5, 2, nullptr,
                            std::span<const dc::ColumnTerm<double>>(&column, 1)) ==
        cudaErrorInvalidValue); // 5 elements are not rows of width 2
  // An empty coefficient table needs no device; copies share their table.
  const auto table = backend.make_coefficients(std::span<const double>());
  CHECK(table.empty());
  CHECK(dc::CudaBackend<double>::coefficient_data(table) == nullptr);
  const auto copy = table;
  CHECK(copy.data() == table.data());
}

TEST_CASE("argument checks fire on the host, before any device call", "[cuda][host][errors]") {
  const dc::CudaBackend<double> backend; // constructing touches no device
  CHECK_THROWS_AS(backend.make_state(-1, 3), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(backend.make_vector(-2), Catch::Contains("make_vector") &&
                                                 Catch::Contains("'size'") &&
                                                 Catch::Contains("non-negative"));
  const std::vector<double> host(5, 1.0);
  CHECK_THROWS_WITH(dc::to_device<double>(std::span<const double>(host), 2, 3),
                    Catch::Contains("to_device") && Catch::Contains("2 x 3") &&
                        Catch::Contains("got 5"));
  dc::DeviceState<double> a, b; // empty states: no allocation
  const std::vector<LinTerm<dc::DeviceState<double>>> none;
  CHECK_THROWS_WITH(backend.lincomb(a, std::span<const LinTerm<dc::DeviceState<double>>>(none)),
                    Catch::Contains("lincomb") && Catch::Contains("1..9 terms"));
  std::vector<LinTerm<dc::DeviceState<double>>> ten(10, LinTerm<dc::DeviceState<double>>{1.0, &b});
  CHECK_THROWS_AS(backend.lincomb(a, std::span<const LinTerm<dc::DeviceState<double>>>(ten)),
                  diffgrad::invalid_argument);
  // Misaligned raw pointers are refused with a status code (checked on the host).
  alignas(16) float raw[8] = {};
  CHECK(dc::lincomb(raw + 1, 4, nullptr, dc::Term<float>{1.0, raw}) == cudaErrorMisalignedAddress);
  CHECK(dc::fill(raw + 1, 4, 1.0f, nullptr) == cudaErrorMisalignedAddress);
  // Failed CUDA status -> cuda_error naming the place, the operation and the error.
  CHECK_THROWS_WITH(dc::check(cudaErrorInvalidValue, "CudaBackend::copy", "cudaMemcpyAsync"),
                    Catch::Contains("CudaBackend::copy") && Catch::Contains("cudaMemcpyAsync") &&
                        Catch::Contains("cudaErrorInvalidValue"));
  CHECK(dc::device_count() >= 0); // never throws, also without a driver
}

// --- index maps: the Collage combinator's gather / scatter_add (index_map.cuh) ---------------

namespace {

/// Index maps exercising what the kernels must get right: overlapping chain pieces with an
/// uncovered column, a cycle whose last piece wraps (indices not increasing within a piece),
/// five pieces all covering one column at different positions with non-unit weights, and
/// width-1 pieces on a single column.
std::vector<IndexMap> index_map_cases() {
  return {
      IndexMap(11, 4, {0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9}, {1.0, -0.5, 1.0}),
      IndexMap(9, 4, {0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 0}),
      IndexMap(5, 3, {2, 0, 4, 1, 2, 3, 4, 3, 2, 2, 1, 0, 0, 4, 2},
               {0.3, -1.7, 2.5, 1.0 / 3.0, 0.1}),
      IndexMap(1, 1, {0, 0, 0}, {0.7, 1.0, -2.0}),
  };
}

/// The host view of a map: its own arrays and the inverse of invert_index_map.
struct HostIndexMap {
  dc::InverseIndexMap inverse;
  dc::IndexMapView view;
  explicit HostIndexMap(const IndexMap& map) : inverse(dc::invert_index_map(map)) {
    view.indices = map.indices().data();
    view.weights = map.weights().data();
    view.offsets = inverse.offsets.data();
    view.positions = inverse.positions.data();
    view.entry_pieces = inverse.pieces.data();
    view.dim = map.dim();
    view.width = map.width();
    view.pieces = map.pieces();
  }
};

template <class Scalar>
std::vector<double> run_gather_functor(const IndexMap& map, const std::vector<double>& big,
                                       int batch, double scale, PieceWeights weights) {
  const HostIndexMap host(map);
  std::vector<Scalar> x(big.begin(), big.end());
  for (std::size_t i = 0; i < big.size(); ++i) x[i] = static_cast<Scalar>(big[i]);
  std::vector<Scalar> pieces(static_cast<std::size_t>(batch * map.pieces() * map.width()),
                             Scalar(-99));
  dc::run_for_each_on_host(dc::GatherFunctor<Scalar>{pieces.data(), x.data(), host.view, scale,
                                                     weights == PieceWeights::apply},
                           static_cast<std::int64_t>(pieces.size()));
  return std::vector<double>(pieces.begin(), pieces.end());
}

template <class Scalar>
std::vector<double> run_scatter_functor(const IndexMap& map, const std::vector<double>& pieces,
                                        const std::vector<double>& big, int batch, double scale,
                                        PieceWeights weights) {
  const HostIndexMap host(map);
  std::vector<Scalar> src(pieces.size()), x(big.size());
  for (std::size_t i = 0; i < pieces.size(); ++i) src[i] = static_cast<Scalar>(pieces[i]);
  for (std::size_t i = 0; i < big.size(); ++i) x[i] = static_cast<Scalar>(big[i]);
  dc::run_for_each_on_host(dc::ScatterAddFunctor<Scalar>{x.data(), src.data(), host.view, scale,
                                                         weights == PieceWeights::apply},
                           static_cast<std::int64_t>(batch) * map.dim());
  return std::vector<double>(x.begin(), x.end());
}

/// Inputs rounded to the precision, so the dense references below see the exact operands.
std::vector<double> rounded(std::vector<double> v, Precision p) {
  if (p == Precision::f32)
    for (double& x : v) x = static_cast<double>(static_cast<float>(x));
  return v;
}

} // namespace

TEST_CASE("invert_index_map: per column, the piece elements landing on it in increasing p",
          "[cuda][host][collage]") {
  // Map 3 of index_map_cases: column 2 is position 0 of piece 0, 1 of piece 1, 2 of piece 2,
  // 0 of piece 3 and 2 of piece 4 (flat positions p * 3 + k: 0, 4, 8, 9, 14).
  const IndexMap map(5, 3, {2, 0, 4, 1, 2, 3, 4, 3, 2, 2, 1, 0, 0, 4, 2});
  const dc::InverseIndexMap inv = dc::invert_index_map(map);
  // Column counts: 0 -> 3, 1 -> 2, 2 -> 5, 3 -> 2, 4 -> 3.
  CHECK(inv.offsets == std::vector<std::int64_t>{0, 3, 5, 10, 12, 15});
  const std::vector<std::int64_t> column2(inv.positions.begin() + 5, inv.positions.begin() + 10);
  CHECK(column2 == std::vector<std::int64_t>{0, 4, 8, 9, 14});
  const std::vector<std::int64_t> pieces2(inv.pieces.begin() + 5, inv.pieces.begin() + 10);
  CHECK(pieces2 == std::vector<std::int64_t>{0, 1, 2, 3, 4});
  // Column 0: piece 0 position 1, piece 3 position 2, piece 4 position 0.
  CHECK(std::vector<std::int64_t>(inv.positions.begin(), inv.positions.begin() + 3) ==
        std::vector<std::int64_t>{1, 11, 12});
}

TEST_CASE("gather / scatter_add functors == EigenBackend bit for bit and the dense formula",
          "[cuda][host][collage]") {
  // Also against dense references in double (u: the unit roundoff of the precision): a
  // gathered value rounds c_p and c_p x, so it is within 3u (relative); a scattered element
  // sums up to P + 1 terms with up to two roundings each, so it is within (P + 3) u times
  // |big| + sum |terms|. Bounds that any wrong index, weight or scale violates.
  for (Precision p : {Precision::f64, Precision::f32}) {
    const double u = unit_roundoff(p);
    for (const IndexMap& map : index_map_cases()) {
      for (int batch : {1, 3}) {
        const auto dim = static_cast<std::size_t>(map.dim());
        const auto n = static_cast<std::size_t>(map.width());
        const auto pc = static_cast<std::size_t>(map.pieces());
        const auto rows = static_cast<std::size_t>(batch);
        const auto big = rounded(host_values(rows * dim, 0.4), p);
        const auto pieces = rounded(host_values(rows * pc * n, 1.1), p);
        for (double scale : {1.0, 0.7, -1.3}) {
          for (PieceWeights weights : {PieceWeights::ignore, PieceWeights::apply}) {
            INFO((p == Precision::f64 ? "double" : "float")
                 << ", D = " << dim << ", n = " << n << ", P = " << pc << ", batch " << batch
                 << ", scale " << scale << ", weights "
                 << (weights == PieceWeights::apply ? "applied" : "ignored"));
            const auto c = [&](std::size_t piece) {
              return weights == PieceWeights::apply
                         ? scale * map.weight(static_cast<std::int64_t>(piece))
                         : scale;
            };
            // gather
            const auto got_g = p == Precision::f64
                                   ? run_gather_functor<double>(map, big, batch, scale, weights)
                                   : run_gather_functor<float>(map, big, batch, scale, weights);
            CHECK(testing::bitwise_mismatches(
                      got_g, testing::cpu_gather(p, map, big, batch, scale, weights)) == 0);
            std::size_t gather_violations = 0;
            for (std::size_t b = 0; b < rows; ++b)
              for (std::size_t q = 0; q < pc; ++q)
                for (std::size_t k = 0; k < n; ++k) {
                  const auto col = static_cast<std::size_t>(
                      map.index(static_cast<std::int64_t>(q), static_cast<std::int64_t>(k)));
                  const double ref = c(q) * big[b * dim + col];
                  const double got = got_g[(b * pc + q) * n + k];
                  if (std::abs(got - ref) > 3.0 * u * std::abs(ref)) ++gather_violations;
                }
            CHECK(gather_violations == 0);
            // scatter_add
            const auto got_s =
                p == Precision::f64
                    ? run_scatter_functor<double>(map, pieces, big, batch, scale, weights)
                    : run_scatter_functor<float>(map, pieces, big, batch, scale, weights);
            CHECK(testing::bitwise_mismatches(
                      got_s,
                      testing::cpu_scatter_add(p, map, pieces, big, batch, scale, weights)) == 0);
            std::vector<double> ref = big, magnitude(big.size());
            for (std::size_t i = 0; i < big.size(); ++i) magnitude[i] = std::abs(big[i]);
            for (std::size_t b = 0; b < rows; ++b)
              for (std::size_t q = 0; q < pc; ++q)
                for (std::size_t k = 0; k < n; ++k) {
                  const auto col = static_cast<std::size_t>(
                      map.index(static_cast<std::int64_t>(q), static_cast<std::int64_t>(k)));
                  const double term = c(q) * pieces[(b * pc + q) * n + k];
                  ref[b * dim + col] += term;
                  magnitude[b * dim + col] += std::abs(term);
                }
            std::size_t scatter_violations = 0;
            for (std::size_t i = 0; i < ref.size(); ++i)
              if (std::abs(got_s[i] - ref[i]) > (static_cast<double>(pc) + 3.0) * u * magnitude[i])
                ++scatter_violations;
            CHECK(scatter_violations == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("scatter_add functor leaves columns no piece covers untouched, NaN included",
          "[cuda][host][collage]") {
  // Map 1 of index_map_cases covers columns 0..9 of 11: column 10 keeps its bits, even NaN.
  const IndexMap map(11, 4, {0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9});
  std::vector<double> big(11, 1.0);
  big[10] = std::numeric_limits<double>::quiet_NaN();
  const auto got = run_scatter_functor<double>(map, std::vector<double>(12, 0.5), big, 1, 1.0,
                                               PieceWeights::apply);
  CHECK(std::isnan(got[10]));
  CHECK(got[0] == 1.5);
  CHECK(got[3] == 2.0); // pieces 0 and 1 overlap on column 3
}

TEST_CASE("CudaBackend gather / scatter_add: argument checks on the host, before any device call",
          "[cuda][host][collage][errors]") {
  const dc::CudaBackend<double> backend;
  const auto empty = backend.make_index_map(IndexMap{}); // P = 0: no upload
  CHECK(empty.pieces() == 0);
  dc::DeviceState<double> big, pieces;
  CHECK_THROWS_WITH(backend.gather(big, empty, pieces), Catch::Contains("CudaBackend::gather") &&
                                                            Catch::Contains("'map'") &&
                                                            Catch::Contains("a built IndexMap"));
  CHECK_THROWS_WITH(backend.scatter_add(pieces, empty, 1.0, big),
                    Catch::Contains("CudaBackend::scatter_add") && Catch::Contains("'map'"));
}

TEST_CASE("the CPU half of the Collage GPU case runs and is finite", "[cuda][host][collage]") {
  // collage_cases.hpp on EigenBackend: every part present, of the right size, finite, and
  // the gradient's x0 is the DDIM sample (same scheme, grid and x_T).
  const testing::CollageProblem cp;
  const testing::Parts parts = testing::cpu_collage_case(cp);
  REQUIRE(parts.size() == 8);
  const auto size = static_cast<std::size_t>(cp.batch * cp.dim());
  for (const auto& [name, values] : parts) {
    INFO(name);
    CHECK(values.size() == (name == "gradient loss" ? 1 : size));
    for (double v : values) CHECK(std::isfinite(v));
  }
  CHECK(parts[2].first == "DDIM sample");
  CHECK(parts[5].first == "gradient x0");
  CHECK(testing::bitwise_mismatches(parts[2].second, parts[5].second) == 0);
}
