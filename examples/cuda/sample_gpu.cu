// Sampling and an exact gradient through the sampler on the GPU (diffgrad::gpu::CudaBackend),
// with the cuBLAS Dirac-mixture model: the same solver code as on the CPU.
//
//   1. x_T ~ N(0, I) drawn on the device (Philox: the same bits the CPU backend draws);
//   2. 1024 samples of a 3-point mixture in 2-D with DPM-Solver++ 2M, 25 steps;
//   3. dL/dx_T of L = |x_0 - (1, 1)|^2 / 2 through all 25 steps (exact discrete adjoint,
//      checkpointing with 5 snapshots), checked against a central difference.
// It checks itself (every sample within 0.1 of a point, each point drawn 25-42% of the time, the
// gradient within 1e-5 of the difference quotient) and exits non-zero when a check fails. Without
// a CUDA device it prints SKIPPED and exits with 77, which ctest reports as skipped.
#include <cmath>
#include <cstdio>
#include <span>
#include <vector>

#include "../common/main_guard.hpp"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/cuda/dirac_mixture.cuh"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

int run() {
  namespace dg = diffgrad::gpu;
  if (dg::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device visible\n");
    return 77;
  }
  using Backend = dg::CudaBackend<double>;
  using State = Backend::state_type;
  cudaStream_t stream;
  dg::check(cudaStreamCreate(&stream), "sample_gpu", "cudaStreamCreate");
  int failures = 0;
  {
    const Backend backend(stream);
    const std::vector<double> points{1.0, 1.0, -1.0, 0.5, 0.0, -1.0}; // K = 3 points in 2-D
    diffgrad::models::gpu::DiracMixture<double> model(backend, points, 3, 2);

    const int n = 1024;
    State x_T = backend.make_state(n, 2);
    backend.gaussian(x_T, /*seed=*/1, /*step=*/99);
    const diffgrad::VPLinearSchedule schedule;
    const std::vector<diffgrad::Node> nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, 25, 1.0, 1e-3));
    const std::span<const diffgrad::Node> ns(nodes);
    const diffgrad::DpmSolverMultistep scheme(2, diffgrad::SolverPrediction::data);

    State x = x_T;
    diffgrad::sample(scheme, backend, schedule, ns, model, x);
    const std::vector<double> h = dg::to_host(x);
    int count[3] = {0, 0, 0}, far = 0;
    for (int b = 0; b < n; ++b) {
      double best = 1e300;
      int nearest = 0;
      for (int k = 0; k < 3; ++k) {
        const double d = std::hypot(h[2 * b] - points[2 * k], h[2 * b + 1] - points[2 * k + 1]);
        if (d < best) {
          best = d;
          nearest = k;
        }
      }
      ++count[nearest];
      far += best > 0.1;
    }
    std::printf("samples: %d/%d within 0.1 of a point; drawn %.3f / %.3f / %.3f\n", n - far, n,
                count[0] / double(n), count[1] / double(n), count[2] / double(n));
    failures += far != 0;
    for (int c : count) failures += !(c > 0.25 * n && c < 0.42 * n);

    const State target = dg::to_device<double>(std::vector<double>(2 * n, 1.0), n, 2, stream);
    const diffgrad::SquaredDistanceLoss<Backend> loss(target);
    const auto r = diffgrad::gradient(scheme, backend, schedule, ns, model, x_T, loss,
                                      {.memory = diffgrad::MemoryMode::checkpoint(5)});
    State v = backend.make_state(n, 2), xp = backend.make_state(n, 2),
          xm = backend.make_state(n, 2), g = backend.make_state(n, 2);
    backend.gaussian(v, 2, 0);
    const double step = 1e-6;
    backend.lincomb(xp, diffgrad::term(1.0, x_T), diffgrad::term(step, v));
    backend.lincomb(xm, diffgrad::term(1.0, x_T), diffgrad::term(-step, v));
    diffgrad::sample(scheme, backend, schedule, ns, model, xp);
    diffgrad::sample(scheme, backend, schedule, ns, model, xm);
    const double lp = loss(backend, xp, g), lm = loss(backend, xm, g);
    const double fd = (lp - lm) / (2 * step), ad = backend.dot(r.grad_x, v);
    std::printf("loss %.6f; <dL/dx_T, v> = %.10e, central difference %.10e (rel. %.1e); %lld "
                "model evaluations, %lld VJPs\n",
                r.loss, ad, fd, std::fabs(fd - ad) / std::fabs(ad),
                static_cast<long long>(r.cost.model_evals), static_cast<long long>(r.cost.vjps));
    failures += !(std::fabs(fd - ad) <= 1e-5 * std::fabs(ad));
  }
  dg::check(cudaStreamDestroy(stream), "sample_gpu", "cudaStreamDestroy");
  std::printf("%s\n", failures == 0 ? "OK" : "FAILED");
  return failures == 0 ? 0 : 1;
}

} // namespace

// A CUDA error (diffgrad::gpu::check throws) or a library error is printed, exit status 1.
int main() { return examples::run_main("sample_gpu", run); }
