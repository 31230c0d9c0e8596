// libFuzzer target: the diffusers scheduler_config.json reader
// (compat::load_scheduler_config, include/diffgrad/compat/scheduler_config.hpp).
//
// Input: the first byte picks num_inference_steps (1..64) and how the config is read (its own
// "_class_name", LoadOptions::as_class, or LoadOptions::sampler); the rest is the JSON text.
// Invariant: load_scheduler_config returns a config or throws diffgrad::invalid_argument; a
// loaded config then either builds a sampler (make_sampler on its own training table) whose
// nodes are one more than its timesteps, or is refused with diffgrad's exception. Nothing else
// escapes, nothing crashes, no sanitizer report.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "diffgrad/compat/scheduler_config.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const int steps = 1 + (data[0] & 63);
  const int mode = data[0] >> 6; // 0, 1: _class_name; 2: as_class; 3: sampler name
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  diffgrad::fuzz::expect_valid_or_diffgrad_error("scheduler_config", [&] {
    namespace compat = diffgrad::compat;
    compat::LoadOptions options;
    if (mode == 2) options.as_class = compat::supported_scheduler_classes()[steps % 4];
    if (mode == 3) {
      const auto names = compat::sampler_names();
      options.sampler = names[static_cast<std::size_t>(steps) % names.size()];
    }
    const compat::SchedulerConfig config = compat::load_scheduler_config(text, options);
    if (config.class_name.empty())
      diffgrad::fuzz::finding("scheduler_config", "a loaded config without a class name");
    // Building the table and the setup is O(num_train_timesteps); the reader caps it at 10^6,
    // so keep the fuzzer fast on the common small tables and skip the huge ones.
    if (config.training.num_train_timesteps > 20000) return;
    const compat::Sampler sampler = compat::make_sampler(config, steps);
    if (sampler.nodes().size() != sampler.timesteps().size() + 1)
      diffgrad::fuzz::finding("scheduler_config", "nodes != timesteps + 1");
    for (const auto& node : sampler.nodes())
      if (!(node.alpha >= 0.0 && node.alpha <= 1.0 && node.sigma >= 0.0 && node.sigma <= 1.0))
        diffgrad::fuzz::finding("scheduler_config", "a node outside 0 <= alpha, sigma <= 1");
  });
  return 0;
}
