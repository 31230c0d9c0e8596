#pragma once
// gDDIM samplers for the critically-damped Langevin diffusion (CLD): block step plans.
//
// A state row is [x (d) | v (d)] and every coefficient is a 2x2 block acting on each (x_k, v_k)
// pair (Block2, backend/coefficient.hpp), so the samplers run through the library's engine
// (run_scheme / sample) and exact discrete adjoint (gradient / discrete_adjoint) unchanged.
// The scheme is bound to its CldSchedule and time grid t_0 > t_1 > ... at construction, where
// every step's blocks are computed (closed forms and quadratures of gddim/cld_schedule.hpp);
// plan(i) only copies a precomputed plan. The math is in docs/gddim.md, section 6.
//
//   exponential (gDDIM), order q, stochasticity 0:
//     u_{i+1} = Psi(t_{i+1}, t_i) u_i + sum_{j < q_i} C_ij eps(u_{i-j}, t_{i-j}),
//     q_i = min(q, i + 1), C_ij from CldSchedule::multistep_coefficients (they sum to C(t, s)).
//   exponential, stochasticity l > 0 (q = 1):
//     u_{i+1} = Psi u_i + (Psi_hat - Psi) K_i eps + chol(P) xi   (K = R_t, or L_t: see below).
//   euler (PF-ODE Euler for l = 0, Euler-Maruyama on the l-family reverse SDE for l > 0, q = 1):
//     u_{i+1} = (I + h F) u_i + h (1 + l^2)/2 G G^T K^{-T} eps + l sqrt(|h|) G xi,  h = t_{i+1} -
//     t_i.
//   parameterisation: R (gDDIM's R_t, default: exact for one data point) or cholesky (K = L_t =
//     chol(Sigma_t), the CLD paper's; score = -K^{-T} eps in both).
//   denoise: the official final step at delta = t_min (Euler on the reverse-SDE drift, no
//     noise): u_0 = (I - delta F_delta) u - delta G G^T K_delta^{-T} eps, as one extra node t = 0.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/cld_schedule.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad::gddim {

/// How a step integrates: gDDIM's exponential integrator, or the Euler / Euler-Maruyama baseline.
/// (`gddim` is another name for `exponential`, as BdmMethod spells it.)
enum class CldMethod { exponential, gddim = exponential, euler };

/// Which square root K_t (K K^T = Sigma_t) the network's eps is defined with: score = -K^{-T} eps.
enum class CldParameterisation {
  R,       ///< gDDIM's R_t (CldSchedule::sqrt_covariance): exact for one data point
  cholesky ///< L_t = chol(Sigma_t), the CLD paper's: not exact (docs/gddim.md)
};

struct CldGddimOptions {
  int order = 1;              ///< q = 1..3: Adams-Bashforth on eps in t (exponential, l = 0 only)
  double stochasticity = 0.0; ///< l in [0, 1]: 0 the PF-ODE, 1 the reverse SDE (q = 1 for l > 0)
  /// The network is called with model_t = model_time_scale * t (the official CLD code: 999).
  double model_time_scale = 999.0;
  CldMethod method = CldMethod::exponential;
  CldParameterisation parameterisation = CldParameterisation::R; ///< (order 1 for cholesky)
  /// Append the official final denoising step from the last grid time delta = t_min to t = 0.
  bool denoise = false;
};

/// A Mat2 block as the engine's Block2 coefficient.
inline Block2 to_block(const Mat2& a) { return {a(0, 0), a(0, 1), a(1, 0), a(1, 1)}; }

/// The official CLD grid, quadratic in t: t_i = (sqrt(T) + i/N (sqrt(t_min) - sqrt(T)))^2,
/// i = 0..N, from T = schedule.t_max() down to t_min (the last time is t_min exactly).
inline std::vector<double> cld_quadratic_grid(const CldSchedule& schedule, int steps,
                                              double t_min = 1e-3) {
  const char* where = "gddim::cld_quadratic_grid";
  diffgrad::detail::require(steps >= 1, where, "steps", "at least 1 step", steps);
  diffgrad::detail::require(std::isfinite(t_min) && t_min > 0 && t_min < schedule.t_max(), where,
                            "t_min", "a time in (0, t_max)", t_min);
  const double a = std::sqrt(schedule.t_max()), b = std::sqrt(t_min);
  std::vector<double> t(static_cast<std::size_t>(steps) + 1);
  for (int i = 0; i <= steps; ++i) {
    const double r = a + (static_cast<double>(i) / steps) * (b - a);
    t[static_cast<std::size_t>(i)] = r * r;
  }
  t.front() = schedule.t_max();
  t.back() = t_min;
  return t;
}

