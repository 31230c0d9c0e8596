// diffusers scheduler_config.json files and sampler names -> the compat layer
// (include/diffgrad/compat/scheduler_config.hpp). The expected numbers are diffusers' own: every
// reference run of tests/data/compat/diffusers_{ddim,dpmsolver_multistep,dpmsolver_singlestep,
// deis}.txt (diffusers 0.42.1 in float64 on compat_test_model.hpp's network) is replayed from a
// config JSON: the class's real default config (dumped by diffusers' save_config,
// tests/data/scheduler_configs/dump_configs.py) with the case's keys set, loaded, turned into a
// sampler and run; every step must agree to 1e-6 relative, the compat tests' tolerance. The
// dumped files themselves are loaded unchanged and replay their matching case.
//
// Needs nlohmann-json (built only when CMake finds nlohmann_json).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "compat_test_model.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/scheduler_config.hpp"
#include "diffgrad/solvers/sampler.hpp"

using namespace diffgrad;
using namespace diffgrad::testing::compat;

namespace {

constexpr double kTolerance = 1e-6; // relative, per step (as tests/test_compat_diffusers.cpp)

std::string config_path(const std::string& file) {
#ifdef DIFFGRAD_TEST_DATA_DIR
  return std::string(DIFFGRAD_TEST_DATA_DIR) + "/scheduler_configs/" + file;
#else
  return (std::filesystem::path(__FILE__).parent_path() / "data" / "scheduler_configs" / file)
      .string();
#endif
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

DiscreteSchedule schedule_of(const ReferenceFile& ref) {
  return DiscreteSchedule::from_alphas_cumprod(ref.tables.at("alphas_cumprod"),
                                               DiscreteTimeInput::timestep_index);
}

std::vector<int> int_vector(const std::vector<double>& v) {
  std::vector<int> out;
  for (double x : v) out.push_back(static_cast<int>(x));
  return out;
}

const ReferenceCase& case_named(const ReferenceFile& ref, const std::string& name) {
  for (const auto& c : ref.cases)
    if (c.name == name) return c;
  throw std::runtime_error("no reference case " + name);
}

struct TrajectoryObserver {
  std::vector<Matrix>* states;
  void operator()(int, int, const Node&, const Matrix& x) const { states->push_back(x); }
};

/// Runs the sampler on the case's x_T (with diffusers' noise for stochastic steps) and returns
/// the largest per-step relative difference to diffusers. Steps where diffusers gives NaN (a
/// zero-length last step, case param diffusers_finite_steps) must be diffgrad's identity step.
double replay(const compat::Sampler& sampler, const ReferenceCase& c, const Matrix& x_T) {
  INFO(c.name);
  CHECK(sampler.timesteps() == int_vector(c.vector("timesteps")));
  CompatTestModel network;
  const EigenBackend<double> backend;
  std::vector<Matrix> states;
  sampler.visit(network, [&](const auto& scheme, std::span<const Node> nodes, auto& model) {
    SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(),
                                              x_T.rows(), x_T.cols());
    if (scheme.stochastic()) {
      REQUIRE(c.noise.size() == nodes.size() - 1);
      ws.given_noise = c.noise;
    }
    Matrix x = x_T;
    run_scheme(scheme, backend, nodes, NodeAtLambda(sampler.schedule()),
               EpsField<std::remove_reference_t<decltype(model)>>{model}, x, ws, {},
               TrajectoryObserver{&states});
  });
  CHECK(network.calls == static_cast<int>(c.vector("timesteps").size()));
  REQUIRE(states.size() == c.vector("timesteps").size());
  const int finite = c.has_param("diffusers_finite_steps") ? c.param_int("diffusers_finite_steps")
                                                           : static_cast<int>(states.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < states.size(); ++i) {
    if (static_cast<int>(i) >= finite) {
      REQUIRE(i > 0);
      CHECK(states[i] == states[i - 1]);
      continue;
    }
    const double d = relative_difference(states[i], c.states.at(i));
    if (!(d <= kTolerance)) UNSCOPED_INFO(c.name << ": step " << i << " relative difference " << d);
    worst = std::max(worst, d);
  }
  return worst;
}

/// Case params that are not scheduler config keys (step arguments, bookkeeping).
const std::set<std::string> kNotConfigKeys{"scheduler",
                                           "num_inference_steps",
                                           "eta",
                                           "use_clipped_model_output",
                                           "order_list",
                                           "diffusers_finite_steps",
                                           "first_state_step"};

/// The class's real default config with the case's keys set to the case's values (typed like
/// the default's value). Every config param of the case must be a key of the real config.
std::string case_config_json(const nlohmann::json& real_default, const ReferenceCase& c) {
  nlohmann::json j = real_default;
  for (const auto& [key, value] : c.params) {
    if (kNotConfigKeys.count(key) != 0) continue;
    INFO(c.name << ": key " << key);
    REQUIRE(j.contains(key)); // the reference generator's key is a diffusers config key
    nlohmann::json& slot = j[key];
    if (slot.is_boolean()) {
      slot = c.param_bool(key);
    } else if (slot.is_number_integer()) {
      slot = c.param_int(key);
    } else if (slot.is_number() || slot.is_string()) {
      if (slot.is_string() && !slot.get<std::string>().empty() &&
          slot.get<std::string>().find("\u221E") == std::string::npos) {
        slot = value; // a string option
      } else {
        const double d = c.param_double(key);
        // Python's -Infinity, as read by the loader's parser (it has no JSON number).
        slot = std::isinf(d) ? nlohmann::json(d < 0 ? "-\u221E" : "\u221E") : nlohmann::json(d);
      }
    } else {
      FAIL("unexpected JSON type of key " << key);
    }
  }
  return j.dump(2);
}

/// Worst difference per class, printed once at exit (the numbers in docs/compat_diffusers.md).
struct Summary {
  std::map<std::string, std::pair<int, double>> worst;
  ~Summary() {
    for (const auto& [family, v] : worst)
      std::printf("scheduler_config: %-44s %3d cases, max relative difference %.3g\n",
                  family.c_str(), v.first, v.second);
  }
};
Summary summary;
void record(const std::string& family, double d) {
  auto& v = summary.worst[family];
  ++v.first;
  v.second = std::max(v.second, d);
}

} // namespace

