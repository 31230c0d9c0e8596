// Users who own the loop also need gradients: the reverse stepper
// (gradients/reverse_stepper.hpp). A loop written by the user, calling the model's eps and
// VJP directly, gives exactly the bits of gradient() (sample, loss, dL/dx_T, dL/dcond,
// dL/dtheta, dL/dxi, costs) for every scheme kind (DDIM, stochastic DDIM, DPM-Solver++ 2M and
// 3M, singlestep 3-stage, SDE-DPM-Solver++ with Philox noise and with given noise) and every
// memory mode (store_all, checkpoint(k), recompute, with and without keep_stages); keeping
// the stages changes the cost, never the bits; the caller may accumulate dcond/dparams in its
// own buffers; progress can cancel; misuse is refused with a message naming the request.
#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/reverse_stepper.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;
using Mlp = models::Mlp<double>;

namespace {

const VPLinearSchedule& vp_schedule() {
  static const VPLinearSchedule s;
  return s;
}

std::vector<Node> grid(int steps) {
  return make_nodes(vp_schedule(), uniform_t_grid(vp_schedule(), steps, 1.0, 1e-3));
}

Mlp mlp_problem() {
  models::MlpConfig config;
  config.dim = 3;
  config.cond_dim = 2;
  config.time_frequencies = 2;
  config.hidden = {8};
  config.activation = models::Activation::tanh;
  Mlp m(config, 5);
  Vector z(2);
  z << 0.3, -0.2;
  m.set_cond(z);
  return m;
}

bool same_bits(const State& a, const State& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}
bool same_bits(const Vector& a, const Vector& b) {
  return a.size() == b.size() && (a.array() == b.array()).all();
}

/// The user's loop: eps and VJP of the MLP called directly (model time from the node), the
/// loss L = 0.5 |x0 - target|^2 written by hand. With `own_buffers`, dcond/dparams are
/// accumulated in the caller's vectors instead of the stepper's.
struct UserLoop {
  Mlp& model;
  State target;
  bool own_buffers = false;
  Vector dcond, dparams;