/// CldParams::initial_angle for a network trained with its own R table: given the table's
/// value R_t at one time t (e.g. R_0 at t = 0), the angle theta_0 such that this library's R
/// (R_t = chol(Sigma_t) Q(theta_t), rotation fixed by the R ODE) passes through it. R_t must
/// satisfy R R^T = Sigma_t (relative Frobenius 1e-6, so float32 tables pass) and
/// chol(Sigma_t)^{-1} R_t must be a rotation (det > 0), not a reflection, which no angle reaches.
/// Returns the angle in [-pi, pi].
inline double cld_initial_angle(const CldParams& params, double t, const Mat2& r_t) {
  const char* where = "gddim::cld_initial_angle";
  CldParams p = params;
  p.initial_angle = 0.0;
  const CldSchedule zero(p); // validates params and t's range below
  const Mat2 sigma = zero.covariance(t);
  const double mismatch = (r_t * r_t.transpose() - sigma).norm() / sigma.norm();
  diffgrad::detail::require(mismatch <= 1e-6, where, "r_t",
                            "a square root of Sigma_t (R R^T = Sigma_t to 1e-6 relative)",
                            mismatch);
  const Mat2 q = CldSchedule::inverse(CldSchedule::cholesky(sigma)) * r_t;
  const double det = q(0, 0) * q(1, 1) - q(0, 1) * q(1, 0);
  diffgrad::detail::require(det > 0, where, "r_t",
                            "det R > 0 (L^{-1} R a rotation, not a reflection)", det);
  // Angles are defined modulo 2 pi; return the representative in [-pi, pi].
  return std::remainder(std::atan2(q(1, 0), q(0, 0)) - zero.rotation_angle(t),
                        2.0 * 3.141592653589793238462643383279502884);
}

/// gDDIM (and its Euler baselines) on CLD as a block scheme for run_scheme / sample /
/// gradient. Immutable after construction; thread-safe.
class CldGddim {
public:
  CldGddim(const CldSchedule& schedule, std::vector<double> times,
           const CldGddimOptions& options = {})
      : schedule_(schedule), times_(std::move(times)), opt_(options) {
    const char* where = "gddim::CldGddim";
    using diffgrad::detail::require;
    require(opt_.order >= 1 && opt_.order <= 3, where, "order", "an order q in 1..3", opt_.order);
    require(std::isfinite(opt_.stochasticity) && opt_.stochasticity >= 0 && opt_.stochasticity <= 1,
            where, "stochasticity", "a number in [0, 1]", opt_.stochasticity);
    require(std::isfinite(opt_.model_time_scale) && opt_.model_time_scale > 0, where,
            "model_time_scale", "a positive finite number", opt_.model_time_scale);
    if (opt_.order > 1) {
      require(opt_.stochasticity == 0, where, "order",
              "order 1 for a stochastic sampler (stochasticity > 0)", opt_.order);
      require(opt_.method == CldMethod::exponential, where, "order",
              "order 1 for the Euler baseline", opt_.order);
      require(opt_.parameterisation == CldParameterisation::R, where, "order",
              "order 1 for the Cholesky parameterisation", opt_.order);
    }
    require(times_.size() >= 2, where, "times", "at least 2 times (one step)",
            static_cast<double>(times_.size()));
    for (std::size_t i = 0; i < times_.size(); ++i) {
      const double t = times_[i];
      if (!(std::isfinite(t) && t > 0 && t <= schedule_.t_max()))
        diffgrad::detail::throw_argument(
            where, "times",
            diffgrad::detail::concat("times in (0, t_max = ", schedule_.t_max(), "]"),
            diffgrad::detail::concat(t, " at index ", i));
      if (i > 0 && !(t < times_[i - 1]))
        diffgrad::detail::throw_argument(
            where, "times", "strictly decreasing times (sampling runs backwards in t)",
            diffgrad::detail::concat(t, " at index ", i, " after ", times_[i - 1]));
    }
    build();
  }

