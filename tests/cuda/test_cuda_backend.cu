// GPU: CudaBackend's operations against EigenBackend, Philox noise bit for bit (also at row
// offsets), the structured lincombs (2x2 blocks, per-column tables) bit for bit, reductions,
// state semantics, streams, counted passes, and the cuBLAS models (Dirac mixture, MLP) against
// the CPU models plus a device-only finite-difference check of the Dirac VJP.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "cuda_io.cuh"
#include "diffgrad/backend/counting_backend.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"

using namespace diffgrad;
using namespace diffgrad::testing;

namespace {

std::vector<double> values(std::size_t n, double phase) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = std::sin(0.37 * static_cast<double>(i) + phase) * (1.0 + phase);
  return v;
}

template <class Scalar> Precision precision_of() {
  return sizeof(Scalar) == 8 ? Precision::f64 : Precision::f32;
}

/// Device lincomb through the runtime-arity form (what the engines call), vs EigenBackend.
template <class Scalar> void lincomb_matches_cpu(int batch, int dim) {
  using State = gpu::DeviceState<Scalar>;
  const gpu::CudaBackend<Scalar> backend;
  const CudaIO<Scalar> io;
  const auto size = static_cast<std::size_t>(batch) * static_cast<std::size_t>(dim);
  for (int n = 1; n <= kMaxLincombTerms; ++n) {
    for (bool noise : {false, true}) {
      std::vector<double> coeffs;
      std::vector<std::vector<double>> inputs;
      std::vector<State> xs;
      for (int k = 0; k < n; ++k) {
        coeffs.push_back(0.3 + 0.7 * k - 0.11 * k * k);
        inputs.push_back(values(size, 0.25 * k));
        xs.push_back(io.state(backend, inputs.back(), batch, dim));
      }
      std::vector<LinTerm<State>> terms;
      for (int k = 0; k < n; ++k)
        terms.push_back(
            LinTerm<State>{coeffs[static_cast<std::size_t>(k)], &xs[static_cast<std::size_t>(k)]});
      const double nc = noise ? -0.61 : 0.0;
      State out = backend.make_state(batch, dim);
      backend.lincomb(out, std::span<const LinTerm<State>>(terms), NoiseTerm{nc, 5, 17});
      const auto expected =
          cpu_lincomb(precision_of<Scalar>(), coeffs, inputs, nc, 5, 17, batch, dim);
      INFO(sizeof(Scalar) * 8 << "-bit, " << batch << " x " << dim << ", " << n << " terms, noise "
                              << noise);
      CHECK(bitwise_mismatches(io.host(out), expected) == 0);
    }
  }
}

} // namespace

TEST_CASE("device lincomb == EigenBackend::lincomb bit for bit (every arity, noise, tails)",
          "[gpu][backend][lincomb]") {
  for (auto [b, d] : {std::pair{1, 1}, std::pair{3, 5}, std::pair{7, 13}, std::pair{64, 33},
                      std::pair{1000, 257}}) {
    lincomb_matches_cpu<double>(b, d);
    lincomb_matches_cpu<float>(b, d);
  }
}

