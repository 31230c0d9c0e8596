// Cost claims of the sampling engine, checked by counting instead of asserted in comments:
// for every scheme, each step does exactly one fused lincomb pass per stage (stage inputs for
// s >= 1, plus the output), one finiteness check per model call, no state allocation and no
// heap allocation at all once the workspace exists.
//
// Heap allocations are counted by tests/alloc_probe.hpp (operator new and Eigen's malloc hook).
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <numeric>
#include <string>
#include <vector>

#include "diffgrad/backend/counting_backend.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/heun.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"
// Schemes whose headers may land after this test: covered as soon as they exist.
#if __has_include("diffgrad/solvers/dpm_solver_multistep.hpp")
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#define DIFFGRAD_TEST_HAS_DPM_MULTISTEP 1
#endif
#if __has_include("diffgrad/solvers/sde_dpm_solver.hpp")
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#define DIFFGRAD_TEST_HAS_SDE_DPM 1
#endif

using namespace diffgrad;
using Inner = EigenBackend<double>;
using Counting = CountingBackend<Inner>;
using State = Inner::state_type;

static_assert(Backend<Counting>, "CountingBackend must itself be a Backend");
static_assert(Backend<CountingBackend<EigenBackend<float>>>);

namespace {

/// Counts heap allocations (operator new and Eigen's allocator) while alive.
class AllocationWindow {
public:
  AllocationWindow() {
    new_before_ = alloc_probe::operator_new_calls.load();
    eigen_before_ = alloc_probe::eigen_heap_allocations.load();
    Eigen::internal::set_is_malloc_allowed(false);
    alloc_probe::counting = true;
  }
  ~AllocationWindow() { stop(); }
  void stop() {
    if (!alloc_probe::counting) return;
    alloc_probe::counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
    new_calls = alloc_probe::operator_new_calls.load() - new_before_;
    eigen_allocations = alloc_probe::eigen_heap_allocations.load() - eigen_before_;
  }
  long new_calls = 0, eigen_allocations = 0;

private:
  long new_before_ = 0, eigen_before_ = 0;
};

/// Gaussian-data eps written element by element, so the model itself never allocates (the
/// reference GaussianData builds an Eigen temporary, which is the model's business, not
/// the engine's).
struct NonAllocatingGaussianEps {
  Eigen::VectorXd mu;
  double s = 0.2;
  void eps(const State& x, const Node& n, State& out) const {
    const double v = n.alpha * n.alpha * s * s + n.sigma * n.sigma;
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c)
        out(r, c) = n.sigma * (x(r, c) - n.alpha * mu(c)) / v;
  }
};

NonAllocatingGaussianEps make_model(Eigen::Index dim) {
  NonAllocatingGaussianEps m;
  m.mu.resize(dim);
  for (Eigen::Index j = 0; j < dim; ++j) m.mu(j) = 0.5 - 0.3 * static_cast<double>(j);
  return m;
}

/// Rectified-flow velocity towards a point y, element by element: v = (y - x)/(1 - t).
struct NonAllocatingVelocity {
  Eigen::VectorXd y;
  void velocity(const State& x, double t, State& out) const {
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c) out(r, c) = (y(c) - x(r, c)) / (1.0 - t);
  }
};

