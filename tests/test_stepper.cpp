// Users who own the loop. The stepper (solvers/stepper.hpp): a loop written by the user,
// calling the model however it likes, gives exactly the bits of sample() for every scheme kind
// (one- and multistage, multistep, SDE with Philox and with given noise, block and per-column
// gDDIM plans); a classifier-free-guidance loop that batches the conditional and unconditional
// calls into ONE model call equals sample() with the combined model; misuse is refused clearly.
// Long gradients: GradientOptions::progress reports every advance and reversal and can cancel.
#include <catch2/catch.hpp>

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#include "diffgrad/solvers/stepper.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;

namespace {

/// A smooth nonlinear model: eps = tanh(0.7 x + 0.2 t) - 0.1 x, written per element.
struct SmoothEps {
  void eps(const State& x, const Node& n, State& out) const {
    out.resize(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c)
        out(r, c) = std::tanh(0.7 * x(r, c) + 0.2 * n.t) - 0.1 * x(r, c);
  }
};

/// sample() and a hand-written stepper loop with the same scheme, nodes and options.
template <class Scheme>
void check_same_bits(const std::string& name, const Scheme& scheme, std::span<const Node> nodes,
                     NodeAtLambda nal, const State& x_T, const SampleOptions& options,
                     std::span<const State> given_noise = {}) {
  INFO(name);
  const Backend64 backend;
  SmoothEps model;
  State by_sample = x_T;
  {
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                   x_T.cols());
    ws.given_noise = given_noise;
    run_scheme(scheme, backend, nodes, nal, EpsField<SmoothEps>{model}, by_sample, ws, options);
  }
  SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                 x_T.cols());
  ws.given_noise = given_noise;
  Stepper<Scheme, Backend64> stepper(scheme, backend, nodes, nal, ws, options);
  stepper.begin(x_T);
  int completed = 0, calls = 0;
  while (!stepper.done()) {
    model.eps(stepper.model_input(), stepper.model_node(), stepper.model_output());
    ++calls;
    if (stepper.advance()) {
      ++completed;
      CHECK(stepper.step() == completed);
    }
  }
  State by_stepper;
  stepper.result(by_stepper);
  CHECK(completed == static_cast<int>(nodes.size()) - 1);
  CHECK(calls == stepper.model_evals());
  CHECK(by_stepper == by_sample);
}

} // namespace

TEST_CASE("A user-owned stepper loop gives sample()'s bits for every scheme kind", "[stepper]") {
  const VPLinearSchedule schedule;
  const std::vector<Node> nodes =
      make_nodes(schedule, make_grid(schedule, GridKind::uniform_lambda, 12));
  const NodeAtLambda nal(schedule);
  const State x_T = testing::test_batch<double>(3, 5);
  SampleOptions options;
  options.seed = 31;
  options.row_offset = 7;
  check_same_bits("Ddim", Ddim(), nodes, nal, x_T, options);
  check_same_bits("Ddim(eta = 1)", Ddim(1.0), nodes, nal, x_T, options);
  for (int order : {2, 3}) {
    check_same_bits("DpmSolverMultistep++ " + std::to_string(order),
                    DpmSolverMultistep(order, SolverPrediction::data), nodes, nal, x_T, options);
    check_same_bits("DpmSolverSinglestep " + std::to_string(order),
                    DpmSolverSinglestep(order, SolverPrediction::noise), nodes, nal, x_T, options);
    check_same_bits("SdeDpmSolver++ " + std::to_string(order),
                    SdeDpmSolver(order, SolverPrediction::data), nodes, nal, x_T, options);
  }
  check_same_bits("DeisRhoRk(rk4)", DeisRhoRk(DeisRkMethod::rk4), nodes, nal, x_T, options);
  check_same_bits("IPndm(4)", IPndm(4), nodes, nal, x_T, options);

  std::vector<State> noise;
  for (std::size_t i = 0; i + 1 < nodes.size(); ++i)
    noise.push_back(testing::test_batch<double>(3, 5) * (0.1 * static_cast<double>(i) - 0.5));
  check_same_bits("Ddim(eta = 0.5), given noise", Ddim(0.5), nodes, nal, x_T, options, noise);

  // Structured plans: CLD blocks (stochastic: correlated x/v noise) and BDM column tables.
  using namespace diffgrad::gddim;
  const CldSchedule cld{CldParams{}};
  for (const double l : {0.0, 0.6}) {
    CldGddimOptions o;
    o.order = l > 0 ? 1 : 3;
    o.stochasticity = l;
    const CldGddim scheme(cld, cld_quadratic_grid(cld, 8), o);
    check_same_bits("CldGddim, stochasticity " + std::to_string(l), scheme,
                    std::span<const Node>(scheme.nodes()), scheme.node_at_lambda(),
                    testing::test_batch<double>(3, 4), options);
  }
  const BdmSchedule<> bdm(2, 2);
  BdmGddimOptions bo;
  bo.stochasticity = 0.5;
  const BdmGddim<Backend64> bdm_scheme(Backend64{}, bdm, std::vector<double>{0.9, 0.5, 0.2, 0.05},
                                       bo);
  check_same_bits("BdmGddim, stochasticity 0.5", bdm_scheme, bdm_scheme.nodes(),
                  bdm_scheme.node_at_lambda(), testing::test_batch<double>(3, 4), options);
}