TEST_CASE("variadic lincomb: arity 12, output aliasing an input, reallocation",
          "[gpu][backend][lincomb]") {
  using State = gpu::DeviceState<double>;
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  const int batch = 4, dim = 9;
  const auto size = static_cast<std::size_t>(batch * dim);
  std::vector<State> x;
  std::vector<std::vector<double>> h;
  for (int k = 0; k < 12; ++k) {
    h.push_back(values(size, 0.1 * k));
    x.push_back(io.state(backend, h.back(), batch, dim));
  }
  State out; // empty: lincomb gives it the inputs' shape
  backend.lincomb(out, term(1.0, x[0]), term(0.5, x[1]), term(-1.5, x[2]), term(2.0, x[3]),
                  term(0.25, x[4]), term(-0.75, x[5]), term(1.0, x[6]), term(3.0, x[7]),
                  term(-2.0, x[8]), term(0.125, x[9]), term(0.5, x[10]), term(-1.0, x[11]));
  REQUIRE(out.batch() == batch);
  REQUIRE(out.dim() == dim);
  const double c[12] = {1.0, 0.5, -1.5, 2.0, 0.25, -0.75, 1.0, 3.0, -2.0, 0.125, 0.5, -1.0};
  const auto got = io.host(out);
  for (std::size_t i = 0; i < size; ++i) {
    volatile double acc = c[0] * h[0][i];
    for (std::size_t k = 1; k < 12; ++k) {
      volatile double prod = c[k] * h[k][i];
      acc = acc + prod;
    }
    CHECK(got[i] == acc);
  }
  // out aliases an input: x0 <- 2 x0 - x1, elementwise in place.
  backend.lincomb(x[0], term(2.0, x[0]), term(-1.0, x[1]));
  const auto aliased = io.host(x[0]);
  for (std::size_t i = 0; i < size; ++i) CHECK(aliased[i] == 2.0 * h[0][i] - h[1][i]);
  // Mismatched shapes are refused.
  const State wrong = backend.make_state(batch + 1, dim);
  CHECK_THROWS_AS(backend.lincomb(out, term(1.0, x[0]), term(1.0, wrong)),
                  diffgrad::invalid_argument);
}

TEST_CASE("Philox noise on the device is bit-identical to the CPU's", "[gpu][backend][philox]") {
  for (auto [b, d] : {std::pair{1, 1}, std::pair{1, 3}, std::pair{5, 7}, std::pair{1000, 1003}}) {
    for (std::uint64_t step : {std::uint64_t{0}, std::uint64_t{3}, (std::uint64_t{1} << 40) + 5}) {
      const auto size = static_cast<std::size_t>(b) * static_cast<std::size_t>(d);
      gpu::DeviceState<double> xd(b, d);
      gpu::DeviceState<float> xf(b, d);
      gpu::CudaBackend<double>{}.gaussian(xd, 42, step);
      gpu::CudaBackend<float>{}.gaussian(xf, 42, step);
      const auto hd = gpu::to_host(xd);
      const auto hf = gpu::to_host(xf);
      std::size_t bad_d = 0, bad_f = 0;
      for (std::size_t i = 0; i < size; ++i) {
        const double g = detail::gaussian(42, step, i);
        bad_d += hd[i] != g;
        bad_f += hf[i] != static_cast<float>(g);
      }
      INFO(b << " x " << d << ", step " << step);
      CHECK(bad_d == 0);
      CHECK(bad_f == 0);
      CHECK(bitwise_mismatches(CudaIO<double>{}.host(xd),
                               cpu_lincomb(Precision::f64, {}, {}, 1.0, 42, step, b, d)) == 0);
    }
  }
}

TEST_CASE("device noise honours NoiseTerm::row_offset; shards reproduce the whole batch",
          "[gpu][backend][philox]") {
  // Element (r, c) draws gaussian(seed, step, (row_offset + r) d + c), bit-identical to the CPU.
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  for (auto [b, d] : {std::pair{3, 5}, std::pair{4, 4}, std::pair{257, 33}}) {
    for (std::uint64_t row_offset : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{1} << 33}) {
      const auto size = static_cast<std::size_t>(b) * static_cast<std::size_t>(d);
      const std::vector<double> c{0.5, -2.0};
      const std::vector<std::vector<double>> in{values(size, 0.1), values(size, 0.7)};
      auto x0 = io.state(backend, in[0], b, d), x1 = io.state(backend, in[1], b, d);
      const std::vector<LinTerm<gpu::DeviceState<double>>> terms{{c[0], &x0}, {c[1], &x1}};
      auto out = backend.make_state(b, d);
      backend.lincomb(out, std::span<const LinTerm<gpu::DeviceState<double>>>(terms),
                      NoiseTerm{0.3, 8, 2, row_offset});
      INFO(b << " x " << d << ", row_offset " << row_offset);
      CHECK(bitwise_mismatches(io.host(out), cpu_lincomb(Precision::f64, c, in, 0.3, 8, 2, b, d,
                                                         row_offset)) == 0);
    }
  }
  // Rows [0, 2) at offset 0 and rows [2, 7) at offset 2 draw the noise of the 7-row batch.
  const int d = 3;
  gpu::DeviceState<double> whole(7, d), head(2, d), tail(5, d);
  backend.lincomb(whole, NoiseTerm{1.0, 4, 9, 0});
  backend.lincomb(head, NoiseTerm{1.0, 4, 9, 0});
  backend.lincomb(tail, NoiseTerm{1.0, 4, 9, 2});
  auto sharded = io.host(head);
  const auto rest = io.host(tail);
  sharded.insert(sharded.end(), rest.begin(), rest.end());
  CHECK(bitwise_mismatches(sharded, io.host(whole)) == 0);
}

