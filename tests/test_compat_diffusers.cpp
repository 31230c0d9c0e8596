// diffgrad reproduces diffusers' schedulers (run in float64 by benchmarks/compare/
// gen_diffusers_reference.py on the fixed nonlinear model of compat_test_model.hpp) to <= 1e-6
// relative at every step. Each case of tests/data/compat/diffusers_*.txt carries the scheduler
// config, diffusers' integer timesteps, the given noise of stochastic steps and the sample after
// every scheduler.step call.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "compat_test_model.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/models/thresholding.hpp"
#include "diffgrad/solvers/sampler.hpp"

using namespace diffgrad;
using namespace diffgrad::testing::compat;

namespace {

constexpr double kTolerance = 1e-6;

compat::TimestepSpacing spacing_of(const std::string& s) {
  if (s == "linspace") return compat::TimestepSpacing::linspace;
  if (s == "leading") return compat::TimestepSpacing::leading;
  if (s == "trailing") return compat::TimestepSpacing::trailing;
  throw std::runtime_error("unknown timestep_spacing " + s);
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

/// Records the state after every step.
struct TrajectoryObserver {
  std::vector<Matrix>* states;
  void operator()(int, int, const Node&, const Matrix& x) const { states->push_back(x); }
};

/// Largest per-step relative difference between a run and the reference states
/// (`steps_to_reference[i]`: the reference state index a diffgrad step i ends on). Two case
/// params shorten the reference: `first_state_step` (only the states from that step on are
/// stored) and `diffusers_finite_steps` (diffusers' later states are NaN: a zero-length last
/// step that diffusers divides by h = 0). diffgrad's steps past the finite ones must be the
/// identity step, exactly.
double max_step_difference(const std::vector<Matrix>& got, const ReferenceCase& c,
                           const std::vector<int>& steps_to_reference) {
  REQUIRE(got.size() == steps_to_reference.size());
  const int first = c.has_param("first_state_step") ? c.param_int("first_state_step") : 0;
  const int finite = c.has_param("diffusers_finite_steps") ? c.param_int("diffusers_finite_steps")
                                                           : static_cast<int>(got.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const int ref = steps_to_reference[i];
    if (ref >= finite) {
      INFO(c.name << ": step " << i << " (NaN in diffusers) is the identity");
      REQUIRE(i > 0);
      CHECK(got[i] == got[i - 1]);
      CHECK(got[i].allFinite());
      continue;
    }
    if (ref < first) continue;
    const auto& want = c.states.at(static_cast<std::size_t>(ref - first));
    const double d = relative_difference(got[i], want);
    if (!(d <= kTolerance)) UNSCOPED_INFO(c.name << ": step " << i << " relative difference " << d);
    worst = std::max(worst, d);
  }
  return worst;
}

std::vector<int> identity_steps(std::size_t n) {
  std::vector<int> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<int>(i);
  return v;
}

/// Worst difference per family, printed once at exit (the numbers in docs/compat_diffusers.md).
struct Summary {
  std::map<std::string, double> worst;
  ~Summary() {
    for (const auto& [family, d] : worst)
      std::printf("compat diffusers: %-48s max relative difference %.3g\n", family.c_str(), d);
  }
};
Summary summary;
void record(const std::string& family, double d) {
  auto& v = summary.worst[family];
  v = std::max(v, d);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// Timesteps
// ---------------------------------------------------------------------------------------------

TEST_CASE("compat: numpy linspace / arange / round are reproduced bit for bit") {
  // round half to even, like np.round
  CHECK(compat::detail::np_round(0.5) == 0);
  CHECK(compat::detail::np_round(1.5) == 2);
  CHECK(compat::detail::np_round(2.5) == 2);
  CHECK(compat::detail::np_round(-0.5) == 0);
  // np.arange(1000, 0, -1000/7) has 7 entries, the last 142.857142857143...
  const auto a = compat::detail::np_arange(1000.0, 0.0, -1000.0 / 7.0);
  REQUIRE(a.size() == 7);
  CHECK(a.back() == Approx(1000.0 / 7.0).epsilon(1e-14));
  // np.linspace(0, 999, 4) = [0, 333, 666, 999]
  const auto l = compat::detail::np_linspace(0.0, 999.0, 4);
  CHECK(l == std::vector<double>{0.0, 333.0, 666.0, 999.0});
}

TEST_CASE("compat: timesteps of every reference case equal diffusers'") {
  for (const char* file :
       {"diffusers_ddim.txt", "diffusers_dpmsolver_multistep.txt",
        "diffusers_dpmsolver_singlestep.txt", "diffusers_deis.txt", "diffusers_timesteps.txt"}) {
    const auto ref = read_reference(file);
    // diffusers_timesteps.txt has no table (and no lambda_min_clipped); the others have both.
    const auto schedule = ref.tables.count("alphas_cumprod") != 0
                              ? schedule_of(ref)
                              : DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
    for (const auto& c : ref.cases) {
      if (c.has_param("use_karras_sigmas") && c.param_bool("use_karras_sigmas")) continue;
      if (c.has_param("use_lu_lambdas") && c.param_bool("use_lu_lambdas")) continue;
      INFO(c.name);
      const int n = c.param_int("num_inference_steps");
      const std::string scheduler = c.param("scheduler");
      const int clipped =
          c.has_param("lambda_min_clipped")
              ? compat::clipped_timestep_count(schedule, c.param_double("lambda_min_clipped"))
              : 0;
      std::vector<int> got;
      if (scheduler == "ddim")
        got = compat::ddim_timesteps(n, spacing_of(c.param("timestep_spacing")),
                                     c.param_int("steps_offset"));
      else if (scheduler == "dpmsolver_singlestep")
        got = compat::singlestep_timesteps(n, 1000, clipped);
      else
        got = compat::multistep_timesteps(n, spacing_of(c.param("timestep_spacing")),
                                          c.param_int("steps_offset"), 1000, 1000 - clipped);
      CHECK(got == int_vector(c.vector("timesteps")));
    }
  }
}

TEST_CASE("compat: bad timestep arguments are rejected with the argument named") {
  CHECK_THROWS_WITH(compat::ddim_timesteps(0, compat::TimestepSpacing::leading),
                    Catch::Contains("num_inference_steps"));
  CHECK_THROWS_WITH(compat::multistep_timesteps(1001, compat::TimestepSpacing::linspace),
                    Catch::Contains("num_inference_steps"));
  CHECK_THROWS_WITH(
      compat::multistep_timesteps(10, compat::TimestepSpacing::linspace, 0, 1000, 2000),
      Catch::Contains("last_timestep"));
  const auto schedule = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  compat::DdimSchedulerConfig config;
  config.steps_offset = 200; // 9 * 100 + 200 > 999
  CHECK_THROWS_WITH(compat::ddim_setup(schedule, config, 10), Catch::Contains("steps_offset"));
  // Offsets that would overflow int arithmetic (found by fuzz/fuzz_scheduler_numbers) and
  // negative ones are refused by name, for both timestep families; the largest valid offset
  // still works.
  for (const int offset : {std::numeric_limits<int>::max(), std::numeric_limits<int>::max() - 58,
                           -1, std::numeric_limits<int>::min()}) {
    CHECK_THROWS_WITH(compat::ddim_timesteps(10, compat::TimestepSpacing::leading, offset),
                      Catch::Contains("steps_offset"));
    CHECK_THROWS_WITH(compat::multistep_timesteps(10, compat::TimestepSpacing::leading, offset),
                      Catch::Contains("steps_offset"));
  }
  CHECK(compat::ddim_timesteps(10, compat::TimestepSpacing::leading, 99).front() == 999);
  CHECK(compat::multistep_timesteps(10, compat::TimestepSpacing::leading, 99).front() == 999);
  CHECK_THROWS(compat::ddim_timesteps(10, compat::TimestepSpacing::leading, 100));
  config = {};
  config.num_train_timesteps = 500;
  CHECK_THROWS_WITH(compat::ddim_setup(schedule, config, 10),
                    Catch::Contains("num_train_timesteps"));
  CHECK_THROWS_WITH(compat::DiffusersDdim({}, 0.0), Catch::Contains("targets"));
  CHECK_THROWS_WITH(compat::DiffusersDdim({compat::zero_sigma_node()}, 1.5),
                    Catch::Contains("eta"));
}

// ---------------------------------------------------------------------------------------------
// DDIMScheduler
// ---------------------------------------------------------------------------------------------

namespace {

compat::DdimSchedulerConfig ddim_config_of(const ReferenceCase& c) {
  compat::DdimSchedulerConfig cfg;
  cfg.num_train_timesteps = c.param_int("num_train_timesteps");
  cfg.timestep_spacing = spacing_of(c.param("timestep_spacing"));
  cfg.steps_offset = c.param_int("steps_offset");
  cfg.set_alpha_to_one = c.param_bool("set_alpha_to_one");
  cfg.prediction_type = models::parse_prediction_type(c.param("prediction_type"));
  cfg.clip_sample = c.param_bool("clip_sample");
  cfg.clip_sample_range = c.param_double("clip_sample_range");
  cfg.thresholding = c.param_bool("thresholding");
  cfg.dynamic_thresholding_ratio = c.param_double("dynamic_thresholding_ratio");
  cfg.sample_max_value = c.param_double("sample_max_value");
  return cfg;
}

std::string ddim_family(const ReferenceCase& c) {
  std::string f = "DDIMScheduler";
  if (c.param_double("eta") > 0) f += " eta>0 (given noise)";
  if (c.param_bool("thresholding") || c.param_bool("clip_sample"))
    f += c.param_bool("use_clipped_model_output") ? " x0-corrected, clipped eps"
                                                  : " x0-corrected, raw eps";
  if (c.param("prediction_type") != "epsilon") f += " " + c.param("prediction_type");
  if (c.param_bool("thresholding") && c.param_double("sample_max_value") < 1.0)
    f += " sample_max_value<1";
  if (!c.param_bool("set_alpha_to_one") &&
      (c.param_bool("thresholding") || c.param_bool("clip_sample")))
    f += " (x0 corrected at the final timestep-0 step)";
  return f;
}

} // namespace

TEST_CASE("compat: DDIMScheduler, every spacing and flag, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_ddim.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  const EigenBackend<double> backend;
  for (const auto& c : ref.cases) {
    INFO(c.name);
    {
      const auto cfg = ddim_config_of(c);
      const int n = c.param_int("num_inference_steps");
      const double eta = c.param_double("eta");
      const auto setup = compat::ddim_setup(schedule, cfg, n, eta);
      CHECK(setup.timesteps == int_vector(c.vector("timesteps")));
      CompatTestModel network;
      compat::DdimModel<CompatTestModel> model(network, schedule, cfg, n, eta,
                                               c.param_bool("use_clipped_model_output"));
      SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 1, x_T.rows(), x_T.cols());
      std::vector<Matrix> noise(c.noise.begin(), c.noise.end());
      if (eta > 0) {
        REQUIRE(noise.size() == setup.timesteps.size());
        ws.given_noise = noise;
      }
      Matrix x = x_T;
      std::vector<Matrix> states;
      run_scheme(setup.scheme, backend, setup.nodes, NodeAtLambda(schedule),
                 EpsField<decltype(model)>{model}, x, ws, {}, TrajectoryObserver{&states});
      CHECK(network.calls == n);
      const double d = max_step_difference(states, c, identity_steps(states.size()));
      CHECK(d <= kTolerance);
      record(ddim_family(c), d);
    }
  }
}

TEST_CASE("compat: DDIM with aligned targets is plain diffgrad::Ddim") {
  const auto ref = read_reference("diffusers_ddim.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  const EigenBackend<double> backend;
  int aligned_cases = 0;
  for (const auto& c : ref.cases) {
    if (c.param_double("eta") != 0.0 || c.param("prediction_type") != "epsilon" ||
        c.param_bool("clip_sample") || c.param_bool("thresholding"))
      continue;
    const auto setup =
        compat::ddim_setup(schedule, ddim_config_of(c), c.param_int("num_inference_steps"));
    if (!setup.targets_are_next_nodes) continue;
    ++aligned_cases;
    CompatTestModel network;
    Matrix x = x_T;
    sample(Ddim(0.0), backend, schedule, std::span<const Node>(setup.nodes), network, x);
    CHECK(relative_difference(x, c.states.back()) <= kTolerance);
  }
  CHECK(aligned_cases >= 4);
}

// ---------------------------------------------------------------------------------------------
// DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, DEISMultistepScheduler
// ---------------------------------------------------------------------------------------------

namespace {

DpmAlgorithm algorithm_of(const std::string& s) {
  if (s == "dpmsolver") return DpmAlgorithm::dpmsolver;
  if (s == "dpmsolver++") return DpmAlgorithm::dpmsolver_pp;
  if (s == "sde-dpmsolver") return DpmAlgorithm::sde_dpmsolver;
  if (s == "sde-dpmsolver++") return DpmAlgorithm::sde_dpmsolver_pp;
  throw std::runtime_error("unknown algorithm_type " + s);
}
DpmSolverType solver_type_of(const std::string& s) {
  if (s == "midpoint") return DpmSolverType::midpoint;
  if (s == "heun") return DpmSolverType::heun;
  throw std::runtime_error("unknown solver_type " + s);
}
compat::FinalSigmas final_of(const std::string& s) {
  if (s == "zero") return compat::FinalSigmas::zero;
  if (s == "sigma_min") return compat::FinalSigmas::sigma_min;
  throw std::runtime_error("unknown final_sigmas_type " + s);
}

models::ThresholdingOptions thresholding_of(const ReferenceCase& c) {
  models::ThresholdingOptions o;
  o.thresholding = c.param_bool("thresholding");
  o.dynamic_thresholding_ratio = c.param_double("dynamic_thresholding_ratio");
  o.sample_max_value = c.param_double("sample_max_value");
  return o;
}

/// Runs `scheme` on `nodes` with the case's model (prediction type and thresholding adapters
/// around the test network) and compares every step with the reference.
template <class Scheme>
double run_and_compare(const Scheme& scheme, std::span<const Node> nodes, const ReferenceCase& c,
                       const Matrix& x_T, const DiscreteSchedule& schedule,
                       const std::vector<int>& steps_to_reference) {
  const EigenBackend<double> backend;
  CompatTestModel network;
  auto model = compat::scheduler_eps_model(
      network, models::parse_prediction_type(c.param("prediction_type")), thresholding_of(c));
  SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                            x_T.cols());
  std::vector<Matrix> noise(c.noise.begin(), c.noise.end());
  if (scheme.stochastic()) {
    REQUIRE(noise.size() == nodes.size() - 1);
    ws.given_noise = noise;
  }
  Matrix x = x_T;
  std::vector<Matrix> states;
  run_scheme(scheme, backend, nodes, NodeAtLambda(schedule), EpsField<decltype(model)>{model}, x,
             ws, {}, TrajectoryObserver{&states});
  // One call per diffusers timestep (n + 1 of them for a trailing run that wraps to -1).
  CHECK(network.calls == static_cast<int>(c.vector("timesteps").size()));
  return max_step_difference(states, c, steps_to_reference);
}

compat::DpmSolverMultistepSchedulerConfig multistep_config_of(const ReferenceCase& c) {
  compat::DpmSolverMultistepSchedulerConfig cfg;
  cfg.num_train_timesteps = c.param_int("num_train_timesteps");
  cfg.solver_order = c.param_int("solver_order");
  cfg.algorithm_type = algorithm_of(c.param("algorithm_type"));
  cfg.solver_type = solver_type_of(c.param("solver_type"));
  cfg.lower_order_final = c.param_bool("lower_order_final");
  cfg.euler_at_final = c.param_bool("euler_at_final");
  cfg.use_karras_sigmas = c.param_bool("use_karras_sigmas");
  cfg.use_lu_lambdas = c.param_bool("use_lu_lambdas");
  cfg.final_sigmas_type = final_of(c.param("final_sigmas_type"));
  cfg.lambda_min_clipped = c.param_double("lambda_min_clipped");
  cfg.timestep_spacing = spacing_of(c.param("timestep_spacing"));
  cfg.steps_offset = c.param_int("steps_offset");
  return cfg;
}

std::string dpm_family(const std::string& scheduler, const ReferenceCase& c) {
  std::string f = scheduler + " " + c.param("algorithm_type") + " o" + c.param("solver_order");
  if (c.param("prediction_type") != "epsilon") f += " " + c.param("prediction_type");
  if (c.param_bool("thresholding")) f += " thresholding";
  if (c.param_double("sample_max_value") < 1.0) f += " sample_max_value<1";
  if (c.has_param("use_karras_sigmas") && c.param_bool("use_karras_sigmas")) f += " karras";
  if (c.has_param("use_lu_lambdas") && c.param_bool("use_lu_lambdas")) f += " lu_lambdas";
  if ((c.has_param("use_karras_sigmas") && c.param_bool("use_karras_sigmas")) ||
      (c.has_param("use_lu_lambdas") && c.param_bool("use_lu_lambdas")))
    f += " " + c.param("final_sigmas_type");
  if (c.has_param("diffusers_finite_steps")) f += " (diffusers NaN at the last step)";
  return f;
}

} // namespace

TEST_CASE("compat: DPMSolverMultistepScheduler, every order, spacing and flag, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_dpmsolver_multistep.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  for (const auto& c : ref.cases) {
    INFO(c.name);
    const auto cfg = multistep_config_of(c);
    const int n = c.param_int("num_inference_steps");
    double d = 0.0;
    if (cfg.algorithm_type == DpmAlgorithm::sde_dpmsolver ||
        cfg.algorithm_type == DpmAlgorithm::sde_dpmsolver_pp) {
      const auto setup = compat::sde_dpm_solver_setup(schedule, cfg, n);
      CHECK(setup.timesteps == int_vector(c.vector("timesteps")));
      d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                          identity_steps(setup.timesteps.size()));
    } else {
      const auto setup = compat::dpm_solver_multistep_setup(schedule, cfg, n);
      CHECK(setup.timesteps == int_vector(c.vector("timesteps")));
      d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                          identity_steps(setup.timesteps.size()));
    }
    CHECK(d <= kTolerance);
    record(dpm_family("DPMSolverMultistep", c), d);
  }
}