  // --- the scheme interface of the engine (solvers/step_plan.hpp) ---
  int history() const { return opt_.order - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return opt_.stochasticity > 0; }
  bool accepts_dim(std::int64_t dim) const { return dim >= 2 && dim % 2 == 0; }
  std::string dim_requirement() const {
    return "an even number 2d >= 2 (each row is [x (d) | v (d)])";
  }

  /// The grid as engine nodes (the denoising node t = 0 appended when options.denoise):
  /// Node{t, NaN, NaN, NaN, model_time_scale t}. CLD has no scalar alpha/sigma/log-SNR; the
  /// NaNs make the isotropic schemes refuse these nodes.
  const std::vector<Node>& nodes() const { return nodes_; }

  /// Refuses any node span that is not nodes() (size, every t and model_t).
  void validate(std::span<const Node> nodes) const {
    const char* where = "gddim::CldGddim::validate";
    if (nodes.size() != nodes_.size())
      diffgrad::detail::throw_argument(
          where, "nodes",
          diffgrad::detail::concat("the scheme's ", nodes_.size(), " nodes (CldGddim::nodes())"),
          diffgrad::detail::concat(nodes.size(), " nodes"));
    for (std::size_t i = 0; i < nodes.size(); ++i)
      if (nodes[i].t != nodes_[i].t || nodes[i].model_t != nodes_[i].model_t)
        diffgrad::detail::throw_argument(
            where, "nodes",
            diffgrad::detail::concat("the scheme's grid (CldGddim::nodes()): node ", i,
                                     " at t = ", nodes_[i].t, ", model_t = ", nodes_[i].model_t),
            diffgrad::detail::concat("t = ", nodes[i].t, ", model_t = ", nodes[i].model_t));
  }

  BasicStepPlan<Block2> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    if (i < 0 || static_cast<std::size_t>(i) >= plans_.size() || nodes.size() != nodes_.size())
      throw std::logic_error("gddim::CldGddim::plan: step index or node span out of range");
    return plans_[static_cast<std::size_t>(i)];
  }

  // So the scheme can stand in for the "schedule" argument of sample() / gradient(), whose
  // NodeAtLambda it never calls: CLD has no log-SNR.
  double t_of_lambda(double) const {
    throw std::logic_error("gddim::CldGddim: CLD has no log-SNR; no node at a lambda");
  }
  Node node(double t) const {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return Node{t, nan, nan, nan, opt_.model_time_scale * t};
  }
  /// The engine's lambda -> node map, as BdmGddim::node_at_lambda(): this scheme has no
  /// intermediate stages, so it is never called (it throws std::logic_error if it were).
  NodeAtLambda node_at_lambda() const { return NodeAtLambda(*this); }

  // --- accessors ---
  const CldSchedule& schedule() const { return schedule_; }
  const CldGddimOptions& options() const { return opt_; }
  const std::vector<double>& times() const { return times_; }
  /// Steps the engine takes: times().size() - 1, plus 1 with options.denoise.
  int num_steps() const { return static_cast<int>(plans_.size()); }
  /// Every step's plan, as computed at construction.
  const std::vector<BasicStepPlan<Block2>>& plans() const { return plans_; }