/// Runs `scheme` through the engine on a CountingBackend with a prebuilt workspace and
/// checks the per-step cost model; also checks the result is bit-identical to the plain
/// backend's (the wrapper forwards, it does not change anything). `field` is the engine's
/// model call (EpsField / VelocityField around a non-allocating model).
/// Returns the heap allocations of the whole run_scheme call (validate() included).
template <class Scheme, class Field>
long check_engine_costs(const std::string& name, const Scheme& scheme, NodeAtLambda at_lambda,
                        const std::vector<Node>& nodes, Field field, std::uint64_t seed = 7) {
  INFO("scheme " << name << ", " << nodes.size() - 1 << " steps");
  constexpr Eigen::Index kBatch = 3, kDim = 5;
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  const State x_T = diffgrad::testing::test_batch<double>(kBatch, kDim);
  SampleOptions options;
  options.seed = seed;

  // What the plans promise, computed before the measured region.
  std::vector<int> stages(static_cast<std::size_t>(num_steps));
  std::vector<bool> noisy(static_cast<std::size_t>(num_steps));
  for (int i = 0; i < num_steps; ++i) {
    const StepPlan plan = scheme.plan(nodes, i, at_lambda);
    stages[static_cast<std::size_t>(i)] = plan.num_stages;
    noisy[static_cast<std::size_t>(i)] = plan.noise != 0.0;
  }
  const int total_stages = std::accumulate(stages.begin(), stages.end(), 0);

  // Reference: the same run on the plain backend.
  State expected = x_T;
  {
    const Inner plain;
    SamplerWorkspace<Inner> ws(plain, scheme.history(), scheme.stages(), kBatch, kDim);
    run_scheme(scheme, plain, std::span<const Node>(nodes), at_lambda, field, expected, ws,
               options);
  }

  const Counting backend;
  State x = x_T;
  SamplerWorkspace<Counting> ws(backend, scheme.history(), scheme.stages(), kBatch, kDim);
  const BackendCounts before_loop = backend.counts();
  CHECK(before_loop.make_state == 2 * (scheme.history() + 1) + 2 * (scheme.stages() - 1));

  std::vector<BackendCounts> after_step(static_cast<std::size_t>(num_steps));
  auto observer = [&](int step, int, const Node&, const State&) {
    after_step[static_cast<std::size_t>(step - 1)] = backend.counts();
  };
  // validate() runs once before the loop and may legitimately allocate (coefficient tables);
  // measure it alone so the loop's own count is total - validate.
  long validate_allocations = 0;
  {
    AllocationWindow validate_window;
    scheme.validate(std::span<const Node>(nodes));
    validate_window.stop();
    validate_allocations = validate_window.new_calls + validate_window.eigen_allocations;
  }
  SampleResult result;
  AllocationWindow window;
  result = run_scheme(scheme, backend, std::span<const Node>(nodes), at_lambda, field, x, ws,
                      options, observer);
  window.stop();
  const long run_allocations = window.new_calls + window.eigen_allocations;
  INFO("heap allocations: " << run_allocations << " in run_scheme, " << validate_allocations
                            << " of them in validate()");
  CHECK(run_allocations - validate_allocations == 0);
  REQUIRE(result.steps_taken == num_steps);
  CHECK(result.model_evals == total_stages);

  const BackendCounts loop = backend.counts() - before_loop;
  CHECK(loop.make_state == 0);
  CHECK(loop.make_vector == 0);
  CHECK(loop.reductions == 0);
  CHECK(loop.lincomb_passes == total_stages);
  CHECK(loop.copies == 2); // x into the workspace before step 0, the sample out after

  BackendCounts previous = before_loop;
  previous.copies += 1; // the copy-in before step 0 is not part of any step
  previous.finite_checks += 1; // nor is the x_T check before it (SampleOptions::check_finite)
  for (int i = 0; i < num_steps; ++i) {
    const auto k = static_cast<std::size_t>(i);
    const BackendCounts step = after_step[k] - previous;
    INFO("step " << i << " with " << stages[k] << " stage(s)");
    CHECK(step.lincomb_passes == stages[k]); // s - 1 stage inputs + 1 output
    CHECK(step.finite_checks == stages[k]);  // one per model output
    CHECK(step.noise_passes == (noisy[k] ? 1 : 0));
    CHECK(step.make_state == 0);
    CHECK(step.copies == 0);
    CHECK(step.reductions == 0);
    previous = after_step[k];
  }
  CHECK((x - expected).cwiseAbs().maxCoeff() == 0.0);
  return run_allocations;
}

} // namespace

