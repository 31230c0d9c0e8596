#pragma once
// The exact discrete adjoint as a state machine, for users who own the loop: the reverse
// stepper runs the checkpoint schedule of the memory mode (forward advances, re-advances and
// reversed steps, gradients/checkpointing.hpp) and asks the caller for every model evaluation,
// for the loss gradient dL/dx0 and for every VJP, in the order the adjoint needs them:
//
//   ReverseStepper rs(scheme, backend, nodes, NodeAtLambda(schedule), ws, options);
//   rs.begin(x_T);
//   for (;;) {
//     switch (rs.request()) {
//     case AdjointRequest::model_eval:       // out = eps(in, node)
//       my_eps(rs.model_input(), rs.model_node(), rs.model_output()); break;
//     case AdjointRequest::loss_gradient:     // dL/dx0 at the sample
//       rs.set_loss(my_loss(rs.sample(), rs.sample_cotangent())); break;
//     case AdjointRequest::vjp:               // dx = J^T a; dcond/dparams += ...
//       my_vjp(rs.vjp_input(), rs.vjp_node(), rs.vjp_cotangent(), rs.vjp_output(),
//              rs.vjp_grad_cond(), rs.vjp_grad_params()); break;
//     case AdjointRequest::done: break;
//     }
//     if (rs.done()) break;
//     rs.advance();                           // consume the answer, run to the next request
//   }
//   rs.result();                              // x0, loss, grad_x, grad_cond, ..., cost
//
// discrete_adjoint (gradients/discrete_adjoint.hpp) IS this loop with the model's eps/VJP in
// place, so the stepper gives exactly the bits of gradient() for every scheme, memory mode and
// noise: there is one engine, not two.
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
// What a stored state holds. Reversing step i needs only the points the model saw: x_i and,
// for multi-stage steps, the stage inputs u_s (recomputed from x_i, plus whatever history the
// stage inputs read, by S - 1 model calls; or kept, GradientOptions::keep_stages). No model
// output and no history read only by the output combination is needed. A snapshot that is
// only ever restored to reverse its step ("reverse-only": every snapshot of store_all, and the
// tail of every checkpointed range) therefore holds x_i alone (plus stage history / kept
// stages); a snapshot the schedule re-advances from holds the extended state x_i,
// x_{i-1-j}, e_{i-1-j} the scheme reads. Snapshots share vectors: x_k and e_k are stored once
// (reference counted) however many snapshots need them. The schedule is known before the
// first model call, so which snapshot is which, and the buffers needed at most, are computed
// when the workspace is built.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/checkpointing.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler_workspace.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