TEST_CASE("Classifier-free guidance with one batched model call per stage", "[stepper][cfg]") {
  // Conditional and unconditional "networks" share one batched call in the user's loop: rows
  // [0, B) are the conditional copies, [B, 2B) the unconditional ones. eps = eps_u + w (eps_c -
  // eps_u). The reference is sample() with the combined model written as one functor.
  const VPLinearSchedule schedule;
  const std::vector<Node> nodes =
      make_nodes(schedule, make_grid(schedule, GridKind::uniform_lambda, 10));
  const double w = 3.0;
  const auto batched_net = [](const State& x, const Node& n, State& out) {
    const Eigen::Index b = x.rows() / 2;
    out.resize(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c) {
        const double cond = r < b ? 0.5 : 0.0; // the class embedding, zero = unconditional
        out(r, c) = std::tanh(0.8 * x(r, c) + cond + 0.1 * n.t);
      }
  };
  struct Combined {
    double w;
    void eps(const State& x, const Node& n, State& out) const {
      out.resize(x.rows(), x.cols());
      for (Eigen::Index r = 0; r < x.rows(); ++r)
        for (Eigen::Index c = 0; c < x.cols(); ++c) {
          const double eu = std::tanh(0.8 * x(r, c) + 0.1 * n.t);
          const double ec = std::tanh(0.8 * x(r, c) + 0.5 + 0.1 * n.t);
          out(r, c) = eu + w * (ec - eu);
        }
    }
  } combined{w};

  const Backend64 backend;
  const State x_T = testing::test_batch<double>(4, 6);
  const DpmSolverMultistep scheme(2, SolverPrediction::data);
  State reference = x_T;
  sample(scheme, backend, schedule, std::span<const Node>(nodes), combined, reference);

  SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), 4, 6);
  Stepper<DpmSolverMultistep, Backend64> stepper(scheme, backend, std::span<const Node>(nodes),
                                                 NodeAtLambda(schedule), ws);
  stepper.begin(x_T);
  State doubled(8, 6), both(8, 6);
  int calls = 0;
  while (!stepper.done()) {
    doubled << stepper.model_input(), stepper.model_input();
    batched_net(doubled, stepper.model_node(), both);
    ++calls;
    const auto eps_c = both.topRows(4), eps_u = both.bottomRows(4);
    stepper.model_output() = eps_u + w * (eps_c - eps_u);
    stepper.advance();
  }
  State guided;
  stepper.result(guided);
  CHECK(calls == static_cast<int>(nodes.size()) - 1);
  CHECK(testing::relative_error<double>(guided, reference) < 1e-15);
}