namespace {

std::vector<Block2> device_test_blocks(std::size_t n) {
  std::vector<Block2> b;
  for (std::size_t t = 0; t < n; ++t) {
    const double s = static_cast<double>(t);
    b.push_back({0.9 - 0.2 * s, 0.35 + 0.1 * s, -0.6 + 0.15 * s, 1.1 - 0.05 * s * s});
  }
  return b;
}

/// Device Block2 lincomb (span form, as the engines call it) vs EigenBackend, bit for bit;
/// also with out aliasing the first term.
template <class Scalar> void block2_matches_cpu(int batch, int d, std::size_t n) {
  using State = gpu::DeviceState<Scalar>;
  const gpu::CudaBackend<Scalar> backend;
  const CudaIO<Scalar> io;
  const int width = 2 * d;
  const auto size = static_cast<std::size_t>(batch) * static_cast<std::size_t>(width);
  const std::vector<Block2> coeffs = device_test_blocks(n);
  std::vector<std::vector<double>> inputs;
  std::vector<State> xs;
  for (std::size_t t = 0; t < n; ++t) {
    inputs.push_back(values(size, 0.45 * static_cast<double>(t) + 0.1));
    xs.push_back(io.state(backend, inputs.back(), batch, width));
  }
  std::vector<LinTerm<State, Block2>> terms;
  for (std::size_t t = 0; t < n; ++t) terms.push_back({coeffs[t], &xs[t]});
  for (std::uint64_t row_offset : {std::uint64_t{0}, std::uint64_t{5}}) {
    for (bool noisy : {false, true}) {
      const BasicNoiseTerm<Block2> noise =
          noisy ? BasicNoiseTerm<Block2>{Block2{0.3, -0.1, 0.12, 0.2}, 9, 4, row_offset}
                : BasicNoiseTerm<Block2>{};
      const auto expected =
          cpu_lincomb_block2(precision_of<Scalar>(), coeffs, inputs, noise, batch, width);
      State out; // empty: takes the terms' shape
      backend.lincomb(out, std::span<const LinTerm<State, Block2>>(terms), noise);
      INFO(sizeof(Scalar) * 8 << "-bit, " << batch << " x " << width << ", " << n
                              << " terms, noise " << noisy << ", row_offset " << row_offset);
      REQUIRE(out.batch() == batch);
      REQUIRE(out.dim() == width);
      CHECK(bitwise_mismatches(io.host(out), expected) == 0);
      State aliased = xs[0];
      std::vector<LinTerm<State, Block2>> in_place = terms;
      in_place[0].vec = &aliased;
      backend.lincomb(aliased, std::span<const LinTerm<State, Block2>>(in_place), noise);
      CHECK(bitwise_mismatches(io.host(aliased), expected) == 0);
    }
  }
}

/// Device ColumnCoeff lincomb with a device table (make_coefficients) vs EigenBackend with
/// the same host table, bit for bit; also with out aliasing a term.
template <class Scalar> void columns_match_cpu(int batch, int width) {
  using State = gpu::DeviceState<Scalar>;
  using B = gpu::CudaBackend<Scalar>;
  const B backend;
  const CudaIO<Scalar> io;
  const auto w = static_cast<std::size_t>(width);
  const auto size = static_cast<std::size_t>(batch) * w;
  std::vector<double> host_table(4 * w);
  for (std::size_t i = 0; i < host_table.size(); ++i)
    host_table[i] = 0.5 + 0.4 * std::cos(0.8 * static_cast<double>(i) + 0.3);
  const auto table = backend.make_coefficients(host_table); // uploaded once, before any "loop"
  const auto coeff = [&](const ColumnSpec& c) {
    return ColumnCoeff{c.offset < 0 ? nullptr : B::coefficient_data(table) + c.offset, c.scale};
  };
  const std::vector<ColumnSpec> specs{{0, 1.5}, {-1, -0.35}, {static_cast<std::int64_t>(w), 0.75}};
  std::vector<std::vector<double>> inputs;
  std::vector<State> xs;
  for (std::size_t t = 0; t < specs.size(); ++t) {
    inputs.push_back(values(size, 0.6 * static_cast<double>(t) + 0.2));
    xs.push_back(io.state(backend, inputs.back(), batch, width));
  }
  std::vector<LinTerm<State, ColumnCoeff>> terms;
  for (std::size_t t = 0; t < specs.size(); ++t) terms.push_back({coeff(specs[t]), &xs[t]});
  for (std::uint64_t row_offset : {std::uint64_t{0}, std::uint64_t{1}}) {
    for (const ColumnSpec noise :
         {ColumnSpec{-1, 0.0}, ColumnSpec{static_cast<std::int64_t>(3 * w), 0.5},
          ColumnSpec{-1, -0.3}}) {
      const auto expected = cpu_lincomb_columns(precision_of<Scalar>(), host_table, specs, inputs,
                                                noise, 13, 6, row_offset, batch, width);
      const BasicNoiseTerm<ColumnCoeff> n{coeff(noise), 13, 6, row_offset};
      State out = backend.make_state(batch, width);
      backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(terms), n);
      INFO(sizeof(Scalar) * 8 << "-bit, " << batch << " x " << width << ", noise (" << noise.offset
                              << ", " << noise.scale << "), row_offset " << row_offset);
      CHECK(bitwise_mismatches(io.host(out), expected) == 0);
      State aliased = xs[2];
      std::vector<LinTerm<State, ColumnCoeff>> in_place = terms;
      in_place[2].vec = &aliased;
      backend.lincomb(aliased, std::span<const LinTerm<State, ColumnCoeff>>(in_place), n);
      CHECK(bitwise_mismatches(io.host(aliased), expected) == 0);
    }
  }
}

} // namespace