/// Where the reverse pass gets the forward states from.
class MemoryMode {
public:
  enum class Kind {
    store_all,  ///< keep every state: N model evaluations, about N stored vectors
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
  int num_steps = 0;                    ///< N
  int steps_reversed = 0;               ///< adjoint steps done so far (N when finished)
  std::int64_t forward_steps = 0;       ///< one-step advances so far (recomputations included)
  std::int64_t forward_steps_total = 0; ///< all advances the memory mode will make: t(N, s) + 1
};

struct GradientOptions {
  MemoryMode memory = MemoryMode::store_all();
  /// Multi-stage (singlestep, Runge-Kutta) schemes: keep the stage inputs u_1 .. u_{S-1} of
  /// every step reversed from a reverse-only snapshot (every step under store_all) instead of
  /// recomputing them in the reverse pass. Costs S - 1 more stored vectors per such step and
  /// saves S - 1 model evaluations per such step (store_all: S N evaluations instead of
  /// S N + (S - 1) N). Single-stage schemes are unaffected. Same bits either way.
  bool keep_stages = false;
  bool wrt_cond = false;        ///< accumulate dL/dcond (length model.cond_size())
  bool wrt_params = false;      ///< accumulate dL/dtheta (length model.param_size())
  bool wrt_noise = false;       ///< keep dL/dxi_i for every step (zero for deterministic steps)
  std::uint64_t seed = 0;       ///< Philox seed of stochastic schemes, as in SampleOptions
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
  std::int64_t peak_stored_states = 0; ///< distinct state vectors held by those snapshots at once
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

namespace detail {

/// How far back a scheme reads history: over all combinations (what re-advancing needs) and
/// over the stage inputs only (what recomputing a reversed step's stages needs).
struct HistoryUse {
  int x = 0, e = 0;             ///< output and stage combinations
  int stage_x = 0, stage_e = 0; ///< stage combinations s >= 1 only
};

/// The most vectors one snapshot can reference: x_i, H states, H outputs, S - 1 stages.
inline constexpr int kMaxSnapshotKeys = 1 + 2 * kMaxHistory + kMaxStages - 1;

/// Bookkeeping of the shared snapshot vectors: key (a vector of some step) -> buffer, with
/// reference counts, lowest free buffer first. Grows only while sizing (at workspace
/// construction); at run time its capacity is fixed and it never allocates.
class SnapshotPool {
public:
  void reset(std::size_t keys, int capacity) {
    index_of_.assign(keys, -1);
    refs_.assign(static_cast<std::size_t>(capacity), 0);
    free_.clear();
    free_.reserve(static_cast<std::size_t>(capacity));
    for (int b = capacity - 1; b >= 0; --b) free_.push_back(b);
    in_use_ = peak_ = 0;
  }
  /// The buffer of `key` and whether it was just taken (its contents must be written).
  std::pair<int, bool> acquire(int key, bool grow) {
    int& b = index_of_[static_cast<std::size_t>(key)];
    if (b >= 0) {
      ++refs_[static_cast<std::size_t>(b)];
      return {b, false};
    }
    if (free_.empty()) {
      if (!grow) throw std::logic_error("diffgrad: snapshot pool exhausted (workspace sizing bug)");
      free_.push_back(static_cast<int>(refs_.size()));
      refs_.push_back(0);
    }
    b = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(b)] = 1;
    peak_ = std::max(peak_, ++in_use_);
    return {b, true};
  }
  void release(int key) {
    int& b = index_of_[static_cast<std::size_t>(key)];
    if (b < 0) throw std::logic_error("diffgrad: snapshot vector released twice");
    if (--refs_[static_cast<std::size_t>(b)] == 0) {
      free_.push_back(b);
      --in_use_;
      b = -1;
    }
  }
  int buffer(int key) const { return index_of_[static_cast<std::size_t>(key)]; }
  int in_use() const { return in_use_; }
  int peak() const { return peak_; }

private:
  std::vector<int> index_of_, refs_, free_;
  int in_use_ = 0, peak_ = 0;
};

} // namespace detail

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
        keep_stages_(options.keep_stages && stages > 1),
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
    snap_step.assign(static_cast<std::size_t>(slots), -1);
    snap_keys.assign(static_cast<std::size_t>(slots * detail::kMaxSnapshotKeys), -1);
    snap_num_keys.assign(static_cast<std::size_t>(slots), 0);
    snap_full.assign(static_cast<std::size_t>(slots), 0);
    snap_stages_kept.assign(static_cast<std::size_t>(slots), 0);
    classify_snapshots();
    // Size the shared pool for the worst case of this history and stage count (the scheme's
    // plans may read less; the run then uses fewer of these buffers).
    const detail::HistoryUse worst{history, history, history, history};
    pool_capacity_ = replay_schedule(
        worst, [stages](int) { return stages; }, true);
    fill(pool, pool_capacity_);
    // Every bookkeeping buffer at its run-time size now, so a run never allocates.
    snapshot_pool.reset(static_cast<std::size_t>(num_steps) * static_cast<std::size_t>(stages + 1),
                        pool_capacity_);
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
  bool keep_stages() const { return keep_stages_; }
  /// State vectors allocated for snapshots: the most the schedule can hold at once for this
  /// history and stage count (the run's GradientCost::peak_stored_states is <= this).
  int snapshot_buffers() const { return pool_capacity_; }

private:
  int history_, stages_, num_steps_;
  std::int64_t batch_, dim_;
  bool wrt_cond_, wrt_params_, wrt_noise_, keep_stages_;
  int pool_capacity_ = 0;

  // A snapshot is "full" when some restore of it is followed by an advance (it must carry the
  // history the scheme reads); otherwise it is only restored to reverse its own step.
  void classify_snapshots() {
    const auto actions = schedule.actions();
    store_full.assign(actions.size(), 0);
    std::vector<std::size_t> last_store(static_cast<std::size_t>(schedule.snapshots()), 0);
    for (std::size_t k = 0; k < actions.size(); ++k) {
      const CheckpointAction& a = actions[k];
      if (a.op == CheckpointOp::store) last_store[static_cast<std::size_t>(a.slot)] = k;
      if (a.op == CheckpointOp::restore && k + 1 < actions.size() &&
          (actions[k + 1].op == CheckpointOp::advance || actions[k + 1].op == CheckpointOp::output))
        store_full[last_store[static_cast<std::size_t>(a.slot)]] = 1;
    }
    // The first snapshot (x_T) starts the forward pass from the working state itself; it is
    // re-advanced from whenever the schedule restores it for an advance (marked above).
  }

public:
  /// The keys (vector of a step) a snapshot of `step` references; returns their count.
  /// Key = step * (S + 1) + kind, kind 0: x_step, 1: e_step, 1 + s: stage input u_s.
  int snapshot_keys(int step, bool full, int step_stages, const detail::HistoryUse& use,
                    int* out) const {
    const auto key = [this](int k, int kind) { return k * (stages_ + 1) + kind; };
    int n = 0;
    out[n++] = key(step, 0);
    const bool staged = step_stages > 1;
    const int hx = full ? use.x : (staged ? use.stage_x : 0);
    const int he = full ? use.e : (staged ? use.stage_e : 0);
    for (int j = 0; j < hx && step - 1 - j >= 0; ++j) out[n++] = key(step - 1 - j, 0);
    for (int j = 0; j < he && step - 1 - j >= 0; ++j) out[n++] = key(step - 1 - j, 1);
    if (!full && keep_stages_ && staged)
      for (int s = 1; s < step_stages; ++s) out[n++] = key(step, 1 + s);
    return n;
  }

