#pragma once
// Exact discrete adjoint (discretize-then-optimize) of ANY scheme written as StepPlans
// (solvers/step_plan.hpp): the true gradient of the numbers the sampler produced, to rounding.
//
// Step i of the forward pass is
//   u_0 = x_i,  u_s = Combo_s(x_i, u_<s, e_<s, x_{i-1-j}, e_{i-1-j}),  e_s = f(u_s, node_s),
//   x_{i+1} = Combo_out(...) + noise_i xi_i.
// Its adjoint runs the same program backwards with the same coefficients (re-derived from
// scheme.plan(nodes, i), no tape): the cotangent of x_{i+1} is scattered through Combo_out
// onto x_i, u_s, e_s and the history; then, stage by stage from the last, the cotangent of
// e_s becomes one VJP at the state u_s the model saw, and u_s's cotangent is scattered
// through Combo_s. History references push cotangents onto earlier x_k and e_k; the
// cotangent of e_k is summed over all its uses and VJP'd once, when step k is reversed.
//
// Reversing step i needs only x_i (and, to recompute the stage states of multi-stage
// schemes, its history): no model output needs to be kept. States come from an offline
// binomial checkpoint schedule (gradients/checkpointing.hpp) whose snapshots hold the
// extended state (x_i plus the multistep history x_{i-1-j}, e_{i-1-j}).
//
// Cost, with S_i the stage count of step i and A_i how often step i is advanced:
//   model evaluations = sum_i S_i A_i + sum_i (S_i - 1),   VJPs = sum_i S_i,
// and for a fixed stage count S: S (t(N, s) + 1) + (S - 1) N evaluations and S N VJPs.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/checkpointing.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

/// Where the reverse pass gets the forward states from.
class MemoryMode {
public:
  enum class Kind {
    store_all,  ///< keep every state: N model evaluations, N stored (extended) states
    checkpoint, ///< optimal binomial checkpointing with s stored states (initial included)
    recompute,  ///< keep only x_T, re-run from it for every step: N (N - 1)/2 + 1 evaluations
  };
  static MemoryMode store_all() { return MemoryMode(Kind::store_all, 0); }
  static MemoryMode checkpoint(int snapshots) {
    detail::require(snapshots >= 1, "MemoryMode::checkpoint", "snapshots",
                    "at least 1 stored state (the initial state x_T counts as one)", snapshots);
    return MemoryMode(Kind::checkpoint, snapshots);
  }
  static MemoryMode recompute() { return MemoryMode(Kind::recompute, 1); }

  Kind kind() const { return kind_; }
  /// The snapshot budget for a run of num_steps steps (never more than num_steps).
  int snapshots_for(int num_steps) const {
    switch (kind_) {
    case Kind::store_all: return num_steps;
    case Kind::checkpoint: return std::min(snapshots_, num_steps);
    case Kind::recompute: return 1;
    }
    return num_steps;
  }

private:
  MemoryMode(Kind kind, int snapshots) : kind_(kind), snapshots_(snapshots) {}
  Kind kind_;
  int snapshots_;
};

/// Where a gradient computation stands: passed to GradientOptions::progress after every
/// forward advance and every reversed step.
struct GradientProgress {
  int num_steps = 0;                  ///< N
  int steps_reversed = 0;             ///< adjoint steps done so far (N when finished)
  std::int64_t forward_steps = 0;     ///< one-step advances so far (recomputations included)
  std::int64_t forward_steps_total = 0; ///< all advances the memory mode will make: t(N, s) + 1
};

struct GradientOptions {
  MemoryMode memory = MemoryMode::store_all();
  bool wrt_cond = false;   ///< accumulate dL/dcond (length model.cond_size())
  bool wrt_params = false; ///< accumulate dL/dtheta (length model.param_size())
  bool wrt_noise = false;  ///< keep dL/dxi_i for every step (zero for deterministic steps)
  std::uint64_t seed = 0;  ///< Philox seed of stochastic schemes, as in SampleOptions
  std::uint64_t row_offset = 0; ///< global index of x_T's first row, as in SampleOptions
  /// Check model outputs, VJPs (dx and, on host vectors, dcond/dparams) and dL/dx0 for NaN/Inf.
  bool check_finite = true;
  /// Progress report and cancellation of long (checkpointed) gradients: called after every
  /// forward advance and every reversed step (not per model call); returning
  /// ObserverAction::stop ends the computation there, with GradientResult::cancelled set (the
  /// result's gradients are then incomplete and must not be used). Empty: no reports.
  std::function<ObserverAction(const GradientProgress&)> progress{};
};