private:
  /// K_t of the parameterisation (score = -K^{-T} eps).
  Mat2 k_of(double t) const {
    return opt_.parameterisation == CldParameterisation::R
               ? schedule_.sqrt_covariance(t)
               : CldSchedule::cholesky(schedule_.covariance(t));
  }

  void build() {
    const std::size_t n = times_.size();
    nodes_.clear();
    for (double t : times_) nodes_.push_back(node(t));
    if (opt_.denoise) nodes_.push_back(node(0.0));
    const double l = opt_.stochasticity;
    for (std::size_t i = 0; i + 1 < n; ++i) {
      const double s = times_[i], t = times_[i + 1];
      BasicStepPlan<Block2> p;
      p.num_stages = 1;
      p.stage_node[0] = nodes_[i];
      if (opt_.method == CldMethod::euler) {
        const double h = t - s; // negative: sampling runs backwards
        p.output.x = to_block(Mat2::Identity() + h * schedule_.drift(s));
        p.output.e[0] = to_block(h * 0.5 * (1.0 + l * l) * schedule_.diffusion_squared(s) *
                                 CldSchedule::inverse(k_of(s)).transpose());
        if (l > 0) p.noise = to_block(l * std::sqrt(-h) * schedule_.diffusion(s));
      } else if (l > 0) {
        const CldSchedule::StochasticStep st = schedule_.stochastic_step(t, s, l);
        p.output.x = to_block(st.transition);
        Mat2 coeff = st.eps_coefficient; // (Psi_hat - Psi) R_s
        if (opt_.parameterisation == CldParameterisation::cholesky)
          coeff = coeff * CldSchedule::inverse(schedule_.sqrt_covariance(s)) * k_of(s);
        p.output.e[0] = to_block(coeff);
        p.noise = to_block(st.noise_factor);
      } else {
        p.output.x = to_block(schedule_.transition(t, s));
        if (opt_.parameterisation == CldParameterisation::cholesky) {
          p.output.e[0] = to_block(schedule_.cholesky_step_coefficient(t, s));
        } else {
          const std::size_t q = std::min<std::size_t>(static_cast<std::size_t>(opt_.order), i + 1);
          std::vector<double> hist(q);
          for (std::size_t j = 0; j < q; ++j) hist[j] = times_[i - j];
          const std::vector<Mat2> c = schedule_.multistep_coefficients(t, hist);
          p.output.e[0] = to_block(c[0]);
          for (std::size_t j = 1; j < q; ++j) p.output.hist_e[j - 1] = to_block(c[j]);
        }
      }
      plans_.push_back(p);
    }
    if (opt_.denoise) {
      const double delta = times_.back();
      BasicStepPlan<Block2> p;
      p.num_stages = 1;
      p.stage_node[0] = nodes_[n - 1];
      p.output.x = to_block(Mat2::Identity() - delta * schedule_.drift(delta));
      p.output.e[0] = to_block(-delta * schedule_.diffusion_squared(delta) *
                               CldSchedule::inverse(k_of(delta)).transpose());
      plans_.push_back(p);
    }
  }

  CldSchedule schedule_;
  std::vector<double> times_;
  CldGddimOptions opt_;
  std::vector<Node> nodes_;
  std::vector<BasicStepPlan<Block2>> plans_;
};

/// Draws the CLD prior into u (shape batch x 2d, kept): x ~ N(0, I), v ~ N(0, M I), the
/// stationary law of the forward SDE (docs/gddim.md, section 6). The noise is the library's
/// standard normal state xi(seed, step, global element index) scaled by diag(1, sqrt(M)), so
/// a shard with row_offset draws its rows of the whole batch.
template <Backend B>
  requires BackendFor<B, Block2>
void draw_cld_prior(const B& backend, const CldSchedule& schedule, typename B::state_type& u,
                    std::uint64_t seed, std::uint64_t step = 0, std::uint64_t row_offset = 0) {
  using State = typename B::state_type;
  diffgrad::detail::require(B::dim(u) >= 2 && B::dim(u) % 2 == 0, "gddim::draw_cld_prior", "u",
                            "a state of even width 2d (rows [x | v])",
                            static_cast<double>(B::dim(u)));
  backend.fill(u, 0.0);
  const LinTerm<State, Block2> zero{Block2{}, &u};
  backend.lincomb(u, std::span<const LinTerm<State, Block2>>(&zero, 1),
                  BasicNoiseTerm<Block2>{Block2{1.0, 0.0, 0.0, std::sqrt(schedule.mass())}, seed,
                                         step, row_offset});
}

/// The x half of a CLD state (rows [x (d) | v (d)]): what a sampler returns as data.
template <class Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>
cld_data_half(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& u) {
  diffgrad::detail::require(u.cols() >= 2 && u.cols() % 2 == 0, "gddim::cld_data_half", "u",
                            "a state of even width 2d (rows [x | v])",
                            static_cast<double>(u.cols()));
  return u.leftCols(u.cols() / 2);
}