  /// Replays the schedule's stores and discards on `snapshot_pool` with the given history use
  /// and per-step stage counts; returns the most vectors held at once. Sizing only.
  template <class StagesOf>
  int replay_schedule(const detail::HistoryUse& use, StagesOf stages_of, bool grow) {
    snapshot_pool.reset(
        static_cast<std::size_t>(num_steps_) * static_cast<std::size_t>(stages_ + 1), 0);
    std::vector<std::array<int, detail::kMaxSnapshotKeys>> keys(snap_step.size());
    std::vector<int> count(snap_step.size(), 0);
    const auto actions = schedule.actions();
    for (std::size_t k = 0; k < actions.size(); ++k) {
      const CheckpointAction& a = actions[k];
      const auto slot = static_cast<std::size_t>(a.slot);
      if (a.op == CheckpointOp::store) {
        count[slot] =
            snapshot_keys(a.step, store_full[k] != 0, stages_of(a.step), use, keys[slot].data());
        for (int j = 0; j < count[slot]; ++j) snapshot_pool.acquire(keys[slot][j], grow);
      } else if (a.op == CheckpointOp::discard) {
        for (int j = 0; j < count[slot]; ++j) snapshot_pool.release(keys[slot][j]);
      }
    }
    return snapshot_pool.peak();
  }

  // Internal buffers of the executor (ReverseStepper); not part of the API.
  CheckpointSchedule schedule;
  std::vector<char> store_full;          ///< per schedule action: a store of a full snapshot
  std::vector<state_type> x, e, u, ue;   ///< working extended state: rings by step % (H + 1)
  std::vector<state_type> x_bar, e_bar;  ///< cotangent rings: step % (H + 2), step % (H + 1)
  std::vector<state_type> u_bar, ue_bar; ///< stage cotangents (stage s at index s - 1)
  state_type vjp_out;                    ///< one VJP result before it is accumulated
  std::vector<state_type> pool;          ///< shared snapshot vectors
  detail::SnapshotPool snapshot_pool;    ///< which pool buffer holds which step's vector
  std::vector<int> snap_step, snap_keys, snap_num_keys; ///< per slot: step, its keys
  std::vector<char> snap_full, snap_stages_kept;        ///< per slot
  GradientResult<B> result;
};

/// What a ReverseStepper needs from its caller next.
enum class AdjointRequest {
  model_eval,    ///< write f(model_input(), model_node()) into model_output()
  loss_gradient, ///< write dL/dx0 at sample() into sample_cotangent() (optionally set_loss)
  vjp,           ///< write (df/dx)^T vjp_cotangent() at vjp_input(), vjp_node() into vjp_output()
  done,          ///< finished (or cancelled by GradientOptions::progress): read result()
};

inline const char* to_string(AdjointRequest r) {
  switch (r) {
  case AdjointRequest::model_eval: return "model_eval";
  case AdjointRequest::loss_gradient: return "loss_gradient";
  case AdjointRequest::vjp: return "vjp";
  case AdjointRequest::done: return "done";
  }
  return "?";
}

