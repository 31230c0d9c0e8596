#pragma once
// FlowGrad (Liu et al., CVPR 2023; docs/flowgrad.md): steer the output of a generative ODE by
// optimising per-step controls u_k of its N-step sampler,
//   min_u  J = L(x_N) + lambda sum_k |u_k|^2,
// with gradients from a VJP-decomposed reverse pass that merges straight parts of the
// trajectory into single steps (one VJP per segment instead of one per step).
//
//   auto ws = diffgrad::make_flowgrad_workspace(backend, N, x0);
//   auto u  = diffgrad::make_controls(backend, N, batch, dim);             // zeros
//   const auto& r = diffgrad::flowgrad_gradient_flow(diffgrad::FlowEuler(), backend, times,
//                                                    model, x0, u, loss, {.xi = 5e-3}, ws);
//   r.objective, r.grad_controls[k] (dJ/du_k), r.segment_starts, r.cost.vjps
//   const diffgrad::Adam adam({.learning_rate = 0.1});
//   auto opt = diffgrad::flowgrad_optimize_flow(diffgrad::FlowEuler(), backend, times, model,
//                                               x0, u, loss, adam, {.xi = 5e-3},
//                                               {.iterations = 20});
//
// Schemes: any one-stage, history-free, deterministic step-plan scheme, i.e. steps of the
// form x_{k+1} = a_k x_k + b_k f(x_k) (flow/controls.hpp): FlowEuler on a velocity field
// (the paper's setting), and Ddim(eta = 0) on an eps model, which is Euler in the flow
// variable y = x/alpha against rho = sigma/alpha (y_{k+1} = y_k + (rho_{k+1} - rho_k) eps), so
// FlowGrad applies to diffusion ODE samplers unchanged (flowgrad_gradient / flowgrad_optimize).
//
// The gradient (FlowGradOptions):
// 1. Forward: run the N controlled steps, store the states x_k (pre-kick) and measure the
//    straightness S_k of the model outputs on the fly (flow/straightness.hpp).
// 2. Segment with threshold xi (eq. 12); xi = 0 gives N one-step segments.
// 3. Reverse, segment by segment from the data end. A segment [a, b) is replaced by its
//    linearisation: the steps composed with the model output frozen at the segment start,
//      x_b = P_a x~_a + C_a f(x~_a) + (controls),
//      P_k = a_k ... a_{b-1},  C_k = sum_{i=k}^{b-1} P_{i+1} b_i      (P_b = 1, C_b = 0)
//    (for Euler: one big Euler step x_b = x_a + (t_b - t_a) v(x_a), the paper's eq. 13).
//    One VJP per segment, w = J_f(x~_a)^T g_b, and g_a = P_a g_b + C_a w (g = dJ/dx).
// 4. Re-assignment (SegmentGradient), plus the exact penalty gradient 2 lambda u_k:
//                      velocity control dJ/du_k           kick dJ/du_k
//      frozen_jacobian b_k (P_{k+1} g_b + C_{k+1} w)      P_k g_b + C_k w
//      frozen_velocity b_k P_{k+1} g_b  (Euler dt_k g_b)  g_a at k = a, P_k g_b after
//      segment         C_a g_b for all k (paper 3.3)      g_a for all k (authors' code)
//    frozen_jacobian (default) holds the start Jacobian over the segment: first order in the
//    segment, exact for a constant nilpotent Jacobian, and the most accurate of the three
//    per-step rules measured (docs/flowgrad.md). With one-step segments every rule IS exact
//    backprop through the N steps (checked against gradients/gradient.hpp).
// Cost per gradient: N model evaluations, one VJP per segment, one loss evaluation.
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/flow/controls.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/flow/straightness.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad {

/// How a segment's gradient is handed to the steps it covers (re-assignment).
enum class SegmentGradient {
  frozen_jacobian, ///< per step, the model's Jacobian at the segment start held over it
  frozen_velocity, ///< per step, the model output frozen (paper eq. 13's big Euler step)
  segment,         ///< every step the gradient of the segment's single control (paper 3.3)
};

struct FlowGradOptions {
  ControlMode control = ControlMode::velocity; ///< paper; ControlMode::kick = authors' code
  double lambda = 0.0; ///< penalty weight, >= 0 (paper: 1e-3; authors' code: no penalty)
  double xi = 0.0;     ///< straightness threshold, >= 0; 0 = exact backprop (paper: 5e-3)
  SegmentGradient reassign = SegmentGradient::frozen_jacobian;
  BatchStraightness batch_straightness = BatchStraightness::max_over_samples;
  bool check_finite = true; ///< check model outputs, VJPs and the loss gradient for NaN/Inf
};

/// What one call cost (optimisation totals sum these).
struct FlowGradCost {
  std::int64_t model_evals = 0; ///< velocity (or eps) evaluations: N per forward pass
  std::int64_t vjps = 0;        ///< model VJPs: one per segment
  std::int64_t loss_evals = 0;  ///< loss evaluations (value and gradient)
};

template <Backend B> struct FlowGradResult {
  using state_type = typename B::state_type;
  state_type x_end;                      ///< the controlled sample x_N
  double loss = 0.0;                     ///< L(x_N)
  double penalty = 0.0;                  ///< lambda sum_k |u_k|^2
  double objective = 0.0;                ///< J = loss + penalty
  std::vector<state_type> grad_controls; ///< dJ/du_k, one state per step
  state_type grad_x_start;               ///< dJ/dx_0 (same linearisation)
  std::vector<double> straightness;      ///< S_k (batch-reduced), one per step
  std::vector<int> segment_starts;       ///< first step of each segment, then N
  FlowGradCost cost;                     ///< of this call
  int segments() const { return static_cast<int>(segment_starts.size()) - 1; }
};

/// Buffers of one FlowGrad problem (N steps, states of one shape), sized once: gradient and
/// objective calls with it allocate nothing.
template <Backend B> class FlowGradWorkspace {
public:
  using state_type = typename B::state_type;

  FlowGradWorkspace(const B& backend, int num_steps, std::int64_t batch, std::int64_t dim)
      : tracker(backend, checked(num_steps, batch, dim), dim), num_steps_(num_steps), batch_(batch),
        dim_(dim) {
    const auto make = [&] { return backend.make_state(batch, dim); };
    const auto n = static_cast<std::size_t>(num_steps);
    x.reserve(n + 1);
    for (std::size_t k = 0; k <= n; ++k) x.push_back(make());
    e[0] = make();
    e[1] = make();
    kicked = make();
    adjoint = make();
    vjp_out = make();
    steps.resize(n);
    gain.resize(n + 1);
    tail.resize(n + 1);
    result.x_end = make();
    result.grad_x_start = make();
    result.grad_controls.reserve(n);
    for (std::size_t k = 0; k < n; ++k) result.grad_controls.push_back(make());
    result.straightness.assign(n, 0.0);
    result.segment_starts.reserve(n + 1);
  }

  int num_steps() const { return num_steps_; }
  std::int64_t batch() const { return batch_; }
  std::int64_t dim() const { return dim_; }

  std::vector<state_type> x;     ///< trajectory x_0..x_N (before the kicks)
  state_type e[2];               ///< model outputs of the last two steps
  state_type kicked;             ///< x_k + u_k (kick mode)
  state_type adjoint;            ///< dJ/dx_k during the reverse pass
  state_type vjp_out;            ///< J_f^T g
  std::vector<AffineStep> steps; ///< a_k, b_k, node_k
  std::vector<double> gain;      ///< P_k of the current segment
  std::vector<double> tail;      ///< C_k of the current segment
  detail::StraightnessTracker<B> tracker;
  FlowGradResult<B> result;

private:
  static std::int64_t checked(int num_steps, std::int64_t batch, std::int64_t dim) {
    detail::require(num_steps >= 1, "FlowGradWorkspace", "num_steps", "at least 1 step", num_steps);
    detail::require(batch >= 1 && dim >= 1, "FlowGradWorkspace", "batch/dim", "a non-empty state",
                    static_cast<double>(batch * dim));
    return batch;
  }
  int num_steps_;
  std::int64_t batch_, dim_;
};

template <Backend B>
FlowGradWorkspace<B> make_flowgrad_workspace(const B& backend, int num_steps,
                                             const typename B::state_type& x_start) {
  return FlowGradWorkspace<B>(backend, num_steps, B::batch(x_start), B::dim(x_start));
}

namespace detail {

inline void validate_flowgrad_options(const FlowGradOptions& o, const char* where) {
  require(o.xi >= 0.0, where, "options.xi", "a straightness threshold xi >= 0 (0 = exact backprop)",
          o.xi);
  require(o.lambda >= 0.0 && std::isfinite(o.lambda), where, "options.lambda",
          "a finite penalty weight lambda >= 0", o.lambda);
}

template <Backend B>
void validate_flowgrad_call(const FlowGradWorkspace<B>& ws, std::span<const Node> nodes,
                            const typename B::state_type& x_start,
                            std::span<const typename B::state_type> controls,
                            const FlowGradOptions& options, const char* where) {
  validate_flowgrad_options(options, where);
  const int n = static_cast<int>(nodes.size()) - 1;
  if (ws.num_steps() != n)
    throw_argument(where, "ws", concat("a workspace for ", n, " steps (the grid's)"),
                   concat(ws.num_steps(), " steps"));
  if (B::batch(x_start) != ws.batch() || B::dim(x_start) != ws.dim())
    throw_argument(
        where, "x_start",
        concat("shape ", ws.batch(), " x ", ws.dim(), " (batch x dim, as the workspace)"),
        concat(B::batch(x_start), " x ", B::dim(x_start)));
  validate_controls<B>(controls, n, x_start, where);
}

// The controlled forward pass: states, straightness, loss value and dL/dx_N (into ws.adjoint).
template <class Scheme, Backend B, class Field, class Loss>
void flowgrad_forward(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                      Field& field, const typename B::state_type& x_start,
                      std::span<const typename B::state_type> controls, Loss& loss,
                      const FlowGradOptions& options, FlowGradWorkspace<B>& ws, const char* where) {
  static_assert(LossFunction<Loss, B>,
                "diffgrad::flowgrad: the loss must be callable as double loss(const Backend&, "
                "const State& x_N, State& grad)");
  if (nodes.size() < 2) throw_argument(where, "nodes", "at least 2 nodes (one step)", nodes.size());
  validate_flowgrad_call(ws, nodes, x_start, controls, options, where);
  affine_steps(scheme, nodes, ws.steps, where);
  FlowGradResult<B>& r = ws.result;
  r.cost = {};
  const int n = ws.num_steps();
  const bool kick = options.control == ControlMode::kick;
  backend.copy(ws.x[0], x_start);
  ws.tracker.begin(options.batch_straightness, r.straightness);
  for (int k = 0; k < n; ++k) {
    const auto i = static_cast<std::size_t>(k);
    const AffineStep& s = ws.steps[i];
    auto& e = ws.e[i % 2];
    const auto& u = controls[i];
    if (kick) backend.lincomb(ws.kicked, term(1.0, ws.x[i]), term(1.0, u));
    const auto& in = kick ? ws.kicked : ws.x[i];
    field(in, s.node, e);
    ++r.cost.model_evals;
    check_model_output(backend, in, e, options.check_finite, k, s.node);
    ws.tracker.push(backend, k, ws.e[(i + 1) % 2], e);
    if (kick)
      backend.lincomb(ws.x[i + 1], term(s.a, ws.kicked), term(s.b, e));
    else
      backend.lincomb(ws.x[i + 1], term(s.a, ws.x[i]), term(s.b, e), term(s.b, u));
  }
  ws.tracker.end();
  backend.copy(r.x_end, ws.x[static_cast<std::size_t>(n)]);
  r.loss = static_cast<double>(loss(backend, r.x_end, ws.adjoint));
  ++r.cost.loss_evals;
  require_same_shape<B>(ws.adjoint, r.x_end, where, "loss gradient (dL/dx_N)");
  if (options.check_finite && !backend.all_finite(ws.adjoint))
    throw numerical_error(concat(where, ": the loss gradient dL/dx_N is not finite"));
  r.penalty = control_penalty(backend, controls, options.lambda);
  r.objective = r.loss + r.penalty;
  segment_straight_steps(r.straightness, options.xi, r.segment_starts);
}

// grad = c_g g + c_w w + 2 lambda u (zero terms skipped: one fused pass of 1..3 terms).
template <Backend B>
void write_control_gradient(const B& backend, typename B::state_type& grad, double c_g,
                            const typename B::state_type& g, double c_w,
                            const typename B::state_type& w, const typename B::state_type& u,
                            double lambda) {
  using State = typename B::state_type;
  std::array<LinTerm<State>, 3> t{};
  std::size_t n = 0;
  if (c_g != 0.0) t[n++] = LinTerm<State>{c_g, &g};
  if (c_w != 0.0) t[n++] = LinTerm<State>{c_w, &w};
  if (lambda != 0.0) t[n++] = LinTerm<State>{2.0 * lambda, &u};
  if (n == 0) {
    backend.lincomb(grad, term(0.0, g));
    return;
  }
  backend.lincomb(grad, std::span<const LinTerm<State>>(t.data(), n));
}

// The segment-by-segment reverse pass (see the header comment, steps 3-4).
template <Backend B, class Vjp>
void flowgrad_reverse(const B& backend, Vjp& vjp, std::span<const typename B::state_type> controls,
                      const FlowGradOptions& options, FlowGradWorkspace<B>& ws) {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  FlowGradResult<B>& r = ws.result;
  const bool kick = options.control == ControlMode::kick;
  const SegmentGradient rule = options.reassign;
  const double lambda = options.lambda;
  State& g = ws.adjoint;       // dJ/dx_b on entry to a segment, dJ/dx_a on exit
  const State& w = ws.vjp_out; // J_f(x~_a)^T g_b
  for (int j = r.segments() - 1; j >= 0; --j) {
    const auto a = static_cast<std::size_t>(r.segment_starts[static_cast<std::size_t>(j)]);
    const auto b = static_cast<std::size_t>(r.segment_starts[static_cast<std::size_t>(j) + 1]);
    // Gains P_k = a_k ... a_{b-1} and tails C_k = sum_{i=k}^{b-1} P_{i+1} b_i (P_b = 1, C_b = 0).
    ws.gain[b] = 1.0;
    ws.tail[b] = 0.0;
    for (std::size_t k = b; k-- > a;) {
      ws.gain[k] = ws.steps[k].a * ws.gain[k + 1];
      ws.tail[k] = ws.tail[k + 1] + ws.gain[k + 1] * ws.steps[k].b;
    }
    // One VJP at the state the model saw at the segment start.
    if (kick) backend.lincomb(ws.kicked, term(1.0, ws.x[a]), term(1.0, controls[a]));
    const State& at = kick ? ws.kicked : ws.x[a];
    vjp(at, ws.steps[a].node, static_cast<const State&>(g), ws.vjp_out,
        static_cast<Vector*>(nullptr), static_cast<Vector*>(nullptr));
    ++r.cost.vjps;
    require_same_shape<B>(ws.vjp_out, at, "flowgrad", "model VJP output");
    if (options.check_finite && !backend.all_finite(ws.vjp_out))
      throw numerical_error(concat("flowgrad: model VJP: expected finite values, got NaN or Inf "
                                   "at step ",
                                   a, " (t = ", ws.steps[a].node.t, ")"));
    // Control gradients from g_b and w (the header comment's table), then g_a.
    for (std::size_t k = a; k < b; ++k) {
      double c_g = 0.0, c_w = 0.0;
      const double bk = ws.steps[k].b;
      switch (rule) {
      case SegmentGradient::frozen_jacobian:
        c_g = kick ? ws.gain[k] : bk * ws.gain[k + 1];
        c_w = kick ? ws.tail[k] : bk * ws.tail[k + 1];
        break;
      case SegmentGradient::frozen_velocity:
        c_g = kick ? ws.gain[k] : bk * ws.gain[k + 1];
        c_w = kick && k == a ? ws.tail[a] : 0.0;
        break;
      case SegmentGradient::segment:
        c_g = kick ? ws.gain[a] : ws.tail[a];
        c_w = kick ? ws.tail[a] : 0.0;
        break;
      }
      write_control_gradient(backend, r.grad_controls[k], c_g, g, c_w, w, controls[k], lambda);
    }
    backend.lincomb(g, term(ws.gain[a], g), term(ws.tail[a], w));
  }
  backend.copy(r.grad_x_start, g);
}

template <class O, class State>
concept StepOptimizer = std::copy_constructible<O> && requires(O& o, State& x, const State& g) {
  o.step(x, g);
};

} // namespace detail

// ---- gradient ------------------------------------------------------------------------

/// FlowGrad gradient with explicit model adapters (`field(u, node, out)` as EpsField /
/// VelocityField, `vjp(u, node, cotangent, dx, dcond, dparams)` as EpsVjp / VelocityVjp).
/// Writes ws.result and returns it.
template <class Scheme, Backend B, class Field, class Vjp, class Loss>
const FlowGradResult<B>&
flowgrad_gradient_with(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                       Field&& field, Vjp&& vjp, const typename B::state_type& x_start,
                       std::span<const typename B::state_type> controls, Loss&& loss,
                       const FlowGradOptions& options, FlowGradWorkspace<B>& ws) {
  detail::flowgrad_forward(scheme, backend, nodes, field, x_start, controls, loss, options, ws,
                           "flowgrad_gradient");
  detail::flowgrad_reverse(backend, vjp, controls, options, ws);
  return ws.result;
}

/// The objective alone (forward pass: x_end, loss, penalty, objective, straightness and the
/// segments it would use); grad_controls / grad_x_start are left untouched.
template <class Scheme, Backend B, class Field, class Loss>
const FlowGradResult<B>&
flowgrad_objective_with(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                        Field&& field, const typename B::state_type& x_start,
                        std::span<const typename B::state_type> controls, Loss&& loss,
                        const FlowGradOptions& options, FlowGradWorkspace<B>& ws) {
  detail::flowgrad_forward(scheme, backend, nodes, field, x_start, controls, loss, options, ws,
                           "flowgrad_objective");
  return ws.result;
}

/// Flow models (velocity(x, t, out), velocity_vjp): flow times 0 = noise -> 1 = data, as
/// sample_flow. The model is read as a velocity field even when it also provides eps.
template <class Scheme, Backend B, class Model, class Loss>
const FlowGradResult<B>&
flowgrad_gradient_flow(const Scheme& scheme, const B& backend, std::span<const double> times,
                       Model& model, const typename B::state_type& x_start,
                       std::span<const typename B::state_type> controls, Loss&& loss,
                       const FlowGradOptions& options, FlowGradWorkspace<B>& ws) {
  static_assert(DifferentiableVelocityModel<Model, typename B::state_type, typename B::vector_type>,
                "diffgrad::flowgrad_gradient_flow: the model must provide velocity(x, t, out), "
                "velocity_vjp(x, t, a, dx, dcond*, dparams*), cond_size() and param_size()");
  const std::vector<Node> nodes = flow_nodes(times);
  return flowgrad_gradient_with(scheme, backend, std::span<const Node>(nodes),
                                VelocityField<Model>{model}, VelocityVjp<Model>{model}, x_start,
                                controls, std::forward<Loss>(loss), options, ws);
}

/// Any differentiable model on explicit nodes (noise models first, as gradient()): DDIM on an
/// eps model is FlowGrad on the diffusion ODE.
template <class Scheme, Backend B, class Model, class Loss>
const FlowGradResult<B>&
flowgrad_gradient(const Scheme& scheme, const B& backend, std::span<const Node> nodes, Model& model,
                  const typename B::state_type& x_start,
                  std::span<const typename B::state_type> controls, Loss&& loss,
                  const FlowGradOptions& options, FlowGradWorkspace<B>& ws) {
  auto [field, vjp] = detail::model_adapters<Model, B>(model);
  return flowgrad_gradient_with(scheme, backend, nodes, field, vjp, x_start, controls,
                                std::forward<Loss>(loss), options, ws);
}

// ---- optimisation loop -----------------------------------------------------------------

struct FlowGradOptimizeOptions {
  int iterations = 10; ///< optimiser updates M (paper: 10); the objective is evaluated M + 1 times
};

template <Backend B> struct FlowGradOptimizeResult {
  using state_type = typename B::state_type;
  std::vector<state_type> best_controls; ///< the controls with the lowest objective seen
  double best_objective = 0.0;
  int best_iteration = 0;                ///< index into objective_history
  std::vector<double> objective_history; ///< J before update 0, ..., after update M - 1 (M + 1)
  std::vector<double> loss_history;      ///< L(x_N) at the same points
  std::vector<int> segment_history;      ///< segments (VJPs) of each gradient (M)
  state_type best_x_end;                 ///< the sample under best_controls
  FlowGradCost cost;                     ///< totals
};

/// Runs M optimiser updates u_k <- step(u_k, dJ/du_k) from the given controls (updated in
/// place: on return they hold the last iterate) and returns the best controls seen with the
/// objective history. `optimizer` is a prototype (GradientDescent, Adam, or anything with
/// step(State&, const State&)); every step gets its own copy, which for elementwise
/// optimisers equals one optimiser over all controls.
template <class Scheme, Backend B, class Field, class Vjp, class Loss, class Optimizer>
FlowGradOptimizeResult<B>
flowgrad_optimize_with(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                       Field&& field, Vjp&& vjp, const typename B::state_type& x_start,
                       std::vector<typename B::state_type>& controls, Loss&& loss,
                       const Optimizer& optimizer, const FlowGradOptions& options = {},
                       const FlowGradOptimizeOptions& optimize = {}) {
  using State = typename B::state_type;
  static_assert(detail::StepOptimizer<Optimizer, State>,
                "diffgrad::flowgrad_optimize: the optimizer must be copyable and provide "
                "step(State& x, const State& grad) (GradientDescent, Adam)");
  detail::require(optimize.iterations >= 0, "flowgrad_optimize", "optimize.iterations",
                  "a number of optimiser updates >= 0", optimize.iterations);
  detail::validate_flowgrad_options(options, "flowgrad_optimize");
  detail::require(nodes.size() >= 2, "flowgrad_optimize", "nodes", "at least 2 nodes (one step)",
                  static_cast<double>(nodes.size()));
  const int n = static_cast<int>(nodes.size()) - 1;
  validate_controls<B>(std::span<const State>(controls), n, x_start, "flowgrad_optimize");
  auto ws = make_flowgrad_workspace(backend, n, x_start);
  FlowGradOptimizeResult<B> out;
  out.best_controls = controls;
  out.best_x_end = backend.make_state(B::batch(x_start), B::dim(x_start));
  out.objective_history.reserve(static_cast<std::size_t>(optimize.iterations) + 1);
  out.loss_history.reserve(static_cast<std::size_t>(optimize.iterations) + 1);
  out.segment_history.reserve(static_cast<std::size_t>(optimize.iterations));
  std::vector<Optimizer> per_step(static_cast<std::size_t>(n), optimizer);
  const auto record = [&](const FlowGradResult<B>& r) {
    out.cost.model_evals += r.cost.model_evals;
    out.cost.vjps += r.cost.vjps;
    out.cost.loss_evals += r.cost.loss_evals;
    out.objective_history.push_back(r.objective);
    out.loss_history.push_back(r.loss);
    const int it = static_cast<int>(out.objective_history.size()) - 1;
    if (it == 0 || r.objective < out.best_objective) {
      out.best_objective = r.objective;
      out.best_iteration = it;
      for (std::size_t k = 0; k < controls.size(); ++k)
        backend.copy(out.best_controls[k], controls[k]);
      backend.copy(out.best_x_end, r.x_end);
    }
  };
  const std::span<const State> u(controls);
  for (int it = 0; it < optimize.iterations; ++it) {
    const auto& r =
        flowgrad_gradient_with(scheme, backend, nodes, field, vjp, x_start, u, loss, options, ws);
    record(r);
    out.segment_history.push_back(r.segments());
    for (std::size_t k = 0; k < controls.size(); ++k)
      per_step[k].step(controls[k], r.grad_controls[k]);
  }
  record(flowgrad_objective_with(scheme, backend, nodes, field, x_start, u, loss, options, ws));
  return out;
}

/// flowgrad_optimize_with for flow models (flow times, as flowgrad_gradient_flow).
template <class Scheme, Backend B, class Model, class Loss, class Optimizer>
FlowGradOptimizeResult<B>
flowgrad_optimize_flow(const Scheme& scheme, const B& backend, std::span<const double> times,
                       Model& model, const typename B::state_type& x_start,
                       std::vector<typename B::state_type>& controls, Loss&& loss,
                       const Optimizer& optimizer, const FlowGradOptions& options = {},
                       const FlowGradOptimizeOptions& optimize = {}) {
  static_assert(DifferentiableVelocityModel<Model, typename B::state_type, typename B::vector_type>,
                "diffgrad::flowgrad_optimize_flow: the model must provide velocity(x, t, out), "
                "velocity_vjp(x, t, a, dx, dcond*, dparams*), cond_size() and param_size()");
  const std::vector<Node> nodes = flow_nodes(times);
  return flowgrad_optimize_with(scheme, backend, std::span<const Node>(nodes),
                                VelocityField<Model>{model}, VelocityVjp<Model>{model}, x_start,
                                controls, std::forward<Loss>(loss), optimizer, options, optimize);
}

/// flowgrad_optimize_with for any differentiable model on explicit nodes (DDIM on eps models).
template <class Scheme, Backend B, class Model, class Loss, class Optimizer>
FlowGradOptimizeResult<B>
flowgrad_optimize(const Scheme& scheme, const B& backend, std::span<const Node> nodes, Model& model,
                  const typename B::state_type& x_start,
                  std::vector<typename B::state_type>& controls, Loss&& loss,
                  const Optimizer& optimizer, const FlowGradOptions& options = {},
                  const FlowGradOptimizeOptions& optimize = {}) {
  auto [field, vjp] = detail::model_adapters<Model, B>(model);
  return flowgrad_optimize_with(scheme, backend, nodes, field, vjp, x_start, controls,
                                std::forward<Loss>(loss), optimizer, options, optimize);
}

} // namespace diffgrad