TEST_CASE("compat: DPMSolverSinglestepScheduler, every order and flag, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_dpmsolver_singlestep.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  for (const auto& c : ref.cases) {
    INFO(c.name);
    compat::DpmSolverSinglestepSchedulerConfig cfg;
    cfg.num_train_timesteps = c.param_int("num_train_timesteps");
    cfg.solver_order = c.param_int("solver_order");
    cfg.algorithm_type = algorithm_of(c.param("algorithm_type"));
    cfg.solver_type = solver_type_of(c.param("solver_type"));
    cfg.lower_order_final = c.param_bool("lower_order_final");
    cfg.use_karras_sigmas = c.param_bool("use_karras_sigmas");
    cfg.final_sigmas_type = final_of(c.param("final_sigmas_type"));
    cfg.lambda_min_clipped = c.param_double("lambda_min_clipped");
    const int n = c.param_int("num_inference_steps");
    const auto setup = compat::dpm_solver_singlestep_setup(schedule, cfg, n);
    CHECK(setup.timesteps == int_vector(c.vector("timesteps")));
    // diffusers' order list, step by step.
    const auto orders = c.param_int_list("order_list");
    for (int i = 0; i < n; ++i)
      CHECK(setup.scheme.step_order(setup.nodes, i) == orders[static_cast<std::size_t>(i)]);
    const double d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                                     identity_steps(setup.timesteps.size()));
    CHECK(d <= kTolerance);
    record(dpm_family("DPMSolverSinglestep", c), d);
  }
}

