// Driver of benchmarks/compare/bench_unet_gradient.py: diffgrad's exact gradient of
// L = <w, x_0> through N DDIM or DPM-Solver++(2M) steps of the learned digits UNet
// (data/models/digits_unet_f64.pt, through the LibTorch adapter), with respect to x_T and all
// network parameters. Nodes: diffusers' DDIMScheduler(clip_sample=False) /
// DPMSolverMultistepScheduler() on the model's training table, via the compat layer.
//
//   unet_gradient --model F --table F --scheme ddim|dpm++2m --steps N --x F --w F --labels F
//                 [--memory store_all|checkpoint|recompute] [--snapshots 5] [--threads 1]
//                 [--reps 3] [--write-nodes F] [--out-x0 F] [--out-grad F] [--out-grad-params F]
//
// Peak memory of one gradient after a warm-up gradient (workspace built inside the
// measurement), then the median
// time of --reps more; prints one JSON line. --threads sets torch's intra-op threads (the
// adapter never changes them); diffgrad's own loop is single-threaded here.
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
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/torch/noise_model.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Net = diffgrad::models::TorchNoiseModel<double>;

template <class Scheme>
int run(const driver::Args& a, const Scheme& scheme, const diffgrad::DiscreteSchedule& schedule,
        const std::vector<diffgrad::Node>& nodes, Net& net) {
  if (a.has("write-nodes")) {
    driver::write_nodes(a.str("write-nodes"), nodes);
  }
  const Backend backend;
  const State x_T = driver::read_matrix(a.str("x"));
  const State w = driver::read_matrix(a.str("w"));
  diffgrad::GradientOptions opt;
  opt.wrt_params = true;
  const std::string memory = a.str("memory", "store_all");
  opt.memory = driver::memory_mode(a);
  const std::span<const diffgrad::Node> span(nodes);

  double peak_mib = 0;
  std::int64_t stored = 0;
  {
    // Warm-up (TorchScript's profiling executor optimises the graph on its first calls, as in
    // the Python script); its workspace is freed before the measurement.
    auto ws = diffgrad::make_gradient_workspace(scheme, backend, span, net, x_T, opt);
    diffgrad::gradient(scheme, backend, schedule, span, net, x_T, w, opt, ws);
  }
  {
    const driver::PeakMeter meter;
    auto ws = diffgrad::make_gradient_workspace(scheme, backend, span, net, x_T, opt);
    const auto& r = diffgrad::gradient(scheme, backend, schedule, span, net, x_T, w, opt, ws);
    peak_mib = meter.growth_mib();
    stored = r.cost.peak_stored_states;
    if (a.has("out-x0")) driver::write_matrix(a.str("out-x0"), r.x0);
    if (a.has("out-grad")) driver::write_matrix(a.str("out-grad"), r.grad_x);
    if (a.has("out-grad-params"))
      driver::write_matrix(a.str("out-grad-params"), r.grad_params.transpose());
  }
  auto ws = diffgrad::make_gradient_workspace(scheme, backend, span, net, x_T, opt);
  std::vector<double> times;
  for (int r = 0; r < a.integer("reps", 3); ++r) {
    const auto start = std::chrono::steady_clock::now();
    diffgrad::gradient(scheme, backend, schedule, span, net, x_T, w, opt, ws);
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  driver::Json()
      .add("seconds", times.empty() ? 0.0 : driver::median(times))
      .add("peak_mib", peak_mib)
      .add("stored_states", static_cast<double>(stored))
      .add("memory", memory)
      .print();
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  try {
    const driver::Args a(argc, argv);
    at::set_num_threads(a.integer("threads", 1));
    const driver::Matrix table = driver::read_matrix(a.str("table"));
    const auto schedule = diffgrad::DiscreteSchedule::from_alphas_cumprod(
        std::vector<double>(table.data(), table.data() + table.size()),
        diffgrad::DiscreteTimeInput::timestep_index);
    const driver::Matrix labels = driver::read_matrix(a.str("labels"));
    std::vector<std::int64_t> label_values;
    for (Eigen::Index i = 0; i < labels.size(); ++i)
      label_values.push_back(static_cast<std::int64_t>(labels.data()[i]));

    Net net = Net::load(a.str("model"), {.sample_shape = {1, 8, 8},
                                         .time_input = diffgrad::models::TorchTimeInput::integer});
    net.set_cond(torch::tensor(label_values, torch::kLong));

    const std::string scheme = a.str("scheme", "ddim");
    const int steps = a.integer("steps", 25);
    if (scheme == "ddim") {
      diffgrad::compat::DdimSchedulerConfig config;
      config.clip_sample = false;
      const auto setup = diffgrad::compat::ddim_setup(schedule, config, steps);
      return run(a, setup.scheme, schedule, setup.nodes, net);
    }
    if (scheme == "dpm++2m") {
      const auto setup = diffgrad::compat::dpm_solver_multistep_setup(
          schedule, diffgrad::compat::DpmSolverMultistepSchedulerConfig{}, steps);
      return run(a, setup.scheme, schedule, setup.nodes, net);
    }
    throw std::runtime_error("unknown --scheme '" + scheme + "' (expected ddim or dpm++2m)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unet_gradient: %s\n", e.what());
    return 1;
  }
}