TEST_CASE("device Block2 lincomb == EigenBackend bit for bit (odd/even d, noise, row_offset)",
          "[gpu][backend][lincomb][structured]") {
  for (auto [b, d] : {std::pair{1, 1}, std::pair{3, 2}, std::pair{2, 3}, std::pair{4, 4},
                      std::pair{5, 9}, std::pair{300, 64}, std::pair{129, 257}}) {
    for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{kMaxLincombTerms}}) {
      block2_matches_cpu<double>(b, d, n);
      block2_matches_cpu<float>(b, d, n);
    }
  }
  // Odd width is refused with the argument named.
  const gpu::CudaBackend<double> backend;
  gpu::DeviceState<double> odd(2, 3), out;
  const std::vector<LinTerm<gpu::DeviceState<double>, Block2>> t{{Block2::identity(), &odd}};
  CHECK_THROWS_WITH(
      backend.lincomb(out, std::span<const LinTerm<gpu::DeviceState<double>, Block2>>(t)),
      Catch::Contains("even width"));
}

TEST_CASE("device ColumnCoeff lincomb with device tables == EigenBackend bit for bit",
          "[gpu][backend][lincomb][structured]") {
  for (auto [b, w] : {std::pair{1, 1}, std::pair{3, 1}, std::pair{2, 3}, std::pair{3, 5},
                      std::pair{4, 4}, std::pair{3, 8}, std::pair{200, 64}, std::pair{77, 131}}) {
    columns_match_cpu<double>(b, w);
    columns_match_cpu<float>(b, w);
  }
}

