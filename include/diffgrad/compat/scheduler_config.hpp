#pragma once
// Choosing a sampler by name or from a diffusers `scheduler_config.json`.
//
//  * load_scheduler_config(json_text) / load_scheduler_config_file(path): the config of
//    DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler or
//    DEISMultistepScheduler (named by "_class_name", or chosen by LoadOptions) mapped key by key
//    onto compat/diffusers.hpp's config structs. Keys the class does not have are listed in
//    SchedulerConfig::warnings (diffusers ignores them too, e.g. a PNDMScheduler config loaded
//    into DPMSolverMultistepScheduler); values diffgrad cannot reproduce are refused with the
//    key, the value and the supported values named; malformed JSON is refused with the parser's
//    position.
//  * scheduler_config_for(name) and make_sampler(name or config, n): a sampler name ("ddim",
//    "dpm++2m", "dpm++2m-karras", ...; sampler_names()) or a loaded config -> the compat layer's
//    timesteps, nodes and scheme plus the model adapter (prediction type, thresholding, DDIM's x0
//    correction), ready for diffgrad::sample / run_scheme.
//
// The JSON is read with nlohmann-json (an optional dependency, header-only): without
// <nlohmann/json.hpp> on the include path this header declares nothing and defines
// DIFFGRAD_HAS_SCHEDULER_CONFIG to 0. docs/compat_diffusers.md ("Loading a
// scheduler_config.json") lists the keys; tests/json_scheduler_test.cpp replays the compat
// reference runs through it.
#if __has_include(<nlohmann/json.hpp>)
#define DIFFGRAD_HAS_SCHEDULER_CONFIG 1

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/models/thresholding.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::compat {

/// The training noise table a scheduler config describes (beta_schedule, beta_start, beta_end,
/// trained_betas, num_train_timesteps).
struct TrainingTable {
  int num_train_timesteps = 1000;
  BetaSchedule beta_schedule = BetaSchedule::linear;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::vector<double> trained_betas; ///< non-empty: these betas (beta_schedule is then unused)

  /// diffusers' alphas_cumprod, bit for bit: diffusers builds the betas in float32
  /// (torch.linspace, whose CPU kernel evaluates start + step * i with one rounding (an FMA),
  /// the second half counted down from the end), alphas = 1 - betas in float32, and
  /// torch.cumprod accumulates in double and rounds each output to float32. The values are
  /// returned upcast to double. (Checked against diffusers 0.42.1 / torch 2.x on x86-64 for the
  /// linear and scaled_linear tables, tests/json_scheduler_test.cpp.)
  std::vector<double> diffusers_alphas_cumprod() const {
    const int n = num_train_timesteps;
    diffgrad::detail::require(n >= 2, "compat::TrainingTable", "num_train_timesteps", ">= 2", n);
    std::vector<float> betas(static_cast<std::size_t>(n));
    if (!trained_betas.empty()) {
      diffgrad::detail::require(
          static_cast<int>(trained_betas.size()) == n, "compat::TrainingTable", "trained_betas",
          "num_train_timesteps values", static_cast<double>(trained_betas.size()));
      for (std::size_t i = 0; i < betas.size(); ++i)
        betas[i] = static_cast<float>(trained_betas[i]);
    } else if (beta_schedule == BetaSchedule::squaredcos_cap_v2) {
      // betas_for_alpha_bar works in Python floats (double); torch.tensor rounds to float32.
      const auto betas_double = make_betas(beta_schedule, n, beta_start, beta_end);
      for (std::size_t i = 0; i < betas.size(); ++i) betas[i] = static_cast<float>(betas_double[i]);
    } else {
      const bool scaled = beta_schedule == BetaSchedule::scaled_linear;
      const auto start = static_cast<float>(scaled ? std::sqrt(beta_start) : beta_start);
      const auto end = static_cast<float>(scaled ? std::sqrt(beta_end) : beta_end);
      const float step = (end - start) / static_cast<float>(n - 1);
      const int half = n / 2;
      for (int i = 0; i < n; ++i) {
        const float v = i < half ? std::fma(step, static_cast<float>(i), start)
                                 : std::fma(-step, static_cast<float>(n - 1 - i), end);
        // v * v in float32: the exact double product rounded once.
        betas[static_cast<std::size_t>(i)] =
            scaled ? static_cast<float>(static_cast<double>(v) * static_cast<double>(v)) : v;
      }
    }
    std::vector<double> alphas_cumprod(betas.size());
    double product = 1.0;
    for (std::size_t i = 0; i < betas.size(); ++i) {
      // 1 - beta is exact in double; the cast rounds it as float32 arithmetic would.
      const auto alpha = static_cast<float>(1.0 - static_cast<double>(betas[i]));
      product *= static_cast<double>(alpha);
      alphas_cumprod[i] = static_cast<double>(static_cast<float>(product));
    }
    return alphas_cumprod;
  }

  /// The table as diffusers computes it (diffusers_alphas_cumprod), the model fed the integer
  /// timestep. make_sampler(config, n) uses it, so a loaded config reproduces diffusers' numbers
  /// without the user passing the table.
  DiscreteSchedule schedule() const {
    return DiscreteSchedule::from_alphas_cumprod(diffusers_alphas_cumprod(),
                                                 DiscreteTimeInput::timestep_index);
  }
};

/// One of the scheduler configs of compat/diffusers.hpp.
using SchedulerVariant =
    std::variant<DdimSchedulerConfig, DpmSolverMultistepSchedulerConfig,
                 DpmSolverSinglestepSchedulerConfig, DeisMultistepSchedulerConfig>;

/// A loaded (or named) scheduler config: the scheduler's own fields, the training table and
/// the model-side fields (prediction_type, thresholding; for DDIM also kept in its struct).
struct SchedulerConfig {
  std::string class_name; ///< "DDIMScheduler", "DPMSolverMultistepScheduler", ...
  SchedulerVariant scheduler;
  TrainingTable training;
  PredictionType prediction_type = PredictionType::eps;
  models::ThresholdingOptions thresholding; ///< thresholding (+ DDIM's clip_sample)
  std::vector<std::string> warnings;        ///< keys read but not understood (ignored)
};

/// How to read a config. By default the class is the file's "_class_name".
struct LoadOptions {
  /// Read the keys into this class instead ("DPMSolverMultistepScheduler", ...), as diffusers'
  /// `OtherScheduler.from_config(config)` does: keys the class does not have become warnings.
  std::string as_class;
  /// Read the keys into this sampler's class and apply the name's options on top (like
  /// `from_config(config, use_karras_sigmas=True)`), e.g. "dpm++2m-karras". Overrides as_class.
  std::string sampler;
};

namespace detail {

inline constexpr const char* kLoadWhere = "compat::load_scheduler_config";

inline const std::vector<std::string>& supported_classes() {
  static const std::vector<std::string> names{"DDIMScheduler", "DPMSolverMultistepScheduler",
                                              "DPMSolverSinglestepScheduler",
                                              "DEISMultistepScheduler"};
  return names;
}

inline std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i == 0 ? "" : sep) + items[i];
  return out;
}