namespace cld_detail {
/// A noise model with a VJP taking a Node or a model time (concepts/model.hpp's forms).
template <class M, class State, class Vector>
concept HasVjp = requires(M& m, const State& s, const Node& n, State& o, Vector* p) {
  m.vjp(s, n, s, o, p, p);
} || requires(M& m, const State& s, double t, State& o, Vector* p) { m.vjp(s, t, s, o, p, p); };
} // namespace cld_detail

/// Adapter for networks in the official interleaved layout (..., d, 2): element (k, c) of a
/// row at 2k + c (c = 0: x, 1: v), where the samplers use [x (d) | v (d)] (c d + k). Wraps a
/// noise model (eps with a Node or a model time) and, when it has one, its VJP; permutes
/// inputs and outputs through scratch states sized at construction (batch x 2d), so a call
/// allocates nothing. Not thread-safe (the scratch is shared); one adapter per thread.
template <class Model, class Scalar> class CldInterleavedModel {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  CldInterleavedModel(Model& model, std::int64_t batch, std::int64_t data_dim) : model_(model) {
    diffgrad::detail::require(batch >= 1 && data_dim >= 1, "gddim::CldInterleavedModel",
                              "batch/data_dim", "a non-empty batch of d >= 1 coordinates",
                              static_cast<double>(batch * data_dim));
    for (auto* s : {&in_, &out_, &cot_, &dx_}) *s = state_type::Zero(batch, 2 * data_dim);
  }

  void eps(const state_type& u, const Node& n, state_type& out) {
    check(u, "eps");
    to_interleaved(u, in_);
    if constexpr (requires { model_.eps(in_, n, out_); })
      model_.eps(in_, n, out_);
    else
      model_.eps(in_, n.model_t, out_);
    out.resize(u.rows(), u.cols());
    to_blocked(out_, out);
  }

  /// The wrapped model's VJP, in the blocked layout (only when the model has one).
  void vjp(const state_type& u, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams)
    requires cld_detail::HasVjp<Model, state_type, vector_type>
  {
    check(u, "vjp");
    check(a, "vjp");
    to_interleaved(u, in_);
    to_interleaved(a, cot_);
    if constexpr (requires { model_.vjp(in_, n, cot_, dx_, dcond, dparams); })
      model_.vjp(in_, n, cot_, dx_, dcond, dparams);
    else
      model_.vjp(in_, n.model_t, cot_, dx_, dcond, dparams);
    dx.resize(u.rows(), u.cols());
    to_blocked(dx_, dx);
  }

  std::int64_t cond_size() const
    requires requires(const Model& m) { m.cond_size(); }
  {
    return static_cast<std::int64_t>(model_.cond_size());
  }
  std::int64_t param_size() const
    requires requires(const Model& m) { m.param_size(); }
  {
    return static_cast<std::int64_t>(model_.param_size());
  }

  /// [x | v] -> interleaved (k, c) at 2k + c; `out` must have u's shape.
  static void to_interleaved(const state_type& u, state_type& out) {
    const Eigen::Index d = u.cols() / 2;
    for (Eigen::Index r = 0; r < u.rows(); ++r)
      for (Eigen::Index k = 0; k < d; ++k) {
        out(r, 2 * k) = u(r, k);
        out(r, 2 * k + 1) = u(r, d + k);
      }
  }
  /// Interleaved -> [x | v]; `out` must have u's shape.
  static void to_blocked(const state_type& u, state_type& out) {
    const Eigen::Index d = u.cols() / 2;
    for (Eigen::Index r = 0; r < u.rows(); ++r)
      for (Eigen::Index k = 0; k < d; ++k) {
        out(r, k) = u(r, 2 * k);
        out(r, d + k) = u(r, 2 * k + 1);
      }
  }

private:
  void check(const state_type& u, const char* fn) const {
    if (u.rows() != in_.rows() || u.cols() != in_.cols())
      throw invalid_argument(diffgrad::detail::concat(
          "gddim::CldInterleavedModel::", fn, ": argument 'u' expected shape ", in_.rows(), " x ",
          in_.cols(), " (the batch x 2d given at construction), got ", u.rows(), " x ", u.cols()));
  }

  Model& model_;
  state_type in_, out_, cot_, dx_;
};

} // namespace diffgrad::gddim
