#pragma once
// DiffFlow (Diffusion Normalizing Flow): a diffusion whose forward drift f_theta is learned
// together with the backward score s_theta, trained by minimising the KL divergence between
// the discretised forward and backward path measures. See docs/diffflow.md for the math.
//
// On a grid t_0 < ... < t_N with diffusion g_i and dt_i = t_{i+1} - t_i:
//   forward   x_{i+1} = x_i + f(x_i, t_i) dt_i + g_i sqrt(dt_i) xi_i,      xi_i ~ N(0, I)
//   backward  x_i = x_{i+1} - b_{i+1}(x_{i+1}) dt_i + g_{i+1} sqrt(dt_i) eta_i,
//             b_{i+1} = f(., t_{i+1}) - g_{i+1}^2 s(., t_{i+1})
//   the backward noise that reproduces a forward path
//             eta_i = (x_i - x_{i+1} + b_{i+1}(x_{i+1}) dt_i) / (g_{i+1} sqrt(dt_i))
//   loss per sample (x_0 = data)
//             L = -log N(x_N; 0, I) + sum_i ( |eta_i|^2 / 2 - |xi_i|^2 / 2 ).
//
// The chain runs on the library's one engine (run_scheme) and its gradient is the library's
// exact discrete adjoint (discrete_adjoint, every MemoryMode, noise regenerated from Philox and
// never stored). The running loss |eta_i|^2 / 2 reads the networks at the step's OUTPUT
// x_{i+1} and the pair (x_i, x_{i+1}), which a step plan cannot see; so the engine's state
// row carries the previous state and the two running sums as extra columns (ChainScheme):
//
//   z_j = [ x_j (d) | x_{j-1} (d) | B_j | F_j ]             width W = 2d + 2
//
// and the "model" of engine step j (ChainModel::field, called at z_j) returns
//
//   e_j = [ f(x_j, t_j) | x_j | |eta_{j-1}|^2 / 2 | |xi_j|^2 / 2 ]      (eta_{-1} term: 0)
//
// so one fused lincomb with per-column coefficients (ColumnCoeff) does the forward step on the
// x columns, moves x_j into the "previous" columns (coefficient 0 on z, 1 on e) and adds the
// two costs (coefficient 1 on z and e, no noise). Engine step N is cost-only: it evaluates
// f and s at x_N for eta_{N-1} and leaves x_N unchanged (x coefficient 1, drift 0, no noise),
// so the engine runs N + 1 steps. The loss on the final row is
// |x_N|^2 / 2 + d log(2 pi) / 2 + B - F, and everything, eta_{N-1} included, is
// differentiated by the engine's adjoint (ChainModel::vjp: the VJP of e_j w.r.t. z_j, one
// drift and one score VJP per step).
//
// Noise keying: xi_i of sample r, coordinate c is detail::gaussian(seed, i, (row_offset + r) W
// + c), c < d: the engine's rule for a state of width W (backend/lincomb_term.hpp), as for the
// SDE layer's cost columns; ChainModel::field regenerates it for the |xi_i|^2 / 2 column.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/gaussian_batch.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/diffflow/networks.hpp"
#include "diffgrad/diffflow/time_grid.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/sde/euler_maruyama.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad::diffflow {

struct LossOptions {
  std::uint64_t seed = 0;       ///< noise seed (xi_i keyed by (seed, i, global index))
  std::uint64_t row_offset = 0; ///< global index of the batch's first sample
  /// Where the adjoint gets the forward states from (store_all, checkpoint(s), recompute):
  /// the engine's modes, all giving the same bits.
  MemoryMode memory = MemoryMode::store_all();
  bool check_finite = true; ///< throw numerical_error on a NaN/Inf network output or state
};