/// Python's json module writes float('inf') as the bare tokens Infinity / -Infinity (diffusers'
/// default lambda_min_clipped is -Infinity), which strict JSON parsers reject. Outside strings
/// they are replaced by the strings "\u221E" / "-\u221E" (the same number of bytes, so the
/// parser's error positions stay those of the original text); NaN is refused.
inline std::string replace_python_infinity(std::string_view text) {
  std::string out(text);
  bool in_string = false;
  const auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; };
  for (std::size_t i = 0; i < out.size(); ++i) {
    const char c = out[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
      continue;
    }
    const bool word_start = i == 0 || !is_word(out[i - 1]);
    if (!word_start) continue;
    const auto token_is = [&](std::string_view word) {
      return out.compare(i, word.size(), word) == 0 &&
             (i + word.size() == out.size() || !is_word(out[i + word.size()]));
    };
    if (token_is("Infinity")) {
      const bool negative = i > 0 && out[i - 1] == '-';
      const std::string_view replacement = negative ? R"("-\u221E")" : R"("\u221E")";
      const std::size_t start = negative ? i - 1 : i;
      out.replace(start, replacement.size(), replacement);
      i = start + replacement.size() - 1;
    } else if (token_is("NaN")) {
      std::size_t line = 1, column = 1;
      for (std::size_t k = 0; k < i; ++k) {
        if (out[k] == '\n') {
          ++line;
          column = 1;
        } else {
          ++column;
        }
      }
      throw diffgrad::invalid_argument(diffgrad::detail::concat(
          kLoadWhere, ": argument 'json_text' expected JSON, got NaN at line ", line, ", column ",
          column, " (no scheduler key takes NaN)"));
    }
  }
  return out;
}

inline const std::string& infinity_string() {
  static const std::string s = "\u221E";
  return s;
}

/// Parses a scheduler_config.json text (Python's Infinity allowed). Errors carry the parser's
/// message and byte position.
inline nlohmann::json parse_config_json(std::string_view text) {
  const std::string prepared = replace_python_infinity(text);
  try {
    return nlohmann::json::parse(prepared);
  } catch (const nlohmann::json::parse_error& e) {
    throw diffgrad::invalid_argument(diffgrad::detail::concat(
        kLoadWhere, ": argument 'json_text' expected a JSON object, got malformed JSON (", e.what(),
        "; byte ", e.byte, ")"));
  } catch (const nlohmann::json::exception& e) {
    // e.g. out_of_range.406: a number beyond double's range ("1e400"); the message has it.
    throw diffgrad::invalid_argument(diffgrad::detail::concat(
        kLoadWhere, ": argument 'json_text' expected a JSON object, got unreadable JSON (",
        e.what(), ")"));
  }
}

