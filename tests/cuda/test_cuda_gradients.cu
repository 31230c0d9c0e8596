// GPU: gradients, inversion and continuous adjoints run on CudaBackend through the generic
// code (gradients/gradient.hpp + discrete_adjoint.hpp, inversion/*.hpp, gradients/
// reversible.hpp, cycle_sde.hpp, adjoint_deis.hpp, sde_adjoint_deis.hpp) and agree with
// EigenBackend: <= 1e-12 relative in float64, <= 1e-5 in float32.
//   - exact discrete gradient (x0, loss, dL/dx_T) for every scheme, memory mode store_all;
//     checkpoint(3) / recompute, dL/dxi and given-noise replays for a scheme of each family;
//   - the cuBLAS Dirac mixture and MLP: dL/dx_T, dL/dcond, dL/dtheta through the sampler;
//   - every exactly invertible method: sample_from_noise, invert, generate, reversible gradient,
//     invert_and_regenerate (editing);
//   - Cycle-SDE encode/replay, AdjointDEIS-1/-2M (cached and re-solved), SDE-AdjointDEIS.
// Fisher operators: fisher/*.hpp (exact Fisher, DF-EA, DF-TM, likelihood, OT check) work on
// Eigen types with per-sample reductions, which the Backend concept does not have, so they have
// no device path to compare yet (docs/cuda.md lists what they would need).
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "cuda_io.cuh"

using namespace diffgrad;
using namespace diffgrad::testing;

namespace {

std::string scheme_name(int index, int steps) {
  std::string name;
  with_scheme(index, steps, [&](const std::string& s, const auto&, bool) { name = s; });
  return name;
}

bool one_of_each_family(const std::string& name) {
  return name == "DDIM eta=1" || name == "DpmSolverSinglestep-3 data" ||
         name == "DpmSolverMultistep-3 noise" || name == "SdeDpmSolver-2 data" ||
         name == "DeisRhoAb-3" || name == "IPndm-4" || name == "DeisRhoRk rk4" ||
         name == "FlowHeun";
}

} // namespace

TEST_CASE("exact discrete gradient of every scheme on the GPU == CPU, float64 and float32",
          "[gpu][gradients]") {
  const Problem p;
  const int n = scheme_count(p.steps);
  const GradientSpec store_all{};
  std::printf("gradient(), store_all, Gaussian model:\n");
  for (int i = 0; i < n; ++i) {
    const std::string name = scheme_name(i, p.steps);
    print_agreement(name + " f64",
                    check_parts(gradient_case(gpu::CudaBackend<double>{}, CudaIO<double>{},
                                              MakeGaussian{}, i, p, store_all),
                                cpu_gradient_gaussian(i, p, store_all, Precision::f64), 1e-12,
                                name));
    print_agreement(name + " f32",
                    check_parts(gradient_case(gpu::CudaBackend<float>{}, CudaIO<float>{},
                                              MakeGaussian{}, i, p, store_all),
                                cpu_gradient_gaussian(i, p, store_all, Precision::f32), 1e-5,
                                name));
  }
}

TEST_CASE("gradient memory modes, dL/dxi and given noise on the GPU == CPU", "[gpu][gradients]") {
  const Problem p;
  const int n = scheme_count(p.steps);
  const GradientSpec specs[] = {
      {.memory = 1, .snapshots = 3},
      {.memory = 2},
      {.memory = 0, .wrt_noise = true},
      {.memory = 1, .snapshots = 2, .wrt_noise = true, .given_noise = true},
  };
  const char* spec_names[] = {"checkpoint(3)", "recompute", "wrt_noise",
                              "checkpoint(2) given noise"};
  std::printf("gradient() memory modes, Gaussian model, float64:\n");
  for (int i = 0; i < n; ++i) {
    const std::string name = scheme_name(i, p.steps);
    if (!one_of_each_family(name)) continue;
    for (int s = 0; s < 4; ++s) {
      if (name == "FlowHeun" && specs[s].given_noise) continue; // flows have no noise
      const std::string label = name + ", " + spec_names[s];
      print_agreement(label, check_parts(gradient_case(gpu::CudaBackend<double>{}, CudaIO<double>{},
                                                       MakeGaussian{}, i, p, specs[s]),
                                         cpu_gradient_gaussian(i, p, specs[s], Precision::f64),
                                         1e-12, label));
    }
  }
}