  template <class Scheme>
  const GradientResult<Backend64>& run(ReverseStepper<Scheme, Backend64>& rs, const State& x_T) {
    rs.begin(x_T);
    dcond = Vector::Zero(model.cond_size());
    dparams = Vector::Zero(model.param_size());
    while (!rs.done()) {
      switch (rs.request()) {
      case AdjointRequest::model_eval:
        model.eps(rs.model_input(), rs.model_node().model_t, rs.model_output());
        break;
      case AdjointRequest::loss_gradient: {
        State& g = rs.sample_cotangent();
        g = rs.sample() - target;
        rs.set_loss(0.5 * g.squaredNorm());
        break;
      }
      case AdjointRequest::vjp: {
        Vector* dc = rs.vjp_grad_cond();
        Vector* dp = rs.vjp_grad_params();
        if (own_buffers) {
          dc = dc ? &dcond : nullptr;
          dp = dp ? &dparams : nullptr;
        }
        model.vjp(rs.vjp_input(), rs.vjp_node().model_t, rs.vjp_cotangent(), rs.vjp_output(), dc,
                  dp);
        break;
      }
      case AdjointRequest::done: break;
      }
      rs.advance();
    }
    return rs.result();
  }
};

/// The same loss for gradient().
struct HalfSquaredDistance {
  const State& target;
  double operator()(const Backend64&, const State& x0, State& grad) const {
    grad = x0 - target;
    return 0.5 * grad.squaredNorm();
  }
};

struct ModeCase {
  std::string name;
  MemoryMode memory;
  bool keep_stages;
};

std::vector<ModeCase> mode_cases() {
  return {{"store_all", MemoryMode::store_all(), false},
          {"store_all + keep_stages", MemoryMode::store_all(), true},
          {"checkpoint(3)", MemoryMode::checkpoint(3), false},
          {"checkpoint(3) + keep_stages", MemoryMode::checkpoint(3), true},
          {"checkpoint(5) + keep_stages", MemoryMode::checkpoint(5), true},
          {"recompute", MemoryMode::recompute(), false}};
}

void check_same(const GradientResult<Backend64>& a, const GradientResult<Backend64>& b) {
  CHECK(same_bits(a.x0, b.x0));
  CHECK(a.loss == b.loss);
  CHECK(same_bits(a.grad_x, b.grad_x));
  CHECK(same_bits(a.grad_cond, b.grad_cond));
  CHECK(same_bits(a.grad_params, b.grad_params));
  REQUIRE(a.grad_noise.size() == b.grad_noise.size());
  for (std::size_t i = 0; i < a.grad_noise.size(); ++i)
    CHECK(same_bits(a.grad_noise[i], b.grad_noise[i]));
}

/// gradient() vs the user's loop, for every memory mode; and every mode vs store_all.
template <class Scheme>
void check_scheme(const std::string& name, const Scheme& scheme, int steps,
                  const std::vector<State>* given_noise = nullptr) {
  Mlp model = mlp_problem();
  const std::vector<Node> nodes = grid(steps);
  const State x_T = diffgrad::testing::test_batch<double>(4, 3);
  const State target = 0.3 * x_T.reverse();
  const Backend64 backend;
  const NodeAtLambda nal(vp_schedule());
  std::vector<GradientResult<Backend64>> by_mode;
  for (const ModeCase& mc : mode_cases()) {
    INFO(name << ", N = " << steps << ", " << mc.name);
    GradientOptions options;
    options.memory = mc.memory;
    options.keep_stages = mc.keep_stages;
    options.wrt_cond = options.wrt_params = options.wrt_noise = true;
    options.seed = 17;
    options.row_offset = 3;
    auto ws =
        make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), model, x_T, options);
    if (given_noise) ws.given_noise = *given_noise;
    const GradientResult<Backend64> ref =
        gradient(scheme, backend, vp_schedule(), std::span<const Node>(nodes), model, x_T,
                 HalfSquaredDistance{target}, options, ws);
    ReverseStepper<Scheme, Backend64> rs(scheme, backend, nodes, nal, ws, options);
    UserLoop loop{model, target, false, Vector(), Vector()};
    const GradientResult<Backend64>& mine = loop.run(rs, x_T);
    check_same(mine, ref);
    CHECK(mine.cost.model_evals == ref.cost.model_evals);
    CHECK(mine.cost.vjps == ref.cost.vjps);
    CHECK(mine.cost.peak_stored_states == ref.cost.peak_stored_states);
    CHECK(mine.cost.peak_stored_states <= ws.snapshot_buffers());
    // dcond / dparams accumulated in the caller's own buffers: the same bits.
    loop.own_buffers = true;
    const GradientResult<Backend64>& own = loop.run(rs, x_T);
    CHECK(same_bits(loop.dcond, ref.grad_cond));
    CHECK(same_bits(loop.dparams, ref.grad_params));
    CHECK(same_bits(own.grad_x, ref.grad_x));
    by_mode.push_back(ref);
  }
  INFO(name << ", N = " << steps << ": every memory mode gives store_all's bits");
  for (const auto& r : by_mode) check_same(r, by_mode.front());
}

} // namespace

TEST_CASE("reverse stepper = gradient() bit for bit, every scheme kind and memory mode",
          "[reverse_stepper]") {
  for (int steps : {1, 2, 7, 12}) {
    check_scheme("DDIM", Ddim(), steps);
    check_scheme("DDIM eta = 0.7 (Philox noise)", Ddim(0.7), steps);
    check_scheme("DPM-Solver++ 2M", DpmSolverMultistep(2, SolverPrediction::data), steps);
    check_scheme("DPM-Solver++ 3M", DpmSolverMultistep(3, SolverPrediction::data), steps);
    check_scheme("DPM-Solver++ 3S (singlestep)", DpmSolverSinglestep(3, SolverPrediction::data),
                 steps);
    check_scheme("SDE-DPM-Solver++ 2 (Philox noise)", SdeDpmSolver(2, SolverPrediction::data),
                 steps);
  }
  std::vector<State> noise;
  for (int i = 0; i < 9; ++i)
    noise.push_back((diffgrad::testing::test_batch<double>(4, 3).array() * (1.0 + 0.3 * i)).sin());
  check_scheme("SDE-DPM-Solver++ 2 (given noise)", SdeDpmSolver(2, SolverPrediction::data), 9,
               &noise);
}