TEST_CASE("compat: DEISMultistepScheduler, every order and spacing, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_deis.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  for (const auto& c : ref.cases) {
    INFO(c.name);
    compat::DeisMultistepSchedulerConfig cfg;
    cfg.num_train_timesteps = c.param_int("num_train_timesteps");
    cfg.solver_order = c.param_int("solver_order");
    cfg.lower_order_final = c.param_bool("lower_order_final");
    cfg.timestep_spacing = spacing_of(c.param("timestep_spacing"));
    cfg.steps_offset = c.param_int("steps_offset");
    const auto setup =
        compat::deis_multistep_setup(schedule, cfg, c.param_int("num_inference_steps"));
    CHECK(setup.timesteps == int_vector(c.vector("timesteps")));
    const double d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                                     identity_steps(setup.timesteps.size()));
    CHECK(d <= kTolerance);
    std::string f = "DEISMultistep o" + c.param("solver_order");
    if (c.param_double("sample_max_value") < 1.0) f += " sample_max_value<1";
    if (c.param("prediction_type") != "epsilon") f += " " + c.param("prediction_type");
    if (c.param_bool("thresholding")) f += " thresholding";
    record(f, d);
  }
}

// ---------------------------------------------------------------------------------------------
// Negative controls: the comparison is sharp enough to see every deliberate peer detail
// ---------------------------------------------------------------------------------------------

