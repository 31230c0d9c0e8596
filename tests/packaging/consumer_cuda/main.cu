// The smallest CUDA program on an installed diffgrad: DDIM on the GPU with a Dirac-mixture
// model. The packaging test only compiles and links it (no GPU needed).
#include <cstdio>
#include <vector>

#include <diffgrad/backend/cuda/cuda_backend.cuh>
#include <diffgrad/models/cuda/dirac_mixture.cuh>
#include <diffgrad/schedule/time_grid.hpp>
#include <diffgrad/schedule/vp_linear.hpp>
#include <diffgrad/solvers/ddim.hpp>
#include <diffgrad/solvers/sampler.hpp>

int main() {
  const diffgrad::gpu::CudaBackend<float> backend;
  const std::vector<double> points{1.0, 0.0, -1.0, 0.0};
  diffgrad::models::gpu::DiracMixture<float> model(backend, points, 2, 2);
  auto x = backend.make_state(8, 2);
  backend.gaussian(x, /*seed=*/1, /*step=*/0);
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, 10, 1.0, 1e-3));
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, model, x);
  const std::vector<float> samples = diffgrad::gpu::to_host(x);
  std::printf("first sample (%g, %g)\n", samples[0], samples[1]);
  return 0;
}