TEST_CASE("scheduler_config: every compat reference case, loaded from a diffusers config JSON, "
          "reproduces diffusers to 1e-6 per step") {
  struct Source {
    const char* reference;
    const char* default_config;
    const char* class_name;
    std::size_t cases;
  };
  const Source sources[] = {
      {"diffusers_ddim.txt", "ddim_default.json", "DDIMScheduler", 34},
      {"diffusers_dpmsolver_multistep.txt", "dpmsolver_multistep_default.json",
       "DPMSolverMultistepScheduler", 102},
      {"diffusers_dpmsolver_singlestep.txt", "dpmsolver_singlestep_default.json",
       "DPMSolverSinglestepScheduler", 56},
      {"diffusers_deis.txt", "deis_default.json", "DEISMultistepScheduler", 24},
  };
  for (const auto& source : sources) {
    const auto ref = read_reference(source.reference);
    REQUIRE(ref.cases.size() == source.cases);
    const auto schedule = schedule_of(ref);
    const Matrix& x_T = ref.matrices.at("x_T");
    const auto real_default =
        compat::detail::parse_config_json(read_text(config_path(source.default_config)));
    for (const auto& c : ref.cases) {
      INFO(c.name);
      const auto config = compat::load_scheduler_config(case_config_json(real_default, c));
      CHECK(config.class_name == source.class_name);
      CHECK(config.warnings.empty());
      compat::SamplerOptions options;
      if (c.has_param("eta")) options.eta = c.param_double("eta");
      if (c.has_param("use_clipped_model_output"))
        options.use_clipped_model_output = c.param_bool("use_clipped_model_output");
      const auto sampler =
          compat::make_sampler(config, schedule, c.param_int("num_inference_steps"), options);
      const double d = replay(sampler, c, x_T);
      CHECK(d <= kTolerance);
      record(source.class_name, d);
    }
  }
}