namespace {

const ReferenceCase& case_named(const ReferenceFile& ref, const std::string& name) {
  for (const auto& c : ref.cases)
    if (c.name == name) return c;
  throw std::runtime_error("no reference case " + name);
}

template <class Scheme, class Model>
Matrix final_state(const Scheme& scheme, std::span<const Node> nodes, const DiscreteSchedule& s,
                   Model& model, const Matrix& x_T) {
  const EigenBackend<double> backend;
  SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                            x_T.cols());
  Matrix x = x_T;
  run_scheme(scheme, backend, nodes, NodeAtLambda(s), EpsField<Model>{model}, x, ws);
  return x;
}

} // namespace

TEST_CASE("compat: leaving out a diffusers detail is caught (differences >> 1e-6)") {
  const auto ddim_ref = read_reference("diffusers_ddim.txt");
  const auto schedule = schedule_of(ddim_ref);
  const Matrix& x_T = ddim_ref.matrices.at("x_T");
  CompatTestModel network;

  SECTION("DDIM linspace: stepping to the next timestep instead of k - N // n") {
    const auto& c = case_named(ddim_ref, "ddim/linspace/n7");
    const auto setup = compat::ddim_setup(schedule, ddim_config_of(c), 7);
    REQUIRE_FALSE(setup.targets_are_next_nodes);
    const Matrix x = final_state(Ddim(0.0), setup.nodes, schedule, network, x_T);
    CHECK(relative_difference(x, c.states.back()) > 1e-3);
  }
  SECTION("DDIM clip_sample: the consistent (clipped x0, clipped eps) pair instead of raw eps") {
    const auto& c = case_named(ddim_ref, "ddim/leading/n10/clip_sample/raw_output");
    const auto setup = compat::ddim_setup(schedule, ddim_config_of(c), 10);
    auto clipped = models::clip_sample(network, c.param_double("clip_sample_range"));
    const Matrix x = final_state(setup.scheme, setup.nodes, schedule, clipped, x_T);
    CHECK(relative_difference(x, c.states.back()) > 1e-3);
  }
  SECTION("DPMSolverMultistep order 3: the consistent D2 weight instead of diffusers' halved one") {
    const auto ref = read_reference("diffusers_dpmsolver_multistep.txt");
    const auto& c = case_named(ref, "multistep/dpmsolver++/o3/linspace/n20");
    const auto setup = compat::dpm_solver_multistep_setup(schedule, multistep_config_of(c), 20);
    DpmSolverMultistep::Options o;
    o.order = 3;
    o.prediction = SolverPrediction::data;
    const Matrix x = final_state(DpmSolverMultistep(o), setup.nodes, schedule, network, x_T);
    const double d = relative_difference(x, c.states.back());
    CHECK(d > 1e-5);
    std::printf("compat diffusers: 3M without the halved D2 weight differs by %.3g\n", d);
  }
  SECTION("DEIS: the t-space tAB weights are not diffusers' log-rho ones") {
    const auto ref = read_reference("diffusers_deis.txt");
    const auto& c = case_named(ref, "deis/o3/linspace/n20");
    compat::DeisMultistepSchedulerConfig cfg;
    cfg.solver_order = 3;
    const auto setup = compat::deis_multistep_setup(schedule, cfg, 20);
    const Matrix exact = final_state(setup.scheme, setup.nodes, schedule, network, x_T);
    CHECK(relative_difference(exact, c.states.back()) <= kTolerance);
    const Matrix other = final_state(DeisRhoAb(3), setup.nodes, schedule, network, x_T);
    CHECK(relative_difference(other, c.states.back()) > 1e-5);
  }
}