/// The exact discrete adjoint of `scheme` over `nodes` as a state machine (see the top of this
/// file). The scheme, backend, nodes, workspace and options are referenced, not copied: they
/// must outlive the stepper. `where` names the entry point in error messages.
template <class Scheme, Backend B> class ReverseStepper {
public:
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  using Plan = detail::plan_type_t<Scheme>;
  using Coeff = typename Plan::coeff_type;
  using Term = LinTerm<State, Coeff>;
  static_assert(BackendFor<B, Coeff>,
                "diffgrad: this backend has no fused lincomb for the scheme's coefficient kind "
                "(backend/coefficient.hpp)");

  ReverseStepper(const Scheme& scheme, const B& backend, std::span<const Node> nodes,
                 NodeAtLambda node_at_lambda, GradientWorkspace<B>& ws,
                 const GradientOptions& options, const char* where = "ReverseStepper")
      : scheme_(scheme), backend_(backend), nodes_(nodes), nal_(node_at_lambda), ws_(ws),
        opt_(options), where_(where), hist_(ws.history()), ring_(hist_ + 1), bar_ring_(hist_ + 2),
        cost_(ws.result.cost) {}
  /// The options are referenced: a temporary would dangle.
  ReverseStepper(const Scheme&, const B&, std::span<const Node>, NodeAtLambda,
                 GradientWorkspace<B>&, GradientOptions&&, const char* = "ReverseStepper") = delete;

  /// Starts at x_T (nodes[0]): validates the nodes, the workspace, x_T and the given noise
  /// (once, before any model call) and runs to the first request (a model evaluation).
  void begin(const State& x_T) {
    validate(x_T);
    cost_ = GradientCost{};
    ws_.result.cancelled = false;
    ws_.result.loss = 0.0;
    num_steps_ = ws_.num_steps();
    progress_ = GradientProgress{num_steps_, 0, 0, ws_.schedule.advances() + 1};
    scan_history_use();
    for (auto& v : ws_.x_bar) backend_.fill(v, 0.0);
    for (auto& v : ws_.e_bar) backend_.fill(v, 0.0);
    zero_vector(ws_.result.grad_cond, ws_.wrt_cond());
    zero_vector(ws_.result.grad_params, ws_.wrt_params());
    ws_.snapshot_pool.reset(static_cast<std::size_t>(num_steps_) *
                                static_cast<std::size_t>(ws_.stages() + 1),
                            ws_.snapshot_buffers());
    std::fill(ws_.snap_step.begin(), ws_.snap_step.end(), -1);
    backend_.copy(ws_.x[0], x_T);
    current_ = 0;
    held_ = 0;
    pc_ = 0;
    ring_full_ = true;
    live_stages_step_ = -1;
    restored_slot_ = -1;
    capture_slot_ = -1;
    started_ = true;
    request_ = AdjointRequest::done;
    next_action();
  }

  AdjointRequest request() const { return request_; }
  bool done() const { return !started_ || request_ == AdjointRequest::done; }
  int num_steps() const { return num_steps_; }
  /// The step being advanced or reversed (i of x_i -> x_{i+1}).
  int step() const { return step_; }
  /// True while the pending request belongs to the reverse pass (a stage recomputation or a
  /// VJP of step()), false during forward advances and the loss.
  bool reversing() const { return phase_ == Phase::recompute || phase_ == Phase::vjp; }
  const GradientProgress& progress() const { return progress_; }
  const GradientResult<B>& result() const { return ws_.result; }

  // --- model_eval ---------------------------------------------------------------------
  /// The state the model must be evaluated at (x_i for stage 0, u_s after).
  const State& model_input() const {
    require(AdjointRequest::model_eval, "model_input");
    return stage_ == 0 ? ws_.x[slot(step_)] : ws_.u[static_cast<std::size_t>(stage_ - 1)];
  }
  const Node& model_node() const {
    require(AdjointRequest::model_eval, "model_node");
    return plan_.stage_node[stage_];
  }
  /// Where the caller writes the model output (a buffer of the state's shape).
  State& model_output() {
    require(AdjointRequest::model_eval, "model_output");
    return stage_ == 0 ? ws_.e[slot(step_)] : ws_.ue[static_cast<std::size_t>(stage_ - 1)];
  }

  // --- loss_gradient ------------------------------------------------------------------
  /// The sample x0 = x_N.
  const State& sample() const {
    require(AdjointRequest::loss_gradient, "sample");
    return ws_.result.x0;
  }
  /// Where the caller writes dL/dx0 (zero on entry).
  State& sample_cotangent() {
    require(AdjointRequest::loss_gradient, "sample_cotangent");
    return ws_.x_bar[bar_slot(num_steps_)];
  }
  /// Records L(x0) in the result (optional; 0 otherwise).
  void set_loss(double loss) {
    require(AdjointRequest::loss_gradient, "set_loss");
    ws_.result.loss = loss;
  }

  // --- vjp ----------------------------------------------------------------------------
  /// The state the model saw (x_i or the stage input u_s).
  const State& vjp_input() const {
    require(AdjointRequest::vjp, "vjp_input");
    return vjp_stage_ == 0 ? ws_.x[slot(step_)] : ws_.u[static_cast<std::size_t>(vjp_stage_ - 1)];
  }
  const Node& vjp_node() const {
    require(AdjointRequest::vjp, "vjp_node");
    return plan_.stage_node[vjp_stage_];
  }
  /// The cotangent of the model output at that point.
  const State& vjp_cotangent() const {
    require(AdjointRequest::vjp, "vjp_cotangent");
    return vjp_stage_ == 0 ? ws_.e_bar[slot(step_)]
                           : ws_.ue_bar[static_cast<std::size_t>(vjp_stage_ - 1)];
  }
  /// Where the caller writes (df/dx)^T cotangent (overwritten, not accumulated).
  State& vjp_output() {
    require(AdjointRequest::vjp, "vjp_output");
    return ws_.vjp_out;
  }
  /// The result's dL/dcond, for the caller's VJP to ACCUMULATE into (+=); null unless
  /// options.wrt_cond. A caller that accumulates elsewhere may ignore it.
  Vector* vjp_grad_cond() {
    require(AdjointRequest::vjp, "vjp_grad_cond");
    return ws_.wrt_cond() ? &ws_.result.grad_cond : nullptr;
  }
  /// The result's dL/dtheta, likewise (null unless options.wrt_params).
  Vector* vjp_grad_params() {
    require(AdjointRequest::vjp, "vjp_grad_params");
    return ws_.wrt_params() ? &ws_.result.grad_params : nullptr;
  }

  /// Consumes the answer to the pending request (checks it: shape, and finiteness unless
  /// options.check_finite is false) and runs to the next request.
  void advance() {
    require_started("advance");
    switch (request_) {
    case AdjointRequest::model_eval: consume_model_output(); break;
    case AdjointRequest::loss_gradient: consume_loss_gradient(); break;
    case AdjointRequest::vjp: consume_vjp(); break;
    case AdjointRequest::done:
      throw std::logic_error(detail::concat("diffgrad::ReverseStepper::advance: the gradient is ",
                                            ws_.result.cancelled ? "cancelled" : "complete",
                                            "; read result() (or begin() again)"));
    }
  }

private:
  enum class Phase { forward, output, recompute, loss, vjp };

  std::size_t slot(int step) const { return static_cast<std::size_t>(step % ring_); }
  std::size_t bar_slot(int step) const { return static_cast<std::size_t>(step % bar_ring_); }

  void require_started(const char* fn) const {
    if (!started_)
      throw std::logic_error(
          detail::concat("diffgrad::ReverseStepper::", fn, ": call begin(x_T) first"));
  }
  void require(AdjointRequest wanted, const char* fn) const {
    require_started(fn);
    if (request_ != wanted)
      throw std::logic_error(detail::concat(
          "diffgrad::ReverseStepper::", fn, ": only valid when request() == AdjointRequest::",
          to_string(wanted), ", but the stepper asks for AdjointRequest::", to_string(request_),
          request_ == AdjointRequest::done ? " (the gradient is complete; read result())" : ""));
  }

  void validate(const State& x_T) const {
    scheme_.validate(nodes_);
    const int num_steps = static_cast<int>(nodes_.size()) - 1;
    if (ws_.num_steps() != num_steps || ws_.history() != scheme_.history() ||
        ws_.stages() < scheme_.stages())
      detail::throw_argument(where_, "ws",
                             detail::concat("a workspace for ", num_steps, " steps, history ",
                                            scheme_.history(), ", ", scheme_.stages(), " stages"),
                             detail::concat(ws_.num_steps(), " steps, history ", ws_.history(),
                                            ", ", ws_.stages(), " stages"));
    if (ws_.wrt_cond() != opt_.wrt_cond || ws_.wrt_params() != opt_.wrt_params ||
        ws_.wrt_noise() != opt_.wrt_noise ||
        ws_.keep_stages() != (opt_.keep_stages && ws_.stages() > 1) ||
        ws_.schedule.snapshots() != opt_.memory.snapshots_for(num_steps))
      detail::throw_argument(where_, "ws", "a workspace built with the same GradientOptions",
                             "one built with different wrt_* flags, keep_stages or memory mode");
    if (B::batch(x_T) != ws_.batch() || B::dim(x_T) != ws_.dim())
      detail::throw_argument(where_, "x_T",
                             detail::concat("shape ", ws_.batch(), " x ", ws_.dim(),
                                            " (batch x dim, as the workspace)"),
                             detail::concat(B::batch(x_T), " x ", B::dim(x_T)));
    detail::check_scheme_dim(where_, scheme_, B::dim(x_T));
    if (!ws_.given_noise.empty()) {
      if (static_cast<int>(ws_.given_noise.size()) < num_steps)
        detail::throw_argument(where_, "ws.given_noise",
                               detail::concat("one noise state per step (", num_steps, ")"),
                               ws_.given_noise.size());
      for (std::size_t i = 0; i < ws_.given_noise.size(); ++i) {
        const State& xi = ws_.given_noise[i];
        detail::require_same_shape<B>(xi, x_T, where_, "ws.given_noise[i]");
        detail::require_finite_input(backend_, xi, opt_.check_finite, where_, "ws.given_noise",
                                     "finite values", i);
      }
    }
    detail::require_finite_input(backend_, x_T, opt_.check_finite, where_, "x_T",
                                 "finite values (x_T at nodes[0])");
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
    use_ = detail::HistoryUse{};
    for (int i = 0; i < num_steps_; ++i) {
      const Plan p = scheme_.plan(nodes_, i, nal_);
      const auto scan = [&](const BasicCombo<Coeff>& c, bool stage) {
        for (int j = 0; j < hist_; ++j) {
          if (!is_zero(c.hist_x[j])) {
            use_.x = std::max(use_.x, j + 1);
            if (stage) use_.stage_x = std::max(use_.stage_x, j + 1);
          }
          if (!is_zero(c.hist_e[j])) {
            use_.e = std::max(use_.e, j + 1);
            if (stage) use_.stage_e = std::max(use_.stage_e, j + 1);
          }
        }
      };
      scan(p.output, false);
      for (int s = 1; s < p.num_stages; ++s) scan(p.stage_input[s], true);
    }
  }

  // --- the schedule -------------------------------------------------------------------

  // Executes schedule actions from pc_ until one needs the caller (request_ set) or the
  // schedule is done.
  void next_action() {
    const auto actions = ws_.schedule.actions();
    for (; pc_ < actions.size(); ++pc_) {
      const CheckpointAction& a = actions[pc_];
      switch (a.op) {
      case CheckpointOp::store: store(a.slot, current_, ws_.store_full[pc_] != 0); break;
      case CheckpointOp::restore: current_ = restore(a.slot); break;
      case CheckpointOp::discard: discard(a.slot); break;
      case CheckpointOp::advance:
        if (current_ < a.step) {
          start_advance(current_, Phase::forward);
          return;
        }
        break;
      case CheckpointOp::output:
        if (current_ != num_steps_ - 1)
          throw std::logic_error("diffgrad: checkpoint schedule out of order");
        start_advance(current_, Phase::output);
        return;
      case CheckpointOp::reverse:
        if (current_ != a.step)
          throw std::logic_error("diffgrad: checkpoint schedule out of order");
        start_reverse(a.step);
        return;
      }
    }
    backend_.copy(ws_.result.grad_x, ws_.x_bar[bar_slot(0)]);
    request_ = AdjointRequest::done;
  }

  // Ends the current action: reports progress (reversed = 0 after an advance, 1 after a
  // reversal) and continues the schedule unless the caller's progress callback stopped it.
  void report_and_continue(int reversed) {
    if (!report_stop(reversed)) next_action();
  }

  // Updates the progress and reports it; true (and the stepper done, the result cancelled)
  // when the caller's callback asked to stop.
  bool report_stop(int reversed) {
    progress_.steps_reversed += reversed;
    progress_.forward_steps = cost_.forward_steps;
    if (!opt_.progress || opt_.progress(progress_) != ObserverAction::stop) return false;
    ws_.result.cancelled = true;
    request_ = AdjointRequest::done;
    return true;
  }

  void store(int k, int step, bool full) {
    const auto ks = static_cast<std::size_t>(k);
    int* keys = &ws_.snap_keys[ks * detail::kMaxSnapshotKeys];
    const int stages = full ? 1 : checked_plan(step).num_stages;
    const int n = ws_.snapshot_keys(step, full, stages, use_, keys);
    const int kinds = ws_.stages() + 1;
    for (int j = 0; j < n; ++j) {
      const auto [buffer, fresh] = ws_.snapshot_pool.acquire(keys[j], false);
      const int kind = keys[j] % kinds, at = keys[j] / kinds;
      // Stage inputs are captured when the step is advanced (capture_stages); x and e are in
      // the working ring now. A vector another snapshot already holds has the same bits.
      if (fresh && kind <= 1)
        backend_.copy(ws_.pool[static_cast<std::size_t>(buffer)],
                      kind == 0 ? ws_.x[slot(at)] : ws_.e[slot(at)]);
    }
    ws_.snap_step[ks] = step;
    ws_.snap_num_keys[ks] = n;
    ws_.snap_full[ks] = full ? 1 : 0;
    ws_.snap_stages_kept[ks] = 0;
    if (!full && ws_.keep_stages() && stages > 1) capture_slot_ = k;
    ++held_;
    cost_.peak_checkpoints = std::max(cost_.peak_checkpoints, held_);
    cost_.peak_stored_states =
        std::max<std::int64_t>(cost_.peak_stored_states, ws_.snapshot_pool.in_use());
  }

  int restore(int k) {
    const auto ks = static_cast<std::size_t>(k);
    const int step = ws_.snap_step[ks];
    const int* keys = &ws_.snap_keys[ks * detail::kMaxSnapshotKeys];
    const int kinds = ws_.stages() + 1;
    for (int j = 0; j < ws_.snap_num_keys[ks]; ++j) {
      const int kind = keys[j] % kinds, at = keys[j] / kinds;
      if (kind > 1) continue; // kept stage inputs are read when the step is reversed
      backend_.copy(kind == 0 ? ws_.x[slot(at)] : ws_.e[slot(at)],
                    ws_.pool[static_cast<std::size_t>(ws_.snapshot_pool.buffer(keys[j]))]);
    }
    ring_full_ = ws_.snap_full[ks] != 0;
    restored_slot_ = k;
    return step;
  }

  void discard(int k) {
    const auto ks = static_cast<std::size_t>(k);
    const int* keys = &ws_.snap_keys[ks * detail::kMaxSnapshotKeys];
    for (int j = 0; j < ws_.snap_num_keys[ks]; ++j) ws_.snapshot_pool.release(keys[j]);
    ws_.snap_num_keys[ks] = 0;
    if (capture_slot_ == k) capture_slot_ = -1;
    if (restored_slot_ == k) restored_slot_ = -1;
    --held_;
  }

  Plan checked_plan(int i) const {
    const Plan plan = scheme_.plan(nodes_, i, nal_);
    if (plan.num_stages < 1 || plan.num_stages > ws_.stages())
      throw std::logic_error(detail::concat("diffgrad: step ", i, " has ", plan.num_stages,
                                            " stages, the scheme declares at most ", ws_.stages()));
    return plan;
  }

  // --- forward: stages and the output combination ------------------------------------

  // Step i's stages, evaluated at the first `evaluated` of them (S for an advance, S - 1 to
  // recompute what a reversal needs): sets up stage 0 and runs to its evaluation.
  void start_stages(int i, Phase phase, int evaluated) {
    phase_ = phase;
    step_ = i;
    stage_ = 0;
    evaluated_ = evaluated;
    if (!continue_stages()) stages_done();
  }

  // Forms the stage inputs from stage_ on; true when a model evaluation is requested, false
  // when the stages of this pass are complete.
  bool continue_stages() {
    for (; stage_ < plan_.num_stages; ++stage_) {
      if (stage_ > 0) {
        State& in = ws_.u[static_cast<std::size_t>(stage_ - 1)];
        const int n = detail::gather_terms(plan_.stage_input[stage_], step_, ring_, ws_.x, ws_.e,
                                           ws_.u, ws_.ue, terms_);
        backend_.lincomb(in, std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)),
                         BasicNoiseTerm<Coeff>{});
      }
      if (stage_ < evaluated_) {
        request_ = AdjointRequest::model_eval;
        return true;
      }
    }
    return false;
  }

  void consume_model_output() {
    const State& in =
        stage_ == 0 ? ws_.x[slot(step_)] : ws_.u[static_cast<std::size_t>(stage_ - 1)];
    const State& out =
        stage_ == 0 ? ws_.e[slot(step_)] : ws_.ue[static_cast<std::size_t>(stage_ - 1)];
    ++cost_.model_evals;
    detail::check_model_output(backend_, in, out, opt_.check_finite, step_,
                               plan_.stage_node[stage_]);
    ++stage_;
    if (!continue_stages()) stages_done();
  }

  void stages_done() {
    live_stages_step_ = step_;
    if (phase_ == Phase::recompute) {
      reverse_body();
      return;
    }
    capture_stages(step_);
    // x_i (working state) -> x_{i+1}, exactly as run_scheme computes it.
    State& target = phase_ == Phase::output ? ws_.result.x0 : ws_.x[slot(step_ + 1)];
    int n = 0;
    const auto noise = detail::gather_output_terms(plan_, step_, ring_, ws_, opt_.seed,
                                                   opt_.row_offset, terms_, n);
    backend_.lincomb(target, std::span<const Term>(terms_.data(), static_cast<std::size_t>(n)),
                     noise);
    ++cost_.forward_steps;
    if (phase_ == Phase::output) {
      phase_ = Phase::loss;
      request_ = AdjointRequest::loss_gradient;
      return;
    }
    ++current_;
    ring_full_ = true;
    if (report_stop(0)) return;
    if (current_ < ws_.schedule.actions()[pc_].step) {
      start_advance(current_, Phase::forward);
      return;
    }
    ++pc_;
    next_action();
  }

  void start_advance(int i, Phase phase) {
    if (!ring_full_)
      throw std::logic_error("diffgrad: the schedule advances from a snapshot stored without "
                             "its history (snapshot classification bug)");
    plan_ = checked_plan(i);
    start_stages(i, phase, plan_.num_stages);
  }

  // After step i's stages were formed by an advance: copies them into the snapshot of step i
  // that keeps them (keep_stages), if one waits for them.
  void capture_stages(int i) {
    if (capture_slot_ < 0) return;
    const auto ks = static_cast<std::size_t>(capture_slot_);
    if (ws_.snap_step[ks] != i) return;
    const int* keys = &ws_.snap_keys[ks * detail::kMaxSnapshotKeys];
    const int kinds = ws_.stages() + 1;
    for (int j = 0; j < ws_.snap_num_keys[ks]; ++j) {
      const int kind = keys[j] % kinds;
      if (kind > 1)
        backend_.copy(ws_.pool[static_cast<std::size_t>(ws_.snapshot_pool.buffer(keys[j]))],
                      ws_.u[static_cast<std::size_t>(kind - 2)]);
    }
    ws_.snap_stages_kept[ks] = 1;
    capture_slot_ = -1;
  }

  void consume_loss_gradient() {
    detail::check_loss_gradient(backend_, ws_.x_bar[bar_slot(num_steps_)], ws_.result.x0,
                                opt_.check_finite, where_, "loss gradient (dL/dx0)");
    ++pc_;
    report_and_continue(0);
  }

  // --- reverse ------------------------------------------------------------------------

  // Where step i's stage inputs come from: still in ws.u from the last advance (keep_stages),
  // kept by the snapshot just restored (copied back), or recomputed (S - 1 model calls).
  void start_reverse(int i) {
    plan_ = checked_plan(i);
    step_ = i;
    const int stages = plan_.num_stages;
    if (stages > 1) {
      const bool live = ws_.keep_stages() && live_stages_step_ == i;
      const auto ks = static_cast<std::size_t>(restored_slot_);
      const bool kept =
          !live && restored_slot_ >= 0 && ws_.snap_step[ks] == i && ws_.snap_stages_kept[ks] != 0;
      if (kept) {
        const int* keys = &ws_.snap_keys[ks * detail::kMaxSnapshotKeys];
        const int kinds = ws_.stages() + 1;
        for (int j = 0; j < ws_.snap_num_keys[ks]; ++j) {
          const int kind = keys[j] % kinds;
          if (kind > 1)
            backend_.copy(ws_.u[static_cast<std::size_t>(kind - 2)],
                          ws_.pool[static_cast<std::size_t>(ws_.snapshot_pool.buffer(keys[j]))]);
        }
      }
      if (!live && !kept) {
        start_stages(i, Phase::recompute, stages - 1); // u_1 .. u_{S-1} at the states seen
        return;
      }
    }
    phase_ = Phase::recompute;
    reverse_body();
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

  // Adjoint of step i once its stage inputs are in ws.u: cotangent of x_{i+1} -> cotangents
  // of x_i, e_i and the history, then the VJPs from the last stage to stage 0.
  void reverse_body() {
    const int i = step_;
    const int stages = plan_.num_stages;
    for (int s = 1; s < stages; ++s) {
      backend_.fill(ws_.u_bar[static_cast<std::size_t>(s - 1)], 0.0);
      backend_.fill(ws_.ue_bar[static_cast<std::size_t>(s - 1)], 0.0);
    }
    State& g = ws_.x_bar[bar_slot(i + 1)];
    if (ws_.wrt_noise()) {
      State& gn = ws_.result.grad_noise[static_cast<std::size_t>(i)];
      if (is_zero(plan_.noise))
        backend_.fill(gn, 0.0);
      else
        scale_transposed(gn, plan_.noise, g);
    }
    scatter(plan_.output, i, g);
    phase_ = Phase::vjp;
    vjp_stage_ = stages - 1;
    request_ = AdjointRequest::vjp;
  }

  void consume_vjp() {
    const int i = step_;
    const int s = vjp_stage_;
    const Node& n = plan_.stage_node[s];
    const State& at = s == 0 ? ws_.x[slot(i)] : ws_.u[static_cast<std::size_t>(s - 1)];
    const Vector* dc = ws_.wrt_cond() ? &ws_.result.grad_cond : nullptr;
    const Vector* dp = ws_.wrt_params() ? &ws_.result.grad_params : nullptr;
    ++cost_.vjps;
    detail::check_vjp_output(backend_, at, ws_.vjp_out, opt_.check_finite, i, n, dc, dp);
    if (s > 0) {
      const auto k = static_cast<std::size_t>(s - 1);
      axpy(ws_.u_bar[k], ws_.vjp_out);
      scatter(plan_.stage_input[s], i, ws_.u_bar[k]);
      --vjp_stage_; // the next VJP: stage s - 1 (e_i's cotangent last, once complete)
      return;
    }
    // e_i's cotangent was complete (this step's uses plus later steps' history reads).
    axpy(ws_.x_bar[bar_slot(i)], ws_.vjp_out);
    backend_.fill(ws_.e_bar[slot(i)], 0.0);         // its ring slot is reused for step i - H - 1
    backend_.fill(ws_.x_bar[bar_slot(i + 1)], 0.0); // likewise for x_{i-H-1}
    ++pc_;
    report_and_continue(1);
  }

  const Scheme& scheme_;
  const B& backend_;
  std::span<const Node> nodes_;
  NodeAtLambda nal_;
  GradientWorkspace<B>& ws_;
  const GradientOptions& opt_;
  const char* where_;
  int hist_, ring_, bar_ring_;
  GradientCost& cost_;
  detail::HistoryUse use_{};
  GradientProgress progress_{};
  Plan plan_{};
  Phase phase_ = Phase::forward;
  AdjointRequest request_ = AdjointRequest::done;
  std::size_t pc_ = 0; // the schedule action being executed
  int num_steps_ = 0, current_ = 0, held_ = 0;
  int step_ = 0, stage_ = 0, evaluated_ = 0, vjp_stage_ = 0;
  int live_stages_step_ = -1; // the step whose stage inputs ws.u holds
  int restored_slot_ = -1;    // the slot last restored (its kept stages, if any)
  int capture_slot_ = -1;     // a keep_stages snapshot waiting for its step's stages
  bool ring_full_ = true;     // the working ring holds the history the scheme reads
  bool started_ = false;
  std::array<Term, kMaxLincombTerms> terms_{};
};

} // namespace diffgrad