TEST_CASE("scheduler_config: the files diffusers wrote load unchanged and replay their case") {
  struct FileCase {
    const char* file;
    const char* reference;
    const char* case_name;
  };
  const FileCase files[] = {
      {"ddim_default.json", "diffusers_ddim.txt", "ddim/leading/n10/clip_sample/raw_output"},
      {"ddim_trailing_v_thresholding.json", "diffusers_ddim.txt",
       "ddim/trailing/n10/v_prediction/thresholding/raw_output"},
      {"dpmsolver_multistep_default.json", "diffusers_dpmsolver_multistep.txt",
       "multistep/dpmsolver++/o2/linspace/n20"},
      {"dpmsolver_3m_karras_sigma_min.json", "diffusers_dpmsolver_multistep.txt",
       "multistep/dpmsolver++/o3/karras/n10/sigma_min"},
      {"dpmsolver_2m_sde_karras_sigma_min.json", "diffusers_dpmsolver_multistep.txt",
       "multistep/sde-dpmsolver++/o2/karras/n20/sigma_min"},
      {"dpmsolver_singlestep_default.json", "diffusers_dpmsolver_singlestep.txt",
       "singlestep/dpmsolver++/o2/n10"},
      {"deis_default.json", "diffusers_deis.txt", "deis/o2/linspace/n10"},
  };
  for (const auto& f : files) {
    INFO(f.file);
    const auto config = compat::load_scheduler_config_file(config_path(f.file));
    CHECK(config.warnings.empty());
    const auto ref = read_reference(f.reference);
    const auto& c = case_named(ref, f.case_name);
    const auto sampler =
        compat::make_sampler(config, schedule_of(ref), c.param_int("num_inference_steps"));
    const double d = replay(sampler, c, ref.matrices.at("x_T"));
    CHECK(d <= kTolerance);
    record("files as diffusers wrote them", d);
  }
  // Python's -Infinity (diffusers' default lambda_min_clipped) is read as -inf.
  const auto multistep =
      compat::load_scheduler_config_file(config_path("dpmsolver_multistep_default.json"));
  const auto& m = std::get<compat::DpmSolverMultistepSchedulerConfig>(multistep.scheduler);
  CHECK(m.lambda_min_clipped == -std::numeric_limits<double>::infinity());
  const auto karras =
      compat::load_scheduler_config_file(config_path("dpmsolver_3m_karras_sigma_min.json"));
  const auto& k = std::get<compat::DpmSolverMultistepSchedulerConfig>(karras.scheduler);
  CHECK(k.solver_order == 3);
  CHECK(k.use_karras_sigmas);
  CHECK(k.final_sigmas_type == compat::FinalSigmas::sigma_min);
}