TEST_CASE("CountingBackend forwards every operation and counts it", "[counting][backend]") {
  const Inner plain;
  const Counting counting;
  const State a = diffgrad::testing::test_batch<double>(2, 3);
  const State b = a * 0.5 + State::Constant(2, 3, 0.25);
  State out_plain = plain.make_state(2, 3), out_counted = counting.make_state(2, 3);
  CHECK(counting.counts().make_state == 1);

  plain.lincomb(out_plain, term(2.0, a), term(-1.0, b));
  counting.lincomb(out_counted, term(2.0, a), term(-1.0, b));
  CHECK(out_counted == out_plain);
  plain.lincomb(out_plain, NoiseTerm{0.5, 3, 4}, term(1.0, a));
  counting.lincomb(out_counted, NoiseTerm{0.5, 3, 4}, term(1.0, a));
  CHECK(out_counted == out_plain);
  const LinTerm<State> terms[] = {term(1.0, a), term(3.0, b), term(-0.5, a)};
  plain.lincomb(out_plain, std::span<const LinTerm<State>>(terms), NoiseTerm{0.1, 9, 1});
  counting.lincomb(out_counted, std::span<const LinTerm<State>>(terms), NoiseTerm{0.1, 9, 1});
  CHECK(out_counted == out_plain);
  counting.lincomb(out_counted, std::span<const LinTerm<State>>(terms));
  plain.gaussian(out_plain, 5, 6);
  counting.gaussian(out_counted, 5, 6);
  CHECK(out_counted == out_plain);

  CHECK(counting.dot(a, b) == plain.dot(a, b));
  CHECK(counting.squared_norm(a) == plain.squared_norm(a));
  CHECK(counting.all_finite(a));
  counting.copy(out_counted, a);
  CHECK(out_counted == a);
  counting.fill(out_counted, 1.5);
  CHECK(out_counted == State::Constant(2, 3, 1.5));
  CHECK(counting.make_vector(4).size() == 4);

  const BackendCounts& c = counting.counts();
  CHECK(c.lincomb_passes == 5);
  CHECK(c.noise_passes == 3);
  CHECK(c.reductions == 2);
  CHECK(c.finite_checks == 1);
  CHECK(c.copies == 1);
  CHECK(c.fills == 1);
  CHECK(c.make_state == 1);
  CHECK(c.make_vector == 1);
  CHECK(c.memory_passes() == 5 + 2 + 1 + 1 + 1);

  counting.reset();
  CHECK(counting.counts() == BackendCounts{});
}

TEST_CASE("The allocation probe sees operator new and Eigen allocations", "[counting]") {
  // Guards the guard: if the probe were blind, every zero-allocation check would pass.
  AllocationWindow window;
  auto* boxed = new int(3);
  State grown(4, 4);
  window.stop();
  delete boxed;
  CHECK(window.new_calls == 1);
  CHECK(window.eigen_allocations >= 1);
  CHECK(grown.size() == 16);
}

namespace {
/// One noise-model scheme on the VP-linear schedule with a uniform-lambda grid.
template <class Scheme>
long check_eps_scheme(const std::string& name, const Scheme& scheme, int num_steps = 12) {
  static const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_lambda_grid(schedule, num_steps, 1.0, 1e-3));
  static auto model = make_model(5);
  return check_engine_costs(name, scheme, NodeAtLambda(schedule), nodes,
                            EpsField<NonAllocatingGaussianEps>{model});
}
} // namespace

TEST_CASE("DDIM: one fused lincomb per step, no allocation in the loop", "[counting][ddim]") {
  // DDIM needs no tables at all: the whole call, validation included, is allocation-free.
  CHECK(check_eps_scheme("Ddim(eta = 0)", Ddim()) == 0);
  CHECK(check_eps_scheme("Ddim(eta = 0.7)", Ddim(0.7)) == 0);
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 12, 1.0, 1e-3));
  std::vector<Node> reversed(nodes.rbegin(), nodes.rend());
  auto model = make_model(5);
  CHECK(check_engine_costs("DdimInversion", DdimInversion(), NodeAtLambda(schedule), reversed,
                           EpsField<NonAllocatingGaussianEps>{model}) == 0);
}

TEST_CASE("Singlestep DPM-Solver(++): one fused lincomb per stage", "[counting][dpm]") {
  for (auto prediction : {SolverPrediction::noise, SolverPrediction::data}) {
    const std::string p = prediction == SolverPrediction::data ? "++" : "";
    for (int order : {1, 2, 3})
      check_eps_scheme("DpmSolverSinglestep" + p + " order " + std::to_string(order),
                       DpmSolverSinglestep(order, prediction));
    check_eps_scheme("DpmSolverSinglestep" + p + " order 2 heun",
                     DpmSolverSinglestep(2, prediction, DpmSolverType::heun));
    // The official "DPM-Solver-fast" order mix: stage counts differ from step to step.
    DpmSolverSinglestep::Options fast;
    fast.prediction = prediction;
    fast.orders = DpmSolverSinglestep::official_fast_orders(14, 3);
    check_eps_scheme("DpmSolverSinglestep" + p + " fast(14, 3)", DpmSolverSinglestep(fast),
                     static_cast<int>(fast.orders.size()));
    for (int order : {2, 3}) {
      DpmSolverSinglestep::DiffusersOptions d;
      d.solver_order = order;
      d.algorithm_type = prediction == SolverPrediction::data ? DpmAlgorithm::dpmsolver_pp
                                                              : DpmAlgorithm::dpmsolver;
      check_eps_scheme("DpmSolverSinglestep" + p + "::diffusers order " + std::to_string(order),
                       DpmSolverSinglestep::diffusers(d));
    }
  }
}

