// Gradient through the sampler: time over forward time, and peak memory, against the number
// of steps N, for every gradient mode. The model is the MLP of models/mlp.hpp (d = 64, two
// hidden layers of 128, SiLU), the sampler DDIM on the VP-linear schedule (uniform lambda from
// t = 1 to 1e-3), the loss linear (<w, x_0>), batch 128. Modes:
//   forward          one sampling run (the unit of the ratios)
//   store_all        exact discrete adjoint, every state stored        (gradients/gradient.hpp)
//   checkpoint5      the same, binomial checkpointing with 5 stored states (x_T included)
//   recompute        the same, only x_T stored (N (N - 1)/2 re-advances; N <= 50 here)
//   bdia             reversible BDIA-DDIM gradient, O(1) states      (gradients/reversible.hpp)
//   adjoint_cached   AdjointDEIS-1 on the cached forward trajectory  (gradients/adjoint_deis.hpp)
//   adjoint_resolve  AdjointDEIS-1 re-solving the state backwards (no trajectory)
//   dfea             exact adjoint with the DF-EA Fisher in place of the model VJP
//   (fisher/df_ea.hpp);
//                    timed only (on an untrained MLP its values are meaningless)
// Times are Google Benchmark medians of interleaved repetitions. Memory is measured once per
// (mode, N) in a forked child (examples/common/memory.hpp): the growth of the peak resident
// size (VmHWM) while it builds the mode's buffers and runs one gradient; "states" is the
// number of trajectory states the mode holds at once, from the library's own cost records.
//
//   build/benchmarks/bench_gradient            # benchmarks, then the markdown table
//   build/benchmarks/bench_gradient --reps 3
#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "common/memory.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/fisher/df_ea.hpp"
#include "diffgrad/gradients/adjoint_deis.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Mlp = diffgrad::models::Mlp<double>;

constexpr Eigen::Index kBatch = 128, kDim = 64;
const std::vector<int> kSteps{10, 20, 50, 100, 200};
const std::vector<std::string> kModes{"forward", "store_all",      "checkpoint5",     "recompute",
                                      "bdia",    "adjoint_cached", "adjoint_resolve", "dfea"};

