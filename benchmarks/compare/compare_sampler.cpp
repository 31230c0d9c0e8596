// Driver of bench_diffusers_loop.py: diffusers' DDIMScheduler configuration run by diffgrad
// (compat::ddim_setup on the scheduler's own alphas_cumprod table), with the same MLP weights
// the Python side loads into its torch twin.
//
//   compare_sampler --init-weights F [--dim 64 --hidden 128 --time-scale 0.001 --seed 7]
//       writes a freshly initialised MLP (models/mlp.hpp save format) and exits
//   compare_sampler --weights F --alphas F --x F --steps N [--dtype f32|f64] [--reps 5]
//                   [--model mlp|none] [--spacing leading|trailing|linspace] [--out F] [--threads T]
//       samples from x_T (--x, a matrix file) --reps times after one warm-up run; prints
//       {"seconds_per_step": median, ...}; writes the sample to --out
// The model "none" does nothing (its output buffer keeps its contents), for the loop's own
// overhead; the Python side then returns one constant tensor.
#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "driver_io.hpp"

namespace {

template <class State> struct NoModel {
  void eps(const State&, double, State&) const {}
};

diffgrad::compat::TimestepSpacing spacing(const std::string& s) {
  using diffgrad::compat::TimestepSpacing;
  if (s == "leading") return TimestepSpacing::leading;
  if (s == "trailing") return TimestepSpacing::trailing;
  if (s == "linspace") return TimestepSpacing::linspace;
  throw std::runtime_error("unknown --spacing " + s);
}

template <class Scalar> int run(const driver::Args& a) {
  using Backend = diffgrad::EigenBackend<Scalar>;
  using State = typename Backend::state_type;
  const Backend backend(a.integer("threads", 1)); // backend threads (docs/threading.md)
  const driver::Matrix table = driver::read_matrix(a.str("alphas"));
  const auto schedule = diffgrad::DiscreteSchedule::from_alphas_cumprod(
      std::vector<double>(table.data(), table.data() + table.size()),
      diffgrad::DiscreteTimeInput::timestep_index);
  diffgrad::compat::DdimSchedulerConfig config;
  config.clip_sample = false;
  config.timestep_spacing = spacing(a.str("spacing", "leading"));
  const int steps = a.integer("steps", 50);
  const auto setup = diffgrad::compat::ddim_setup(schedule, config, steps);
  const std::span<const diffgrad::Node> nodes(setup.nodes);
  const State x_T = driver::read_matrix(a.str("x")).cast<Scalar>();
  const std::string model_kind = a.str("model", "mlp");
  const int reps = a.integer("reps", 5);

  State x = x_T;
  std::vector<double> times;
  const auto time_runs = [&](auto& model) {
    for (int r = 0; r <= reps; ++r) {  // run 0 is the warm-up
      x = x_T;
      const auto start = std::chrono::steady_clock::now();
      diffgrad::sample(setup.scheme, backend, schedule, nodes, model, x);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (r > 0) times.push_back(s);
    }
  };
  if (model_kind == "mlp") {
    auto model = diffgrad::models::Mlp<Scalar>::load(a.str("weights"));
    model.set_threads(backend.threads()); // the MLP splits rows over the same threads
    time_runs(model);
  } else if (model_kind == "none") {
    NoModel<State> model;
    time_runs(model);
  } else {
    throw std::runtime_error("unknown --model " + model_kind);
  }
  if (a.has("out")) driver::write_matrix(a.str("out"), x);
  const double med = driver::median(times);
  driver::Json()
      .add("seconds_per_step", med / steps)
      .add("seconds_total", med)
      .add("steps", steps)
      .add("batch", static_cast<double>(x_T.rows()))
      .add("targets_are_next_nodes", setup.targets_are_next_nodes ? 1.0 : 0.0)
      .print();
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  try {
    const driver::Args a(argc, argv);
    if (a.has("init-weights")) {
      diffgrad::models::MlpConfig c;
      c.dim = a.integer("dim", 64);
      c.hidden = {a.integer("hidden", 128), a.integer("hidden", 128)};
      c.time_scale = a.real("time-scale", 1e-3);
      diffgrad::models::Mlp<double>(c, static_cast<std::uint64_t>(a.integer("seed", 7)))
          .save(a.str("init-weights"));
      return 0;
    }
    return a.str("dtype", "f64") == "f32" ? run<float>(a) : run<double>(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_sampler: %s\n", e.what());
    return 1;
  }
}
