#pragma once
// The SDE stepping layer's user API (docs/sde.md): a drift network, its adapters to the
// library's one engine and one exact discrete adjoint, simulation and gradients.
//
//   dx = (-a x + f(x, t; theta)) dt + g(t) dW        (scheme: sde/euler_maruyama.hpp)
//
// Drift model concept (State = the backend's state, B x d; t = the node's model time):
//   model.drift(x, t, out)                          out = f(x, t)            (DriftModel)
//   model.drift_vjp(x, t, a, dx, dparams)           dx = (df/dx)^T a; *dparams += (df/dtheta)^T a
//   model.param_size()                              (DifferentiableDriftModel; dparams may be null)
//
//   SdeScheme<EigenBackend<double>> scheme(backend, uniform_times(N, 0, T), g, d,
//                                          {.running_costs = true});
//   State x = augment(scheme, x0);                  // B x (d + 2), cost columns zero
//   simulate(scheme, backend, model, x, {.seed = 7});
//   // x = [x_N | K_N | M_N]; -(K_N + M_N) = log p^0/q^f of the path (exact, per sample)
//   auto r = sde_gradient(scheme, backend, model, augment(scheme, x0), loss,
//                         {.memory = MemoryMode::checkpoint(8), .wrt_params = true, .seed = 7});
//   r.grad_x (dL/d[x_0 | 0 | 0]), r.grad_params, r.grad_noise, r.cost
//
// The loss is any LossFunction on the final (augmented) state, so a loss that reads the
// cost columns differentiates the running costs exactly (noise regenerated, never stored).
// Users who own the loop use DriftField / DriftVjp with a Stepper or discrete_adjoint.
//
// With running costs, the adapters (host Eigen states) strip the cost columns before calling
// the model, append k_i and m_i (sde/euler_maruyama.hpp), and regenerate xi_i from Philox
// with the engine's indexing (seed, step, (row_offset + r) * W + c), or read the caller's
// given noise. Without running costs they hand the engine's state to the model unchanged.
// Divergence fails loudly: with check_finite (default) a non-finite state or drift is
// reported with its step, global sample index and time (diffgrad::numerical_error).
#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/gaussian_batch.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/sde/euler_maruyama.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::sde {

template <class M, class State>
concept DriftModel = requires(M& m, const State& x, double t, State& out) { m.drift(x, t, out); };

template <class M, class State, class Vector>
concept DifferentiableDriftModel =
    DriftModel<M, State> &&
    requires(M& m, const State& x, double t, const State& a, State& dx, Vector* dparams) {
      m.drift_vjp(x, t, a, dx, dparams);
      { m.param_size() } -> std::convertible_to<std::int64_t>;
    };

namespace detail {

template <class State> constexpr bool host_eigen_state = requires(State& s) {
  s.leftCols(1);
  s.col(0);
  s.row(0);
};

/// Throws numerical_error naming the first non-finite row of `s` (the global sample index).
template <class State>
void require_finite_rows(const State& s, int step, const Node& n, std::uint64_t row_offset,
                         const char* what) {
  if constexpr (host_eigen_state<State>) {
    if ((s.array() * 0).sum() == 0) return;
    for (std::int64_t r = 0; r < s.rows(); ++r)
      if (!s.row(r).allFinite())
        throw numerical_error(diffgrad::detail::concat(
            "diffgrad::sde: the ", what, " diverged (NaN or Inf) at step ", step, " (t = ", n.t,
            ") for sample ", row_offset + static_cast<std::uint64_t>(r)));
  }
}

} // namespace detail

/// Shared state of the two adapters: the scheme, the model and the noise they regenerate.
template <Backend B, class Model> struct DriftAdapterBase {
  using State = typename B::state_type;
  DriftAdapterBase(const SdeScheme<B>& scheme_, Model& model_, std::uint64_t seed_ = 0,
                   std::uint64_t row_offset_ = 0, std::span<const State> given_noise_ = {},
                   bool check_finite_ = true)
      : scheme(scheme_), model(model_), seed(seed_), row_offset(row_offset_),
        given_noise(given_noise_), check_finite(check_finite_) {}
  const SdeScheme<B>& scheme;
  Model& model;
  std::uint64_t seed = 0;
  std::uint64_t row_offset = 0;
  std::span<const State> given_noise{}; ///< empty: Philox noise (as the engine)
  bool check_finite = true;
  mutable State x_{}, f_{}, xi_{}, a_{}, dx_{}; ///< scratch (resized on first use)
  mutable std::vector<double> wide_{};          ///< noise of all W columns (scratch)

protected:
  // xi_i (B x d) exactly as the engine adds it to the x columns.
  void noise(int i, std::int64_t rows) const {
    const std::int64_t d = scheme.dim(), w = scheme.width();
    xi_.resize(rows, d);
    if (!given_noise.empty()) {
      xi_ = given_noise[static_cast<std::size_t>(i)].leftCols(d);
      return;
    }
    // The rows' elements are contiguous in the engine's numbering (row r: (row_offset + r) W
    // + [0, W)): one batched (SIMD) draw of all W columns, bit-identical to the engine's
    // gaussian(seed, i, index), then the x columns. Drawing the 2 cost columns too is cheaper
    // than a scalar draw per element (the batch draws pairs several at a time).
    wide_.resize(static_cast<std::size_t>(rows * w));
    diffgrad::detail::gaussian_range(
        seed, static_cast<std::uint64_t>(i), row_offset * static_cast<std::uint64_t>(w),
        wide_.size(), wide_.data());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < d; ++c)
        xi_(r, c) = static_cast<typename State::Scalar>(wide_[static_cast<std::size_t>(r * w + c)]);
  }
};