TEST_CASE("reductions: dot, squared_norm, all_finite", "[gpu][backend][reduce]") {
  const gpu::CudaBackend<double> b64;
  const gpu::CudaBackend<float> b32;
  for (int n : {1, 5, 1000, 1 << 20}) {
    const auto a = values(static_cast<std::size_t>(n), 0.3),
               c = values(static_cast<std::size_t>(n), 1.1);
    const auto da = CudaIO<double>{}.state(b64, a, 1, n), dc = CudaIO<double>{}.state(b64, c, 1, n);
    const double ref = cpu_dot(Precision::f64, a, c, 1, n);
    double abs_sum = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) abs_sum += std::fabs(a[i] * c[i]);
    // Different summation orders: agreement to n u sum |a_i c_i|.
    CHECK(std::fabs(b64.dot(da, dc) - ref) <= 4.0 * n * 1.1e-16 * abs_sum + 1e-300);
    const auto fa = CudaIO<float>{}.state(b32, a, 1, n), fc = CudaIO<float>{}.state(b32, c, 1, n);
    const double ref32 = cpu_dot(Precision::f32, a, c, 1, n);
    CHECK(std::fabs(b32.dot(fa, fc) - ref32) <= 4.0 * n * 1.1e-16 * abs_sum + 1e-300);
    CHECK(b64.squared_norm(da) == Approx(cpu_dot(Precision::f64, a, a, 1, n)).epsilon(1e-12));
    CHECK(b64.all_finite(da));
    std::vector<double> bad = a;
    bad.back() = std::numeric_limits<double>::quiet_NaN();
    CHECK_FALSE(b64.all_finite(CudaIO<double>{}.state(b64, bad, 1, n)));
    bad.back() = -std::numeric_limits<double>::infinity();
    CHECK_FALSE(b32.all_finite(CudaIO<float>{}.state(b32, bad, 1, n)));
    bad.back() = std::numeric_limits<double>::max(); // huge but finite
    CHECK(b64.all_finite(CudaIO<double>{}.state(b64, bad, 1, n)));
  }
  CHECK_THROWS_AS(b64.dot(b64.make_state(2, 3), b64.make_state(3, 2)), diffgrad::invalid_argument);
}

TEST_CASE("states: zero-filled, deep copies, copy/fill, host round trips", "[gpu][backend]") {
  const gpu::CudaBackend<float> backend;
  auto x = backend.make_state(3, 4);
  for (float v : gpu::to_host(x)) CHECK(v == 0.0f);
  backend.fill(x, 1.5);
  auto y = x; // deep copy
  backend.fill(x, -2.0);
  for (float v : gpu::to_host(y)) CHECK(v == 1.5f);
  for (float v : gpu::to_host(x)) CHECK(v == -2.0f);
  gpu::DeviceState<float> z;
  backend.copy(z, y); // reallocates to y's shape
  CHECK(z.batch() == 3);
  CHECK(z.dim() == 4);
  for (float v : gpu::to_host(z)) CHECK(v == 1.5f);
  backend.fill(z, 0.0);
  for (float v : gpu::to_host(z)) CHECK(v == 0.0f);
  backend.fill(z, -0.0);
  for (float v : gpu::to_host(z)) CHECK(std::signbit(v));
  const std::vector<float> h{1, 2, 3, 4, 5, 6};
  auto s = gpu::to_device<float>(std::span<const float>(h), 2, 3);
  CHECK(gpu::to_host(s) == h);
  std::vector<float> back(6);
  gpu::copy_to_host(s, std::span<float>(back));
  CHECK(back == h);
  auto v = backend.make_vector(5);
  gpu::copy_to_device(std::span<const float>(h.data(), 5), v);
  auto w = v;
  v.setZero();
  CHECK(gpu::to_host(w) == std::vector<float>(h.begin(), h.begin() + 5));
  CHECK(gpu::to_host(v) == std::vector<float>(5, 0.0f));
  std::vector<float> wrong(4);
  CHECK_THROWS_AS(gpu::copy_to_host(s, std::span<float>(wrong)), diffgrad::invalid_argument);
}

