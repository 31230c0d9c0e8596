// GPU: every sampler scheme of the library runs on CudaBackend through the same generic engine
// (sample / sample_flow over StepPlans) and agrees with EigenBackend: <= 1e-12 relative in
// float64 and <= 1e-5 in float32 (max-norm), with
//   - the backend-generic Gaussian model (tests/cuda/backend_models.hpp): the same model
//     code on both sides, so any difference is the backends' (expected: none, bit for bit);
//   - the cuBLAS Dirac mixture vs the Eigen Dirac mixture (GEMM order and exp differ in the
//     last bits; grid ends at t = 0.1, sigma = 0.32, where the logits are well conditioned);
//   - the cuBLAS MLP vs the Eigen MLP (SiLU and tanh), a few schemes.
// Stochastic schemes (DDIM eta = 1, SDE-DPM-Solver) draw Philox noise inside the fused update.
// Structured coefficients (2x2 blocks, per-column device tables): synthetic schemes through
// the same engine and exact discrete adjoint (structured_cases.hpp), at a nonzero row offset.
// The SDE layer (sde/): an OU chain simulated and differentiated on both (sde_cases.hpp).
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "cuda_io.cuh"
#include "sde_cases.hpp"
#include "structured_cases.hpp"

using namespace diffgrad;
using namespace diffgrad::testing;

namespace {

template <class Scalar> Precision precision_of() {
  return sizeof(Scalar) == 8 ? Precision::f64 : Precision::f32;
}

template <class Scalar> void every_scheme_gaussian() {
  const gpu::CudaBackend<Scalar> backend;
  const Problem p;
  const int n = scheme_count(p.steps);
  std::printf("Gaussian model, %s, %d schemes (B = %d, d = %d, N = %d):\n",
              sizeof(Scalar) == 8 ? "float64" : "float32", n, p.batch, p.dim, p.steps);
  for (int i = 0; i < n; ++i) {
    std::string name;
    with_scheme(i, p.steps, [&](const std::string& s, const auto&, bool) { name = s; });
    const Parts gpu = sample_case(backend, CudaIO<Scalar>{}, MakeGaussian{}, i, p);
    const Parts cpu = cpu_sample_gaussian(i, p, precision_of<Scalar>());
    print_agreement(name, check_parts(gpu, cpu, agreement_tolerance(precision_of<Scalar>()), name));
  }
}

template <class Scalar> void structured_schemes() {
  const gpu::CudaBackend<Scalar> backend;
  const Problem p = structured_problem();
  for (bool columns : {false, true}) {
    const std::string name = std::string(columns ? "ColumnCoeff" : "Block2") + " scheme, " +
                             (sizeof(Scalar) == 8 ? "float64" : "float32");
    const Parts gpu = structured_case(backend, CudaIO<Scalar>{}, columns, p);
    const Parts cpu = cpu_structured(columns, p, precision_of<Scalar>());
    print_agreement(name, check_parts(gpu, cpu, agreement_tolerance(precision_of<Scalar>()), name));
  }
}

} // namespace

TEST_CASE("structured schemes (Block2, ColumnCoeff): sample and gradients, GPU == CPU",
          "[gpu][samplers][structured]") {
  // The lincombs are bit-identical (test_cuda_backend), so the parts should agree bit for
  // bit; only the loss's reductions differ in order. Checked at the usual tolerances.
  std::printf("Structured coefficients (B = 5, d = 6, N = 6, row_offset = 3):\n");
  structured_schemes<double>();
  structured_schemes<float>();
}

TEST_CASE("SDE layer (Euler-Maruyama, exponential Euler): simulate and sde_gradient, GPU == CPU",
          "[gpu][samplers][sde]") {
  // Forward-time OU chain with a backend-generic linear drift (sde_cases.hpp): the lincombs
  // and the Philox noise are bit-identical, only the loss's reductions differ in order.
  Problem p;
  p.steps = 8;
  std::printf("SDE layer (B = %d, d = %d, N = %d, row_offset = %d):\n", p.batch, p.dim, p.steps,
              static_cast<int>(kSdeRowOffset));
  for (const bool exponential : {false, true}) {
    const auto method = exponential ? sde::SdeMethod::exponential : sde::SdeMethod::euler_maruyama;
    const std::string name = exponential ? "exponential Euler" : "Euler-Maruyama";
    {
      const gpu::CudaBackend<double> backend;
      const Parts gpu = sde_case(backend, CudaIO<double>{}, method, p);
      const Parts cpu = cpu_sde(exponential, p, Precision::f64);
      print_agreement(name + ", float64",
                      check_parts(gpu, cpu, agreement_tolerance(Precision::f64), name));
    }
    {
      const gpu::CudaBackend<float> backend;
      const Parts gpu = sde_case(backend, CudaIO<float>{}, method, p);
      const Parts cpu = cpu_sde(exponential, p, Precision::f32);
      print_agreement(name + ", float32",
                      check_parts(gpu, cpu, agreement_tolerance(Precision::f32), name));
    }
  }
}