TEST_CASE("Stepper misuse and bad model outputs are refused by name", "[stepper][errors]") {
  const VPLinearSchedule schedule;
  const std::vector<Node> nodes =
      make_nodes(schedule, make_grid(schedule, GridKind::uniform_lambda, 3));
  const Backend64 backend;
  const Ddim scheme;
  SamplerWorkspace<Backend64> ws(backend, 0, 1, 2, 3);
  Stepper<Ddim, Backend64> stepper(scheme, backend, std::span<const Node>(nodes),
                                   NodeAtLambda(schedule), ws);
  CHECK_THROWS_WITH(stepper.model_input(), Catch::Contains("begin(x_T) first"));
  CHECK_THROWS_WITH(stepper.advance(), Catch::Contains("begin(x_T) first"));
  CHECK_THROWS_WITH(stepper.begin(State::Zero(2, 4)),
                    Catch::Contains("Stepper") && Catch::Contains("'x'") &&
                        Catch::Contains("2 x 4"));
  stepper.begin(State::Constant(2, 3, 0.5));
  stepper.model_output().setConstant(std::nan(""));
  CHECK_THROWS_WITH(stepper.advance(), Catch::Contains("model output") &&
                                           Catch::Contains("NaN") && Catch::Contains("step 0"));
  stepper.begin(State::Constant(2, 3, 0.5));
  stepper.model_output().resize(2, 2);
  CHECK_THROWS_WITH(stepper.advance(), Catch::Contains("model output") && Catch::Contains("2 x 2"));
  // The wrong-shape output was written into the workspace, which begin() now refuses (its
  // buffers are checked once per run) until it is restored.
  CHECK_THROWS_WITH(stepper.begin(State::Constant(2, 3, 0.5)),
                    Catch::Contains("'ws'") && Catch::Contains("ws.e[0]"));
  ws.e[0] = State::Zero(2, 3);
  stepper.begin(State::Constant(2, 3, 0.5));
  while (!stepper.done()) {
    stepper.model_output().setConstant(0.1);
    stepper.advance();
  }
  CHECK_THROWS_WITH(stepper.model_output(), Catch::Contains("every step is done"));
  CHECK_THROWS_WITH(stepper.advance(), Catch::Contains("every step is done"));
  State out;
  stepper.result(out);
  CHECK(out.allFinite());
}

TEST_CASE("gradient(): progress after every advance and reversal, and cancellation",
          "[stepper][gradient][progress]") {
  const VPLinearSchedule schedule;
  const int n = 20;
  const std::vector<Node> nodes =
      make_nodes(schedule, make_grid(schedule, GridKind::uniform_lambda, n));
  const Backend64 backend;
  auto model = testing::gaussian_problem<double>(4);
  const State x_T = testing::test_batch<double>(2, 4);
  const State w = testing::test_batch<double>(2, 4) * 0.3;
  GradientOptions options;
  options.memory = MemoryMode::checkpoint(3);
  const auto plain = gradient(Ddim(), backend, schedule, std::span<const Node>(nodes), model, x_T, w,
                              options);

  std::vector<GradientProgress> reports;
  options.progress = [&](const GradientProgress& p) {
    reports.push_back(p);
    return ObserverAction::proceed;
  };
  auto ws = make_gradient_workspace(Ddim(), backend, std::span<const Node>(nodes), model, x_T,
                                    options);
  const auto& r = gradient(Ddim(), backend, schedule, std::span<const Node>(nodes), model, x_T, w,
                           options, ws);
  CHECK_FALSE(r.cancelled);
  CHECK(r.grad_x == plain.grad_x); // reporting changes nothing
  // One report per advance (output step included) and per reversal, monotone, ending complete.
  REQUIRE(static_cast<std::int64_t>(reports.size()) == r.cost.forward_steps + n);
  for (std::size_t k = 1; k < reports.size(); ++k) {
    CHECK(reports[k].forward_steps >= reports[k - 1].forward_steps);
    CHECK(reports[k].steps_reversed >= reports[k - 1].steps_reversed);
    CHECK(reports[k].forward_steps + reports[k].steps_reversed ==
          reports[k - 1].forward_steps + reports[k - 1].steps_reversed + 1);
  }
  CHECK(reports.back().steps_reversed == n);
  CHECK(reports.back().forward_steps == reports.back().forward_steps_total);
  CHECK(reports.back().forward_steps_total == r.cost.forward_steps);
  CHECK(reports.back().num_steps == n);

  // Cancel after the fifth reversal: no further work, the result says so.
  int calls = 0;
  options.progress = [&](const GradientProgress& p) {
    ++calls;
    return p.steps_reversed == 5 ? ObserverAction::stop : ObserverAction::proceed;
  };
  const auto& cancelled = gradient(Ddim(), backend, schedule, std::span<const Node>(nodes), model,
                                   x_T, w, options, ws);
  CHECK(cancelled.cancelled);
  CHECK(cancelled.cost.vjps == 5);
  const int calls_at_stop = calls;
  // The workspace is reusable after a cancellation.
  options.progress = {};
  const auto& again = gradient(Ddim(), backend, schedule, std::span<const Node>(nodes), model, x_T,
                               w, options, ws);
  CHECK_FALSE(again.cancelled);
  CHECK(again.grad_x == plain.grad_x);
  CHECK(calls == calls_at_stop);
}