/// Reads the keys of one scheduler class from a JSON object, remembering which it used.
class KeyReader {
public:
  KeyReader(const nlohmann::json& object, std::string class_name)
      : object_(object), class_name_(std::move(class_name)) {}

  const nlohmann::json* find(const char* key) {
    seen_.insert(key);
    const auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }

  [[noreturn]] void fail(const char* key, const std::string& expected,
                         const nlohmann::json& value) const {
    diffgrad::detail::throw_argument(kLoadWhere, key,
                                     diffgrad::detail::concat(expected, " (", class_name_, ")"),
                                     describe(value));
  }

  static std::string describe(const nlohmann::json& value) {
    if (value.is_string() && value.get<std::string>() == infinity_string()) return "Infinity";
    if (value.is_string() && value.get<std::string>() == "-" + infinity_string())
      return "-Infinity";
    return value.dump() + " (" + value.type_name() + ")";
  }

  void read(const char* key, bool& out) {
    const auto* v = find(key);
    if (v == nullptr) return;
    if (!v->is_boolean()) fail(key, "true or false", *v);
    out = v->get<bool>();
  }

  void read(const char* key, int& out, int lo, int hi) {
    const auto* v = find(key);
    if (v == nullptr) return;
    const std::string expected = diffgrad::detail::concat("an integer in [", lo, ", ", hi, "]");
    if (!v->is_number()) fail(key, expected, *v);
    const double d = v->get<double>();
    if (!(d == std::floor(d) && d >= lo && d <= hi)) fail(key, expected, *v);
    out = static_cast<int>(d);
  }

  /// A number; infinities (Python's Infinity) only where `allow_infinite`.
  void read(const char* key, double& out, bool allow_infinite = false) {
    const auto* v = find(key);
    if (v == nullptr) return;
    if (allow_infinite && v->is_string()) {
      const auto& s = v->get_ref<const std::string&>();
      if (s == infinity_string()) {
        out = std::numeric_limits<double>::infinity();
        return;
      }
      if (s == "-" + infinity_string()) {
        out = -std::numeric_limits<double>::infinity();
        return;
      }
    }
    if (!v->is_number())
      fail(key, allow_infinite ? "a number or +-Infinity" : "a finite number", *v);
    out = v->get<double>();
  }

  /// A number inside (lo, hi] or (lo, hi) (`hi_open`), named in the error.
  void read_in(const char* key, double& out, double lo, double hi, bool hi_open) {
    const auto* v = find(key);
    if (v == nullptr) return;
    const std::string expected =
        hi == std::numeric_limits<double>::max()
            ? diffgrad::detail::concat("a finite number > ", lo)
            : diffgrad::detail::concat("a number in (", lo, ", ", hi, hi_open ? ")" : "]");
    if (!v->is_number()) fail(key, expected, *v);
    const double d = v->get<double>();
    if (!(d > lo && (hi_open ? d < hi : d <= hi))) fail(key, expected, *v);
    out = d;
  }

  /// A string from a fixed set, mapped to a value.
  template <class T>
  void read(const char* key, T& out, const std::vector<std::pair<std::string, T>>& choices) {
    const auto* v = find(key);
    if (v == nullptr) return;
    if (v->is_string())
      for (const auto& [name, value] : choices)
        if (v->get_ref<const std::string&>() == name) {
          out = value;
          return;
        }
    fail(key, "one of " + choice_names(choices), *v);
  }

  /// A key diffgrad reads but supports only one value of (the diffusers default), e.g.
  /// use_flow_sigmas = false. `why` says what the other values would need.
  void require_value(const char* key, const nlohmann::json& supported, const char* why) {
    const auto* v = find(key);
    if (v == nullptr || *v == supported) return;
    fail(key, diffgrad::detail::concat(supported.dump(), " only: ", why), *v);
  }

  /// A key whose value does not change diffgrad's numbers for the configs it accepts.
  void accept(const char* key) { seen_.insert(key); }

  /// Keys of the object this class did not read ("_"-prefixed metadata excluded).
  std::vector<std::string> unread_keys() const {
    std::vector<std::string> out;
    for (const auto& [key, value] : object_.items())
      if (!key.empty() && key[0] != '_' && seen_.count(key) == 0) out.push_back(key);
    return out;
  }

private:
  template <class T>
  static std::string choice_names(const std::vector<std::pair<std::string, T>>& choices) {
    std::string out;
    for (std::size_t i = 0; i < choices.size(); ++i)
      out += (i == 0 ? "\"" : ", \"") + choices[i].first + "\"";
    return out;
  }

  const nlohmann::json& object_;
  std::string class_name_;
  std::set<std::string, std::less<>> seen_;
};

