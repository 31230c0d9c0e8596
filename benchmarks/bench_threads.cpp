// EigenBackend on T threads (docs/threading.md): how the step scales with threads, against the
// same-thread-count copy bandwidth, and the noise throughput per thread count.
//
// Each benchmark runs with a backend of T threads (T = 1, 2 by default; --threads 1,2,4 for
// others) at B*d = 1e6 and 1e7 (d = 1000):
//   copy         backend.copy(y, x): 2 streams, the bandwidth baseline at T threads
//   ddim         a DDIM step (no-op model, finiteness check on): 4 streams
//   dpmpp3m      a DPM-Solver++(3M) step: 8 streams
//   ddpm_noise   a stochastic step (DDIM eta = 1): the noise drawn inside the fused update
//   noise_only   the backend's noise draw alone (out = xi(seed, step))
//   mlp_ddim     DDIM sampling, 5 steps, with the library's Mlp (d = 64, hidden 64-64, silu),
//                B*d = 1e6 only; the model runs on the threads it offers (if any)
// The tables print, per size and T: step bandwidth / copy bandwidth at the SAME T (>= 0.8 is
// the single-thread goal), the speedup of every row over T = 1, and the noise throughput.
// Results are the same bits at every T (tests/test_threads.cpp); only the time changes.
//
//   build/benchmarks/bench_threads                      # all, 5 interleaved repetitions
//   build/benchmarks/bench_threads --reps 3 --threads 1,2,4
//   build/benchmarks/bench_threads --benchmark_filter='copy|ddim/'   # a subset
#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Clock = std::chrono::steady_clock;

constexpr Eigen::Index kDim = 1000; // d; B = size / d
const std::vector<long> kSizes{1000000, 10000000};
constexpr long kMlpSize = 1000000;
constexpr Eigen::Index kMlpDim = 64;

/// A model that costs nothing: the engine's own per-step work is all that is timed.
struct NullModel {
  void eps(const State&, double, State& out) const { benchmark::DoNotOptimize(out.data()); }
};

State make(long size, double value) { return State::Constant(size / kDim, kDim, value); }

void bm_copy(benchmark::State& st) {
  const long n = st.range(0);
  const Backend backend(static_cast<int>(st.range(1)));
  const State x = make(n, 1.0);
  State y = make(n, 0.0);
  for (auto _ : st) {
    backend.copy(y, x);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * 2 * n * 8);
}

void bm_noise_only(benchmark::State& st) {
  const long n = st.range(0);
  const Backend backend(static_cast<int>(st.range(1)));
  State y = make(n, 0.0);
  std::uint64_t step = 0;
  for (auto _ : st) {
    backend.lincomb(y, diffgrad::NoiseTerm{1.0, 7, step++});
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetItemsProcessed(static_cast<std::int64_t>(st.iterations()) * n);
}

/// Streams of the output combination of a middle step (terms read + 1 write).
template <class Scheme>
int output_streams(const Scheme& scheme, std::span<const diffgrad::Node> nodes,
                   const diffgrad::VPLinearSchedule& schedule) {
  const auto p =
      scheme.plan(nodes, static_cast<int>(nodes.size()) / 2, diffgrad::NodeAtLambda(schedule));
  int terms = (p.output.x != 0.0) + (p.output.e[0] != 0.0);
  for (int j = 0; j < diffgrad::kMaxHistory; ++j)
    terms += (p.output.hist_x[j] != 0.0) + (p.output.hist_e[j] != 0.0);
  return terms + 1;
}

/// Per-step time of run_scheme between step 1 and step N (manual time), as bench_solver_step.
template <class Scheme> void bm_step(benchmark::State& st, Scheme scheme) {
  const long n = st.range(0);
  const Backend backend(static_cast<int>(st.range(1)));
  constexpr int steps = 20;
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
  const NullModel model;
  const State x_T = make(n, 0.5);
  State x = x_T;
  diffgrad::SamplerWorkspace<Backend> ws(backend, scheme.history(), scheme.stages(), n / kDim,
                                         kDim);
  for (auto& e : ws.e) e.setConstant(0.25);
  Clock::time_point first{}, last{};
  const auto clock_steps = [&](int step, int, const diffgrad::Node&, const State&) {
    if (step == 1) first = Clock::now();
    if (step == steps) last = Clock::now();
  };
  for (auto _ : st) {
    // Restart from x_T (outside the timed steps): sampling in place from the last sample would
    // grow the state by alpha_0 / alpha_T per run until it overflows.
    backend.copy(x, x_T);
    diffgrad::run_scheme(scheme, backend, std::span<const diffgrad::Node>(nodes),
                         diffgrad::NodeAtLambda(schedule),
                         diffgrad::EpsField<const NullModel>{model}, x, ws, {}, clock_steps);
    st.SetIterationTime(std::chrono::duration<double>(last - first).count() / (steps - 1));
  }
  const int streams = output_streams(scheme, nodes, schedule) + 1; // + the finiteness read
  st.counters["streams"] = streams;
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * streams * n * 8);
}