// ---------------------------------------------------------------------------------------------
// Zero-length terminal steps (karras / lu with final_sigmas_type="sigma_min")
// ---------------------------------------------------------------------------------------------

TEST_CASE("compat: a zero-length LAST step is the identity for every multistep order; "
          "anywhere else it is refused") {
  const auto schedule = DiscreteSchedule::from_beta_schedule(BetaSchedule::linear);
  compat::DpmSolverMultistepSchedulerConfig cfg;
  cfg.use_karras_sigmas = true;
  cfg.final_sigmas_type = compat::FinalSigmas::sigma_min;
  cfg.lower_order_final = false; // full order up to the last step
  const auto [timesteps, nodes] = compat::dpm_solver_multistep_nodes(schedule, cfg, 20);
  REQUIRE(nodes.size() == 21);
  // diffusers appends sigma_last = sqrt((1 - a_0)/a_0), the last karras sigma up to rounding
  // (on this double-built table pow(pow(r, 1/7), 7) misses r by an ulp: snapped to zero length).
  CHECK(nodes[20].lambda == nodes[19].lambda);
  const EigenBackend<double> backend;
  const Matrix x_T = Matrix::Constant(3, 5, 0.3) + 0.1 * Matrix::Identity(3, 5);
  for (const auto& [order, type] :
       {std::pair{1, DpmSolverType::midpoint}, std::pair{2, DpmSolverType::midpoint},
        std::pair{2, DpmSolverType::heun}, std::pair{3, DpmSolverType::midpoint}}) {
    for (auto prediction : {SolverPrediction::data, SolverPrediction::noise}) {
      INFO("order " << order << " heun " << (type == DpmSolverType::heun));
      DpmSolverMultistep::Options o;
      o.order = order;
      o.prediction = prediction;
      o.solver_type = type;
      o.lower_order_final = false;
      o.quirks.multistep_half_d2 = true;
      const DpmSolverMultistep scheme(o);
      CHECK(scheme.step_order(nodes, 19) == 1);
      CompatTestModel network;
      std::vector<Matrix> states;
      Matrix x = x_T;
      SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), 1, 3, 5);
      run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
                 EpsField<CompatTestModel>{network}, x, ws, {}, TrajectoryObserver{&states});
      REQUIRE(states.size() == 20);
      CHECK(states[19] == states[18]);
      CHECK(x.allFinite());
    }
  }
  // Singlestep (official structure, intermediate points by lambda): first order, identity.
  {
    const DpmSolverSinglestep scheme(3, SolverPrediction::data);
    CHECK(scheme.step_order(nodes, 19) == 1);
    CHECK(scheme.step_order(nodes, 18) == 3);
    CompatTestModel network;
    std::vector<Matrix> states;
    Matrix x = x_T;
    SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 3, 3, 5);
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
               EpsField<CompatTestModel>{network}, x, ws, {}, TrajectoryObserver{&states});
    REQUIRE(states.size() == 20);
    CHECK(states[19] == states[18]);
    CHECK(network.calls == 19 * 3 + 1);
  }
  // The coefficient functions themselves: h = 0 gives the first-order (identity) weights.
  const Node& s0 = nodes[19];
  const auto u =
      coeffs::dpm::multistep_update(coeffs::dpm::Integrand::ode_data, 3, DpmSolverType::midpoint,
                                    s0, nodes[18], nodes[17], nodes[20], {true, false, false});
  CHECK(u.x == 1.0);
  CHECK(u.m[0] == 0.0);
  CHECK(u.m[1] == 0.0);
  CHECK(u.m[2] == 0.0);
  // Equal lambda before the last step: refused, naming the node.
  std::vector<Node> bad = nodes;
  bad[10] = bad[9];
  CHECK_THROWS_WITH(DpmSolverMultistep().validate(bad), Catch::Contains("node 10"));
  // Schemes without the exception (plain DDIM) refuse even a zero-length last step.
  CHECK_THROWS_WITH(Ddim(0.0).validate(nodes), Catch::Contains("node 20"));
}