/// What a gradient cost, counted by the executor as it runs.
struct GradientCost {
  std::int64_t model_evals = 0;        ///< forward model calls, stage recomputations included
  std::int64_t vjps = 0;               ///< model VJP calls
  std::int64_t forward_steps = 0;      ///< one-step advances, the output step included: t(N, s) + 1
  int peak_checkpoints = 0;            ///< snapshots held at once (<= s)
  std::int64_t peak_stored_states = 0; ///< state vectors in those snapshots, history included
};

template <Backend B> struct GradientResult {
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;
  state_type x0;                      ///< the sample (the sampler's output x_N)
  double loss = 0.0;                  ///< L(x0); <cotangent, x0> when a cotangent was given
  state_type grad_x;                  ///< dL/dx_T
  vector_type grad_cond;              ///< dL/dcond (empty unless wrt_cond)
  vector_type grad_params;            ///< dL/dtheta (empty unless wrt_params)
  std::vector<state_type> grad_noise; ///< dL/dxi_i per step (empty unless wrt_noise)
  GradientCost cost;
  bool cancelled = false; ///< GradientOptions::progress stopped it: the gradients are incomplete
};

/// All buffers of one gradient computation, sized before the first model call, so the
/// forward and reverse loops never allocate. Reuse it across calls (optimisation loops).
template <Backend B> class GradientWorkspace {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;

  GradientWorkspace(const B& backend, int history, int stages, int num_steps, std::int64_t batch,
                    std::int64_t dim, std::int64_t cond_size, std::int64_t param_size,
                    const GradientOptions& options)
      : history_(history), stages_(stages), num_steps_(num_steps), batch_(batch), dim_(dim),
        wrt_cond_(options.wrt_cond), wrt_params_(options.wrt_params), wrt_noise_(options.wrt_noise),
        schedule(make_schedule(num_steps, options)) {
    detail::require(history >= 0 && history <= kMaxHistory, "GradientWorkspace", "history",
                    detail::concat("0..", kMaxHistory), history);
    detail::require(stages >= 1 && stages <= kMaxStages, "GradientWorkspace", "stages",
                    detail::concat("1..", kMaxStages), stages);
    detail::require(batch >= 1 && dim >= 1, "GradientWorkspace", "batch/dim", "a non-empty state",
                    static_cast<double>(batch * dim));
    const auto make = [&] { return backend.make_state(batch, dim); };
    const auto fill = [&](std::vector<state_type>& v, int n) {
      v.reserve(static_cast<std::size_t>(n));
      for (int k = 0; k < n; ++k) v.push_back(make());
    };
    fill(x, history + 1);
    fill(e, history + 1);
    fill(u, stages - 1);
    fill(ue, stages - 1);
    fill(x_bar, history + 2);
    fill(e_bar, history + 1);
    fill(u_bar, stages - 1);
    fill(ue_bar, stages - 1);
    vjp_out = make();
    const int slots = schedule.snapshots();
    fill(snap_x, slots * (history + 1));
    fill(snap_e, slots * history);
    snap_step.assign(static_cast<std::size_t>(slots), -1);
    snap_vectors.assign(static_cast<std::size_t>(slots), 0);
    result.x0 = make();
    result.grad_x = make();
    if (wrt_cond_) result.grad_cond = backend.make_vector(cond_size);
    if (wrt_params_) result.grad_params = backend.make_vector(param_size);
    if (wrt_noise_) fill(result.grad_noise, num_steps);
  }

  static CheckpointSchedule make_schedule(int num_steps, const GradientOptions& options) {
    detail::require(num_steps >= 1, "GradientWorkspace", "num_steps", "at least 1 step", num_steps);
    return CheckpointSchedule::revolve(num_steps, options.memory.snapshots_for(num_steps));
  }

  /// Builds a workspace for `scheme` on num_steps steps and states of x's shape.
  template <class Scheme>
  static GradientWorkspace for_scheme(const B& backend, const Scheme& scheme, int num_steps,
                                      const state_type& x, std::int64_t cond_size,
                                      std::int64_t param_size, const GradientOptions& options) {
    return GradientWorkspace(backend, scheme.history(), scheme.stages(), num_steps, B::batch(x),
                             B::dim(x), cond_size, param_size, options);
  }

  /// Noise of stochastic steps, as SamplerWorkspace::given_noise: empty means Philox noise
  /// keyed by (options.seed, step); otherwise one state per step. Not owned.
  std::span<const state_type> given_noise{};

  int history() const { return history_; }
  int stages() const { return stages_; }
  int num_steps() const { return num_steps_; }
  std::int64_t batch() const { return batch_; }
  std::int64_t dim() const { return dim_; }
  bool wrt_cond() const { return wrt_cond_; }
  bool wrt_params() const { return wrt_params_; }
  bool wrt_noise() const { return wrt_noise_; }

private:
  int history_, stages_, num_steps_;
  std::int64_t batch_, dim_;
  bool wrt_cond_, wrt_params_, wrt_noise_;

public:
  // Internal buffers of the executor (detail::AdjointPass); not part of the API.
  CheckpointSchedule schedule;
  std::vector<state_type> x, e, u, ue;    ///< working extended state: rings by step % (H + 1)
  std::vector<state_type> x_bar, e_bar;   ///< cotangent rings: step % (H + 2), step % (H + 1)
  std::vector<state_type> u_bar, ue_bar;  ///< stage cotangents (stage s at index s - 1)
  state_type vjp_out;                     ///< one VJP result before it is accumulated
  std::vector<state_type> snap_x, snap_e; ///< slot k: x at [k (H + 1) ...], e at [k H ...]
  std::vector<int> snap_step, snap_vectors;
  GradientResult<B> result;
};

