#pragma once
// Per-step controls u_k for FlowGrad (Liu et al., CVPR 2023), on any one-stage, history-free,
// deterministic step-plan scheme whose step is affine in the state and the model output:
//   x_{k+1} = a_k x_k + b_k f(x_k, node_k)      (FlowEuler: a = 1, b = t_{k+1} - t_k;
//                                               Ddim(0): a = alpha_t/alpha_s, b = -sigma_t(e^h-1))
// Two places to put the control, both offered:
//   ControlMode::velocity (the paper, eq. 7): the control is added to the model output,
//       x_{k+1} = a_k x_k + b_k (f(x_k) + u_k);
//     for Euler that is x_k + dt_k (v + u_k), for DDIM it is Euler in (x/alpha, rho = sigma/alpha)
//     with the control added to eps, the velocity dy/drho in that variable.
//   ControlMode::kick (the authors' released code): the state is kicked before the model call,
//       x~_k = x_k + u_k,  x_{k+1} = a_k x~_k + b_k f(x~_k).
// The penalty lambda sum_k |u_k|^2 (summed over the batch) is the same in both; note that a
// kick of size u moves the state as much as a velocity control of size u / dt, so the two
// conventions need different lambda and step sizes for the same effect.
//
// ControlledModel folds the controls into the model (as its parameter vector) so that the
// generic exact discrete adjoint (gradients/gradient.hpp) differentiates the controlled
// sampler: it is the independent reference the FlowGrad reverse pass is tested against.
#include <Eigen/Core>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

/// Where the control u_k enters step k (see the header comment).
enum class ControlMode {
  velocity, ///< x_{k+1} = a x_k + b (f(x_k) + u_k)          (paper, default)
  kick,     ///< x~ = x_k + u_k, x_{k+1} = a x~ + b f(x~)     (authors' code)
};

inline const char* control_mode_name(ControlMode m) {
  return m == ControlMode::velocity ? "velocity" : "kick";
}

/// The affine form x_{k+1} = a x_k + b f(x_k, node) of one step of a one-stage scheme.
struct AffineStep {
  double a = 1.0; ///< coefficient of the state
  double b = 0.0; ///< coefficient of the model output
  Node node{};    ///< where the model is evaluated (the step's start node)
};

namespace detail {

inline bool combo_only_x_e0(const Combo& c) {
  for (int s = 1; s < kMaxStages; ++s)
    if (c.u[s] != 0.0 || c.e[s] != 0.0) return false;
  for (int j = 0; j < kMaxHistory; ++j)
    if (c.hist_x[j] != 0.0 || c.hist_e[j] != 0.0) return false;
  return true;
}

} // namespace detail

/// Reads the affine step coefficients of every step of `scheme` on `nodes` into `out`
/// (resized to nodes.size() - 1; no allocation when it already has that size). Refuses
/// schemes that are not one-stage, history-free and deterministic: FlowGrad's per-step
/// controls and its segment linearisation are defined for those (FlowEuler, Ddim(eta = 0)).
template <class Scheme>
void affine_steps(const Scheme& scheme, std::span<const Node> nodes, std::vector<AffineStep>& out,
                  const char* where) {
  constexpr const char* kWhat =
      "a one-stage, history-free, deterministic scheme (FlowEuler, Ddim with eta = 0)";
  if (scheme.stages() != 1 || scheme.history() != 0 || scheme.stochastic())
    detail::throw_argument(where, "scheme", kWhat,
                           detail::concat(scheme.stages(), " stages, history ", scheme.history(),
                                          scheme.stochastic() ? ", stochastic" : ""));
  scheme.validate(nodes);
  const auto n = nodes.size() - 1;
  out.resize(n);
  // One-stage schemes never place intermediate stages: the map throws if one asks.
  const NodeAtLambda nal(detail::no_lambda_map());
  for (std::size_t k = 0; k < n; ++k) {
    const StepPlan p = scheme.plan(nodes, static_cast<int>(k), nal);
    if (p.num_stages != 1 || p.noise != 0.0 || !detail::combo_only_x_e0(p.output))
      detail::throw_argument(where, "scheme", kWhat,
                             detail::concat("a step plan at step ", k,
                                            " that uses more than x_k and one model output"));
    out[k] = AffineStep{p.output.x, p.output.e[0], p.stage_node[0]};
  }
}

/// Zero controls: num_steps states of shape batch x dim.
template <Backend B>
std::vector<typename B::state_type> make_controls(const B& backend, int num_steps,
                                                  std::int64_t batch, std::int64_t dim) {
  detail::require(num_steps >= 1, "make_controls", "num_steps", "at least 1 step", num_steps);
  std::vector<typename B::state_type> u;
  u.reserve(static_cast<std::size_t>(num_steps));
  for (int k = 0; k < num_steps; ++k) u.push_back(backend.make_state(batch, dim));
  return u;
}

/// Checks one control per step, each shaped like `like` (the state).
template <Backend B>
void validate_controls(std::span<const typename B::state_type> controls, int num_steps,
                       const typename B::state_type& like, const char* where) {
  if (static_cast<int>(controls.size()) != num_steps)
    detail::throw_argument(where, "controls",
                           detail::concat("one control per step (", num_steps, " states)"),
                           detail::concat(controls.size(), " states"));
  for (std::size_t k = 0; k < controls.size(); ++k)
    if (B::batch(controls[k]) != B::batch(like) || B::dim(controls[k]) != B::dim(like))
      detail::throw_argument(where, "controls",
                             detail::concat("states of shape ", B::batch(like), " x ", B::dim(like),
                                            " (batch x dim, like the initial state)"),
                             detail::concat("controls[", k, "] of shape ", B::batch(controls[k]),
                                            " x ", B::dim(controls[k])));
}