TEST_CASE("scheduler_config: the training table is diffusers' float32 alphas_cumprod, bit for "
          "bit") {
  // The linear table of the reference files (all 1000 entries, written by diffusers).
  const auto ref = read_reference("diffusers_dpmsolver_multistep.txt");
  const auto& reference_table = ref.tables.at("alphas_cumprod");
  const auto config = compat::load_scheduler_config_file(config_path("deis_default.json"));
  CHECK(config.training.diffusers_alphas_cumprod() == reference_table);
  // The table computed in double differs at the float32 level: the check can fail.
  const auto in_double = make_betas(BetaSchedule::linear);
  double product = 1.0, worst = 0.0;
  for (std::size_t i = 0; i < in_double.size(); ++i) {
    product *= 1.0 - in_double[i];
    worst = std::max(worst, std::abs(product - reference_table[i]) / reference_table[i]);
  }
  CHECK(worst > 1e-8);
  // scaled_linear (Stable Diffusion's) and squaredcos_cap_v2, sampled entries.
  const auto samples =
      compat::detail::parse_config_json(read_text(config_path("alphas_cumprod_samples.json")));
  for (const auto& [name, t] : samples.items()) {
    INFO(name);
    std::string text = R"({"_class_name": "DDIMScheduler", "beta_schedule": )" +
                       t["beta_schedule"].dump() + R"(, "beta_start": )" + t["beta_start"].dump() +
                       R"(, "beta_end": )" + t["beta_end"].dump() + "}";
    const auto table = compat::load_scheduler_config(text).training.diffusers_alphas_cumprod();
    const auto& indices = t["indices"];
    REQUIRE(indices.size() == t["alphas_cumprod"].size());
    int mismatches = 0;
    for (std::size_t k = 0; k < indices.size(); ++k) {
      const double want = std::stod(t["alphas_cumprod"][k].get<std::string>());
      if (table.at(indices[k].get<std::size_t>()) != want) ++mismatches;
    }
    CHECK(mismatches == 0);
  }
  // So a loaded config alone (no table passed) reproduces diffusers.
  const auto& c = case_named(ref, "multistep/dpmsolver++/o2/linspace/n20");
  const auto own =
      compat::load_scheduler_config_file(config_path("dpmsolver_multistep_default.json"));
  const double d = replay(compat::make_sampler(own, 20), c, ref.matrices.at("x_T"));
  CHECK(d <= kTolerance);
  record("config's own table", d);
}

TEST_CASE("scheduler_config: a pipeline's PNDMScheduler config read into another class "
          "(diffusers' from_config), unknown keys listed") {
  const std::string path = config_path("pndm_stable_diffusion.json");
  CHECK_THROWS_WITH(compat::load_scheduler_config_file(path),
                    Catch::Contains("_class_name") && Catch::Contains("PNDMScheduler") &&
                        Catch::Contains("DPMSolverMultistepScheduler"));

  compat::LoadOptions as_dpm;
  as_dpm.sampler = "DPM++ 2M Karras";
  const auto dpm = compat::load_scheduler_config_file(path, as_dpm);
  CHECK(dpm.class_name == "DPMSolverMultistepScheduler");
  CHECK(dpm.training.beta_schedule == BetaSchedule::scaled_linear);
  CHECK(dpm.training.beta_start == 0.00085);
  CHECK(dpm.training.beta_end == 0.012);
  const auto& m = std::get<compat::DpmSolverMultistepSchedulerConfig>(dpm.scheduler);
  CHECK(m.steps_offset == 1);
  CHECK(m.timestep_spacing == compat::TimestepSpacing::leading);
  CHECK(m.use_karras_sigmas);
  CHECK(m.solver_order == 2);
  CHECK(m.algorithm_type == DpmAlgorithm::dpmsolver_pp);
  // set_alpha_to_one and skip_prk_steps are not DPMSolverMultistepScheduler keys.
  REQUIRE(dpm.warnings.size() == 2);
  CHECK_THAT(dpm.warnings[0], Catch::Contains("set_alpha_to_one"));
  CHECK_THAT(dpm.warnings[1], Catch::Contains("skip_prk_steps"));

  compat::LoadOptions as_ddim;
  as_ddim.as_class = "DDIMScheduler";
  const auto ddim = compat::load_scheduler_config_file(path, as_ddim);
  const auto& d = std::get<compat::DdimSchedulerConfig>(ddim.scheduler);
  CHECK_FALSE(d.set_alpha_to_one);
  CHECK(d.clip_sample); // not in the file: DDIMScheduler's default
  REQUIRE(ddim.warnings.size() == 1);
  CHECK_THAT(ddim.warnings[0], Catch::Contains("skip_prk_steps"));
  // leading spacing, steps_offset = 1, 10 steps: k * 100 + 1 (diffusers' formula).
  const auto sampler = compat::make_sampler(ddim, 10);
  CHECK(sampler.timesteps() == std::vector<int>{901, 801, 701, 601, 501, 401, 301, 201, 101, 1});
  // It samples (on diffusers' float32 scaled_linear table).
  CompatTestModel network;
  const EigenBackend<double> backend;
  Matrix x = Matrix::Constant(2, kModelDim, 0.5);
  sampler.sample(backend, network, x);
  CHECK(network.calls == 10);
  CHECK(x.allFinite());
}

