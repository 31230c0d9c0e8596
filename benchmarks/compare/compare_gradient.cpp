// Driver of bench_autograd_vs_exact.py: diffgrad's exact gradient of L = <w, x_0> through N
// DDIM steps (VP-linear schedule, uniform log-SNR grid from t = 1 to 1e-3, float64) with
// respect to x_T and the MLP's parameters.
//
//   compare_gradient --write-nodes F --steps N
//       writes the N + 1 nodes as a matrix (alpha sigma lambda model_t per row) and exits
//   compare_gradient --weights F --x F --w F --steps N [--memory store_all|checkpoint|recompute]
//                    [--snapshots 5] [--reps 3] [--out-grad F] [--out-grad-params F] [--threads T]
//       peak memory of the first gradient (workspace built inside the measurement), then the
//       median time of --reps more; prints one JSON line
#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "driver_io.hpp"

int main(int argc, char** argv) {
  using Backend = diffgrad::EigenBackend<double>;
  using State = Backend::state_type;
  try {
    const driver::Args a(argc, argv);
    const diffgrad::VPLinearSchedule schedule;
    const int steps = a.integer("steps", 50);
    const auto nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
    if (a.has("write-nodes")) {
      driver::write_nodes(a.str("write-nodes"), nodes);
      return 0;
    }
    const Backend backend(a.integer("threads", 1)); // backend threads (docs/threading.md)
    auto model = diffgrad::models::Mlp<double>::load(a.str("weights"));
    model.set_threads(backend.threads()); // the MLP splits rows over the same threads
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
      const driver::PeakMeter meter;
      auto ws = diffgrad::make_gradient_workspace(diffgrad::Ddim(), backend, span, model, x_T, opt);
      const auto& r = diffgrad::gradient(diffgrad::Ddim(), backend, schedule, span, model, x_T, w,
                                         opt, ws);
      peak_mib = meter.growth_mib();
      stored = r.cost.peak_stored_states;
      if (a.has("out-grad")) driver::write_matrix(a.str("out-grad"), r.grad_x);
      if (a.has("out-grad-params")) driver::write_matrix(a.str("out-grad-params"), r.grad_params.transpose());
    }
    auto ws = diffgrad::make_gradient_workspace(diffgrad::Ddim(), backend, span, model, x_T, opt);
    std::vector<double> times;
    for (int r = 0; r < a.integer("reps", 3); ++r) {
      const auto start = std::chrono::steady_clock::now();
      diffgrad::gradient(diffgrad::Ddim(), backend, schedule, span, model, x_T, w, opt, ws);
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    driver::Json()
        .add("seconds", driver::median(times))
        .add("peak_mib", peak_mib)
        .add("stored_states", static_cast<double>(stored))
        .add("memory", memory)
        .print();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_gradient: %s\n", e.what());
    return 1;
  }
}