namespace detail {

/// Executes a checkpoint schedule: the forward advances and the per-step adjoint.
template <class Scheme, Backend B, class Field, class VjpField> class AdjointPass {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  using Plan = plan_type_t<Scheme>;
  using Coeff = typename Plan::coeff_type;
  using Term = LinTerm<State, Coeff>;
  static_assert(BackendFor<B, Coeff>,
                "diffgrad: this backend has no fused lincomb for the scheme's coefficient kind "
                "(backend/coefficient.hpp)");

  AdjointPass(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
              NodeAtLambda node_at_lambda, Field& field, VjpField& vjp, GradientWorkspace<B>& ws,
              const GradientOptions& options)
      : scheme_(scheme), backend_(backend), nodes_(nodes), nal_(node_at_lambda), field_(field),
        vjp_(vjp), ws_(ws), opt_(options), hist_(ws.history()), ring_(hist_ + 1),
        bar_ring_(hist_ + 2), cost_(ws.result.cost) {}

  template <class Loss> void run(const State& x_T, Loss& loss) {
    cost_ = GradientCost{};
    ws_.result.cancelled = false;
    progress_ = GradientProgress{ws_.num_steps(), 0, 0, ws_.schedule.advances() + 1};
    scan_history_use();
    for (auto& v : ws_.x_bar) backend_.fill(v, 0.0);
    for (auto& v : ws_.e_bar) backend_.fill(v, 0.0);
    zero_vector(ws_.result.grad_cond, ws_.wrt_cond());
    zero_vector(ws_.result.grad_params, ws_.wrt_params());
    backend_.copy(ws_.x[0], x_T);
    int current = 0;
    int held = 0;
    std::int64_t stored = 0;
    for (const CheckpointAction& a : ws_.schedule.actions()) {
      switch (a.op) {
      case CheckpointOp::store:
        store(a.slot, current);
        ++held;
        stored += ws_.snap_vectors[static_cast<std::size_t>(a.slot)];
        cost_.peak_checkpoints = std::max(cost_.peak_checkpoints, held);
        cost_.peak_stored_states = std::max(cost_.peak_stored_states, stored);
        break;
      case CheckpointOp::restore: current = restore(a.slot); break;
      case CheckpointOp::discard:
        --held;
        stored -= ws_.snap_vectors[static_cast<std::size_t>(a.slot)];
        break;
      case CheckpointOp::advance:
        for (; current < a.step; ++current) {
          advance(current, ws_.x[slot(current + 1)]);
          if (report_stop(0)) return;
        }
        break;
      case CheckpointOp::output: {
        const int n = ws_.num_steps();
        if (current != n - 1) throw std::logic_error("diffgrad: checkpoint schedule out of order");
        advance(current, ws_.result.x0);
        State& seed = ws_.x_bar[bar_slot(n)];
        ws_.result.loss = static_cast<double>(loss(backend_, ws_.result.x0, seed));
        check_loss_gradient(backend_, seed, ws_.result.x0, opt_.check_finite, "gradient",
                            "loss gradient (dL/dx0)");
        if (report_stop(0)) return;
        break;
      }
      case CheckpointOp::reverse:
        if (current != a.step) throw std::logic_error("diffgrad: checkpoint schedule out of order");
        reverse(a.step);
        if (report_stop(1)) return;
        break;
      }
    }
    backend_.copy(ws_.result.grad_x, ws_.x_bar[bar_slot(0)]);
  }

private:
  std::size_t slot(int step) const { return static_cast<std::size_t>(step % ring_); }
  std::size_t bar_slot(int step) const { return static_cast<std::size_t>(step % bar_ring_); }

  // Updates the progress after an advance (reversed = 0) or a reversal (1) and reports it;
  // true when the caller asked to stop.
  bool report_stop(int reversed) {
    progress_.steps_reversed += reversed;
    progress_.forward_steps = cost_.forward_steps;
    if (!opt_.progress || opt_.progress(progress_) != ObserverAction::stop) return false;
    ws_.result.cancelled = true;
    return true;
  }

  void zero_vector(Vector& v, bool wanted) const {
    if (!wanted) return;
    if constexpr (requires { v.setZero(); })
      v.setZero();
    else
      v = backend_.make_vector(static_cast<std::int64_t>(v.size()));
  }

  // How far back the scheme reads history states / outputs, over the whole grid, so
  // snapshots keep (and count) only what is read. Plans are cheap host-side scalars.
  void scan_history_use() {
    hist_x_used_ = 0;
    hist_e_used_ = 0;
    for (int i = 0; i < ws_.num_steps(); ++i) {
      const Plan p = scheme_.plan(nodes_, i, nal_);
      const auto scan = [&](const BasicCombo<Coeff>& c) {
        for (int j = 0; j < hist_; ++j) {
          if (!is_zero(c.hist_x[j])) hist_x_used_ = std::max(hist_x_used_, j + 1);
          if (!is_zero(c.hist_e[j])) hist_e_used_ = std::max(hist_e_used_, j + 1);
        }
      };
      scan(p.output);
      for (int s = 1; s < p.num_stages; ++s) scan(p.stage_input[s]);
    }
  }

  void store(int k, int step) {
    const auto base_x = static_cast<std::size_t>(k * (hist_ + 1));
    const auto base_e = static_cast<std::size_t>(k * hist_);
    int vectors = 1;
    backend_.copy(ws_.snap_x[base_x], ws_.x[slot(step)]);
    for (int j = 0; j < hist_x_used_ && step - 1 - j >= 0; ++j, ++vectors)
      backend_.copy(ws_.snap_x[base_x + 1 + static_cast<std::size_t>(j)],
                    ws_.x[slot(step - 1 - j)]);
    for (int j = 0; j < hist_e_used_ && step - 1 - j >= 0; ++j, ++vectors)
      backend_.copy(ws_.snap_e[base_e + static_cast<std::size_t>(j)], ws_.e[slot(step - 1 - j)]);
    ws_.snap_step[static_cast<std::size_t>(k)] = step;
    ws_.snap_vectors[static_cast<std::size_t>(k)] = vectors;
  }

  int restore(int k) {
    const int step = ws_.snap_step[static_cast<std::size_t>(k)];
    const auto base_x = static_cast<std::size_t>(k * (hist_ + 1));
    const auto base_e = static_cast<std::size_t>(k * hist_);
    backend_.copy(ws_.x[slot(step)], ws_.snap_x[base_x]);
    for (int j = 0; j < hist_x_used_ && step - 1 - j >= 0; ++j)
      backend_.copy(ws_.x[slot(step - 1 - j)],
                    ws_.snap_x[base_x + 1 + static_cast<std::size_t>(j)]);
    for (int j = 0; j < hist_e_used_ && step - 1 - j >= 0; ++j)
      backend_.copy(ws_.e[slot(step - 1 - j)], ws_.snap_e[base_e + static_cast<std::size_t>(j)]);
    return step;
  }

  // Forms the stage inputs u_1.. u_{S-1} of step i and evaluates the model at the first
  // `evaluated` stages (S for an advance, S - 1 to recompute what a reversal needs).
  void run_stages(const Plan& plan, int i, int evaluated) {
    for (int s = 0; s < plan.num_stages; ++s) {
      State& in = s == 0 ? ws_.x[slot(i)] : ws_.u[static_cast<std::size_t>(s - 1)];
      if (s > 0) {
        const int n =
            gather_terms(plan.stage_input[s], i, ring_, ws_.x, ws_.e, ws_.u, ws_.ue, terms_);
        backend_.lincomb(in, std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)),
                         BasicNoiseTerm<Coeff>{});
      }
      if (s >= evaluated) continue;
      State& out = s == 0 ? ws_.e[slot(i)] : ws_.ue[static_cast<std::size_t>(s - 1)];
      field_(static_cast<const State&>(in), plan.stage_node[s], out);
      ++cost_.model_evals;
      check_model_output(backend_, in, out, opt_.check_finite, i, plan.stage_node[s]);
    }
  }

  // x_i (working state) -> x_{i+1} written to `target`, exactly as run_scheme computes it.
  void advance(int i, State& target) {
    const Plan plan = checked_plan(i);
    run_stages(plan, i, plan.num_stages);
    int n = 0;
    const auto noise =
        gather_output_terms(plan, i, ring_, ws_, opt_.seed, opt_.row_offset, terms_, n);
    backend_.lincomb(target, std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)),
                     noise);
    ++cost_.forward_steps;
  }

  Plan checked_plan(int i) const {
    const Plan plan = scheme_.plan(nodes_, i, nal_);
    if (plan.num_stages < 1 || plan.num_stages > ws_.stages())
      throw std::logic_error(concat("diffgrad: step ", i, " has ", plan.num_stages,
                                    " stages, the scheme declares at most ", ws_.stages()));
    return plan;
  }

  // target += C^T g: the adjoint of a term C x applies the transposed coefficient.
  void axpy_transposed(State& target, const Coeff& c, const State& g) const {
    if (is_zero(c)) return;
    const std::array<Term, 2> t{Term{identity_coefficient<Coeff>(), &target},
                                Term{transpose(c), &g}};
    backend_.lincomb(target, std::span<const Term>(t.data(), t.size()), BasicNoiseTerm<Coeff>{});
  }

  // target += g (a VJP result: always a plain sum, whatever the plan's coefficient kind).
  void axpy(State& target, const State& g) const {
    const std::array<LinTerm<State>, 2> t{LinTerm<State>{1.0, &target}, LinTerm<State>{1.0, &g}};
    backend_.lincomb(target, std::span<const LinTerm<State>>(t.data(), t.size()));
  }

  // target = C^T g.
  void scale_transposed(State& target, const Coeff& c, const State& g) const {
    const std::array<Term, 1> t{Term{transpose(c), &g}};
    backend_.lincomb(target, std::span<const Term>(t.data(), t.size()), BasicNoiseTerm<Coeff>{});
  }

  // Adds c^T g to the cotangents of everything the combination `c` of step i reads.
  void scatter(const BasicCombo<Coeff>& c, int i, const State& g) {
    axpy_transposed(ws_.x_bar[bar_slot(i)], c.x, g);
    axpy_transposed(ws_.e_bar[slot(i)], c.e[0], g);
    for (int s = 1; s < kMaxStages; ++s) {
      if (is_zero(c.u[s]) && is_zero(c.e[s])) continue;
      if (s > ws_.stages() - 1)
        throw std::logic_error("diffgrad: a step plan reads a stage the scheme does not declare");
      axpy_transposed(ws_.u_bar[static_cast<std::size_t>(s - 1)], c.u[s], g);
      axpy_transposed(ws_.ue_bar[static_cast<std::size_t>(s - 1)], c.e[s], g);
    }
    for (int j = 0; j < kMaxHistory; ++j) {
      if (is_zero(c.hist_x[j]) && is_zero(c.hist_e[j])) continue;
      if (i - 1 - j < 0 || j >= hist_)
        throw std::logic_error("diffgrad: a step plan reads history that does not exist yet");
      axpy_transposed(ws_.x_bar[bar_slot(i - 1 - j)], c.hist_x[j], g);
      axpy_transposed(ws_.e_bar[slot(i - 1 - j)], c.hist_e[j], g);
    }
  }

  void call_vjp(const State& at, const Node& n, const State& cotangent, int i) {
    Vector* dc = ws_.wrt_cond() ? &ws_.result.grad_cond : nullptr;
    Vector* dp = ws_.wrt_params() ? &ws_.result.grad_params : nullptr;
    vjp_(at, n, cotangent, ws_.vjp_out, dc, dp);
    ++cost_.vjps;
    check_vjp_output(backend_, at, ws_.vjp_out, opt_.check_finite, i, n,
                     static_cast<const Vector*>(dc), static_cast<const Vector*>(dp));
  }

  // Adjoint of step i: cotangent of x_{i+1} -> cotangents of x_i, e_i and the history.
  void reverse(int i) {
    const Plan plan = checked_plan(i);
    const int stages = plan.num_stages;
    if (stages > 1) run_stages(plan, i, stages - 1); // u_1 .. u_{S-1} at the states seen
    for (int s = 1; s < stages; ++s) {
      backend_.fill(ws_.u_bar[static_cast<std::size_t>(s - 1)], 0.0);
      backend_.fill(ws_.ue_bar[static_cast<std::size_t>(s - 1)], 0.0);
    }
    State& g = ws_.x_bar[bar_slot(i + 1)];
    if (ws_.wrt_noise()) {
      State& gn = ws_.result.grad_noise[static_cast<std::size_t>(i)];
      if (is_zero(plan.noise))
        backend_.fill(gn, 0.0);
      else
        scale_transposed(gn, plan.noise, g);
    }
    scatter(plan.output, i, g);
    for (int s = stages - 1; s >= 1; --s) {
      const auto k = static_cast<std::size_t>(s - 1);
      call_vjp(ws_.u[k], plan.stage_node[s], ws_.ue_bar[k], i);
      axpy(ws_.u_bar[k], ws_.vjp_out);
      scatter(plan.stage_input[s], i, ws_.u_bar[k]);
    }
    // e_i's cotangent is now complete: this step's uses plus later steps' history reads.
    State& e_bar = ws_.e_bar[slot(i)];
    call_vjp(ws_.x[slot(i)], plan.stage_node[0], e_bar, i);
    axpy(ws_.x_bar[bar_slot(i)], ws_.vjp_out);
    backend_.fill(e_bar, 0.0); // its ring slot is reused for step i - H - 1
    backend_.fill(g, 0.0);     // likewise for x_{i-H-1}
  }

  const Scheme& scheme_;
  const B& backend_;
  std::span<const Node> nodes_;
  NodeAtLambda nal_;
  Field& field_;
  VjpField& vjp_;
  GradientWorkspace<B>& ws_;
  const GradientOptions& opt_;
  int hist_, ring_, bar_ring_;
  int hist_x_used_ = 0, hist_e_used_ = 0;
  GradientCost& cost_;
  GradientProgress progress_{};
  std::array<Term, kMaxLincombTerms> terms_{};
};