/// Per-sample and batch-mean loss, and its parts (all batch means, nats).
struct LossValue {
  double loss = 0.0;          ///< mean_b L_b
  double prior_term = 0.0;    ///< mean of -log N(x_N; 0, I)
  double backward_term = 0.0; ///< mean of sum_i |eta_i|^2 / 2
  double forward_term = 0.0;  ///< mean of sum_i |xi_i|^2 / 2 (subtracted)
  /// loss + d sum_i log(g_{i+1} / g_i): in expectation an upper bound of the backward chain's
  /// NLL of the data (E[L] = KL(paths) + H(data) - d log(g_N / g_0)); equals loss for constant g
  double nll_bound = 0.0;
  Eigen::VectorXd per_sample; ///< L_b
};

template <class Vector, class State> struct Gradient {
  LossValue value;
  Vector drift;      ///< dL/dtheta_f (batch-mean loss)
  Vector score;      ///< dL/dtheta_s
  State x0;          ///< dL/dx_0
  GradientCost cost; ///< what the engine's adjoint did (model calls, VJPs, stored states)
};

namespace detail {

template <class State>
void check_state(const State& x, const char* where, const char* what, bool check_finite, int node) {
  if (check_finite && !x.allFinite())
    throw numerical_error(diffgrad::detail::concat(where, ": ", what,
                                                   ": expected finite values, got NaN or Inf at "
                                                   "node ",
                                                   node));
}

template <class Field, class State>
void eval(const Field& field, const State& x, double t, State& out, const char* where,
          const char* what, bool check_finite, int node) {
  field.velocity(x, t, out);
  if (out.rows() != x.rows() || out.cols() != x.cols())
    diffgrad::detail::throw_argument(
        where, what, diffgrad::detail::concat("an output of shape ", x.rows(), " x ", x.cols()),
        diffgrad::detail::concat(out.rows(), " x ", out.cols()));
  check_state(out, where, what, check_finite, node);
}

} // namespace detail