inline const std::vector<std::pair<std::string, TimestepSpacing>>& spacing_choices() {
  static const std::vector<std::pair<std::string, TimestepSpacing>> c{
      {"linspace", TimestepSpacing::linspace},
      {"leading", TimestepSpacing::leading},
      {"trailing", TimestepSpacing::trailing}};
  return c;
}
inline const std::vector<std::pair<std::string, FinalSigmas>>& final_sigmas_choices() {
  static const std::vector<std::pair<std::string, FinalSigmas>> c{
      {"zero", FinalSigmas::zero}, {"sigma_min", FinalSigmas::sigma_min}};
  return c;
}
inline const std::vector<std::pair<std::string, DpmSolverType>>& solver_type_choices() {
  static const std::vector<std::pair<std::string, DpmSolverType>> c{
      {"midpoint", DpmSolverType::midpoint}, {"heun", DpmSolverType::heun}};
  return c;
}

/// The keys every supported class shares: the training table and the model side.
inline void read_common(KeyReader& r, SchedulerConfig& out) {
  TrainingTable& t = out.training;
  r.read("num_train_timesteps", t.num_train_timesteps, 2, 1000000);
  r.read_in("beta_start", t.beta_start, 0.0, 1.0, true);
  r.read_in("beta_end", t.beta_end, 0.0, 1.0, true);
  r.read("beta_schedule", t.beta_schedule,
         std::vector<std::pair<std::string, BetaSchedule>>{
             {"linear", BetaSchedule::linear},
             {"scaled_linear", BetaSchedule::scaled_linear},
             {"squaredcos_cap_v2", BetaSchedule::squaredcos_cap_v2}});
  if (const auto* v = r.find("trained_betas"); v != nullptr && !v->is_null()) {
    const std::string expected = "null or an array of num_train_timesteps numbers in (0, 1)";
    if (!v->is_array()) r.fail("trained_betas", expected, *v);
    t.trained_betas.clear();
    for (const auto& b : *v) {
      if (!b.is_number() || !(b.get<double>() > 0.0 && b.get<double>() < 1.0))
        r.fail("trained_betas", expected, b);
      t.trained_betas.push_back(b.get<double>());
    }
    if (static_cast<int>(t.trained_betas.size()) != t.num_train_timesteps)
      diffgrad::detail::throw_argument(
          kLoadWhere, "trained_betas",
          diffgrad::detail::concat(t.num_train_timesteps, " values (num_train_timesteps)"),
          diffgrad::detail::concat(t.trained_betas.size(), " values"));
  }
  r.read("prediction_type", out.prediction_type,
         std::vector<std::pair<std::string, PredictionType>>{{"epsilon", PredictionType::eps},
                                                             {"sample", PredictionType::x0},
                                                             {"v_prediction", PredictionType::v}});
  r.read("thresholding", out.thresholding.thresholding);
  r.read_in("dynamic_thresholding_ratio", out.thresholding.dynamic_thresholding_ratio, 0.0, 1.0,
            false);
  r.read_in("sample_max_value", out.thresholding.sample_max_value, 0.0,
            std::numeric_limits<double>::max(), false);
  r.require_value("rescale_betas_zero_snr", false,
                  "the zero-SNR table ends at alpha = 0, a node diffgrad's DiscreteSchedule "
                  "rejects");
}

/// Sigma spacings and model-output variants diffgrad does not map.
inline void refuse_other_sigmas(KeyReader& r) {
  r.require_value("use_exponential_sigmas", false, "exponential sigmas are not mapped");
  r.require_value("use_beta_sigmas", false, "beta sigmas are not mapped");
  r.require_value("use_flow_sigmas", false, "flow-matching sigmas are not mapped");
  r.require_value("use_dynamic_shifting", false, "dynamic shifting is not mapped");
  // Used only with flow sigmas / dynamic shifting, which are refused above.
  r.accept("flow_shift");
  r.accept("time_shift_type");
}

inline DdimSchedulerConfig read_ddim(KeyReader& r, SchedulerConfig& out) {
  DdimSchedulerConfig c;
  out.thresholding.clip_sample = c.clip_sample; // diffusers' DDIM default: true
  read_common(r, out);
  r.read("timestep_spacing", c.timestep_spacing, spacing_choices());
  r.read("steps_offset", c.steps_offset, 0, 1000000);
  r.read("set_alpha_to_one", c.set_alpha_to_one);
  r.read("clip_sample", out.thresholding.clip_sample);
  r.read_in("clip_sample_range", out.thresholding.clip_sample_range, 0.0,
            std::numeric_limits<double>::max(), false);
  c.num_train_timesteps = out.training.num_train_timesteps;
  c.prediction_type = out.prediction_type;
  c.clip_sample = out.thresholding.clip_sample;
  c.clip_sample_range = out.thresholding.clip_sample_range;
  c.thresholding = out.thresholding.thresholding;
  c.dynamic_thresholding_ratio = out.thresholding.dynamic_thresholding_ratio;
  c.sample_max_value = out.thresholding.sample_max_value;
  return c;
}