TEST_CASE("Multistep and SDE DPM-Solver(++): one fused lincomb per step", "[counting][dpm]") {
#ifdef DIFFGRAD_TEST_HAS_DPM_MULTISTEP
  for (auto prediction : {SolverPrediction::noise, SolverPrediction::data})
    for (int order : {1, 2, 3})
      check_eps_scheme(std::string("DpmSolverMultistep") +
                           (prediction == SolverPrediction::data ? "++ " : " ") +
                           std::to_string(order) + "M",
                       DpmSolverMultistep(order, prediction));
#else
  WARN("solvers/dpm_solver_multistep.hpp not present: DpmSolverMultistep not covered");
#endif
#ifdef DIFFGRAD_TEST_HAS_SDE_DPM
  for (int order : {1, 2, 3})
    check_eps_scheme("SdeDpmSolver++ order " + std::to_string(order),
                     SdeDpmSolver(order, SolverPrediction::data));
  for (int order : {1, 2})
    check_eps_scheme("SdeDpmSolver order " + std::to_string(order),
                     SdeDpmSolver(order, SolverPrediction::noise));
#else
  WARN("solvers/sde_dpm_solver.hpp not present: SdeDpmSolver not covered");
#endif
}

TEST_CASE("DEIS family and iPNDM: one fused lincomb per stage", "[counting][deis]") {
  for (int order : {0, 1, 2, 3})
    check_eps_scheme("DeisTab(" + std::to_string(order) + ")", DeisTab(order));
  for (int order : {1, 2, 3})
    check_eps_scheme("DeisRhoAb(" + std::to_string(order) + ")", DeisRhoAb(order));
  for (int order : {1, 2, 3})
    check_eps_scheme("DeisLogRho(" + std::to_string(order) + ")", DeisLogRho(order));
  for (int order : {1, 2, 3, 4})
    check_eps_scheme("IPndm(" + std::to_string(order) + ")", IPndm(order));
  check_eps_scheme("DeisRhoRk(heun2)", DeisRhoRk(DeisRkMethod::heun2));
  check_eps_scheme("DeisRhoRk(kutta3)", DeisRhoRk(DeisRkMethod::kutta3));
  check_eps_scheme("DeisRhoRk(rk4)", DeisRhoRk(DeisRkMethod::rk4));
}

TEST_CASE("Flow samplers: one fused lincomb per stage", "[counting][flow]") {
  const auto nodes = flow_nodes(uniform_flow_grid(10, 0.0, 0.9));
  NonAllocatingVelocity model{Eigen::VectorXd::LinSpaced(5, -1.0, 1.0)};
  const NodeAtLambda no_map(detail::no_lambda_map());
  CHECK(check_engine_costs("FlowEuler", FlowEuler(), no_map, nodes,
                           VelocityField<NonAllocatingVelocity>{model}) == 0);
  check_engine_costs("FlowHeun", FlowHeun(), no_map, nodes,
                     VelocityField<NonAllocatingVelocity>{model});
  check_engine_costs("FlowHeun(final_euler)", FlowHeun(true), no_map, nodes,
                     VelocityField<NonAllocatingVelocity>{model});
}

namespace {

/// eps = 0.3 x + 0.1 written element by element (never allocates): the engine's loop is what
/// is measured, whatever the coefficients' kind.
struct NonAllocatingLinearEps {
  void eps(const State& x, const Node&, State& out) const {
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c) out(r, c) = 0.3 * x(r, c) + 0.1;
  }
};