/// DiffFlow's training chain as a step-plan scheme on widened states [x | x_prev | B | F]
/// (header comment): N + 1 engine steps on the grid's N + 1 nodes plus one end node, every
/// coefficient a per-column diagonal precomputed here. Bound to its grid; validate() refuses
/// any other node span.
template <class Scalar> class ChainScheme {
public:
  using Backend = EigenBackend<Scalar>;

  ChainScheme(const Backend& backend, const Grid& grid, std::int64_t dim)
      : grid_(grid), dim_(dim), width_(2 * dim + 2) {
    const char* where = "diffflow::ChainScheme";
    grid_.validate(where);
    diffgrad::detail::require(dim >= 1, where, "dim", "a state dimension >= 1",
                              static_cast<double>(dim));
    const int n = grid_.steps();
    nodes_.reserve(static_cast<std::size_t>(n) + 2);
    for (double t : grid_.t) nodes_.push_back(Node{t, 1.0, 1.0, 0.0, t});
    // The cost-only step's end node: any later time (the model is never called there).
    const double end = grid_.t.back() + grid_.dt(n - 1);
    nodes_.push_back(Node{end, 1.0, 1.0, 0.0, end});
    const auto w = static_cast<std::size_t>(width_), d = static_cast<std::size_t>(dim);
    std::vector<double> decay(w * (static_cast<std::size_t>(n) + 1)), drift(decay.size()),
        noise(decay.size());
    for (int j = 0; j <= n; ++j) {
      const bool chain = j < n; // step N is cost-only
      const double dt = chain ? grid_.dt(j) : 0.0;
      const double s = chain ? grid_.g[static_cast<std::size_t>(j)] * std::sqrt(dt) : 0.0;
      for (std::size_t k = 0; k < w; ++k) {
        const std::size_t at = static_cast<std::size_t>(j) * w + k;
        const bool x_col = k < d, prev_col = k >= d && k < 2 * d;
        decay[at] = prev_col ? 0.0 : 1.0; // x_j stays, x_{j-1} is replaced, sums accumulate
        drift[at] = x_col ? dt : 1.0;     // f dt on x; x_j into prev; the costs
        noise[at] = x_col ? s : 0.0;
      }
    }
    decay_table_ = backend.make_coefficients(decay);
    drift_table_ = backend.make_coefficients(drift);
    noise_table_ = backend.make_coefficients(noise);
  }

  // The scheme interface of the engine (solvers/step_plan.hpp).
  int order() const { return 1; }
  int history() const { return 0; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  bool accepts_dim(std::int64_t w) const { return w == width_; }
  std::string dim_requirement() const {
    return diffgrad::detail::concat(width_, " (2 d + 2 = [x | x_prev | B | F] with d = ", dim_,
                                    ")");
  }
  void validate(std::span<const Node> nodes) const {
    if (nodes.size() != nodes_.size())
      diffgrad::detail::throw_argument(
          "diffflow::ChainScheme", "nodes",
          diffgrad::detail::concat("the chain's ", nodes_.size(), " nodes (scheme.nodes())"),
          nodes.size());
    for (std::size_t i = 0; i < nodes.size(); ++i)
      if (nodes[i].t != nodes_[i].t || nodes[i].model_t != nodes_[i].model_t)
        diffgrad::detail::throw_argument(
            "diffflow::ChainScheme", "nodes", "the chain's nodes (scheme.nodes())",
            diffgrad::detail::concat("nodes[", i, "] with t = ", nodes[i].t));
  }
  BasicStepPlan<ColumnCoeff> plan(std::span<const Node> nodes, int j, NodeAtLambda) const {
    const std::size_t row = static_cast<std::size_t>(j) * static_cast<std::size_t>(width_);
    BasicStepPlan<ColumnCoeff> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(j)];
    p.output.x = ColumnCoeff{Backend::coefficient_data(decay_table_) + row, 1.0};
    p.output.e[0] = ColumnCoeff{Backend::coefficient_data(drift_table_) + row, 1.0};
    if (j < chain_steps())
      p.noise = ColumnCoeff{Backend::coefficient_data(noise_table_) + row, 1.0};
    return p;
  }

  std::span<const Node> nodes() const { return nodes_; }
  // A forward-time chain has no log-SNR (the SDE layer's map: asking for a node throws).
  NodeAtLambda node_at_lambda() const { return NodeAtLambda(sde::detail::no_lambda_map()); }
  int num_steps() const { return grid_.steps() + 1; } ///< engine steps: N + the cost-only one
  int chain_steps() const { return grid_.steps(); }   ///< N
  const Grid& grid() const { return grid_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t width() const { return width_; }
  std::int64_t prev_column() const { return dim_; }
  std::int64_t backward_column() const { return 2 * dim_; }    ///< B: sum |eta_i|^2 / 2
  std::int64_t forward_column() const { return 2 * dim_ + 1; } ///< F: sum |xi_i|^2 / 2

  /// The grid index j of a model call's node (the step it starts).
  int step_of(const Node& n) const {
    const auto& t = grid_.t;
    const auto it = std::lower_bound(t.begin(), t.end(), n.t);
    if (it == t.end() || *it != n.t)
      throw std::logic_error(diffgrad::detail::concat(
          "diffgrad::diffflow: the chain's model was called at t = ", n.t, ", not a grid node"));
    return static_cast<int>(it - t.begin());
  }

  /// [x | 0 | 0 | 0]: the engine's initial row for data x (B x d).
  template <class State> void augment(const State& x, State& z) const {
    z.resize(x.rows(), width_);
    z.setZero();
    z.leftCols(dim_) = x;
  }

private:
  Grid grid_;
  std::int64_t dim_, width_;
  std::vector<Node> nodes_;
  typename Backend::coefficient_table decay_table_{}, drift_table_{}, noise_table_{};
};

/// The model of ChainScheme's steps: z_j -> e_j = [f_j | x_j | |eta_{j-1}|^2/2 | |xi_j|^2/2]
/// (field), and the VJP of that map (vjp), for run_scheme and discrete_adjoint. The VJP adds
/// the two networks' parameter cotangents into this object's grad_drift() and grad_score()
/// (zero at construction) rather than into the engine's one parameter vector: each network's
/// VJP accumulates straight into its own vector, with no per-call scratch to clear and copy.
template <TimeField Drift, TimeField Score> class ChainModel {
public:
  using State = typename Drift::state_type;
  using Vector = typename Drift::vector_type;
  using Scalar = typename State::Scalar;

  ChainModel(const ChainScheme<Scalar>& scheme, const Drift& drift, const Score& score,
             const LossOptions& options)
      : scheme_(scheme), drift_(drift), score_(score), options_(options),
        grad_drift_(Vector::Zero(drift.param_size())),
        grad_score_(Vector::Zero(score.param_size())) {}

  const Vector& grad_drift() const { return grad_drift_; }
  const Vector& grad_score() const { return grad_score_; }

  void field(const State& z, const Node& node, State& out) const {
    const char* where = "DiffFlow";
    const int j = scheme_.step_of(node), n = scheme_.chain_steps();
    const std::int64_t d = scheme_.dim();
    const double t = node.t;
    x_ = z.leftCols(d);
    detail::check_state(x_, where, "state", options_.check_finite, j);
    detail::eval(drift_, x_, t, f_, where, "drift output", options_.check_finite, j);
    out.resize(z.rows(), scheme_.width());
    out.leftCols(d) = f_;
    out.middleCols(d, d) = x_;
    if (j > 0) {
      eta(z, j);
      out.col(scheme_.backward_column()) = Scalar(0.5) * eta_.rowwise().squaredNorm();
    } else {
      out.col(scheme_.backward_column()).setZero();
    }
    if (j < n) {
      noise(j, z.rows());
      out.col(scheme_.forward_column()) = Scalar(0.5) * xi_.rowwise().squaredNorm();
    } else {
      out.col(scheme_.forward_column()).setZero();
    }
  }

  void vjp(const State& z, const Node& node, const State& cot, State& dz) const {
    const int j = scheme_.step_of(node);
    const std::int64_t d = scheme_.dim();
    const double t = node.t;
    x_ = z.leftCols(d);
    cot_f_ = cot.leftCols(d); // the forward step's cotangent of f_j (already times dt_j)
    dz.resize(z.rows(), scheme_.width());
    dz.rightCols(2).setZero(); // e_j does not read the running sums
    if (j > 0) {
      detail::eval(drift_, x_, t, f_, "DiffFlow::gradient", "drift output", false, j);
      eta(z, j); // also leaves s_ = s(x_j, t_j)
      const auto i = static_cast<std::size_t>(j) - 1;
      const double dt = scheme_.grid().dt(j - 1), g1 = scheme_.grid().g[i + 1];
      // u = d(|eta|^2 / 2)/d(numerator of eta) scaled by the cotangent of the B column.
      u_ = (eta_.array().colwise() *
            (cot.col(scheme_.backward_column()).array() * Scalar(1.0 / (g1 * std::sqrt(dt)))))
               .matrix();
      cot_f_.noalias() += Scalar(dt) * u_;
      cot_s_.noalias() = Scalar(-g1 * g1 * dt) * u_;
      score_.velocity_vjp(x_, t, cot_s_, dx_s_, nullptr, &grad_score_);
      dz.middleCols(d, d) = u_;
    } else {
      dz.middleCols(d, d).setZero();
    }
    drift_.velocity_vjp(x_, t, cot_f_, dx_f_, nullptr, &grad_drift_);
    dz.leftCols(d) = dx_f_ + cot.middleCols(d, d);
    if (j > 0) dz.leftCols(d) += dx_s_ - u_;
  }

private:
  // eta_{j-1} = (x_{j-1} - x_j + dt (f_j - g_j^2 s_j)) / (g_j sqrt(dt)), f_ = f_j already.
  void eta(const State& z, int j) const {
    const std::int64_t d = scheme_.dim();
    const auto i = static_cast<std::size_t>(j) - 1;
    const double dt = scheme_.grid().dt(j - 1), g1 = scheme_.grid().g[i + 1];
    detail::eval(score_, x_, scheme_.grid().t[i + 1], s_, "DiffFlow", "score output",
                 options_.check_finite, j);
    eta_.noalias() = Scalar(1.0 / (g1 * std::sqrt(dt))) *
                     (z.middleCols(d, d) - x_ + Scalar(dt) * (f_ - Scalar(g1 * g1) * s_));
  }

  // xi_j exactly as the engine adds it to the x columns (width-W indexing): the whole B x W
  // block of step j in one call of the SIMD generator (contiguous indices from row_offset W),
  // then the first d columns of each row; per-row calls of d elements take the scalar path and
  // cost more than the W - d unused draws.
  void noise(int j, std::int64_t rows) const {
    const std::int64_t d = scheme_.dim(), w = scheme_.width();
    xi_.resize(rows, d);
    row_.resize(static_cast<std::size_t>(rows * w));
    diffgrad::detail::gaussian_range(options_.seed, static_cast<std::uint64_t>(j),
                                     options_.row_offset * static_cast<std::uint64_t>(w),
                                     row_.size(), row_.data());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < d; ++c)
        xi_(r, c) = static_cast<Scalar>(row_[static_cast<std::size_t>(r * w + c)]);
  }

  const ChainScheme<Scalar>& scheme_;
  const Drift& drift_;
  const Score& score_;
  LossOptions options_;
  mutable State x_, f_, s_, eta_, xi_, u_, cot_f_, cot_s_, dx_f_, dx_s_;
  mutable std::vector<double> row_;
  mutable Vector grad_drift_, grad_score_;
};