inline DpmSolverMultistepSchedulerConfig read_multistep(KeyReader& r, SchedulerConfig& out) {
  DpmSolverMultistepSchedulerConfig c;
  read_common(r, out);
  refuse_other_sigmas(r);
  r.read("solver_order", c.solver_order, 1, 3);
  r.read("algorithm_type", c.algorithm_type,
         std::vector<std::pair<std::string, DpmAlgorithm>>{
             {"dpmsolver++", DpmAlgorithm::dpmsolver_pp},
             {"dpmsolver", DpmAlgorithm::dpmsolver},
             {"sde-dpmsolver++", DpmAlgorithm::sde_dpmsolver_pp},
             {"sde-dpmsolver", DpmAlgorithm::sde_dpmsolver}});
  r.read("solver_type", c.solver_type, solver_type_choices());
  r.read("lower_order_final", c.lower_order_final);
  r.read("euler_at_final", c.euler_at_final);
  r.read("use_karras_sigmas", c.use_karras_sigmas);
  r.read("use_lu_lambdas", c.use_lu_lambdas);
  r.read("final_sigmas_type", c.final_sigmas_type, final_sigmas_choices());
  r.read("lambda_min_clipped", c.lambda_min_clipped, true);
  r.read("timestep_spacing", c.timestep_spacing, spacing_choices());
  r.read("steps_offset", c.steps_offset, 0, 1000000);
  r.require_value("variance_type", nullptr,
                  "a learned variance (\"learned\", \"learned_range\") is not mapped");
  c.num_train_timesteps = out.training.num_train_timesteps;
  return c;
}

inline DpmSolverSinglestepSchedulerConfig read_singlestep(KeyReader& r, SchedulerConfig& out) {
  DpmSolverSinglestepSchedulerConfig c;
  read_common(r, out);
  refuse_other_sigmas(r);
  r.read("solver_order", c.solver_order, 1, 3);
  r.read("algorithm_type", c.algorithm_type,
         std::vector<std::pair<std::string, DpmAlgorithm>>{
             {"dpmsolver++", DpmAlgorithm::dpmsolver_pp}, {"dpmsolver", DpmAlgorithm::dpmsolver}});
  r.read("solver_type", c.solver_type, solver_type_choices());
  r.read("lower_order_final", c.lower_order_final);
  r.read("use_karras_sigmas", c.use_karras_sigmas);
  r.read("final_sigmas_type", c.final_sigmas_type, final_sigmas_choices());
  r.read("lambda_min_clipped", c.lambda_min_clipped, true);
  r.require_value("variance_type", nullptr,
                  "a learned variance (\"learned\", \"learned_range\") is not mapped");
  c.num_train_timesteps = out.training.num_train_timesteps;
  return c;
}

inline DeisMultistepSchedulerConfig read_deis(KeyReader& r, SchedulerConfig& out) {
  DeisMultistepSchedulerConfig c;
  read_common(r, out);
  refuse_other_sigmas(r);
  r.read("solver_order", c.solver_order, 1, 3);
  r.require_value("algorithm_type", "deis", "diffusers implements only \"deis\"");
  r.require_value("solver_type", "logrho", "diffusers implements only \"logrho\"");
  r.require_value("use_karras_sigmas", false, "Karras sigmas are mapped for DPM-Solver only");
  r.read("lower_order_final", c.lower_order_final);
  r.read("timestep_spacing", c.timestep_spacing, spacing_choices());
  r.read("steps_offset", c.steps_offset, 0, 1000000);
  c.num_train_timesteps = out.training.num_train_timesteps;
  return c;
}

/// One sampler name: its class and the options it sets on that class's config.
struct SamplerName {
  const char* name;
  const char* class_name;
  const char* description;
  void (*apply)(SchedulerConfig&);
};

inline DpmSolverMultistepSchedulerConfig& multistep_of(SchedulerConfig& c) {
  return std::get<DpmSolverMultistepSchedulerConfig>(c.scheduler);
}
inline DpmSolverSinglestepSchedulerConfig& singlestep_of(SchedulerConfig& c) {
  return std::get<DpmSolverSinglestepSchedulerConfig>(c.scheduler);
}

