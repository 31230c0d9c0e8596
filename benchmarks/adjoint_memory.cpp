// Memory of the exact discrete adjoint (gradients/discrete_adjoint.hpp): for DDIM,
// DPM-Solver++ 2M and 3M and the 3-stage singlestep DPM-Solver++ at N = 50 and 200, the
// snapshot vectors held at once (GradientCost::peak_stored_states, the library's own count),
// the model evaluations, and the growth of the peak resident size (VmHWM) while one gradient
// runs, workspace construction included, in a forked child (examples/common/memory.hpp).
// Each state is batch 16 x dim 1024 doubles (128 KiB), so the stored vectors dominate.
// The model is the Gaussian-data eps (closed form, no buffers of its own).
//
//   build/benchmarks/adjoint_memory            # the markdown table
//
// Where the library has GradientOptions::keep_stages, the singlestep scheme also gets a row
// with the stages kept (no stage recomputation in the reverse pass).
#include <Eigen/Core>

#include <cstdio>
#include <string>
#include <vector>

#include "common/memory.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vec = Eigen::VectorXd;

constexpr Eigen::Index kBatch = 16, kDim = 1024;

// Sets options.keep_stages where this version of the library has it; false if it has not.
template <class Options> bool set_keep_stages(Options& options, bool keep) {
  if constexpr (requires { options.keep_stages; }) {
    options.keep_stages = keep;
    return true;
  } else {
    return !keep;
  }
}

template <class Scheme>
void row(const char* name, const Scheme& scheme, int steps, bool keep_stages) {
  diffgrad::GradientOptions options;
  if (!set_keep_stages(options, keep_stages)) return;
  const auto r = examples::run_isolated([&] {
    const diffgrad::VPLinearSchedule schedule;
    const auto nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
    Vec mu = Vec::LinSpaced(kDim, 0.5, -0.5);
    diffgrad::models::GaussianData<double> model(mu, 0.2);
    const Backend backend;
    State x_T = backend.make_state(kBatch, kDim);
    backend.gaussian(x_T, 1, 0);
    const State w = x_T.reverse();
    const auto g = diffgrad::gradient(scheme, backend, schedule, nodes, model, x_T, w, options);
    return std::vector<double>{static_cast<double>(g.cost.peak_stored_states),
                               static_cast<double>(g.cost.model_evals),
                               static_cast<double>(g.cost.vjps), g.grad_x(0, 0)};
  });
  const double vector_mib = static_cast<double>(kBatch * kDim * 8) / (1024.0 * 1024.0);
  std::printf("| %-42s | %4d | %6.0f | %6.0f | %6.0f | %8.1f | %8.1f |\n",
              (std::string(name) + (keep_stages ? ", keep_stages" : "")).c_str(), steps,
              r.payload[0], r.payload[1], r.payload[2], r.payload[0] * vector_mib,
              static_cast<double>(r.peak_growth_bytes) / (1024.0 * 1024.0));
}

} // namespace

int main() {
  using diffgrad::SolverPrediction;
  std::printf("state: %lld x %lld doubles (%.3f MiB); store_all\n\n",
              static_cast<long long>(kBatch), static_cast<long long>(kDim),
              static_cast<double>(kBatch * kDim * 8) / (1024.0 * 1024.0));
  std::printf("| %-42s | %4s | %6s | %6s | %6s | %8s | %8s |\n", "scheme", "N", "stored", "evals",
              "vjps", "MiB", "peak RSS");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(44, '-').c_str(),
              "------:", "-------:", "-------:", "-------:", "---------:", "---------:");
  for (int steps : {50, 200}) {
    row("DDIM", diffgrad::Ddim(), steps, false);
    row("DPM-Solver++ 2M", diffgrad::DpmSolverMultistep(2, SolverPrediction::data), steps, false);
    row("DPM-Solver++ 3M", diffgrad::DpmSolverMultistep(3, SolverPrediction::data), steps, false);
    row("DPM-Solver++ 3S (singlestep)", diffgrad::DpmSolverSinglestep(3, SolverPrediction::data),
        steps, false);
    row("DPM-Solver++ 3S (singlestep)", diffgrad::DpmSolverSinglestep(3, SolverPrediction::data),
        steps, true);
  }
  std::printf("\nstored: GradientCost::peak_stored_states (state vectors in snapshots); MiB: "
              "stored x state size; peak RSS: growth of VmHWM during one gradient() call, "
              "workspace included\n");
  return 0;
}