TEST_CASE("gradients through the cuBLAS models w.r.t. x_T, conditioning and parameters",
          "[gpu][gradients][models]") {
  Problem p;
  p.t_end = 0.1;
  const int n = scheme_count(p.steps);
  const GradientSpec all{.memory = 1, .snapshots = 3, .wrt_cond = true, .wrt_params = true};
  std::printf("gradient() w.r.t. x_T, cond, params:\n");
  for (int i = 0; i < n; ++i) {
    const std::string name = scheme_name(i, p.steps);
    if (!one_of_each_family(name)) continue;
    if (name != "FlowHeun")
      print_agreement(name + " Dirac f64",
                      check_parts(gradient_case(gpu::CudaBackend<double>{}, CudaIO<double>{},
                                                MakeDiracGpu{}, i, p, all),
                                  cpu_gradient_dirac(i, p, all), 1e-12, name + " Dirac"));
    print_agreement(name + " MLP f64",
                    check_parts(gradient_case(gpu::CudaBackend<double>{}, CudaIO<double>{},
                                              MakeMlpGpu<double>{}, i, p, all),
                                cpu_gradient_mlp(i, p, all, Precision::f64), 1e-12, name + " MLP"));
    print_agreement(name + " MLP f32",
                    check_parts(gradient_case(gpu::CudaBackend<float>{}, CudaIO<float>{},
                                              MakeMlpGpu<float>{}, i, p, all),
                                cpu_gradient_mlp(i, p, all, Precision::f32), 1e-5, name + " MLP"));
  }
}

TEST_CASE("every exactly invertible method on the GPU == CPU (invert, generate, reversible "
          "gradient)",
          "[gpu][inversion]") {
  const Problem p;
  std::printf("inversion, Gaussian model:\n");
  for (int i = 0; i < inversion_method_count(); ++i) {
    std::string name;
    with_inversion_method(i, [&](const std::string& s, const auto&) { name = s; });
    print_agreement(name + " f64",
                    check_parts(inversion_case(gpu::CudaBackend<double>{}, CudaIO<double>{},
                                               MakeGaussian{}, i, p),
                                cpu_inversion_gaussian(i, p, Precision::f64), 1e-12, name));
    print_agreement(name + " f32",
                    check_parts(inversion_case(gpu::CudaBackend<float>{}, CudaIO<float>{},
                                               MakeGaussian{}, i, p),
                                cpu_inversion_gaussian(i, p, Precision::f32), 1e-5, name));
  }
}

TEST_CASE("Cycle-SDE, AdjointDEIS and SDE-AdjointDEIS on the GPU == CPU",
          "[gpu][gradients][continuous]") {
  Problem p;
  std::printf("continuous adjoints and Cycle-SDE:\n");
  print_agreement(
      "Gaussian f64",
      check_parts(continuous_case(gpu::CudaBackend<double>{}, CudaIO<double>{}, MakeGaussian{}, p),
                  cpu_continuous_gaussian(p, Precision::f64), 1e-12, "Gaussian f64"));
  print_agreement(
      "Gaussian f32",
      check_parts(continuous_case(gpu::CudaBackend<float>{}, CudaIO<float>{}, MakeGaussian{}, p),
                  cpu_continuous_gaussian(p, Precision::f32), 1e-5, "Gaussian f32"));
  p.t_end = 0.1;
  print_agreement("Dirac f64", check_parts(continuous_case(gpu::CudaBackend<double>{},
                                                           CudaIO<double>{}, MakeDiracGpu{}, p),
                                           cpu_continuous_dirac(p), 1e-12, "Dirac f64"));
}
