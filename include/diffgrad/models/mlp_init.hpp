#pragma once
// The reference MLP's deterministic initialiser, shared by models::Mlp (models/mlp.hpp) and the
// CUDA Mlp (models/cuda/mlp.cuh), so both draw the same parameters from the same seed. Eigen-free
// (the CUDA header includes it under nvcc).
#include <cmath>
#include <cstdint>

#include "diffgrad/detail/philox.hpp"

namespace diffgrad::models::mlp_init {

/// Parameter `index` of the flat vector, in a layer of fan-in `fan_in`: U(-1/sqrt(fan_in),
/// 1/sqrt(fan_in)) (torch.nn.Linear's default), drawn from Philox4x32-10 keyed by `seed` with
/// the counter (index low, index high, "mlp", 0).
inline double parameter(std::int64_t index, std::int64_t fan_in, std::uint64_t seed) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  const auto i = static_cast<std::uint64_t>(index);
  const auto r = diffgrad::detail::philox4x32_10(
      diffgrad::detail::Philox4x32{{static_cast<std::uint32_t>(i),
                                    static_cast<std::uint32_t>(i >> 32), 0x6d6c70u /* "mlp" */,
                                    0u}},
      seed);
  const double u = diffgrad::detail::uniform_open0(r.v[0], r.v[1]); // (0, 1]
  return bound * (2.0 * u - 1.0);
}

} // namespace diffgrad::models::mlp_init
