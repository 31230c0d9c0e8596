// GPU: the index-map operations of the Collage combinator (index_map.cuh) on CudaBackend vs
// EigenBackend, bit for bit: gather and the atomic-free scatter_add over overlapping chains,
// a wrapping loop, many pieces on one column, weights, scales, odd sizes and a batch large
// enough for many blocks; the device map's argument checks; and the Collage combinator of
// device Dirac mixtures through the samplers and the gradient vs the CPU (collage_cases.hpp).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "collage_cases.hpp"
#include "cpu_reference_collage.hpp"
#include "cuda_io.cuh"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/backend/index_map.hpp"

using namespace diffgrad;
using namespace diffgrad::testing;

namespace {

std::vector<double> values(std::size_t n, double phase) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = std::sin(0.37 * static_cast<double>(i) + phase) * (1.0 + phase);
  return v;
}

/// A chain of `count` pieces of width n with stride s over D = (count - 1) s + n + extra
/// columns (the last `extra` uncovered), weights alternating 1 and 1 - 2 = -1 as a strip's
/// factors and separators would, scaled by a non-representable factor.
IndexMap chain_map(std::int64_t count, std::int64_t n, std::int64_t stride, std::int64_t extra) {
  std::vector<std::int64_t> idx;
  std::vector<double> w;
  for (std::int64_t p = 0; p < count; ++p) {
    for (std::int64_t k = 0; k < n; ++k) idx.push_back(p * stride + k);
    w.push_back(p % 2 == 0 ? 1.1 : -0.3);
  }
  return IndexMap((count - 1) * stride + n + extra, n, idx, w);
}

/// A loop: `count` pieces of width n with stride s over D = count * s columns, the last
/// pieces wrapping around to column 0.
IndexMap loop_map(std::int64_t count, std::int64_t n, std::int64_t stride) {
  const std::int64_t dim = count * stride;
  std::vector<std::int64_t> idx;
  for (std::int64_t p = 0; p < count; ++p)
    for (std::int64_t k = 0; k < n; ++k) idx.push_back((p * stride + k) % dim);
  return IndexMap(dim, n, idx);
}

std::vector<IndexMap> maps() {
  return {chain_map(5, 7, 4, 3), loop_map(6, 5, 3),
          IndexMap(5, 3, {2, 0, 4, 1, 2, 3, 4, 3, 2, 2, 1, 0, 0, 4, 2},
                   {0.3, -1.7, 2.5, 1.0 / 3.0, 0.1}),
          IndexMap(1, 1, {0, 0, 0}, {0.7, 1.0, -2.0}), chain_map(40, 33, 29, 0)};
}

template <class Scalar> Precision precision_of() {
  return sizeof(Scalar) == 8 ? Precision::f64 : Precision::f32;
}

template <class Scalar> void index_maps_match_cpu() {
  const gpu::CudaBackend<Scalar> backend;
  const CudaIO<Scalar> io;
  const Precision p = precision_of<Scalar>();
  for (const IndexMap& map : maps()) {
    const auto device_map = backend.make_index_map(map);
    REQUIRE(device_map.pieces() == map.pieces());
    for (int batch : {1, 3, 257}) {
      const auto rows = static_cast<std::size_t>(batch);
      const auto big = values(rows * static_cast<std::size_t>(map.dim()), 0.4);
      const auto pieces = values(rows * static_cast<std::size_t>(map.pieces() * map.width()), 1.1);
      const auto x = io.state(backend, big, batch, static_cast<int>(map.dim()));
      const auto src = io.state(backend, pieces, batch * static_cast<int>(map.pieces()),
                                static_cast<int>(map.width()));
      for (double scale : {1.0, 0.7, -1.3}) {
        for (PieceWeights weights : {PieceWeights::ignore, PieceWeights::apply}) {
          INFO((sizeof(Scalar) == 8 ? "double" : "float")
               << ", D = " << map.dim() << ", n = " << map.width() << ", P = " << map.pieces()
               << ", batch " << batch << ", scale " << scale << ", weights "
               << (weights == PieceWeights::apply ? "applied" : "ignored"));
          gpu::DeviceState<Scalar> gathered; // empty: gather gives it the (B*P) x n shape
          backend.gather(x, device_map, gathered, scale, weights);
          CHECK(gathered.batch() == batch * map.pieces());
          CHECK(gathered.dim() == map.width());
          CHECK(bitwise_mismatches(io.host(gathered),
                                   cpu_gather(p, map, big, batch, scale, weights)) == 0);
          auto target = io.state(backend, big, batch, static_cast<int>(map.dim()));
          backend.scatter_add(src, device_map, scale, target, weights);
          CHECK(bitwise_mismatches(io.host(target), cpu_scatter_add(p, map, pieces, big, batch,
                                                                    scale, weights)) == 0);
        }
      }
    }
  }
}

} // namespace