/// The buffers of gradient calls: the engine's GradientWorkspace (rebuilt only when the step
/// count, batch, width or memory mode changes) and the widened initial state.
/// The engine stores states, never noise: stored_state_buffers() is the number of W-wide
/// state buffers its snapshots may use (N + 1 engine steps: N under store_all; a fixed number
/// under checkpoint(s), whatever N).
template <class Scalar> struct Workspace {
  using Backend = EigenBackend<Scalar>;
  using State = typename Backend::state_type;
  std::optional<GradientWorkspace<Backend>> engine;
  State z0;
  int stored_state_buffers() const { return engine ? engine->snapshot_buffers() : 0; }

  GradientWorkspace<Backend>& prepare(const Backend& backend, int steps, std::int64_t batch,
                                      std::int64_t width, const GradientOptions& options) {
    const int snaps = options.memory.snapshots_for(steps);
    if (!engine || engine->num_steps() != steps || engine->batch() != batch ||
        engine->dim() != width || key_kind_ != options.memory.kind() || key_snapshots_ != snaps) {
      engine.reset();
      engine.emplace(backend, 0, 1, steps, batch, width, 0, 0, options);
      key_kind_ = options.memory.kind();
      key_snapshots_ = snaps;
    }
    return *engine;
  }

private:
  MemoryMode::Kind key_kind_ = MemoryMode::Kind::store_all;
  int key_snapshots_ = -1;
};