// ---------------------------------------------------------------------------------------------
// trailing spacing, n = 1..1000 (the numpy arange -1)
// ---------------------------------------------------------------------------------------------

namespace {
struct Checksum {
  long long length = 0, sum = 0, wsum = 0, last = 0;
  bool operator==(const Checksum&) const = default;
};
Checksum checksum_of(const std::vector<int>& ts) {
  Checksum c;
  c.length = static_cast<long long>(ts.size());
  for (std::size_t i = 0; i < ts.size(); ++i) {
    c.sum += ts[i];
    c.wsum += static_cast<long long>(i + 1) * ts[i];
  }
  c.last = ts.empty() ? 0 : ts.back();
  return c;
}
} // namespace

TEST_CASE("compat: trailing timesteps for every n = 1..1000; the -1 dropped by default, kept "
          "(diffusers' wrap) with ReferenceQuirks::trailing_wrap") {
  const auto ref = read_reference("diffusers_trailing.txt");
  int checked = 0;
  for (const auto& c : ref.cases) {
    if (c.name.rfind("trailing_checksums/", 0) != 0) continue;
    INFO(c.name);
    const std::string scheduler = c.param("scheduler");
    const auto& ns = c.vector("n");
    std::vector<int> wrapping;
    for (std::size_t j = 0; j < ns.size(); ++j) {
      const int n = static_cast<int>(ns[j]);
      INFO("n = " << n);
      const Checksum peer{
          static_cast<long long>(c.vector("length")[j]), static_cast<long long>(c.vector("sum")[j]),
          static_cast<long long>(c.vector("wsum")[j]), static_cast<long long>(c.vector("last")[j])};
      const auto timesteps = [&](bool wrap) {
        return scheduler == "ddim"
                   ? compat::ddim_timesteps(n, compat::TimestepSpacing::trailing, 0, 1000, wrap)
                   : compat::multistep_timesteps(n, compat::TimestepSpacing::trailing, 0, 1000, -1,
                                                 wrap);
      };
      // With the quirk: diffusers' list exactly, -1 included.
      CHECK(checksum_of(timesteps(true)) == peer);
      // Default: n valid timesteps, diffusers' list less its trailing -1.
      const auto mine = timesteps(false);
      CHECK(mine.size() == static_cast<std::size_t>(n));
      Checksum expected = peer;
      if (peer.length == n + 1) {
        wrapping.push_back(n);
        REQUIRE(peer.last == -1);
        expected = {n, peer.sum + 1, peer.wsum + (n + 1), mine.empty() ? 0 : mine.back()};
      } else {
        REQUIRE(peer.length == n);
      }
      CHECK(checksum_of(mine) == expected);
      ++checked;
    }
    CHECK(wrapping.size() == 62);
    REQUIRE(wrapping.size() >= 5);
    CHECK(std::vector<int>(wrapping.begin(), wrapping.begin() + 5) ==
          std::vector<int>{61, 103, 121, 122, 201});
  }
  CHECK(checked == 3000);
}