inline const std::vector<SamplerName>& sampler_table() {
  static const std::vector<SamplerName> table{
      {"ddim", "DDIMScheduler", "DDIM (eta from SamplerOptions, default 0)",
       [](SchedulerConfig&) {}},
      {"dpm++2m", "DPMSolverMultistepScheduler", "DPM-Solver++ multistep, order 2",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         multistep_of(c).solver_order = 2;
       }},
      {"dpm++2m-karras", "DPMSolverMultistepScheduler", "dpm++2m on Karras noise levels",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         multistep_of(c).solver_order = 2;
         multistep_of(c).use_karras_sigmas = true;
       }},
      {"dpm++3m", "DPMSolverMultistepScheduler", "DPM-Solver++ multistep, order 3",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         multistep_of(c).solver_order = 3;
       }},
      {"dpm++3m-karras", "DPMSolverMultistepScheduler", "dpm++3m on Karras noise levels",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         multistep_of(c).solver_order = 3;
         multistep_of(c).use_karras_sigmas = true;
       }},
      {"dpm2m", "DPMSolverMultistepScheduler",
       "DPM-Solver (noise prediction) multistep, order 2, final sigma_min",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::dpmsolver;
         multistep_of(c).solver_order = 2;
         multistep_of(c).final_sigmas_type = FinalSigmas::sigma_min;
       }},
      {"dpm++2m-sde", "DPMSolverMultistepScheduler", "SDE-DPM-Solver++ multistep, order 2",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::sde_dpmsolver_pp;
         multistep_of(c).solver_order = 2;
       }},
      {"dpm++2m-sde-karras", "DPMSolverMultistepScheduler", "dpm++2m-sde on Karras noise levels",
       [](SchedulerConfig& c) {
         multistep_of(c).algorithm_type = DpmAlgorithm::sde_dpmsolver_pp;
         multistep_of(c).solver_order = 2;
         multistep_of(c).use_karras_sigmas = true;
       }},
      {"dpm++2s", "DPMSolverSinglestepScheduler", "DPM-Solver++ singlestep, order 2",
       [](SchedulerConfig& c) {
         singlestep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         singlestep_of(c).solver_order = 2;
       }},
      {"dpm++2s-karras", "DPMSolverSinglestepScheduler", "dpm++2s on Karras noise levels",
       [](SchedulerConfig& c) {
         singlestep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         singlestep_of(c).solver_order = 2;
         singlestep_of(c).use_karras_sigmas = true;
       }},
      {"dpm++3s", "DPMSolverSinglestepScheduler", "DPM-Solver++ singlestep, order 3",
       [](SchedulerConfig& c) {
         singlestep_of(c).algorithm_type = DpmAlgorithm::dpmsolver_pp;
         singlestep_of(c).solver_order = 3;
       }},
      {"deis2m", "DEISMultistepScheduler", "DEIS (log-rho) multistep, order 2",
       [](SchedulerConfig& c) {
         std::get<DeisMultistepSchedulerConfig>(c.scheduler).solver_order = 2;
       }},
      {"deis3m", "DEISMultistepScheduler", "DEIS (log-rho) multistep, order 3",
       [](SchedulerConfig& c) {
         std::get<DeisMultistepSchedulerConfig>(c.scheduler).solver_order = 3;
       }},
  };
  return table;
}

/// Lower case, separators (' ', '_', '-') dropped, "pp" spelled "++": "DPM++ 2M Karras",
/// "dpmpp_2m_karras" and "dpm++2m-karras" are one name.
inline std::string normalize_name(std::string_view name) {
  std::string out;
  for (char c : name)
    if (c != ' ' && c != '_' && c != '-')
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (out.rfind("dpmpp", 0) == 0) out.replace(3, 2, "++");
  return out;
}

inline const SamplerName& find_sampler(std::string_view name, const char* where) {
  const std::string key = normalize_name(name);
  for (const auto& s : sampler_table())
    if (normalize_name(s.name) == key) return s;
  std::vector<std::string> names;
  for (const auto& s : sampler_table()) names.emplace_back(s.name);
  diffgrad::detail::throw_argument(where, "name", "one of " + join(names),
                                   "\"" + std::string(name) + "\"");
}

inline SchedulerConfig read_class(const nlohmann::json& object, const std::string& class_name) {
  SchedulerConfig out;
  out.class_name = class_name;
  KeyReader r(object, class_name);
  if (class_name == "DDIMScheduler") {
    out.scheduler = read_ddim(r, out);
  } else if (class_name == "DPMSolverMultistepScheduler") {
    out.scheduler = read_multistep(r, out);
  } else if (class_name == "DPMSolverSinglestepScheduler") {
    out.scheduler = read_singlestep(r, out);
  } else if (class_name == "DEISMultistepScheduler") {
    out.scheduler = read_deis(r, out);
  } else {
    diffgrad::detail::throw_argument(
        kLoadWhere, "_class_name", "one of " + join(supported_classes()), "\"" + class_name + "\"");
  }
  for (const auto& key : r.unread_keys())
    out.warnings.push_back("unknown key '" + key + "' ignored (not a " + class_name +
                           " option diffgrad reads)");
  return out;
}

} // namespace detail

/// The supported sampler names (see scheduler_config_for).
inline std::vector<std::string> sampler_names() {
  std::vector<std::string> names;
  for (const auto& s : detail::sampler_table()) names.emplace_back(s.name);
  return names;
}