/// field(u, node, out) for the engine: out = f (or [f | k | m] with running costs).
template <Backend B, class Model> struct DriftField : DriftAdapterBase<B, Model> {
  using State = typename B::state_type;
  using DriftAdapterBase<B, Model>::DriftAdapterBase;
  void operator()(const State& u, const Node& n, State& out) const {
    const auto& s = this->scheme;
    if (!s.running_costs()) {
      if (this->check_finite) detail::require_finite_rows(u, s.step_of(n), n, this->row_offset, "state");
      this->model.drift(u, n.model_t, out);
      if (this->check_finite) detail::require_finite_rows(out, s.step_of(n), n, this->row_offset, "drift");
      return;
    }
    if constexpr (detail::host_eigen_state<State>) {
      using Scalar = typename State::Scalar;
      const int i = s.step_of(n);
      const std::int64_t d = s.dim();
      const auto rows = u.rows();
      this->x_ = u.leftCols(d);
      if (this->check_finite) detail::require_finite_rows(this->x_, i, n, this->row_offset, "state");
      this->model.drift(this->x_, n.model_t, this->f_);
      if (this->check_finite) detail::require_finite_rows(this->f_, i, n, this->row_offset, "drift");
      this->noise(i, rows);
      const double c = s.drift_weight(i), sd = s.noise_scale(i);
      out.resize(rows, s.width());
      out.leftCols(d) = this->f_;
      out.col(d) = (Scalar(c * c / (2.0 * sd * sd)) * this->f_.rowwise().squaredNorm());
      out.col(d + 1) =
          Scalar(c / sd) * (this->f_.array() * this->xi_.array()).rowwise().sum().matrix();
    } else {
      throw std::logic_error("diffgrad::sde: running-cost columns need host Eigen states for now");
    }
  }
};

/// vjp(u, node, cotangent, dx, dcond, dparams) for the discrete adjoint.
template <Backend B, class Model> struct DriftVjp : DriftAdapterBase<B, Model> {
  using State = typename B::state_type;
  using DriftAdapterBase<B, Model>::DriftAdapterBase;
  template <class Vector>
  void operator()(const State& u, const Node& n, const State& cot, State& dx, Vector*,
                  Vector* dparams) const {
    const auto& s = this->scheme;
    if (!s.running_costs()) {
      this->model.drift_vjp(u, n.model_t, cot, dx, dparams);
      return;
    }
    if constexpr (detail::host_eigen_state<State>) {
      using Scalar = typename State::Scalar;
      const int i = s.step_of(n);
      const std::int64_t d = s.dim();
      const auto rows = u.rows();
      this->x_ = u.leftCols(d);
      this->model.drift(this->x_, n.model_t, this->f_); // k and m need f at this state
      this->noise(i, rows);
      const double c = s.drift_weight(i), sd = s.noise_scale(i);
      // d k / d f = (c^2 / s^2) f,  d m / d f = (c / s) xi.
      this->a_ = cot.leftCols(d);
      this->a_.array() +=
          (cot.col(d).array() * Scalar(c * c / (sd * sd))).replicate(1, d) * this->f_.array() +
          (cot.col(d + 1).array() * Scalar(c / sd)).replicate(1, d) * this->xi_.array();
      this->model.drift_vjp(this->x_, n.model_t, this->a_, this->dx_, dparams);
      dx.resize(rows, s.width());
      dx.leftCols(d) = this->dx_;
      dx.rightCols(s.width() - d).setZero(); // the rates do not read the cost columns
    } else {
      throw std::logic_error("diffgrad::sde: running-cost columns need host Eigen states for now");
    }
  }
};

