#pragma once
// The sampling engine as a state machine, for users who own the loop: the stepper says which
// state and node the model must be evaluated at, the caller evaluates the model however it
// likes (a batched conditional/unconditional call, an asynchronous or remote model) and writes
// the output into the stepper's buffer, and advance() performs the scheme's next fused update.
//
//   Stepper stepper(scheme, backend, nodes, NodeAtLambda(schedule), ws, options);
//   stepper.begin(x_T);
//   while (!stepper.done()) {
//     my_model(stepper.model_input(), stepper.model_node(), stepper.model_output());
//     stepper.advance();              // true when a step i -> i+1 was completed
//   }
//   stepper.result(x);                // the sample
//
// run_scheme (solvers/sampler.hpp) IS this loop with the model call in its place, so a stepper
// gives exactly the bits of sample() for every scheme (multistage, multistep, SDE with Philox or
// given noise, structured coefficients): there is one engine, not two.
#include <array>
#include <cstdint>
#include <optional>
#include <span>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler_workspace.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

template <class Scheme, Backend B> class Stepper {
public:
  using State = typename B::state_type;
  using Plan = detail::plan_type_t<Scheme>;
  using Coeff = typename Plan::coeff_type;
  using Term = LinTerm<State, Coeff>;
  static_assert(BackendFor<B, Coeff>,
                "diffgrad: this backend has no fused lincomb for the scheme's coefficient kind "
                "(backend/coefficient.hpp)");

  /// The scheme, backend, nodes and workspace are referenced, not copied: they must outlive
  /// the stepper. `ws` must be built for this scheme (history, stages) and the state's shape.
  Stepper(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
          NodeAtLambda node_at_lambda, SamplerWorkspace<B>& ws, const SampleOptions& options = {},
          const char* where = "Stepper")
      : scheme_(scheme), backend_(backend), nodes_(nodes), nal_(node_at_lambda), ws_(ws),
        options_(options), where_(where) {}

  /// Starts at x_T (nodes[0]): validates the nodes, the workspace, x_T and the given noise
  /// (once, before any model call), copies x_T into the workspace and plans step 0.
  void begin(const State& x_T) {
    scheme_.validate(nodes_);
    num_steps_ = static_cast<int>(nodes_.size()) - 1;
    detail::validate_run_inputs(where_, scheme_, backend_, num_steps_, x_T, ws_, options_);
    backend_.copy(ws_.x[0], x_T);
    step_ = 0;
    stage_ = 0;
    model_evals_ = 0;
    if (num_steps_ > 0) plan_ = scheme_.plan(nodes_, 0, nal_);
    started_ = true;
  }

  bool done() const { return !started_ || step_ >= num_steps_; }
  int step() const { return step_; }       ///< the step being taken (i of i -> i+1)
  int stage() const { return stage_; }     ///< the stage whose model output is wanted next
  int num_steps() const { return num_steps_; }
  int model_evals() const { return model_evals_; }

  /// The state the model must be evaluated at next (x_i for stage 0, u_s after).
  const State& model_input() const {
    require_pending("model_input");
    return stage_ == 0 ? ws_.x[slot(step_)] : ws_.u[static_cast<std::size_t>(stage_ - 1)];
  }
  /// The node of that evaluation (its t, alpha, sigma, model time).
  const Node& model_node() const {
    require_pending("model_node");
    return plan_.stage_node[stage_];
  }
  /// Where the caller writes the model's output for model_input() (already of its shape).
  State& model_output() {
    require_pending("model_output");
    return stage_ == 0 ? ws_.e[slot(step_)] : ws_.ue[static_cast<std::size_t>(stage_ - 1)];
  }

  /// Consumes the model output: checks it (shape; finiteness unless options.check_finite is
  /// false), then forms the next stage's input, or, after the step's last stage, the state
  /// x_{i+1} (with the step's noise). Returns true when a step was completed.
  bool advance() {
    require_pending("advance");
    const State& in = model_input();
    detail::check_model_output(backend_, in, model_output(), options_.check_finite, step_,
                               plan_.stage_node[stage_]);
    ++model_evals_;
    if (++stage_ < plan_.num_stages) {
      State& next_in = ws_.u[static_cast<std::size_t>(stage_ - 1)];
      const int n = detail::gather_terms(plan_.stage_input[stage_], step_, ws_.ring(), ws_.x,
                                         ws_.e, ws_.u, ws_.ue, terms_);
      backend_.lincomb(next_in, std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)),
                       BasicNoiseTerm<Coeff>{});
      return false;
    }
    int n = 0;
    const auto noise = detail::gather_output_terms(plan_, step_, ws_.ring(), ws_, options_.seed,
                                                   options_.row_offset, terms_, n);
    backend_.lincomb(ws_.x[slot(step_ + 1)],
                     std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)), noise);
    ++step_;
    stage_ = 0;
    if (step_ < num_steps_) plan_ = scheme_.plan(nodes_, step_, nal_);
    return true;
  }

  /// The state at nodes[step()] (after advance() returned true: the step just completed).
  const State& state() const {
    require_started("state");
    return ws_.x[slot(step_)];
  }
  /// Copies the state at nodes[step()] (the sample once done()) into x.
  void result(State& x) const {
    require_started("result");
    backend_.copy(x, ws_.x[slot(step_)]);
  }

private:
  std::size_t slot(int step) const { return static_cast<std::size_t>(step % ws_.ring()); }
  void require_started(const char* fn) const {
    if (!started_)
      throw std::logic_error(detail::concat("diffgrad::Stepper::", fn, ": call begin(x_T) first"));
  }
  void require_pending(const char* fn) const {
    require_started(fn);
    if (step_ >= num_steps_)
      throw std::logic_error(
          detail::concat("diffgrad::Stepper::", fn, ": every step is done (", num_steps_,
                         " steps); read the sample with result()"));
  }

  const Scheme& scheme_;
  const B& backend_;
  std::span<const Node> nodes_;
  NodeAtLambda nal_;
  SamplerWorkspace<B>& ws_;
  SampleOptions options_;
  const char* where_;
  Plan plan_{};
  int num_steps_ = 0, step_ = 0, stage_ = 0, model_evals_ = 0;
  bool started_ = false;
  std::array<Term, kMaxLincombTerms> terms_{};
};

} // namespace diffgrad
