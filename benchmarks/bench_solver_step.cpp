// Per-step solver overhead against a same-run memory-bandwidth baseline.
//
// The model is a no-op (its output buffer keeps its contents), so what is timed is exactly what
// diffgrad adds per step: the step plan (host scalars), the fused lincomb over the batch, the
// finiteness check of the model output, the observer call. A step of a memory-bound update
// cannot beat streaming its bytes, so it is compared with two loops over the same bytes,
// measured in the same run with the same Eigen types:
//   copy   y = x                  2 streams (1 read, 1 write)
//   triad  y = x + s z            3 streams (2 reads, 1 write): a DDIM step's shape
//   sum6   y = sum of 6 c_k x_k   7 streams: a DPM-Solver++ 3M step's shape and working set
//   copy4  y_k = x_k, k = 1..4    8 vectors: copy over the SAME WORKING SET as a 3M step (its
//                                 4 states and 4 model outputs), so that a step whose vectors
//                                 spill out of the last-level cache is compared with a copy
//                                 that spills too
// and, for the stochastic step (DDIM eta = 1, whose noise is drawn inside the fused update),
// with drawing the same number of Gaussians:
//   noise_only       the backend's noise draw alone (out = xi(seed, step)), the stochastic
//                    step's compute floor
//   std_normal       std::normal_distribution<double> over std::mt19937_64 into a vector: what
//                    a C++ user would otherwise write (not bit-reproducible across backends)
// A step's nominal traffic is (nonzero terms of its output combination + 1 write) streams of
// B*d doubles, counted from the scheme's own plan (DDIM: x_i, e_i -> x_{i+1}: 3; DPM-Solver++
// 3M, whose data predictions also read the earlier states: x_i, e_i, x_{i-1}, e_{i-1}, x_{i-2},
// e_{i-2} -> x_{i+1}: 7), plus one read of e_i for the finiteness check when it is on. The
// table reports
//   step bandwidth / copy bandwidth = (streams / 2) * t_copy / t_step   (>= 0.8 is the goal)
//   the same against copy4 (same working set)
//   t_step / t_triad, t_step / t_sum6, and for ddpm_noise t_step / t_std_normal
// Per-step times come from the observer's clock between step 1 and step N (manual time), so
// the copies in and out of the workspace at the ends of run_scheme are not counted.
//
//   build/benchmarks/bench_solver_step            # benchmarks, then the markdown table
//   build/benchmarks/bench_solver_step --reps 5   # repetitions per benchmark (median taken)
#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
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
const std::vector<long> kSizes{1000, 10000, 100000, 1000000, 10000000};

/// A model that costs nothing: the engine's own per-step work is all that is timed.
struct NullModel {
  void eps(const State&, double, State& out) const { benchmark::DoNotOptimize(out.data()); }
};

State make(long size, double value) { return State::Constant(size / kDim, kDim, value); }

void bm_copy(benchmark::State& st) {
  const long n = st.range(0);
  const State x = make(n, 1.0);
  State y = make(n, 0.0);
  for (auto _ : st) {
    y = x;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * 2 * n * 8);
}

void bm_triad(benchmark::State& st) {
  const long n = st.range(0);
  const State x = make(n, 1.0), z = make(n, 2.0);
  State y = make(n, 0.0);
  const double s = 0.5;
  for (auto _ : st) {
    y.noalias() = x + s * z;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * 3 * n * 8);
}

/// The fused 6-term combination y = sum_k c_k x_k over 6 separate vectors (7 streams): the
/// baseline with the same working set as a DPM-Solver++ 3M step (whose 8 ring vectors do not
/// fit in the last-level cache at B*d = 1e6 while copy's two do).
void bm_sum6(benchmark::State& st) {
  const long n = st.range(0);
  const State x0 = make(n, 1.0), x1 = make(n, 2.0), x2 = make(n, 3.0), x3 = make(n, 4.0),
              x4 = make(n, 5.0), x5 = make(n, 6.0);
  State y = make(n, 0.0);
  for (auto _ : st) {
    y.noalias() = 0.5 * x0 + 0.25 * x1 - 0.125 * x2 + 0.0625 * x3 - 0.03125 * x4 + 0.5 * x5;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * 7 * n * 8);
}