/// Treats a given cotangent w as the linear loss <w, x0>.
template <Backend B> struct CotangentLoss {
  const typename B::state_type& cotangent;
  double operator()(const B& backend, const typename B::state_type& x0,
                    typename B::state_type& grad) const {
    require_same_shape<B>(cotangent, x0, "gradient", "cotangent");
    backend.copy(grad, cotangent);
    return backend.dot(cotangent, x0);
  }
};

} // namespace detail

/// The exact discrete gradient of loss(x_0) for x_0 = scheme run from x_T over `nodes`,
/// with explicit model adapters: `field(u, node, out)` as for run_scheme (EpsField,
/// VelocityField) and `vjp(u, node, cotangent, dx, dcond, dparams)` (EpsVjp, VelocityVjp).
/// `loss` is a LossFunction or a state (the cotangent dL/dx_0). Writes ws's result and
/// returns it; allocates nothing when ws was built for this problem.
template <class Scheme, Backend B, class Field, class VjpField, class LossOrCotangent>
const GradientResult<B>&
discrete_adjoint(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                 NodeAtLambda node_at_lambda, Field&& field, VjpField&& vjp,
                 const typename B::state_type& x_T, LossOrCotangent&& loss,
                 const GradientOptions& options, GradientWorkspace<B>& ws) {
  using State = typename B::state_type;
  scheme.validate(nodes);
  const int num_steps = static_cast<int>(nodes.size()) - 1;
  if (ws.num_steps() != num_steps || ws.history() != scheme.history() ||
      ws.stages() < scheme.stages())
    detail::throw_argument("gradient", "ws",
                           detail::concat("a workspace for ", num_steps, " steps, history ",
                                          scheme.history(), ", ", scheme.stages(), " stages"),
                           detail::concat(ws.num_steps(), " steps, history ", ws.history(), ", ",
                                          ws.stages(), " stages"));
  if (ws.wrt_cond() != options.wrt_cond || ws.wrt_params() != options.wrt_params ||
      ws.wrt_noise() != options.wrt_noise ||
      ws.schedule.snapshots() != options.memory.snapshots_for(num_steps))
    detail::throw_argument("gradient", "ws", "a workspace built with the same GradientOptions",
                           "one built with different wrt_* flags or memory mode");
  if (B::batch(x_T) != ws.batch() || B::dim(x_T) != ws.dim())
    detail::throw_argument(
        "gradient", "x_T",
        detail::concat("shape ", ws.batch(), " x ", ws.dim(), " (batch x dim, as the workspace)"),
        detail::concat(B::batch(x_T), " x ", B::dim(x_T)));
  detail::check_scheme_dim("gradient", scheme, B::dim(x_T));
  if (!ws.given_noise.empty()) {
    if (static_cast<int>(ws.given_noise.size()) < num_steps)
      detail::throw_argument("gradient", "ws.given_noise",
                             detail::concat("one noise state per step (", num_steps, ")"),
                             ws.given_noise.size());
    for (std::size_t i = 0; i < ws.given_noise.size(); ++i) {
      const State& xi = ws.given_noise[i];
      detail::require_same_shape<B>(xi, x_T, "gradient", "ws.given_noise[i]");
      detail::require_finite_input(backend, xi, options.check_finite, "gradient", "ws.given_noise",
                                   "finite values", i);
    }
  }
  detail::require_finite_input(backend, x_T, options.check_finite, "gradient", "x_T",
                               "finite values (x_T at nodes[0])");
  detail::AdjointPass<Scheme, B, std::remove_reference_t<Field>, std::remove_reference_t<VjpField>>
      pass(scheme, backend, nodes, node_at_lambda, field, vjp, ws, options);
  if constexpr (std::is_same_v<std::remove_cvref_t<LossOrCotangent>, State>) {
    detail::CotangentLoss<B> as_loss{loss};
    pass.run(x_T, as_loss);
  } else {
    static_assert(LossFunction<std::remove_reference_t<LossOrCotangent>, B>,
                  "diffgrad::gradient: the loss must be callable as "
                  "double loss(const Backend&, const State& x0, State& grad), or be a State "
                  "(the cotangent dL/dx0)");
    pass.run(x_T, loss);
  }
  return ws.result;
}

} // namespace diffgrad