template <Backend B, class Model>
DriftField<B, Model> drift_field(const SdeScheme<B>& scheme, Model& model, std::uint64_t seed,
                                 std::uint64_t row_offset = 0, bool check_finite = true,
                                 std::span<const typename B::state_type> given_noise = {}) {
  return DriftField<B, Model>(scheme, model, seed, row_offset, given_noise, check_finite);
}
template <Backend B, class Model>
DriftVjp<B, Model> drift_vjp(const SdeScheme<B>& scheme, Model& model, std::uint64_t seed,
                             std::uint64_t row_offset = 0, bool check_finite = true,
                             std::span<const typename B::state_type> given_noise = {}) {
  return DriftVjp<B, Model>(scheme, model, seed, row_offset, given_noise, check_finite);
}

/// x (B x d) -> [x | 0 | 0] (B x width) for a scheme with running costs; a copy otherwise.
template <Backend B>
typename B::state_type augment(const SdeScheme<B>& scheme, const typename B::state_type& x) {
  diffgrad::detail::require(B::dim(x) == scheme.dim(), "sde::augment", "x",
                            diffgrad::detail::concat("a state of width d = ", scheme.dim()),
                            static_cast<double>(B::dim(x)));
  if (!scheme.running_costs()) return x;
  typename B::state_type out(B::batch(x), scheme.width());
  out.setZero();
  out.leftCols(scheme.dim()) = x;
  return out;
}

/// Runs the SDE from scheme.times().front() to .back() on x (B x width, in: x_0 with zero
/// cost columns, out: x_N and the accumulated costs). Philox noise keyed by options.seed;
/// `given_noise` (one B x width state per step) replaces it when not empty.
template <Backend B, class Model, class Obs = NullObserver>
SampleResult simulate(const SdeScheme<B>& scheme, const B& backend, Model& model,
                      typename B::state_type& x, const SampleOptions& options = {},
                      std::span<const typename B::state_type> given_noise = {},
                      Obs&& observer = {}) {
  using State = typename B::state_type;
  static_assert(DriftModel<Model, State>,
                "diffgrad::sde::simulate: the model must provide drift(const State& x, double t, "
                "State& out)");
  SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), B::batch(x), B::dim(x));
  ws.given_noise = given_noise;
  auto field = drift_field(scheme, model, options.seed, options.row_offset, options.check_finite,
                           given_noise);
  return run_scheme(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, x, ws, options,
                    std::forward<Obs>(observer));
}

/// A gradient workspace for sde_gradient on states of x0's shape (B x width).
template <Backend B, class Model>
GradientWorkspace<B> make_sde_gradient_workspace(const SdeScheme<B>& scheme, const B& backend,
                                                 Model& model, const typename B::state_type& x0,
                                                 const GradientOptions& options = {}) {
  return GradientWorkspace<B>::for_scheme(backend, scheme, scheme.num_steps(), x0, 0,
                                          static_cast<std::int64_t>(model.param_size()), options);
}

/// The exact discrete gradient of loss(x_N) (x_N augmented with the running costs) w.r.t.
/// x_0, the drift's parameters (options.wrt_params) and the noise (options.wrt_noise),
/// through the library's discrete adjoint with options.memory. ws.given_noise, when set,
/// replaces the Philox noise keyed by options.seed.
template <Backend B, class Model, class LossOrCotangent>
const GradientResult<B>& sde_gradient(const SdeScheme<B>& scheme, const B& backend, Model& model,
                                      const typename B::state_type& x0, LossOrCotangent&& loss,
                                      const GradientOptions& options, GradientWorkspace<B>& ws) {
  using State = typename B::state_type;
  static_assert(DifferentiableDriftModel<Model, State, typename B::vector_type>,
                "diffgrad::sde::sde_gradient: the model must provide drift(x, t, out), "
                "drift_vjp(x, t, a, dx, Vector* dparams) and param_size()");
  diffgrad::detail::require(!options.wrt_cond, "sde_gradient", "options.wrt_cond",
                            "false (drift models have no conditioning input)", 1.0);
  auto field = drift_field(scheme, model, options.seed, options.row_offset, options.check_finite,
                           ws.given_noise);
  auto vjp = drift_vjp(scheme, model, options.seed, options.row_offset, options.check_finite,
                       ws.given_noise);
  return discrete_adjoint(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, vjp, x0,
                          std::forward<LossOrCotangent>(loss), options, ws);
}

/// One-shot sde_gradient: builds the workspace, returns the result by value.
template <Backend B, class Model, class LossOrCotangent>
GradientResult<B> sde_gradient(const SdeScheme<B>& scheme, const B& backend, Model& model,
                               const typename B::state_type& x0, LossOrCotangent&& loss,
                               const GradientOptions& options = {}) {
  auto ws = make_sde_gradient_workspace(scheme, backend, model, x0, options);
  sde_gradient(scheme, backend, model, x0, std::forward<LossOrCotangent>(loss), options, ws);
  return std::move(ws.result);
}

} // namespace diffgrad::sde