/// The structured schemes' cost model: one fused pass per step (their plans are one-stage),
/// one noise pass per stochastic step, no state made and no heap allocation in the loop, and
/// the counted run bit-identical to the plain one.
template <class Scheme, class PlainScheme>
void check_structured_costs(const Scheme& scheme, const PlainScheme& plain_scheme,
                            std::span<const Node> nodes, Eigen::Index dim, bool noisy) {
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  const State x_T = diffgrad::testing::test_batch<double>(3, dim);
  NonAllocatingLinearEps model;
  SampleOptions options;
  options.seed = 11;
  struct NoLambda {
    double t_of_lambda(double) const { return 0.0; }
    Node node(double) const { return Node{}; }
  } no_lambda;
  State expected = x_T;
  {
    const Inner plain;
    SamplerWorkspace<Inner> ws(plain, plain_scheme.history(), plain_scheme.stages(), 3, dim);
    run_scheme(plain_scheme, plain, nodes, NodeAtLambda(no_lambda),
               EpsField<NonAllocatingLinearEps>{model}, expected, ws, options);
  }
  const Counting backend;
  SamplerWorkspace<Counting> ws(backend, scheme.history(), scheme.stages(), 3, dim);
  State x = x_T;
  const BackendCounts before = backend.counts();
  AllocationWindow window;
  run_scheme(scheme, backend, nodes, NodeAtLambda(no_lambda),
             EpsField<NonAllocatingLinearEps>{model}, x, ws, options);
  window.stop();
  const BackendCounts loop = backend.counts() - before;
  CHECK(window.new_calls + window.eigen_allocations == 0);
  CHECK(loop.lincomb_passes == num_steps);
  CHECK(loop.noise_passes == (noisy ? num_steps : 0));
  CHECK(loop.make_state == 0);
  CHECK(loop.make_vector == 0);
  CHECK(loop.copies == 2);
  CHECK((x - expected).cwiseAbs().maxCoeff() == 0.0);
}

} // namespace

TEST_CASE("gDDIM block and per-frequency plans: one fused pass per step, no allocation",
          "[counting][gddim]") {
  using namespace diffgrad::gddim;
  const CldSchedule cld{CldParams{}};
  const std::vector<double> cld_times = cld_quadratic_grid(cld, 6);
  for (const double l : {0.0, 0.5}) {
    CldGddimOptions o;
    o.order = l > 0 ? 1 : 3;
    o.stochasticity = l;
    const CldGddim scheme(cld, cld_times, o);
    INFO("CLD, order " << o.order << ", stochasticity " << l);
    check_structured_costs(scheme, scheme, std::span<const Node>(scheme.nodes()), 4, l > 0);
  }
  const BdmSchedule<> bdm(2, 3);
  const std::vector<double> bdm_times{0.9, 0.6, 0.4, 0.2, 0.1, 0.05};
  for (const double l : {0.0, 0.5}) {
    BdmGddimOptions o;
    o.order = l > 0 ? 1 : 3;
    o.stochasticity = l;
    // The counted scheme's coefficient table lives in the counting backend's (inner) memory.
    const Counting counting;
    const BdmGddim<Counting> scheme(counting, bdm, bdm_times, o);
    const BdmGddim<Inner> plain_scheme(Inner{}, bdm, bdm_times, o);
    INFO("BDM, order " << o.order << ", stochasticity " << l);
    check_structured_costs(scheme, plain_scheme, scheme.nodes(), 6, l > 0);
  }
}

// ---------------------------------------------------------------------------------------
// Exact gradients (gradients/reverse_stepper.hpp): model calls, stored and allocated
// vectors, no heap allocation in the run once the workspace exists.

namespace {

/// eps = 0.3 x + 0.1 and its VJP dx = 0.3 a, element by element (never allocates).
struct NonAllocatingLinearModel {
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  int evals = 0, vjps = 0;
  void eps(const State& x, const Node&, State& out) {
    ++evals;
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c) out(r, c) = 0.3 * x(r, c) + 0.1;
  }
  void vjp(const State&, const Node&, const State& a, State& dx, Inner::vector_type*,
           Inner::vector_type*) {
    ++vjps;
    for (Eigen::Index r = 0; r < a.rows(); ++r)
      for (Eigen::Index c = 0; c < a.cols(); ++c) dx(r, c) = 0.3 * a(r, c);
  }
};

struct GradientCounts {
  std::int64_t evals, vjps, stored, workspace_states, heap_allocations;
};