TEST_CASE("CudaBackend gather / scatter_add == EigenBackend bit for bit (double)",
          "[gpu][collage]") {
  index_maps_match_cpu<double>();
}

TEST_CASE("CudaBackend gather / scatter_add == EigenBackend bit for bit (float)",
          "[gpu][collage]") {
  index_maps_match_cpu<float>();
}

TEST_CASE("scatter_add after gather with equal scale and weights is the transpose (adjoint)",
          "[gpu][collage]") {
  // <gather(x), y> = <x, scatter_add(y)> for scatter into zero: the identity the composed
  // model's VJP relies on; checked on device results with dot in double. The 120 products
  // cancel (sum of |products| ~ 21 |sum|, computed on the CPU), and the two sums round in
  // different orders, so the tolerance is 1e-11 relative (rounding: <= ~1e-13).
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  const IndexMap map = loop_map(6, 5, 3);
  const auto dm = backend.make_index_map(map);
  const int batch = 4;
  const auto x = io.state(backend, values(static_cast<std::size_t>(batch * map.dim()), 0.2), batch,
                          static_cast<int>(map.dim()));
  const auto y =
      io.state(backend, values(static_cast<std::size_t>(batch * map.pieces() * map.width()), 0.9),
               batch * static_cast<int>(map.pieces()), static_cast<int>(map.width()));
  gpu::DeviceState<double> gx;
  backend.gather(x, dm, gx, 0.8, PieceWeights::apply);
  auto sy = backend.make_state(batch, map.dim());
  backend.scatter_add(y, dm, 0.8, sy, PieceWeights::apply);
  const double lhs = backend.dot(gx, y), rhs = backend.dot(x, sy);
  CHECK(std::abs(lhs) > 1.0); // the identity is not checked on a vanishing sum
  CHECK(std::abs(lhs - rhs) <= 1e-11 * std::abs(lhs));
}

TEST_CASE("CudaBackend gather / scatter_add refuse wrong shapes with a clear error",
          "[gpu][collage][errors]") {
  const gpu::CudaBackend<double> backend;
  const IndexMap map = chain_map(3, 4, 3, 0); // D = 10, n = 4, P = 3
  const auto dm = backend.make_index_map(map);
  auto wrong_big = backend.make_state(2, 9);
  gpu::DeviceState<double> pieces;
  CHECK_THROWS_WITH(backend.gather(wrong_big, dm, pieces),
                    Catch::Contains("CudaBackend::gather") && Catch::Contains("'big'") &&
                        Catch::Contains("D = 10") && Catch::Contains("9 columns"));
  auto big = backend.make_state(2, 10);
  CHECK_THROWS_WITH(backend.gather(big, dm, big), Catch::Contains("'pieces'"));
  auto wrong_pieces = backend.make_state(5, 4);
  CHECK_THROWS_WITH(backend.scatter_add(wrong_pieces, dm, 1.0, big),
                    Catch::Contains("CudaBackend::scatter_add") && Catch::Contains("'pieces'") &&
                        Catch::Contains("6 x 4") && Catch::Contains("5 x 4"));
}

TEST_CASE("Collage of device Dirac mixtures through sample and gradient == the CPU",
          "[gpu][collage][models]") {
  // A chain of windows with window and overlap models (collage_cases.hpp): eps, VJP, DDIM,
  // DDIM eta = 1, DPM-Solver++(2M) and the DDIM gradient w.r.t. x_T agree with the CPU run
  // within agreement_tolerance(f64) = 1e-12 (max-norm relative): the device Dirac mixture
  // agrees with the CPU one to rounding (exp in CUDA's math library), gather / scatter_add
  // bit for bit.
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  const auto make_dirac = [](const gpu::CudaBackend<double>& b, const std::vector<double>& points,
                             int k, int width, const std::vector<double>& weights,
                             const std::vector<double>& cond) {
    models::gpu::DiracMixture<double> m(b, points, k, width, weights);
    set_device_vector(m.cond(), cond);
    return m;
  };
  const Parts gpu_parts = collage_case(backend, io, make_dirac);
  const Parts cpu_parts = cpu_collage_case();
  print_agreement(
      "Collage (chain of 4 windows), double",
      check_parts(gpu_parts, cpu_parts, agreement_tolerance(Precision::f64), "collage"));
}
