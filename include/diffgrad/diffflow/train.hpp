#pragma once
// Training DiffFlow with the library's Adam: per iteration a fresh data batch, a fresh random
// time grid (or the fixed one), fresh noise, the exact gradient of the DiffFlow loss, and one
// Adam step per network (separate learning rates, as in the reference implementation).
// Seeded and reproducible: batch, grid and noise of iteration it are keyed by (seed, it).
// The callback sees every iteration's loss and can stop the run by returning false.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/diffflow/diffflow.hpp"
#include "diffgrad/diffflow/time_grid.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/gradients/reverse_stepper.hpp"

namespace diffgrad::diffflow {

struct TrainOptions {
  int iterations = 1000;
  int batch = 256;
  double lr_drift = 1e-3;  ///< Adam step of the drift network (ignored when it has no params)
  double lr_score = 1e-3;  ///< Adam step of the score network
  bool random_grid = true; ///< resample the interior nodes every iteration
  /// memory mode of the engine's adjoint (LossOptions::memory); every mode gives the same bits
  MemoryMode memory = MemoryMode::store_all();
  std::uint64_t seed = 0;
};

struct TrainProgress {
  int iteration = 0;    ///< 0-based
  double loss = 0.0;    ///< this iteration's batch loss
  double seconds = 0.0; ///< wall time since the start
};

struct TrainResult {
  int iterations = 0;   ///< completed iterations
  bool stopped = false; ///< the callback asked to stop
  double last_loss = 0.0;
  double mean_loss_tail = 0.0; ///< mean loss over the last 10 % of iterations run
  double seconds = 0.0;
};

/// data(batch, seed, draw, out) writes `batch` data rows for draw `draw`.
/// callback(const TrainProgress&) -> bool: false stops after that iteration.
template <TimeField Drift, TimeField Score, class Data, class Callback>
TrainResult train(Drift& drift, Score& score, const PowerTimeGrid& timer, const DiffusionFn& g,
                  Data&& data, const TrainOptions& options, Callback&& callback) {
  namespace d = diffgrad::detail;
  const char* where = "diffflow::train";
  d::require(options.iterations >= 0, where, "options.iterations", ">= 0", options.iterations);
  d::require(options.batch >= 1, where, "options.batch", ">= 1", options.batch);
  using State = typename Drift::state_type;
  using Scalar = typename State::Scalar;
  DiffFlow<Drift, Score> flow(drift, score);
  Workspace<Scalar> ws;
  State x0;
  Adam adam_drift({.learning_rate = options.lr_drift});
  Adam adam_score({.learning_rate = options.lr_score});
  const auto start = std::chrono::steady_clock::now();
  TrainResult result;
  double tail_sum = 0.0;
  int tail_count = 0;
  const int tail_from = options.iterations - std::max(1, options.iterations / 10);
  const std::vector<double> fixed = timer.fixed();
  for (int it = 0; it < options.iterations; ++it) {
    const auto it64 = static_cast<std::uint64_t>(it);
    data(options.batch, options.seed, it64, x0);
    const Grid grid = timer.with_diffusion(
        options.random_grid ? timer.random(options.seed ^ 0x5eedu, it64) : fixed, g);
    LossOptions lo;
    lo.seed = options.seed * 0x9E3779B97F4A7C15ull + it64 + 1;
    lo.memory = options.memory;
    auto grad = flow.gradient(grid, x0, lo, ws);
    if (drift.param_size() > 0) adam_drift.step(drift.params(), grad.drift);
    if (score.param_size() > 0) adam_score.step(score.params(), grad.score);
    result.iterations = it + 1;
    result.last_loss = grad.value.loss;
    if (it >= tail_from) {
      tail_sum += grad.value.loss;
      ++tail_count;
    }
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!callback(TrainProgress{it, grad.value.loss, result.seconds})) {
      result.stopped = true;
      break;
    }
  }
  result.mean_loss_tail = tail_count > 0 ? tail_sum / tail_count : result.last_loss;
  return result;
}

} // namespace diffgrad::diffflow