TEST_CASE("compat: runs through diffusers' trailing -1 timestep are reproduced with "
          "trailing_wrap, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_trailing.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x_T = ref.matrices.at("x_T");
  const EigenBackend<double> backend;
  int runs = 0;
  for (const auto& c : ref.cases) {
    if (c.name.rfind("trailing_checksums/", 0) == 0) continue;
    INFO(c.name);
    const std::string scheduler = c.param("scheduler");
    const int n = c.param_int("num_inference_steps");
    const auto want_ts = int_vector(c.vector("timesteps"));
    REQUIRE(want_ts.back() == -1);
    double d = 0.0;
    if (scheduler == "ddim") {
      auto cfg = ddim_config_of(c);
      cfg.quirks.trailing_wrap = true;
      const auto setup = compat::ddim_setup(schedule, cfg, n);
      CHECK(setup.timesteps == want_ts);
      CompatTestModel network;
      compat::DdimModel<CompatTestModel> model(network, schedule, cfg, n);
      SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 1, x_T.rows(), x_T.cols());
      Matrix x = x_T;
      std::vector<Matrix> states;
      run_scheme(setup.scheme, backend, setup.nodes, NodeAtLambda(schedule),
                 EpsField<decltype(model)>{model}, x, ws, {}, TrajectoryObserver{&states});
      d = max_step_difference(states, c, identity_steps(states.size()));
      // Default: the n valid steps only.
      cfg.quirks.trailing_wrap = false;
      CHECK(compat::ddim_setup(schedule, cfg, n).timesteps.size() == static_cast<std::size_t>(n));
    } else if (scheduler == "dpmsolver_multistep") {
      auto cfg = multistep_config_of(c);
      cfg.quirks.trailing_wrap = true;
      const auto setup = compat::dpm_solver_multistep_setup(schedule, cfg, n);
      CHECK(setup.timesteps == want_ts);
      d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                          identity_steps(setup.timesteps.size()));
    } else {
      compat::DeisMultistepSchedulerConfig cfg;
      cfg.solver_order = c.param_int("solver_order");
      cfg.lower_order_final = c.param_bool("lower_order_final");
      cfg.timestep_spacing = spacing_of(c.param("timestep_spacing"));
      cfg.quirks.trailing_wrap = true;
      const auto setup = compat::deis_multistep_setup(schedule, cfg, n);
      CHECK(setup.timesteps == want_ts);
      d = run_and_compare(setup.scheme, setup.nodes, c, x_T, schedule,
                          identity_steps(setup.timesteps.size()));
    }
    CHECK(d <= kTolerance);
    record("trailing -1 wrap (" + scheduler + ")", d);
    ++runs;
  }
  CHECK(runs == 5);
}

// ---------------------------------------------------------------------------------------------
// Partial starts (img2img): add_noise at timesteps[t_start], then start_at(setup, t_start)
// ---------------------------------------------------------------------------------------------