/// The diffusers classes load_scheduler_config maps.
inline std::vector<std::string> supported_scheduler_classes() {
  return detail::supported_classes();
}

/// Reads a diffusers scheduler config (the text of a scheduler_config.json). Throws
/// diffgrad::invalid_argument for malformed JSON (with the parser's position), a missing or
/// unsupported "_class_name" (listing the supported ones), a key of the wrong type, and a value
/// diffgrad cannot reproduce (naming the key, the value and the supported values). Keys the
/// class does not have are listed in the result's `warnings`.
inline SchedulerConfig load_scheduler_config(std::string_view json_text,
                                             const LoadOptions& options = {}) {
  const nlohmann::json object = detail::parse_config_json(json_text);
  if (!object.is_object())
    diffgrad::detail::throw_argument(detail::kLoadWhere, "json_text",
                                     "a JSON object (a scheduler_config.json)",
                                     std::string(object.type_name()));
  const detail::SamplerName* named = nullptr;
  if (!options.sampler.empty()) named = &detail::find_sampler(options.sampler, detail::kLoadWhere);
  std::string class_name;
  if (named != nullptr) {
    class_name = named->class_name;
  } else if (!options.as_class.empty()) {
    class_name = options.as_class;
  } else {
    const auto it = object.find("_class_name");
    if (it == object.end())
      diffgrad::detail::throw_argument(detail::kLoadWhere, "_class_name",
                                       "the scheduler class (one of " +
                                           detail::join(detail::supported_classes()) +
                                           "), or LoadOptions::as_class / sampler",
                                       "no such key");
    if (!it->is_string())
      diffgrad::detail::throw_argument(detail::kLoadWhere, "_class_name", "a string",
                                       detail::KeyReader::describe(*it));
    class_name = it->get<std::string>();
  }
  SchedulerConfig config = detail::read_class(object, class_name);
  if (named != nullptr) named->apply(config);
  return config;
}

/// load_scheduler_config on a file's contents (e.g. a pipeline's scheduler/scheduler_config.json).
inline SchedulerConfig load_scheduler_config_file(const std::filesystem::path& path,
                                                  const LoadOptions& options = {}) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    diffgrad::detail::throw_argument("compat::load_scheduler_config_file", "path",
                                     "a readable file", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return load_scheduler_config(text.str(), options);
}

/// The config a sampler name stands for: its class with diffusers' defaults and the name's
/// options ("dpm++2m-karras" = DPMSolverMultistepScheduler(solver_order=2,
/// algorithm_type="dpmsolver++", use_karras_sigmas=True)). Unknown names are refused with the
/// supported ones listed. To keep a pipeline's training table, prediction type and spacing,
/// load its config with LoadOptions::sampler instead.
inline SchedulerConfig scheduler_config_for(std::string_view name) {
  const auto& s = detail::find_sampler(name, "compat::scheduler_config_for");
  SchedulerConfig config = detail::read_class(nlohmann::json::object(), s.class_name);
  s.apply(config);
  return config;
}

/// Step-time arguments of diffusers' DDIMScheduler.step (not part of its config).
struct SamplerOptions {
  double eta = 0.0;                      ///< DDIM only
  bool use_clipped_model_output = false; ///< DDIM only
};

/// A ready-to-run sampler: the compat layer's setup for a config and a step count, plus the
/// schedule and the model-side options. `visit` hands the scheme, the nodes and the model
/// adapter around a network to a callable; `sample` runs diffgrad::sample.
class Sampler {
public:
  using Setup =
      std::variant<DdimSetup, SchedulerSetup<DpmSolverMultistep>, SchedulerSetup<SdeDpmSolver>,
                   SchedulerSetup<DpmSolverSinglestep>, SchedulerSetup<DeisLogRho>>;

  Sampler(SchedulerConfig config, DiscreteSchedule schedule, int num_inference_steps,
          SamplerOptions options = {})
      : config_(std::move(config)), schedule_(std::move(schedule)),
        num_inference_steps_(num_inference_steps), options_(options),
        setup_(make_setup(config_, schedule_, num_inference_steps, options)) {}

  const SchedulerConfig& config() const { return config_; }
  const DiscreteSchedule& schedule() const { return schedule_; }
  const Setup& setup() const { return setup_; }
  int num_inference_steps() const { return num_inference_steps_; }
  /// diffusers' scheduler.timesteps (what the network is fed).
  const std::vector<int>& timesteps() const {
    return std::visit([](const auto& s) -> const std::vector<int>& { return s.timesteps; }, setup_);
  }
  /// One node per timestep, then the final node.
  const std::vector<Node>& nodes() const {
    return std::visit([](const auto& s) -> const std::vector<Node>& { return s.nodes; }, setup_);
  }
  bool stochastic() const {
    return std::visit([](const auto& s) { return s.scheme.stochastic(); }, setup_);
  }