TEST_CASE("scheduler_config: sampler names map to diffusers configs and reproduce diffusers") {
  const auto names = compat::sampler_names();
  CHECK(names.size() == 13);
  for (const auto& name : names) {
    INFO(name);
    const auto config = compat::scheduler_config_for(name);
    CHECK(config.warnings.empty());
    CHECK_NOTHROW(compat::make_sampler(config, 12));
  }
  // Spellings of other tools name the same sampler.
  for (const char* spelling : {"DPM++ 2M Karras", "dpmpp_2m_karras", "DPM++2M-KARRAS"}) {
    const auto c = compat::scheduler_config_for(spelling);
    const auto& m = std::get<compat::DpmSolverMultistepSchedulerConfig>(c.scheduler);
    CHECK(m.use_karras_sigmas);
    CHECK(m.solver_order == 2);
  }
  struct NameCase {
    const char* name;
    const char* reference;
    const char* case_name;
  };
  // Each name with diffusers' defaults is one of the reference runs.
  const NameCase runs[] = {
      {"ddim", "diffusers_ddim.txt", "ddim/leading/n10/clip_sample/raw_output"},
      {"dpm++2m", "diffusers_dpmsolver_multistep.txt", "multistep/dpmsolver++/o2/linspace/n10"},
      {"dpm++3m", "diffusers_dpmsolver_multistep.txt", "multistep/dpmsolver++/o3/linspace/n20"},
      {"dpm++2s", "diffusers_dpmsolver_singlestep.txt", "singlestep/dpmsolver++/o2/n10"},
      {"dpm++3s", "diffusers_dpmsolver_singlestep.txt", "singlestep/dpmsolver++/o3/n10"},
      {"deis2m", "diffusers_deis.txt", "deis/o2/linspace/n10"},
      {"deis3m", "diffusers_deis.txt", "deis/o3/linspace/n20"},
  };
  for (const auto& r : runs) {
    INFO(r.name);
    const auto ref = read_reference(r.reference);
    const auto& c = case_named(ref, r.case_name);
    const auto sampler =
        compat::make_sampler(r.name, schedule_of(ref), c.param_int("num_inference_steps"));
    const double d = replay(sampler, c, ref.matrices.at("x_T"));
    CHECK(d <= kTolerance);
    record("sampler names", d);
  }
  // Negative control: another name on the same case is far off (the comparison can fail).
  {
    const auto ref = read_reference("diffusers_dpmsolver_multistep.txt");
    const auto& c = case_named(ref, "multistep/dpmsolver++/o2/linspace/n10");
    const auto sampler = compat::make_sampler("deis2m", schedule_of(ref), 10);
    CompatTestModel network;
    Matrix x = ref.matrices.at("x_T");
    sampler.sample(EigenBackend<double>(), network, x);
    CHECK(relative_difference(x, c.states.back()) > 1e-4);
  }
  CHECK_THROWS_WITH(compat::scheduler_config_for("euler-a"),
                    Catch::Contains("'name'") && Catch::Contains("euler-a") &&
                        Catch::Contains("dpm++2m-karras") && Catch::Contains("ddim"));
  CHECK_THROWS_WITH(compat::make_sampler("dpm++2m",
                                         DiscreteSchedule::from_beta_schedule(BetaSchedule::linear),
                                         10, compat::SamplerOptions{0.5, false}),
                    Catch::Contains("options.eta") && Catch::Contains("DDIMScheduler"));
}

