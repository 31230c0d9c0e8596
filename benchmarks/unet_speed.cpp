// Driver of benchmarks/compare/bench_unet_speed.py: diffgrad's sampling loop around the learned
// digits UNet (TorchScript, through the LibTorch adapter), timed per step.
//
//   unet_speed --model F --table F --scheme ddim|dpm++2m --steps N --x F [--threads 1]
//              [--reps 5] [--dtype float32|float64] [--out-x F]
//
// Schemes as benchmarks/compare/bench_unet_speed.py's diffusers side: DDIMScheduler(clip_sample=
// False) and DPMSolverMultistepScheduler() through the compat layer, on the training table
// --table (diffusers' float32 alphas_cumprod). Labels b % 10 for row b. One warm-up run, then
// the median over --reps runs of (run time / N); prints one JSON line. --out-x writes the last
// run's sample (the script compares it with diffusers' to show both sides do the same work).
// --threads sets torch's intra-op threads; diffgrad's own loop is single-threaded here.
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "compare/driver_io.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/torch/noise_model.hpp"

namespace {

template <class Scalar, class Scheme>
double seconds_per_step(const driver::Args& a, const Scheme& scheme,
                        const diffgrad::DiscreteSchedule& schedule,
                        const std::vector<diffgrad::Node>& nodes) {
  using Backend = diffgrad::EigenBackend<Scalar>;
  using Net = diffgrad::models::TorchNoiseModel<Scalar>;
  const driver::Matrix x_file = driver::read_matrix(a.str("x"));
  const typename Backend::state_type x_T = x_file.template cast<Scalar>();
  std::vector<std::int64_t> labels;
  for (Eigen::Index b = 0; b < x_T.rows(); ++b) labels.push_back(b % 10);
  Net net = Net::load(a.str("model"), {.sample_shape = {1, 8, 8},
                                       .time_input = diffgrad::models::TorchTimeInput::integer});
  net.set_cond(torch::tensor(labels, torch::kLong));
  const Backend backend;
  const std::span<const diffgrad::Node> span(nodes);
  typename Backend::state_type x = x_T;
  diffgrad::sample(scheme, backend, schedule, span, net, x); // warm-up
  std::vector<double> times;
  for (int r = 0; r < a.integer("reps", 5); ++r) {
    x = x_T;
    const auto start = std::chrono::steady_clock::now();
    diffgrad::sample(scheme, backend, schedule, span, net, x);
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
        static_cast<double>(nodes.size() - 1));
  }
  if (a.has("out-x")) driver::write_matrix(a.str("out-x"), x.template cast<double>().eval());
  return driver::median(times);
}

template <class Scheme>
double run(const driver::Args& a, const Scheme& scheme, const diffgrad::DiscreteSchedule& schedule,
           const std::vector<diffgrad::Node>& nodes) {
  const std::string dtype = a.str("dtype", "float32");
  if (dtype == "float32") return seconds_per_step<float>(a, scheme, schedule, nodes);
  if (dtype == "float64") return seconds_per_step<double>(a, scheme, schedule, nodes);
  throw std::runtime_error("unknown --dtype '" + dtype + "' (expected float32 or float64)");
}

} // namespace

int main(int argc, char** argv) {
  try {
    const driver::Args a(argc, argv);
    const int threads = a.integer("threads", 1);
    at::set_num_threads(threads);
    const driver::Matrix table = driver::read_matrix(a.str("table"));
    const auto schedule = diffgrad::DiscreteSchedule::from_alphas_cumprod(
        std::vector<double>(table.data(), table.data() + table.size()),
        diffgrad::DiscreteTimeInput::timestep_index);
    const std::string scheme = a.str("scheme", "ddim");
    const int steps = a.integer("steps", 25);
    double seconds = 0;
    if (scheme == "ddim") {
      diffgrad::compat::DdimSchedulerConfig config;
      config.clip_sample = false;
      const auto setup = diffgrad::compat::ddim_setup(schedule, config, steps);
      seconds = run(a, setup.scheme, schedule, setup.nodes);
    } else if (scheme == "dpm++2m") {
      const auto setup = diffgrad::compat::dpm_solver_multistep_setup(
          schedule, diffgrad::compat::DpmSolverMultistepSchedulerConfig{}, steps);
      seconds = run(a, setup.scheme, schedule, setup.nodes);
    } else {
      throw std::runtime_error("unknown --scheme '" + scheme + "' (expected ddim or dpm++2m)");
    }
    driver::Json()
        .add("seconds_per_step", seconds)
        .add("threads", static_cast<double>(threads))
        .add("scheme", scheme)
        .print();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unet_speed: %s\n", e.what());
    return 1;
  }
}