TEST_CASE("keep_stages: no stage recomputation under store_all; S (N - 1) stored vectors",
          "[reverse_stepper][memory]") {
  // A 3-stage singlestep scheme: every step evaluates 3 stages forward; store_all reverses
  // each from its own snapshot, so the reverse pass recomputes 2 stages per step unless the
  // stages are kept. Expected counts from the schedule: N advances (the output included).
  Mlp model = mlp_problem();
  const int n = 10;
  const std::vector<Node> nodes = grid(n);
  const State x_T = diffgrad::testing::test_batch<double>(2, 3);
  const DpmSolverSinglestep scheme(3, SolverPrediction::data);
  GradientOptions plain, kept;
  kept.keep_stages = true;
  const auto a = gradient(scheme, Backend64{}, vp_schedule(), std::span<const Node>(nodes), model,
                          x_T, x_T, plain);
  const auto b = gradient(scheme, Backend64{}, vp_schedule(), std::span<const Node>(nodes), model,
                          x_T, x_T, kept);
  CHECK(a.cost.model_evals == 3 * n + 2 * n);
  CHECK(b.cost.model_evals == 3 * n);
  CHECK(a.cost.vjps == 3 * n);
  CHECK(b.cost.vjps == 3 * n);
  CHECK(a.cost.peak_stored_states == n - 1);
  CHECK(b.cost.peak_stored_states == 3 * (n - 1));
  CHECK(same_bits(a.grad_x, b.grad_x));
  CHECK(same_bits(a.x0, b.x0));
  // Checkpointed: the reverse-only snapshots of each range's tail keep their stages; the
  // re-advanced ones do not. Fewer calls than without, more than store_all's 3N; same bits.
  GradientOptions plain5 = plain, kept5 = kept;
  plain5.memory = kept5.memory = MemoryMode::checkpoint(5);
  const auto p5 = gradient(scheme, Backend64{}, vp_schedule(), std::span<const Node>(nodes), model,
                           x_T, x_T, plain5);
  const auto k5 = gradient(scheme, Backend64{}, vp_schedule(), std::span<const Node>(nodes), model,
                           x_T, x_T, kept5);
  CHECK(p5.cost.model_evals == 3 * (revolve_advances(n, 5) + 1) + 2 * n);
  CHECK(k5.cost.model_evals < p5.cost.model_evals);
  CHECK(k5.cost.model_evals >= 3 * (revolve_advances(n, 5) + 1));
  CHECK(k5.cost.peak_stored_states > p5.cost.peak_stored_states);
  CHECK(same_bits(k5.grad_x, a.grad_x));
  CHECK(same_bits(p5.grad_x, a.grad_x));
  // Single-stage schemes ignore it.
  const auto c = gradient(DpmSolverMultistep(3, SolverPrediction::data), Backend64{}, vp_schedule(),
                          std::span<const Node>(nodes), model, x_T, x_T, kept);
  CHECK(c.cost.model_evals == n);
  CHECK(c.cost.peak_stored_states == n - 1);
}