/// Four independent copies: 8 vectors, the working set of a DPM-Solver++ 3M step.
void bm_copy4(benchmark::State& st) {
  const long n = st.range(0);
  const State x0 = make(n, 1.0), x1 = make(n, 2.0), x2 = make(n, 3.0), x3 = make(n, 4.0);
  State y0 = make(n, 0.0), y1 = make(n, 0.0), y2 = make(n, 0.0), y3 = make(n, 0.0);
  for (auto _ : st) {
    y0 = x0;
    y1 = x1;
    y2 = x2;
    y3 = x3;
    benchmark::DoNotOptimize(y3.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * 8 * n * 8);
}

/// The backend's noise draw alone: out = xi(seed, step), B*d Gaussians.
void bm_noise_only(benchmark::State& st) {
  const long n = st.range(0);
  const Backend backend;
  State y = make(n, 0.0);
  std::uint64_t step = 0;
  for (auto _ : st) {
    backend.lincomb(y, diffgrad::NoiseTerm{1.0, 7, step++});
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
}

/// std::normal_distribution over std::mt19937_64, filling B*d doubles.
void bm_std_normal(benchmark::State& st) {
  const long n = st.range(0);
  State y = make(n, 0.0);
  std::mt19937_64 engine(7);
  std::normal_distribution<double> normal;
  for (auto _ : st) {
    double* out = y.data();
    for (long i = 0; i < n; ++i) out[i] = normal(engine);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
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

template <class Scheme> void bm_step(benchmark::State& st, Scheme scheme, bool check_finite) {
  const long n = st.range(0);
  constexpr int steps = 20;
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
  const NullModel model;
  State x = make(n, 0.5);
  diffgrad::SamplerWorkspace<Backend> ws(backend, scheme.history(), scheme.stages(), n / kDim,
                                         kDim);
  for (auto& e : ws.e) e.setConstant(0.25);
  diffgrad::SampleOptions options;
  options.check_finite = check_finite;
  Clock::time_point first{}, last{};
  const auto clock_steps = [&](int step, int, const diffgrad::Node&, const State&) {
    if (step == 1) first = Clock::now();
    if (step == steps) last = Clock::now();
  };
  for (auto _ : st) {
    diffgrad::run_scheme(scheme, backend, std::span<const diffgrad::Node>(nodes),
                         diffgrad::NodeAtLambda(schedule),
                         diffgrad::EpsField<const NullModel>{model}, x, ws, options, clock_steps);
    st.SetIterationTime(std::chrono::duration<double>(last - first).count() / (steps - 1));
  }
  const int streams = output_streams(scheme, nodes, schedule) + (check_finite ? 1 : 0);
  st.counters["streams"] = streams;
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * streams * n * 8);
}

struct Variant {
  std::string name;
  int nominal_streams; // without the finiteness read
};

} // namespace

int main(int argc, char** argv) {
  const int reps = bench::initialize(argc, argv, 5);

  for (long n : kSizes) {
    benchmark::RegisterBenchmark("copy", bm_copy)->Arg(n)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("triad", bm_triad)->Arg(n)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("sum6", bm_sum6)->Arg(n)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("copy4", bm_copy4)->Arg(n)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("noise_only", bm_noise_only)
        ->Arg(n)
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("std_normal", bm_std_normal)
        ->Arg(n)
        ->Unit(benchmark::kMicrosecond);
    const auto step = [&](const std::string& name, auto scheme, bool check) {
      benchmark::RegisterBenchmark(
          name.c_str(), [scheme, check](benchmark::State& st) { bm_step(st, scheme, check); })
          ->Arg(n)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    };
    step("ddim", diffgrad::Ddim(), true);
    step("ddim_nocheck", diffgrad::Ddim(), false);
    step("dpmpp3m", diffgrad::DpmSolverMultistep(3, diffgrad::SolverPrediction::data), true);
    step("dpmpp3m_nocheck", diffgrad::DpmSolverMultistep(3, diffgrad::SolverPrediction::data),
         false);
    step("ddpm_noise", diffgrad::Ddim(1.0), true);
  }
  bench::MedianReporter reporter;
  const std::string load_before = bench::load_average();
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const std::string load_after = bench::load_average();

  std::printf("\n## Per-step overhead vs memory bandwidth (medians of %d interleaved repetitions; "
              "%s before, %s after)\n\n",
              reps, load_before.c_str(), load_after.c_str());
  std::printf("| B*d | copy GB/s | copy4 GB/s | step | streams | step us | step GB/s | "
              "step bw / copy bw | step bw / copy4 bw | t_step / t_triad | t_step / t_sum6 |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (long n : kSizes) {
    const auto size = std::to_string(n);
    const auto* copy = reporter.find("copy/" + size);
    const auto* copy4 = reporter.find("copy4/" + size);
    const auto* triad = reporter.find("triad/" + size);
    const auto* sum6 = reporter.find("sum6/" + size);
    if (copy == nullptr || copy4 == nullptr || triad == nullptr || sum6 == nullptr) continue;
    const double bytes = static_cast<double>(n) * 8;
    for (const char* name : {"ddim", "ddim_nocheck", "dpmpp3m", "dpmpp3m_nocheck", "ddpm_noise"}) {
      const auto* s = reporter.find(std::string(name) + "/" + size);
      if (s == nullptr) continue;
      const double streams = s->counters.at("streams");
      std::printf("| %.0e | %.1f | %.1f | %s | %.0f | %.2f | %.1f | %.2f | %.2f | %.2f | %.2f |\n",
                  static_cast<double>(n), 2 * bytes / copy->seconds / 1e9,
                  8 * bytes / copy4->seconds / 1e9, name, streams, s->seconds * 1e6,
                  streams * bytes / s->seconds / 1e9, (streams / 2) * copy->seconds / s->seconds,
                  (streams / 8) * copy4->seconds / s->seconds, s->seconds / triad->seconds,
                  s->seconds / sum6->seconds);
    }
  }

  std::printf("\n## Stochastic step (DDIM eta = 1) against drawing the same number of Gaussians "
              "(same run)\n\n");
  std::printf("| B*d | ddpm_noise step ns/elem | noise_only ns/elem | std_normal ns/elem | "
              "t_step / t_noise_only | t_step / t_std_normal |\n|---|---|---|---|---|---|\n");
  for (long n : kSizes) {
    const auto size = std::to_string(n);
    const auto* step = reporter.find("ddpm_noise/" + size);
    const auto* noise = reporter.find("noise_only/" + size);
    const auto* normal = reporter.find("std_normal/" + size);
    if (step == nullptr || noise == nullptr || normal == nullptr) continue;
    const double per = 1e9 / static_cast<double>(n);
    std::printf("| %.0e | %.2f | %.2f | %.2f | %.2f | %.2f |\n", static_cast<double>(n),
                step->seconds * per, noise->seconds * per, normal->seconds * per,
                step->seconds / noise->seconds, step->seconds / normal->seconds);
  }
  benchmark::Shutdown();
  return 0;
}