namespace {

std::string ddim_with(const std::string& extra) {
  return R"({"_class_name": "DDIMScheduler", )" + extra + "}";
}

} // namespace

TEST_CASE("scheduler_config: malformed JSON, wrong types and unsupported values are refused "
          "naming the key, the value and the supported values") {
  using Catch::Matchers::Contains;
  using compat::load_scheduler_config;
  SECTION("malformed JSON: the parser's position") {
    CHECK_THROWS_AS(
        load_scheduler_config("{\"_class_name\": \"DDIMScheduler\",\n \"steps_offset\": }"),
        diffgrad::invalid_argument);
    CHECK_THROWS_WITH(
        load_scheduler_config("{\"_class_name\": \"DDIMScheduler\",\n \"steps_offset\": }"),
        Contains("malformed JSON") && Contains("line 2"));
    CHECK_THROWS_WITH(load_scheduler_config(R"({"_class_name": "DDIMScheduler")"),
                      Contains("malformed JSON"));
    CHECK_THROWS_WITH(load_scheduler_config(""), Contains("malformed JSON"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("beta_end": 1e400)")),
                      Contains("unreadable JSON") && Contains("1e400"));
    CHECK_THROWS_WITH(load_scheduler_config("[1, 2]"),
                      Contains("JSON object") && Contains("array"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("beta_start": NaN)")),
                      Contains("NaN") && Contains("line 1"));
  }
  SECTION("class") {
    CHECK_THROWS_WITH(load_scheduler_config(R"({"steps_offset": 1})"),
                      Contains("_class_name") && Contains("DEISMultistepScheduler"));
    CHECK_THROWS_WITH(load_scheduler_config(R"({"_class_name": "EulerDiscreteScheduler"})"),
                      Contains("EulerDiscreteScheduler") && Contains("DDIMScheduler") &&
                          Contains("DPMSolverSinglestepScheduler"));
    CHECK_THROWS_WITH(load_scheduler_config(R"({"_class_name": 3})"),
                      Contains("_class_name") && Contains("a string"));
    compat::LoadOptions bad_name;
    bad_name.sampler = "heun";
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("steps_offset": 1)"), bad_name),
                      Contains("heun") && Contains("dpm++2m"));
  }
  SECTION("wrong types") {
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("steps_offset": "1")")),
                      Contains("'steps_offset'") && Contains("integer") && Contains("\"1\""));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("clip_sample": 1)")),
                      Contains("'clip_sample'") && Contains("true or false"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("beta_end": [0.02])")),
                      Contains("'beta_end'") && Contains("number"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("sample_max_value": Infinity)")),
                      Contains("'sample_max_value'") && Contains("Infinity"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("beta_start": 0)")),
                      Contains("'beta_start'") && Contains("(0, 1)"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("dynamic_thresholding_ratio": 1.5)")),
                      Contains("'dynamic_thresholding_ratio'") && Contains("1.5"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("clip_sample_range": -1)")),
                      Contains("'clip_sample_range'") && Contains("> 0"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("trained_betas": [0.1, 0.2])")),
                      Contains("'trained_betas'") && Contains("1000"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("trained_betas": "none")")),
                      Contains("'trained_betas'"));
    CHECK_THROWS_WITH(load_scheduler_config(
                          R"({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 2.5})"),
                      Contains("'solver_order'") && Contains("[1, 3]") && Contains("2.5"));
  }
  SECTION("unsupported values") {
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("timestep_spacing": "uniform")")),
                      Contains("'timestep_spacing'") && Contains("uniform") &&
                          Contains("\"trailing\""));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("prediction_type": "flow_prediction")")),
                      Contains("'prediction_type'") && Contains("flow_prediction") &&
                          Contains("v_prediction"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("rescale_betas_zero_snr": true)")),
                      Contains("'rescale_betas_zero_snr'") && Contains("false only"));
    CHECK_THROWS_WITH(load_scheduler_config(ddim_with(R"("beta_schedule": "sigmoid")")),
                      Contains("'beta_schedule'") && Contains("squaredcos_cap_v2"));
    const std::string dpm = R"({"_class_name": "DPMSolverMultistepScheduler", )";
    CHECK_THROWS_WITH(load_scheduler_config(dpm + R"("solver_order": 4})"),
                      Contains("'solver_order'") && Contains("[1, 3]"));
    CHECK_THROWS_WITH(load_scheduler_config(dpm + R"("use_flow_sigmas": true})"),
                      Contains("'use_flow_sigmas'") && Contains("true"));
    CHECK_THROWS_WITH(load_scheduler_config(dpm + R"("variance_type": "learned_range"})"),
                      Contains("'variance_type'") && Contains("learned_range"));
    CHECK_THROWS_WITH(load_scheduler_config(dpm + R"("algorithm_type": "dpmsolver3"})"),
                      Contains("'algorithm_type'") && Contains("sde-dpmsolver++"));
    CHECK_THROWS_WITH(
        load_scheduler_config(
            R"({"_class_name": "DPMSolverSinglestepScheduler", "algorithm_type": "sde-dpmsolver++"})"),
        Contains("'algorithm_type'") && Contains("\"dpmsolver++\", \"dpmsolver\""));
    CHECK_THROWS_WITH(
        load_scheduler_config(
            R"({"_class_name": "DEISMultistepScheduler", "use_karras_sigmas": true})"),
        Contains("'use_karras_sigmas'"));
    CHECK_THROWS_WITH(
        load_scheduler_config(R"({"_class_name": "DEISMultistepScheduler", "solver_type": "bh1"})"),
        Contains("'solver_type'") && Contains("logrho"));
    // A combination the compat layer refuses (as diffusers does) is refused at make_sampler.
    const auto noise_zero = load_scheduler_config(
        dpm + R"("algorithm_type": "dpmsolver", "final_sigmas_type": "zero"})");
    CHECK_THROWS_WITH(compat::make_sampler(noise_zero, 10), Contains("final_sigmas_type"));
  }
  SECTION("unknown keys are warnings, not errors; Infinity inside a string is a string") {
    const auto c = load_scheduler_config(
        ddim_with(R"("note": "-Infinity NaN", "_use_default_values": ["x"], "steps_offset": 1)"));
    REQUIRE(c.warnings.size() == 1);
    CHECK_THAT(c.warnings[0], Contains("'note'") && Contains("DDIMScheduler"));
    CHECK(std::get<compat::DdimSchedulerConfig>(c.scheduler).steps_offset == 1);
    // A number written as an integer is fine for a float key.
    const auto i = load_scheduler_config(ddim_with(R"("sample_max_value": 2)"));
    CHECK(i.thresholding.sample_max_value == 2.0);
  }
}

TEST_CASE("scheduler_config: the docs example") {
  // docs/compat_diffusers.md, "Loading a scheduler_config.json" (kept in sync by hand).
  const std::string json_text = read_text(config_path("dpmsolver_3m_karras_sigma_min.json"));
  CompatTestModel my_network;
  Matrix x = Matrix::Constant(4, kModelDim, 1.0); // x_T
  // ---- docs example begins
  compat::SchedulerConfig config = compat::load_scheduler_config(json_text);
  for (const std::string& w : config.warnings) std::fprintf(stderr, "%s\n", w.c_str());
  compat::Sampler sampler = compat::make_sampler(config, /*num_inference_steps=*/20);
  sampler.sample(EigenBackend<double>(), my_network, x);

  compat::Sampler by_name = compat::make_sampler("dpm++2m-karras", sampler.schedule(), 20);
  // ---- docs example ends
  CHECK(x.allFinite());
  CHECK(my_network.calls == 20);
  CHECK(by_name.timesteps().size() == 20);
}