TEST_CASE("reverse stepper: progress cancels; misuse is refused clearly", "[reverse_stepper]") {
  Mlp model = mlp_problem();
  const std::vector<Node> nodes = grid(4);
  const State x_T = diffgrad::testing::test_batch<double>(2, 3);
  const Backend64 backend;
  const DpmSolverMultistep scheme(2, SolverPrediction::data);
  GradientOptions options;
  auto ws =
      make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), model, x_T, options);
  ReverseStepper<DpmSolverMultistep, Backend64> rs(scheme, backend, nodes,
                                                   NodeAtLambda(vp_schedule()), ws, options);
  const auto message = [](auto&& f) {
    try {
      f();
    } catch (const std::logic_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(rs.done());
  CHECK_THAT(message([&] { (void)rs.model_input(); }), Catch::Contains("call begin(x_T) first"));
  CHECK_THAT(message([&] { rs.advance(); }), Catch::Contains("call begin(x_T) first"));
  rs.begin(x_T);
  REQUIRE(rs.request() == AdjointRequest::model_eval);
  CHECK(!rs.reversing());
  CHECK_THAT(message([&] { (void)rs.vjp_input(); }),
             Catch::Contains("vjp_input: only valid when request() == AdjointRequest::vjp") &&
                 Catch::Contains("asks for AdjointRequest::model_eval"));
  CHECK_THAT(message([&] { (void)rs.sample_cotangent(); }),
             Catch::Contains("AdjointRequest::loss_gradient"));
  CHECK_THAT(message([&] { rs.set_loss(1.0); }), Catch::Contains("set_loss"));
  // Drive it to the end; the first VJP comes after the loss gradient.
  bool saw_loss = false, vjp_after_loss = true;
  while (!rs.done()) {
    switch (rs.request()) {
    case AdjointRequest::model_eval:
      model.eps(rs.model_input(), rs.model_node().model_t, rs.model_output());
      break;
    case AdjointRequest::loss_gradient:
      saw_loss = true;
      CHECK_THAT(message([&] { (void)rs.model_output(); }),
                 Catch::Contains("asks for AdjointRequest::loss_gradient"));
      rs.sample_cotangent() = rs.sample();
      break;
    case AdjointRequest::vjp:
      vjp_after_loss = vjp_after_loss && saw_loss;
      CHECK(rs.reversing());
      model.vjp(rs.vjp_input(), rs.vjp_node().model_t, rs.vjp_cotangent(), rs.vjp_output(), nullptr,
                nullptr);
      break;
    case AdjointRequest::done: break;
    }
    rs.advance();
  }
  CHECK(saw_loss);
  CHECK(vjp_after_loss);
  CHECK(!rs.result().cancelled);
  CHECK_THAT(message([&] { rs.advance(); }), Catch::Contains("the gradient is complete"));
  CHECK_THAT(message([&] { (void)rs.vjp_output(); }), Catch::Contains("read result()"));

  // A non-finite model output is named at the advance() that consumes it.
  rs.begin(x_T);
  rs.model_output().setConstant(std::numeric_limits<double>::quiet_NaN());
  CHECK_THROWS_AS(rs.advance(), numerical_error);

  // Cancellation after the first reversed step: done, result cancelled.
  GradientOptions stop_options;
  stop_options.progress = [](const GradientProgress& p) {
    return p.steps_reversed >= 1 ? ObserverAction::stop : ObserverAction::proceed;
  };
  ReverseStepper<DpmSolverMultistep, Backend64> stopping(
      scheme, backend, nodes, NodeAtLambda(vp_schedule()), ws, stop_options);
  stopping.begin(x_T);
  int vjps = 0;
  while (!stopping.done()) {
    if (stopping.request() == AdjointRequest::model_eval)
      model.eps(stopping.model_input(), stopping.model_node().model_t, stopping.model_output());
    else if (stopping.request() == AdjointRequest::loss_gradient)
      stopping.sample_cotangent() = stopping.sample();
    else {
      ++vjps;
      model.vjp(stopping.vjp_input(), stopping.vjp_node().model_t, stopping.vjp_cotangent(),
                stopping.vjp_output(), nullptr, nullptr);
    }
    stopping.advance();
  }
  CHECK(stopping.result().cancelled);
  CHECK(vjps == 1);
  CHECK(stopping.progress().steps_reversed == 1);
}

TEST_CASE("reverse stepper: a workspace built for other options is refused",
          "[reverse_stepper][errors]") {
  Mlp model = mlp_problem();
  const std::vector<Node> nodes = grid(4);
  const State x_T = diffgrad::testing::test_batch<double>(2, 3);
  const Backend64 backend;
  const DpmSolverSinglestep scheme(3, SolverPrediction::data);
  GradientOptions built, asked;
  asked.keep_stages = true;
  auto ws =
      make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), model, x_T, built);
  ReverseStepper<DpmSolverSinglestep, Backend64> rs(scheme, backend, nodes,
                                                    NodeAtLambda(vp_schedule()), ws, asked);
  CHECK_THROWS_WITH(rs.begin(x_T), Catch::Contains("ReverseStepper: argument 'ws'") &&
                                       Catch::Contains("keep_stages"));
  const State wrong = diffgrad::testing::test_batch<double>(3, 3);
  ReverseStepper<DpmSolverSinglestep, Backend64> ok(scheme, backend, nodes,
                                                    NodeAtLambda(vp_schedule()), ws, built);
  CHECK_THROWS_WITH(ok.begin(wrong), Catch::Contains("argument 'x_T'"));
}
