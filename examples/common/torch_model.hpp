#pragma once
// `--model torch[:FILE]` for the digits examples (sample, guide): the learned class-conditional
// digits UNet of data/models (a diffusers UNet2DModel, TorchScript, data/models/README.md) run
// through diffgrad's LibTorch adapter (models::TorchNoiseModel, diffgrad::torch).
//
// The examples are built with the adapter only when CMake found LibTorch
// (examples/cmake/torch_examples.cmake defines DIFFGRAD_EXAMPLES_WITH_TORCH); without it,
// parse_model_choice still recognises the option and refuses it with a message saying so, so
// the examples build and behave exactly as before.
//
//   --model torch            data/models/digits_unet_f64.pt (DIFFGRAD_DIGITS_UNET_DIR)
//   --model unet             the same
//   --model torch:FILE       that TorchScript file (float64 or float32: read from the file)
//
// The network's time input is diffusers' integer timestep k = 0..999 on its training table
// (DDPM linear betas 1e-4 .. 2e-2, 1000 steps), so its nodes come from the compat layer
// (compat/diffusers.hpp), never from a continuous time grid.
#include <stdexcept>
#include <string>

#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/torch/noise_model.hpp"
#endif

namespace examples {

/// True when this example was compiled with the LibTorch adapter.
inline constexpr bool built_with_torch =
#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH
    true;
#else
    false;
#endif

/// The default network file (float64: the gradient examples keep float64 end to end).
inline std::string default_digits_unet_path() {
#ifdef DIFFGRAD_DIGITS_UNET_DIR
  return std::string(DIFFGRAD_DIGITS_UNET_DIR) + "/digits_unet_f64.pt";
#else
  return "data/models/digits_unet_f64.pt";
#endif
}

/// Whether `--model VALUE` names the torch model; sets `path` to its file when it does.
inline bool is_torch_model(const std::string& value, std::string& path) {
  if (value == "torch" || value == "unet") {
    path = default_digits_unet_path();
    return true;
  }
  if (value.rfind("torch:", 0) == 0) {
    path = value.substr(6);
    return true;
  }
  return false;
}

/// The refusal of `--model torch...` in an example built without LibTorch ("" if it was).
inline std::string torch_unavailable_message(const char* program) {
  if (built_with_torch) return "";
  return std::string(program) +
         ": option '--model': this example was built without LibTorch (the diffgrad::torch "
         "adapter), so torch models are not available; install LibTorch (Debian: libtorch-dev) "
         "and reconfigure CMake (docs/torch.md)";
}

#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH

/// The network's training table (DDPM linear betas 1e-4 .. 2e-2, 1000 steps; computed in double,
/// diffusers rounds it to float32: a relative difference of ~1e-7, far below the network's
/// error), the model fed the integer timestep k = 0..999.
inline diffgrad::DiscreteSchedule digits_unet_schedule() {
  return diffgrad::DiscreteSchedule::from_beta_schedule(
      diffgrad::BetaSchedule::linear, 1000, 1e-4, 0.02, diffgrad::DiscreteTimeInput::timestep_index);
}

/// Whether the TorchScript file holds float32 parameters (else float64). A trace bakes in its
/// dtype, so the example picks its state type from the file.
inline bool torch_file_is_float32(const std::string& path) {
  if (!std::filesystem::is_regular_file(path))
    throw std::runtime_error("option '--model': expected torch:FILE with an existing TorchScript "
                             "file, got '" +
                             path + "' (not a regular file)");
  return diffgrad::detail::rethrow_torch_errors("torch::jit::load", [&] {
    const torch::jit::Module module = torch::jit::load(path);
    for (const auto& p : module.parameters()) return p.scalar_type() == torch::kFloat;
    throw std::runtime_error("option '--model': the TorchScript file '" + path +
                             "' has no parameters to read its dtype from");
  });
}

/// The digits UNet through the adapter: input [B, 1, 8, 8], integer timestep.
template <class Scalar>
diffgrad::models::TorchNoiseModel<Scalar> load_digits_unet(const std::string& path) {
  diffgrad::models::TorchModelOptions options;
  options.sample_shape = {1, 8, 8};
  options.time_input = diffgrad::models::TorchTimeInput::integer;
  return diffgrad::models::TorchNoiseModel<Scalar>::load(path, options);
}

/// One class label per row (0..9 a digit, 10 unconditional), as the network takes them.
inline void set_digit_labels(auto& net, const std::vector<std::int64_t>& labels) {
  net.set_cond(torch::tensor(labels, torch::kLong));
}

/// N + 1 nodes at the integer timesteps round(999 (N - i) / N), i = 0..N, ending at timestep 0
/// (sigma ~ 0.01, finite log-SNR, so every gradient mode and BDIA run on them unchanged).
inline std::vector<diffgrad::Node> integer_timestep_nodes(const diffgrad::DiscreteSchedule& s,
                                                          int steps) {
  std::vector<diffgrad::Node> nodes;
  nodes.reserve(static_cast<std::size_t>(steps) + 1);
  int last = -1;
  for (int i = 0; i <= steps; ++i) {
    const int k = static_cast<int>(std::lround(999.0 * (steps - i) / steps));
    if (k == last)
      throw std::runtime_error("option '--steps': expected at most 999 steps for the torch "
                               "model (one integer timestep per node), got " +
                               std::to_string(steps));
    last = k;
    nodes.push_back(diffgrad::compat::timestep_node(s, k));
  }
  return nodes;
}

#endif

} // namespace examples