TEST_CASE("every scheme on the GPU == CPU, Gaussian model, float64", "[gpu][samplers]") {
  every_scheme_gaussian<double>();
}

TEST_CASE("every scheme on the GPU == CPU, Gaussian model, float32", "[gpu][samplers]") {
  every_scheme_gaussian<float>();
}

TEST_CASE("every diffusion scheme with the cuBLAS Dirac mixture == CPU model, float64",
          "[gpu][samplers][models]") {
  const gpu::CudaBackend<double> backend;
  Problem p;
  p.t_end = 0.1;
  const int n = scheme_count(p.steps);
  std::printf("Dirac mixture (K = %d), float64, t_end = %.2f:\n", kDiracPoints, p.t_end);
  for (int i = 0; i < n; ++i) {
    std::string name;
    bool flow = false;
    with_scheme(i, p.steps, [&](const std::string& s, const auto&, bool f) {
      name = s;
      flow = f;
    });
    if (flow) continue; // the Dirac mixture is a noise model
    const Parts gpu = sample_case(backend, CudaIO<double>{}, MakeDiracGpu{}, i, p);
    const Parts cpu = cpu_sample_dirac(i, p);
    print_agreement(name, check_parts(gpu, cpu, 1e-12, name));
  }
}

TEST_CASE("MLP on the device == CPU MLP through the sampler (SiLU/tanh, float64/float32)",
          "[gpu][samplers][models]") {
  Problem p;
  p.t_end = 0.05;
  const int n = scheme_count(p.steps);
  std::printf("MLP, a scheme of each family:\n");
  for (int i = 0; i < n; ++i) {
    std::string name;
    with_scheme(i, p.steps, [&](const std::string& s, const auto&, bool) { name = s; });
    if (name != "DDIM" && name != "DpmSolverSinglestep-3 data" &&
        name != "DpmSolverMultistep-3 data" && name != "SdeDpmSolver-2 data" &&
        name != "DeisRhoRk rk4" && name != "IPndm-4" && name != "FlowHeun")
      continue;
    for (bool use_tanh : {false, true}) {
      const std::string label = name + (use_tanh ? " (tanh)" : " (SiLU)");
      const gpu::CudaBackend<double> b64;
      print_agreement(
          label + " f64",
          check_parts(sample_case(b64, CudaIO<double>{}, MakeMlpGpu<double>{use_tanh}, i, p),
                      cpu_sample_mlp(i, p, Precision::f64, use_tanh), 1e-12, label));
      const gpu::CudaBackend<float> b32;
      print_agreement(
          label + " f32",
          check_parts(sample_case(b32, CudaIO<float>{}, MakeMlpGpu<float>{use_tanh}, i, p),
                      cpu_sample_mlp(i, p, Precision::f32, use_tanh), 1e-5, label));
    }
  }
}

TEST_CASE("sampling on a user stream gives the same result as the default stream",
          "[gpu][samplers][stream]") {
  cudaStream_t stream = nullptr;
  gpu::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "test", "cudaStreamCreate");
  const Problem p;
  Parts on_stream;
  {
    const gpu::CudaBackend<double> backend(stream);
    on_stream = sample_case(backend, CudaIO<double>{}, MakeGaussian{}, 1, p); // DDIM eta = 1
  }
  const Parts on_default =
      sample_case(gpu::CudaBackend<double>{}, CudaIO<double>{}, MakeGaussian{}, 1, p);
  CHECK(bitwise_mismatches(on_stream.front().second, on_default.front().second) == 0);
  gpu::check(cudaStreamDestroy(stream), "test", "cudaStreamDestroy");
}