/// lambda * sum_k |u_k|^2 (summed over the batch, accumulated in double).
template <Backend B>
double control_penalty(const B& backend, std::span<const typename B::state_type> controls,
                       double lambda) {
  if (lambda == 0.0) return 0.0;
  double s = 0.0;
  for (const auto& u : controls) s += backend.dot(u, u);
  return lambda * s;
}

/// The model with the controls folded in, so that the scheme's plain step IS the controlled
/// step (for the exact reference gradient through gradients/gradient.hpp):
///   velocity: f'(x, node_k) = f(x, node_k) + u_k
///   kick:     f'(x, node_k) = f(x + u_k, node_k) + (a_k / b_k) u_k
///             (a x + b f' = a (x + u) + b f(x + u))
/// Its parameter vector is the controls, flattened step after step (row-major states), so
/// GradientOptions{.wrt_params = true} returns dL/du; the wrapped model's own conditioning
/// and parameters are not exposed (cond_size() = 0). The step is found from the node's time,
/// which must be one of the grid's step-start times. CPU (Eigen) states only; the model and
/// the controls are held by reference.
template <class Model, Backend B> class ControlledModel {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;

  template <class Scheme>
  ControlledModel(const Scheme& scheme, std::span<const Node> nodes, Model& model,
                  std::span<const state_type> controls, ControlMode mode)
      : model_(model), controls_(controls), mode_(mode) {
    affine_steps(scheme, nodes, steps_, "ControlledModel");
    detail::require(!controls.empty(), "ControlledModel", "controls", "at least one control", 0);
    validate_controls<B>(controls, static_cast<int>(steps_.size()), controls.front(),
                         "ControlledModel");
    if (mode == ControlMode::kick)
      for (std::size_t k = 0; k < steps_.size(); ++k)
        detail::require(
            steps_[k].b != 0.0, "ControlledModel", "scheme",
            "a nonzero model-output coefficient on every step (kick mode divides by it)",
            steps_[k].b);
  }

  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const {
    return static_cast<std::int64_t>(controls_.size()) * controls_.front().size();
  }

  void velocity(const state_type& x, double t,
                state_type& out) const requires VelocityModel<Model, state_type> {
    const std::size_t k = step_of(t);
    if (mode_ == ControlMode::velocity) {
      model_.velocity(x, t, out);
      out += controls_[k];
    } else {
      shifted_ = x + controls_[k];
      model_.velocity(shifted_, t, out);
      out += static_cast<typename state_type::Scalar>(steps_[k].a / steps_[k].b) * controls_[k];
    }
  }
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* /*dcond*/, vector_type* dparams) const requires
      DifferentiableVelocityModel<Model, state_type, vector_type> {
    const std::size_t k = step_of(t);
    const state_type& at = mode_ == ControlMode::velocity ? x : (shifted_ = x + controls_[k]);
    model_.velocity_vjp(at, t, a, dx, static_cast<vector_type*>(nullptr),
                        static_cast<vector_type*>(nullptr));
    add_param_grad(k, a, dx, dparams);
  }

  void eps(const state_type& x, const Node& n, state_type& out) const requires
      NoiseModel<Model, state_type> || NodeAwareNoiseModel<Model, state_type> {
    const std::size_t k = step_of(n.t);
    const EpsField<Model> field{model_};
    if (mode_ == ControlMode::velocity) {
      field(x, n, out);
      out += controls_[k];
    } else {
      shifted_ = x + controls_[k];
      field(static_cast<const state_type&>(shifted_), n, out);
      out += static_cast<typename state_type::Scalar>(steps_[k].a / steps_[k].b) * controls_[k];
    }
  }
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* /*dcond*/, vector_type* dparams) const requires
      DifferentiableNoiseModel<Model, state_type, vector_type> {
    const std::size_t k = step_of(n.t);
    const state_type& at = mode_ == ControlMode::velocity ? x : (shifted_ = x + controls_[k]);
    EpsVjp<Model>{model_}(at, n, a, dx, static_cast<vector_type*>(nullptr),
                          static_cast<vector_type*>(nullptr));
    add_param_grad(k, a, dx, dparams);
  }

private:
  std::size_t step_of(double t) const {
    // Steps are visited in order (forward) or in reverse (adjoint): try the neighbours first.
    for (std::size_t k : {hint_, hint_ + 1, hint_ - 1})
      if (k < steps_.size() && steps_[k].node.t == t) return hint_ = k;
    for (std::size_t k = 0; k < steps_.size(); ++k)
      if (steps_[k].node.t == t) return hint_ = k;
    detail::throw_argument("ControlledModel", "t",
                           "the start time of one of the grid's steps (the grid it was built for)",
                           t);
  }

  // d f'/d u_k^T a: a (velocity) or J(x + u)^T a + (a_k/b_k) a (kick; dx holds J^T a).
  void add_param_grad(std::size_t k, const state_type& a, const state_type& dx,
                      vector_type* dparams) const {
    if (dparams == nullptr) return;
    const auto size = controls_.front().size();
    auto slice = dparams->segment(static_cast<Eigen::Index>(k) * size, size);
    const auto flat_a = Eigen::Map<const vector_type>(a.data(), size);
    if (mode_ == ControlMode::velocity) {
      slice += flat_a;
    } else {
      using Scalar = typename state_type::Scalar;
      slice += Eigen::Map<const vector_type>(dx.data(), size) +
               static_cast<Scalar>(steps_[k].a / steps_[k].b) * flat_a;
    }
  }

  Model& model_;
  std::span<const state_type> controls_;
  ControlMode mode_;
  std::vector<AffineStep> steps_;
  mutable std::size_t hint_ = 0;
  mutable state_type shifted_;
};

} // namespace diffgrad
