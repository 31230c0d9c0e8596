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
// The xi term does not depend on theta or x_0 for fixed noise; it makes E[L] - H(data) the KL
// between the path measures (exactly so when g_{i+1} = g_i).
//
// Gradient (the stochastic adjoint): the forward pass keeps the states x_0..x_N (or every k-th
// of them, see LossOptions::checkpoint_every), never the noise; the backward pass walks
// i = N-1..0, recomputes eta_i from (x_i, x_{i+1}) (the running loss couples the two states),
// and propagates the exact discrete adjoint of the forward chain. Segments between checkpoints
// are recomputed with the noise regenerated from the counter-based generator (seed, step i,
// global element index), so every memory mode gives the same bits.
//
// Noise keying: xi_i of sample r, coordinate c is detail::gaussian(seed, i, (row_offset + r) d
// + c), the library's rule for every stochastic step (backend/lincomb_term.hpp).
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <utility>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/diffflow/networks.hpp"
#include "diffgrad/diffflow/time_grid.hpp"

namespace diffgrad::diffflow {

struct LossOptions {
  std::uint64_t seed = 0;       ///< noise seed (xi_i keyed by (seed, i, global index))
  std::uint64_t row_offset = 0; ///< global index of the batch's first sample
  int checkpoint_every = 1;     ///< k: keep x_i for i % k == 0 (and x_N); 1 keeps every state
  bool check_finite = true;     ///< throw numerical_error on a NaN/Inf network output or state
};

/// Per-sample and batch-mean loss, and its parts (all batch means, nats).
struct LossValue {
  double loss = 0.0;           ///< mean_b L_b
  double prior_term = 0.0;     ///< mean of -log N(x_N; 0, I)
  double backward_term = 0.0;  ///< mean of sum_i |eta_i|^2 / 2
  double forward_term = 0.0;   ///< mean of sum_i |xi_i|^2 / 2 (subtracted)
  /// loss + d sum_i log(g_{i+1} / g_i): in expectation an upper bound of the backward chain's
  /// NLL of the data (E[L] = KL(paths) + H(data) - d log(g_N / g_0)); equals loss for constant g
  double nll_bound = 0.0;
  Eigen::VectorXd per_sample;  ///< L_b
};

/// The buffers of one loss/gradient call. Sized on first use and reused; bytes() counts what
/// the chain holds: the kept states (N + 1 with checkpoint_every = 1), the recomputed
/// segment, and a fixed number of B x d work states, never anything of size N for the noise.
template <class Scalar> struct Workspace {
  using State = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<State> kept;     ///< x_{jk}, j = 0.., then x_N last
  std::vector<State> segment;  ///< recomputed states of one segment
  State f_cur, f_next, s_next, xi, eta, u, adj_next, adj_partial, cot_f, cot_s, dx_f, dx_s;

  std::size_t states_held() const {
    std::size_t n = 0;
    for (const auto& s : kept) n += static_cast<std::size_t>(s.size());
    for (const auto& s : segment) n += static_cast<std::size_t>(s.size());
    for (const State* s : {&f_cur, &f_next, &s_next, &xi, &eta, &u, &adj_next, &adj_partial,
                           &cot_f, &cot_s, &dx_f, &dx_s})
      n += static_cast<std::size_t>(s->size());
    return n;
  }
  std::size_t bytes() const { return states_held() * sizeof(Scalar); }
};

template <class Vector, class State> struct Gradient {
  LossValue value;
  Vector drift; ///< dL/dtheta_f (batch-mean loss)
  Vector score; ///< dL/dtheta_s
  State x0;     ///< dL/dx_0
};

namespace detail {

inline void check_options(const LossOptions& o, const char* where) {
  diffgrad::detail::require(o.checkpoint_every >= 1, where, "options.checkpoint_every",
                            "at least 1 (1 keeps every state)", o.checkpoint_every);
}

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
    diffgrad::detail::throw_argument(where, what,
                                     diffgrad::detail::concat("an output of shape ", x.rows(),
                                                              " x ", x.cols()),
                                     diffgrad::detail::concat(out.rows(), " x ", out.cols()));
  check_state(out, where, what, check_finite, node);
}

} // namespace detail

