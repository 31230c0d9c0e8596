// libFuzzer target: diffgrad's validation of scheduler numbers given directly, not through
// JSON (compat/diffusers.hpp + compat/scheduler_config.hpp's Sampler): a SchedulerConfig struct
// filled with arbitrary numbers (training table: num_train_timesteps, beta_start / beta_end,
// trained_betas; scheduler fields: solver_order, steps_offset, spacing, final sigmas,
// lambda_min_clipped, karras / lu flags, eta, thresholding values), num_inference_steps, then
// the schedule, the sampler, and a 2-step-or-more sample of a 2 x 3 batch through a fixed
// linear network.
//
// This is the "validation around model loading" entry point for numbers a user reads from an
// untrusted file (the torch adapter's own validation layer was not available when the target
// was written, docs/fuzzing.md).
//
// Invariant: every stage either succeeds or throws diffgrad::invalid_argument /
// diffgrad::numerical_error; no crash, no sanitizer report, no other exception. A built sampler
// has one node more than timesteps, and a sample that returns is finite (check_finite is on).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/scheduler_config.hpp"
#include "fuzz_common.hpp"

namespace {

/// A fixed network: out = 0.3 x + 0.001 model_time (finite for finite input).
struct LinearNetwork {
  template <class State> void eps(const State& x, double model_time, State& out) const {
    out = (0.3 * x).array() + 0.001 * model_time;
  }
};

/// Mostly ordinary values, sometimes anything (NaN, Inf, huge, negative).
double pick_double(FuzzedDataProvider& p, double lo, double hi) {
  switch (p.ConsumeIntegralInRange<int>(0, 3)) {
  case 0: return p.ConsumeFloatingPointInRange<double>(lo, hi);
  case 1: return p.ConsumeFloatingPoint<double>();
  case 2: {
    const double specials[] = {0.0,      -0.0,      1.0,    -1.0,  NAN,
                               INFINITY, -INFINITY, 1e-300, 1e300, 0.9999999999999999};
    return specials[p.ConsumeIntegralInRange<int>(0, 9)];
  }
  default: {
    std::uint64_t bits = p.ConsumeIntegral<std::uint64_t>();
    double v = 0;
    static_assert(sizeof v == sizeof bits);
    __builtin_memcpy(&v, &bits, sizeof v);
    return v;
  }
  }
}

int pick_int(FuzzedDataProvider& p, int lo, int hi) {
  return p.ConsumeBool() ? p.ConsumeIntegralInRange<int>(lo, hi) : p.ConsumeIntegral<int>();
}

template <class Enum> Enum pick_enum(FuzzedDataProvider& p, int count) {
  return static_cast<Enum>(p.ConsumeIntegralInRange<int>(0, count - 1));
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider p(data, size);
  diffgrad::fuzz::expect_valid_or_diffgrad_error("scheduler_numbers", [&] {
    namespace compat = diffgrad::compat;
    using diffgrad::DpmAlgorithm;
    using diffgrad::DpmSolverType;
    compat::SchedulerConfig config;
    auto& t = config.training;
    // Small tables keep one execution fast; the size checks are the same for large ones.
    t.num_train_timesteps = pick_int(p, -2, 200);
    if (t.num_train_timesteps > 4000) t.num_train_timesteps = 4000;
    t.beta_schedule = pick_enum<diffgrad::BetaSchedule>(p, 3);
    t.beta_start = pick_double(p, 0.0, 0.01);
    t.beta_end = pick_double(p, 0.0, 0.1);
    if (p.ConsumeIntegralInRange<int>(0, 7) == 0) {
      const int n = p.ConsumeIntegralInRange<int>(0, 210);
      for (int i = 0; i < n; ++i) t.trained_betas.push_back(pick_double(p, 1e-5, 0.05));
    }
    config.prediction_type = pick_enum<diffgrad::models::PredictionType>(p, 4);
    config.thresholding.thresholding = p.ConsumeBool();
    config.thresholding.clip_sample = p.ConsumeBool();
    config.thresholding.dynamic_thresholding_ratio = pick_double(p, 0.5, 1.0);
    config.thresholding.sample_max_value = pick_double(p, 0.1, 10.0);
    const int order = pick_int(p, 0, 4);
    // The whole int range: offsets near INT_MAX once overflowed k * ratio + steps_offset
    // (fuzz/corpus/scheduler_numbers/steps_offset-overflow replays that input).
    const int steps_offset = pick_int(p, -2, 3);
    const auto spacing = pick_enum<compat::TimestepSpacing>(p, 3);
    const auto final_sigmas = pick_enum<compat::FinalSigmas>(p, 2);
    const auto algorithm = pick_enum<DpmAlgorithm>(p, 4);
    const auto solver_type = pick_enum<DpmSolverType>(p, 2);
    const double lambda_min_clipped = pick_double(p, -20.0, 5.0);
    const bool flag_a = p.ConsumeBool(), flag_b = p.ConsumeBool(), flag_c = p.ConsumeBool();
    const bool trailing_wrap = p.ConsumeBool();
    switch (p.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: {
      compat::DdimSchedulerConfig c;
      c.num_train_timesteps = t.num_train_timesteps;
      c.timestep_spacing = spacing;
      c.steps_offset = steps_offset;
      c.set_alpha_to_one = flag_a;
      c.prediction_type = config.prediction_type;
      c.clip_sample = config.thresholding.clip_sample;
      c.clip_sample_range = pick_double(p, 0.5, 2.0);
      c.thresholding = config.thresholding.thresholding;
      c.dynamic_thresholding_ratio = config.thresholding.dynamic_thresholding_ratio;
      c.sample_max_value = config.thresholding.sample_max_value;
      c.quirks.trailing_wrap = trailing_wrap;
      config.class_name = "DDIMScheduler";
      config.scheduler = c;
      break;
    }
    case 1: {
      compat::DpmSolverMultistepSchedulerConfig c;
      c.num_train_timesteps = t.num_train_timesteps;
      c.solver_order = order;
      c.algorithm_type = algorithm;
      c.solver_type = solver_type;
      c.lower_order_final = flag_a;
      c.euler_at_final = flag_b;
      c.use_karras_sigmas = flag_c;
      c.use_lu_lambdas = p.ConsumeBool();
      c.final_sigmas_type = final_sigmas;
      c.lambda_min_clipped = lambda_min_clipped;
      c.timestep_spacing = spacing;
      c.steps_offset = steps_offset;
      c.quirks.trailing_wrap = trailing_wrap;
      config.class_name = "DPMSolverMultistepScheduler";
      config.scheduler = c;
      break;
    }
    case 2: {
      compat::DpmSolverSinglestepSchedulerConfig c;
      c.num_train_timesteps = t.num_train_timesteps;
      c.solver_order = order;
      c.algorithm_type = algorithm == DpmAlgorithm::sde_dpmsolver      ? DpmAlgorithm::dpmsolver
                         : algorithm == DpmAlgorithm::sde_dpmsolver_pp ? DpmAlgorithm::dpmsolver_pp
                                                                       : algorithm;
      c.solver_type = solver_type;
      c.lower_order_final = flag_a;
      c.use_karras_sigmas = flag_c;
      c.final_sigmas_type = final_sigmas;
      c.lambda_min_clipped = lambda_min_clipped;
      config.class_name = "DPMSolverSinglestepScheduler";
      config.scheduler = c;
      break;
    }
    default: {
      compat::DeisMultistepSchedulerConfig c;
      c.num_train_timesteps = t.num_train_timesteps;
      c.solver_order = order;
      c.lower_order_final = flag_a;
      c.timestep_spacing = spacing;
      c.steps_offset = steps_offset;
      c.quirks.trailing_wrap = trailing_wrap;
      config.class_name = "DEISMultistepScheduler";
      config.scheduler = c;
      break;
    }
    }
    compat::SamplerOptions options;
    options.eta = p.ConsumeBool() ? 0.0 : pick_double(p, 0.0, 1.0);
    options.use_clipped_model_output = p.ConsumeBool();
    const int num_inference_steps = pick_int(p, -1, 30);
    const diffgrad::DiscreteSchedule schedule = t.schedule();
    const compat::Sampler sampler(config, schedule, num_inference_steps, options);
    if (sampler.nodes().size() != sampler.timesteps().size() + 1)
      diffgrad::fuzz::finding("scheduler_numbers", "nodes != timesteps + 1");
    if (sampler.nodes().size() > 4002)
      diffgrad::fuzz::finding("scheduler_numbers", "more nodes than the table allows");
    const diffgrad::EigenBackend<double> backend;
    diffgrad::EigenBackend<double>::state_type x(2, 3);
    x << 0.5, -1.0, 2.0, 0.25, 0.0, -0.75;
    LinearNetwork network;
    diffgrad::SampleOptions sample_options;
    sample_options.seed = 7;
    sampler.sample(backend, network, x, sample_options);
    if (!x.allFinite())
      diffgrad::fuzz::finding("scheduler_numbers", "a returned sample is not finite");
  });
  return 0;
}