/// Gives the model T threads if it takes them (set_num_threads).
template <class Model> void maybe_set_threads(Model& model, int threads) {
  if constexpr (requires { model.set_num_threads(threads); }) model.set_num_threads(threads);
}

/// DDIM sampling with the library's Mlp: model and backend on T threads (the model where it
/// offers set_num_threads).
void bm_mlp_ddim(benchmark::State& st) {
  const long n = st.range(0);
  const int threads = static_cast<int>(st.range(1));
  const Backend backend(threads);
  diffgrad::models::MlpConfig config;
  config.dim = static_cast<int>(kMlpDim);
  config.hidden = {64, 64};
  diffgrad::models::Mlp<double> model(config, 3);
  maybe_set_threads(model, threads);
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, 5, 1.0, 1e-3));
  const State x_T = State::Constant(n / kMlpDim, kMlpDim, 0.3);
  State x = x_T;
  for (auto _ : st) {
    x = x_T;
    diffgrad::sample(diffgrad::Ddim(), backend, schedule, std::span<const diffgrad::Node>(nodes),
                     model, x);
    benchmark::DoNotOptimize(x.data());
  }
}

std::vector<int> parse_threads(int& argc, char** argv) {
  std::vector<int> threads{1, 2};
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads.clear();
      const std::string list = argv[++i];
      std::size_t pos = 0;
      while (pos < list.size()) {
        const std::size_t comma = list.find(',', pos);
        threads.push_back(std::atoi(list.substr(pos, comma - pos).c_str()));
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  return threads;
}

} // namespace

