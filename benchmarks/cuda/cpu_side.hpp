#pragma once
// The CPU (EigenBackend) half of bench_cuda_lincomb: compiled by the host compiler, so Eigen
// never enters the .cu translation unit. Times are seconds per call (median of repetitions).
#include <cstdint>

namespace diffgrad::bench {

/// EigenBackend<Scalar>::lincomb with `terms` summands (+ Philox noise) over n elements.
double cpu_lincomb_seconds(std::int64_t n, int terms, bool noise, bool f64, int reps);

/// One step of `sample` with a no-op model on EigenBackend (scheme 0: DDIM, 1: DPM-Solver++
/// 2M, 2: SDE-DPM-Solver++ 2M), B x d = batch x dim, check_finite on or off.
double cpu_step_seconds(int scheme, std::int64_t batch, std::int64_t dim, bool check_finite,
                        bool f64, int steps);

} // namespace diffgrad::bench