TEST_CASE("compat: starting partway (add_noise + start_at) reproduces diffusers' "
          "set_begin_index runs, to 1e-6 per step") {
  const auto ref = read_reference("diffusers_partial.txt");
  const auto schedule = schedule_of(ref);
  const Matrix& x0 = ref.matrices.at("x0");
  const Matrix& noise = ref.matrices.at("noise");
  const EigenBackend<double> backend;
  for (const auto& c : ref.cases) {
    INFO(c.name);
    const std::string scheduler = c.param("scheduler");
    const int n = c.param_int("num_inference_steps");
    const int t_start = c.param_int("t_start");
    const auto want_ts = int_vector(c.vector("timesteps"));
    // The reference's states are the steps from t_start on; map diffgrad's step i to state i.
    const auto compare = [&](const auto& scheme, const std::vector<Node>& nodes) {
      const Matrix x_start = compat::add_noise(x0, noise, nodes.front());
      CompatTestModel network;
      auto model = compat::scheduler_eps_model(
          network, models::parse_prediction_type(c.param("prediction_type")), thresholding_of(c));
      SamplerWorkspace<EigenBackend<double>> ws(backend, scheme.history(), scheme.stages(),
                                                x_start.rows(), x_start.cols());
      std::vector<Matrix> given(c.noise.begin(), c.noise.end());
      if (scheme.stochastic()) {
        REQUIRE(given.size() == nodes.size() - 1);
        ws.given_noise = given;
      }
      Matrix x = x_start;
      std::vector<Matrix> states;
      run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
                 EpsField<decltype(model)>{model}, x, ws, {}, TrajectoryObserver{&states});
      CHECK(network.calls == n - t_start);
      return max_step_difference(states, c, identity_steps(states.size()));
    };
    double d = 0.0;
    if (scheduler == "ddim") {
      const auto cfg = ddim_config_of(c);
      const auto part = compat::start_at(compat::ddim_setup(schedule, cfg, n), t_start);
      CHECK(part.timesteps == std::vector<int>(want_ts.begin() + t_start, want_ts.end()));
      const Matrix x_start = compat::add_noise(x0, noise, part.nodes.front());
      CompatTestModel network;
      compat::DdimModel<CompatTestModel> model(network, schedule, cfg, n);
      SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 1, x0.rows(), x0.cols());
      Matrix x = x_start;
      std::vector<Matrix> states;
      run_scheme(part.scheme, backend, part.nodes, NodeAtLambda(schedule),
                 EpsField<decltype(model)>{model}, x, ws, {}, TrajectoryObserver{&states});
      d = max_step_difference(states, c, identity_steps(states.size()));
    } else if (scheduler == "dpmsolver_multistep" &&
               c.param("algorithm_type").rfind("sde-", 0) == 0) {
      const auto part = compat::start_at(
          compat::sde_dpm_solver_setup(schedule, multistep_config_of(c), n), t_start);
      d = compare(part.scheme, part.nodes);
    } else if (scheduler == "dpmsolver_multistep") {
      const auto full = compat::dpm_solver_multistep_setup(schedule, multistep_config_of(c), n);
      const auto part = compat::start_at(full, t_start);
      CHECK(part.timesteps == std::vector<int>(want_ts.begin() + t_start, want_ts.end()));
      d = compare(part.scheme, part.nodes);
      // Negative control: the sliced nodes with the unstarted scheme count n - t_start steps,
      // below diffusers' 15-step lower_order_final threshold when n >= 15 is not (3M: the
      // second-to-last step drops to 2M; at order 2 the final step into sigma = 0 is first
      // order either way).
      if (n >= 15 && n - t_start < 15 && c.param_int("solver_order") == 3) {
        CompatTestModel network;
        Matrix x = compat::add_noise(x0, noise, part.nodes.front());
        SamplerWorkspace<EigenBackend<double>> ws(backend, full.scheme.history(), 1, x.rows(),
                                                  x.cols());
        run_scheme(full.scheme, backend, std::span<const Node>(part.nodes), NodeAtLambda(schedule),
                   EpsField<CompatTestModel>{network}, x, ws);
        CHECK(relative_difference(x, c.states.back()) > 1e-6);
      }
    } else if (scheduler == "dpmsolver_singlestep") {
      compat::DpmSolverSinglestepSchedulerConfig cfg;
      cfg.solver_order = c.param_int("solver_order");
      cfg.algorithm_type = algorithm_of(c.param("algorithm_type"));
      cfg.solver_type = solver_type_of(c.param("solver_type"));
      cfg.lower_order_final = c.param_bool("lower_order_final");
      cfg.final_sigmas_type = final_of(c.param("final_sigmas_type"));
      const auto full = compat::dpm_solver_singlestep_setup(schedule, cfg, n);
      const auto part = compat::start_at(full, t_start);
      // The full run's order list from t_start, capped by the model values available.
      const auto orders = c.param_int_list("order_list");
      for (int i = 0; i + t_start < n; ++i)
        CHECK(part.scheme.step_order(part.nodes, i) ==
              std::min(orders[static_cast<std::size_t>(i + t_start)], i + 1));
      d = compare(part.scheme, part.nodes);
      // Slicing the nodes alone (a fresh order list for n - t_start steps) is not diffusers.
      const auto sliced = compat::dpm_solver_singlestep_setup(schedule, cfg, n - t_start);
      bool differs = false;
      for (int i = 0; i + t_start < n; ++i)
        differs = differs ||
                  sliced.scheme.step_order(part.nodes, i) != part.scheme.step_order(part.nodes, i);
      CHECK(differs);
    } else {
      compat::DeisMultistepSchedulerConfig cfg;
      cfg.solver_order = c.param_int("solver_order");
      cfg.lower_order_final = c.param_bool("lower_order_final");
      cfg.timestep_spacing = spacing_of(c.param("timestep_spacing"));
      const auto part = compat::start_at(compat::deis_multistep_setup(schedule, cfg, n), t_start);
      d = compare(part.scheme, part.nodes);
    }
    CHECK(d <= kTolerance);
    record("partial start (" + scheduler + ")", d);
  }
  CHECK_THROWS_WITH(compat::start_at(compat::ddim_setup(schedule, {}, 10), 10),
                    Catch::Contains("t_start"));
}