/// The DiffFlow loss and its exact discrete gradient for one batch on one grid, on the
/// library's engine (ChainScheme + ChainModel; run_scheme for the loss, discrete_adjoint for
/// the gradient).
template <TimeField Drift, TimeField Score> class DiffFlow {
public:
  using State = typename Drift::state_type;
  using Vector = typename Drift::vector_type;
  using Scalar = typename State::Scalar;
  using Backend = EigenBackend<Scalar>;
  static_assert(std::is_same_v<State, typename Score::state_type>,
                "DiffFlow: drift and score must share the state type");
  static_assert(std::is_same_v<Vector, typename Score::vector_type>,
                "DiffFlow: drift and score must share the parameter vector type");
  static_assert(std::is_same_v<State, typename Backend::state_type>,
                "DiffFlow: the networks' state must be the EigenBackend's row-major state");

  DiffFlow(Drift& drift, Score& score) : drift_(drift), score_(score) {}

  Drift& drift() { return drift_; }
  Score& score() { return score_; }

  /// The loss of the batch x0 (B x d) on `grid` (forward pass only; keeps nothing).
  LossValue loss(const Grid& grid, const State& x0, const LossOptions& options = {}) {
    const char* where = "DiffFlow";
    check_inputs(grid, x0, where);
    const ChainScheme<Scalar> scheme(backend_, grid, x0.cols());
    return value_of(scheme, grid, run_chain(scheme, x0, options));
  }

  /// The loss and its exact gradient w.r.t. both networks' parameters and x_0.
  Gradient<Vector, State> gradient(const Grid& grid, const State& x0, const LossOptions& options,
                                   Workspace<Scalar>& ws) {
    const char* where = "DiffFlow::gradient";
    check_inputs(grid, x0, where);
    const ChainScheme<Scalar> scheme(backend_, grid, x0.cols());
    const ChainModel<Drift, Score> model(scheme, drift_, score_, options);
    GradientOptions go;
    go.memory = options.memory;
    go.wrt_params = false; // the chain model keeps the two networks' parameter gradients
    go.seed = options.seed;
    go.row_offset = options.row_offset;
    go.check_finite = options.check_finite;
    scheme.augment(x0, ws.z0);
    auto& engine = ws.prepare(backend_, scheme.num_steps(), x0.rows(), scheme.width(), go);
    Gradient<Vector, State> out;
    const auto loss = [&](const Backend&, const State& z, State& grad) {
      out.value = value_of(scheme, grid, z);
      const std::int64_t d = scheme.dim();
      const Scalar inv_b = Scalar(1.0 / static_cast<double>(z.rows()));
      grad.setZero();
      grad.leftCols(d) = inv_b * z.leftCols(d);
      grad.col(scheme.backward_column()).setConstant(inv_b);
      grad.col(scheme.forward_column()).setConstant(-inv_b);
      return out.value.loss;
    };
    const auto& r = discrete_adjoint(
        scheme, backend_, scheme.nodes(), scheme.node_at_lambda(),
        [&](const State& u, const Node& n, State& o) { model.field(u, n, o); },
        [&](const State& u, const Node& n, const State& a, State& dx, Vector*, Vector*) {
          model.vjp(u, n, a, dx);
        },
        ws.z0, loss, go, engine);
    out.drift = model.grad_drift();
    out.score = model.grad_score();
    if (options.check_finite && !(out.drift.allFinite() && out.score.allFinite()))
      throw numerical_error(
          "DiffFlow::gradient: the parameter gradient is not finite (NaN or Inf)");
    out.x0 = r.grad_x.leftCols(x0.cols());
    out.cost = r.cost;
    return out;
  }

  /// Runs the forward chain only (x_0 -> x_N, the "encoding"), with the loss's noise.
  State encode(const Grid& grid, const State& x0, const LossOptions& options = {}) {
    const char* where = "DiffFlow::encode";
    check_inputs(grid, x0, where);
    const ChainScheme<Scalar> scheme(backend_, grid, x0.cols());
    return run_chain(scheme, x0, options).leftCols(x0.cols());
  }

private:
  /// The forward chain on the engine: the final widened row [x_N | x_N | B | F] from x0.
  State run_chain(const ChainScheme<Scalar>& scheme, const State& x0,
                  const LossOptions& options) {
    const ChainModel<Drift, Score> model(scheme, drift_, score_, options);
    State z;
    scheme.augment(x0, z);
    SamplerWorkspace<Backend> ws(backend_, 0, 1, z.rows(), z.cols());
    run_scheme(
        scheme, backend_, scheme.nodes(), scheme.node_at_lambda(),
        [&](const State& u, const Node& n, State& out) { model.field(u, n, out); }, z, ws,
        diffgrad::SampleOptions{.seed = options.seed,
                                .row_offset = options.row_offset,
                                .check_finite = options.check_finite});
    return z;
  }

  static void check_inputs(const Grid& grid, const State& x0, const char* where) {
    grid.validate(where);
    if (x0.rows() < 1 || x0.cols() < 1)
      diffgrad::detail::throw_argument(where, "x0", "a non-empty B x d batch",
                                       diffgrad::detail::concat(x0.rows(), " x ", x0.cols()));
    detail::check_state(x0, where, "x0", true, 0);
  }

  /// The loss and its parts from the engine's final row [x_N | x_N | B | F].
  static LossValue value_of(const ChainScheme<Scalar>& scheme, const Grid& grid, const State& z) {
    const std::int64_t dim = scheme.dim();
    const double d = static_cast<double>(dim);
    const Eigen::VectorXd prior =
        (0.5 * z.leftCols(dim).template cast<double>().rowwise().squaredNorm().array() +
         0.5 * d * std::log(2.0 * std::numbers::pi))
            .matrix();
    const Eigen::VectorXd back = z.col(scheme.backward_column()).template cast<double>();
    const Eigen::VectorXd fwd = z.col(scheme.forward_column()).template cast<double>();
    LossValue v;
    v.per_sample = prior + back - fwd;
    v.loss = v.per_sample.mean();
    v.prior_term = prior.mean();
    v.backward_term = back.mean();
    v.forward_term = fwd.mean();
    v.nll_bound = v.loss + d * std::log(grid.g.back() / grid.g.front());
    return v;
  }

  Drift& drift_;
  Score& score_;
  Backend backend_;
};