TEST_CASE("CountingBackend<CudaBackend>: the same passes as on the CPU",
          "[gpu][backend][counting]") {
  // One fused lincomb per stage plus one per step, one finite check per model call: counted on
  // the device backend, compared with the closed form for DDIM (1 stage, no history).
  const Problem p;
  const CountingBackend<gpu::CudaBackend<double>> backend;
  BackendGaussian<gpu::CudaBackend<double>> model(
      backend.inner(),
      CudaIO<double>{}.state(backend.inner(), problem_mu_rows(p.batch, p.dim), p.batch, p.dim),
      kGaussianStd);
  auto x = CudaIO<double>{}.state(backend.inner(), problem_x_T(p.batch, p.dim), p.batch, p.dim);
  const auto nodes = diffusion_nodes(p);
  backend.reset();
  const auto r = sample(Ddim(1.0), backend, vp_schedule(), std::span<const Node>(nodes), model, x,
                        SampleOptions{.seed = 3});
  CHECK(r.model_evals == p.steps);
  CHECK(backend.counts().lincomb_passes == p.steps); // the model's own lincombs are uncounted
  CHECK(backend.counts().noise_passes == p.steps);
  CHECK(backend.counts().finite_checks == p.steps + 1); // + the x_T check before step 0
  CHECK(backend.counts().make_state == 2 * (1 + 0));    // ring of x and e, history 0
  CHECK(backend.counts().copies == 2);
}

TEST_CASE("cuBLAS Dirac mixture == CPU Dirac mixture (eps, x0_hat, VJP w.r.t. x, z, points)",
          "[gpu][models][dirac]") {
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  Problem p;
  p.batch = 9;
  auto model = MakeDiracGpu{}(backend, io, p);
  const auto xh = problem_x_T(p.batch, p.dim), ah = values(xh.size(), 0.4);
  const auto x = io.state(backend, xh, p.batch, p.dim), a = io.state(backend, ah, p.batch, p.dim);
  for (double t : {0.9, 0.5, 0.1}) {
    const Node n = vp_schedule().node(t);
    auto out = backend.make_state(p.batch, p.dim), dx = backend.make_state(p.batch, p.dim);
    auto dcond = backend.make_vector(model.cond_size()),
         dparams = backend.make_vector(model.param_size());
    Parts gpu;
    model.eps(x, n, out);
    add_part(gpu, "eps", io.host(out));
    model.x0_hat(x, n, out);
    add_part(gpu, "x0_hat", io.host(out));
    model.vjp(x, n, a, dx, &dcond, &dparams);
    add_part(gpu, "vjp dx", io.host(dx));
    add_part(gpu, "vjp dcond", io.host(dcond));
    add_part(gpu, "vjp dparams", io.host(dparams));
    // Logit rounding scales like u (|x| + alpha |y|)^2 / sigma^2 (GEMM form, both models).
    const double tol = 5e-13 / (n.sigma * n.sigma);
    print_agreement("Dirac model t = " + std::to_string(t),
                    check_parts(gpu, cpu_dirac_eval(xh, ah, p.batch, p.dim, n), tol, "Dirac"));
  }
  // Bad input.
  const Node n = vp_schedule().node(0.5);
  auto out = backend.make_state(p.batch, p.dim);
  CHECK_THROWS_WITH(model.eps(backend.make_state(2, p.dim + 1), n, out),
                    Catch::Contains("'x'") && Catch::Contains("dimension"));
  CHECK_THROWS_WITH(model.eps(x, Node{0.0, 1.0, 0.0, 0.0, 0.0}, out),
                    Catch::Contains("node.sigma"));
  auto small = backend.make_vector(3);
  CHECK_THROWS_WITH(model.vjp(x, n, x, out, &small, nullptr), Catch::Contains("dcond"));
}

