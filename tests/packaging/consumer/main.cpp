// The smallest useful diffgrad program: sample Gaussian data with DDIM and compare with the
// exact probability-flow map. Exits non-zero when anything is off, so ctest can run it.
#include <cstdio>
#include <cstring>

#include <diffgrad/backend/cpu/eigen_backend.hpp>
#include <diffgrad/models/gaussian.hpp>
#include <diffgrad/schedule/time_grid.hpp>
#include <diffgrad/schedule/vp_linear.hpp>
#include <diffgrad/solvers/ddim.hpp>
#include <diffgrad/solvers/sampler.hpp>
#include <diffgrad/version.hpp>

int main() {
#ifdef DIFFGRAD_CONSUMER_EXPECTED_VERSION
  if (std::strcmp(DIFFGRAD_VERSION_STRING, DIFFGRAD_CONSUMER_EXPECTED_VERSION) != 0) {
    std::printf("version header says %s, the build expected %s\n", DIFFGRAD_VERSION_STRING,
                DIFFGRAD_CONSUMER_EXPECTED_VERSION);
    return 1;
  }
#endif
  using Backend = diffgrad::EigenBackend<double>;
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  Eigen::VectorXd mu(2);
  mu << 1.0, -0.5;
  diffgrad::models::GaussianData<double> model(mu, 0.3);

  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, 200, 1.0, 1e-3));
  Backend::state_type x_T(2, 2);
  x_T << 0.5, -1.0, 1.5, 0.25;
  Backend::state_type x = x_T;
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, model, x);

  const auto exact = model.exact_flow(x_T, nodes.front(), nodes.back());
  const double error = (x - exact).norm() / exact.norm();
  std::printf("diffgrad %s consumer: DDIM, 200 steps, relative error %.3g\n",
              DIFFGRAD_VERSION_STRING, error);
  return error < 1e-2 ? 0 : 1;
}