struct SampleOptions {
  /// lambda of the marginal-preserving family dx = [f - (1 + lambda^2)/2 g^2 s] dt + lambda g dW:
  /// 1 is the backward chain (the loss's model), 0 the probability-flow ODE (Euler).
  double stochasticity = 1.0;
  bool final_noise = false; ///< add noise on the last step (t_1 -> t_0); the reference
                            ///< implementation's sampler returns the mean there
  std::uint64_t seed = 0;   ///< noise keyed by (seed, N + i, global index): never the
                            ///< loss's streams 0..N-1 for the same seed
  std::uint64_t row_offset = 0;
  bool check_finite = true;
};

/// Euler(-Maruyama) from x_N (in x) down to x_0 on `grid`:
///   x_i = x_{i+1} - dt_i [f - (1 + lambda^2)/2 g_{i+1}^2 s](x_{i+1}, t_{i+1})
///         + lambda g_{i+1} sqrt(dt_i) xi_i.
template <TimeField Drift, TimeField Score>
void sample(const Drift& drift, const Score& score, const Grid& grid, typename Drift::state_type& x,
            const SampleOptions& options = {}) {
  using State = typename Drift::state_type;
  using Scalar = typename State::Scalar;
  const char* where = "diffflow::sample";
  grid.validate(where);
  diffgrad::detail::require(options.stochasticity >= 0.0 && std::isfinite(options.stochasticity),
                            where, "options.stochasticity", "a finite value >= 0",
                            options.stochasticity);
  const EigenBackend<Scalar> backend;
  State f, s, xi;
  const int n = grid.steps();
  const double lam = options.stochasticity;
  for (int i = n - 1; i >= 0; --i) {
    const double dt = grid.dt(i), g = grid.g[static_cast<std::size_t>(i) + 1];
    const double t = grid.t[static_cast<std::size_t>(i) + 1];
    detail::eval(drift, x, t, f, where, "drift output", options.check_finite, i + 1);
    detail::eval(score, x, t, s, where, "score output", options.check_finite, i + 1);
    const double noise = (i > 0 || options.final_noise) ? lam * g * std::sqrt(dt) : 0.0;
    if (noise != 0.0) {
      xi.resize(x.rows(), x.cols());
      backend.lincomb(xi, NoiseTerm{1.0, options.seed,
                                    static_cast<std::uint64_t>(n) + static_cast<std::uint64_t>(i),
                                    options.row_offset});
      backend.lincomb(x, term(1.0, x), term(-dt, f), term(0.5 * (1.0 + lam * lam) * g * g * dt, s),
                      term(noise, xi));
    } else {
      backend.lincomb(x, term(1.0, x), term(-dt, f), term(0.5 * (1.0 + lam * lam) * g * g * dt, s));
    }
    detail::check_state(x, where, "state", options.check_finite, i);
  }
}

} // namespace diffgrad::diffflow