TEST_CASE("Dirac VJP on the device: <a, J v> == <J^T a, v> (central differences, float64)",
          "[gpu][models][dirac]") {
  // Independent of the CPU model: the device eps differentiated numerically on the device.
  const gpu::CudaBackend<double> backend;
  const CudaIO<double> io;
  Problem p;
  auto model = MakeDiracGpu{}(backend, io, p);
  const Node n = vp_schedule().node(0.4);
  const auto xh = problem_x_T(p.batch, p.dim), ah = values(xh.size(), 0.2),
             vh = values(xh.size(), 1.7);
  const auto x = io.state(backend, xh, p.batch, p.dim), a = io.state(backend, ah, p.batch, p.dim),
             v = io.state(backend, vh, p.batch, p.dim);
  auto dx = backend.make_state(p.batch, p.dim);
  model.vjp(x, n, a, dx, nullptr, nullptr);
  const double jt_a_v = backend.dot(dx, v);
  const double h = 1e-6;
  auto xp = backend.make_state(p.batch, p.dim), xm = backend.make_state(p.batch, p.dim);
  backend.lincomb(xp, term(1.0, x), term(h, v));
  backend.lincomb(xm, term(1.0, x), term(-h, v));
  auto ep = backend.make_state(p.batch, p.dim), em = backend.make_state(p.batch, p.dim);
  model.eps(xp, n, ep);
  model.eps(xm, n, em);
  backend.lincomb(ep, term(1.0 / (2 * h), ep), term(-1.0 / (2 * h), em));
  CHECK(backend.dot(a, ep) == Approx(jt_a_v).epsilon(1e-7));
}

TEST_CASE("cuBLAS MLP == CPU MLP (parameters, eps, VJP w.r.t. x, z, parameters)",
          "[gpu][models][mlp]") {
  Problem p;
  p.batch = 11;
  const auto xh = problem_x_T(p.batch, p.dim), ah = values(xh.size(), 0.9);
  for (bool use_tanh : {false, true}) {
    {
      const gpu::CudaBackend<double> backend;
      const CudaIO<double> io;
      auto model = MakeMlpGpu<double>{use_tanh}(backend, io, p);
      CHECK(bitwise_mismatches(io.host(model.params()), cpu_mlp_params(p.dim, use_tanh)) == 0);
      const auto x = io.state(backend, xh, p.batch, p.dim),
                 a = io.state(backend, ah, p.batch, p.dim);
      for (double t : {0.05, 0.5, 1.0}) {
        auto out = backend.make_state(p.batch, p.dim), dx = backend.make_state(p.batch, p.dim);
        auto dcond = backend.make_vector(model.cond_size());
        auto dparams = backend.make_vector(model.param_size());
        Parts gpu;
        model.eps(x, t, out);
        add_part(gpu, "eps", io.host(out));
        model.vjp(x, t, a, dx, &dcond, &dparams);
        add_part(gpu, "vjp dx", io.host(dx));
        add_part(gpu, "vjp dcond", io.host(dcond));
        add_part(gpu, "vjp dparams", io.host(dparams));
        print_agreement(
            std::string("MLP f64 ") + (use_tanh ? "tanh" : "SiLU"),
            check_parts(gpu, cpu_mlp_eval(Precision::f64, xh, ah, p.batch, p.dim, t, use_tanh),
                        1e-13, "MLP f64"));
      }
    }
    {
      const gpu::CudaBackend<float> backend;
      const CudaIO<float> io;
      auto model = MakeMlpGpu<float>{use_tanh}(backend, io, p);
      const auto x = io.state(backend, xh, p.batch, p.dim),
                 a = io.state(backend, ah, p.batch, p.dim);
      auto out = backend.make_state(p.batch, p.dim), dx = backend.make_state(p.batch, p.dim);
      auto dcond = backend.make_vector(model.cond_size());
      auto dparams = backend.make_vector(model.param_size());
      Parts gpu;
      model.eps(x, 0.3, out);
      add_part(gpu, "eps", io.host(out));
      model.vjp(x, 0.3, a, dx, &dcond, &dparams);
      add_part(gpu, "vjp dx", io.host(dx));
      add_part(gpu, "vjp dcond", io.host(dcond));
      add_part(gpu, "vjp dparams", io.host(dparams));
      print_agreement(
          std::string("MLP f32 ") + (use_tanh ? "tanh" : "SiLU"),
          check_parts(gpu, cpu_mlp_eval(Precision::f32, xh, ah, p.batch, p.dim, 0.3, use_tanh),
                      1e-5, "MLP f32"));
    }
  }
}