int main(int argc, char** argv) {
  const std::vector<int> thread_counts = parse_threads(argc, argv);
  const int reps = bench::initialize(argc, argv, 5);

  for (long n : kSizes)
    for (int t : thread_counts) {
      const auto reg = [&](const char* name, auto fn) {
        benchmark::RegisterBenchmark(name, fn)->Args({n, t})->Unit(benchmark::kMicrosecond);
      };
      reg("copy", bm_copy);
      reg("noise_only", bm_noise_only);
      const auto step = [&](const char* name, auto scheme) {
        benchmark::RegisterBenchmark(name, [scheme](benchmark::State& st) { bm_step(st, scheme); })
            ->Args({n, t})
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      };
      step("ddim", diffgrad::Ddim());
      step("dpmpp3m", diffgrad::DpmSolverMultistep(3, diffgrad::SolverPrediction::data));
      step("ddpm_noise", diffgrad::Ddim(1.0));
    }
  for (int t : thread_counts)
    benchmark::RegisterBenchmark("mlp_ddim", bm_mlp_ddim)
        ->Args({kMlpSize, t})
        ->Unit(benchmark::kMillisecond);

  bench::MedianReporter reporter;
  const std::string load_before = bench::load_average();
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const std::string load_after = bench::load_average();

  std::printf("\n## Steps on T threads vs the same-T copy (medians of %d interleaved repetitions; "
              "%u hardware threads; %s before, %s after)\n\n",
              reps, std::thread::hardware_concurrency(), load_before.c_str(), load_after.c_str());
  std::printf(
      "| B*d | T | copy GB/s | step | step us | step GB/s | step bw / copy bw (same T) | "
      "speedup vs T = 1 | copy speedup vs T = 1 |\n|---|---|---|---|---|---|---|---|---|\n");
  for (long n : kSizes) {
    const auto size = std::to_string(n);
    const auto* copy1 = reporter.find("copy/" + size + "/1");
    for (int t : thread_counts) {
      const std::string key = size + "/" + std::to_string(t);
      const auto* copy = reporter.find("copy/" + key);
      if (copy == nullptr) continue;
      const double bytes = static_cast<double>(n) * 8;
      for (const char* name : {"ddim", "dpmpp3m", "ddpm_noise"}) {
        const auto* s = reporter.find(std::string(name) + "/" + key);
        const auto* s1 = reporter.find(std::string(name) + "/" + size + "/1");
        if (s == nullptr) continue;
        const double streams = s->counters.at("streams");
        std::printf("| %.0e | %d | %.1f | %s | %.1f | %.1f | %.2f | %.2f | %.2f |\n",
                    static_cast<double>(n), t, 2 * bytes / copy->seconds / 1e9, name,
                    s->seconds * 1e6, streams * bytes / s->seconds / 1e9,
                    (streams / 2) * copy->seconds / s->seconds,
                    s1 != nullptr ? s1->seconds / s->seconds : 0.0,
                    copy1 != nullptr ? copy1->seconds / copy->seconds : 0.0);
      }
    }
  }

  std::printf("\n## Noise throughput vs threads\n\n| B*d | T | noise_only ns/elem | "
              "Gelem/s | speedup vs T = 1 | ddpm_noise step ns/elem | step / noise_only |\n"
              "|---|---|---|---|---|---|---|\n");
  for (long n : kSizes)
    for (int t : thread_counts) {
      const std::string key = std::to_string(n) + "/" + std::to_string(t);
      const auto* noise = reporter.find("noise_only/" + key);
      const auto* noise1 = reporter.find("noise_only/" + std::to_string(n) + "/1");
      const auto* step = reporter.find("ddpm_noise/" + key);
      if (noise == nullptr) continue;
      const double per = 1e9 / static_cast<double>(n);
      std::printf("| %.0e | %d | %.2f | %.2f | %.2f | %.2f | %.2f |\n", static_cast<double>(n), t,
                  noise->seconds * per, static_cast<double>(n) / noise->seconds / 1e9,
                  noise1 != nullptr ? noise1->seconds / noise->seconds : 0.0,
                  step != nullptr ? step->seconds * per : 0.0,
                  step != nullptr ? step->seconds / noise->seconds : 0.0);
    }

  std::printf("\n## MLP sampling (DDIM, 5 steps, d = %ld, hidden 64-64, B*d = %.0e)\n\n"
              "| T | ms per sample | speedup vs T = 1 |\n|---|---|---|\n",
              static_cast<long>(kMlpDim), static_cast<double>(kMlpSize));
  const auto* mlp1 = reporter.find("mlp_ddim/" + std::to_string(kMlpSize) + "/1");
  for (int t : thread_counts) {
    const auto* m = reporter.find("mlp_ddim/" + std::to_string(kMlpSize) + "/" + std::to_string(t));
    if (m == nullptr) continue;
    std::printf("| %d | %.1f | %.2f |\n", t, m->seconds * 1e3,
                mlp1 != nullptr ? mlp1->seconds / m->seconds : 0.0);
  }
  benchmark::Shutdown();
  return 0;
}