struct Problem {
  Backend backend;
  diffgrad::VPLinearSchedule schedule;
  Mlp model;
  State x_T, weights;
  Problem() : model(config(), 7) {
    x_T = backend.make_state(kBatch, kDim);
    backend.gaussian(x_T, 1, 0);
    weights = backend.make_state(kBatch, kDim);
    backend.gaussian(weights, 2, 0);
  }
  static diffgrad::models::MlpConfig config() {
    diffgrad::models::MlpConfig c;
    c.dim = kDim;
    c.hidden = {128, 128};
    return c;
  }
  std::vector<diffgrad::Node> nodes(int steps) const {
    return diffgrad::make_nodes(schedule,
                                diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
  }
};

Problem& problem() {
  static Problem p;
  return p;
}

/// A mode's repeatable call with every buffer it needs built up front, plus the number of
/// trajectory states it holds (filled by the first call).
struct Runner {
  std::function<void()> call;
  std::shared_ptr<double> states = std::make_shared<double>(0);
};

Runner make_runner(const std::string& mode, int steps) {
  Problem& p = problem();
  auto nodes = std::make_shared<std::vector<diffgrad::Node>>(p.nodes(steps));
  const std::span<const diffgrad::Node> span(*nodes);
  Runner r;
  auto states = r.states;
  if (mode == "forward") {
    auto ws = std::make_shared<diffgrad::SamplerWorkspace<Backend>>(p.backend, 0, 1, kBatch, kDim);
    auto x = std::make_shared<State>(p.x_T);
    r.call = [&p, nodes, span, ws, x, states] {
      *x = p.x_T;
      diffgrad::run_scheme(diffgrad::Ddim(), p.backend, span, diffgrad::NodeAtLambda(p.schedule),
                           diffgrad::EpsField<Mlp>{p.model}, *x, *ws);
      *states = 1;
    };
  } else if (mode == "store_all" || mode == "checkpoint5" || mode == "recompute") {
    diffgrad::GradientOptions opt;
    if (mode == "checkpoint5") opt.memory = diffgrad::MemoryMode::checkpoint(5);
    if (mode == "recompute") opt.memory = diffgrad::MemoryMode::recompute();
    auto ws = std::make_shared<diffgrad::GradientWorkspace<Backend>>(
        diffgrad::make_gradient_workspace(diffgrad::Ddim(), p.backend, span, p.model, p.x_T, opt));
    r.call = [&p, nodes, span, ws, opt, states] {
      const auto& g = diffgrad::gradient(diffgrad::Ddim(), p.backend, p.schedule, span, p.model,
                                         p.x_T, p.weights, opt, *ws);
      *states = static_cast<double>(g.cost.peak_stored_states);
    };
  } else if (mode == "dfea") {
    auto dfea = std::make_shared<diffgrad::fisher::DfEaModel<Mlp>>(p.model);
    diffgrad::GradientOptions opt;
    // Timing only: DF-EA approximates the Fisher of mixture-like data; on this untrained MLP its
    // alpha^2/sigma^4 terms overflow for N = 200, and the cost is the same either way.
    opt.check_finite = false;
    auto ws = std::make_shared<diffgrad::GradientWorkspace<Backend>>(
        diffgrad::make_gradient_workspace(diffgrad::Ddim(), p.backend, span, *dfea, p.x_T, opt));
    r.call = [&p, nodes, span, ws, opt, dfea, states] {
      diffgrad::fisher::DfEaEndpointLoss loss(*dfea, diffgrad::LinearLoss<Backend>(p.weights),
                                              span.back());
      const auto& g = diffgrad::gradient(diffgrad::Ddim(), p.backend, p.schedule, span, *dfea,
                                         p.x_T, loss, opt, *ws);
      *states = static_cast<double>(g.cost.peak_stored_states);
    };
  } else if (mode == "bdia") {
    r.call = [&p, nodes, span, states] {
      diffgrad::ReversibleGradientOptions opt;
      opt.want_cond = opt.want_params = false;
      const auto g = diffgrad::reversible_gradient(
          diffgrad::BdiaDdim(1.0), p.backend, p.schedule, span, p.model, p.x_T,
          [&p](const State&, State& out) { out = p.weights; }, opt);
      *states = g.cost.trajectory_states;
    };
  } else if (mode == "adjoint_cached") {
    auto cache =
        std::make_shared<diffgrad::TrajectoryCache<Backend>>(p.backend, steps, kBatch, kDim);
    auto x = std::make_shared<State>(p.x_T), grad = std::make_shared<State>(p.x_T);
    auto ws = std::make_shared<diffgrad::SamplerWorkspace<Backend>>(p.backend, 0, 1, kBatch, kDim);
    r.call = [&p, nodes, span, cache, x, grad, ws, states] {
      cache->reset(p.x_T);
      *x = p.x_T;
      diffgrad::run_scheme(diffgrad::Ddim(), p.backend, span, diffgrad::NodeAtLambda(p.schedule),
                           diffgrad::EpsField<Mlp>{p.model}, *x, *ws, {}, *cache);
      diffgrad::adjoint_deis(p.backend, p.model, span, cache->states(), p.weights, *grad);
      *states = static_cast<double>(cache->states().size());
    };
  } else if (mode == "adjoint_resolve") {
    auto x = std::make_shared<State>(p.x_T), grad = std::make_shared<State>(p.x_T);
    auto ws = std::make_shared<diffgrad::SamplerWorkspace<Backend>>(p.backend, 0, 1, kBatch, kDim);
    r.call = [&p, nodes, span, x, grad, ws, states] {
      *x = p.x_T;
      diffgrad::run_scheme(diffgrad::Ddim(), p.backend, span, diffgrad::NodeAtLambda(p.schedule),
                           diffgrad::EpsField<Mlp>{p.model}, *x, *ws);
      diffgrad::adjoint_deis_resolve(p.backend, p.model, span, *x, p.weights, *grad);
      *states = 1; // the current state only (re-solved backwards)
    };
  } else {
    throw std::runtime_error("unknown mode " + mode);
  }
  return r;
}

struct Memory {
  double peak_mib = -1, states = 0;
};
std::map<std::string, Memory>& memory() {
  static std::map<std::string, Memory> m;
  return m;
}

void bm_mode(benchmark::State& st, const std::string& mode) {
  const int steps = static_cast<int>(st.range(0));
  const std::string key = mode + "/" + std::to_string(steps);
  problem(); // built before any fork, so no child pays for it
  if (!memory().contains(key)) {
    const auto iso = examples::run_isolated([&] {
      Runner r = make_runner(mode, steps);
      r.call();
      return std::vector<double>{*r.states};
    });
    memory()[key] = Memory{
        iso.peak_growth_bytes < 0 ? -1.0 : static_cast<double>(iso.peak_growth_bytes) / 1048576.0,
        iso.payload.at(0)};
  }
  Runner r = make_runner(mode, steps);
  for (auto _ : st) r.call();
  st.counters["peak_MiB"] = memory()[key].peak_mib;
  st.counters["states"] = memory()[key].states;
}

} // namespace

int main(int argc, char** argv) {
  const int reps = bench::initialize(argc, argv, 3);
  for (const auto& mode : kModes)
    for (int steps : kSteps) {
      if (mode == "recompute" && steps > 50) continue; // N^2/2 advances
      benchmark::RegisterBenchmark(mode.c_str(),
                                   [mode](benchmark::State& st) { bm_mode(st, mode); })
          ->Arg(steps)
          ->Unit(benchmark::kMillisecond);
    }
  bench::MedianReporter reporter;
  const std::string load_before = bench::load_average();
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const std::string load_after = bench::load_average();

  const double state_mib = static_cast<double>(kBatch * kDim) * sizeof(double) / 1048576.0;
  std::printf("\n## Gradient modes vs N: MLP 64-128-128-64, batch %ld, DDIM (medians of %d "
              "interleaved repetitions; %s before, %s after; one state = %.3f MiB)\n\n",
              static_cast<long>(kBatch), reps, load_before.c_str(), load_after.c_str(), state_mib);
  std::printf("| N | mode | time ms | time / forward | states held | peak RSS growth MiB |\n"
              "|---|---|---|---|---|---|\n");
  for (int steps : kSteps) {
    const auto* fwd = reporter.find("forward/" + std::to_string(steps));
    for (const auto& mode : kModes) {
      const auto* m = reporter.find(mode + "/" + std::to_string(steps));
      if (m == nullptr || fwd == nullptr) continue;
      std::printf("| %d | %s | %.2f | %.2f | %.0f | %.2f |\n", steps, mode.c_str(),
                  m->seconds * 1e3, m->seconds / fwd->seconds, m->counters.at("states"),
                  m->counters.at("peak_MiB"));
    }
  }
  benchmark::Shutdown();
  return 0;
}