  /// Calls f(scheme, std::span<const Node> nodes, model) with the model adapter this config
  /// implies around `network` (DDIM: compat::DdimModel; otherwise compat::scheduler_eps_model:
  /// prediction type and thresholding) and returns what f returns (the same type for every
  /// scheme). Scalar is the state's scalar type (DdimModel works on Eigen states).
  template <class Scalar = double, class Network, class F>
  decltype(auto) visit(Network& network, F&& f) const {
    return std::visit(
        [&](const auto& setup) -> decltype(auto) {
          using S = std::decay_t<decltype(setup)>;
          const std::span<const Node> nodes(setup.nodes);
          if constexpr (std::is_same_v<S, DdimSetup>) {
            DdimModel<Network, Scalar> model(
                network, schedule_, std::get<DdimSchedulerConfig>(config_.scheduler),
                num_inference_steps_, options_.eta, options_.use_clipped_model_output);
            return f(setup.scheme, nodes, model);
          } else {
            auto model =
                scheduler_eps_model(network, config_.prediction_type, config_.thresholding);
            return f(setup.scheme, nodes, model);
          }
        },
        setup_);
  }

  /// diffgrad::sample with this sampler: x holds x_T at nodes().front() on entry and the sample
  /// on exit. (Stochastic schemes draw diffgrad's Philox noise; to replay given noise use visit
  /// and run_scheme with SamplerWorkspace::given_noise.)
  template <class B, class Network, class Obs = NullObserver>
  SampleResult sample(const B& backend, Network& network, typename B::state_type& x,
                      const SampleOptions& sample_options = {}, Obs&& observer = {}) const {
    using Scalar = typename B::state_type::Scalar;
    return visit<Scalar>(network,
                         [&](const auto& scheme, std::span<const Node> nodes, auto& model) {
                           return diffgrad::sample(scheme, backend, schedule_, nodes, model, x,
                                                   sample_options, std::forward<Obs>(observer));
                         });
  }

private:
  static Setup make_setup(const SchedulerConfig& config, const DiscreteSchedule& schedule, int n,
                          const SamplerOptions& options) {
    const char* where = "compat::make_sampler";
    if (!std::holds_alternative<DdimSchedulerConfig>(config.scheduler)) {
      diffgrad::detail::require(options.eta == 0.0, where, "options.eta",
                                "0 (eta is a DDIMScheduler.step argument; this is " +
                                    config.class_name + ")",
                                options.eta);
      diffgrad::detail::require(
          !options.use_clipped_model_output, where, "options.use_clipped_model_output",
          "false (a DDIMScheduler.step argument; this is " + config.class_name + ")", 1.0);
    }
    return std::visit(
        [&](const auto& c) -> Setup {
          using C = std::decay_t<decltype(c)>;
          if constexpr (std::is_same_v<C, DdimSchedulerConfig>) {
            return ddim_setup(schedule, c, n, options.eta);
          } else if constexpr (std::is_same_v<C, DpmSolverMultistepSchedulerConfig>) {
            if (c.algorithm_type == DpmAlgorithm::sde_dpmsolver ||
                c.algorithm_type == DpmAlgorithm::sde_dpmsolver_pp)
              return sde_dpm_solver_setup(schedule, c, n);
            return dpm_solver_multistep_setup(schedule, c, n);
          } else if constexpr (std::is_same_v<C, DpmSolverSinglestepSchedulerConfig>) {
            return dpm_solver_singlestep_setup(schedule, c, n);
          } else {
            return deis_multistep_setup(schedule, c, n);
          }
        },
        config.scheduler);
  }

  SchedulerConfig config_;
  DiscreteSchedule schedule_;
  int num_inference_steps_;
  SamplerOptions options_;
  Setup setup_;
};

/// A sampler for a loaded config on the given training table (e.g. diffusers' float32
/// alphas_cumprod, for diffusers' numbers bit for bit).
inline Sampler make_sampler(const SchedulerConfig& config, const DiscreteSchedule& schedule,
                            int num_inference_steps, SamplerOptions options = {}) {
  return Sampler(config, schedule, num_inference_steps, options);
}
/// A sampler for a loaded config on its own training table (TrainingTable::schedule(): diffusers'
/// float32 alphas_cumprod).
inline Sampler make_sampler(const SchedulerConfig& config, int num_inference_steps,
                            SamplerOptions options = {}) {
  return Sampler(config, config.training.schedule(), num_inference_steps, options);
}
/// A sampler by name (see sampler_names()) on the given table.
inline Sampler make_sampler(std::string_view name, const DiscreteSchedule& schedule,
                            int num_inference_steps, SamplerOptions options = {}) {
  return Sampler(scheduler_config_for(name), schedule, num_inference_steps, options);
}

} // namespace diffgrad::compat

#else
// nlohmann-json is not available: the scheduler config reader is not compiled.
#define DIFFGRAD_HAS_SCHEDULER_CONFIG 0
#endif
