// GPU: the library's gDDIM samplers through the engine on CudaBackend vs EigenBackend
// (gddim_cases.hpp): CLD (2x2 blocks over [x | v], odd d = 3, q = 1, 2, stochastic with the
// denoising step) and BDM on 4 x 4 images (per-frequency tables built by the scheme in device
// memory, q = 1, 3, stochastic), at row offset 2. The structured lincombs are bit-identical to
// the CPU's (test_cuda_backend), so float64 agreement should be exact; checked at 1e-12.
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "cuda_io.cuh"
#include "gddim_cases.hpp"

using namespace diffgrad;
using namespace diffgrad::testing;

TEST_CASE("gDDIM samplers (CLD blocks, BDM device tables) on the GPU == CPU, float64",
          "[gpu][samplers][gddim]") {
  const gpu::CudaBackend<double> backend;
  std::printf("gDDIM samplers, float64 (B = 5, CLD 2d = 6, BDM 4 x 4):\n");
  for (int i = 0; i < kGddimCases; ++i) {
    const std::string name = gddim_case_name(i);
    const Parts gpu = gddim_case(backend, CudaIO<double>{}, i);
    print_agreement(name,
                    check_parts(gpu, cpu_gddim(i), agreement_tolerance(Precision::f64), name));
  }
}