/// One gradient of `scheme` over n steps on a CountingBackend: the workspace's state
/// allocations, then the run's model calls (counted by the model), stored vectors and heap
/// allocations (counted by the probe).
template <class Scheme>
GradientCounts count_gradient(const Scheme& scheme, int n, const GradientOptions& options) {
  const VPLinearSchedule schedule;
  const std::vector<Node> nodes = make_nodes(schedule, uniform_t_grid(schedule, n, 1.0, 1e-3));
  const State x_T = diffgrad::testing::test_batch<double>(3, 5);
  const State cotangent = x_T.reverse();
  NonAllocatingLinearModel model;
  const Counting backend;
  const BackendCounts before = backend.counts();
  auto ws =
      make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), model, x_T, options);
  const std::int64_t made = (backend.counts() - before).make_state;
  AllocationWindow window;
  const auto& r = gradient(scheme, backend, schedule, std::span<const Node>(nodes), model, x_T,
                           cotangent, options, ws);
  window.stop();
  CHECK(r.cost.model_evals == model.evals);
  CHECK(r.cost.vjps == model.vjps);
  CHECK(r.cost.peak_stored_states <= ws.snapshot_buffers());
  return {model.evals, model.vjps, r.cost.peak_stored_states, made,
          window.new_calls + window.eigen_allocations};
}

/// The workspace's fixed working set for history h and s stages: (h + 1) states and model
/// outputs, 2 (s - 1) stage buffers, (h + 2) + (h + 1) cotangent rings, 2 (s - 1) stage
/// cotangents, the VJP buffer, x0 and dL/dx_T.
std::int64_t working_set(int h, int s) {
  return 2 * (h + 1) + 2 * (s - 1) + (2 * h + 3) + 2 * (s - 1) + 3;
}

} // namespace

TEST_CASE("Exact gradients: N - 1 stored vectors under store_all, model calls per the cost "
          "formulas, no allocation in the run",
          "[counting][adjoint]") {
  const int n = 12;
  const GradientOptions store_all;
  GradientOptions keep;
  keep.keep_stages = true;
  GradientOptions recompute;
  recompute.memory = MemoryMode::recompute();

  // DDIM: one stage, no history.
  const auto ddim = count_gradient(Ddim(), n, store_all);
  CHECK(ddim.evals == n);
  CHECK(ddim.vjps == n);
  CHECK(ddim.stored == n - 1);
  CHECK(ddim.workspace_states == working_set(0, 1) + (n - 1));
  CHECK(ddim.heap_allocations == 0);
#ifdef DIFFGRAD_TEST_HAS_DPM_MULTISTEP
  // DPM-Solver++ 2M / 3M read x_{i-1-j} and e_{i-1-j}, but reversing step i needs only x_i:
  // store_all keeps one vector per step (before: 1 + 2H per step, 239 for 3M at N = 50).
  for (int order : {2, 3}) {
    INFO("DPM-Solver++ " << order << "M");
    const DpmSolverMultistep scheme(order, SolverPrediction::data);
    const auto g = count_gradient(scheme, n, store_all);
    CHECK(g.evals == n);
    CHECK(g.vjps == n);
    CHECK(g.stored == n - 1);
    CHECK(g.workspace_states == working_set(order - 1, 1) + (n - 1));
    CHECK(g.heap_allocations == 0);
    // recompute: x_T only, re-advanced from (no history at step 0): N (N - 1)/2 + 1 calls.
    const auto r = count_gradient(scheme, n, recompute);
    CHECK(r.evals == n * (n - 1) / 2 + 1);
    CHECK(r.stored == 1);
    CHECK(r.heap_allocations == 0);
  }
#endif
  // A 3-stage singlestep scheme: S N forward calls plus (S - 1) N stage recomputations, or
  // none with keep_stages, which stores the S - 1 stage inputs of every step as well.
  const DpmSolverSinglestep singlestep(3, SolverPrediction::data);
  const auto plain = count_gradient(singlestep, n, store_all);
  CHECK(plain.evals == 3 * n + 2 * n);
  CHECK(plain.vjps == 3 * n);
  CHECK(plain.stored == n - 1);
  CHECK(plain.workspace_states == working_set(0, 3) + (n - 1));
  CHECK(plain.heap_allocations == 0);
  const auto kept = count_gradient(singlestep, n, keep);
  CHECK(kept.evals == 3 * n);
  CHECK(kept.vjps == 3 * n);
  CHECK(kept.stored == 3 * (n - 1));
  CHECK(kept.workspace_states == working_set(0, 3) + 3 * (n - 1));
  CHECK(kept.heap_allocations == 0);
}