/// The DiffFlow loss and its exact discrete gradient for one batch on one grid.
template <TimeField Drift, TimeField Score> class DiffFlow {
public:
  using State = typename Drift::state_type;
  using Vector = typename Drift::vector_type;
  using Scalar = typename State::Scalar;
  static_assert(std::is_same_v<State, typename Score::state_type>,
                "DiffFlow: drift and score must share the state type");
  static_assert(std::is_same_v<Vector, typename Score::vector_type>,
                "DiffFlow: drift and score must share the parameter vector type");

  DiffFlow(Drift& drift, Score& score) : drift_(drift), score_(score) {}

  Drift& drift() { return drift_; }
  Score& score() { return score_; }

  /// The loss of the batch x0 (B x d) on `grid` (forward pass only; keeps nothing).
  LossValue loss(const Grid& grid, const State& x0, const LossOptions& options = {}) {
    return run_forward(grid, x0, options, nullptr);
  }

  /// The loss and its exact gradient w.r.t. both networks' parameters and x_0.
  Gradient<Vector, State> gradient(const Grid& grid, const State& x0,
                                   const LossOptions& options, Workspace<Scalar>& ws) {
    const char* where = "DiffFlow::gradient";
    Gradient<Vector, State> out;
    out.value = run_forward(grid, x0, options, &ws);
    out.drift = Vector::Zero(drift_.param_size());
    out.score = Vector::Zero(score_.param_size());
    const int n = grid.steps();
    const int k = options.checkpoint_every;
    const auto batch = x0.rows();
    const Scalar inv_b = Scalar(1.0 / static_cast<double>(batch));
    // a_N = d(-log N(x_N; 0, I))/dx_N / B = x_N / B.
    ws.adj_partial = inv_b * ws.kept.back();
    int segment_start = -1;
    const auto state = [&](int j) -> const State& {
      if (k == 1) return ws.kept[static_cast<std::size_t>(j)];
      if (j == n) return ws.kept.back();
      return ws.segment[static_cast<std::size_t>(j - segment_start)];
    };
    for (int i = n - 1; i >= 0; --i) {
      if (k > 1 && (segment_start < 0 || i < segment_start)) {
        segment_start = (i / k) * k;
        recompute_segment(grid, options, ws, segment_start, std::min(segment_start + k, n));
      }
      const State& xi_state = state(i);
      const State& x_next = state(i + 1);
      const double dt = grid.dt(i), sdt = std::sqrt(dt);
      const double g1 = grid.g[static_cast<std::size_t>(i) + 1];
      const double t1 = grid.t[static_cast<std::size_t>(i) + 1];
      detail::eval(drift_, x_next, t1, ws.f_next, where, "drift output", options.check_finite, i + 1);
      detail::eval(score_, x_next, t1, ws.s_next, where, "score output", options.check_finite, i + 1);
      // u = d(|eta|^2/2)/d(numerator) / B = eta / (g sqrt(dt)) / B.
      const double c = 1.0 / (g1 * sdt);
      ws.u.noalias() = Scalar(c * c) * (xi_state - x_next + Scalar(dt) * (ws.f_next - Scalar(g1 * g1) * ws.s_next));
      ws.u *= inv_b;
      // Node i+1: the drift enters eta_i (dt u) and, for i + 1 < N, forward step i+1
      // (dt_{i+1} a_{i+2}); one VJP carries both cotangents.
      if (i + 1 < n)
        ws.cot_f.noalias() = Scalar(dt) * ws.u + Scalar(grid.dt(i + 1)) * ws.adj_next;
      else
        ws.cot_f.noalias() = Scalar(dt) * ws.u;
      ws.cot_s.noalias() = Scalar(-g1 * g1 * dt) * ws.u;
      drift_.velocity_vjp(x_next, t1, ws.cot_f, ws.dx_f, nullptr, &out.drift);
      score_.velocity_vjp(x_next, t1, ws.cot_s, ws.dx_s, nullptr, &out.score);
      // a_{i+1} complete; a_i partial = a_{i+1} (identity part of step i) + u.
      ws.adj_next.noalias() = ws.adj_partial - ws.u + ws.dx_f + ws.dx_s;
      ws.adj_partial.noalias() = ws.adj_next + ws.u;
    }
    // Node 0: forward step 0's drift.
    ws.cot_f.noalias() = Scalar(grid.dt(0)) * ws.adj_next;
    drift_.velocity_vjp(state(0), grid.t[0], ws.cot_f, ws.dx_f, nullptr, &out.drift);
    out.x0 = ws.adj_partial + ws.dx_f;
    return out;
  }

  /// Runs the forward chain only (x_0 -> x_N, the "encoding"), with the loss's noise.
  State encode(const Grid& grid, const State& x0, const LossOptions& options = {}) {
    Workspace<Scalar> ws;
    LossOptions o = options;
    o.checkpoint_every = std::max(1, grid.steps());
    run_forward(grid, x0, o, &ws);
    return ws.kept.back();
  }

private:
  /// Forward chain + loss. With ws, keeps x_{jk} and x_N in ws.kept.
  LossValue run_forward(const Grid& grid, const State& x0, const LossOptions& options,
                        Workspace<Scalar>* ws) {
    const char* where = "DiffFlow";
    grid.validate(where);
    detail::check_options(options, where);
    if (x0.rows() < 1 || x0.cols() < 1)
      diffgrad::detail::throw_argument(where, "x0", "a non-empty B x d batch",
                                       diffgrad::detail::concat(x0.rows(), " x ", x0.cols()));
    detail::check_state(x0, where, "x0", true, 0);
    Workspace<Scalar> local;
    Workspace<Scalar>& w = ws ? *ws : local;
    const int n = grid.steps();
    const int k = options.checkpoint_every;
    const auto batch = x0.rows(), dim = x0.cols();
    if (ws) {
      const std::size_t kept = static_cast<std::size_t>((n + k - 1) / k) + 1; // x_{jk} < N, x_N
      w.kept.resize(kept);
      for (auto& s : w.kept) s.resize(batch, dim);
      w.segment.resize(k > 1 ? static_cast<std::size_t>(k) + 1 : 0);
      for (auto& s : w.segment) s.resize(batch, dim);
    }
    LossValue v;
    Eigen::VectorXd back = Eigen::VectorXd::Zero(batch), fwd = Eigen::VectorXd::Zero(batch);
    State x = x0, x_next(batch, dim);
    detail::eval(drift_, x, grid.t[0], w.f_cur, where, "drift output", options.check_finite, 0);
    for (int i = 0; i < n; ++i) {
      if (ws && i % k == 0) w.kept[static_cast<std::size_t>(i / k)] = x;
      forward_step(grid, options, i, x, w.f_cur, w.xi, x_next);
      fwd += 0.5 * w.xi.template cast<double>().rowwise().squaredNorm();
      detail::check_state(x_next, where, "forward state", options.check_finite, i + 1);
      const double dt = grid.dt(i), g1 = grid.g[static_cast<std::size_t>(i) + 1];
      const double t1 = grid.t[static_cast<std::size_t>(i) + 1];
      detail::eval(drift_, x_next, t1, w.f_next, where, "drift output", options.check_finite, i + 1);
      detail::eval(score_, x_next, t1, w.s_next, where, "score output", options.check_finite, i + 1);
      w.eta.noalias() = Scalar(1.0 / (g1 * std::sqrt(dt))) *
                        (x - x_next + Scalar(dt) * (w.f_next - Scalar(g1 * g1) * w.s_next));
      back += 0.5 * w.eta.template cast<double>().rowwise().squaredNorm();
      std::swap(x, x_next);
      std::swap(w.f_cur, w.f_next);
    }
    if (ws) w.kept.back() = x;
    const double d = static_cast<double>(dim);
    const Eigen::VectorXd prior =
        (0.5 * x.template cast<double>().rowwise().squaredNorm().array() +
         0.5 * d * std::log(2.0 * std::numbers::pi))
            .matrix();
    v.per_sample = prior + back - fwd;
    v.loss = v.per_sample.mean();
    v.prior_term = prior.mean();
    v.backward_term = back.mean();
    v.forward_term = fwd.mean();
    v.nll_bound = v.loss + d * std::log(grid.g.back() / grid.g.front());
    return v;
  }

  /// x_next = x + f dt + g_i sqrt(dt) xi_i, xi_i drawn into `xi` (keyed by (seed, i, index)).
  void forward_step(const Grid& grid, const LossOptions& options, int i, const State& x,
                    const State& f, State& xi, State& x_next) const {
    const double dt = grid.dt(i);
    xi.resize(x.rows(), x.cols());
    backend_.lincomb(xi, NoiseTerm{1.0, options.seed, static_cast<std::uint64_t>(i),
                                   options.row_offset});
    backend_.lincomb(x_next, term(1.0, x), term(dt, f),
                     term(grid.g[static_cast<std::size_t>(i)] * std::sqrt(dt), xi));
  }

  /// ws.segment[j - begin] = x_j for j = begin..end, from the kept x_begin, regenerating the
  /// noise: the same operations as the forward pass, so the same bits.
  void recompute_segment(const Grid& grid, const LossOptions& options, Workspace<Scalar>& ws,
                         int begin, int end) {
    const int k = options.checkpoint_every;
    ws.segment[0] = ws.kept[static_cast<std::size_t>(begin / k)];
    for (int j = begin; j < end; ++j) {
      const auto s = static_cast<std::size_t>(j - begin);
      detail::eval(drift_, ws.segment[s], grid.t[static_cast<std::size_t>(j)], ws.f_cur,
                   "DiffFlow::gradient", "drift output", options.check_finite, j);
      forward_step(grid, options, j, ws.segment[s], ws.f_cur, ws.xi, ws.segment[s + 1]);
    }
  }

  Drift& drift_;
  Score& score_;
  EigenBackend<Scalar> backend_;
};

struct SampleOptions {
  /// lambda of the marginal-preserving family dx = [f - (1 + lambda^2)/2 g^2 s] dt + lambda g dW:
  /// 1 is the backward chain (the loss's model), 0 the probability-flow ODE (Euler).
  double stochasticity = 1.0;
  bool final_noise = false;     ///< add noise on the last step (t_1 -> t_0); the reference
                                ///< implementation's sampler returns the mean there
  std::uint64_t seed = 0;       ///< noise keyed by (seed, N + i, global index): never the
                                ///< loss's streams 0..N-1 for the same seed
  std::uint64_t row_offset = 0;
  bool check_finite = true;
};

/// Euler(-Maruyama) from x_N (in x) down to x_0 on `grid`:
///   x_i = x_{i+1} - dt_i [f - (1 + lambda^2)/2 g_{i+1}^2 s](x_{i+1}, t_{i+1})
///         + lambda g_{i+1} sqrt(dt_i) xi_i.
template <TimeField Drift, TimeField Score>
void sample(const Drift& drift, const Score& score, const Grid& grid,
            typename Drift::state_type& x, const SampleOptions& options = {}) {
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
