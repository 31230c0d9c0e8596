#pragma once
// Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance") as a noise
// model, for users who keep the functor API (sample, gradient, inversion):
//
//   eps(x) = eps_u(x) + w (eps_c(x) - eps_u(x)),   eps_c = eps(x | c),  eps_u = eps(x | null),
//
// with w the guidance scale (w = 0: unconditional, w = 1: conditional, w > 1: guided). The
// result is a DifferentiableNoiseModel: its conditioning is c (the null conditioning is a
// constant), its parameters are the wrapped model's, and its VJP is exact:
//   dx = J_c^T (w a) + J_u^T ((1 - w) a),   dc = (d eps_c/dc)^T (w a),
//   dparams = (d eps_c/dtheta)^T (w a) + (d eps_u/dtheta)^T ((1 - w) a).
//
// The wrapped model is called in one of two ways:
//  * a RowConditionedNoiseModel (conditioning given per row, as a network with per-sample class
//    labels or text embeddings takes it) is called ONCE per evaluation on the stacked batch
//    [x ; x] (2B rows) with the conditioning rows [c ; null] (2B x cond_size), and its VJP once
//    with the stacked cotangent [w a ; (1 - w) a]. This is what a real network wants: one
//    batched call instead of two half-size ones.
//  * a model with one conditioning vector for the whole batch (set_cond / cond(), e.g.
//    models::DiracMixture, models::Mlp) is called twice, once per conditioning, with its own
//    conditioning restored afterwards. The numbers are the same; only the batching differs.
//
// The stacked buffers are members, sized on the first call with a batch size: later calls with
// that batch size do not allocate (the wrapped model may, that is its business). Not
// thread-safe (one instance per thread), like the library's models. The wrapped model is held
// by reference and must outlive the combinator.
//
// Users who own the loop (solvers/stepper.hpp) stack and combine by hand with
// stack_for_guidance / stack_conditioning / combine_guidance below (the combinator's own
// arithmetic, so the two give the same bits). docs/guidance.md shows both.
#include <Eigen/Core>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

// (clang-format 14 mangles concept definitions.)
// clang-format off
/// A noise model whose conditioning is given per row:
///   eps_rows(x, node, cond_rows, out): x is B x d, cond_rows is B x cond_size() (row b
///   conditions x's row b), out becomes B x d.
template <class M, class State>
concept RowConditionedNoiseModel =
    requires(M& m, const State& x, const Node& n, const State& cond_rows, State& out) {
      m.eps_rows(x, n, cond_rows, out);
      { m.cond_size() } -> std::convertible_to<std::int64_t>;
    };

/// Its VJP, row-wise like eps_rows:
///   vjp_rows(x, node, cond_rows, a, dx, dcond_rows*, dparams*):
///     dx = (d eps/dx)^T a (B x d);  *dcond_rows += the per-row cotangent of cond_rows
///     (B x cond_size);  *dparams += (d eps/dtheta)^T a summed over the batch.
/// dcond_rows / dparams may be null (not wanted).
template <class M, class State, class Vector>
concept DifferentiableRowConditionedNoiseModel =
    RowConditionedNoiseModel<M, State> &&
    requires(M& m, const State& x, const Node& n, const State& c, const State& a, State& dx,
             State* dc, Vector* dp) {
      m.vjp_rows(x, n, c, a, dx, dc, dp);
      { m.param_size() } -> std::convertible_to<std::int64_t>;
    };

/// A noise model with one conditioning vector for the whole batch (models::DiracMixture,
/// models::Mlp): cond() reads it, set_cond(v) replaces it.
template <class M, class State, class Vector>
concept BatchConditionedNoiseModel =
    (NoiseModel<M, State> || NodeAwareNoiseModel<M, State>) &&
    requires(M& m, const Vector& v) {
      m.set_cond(v);
      { m.cond() } -> std::convertible_to<const Vector&>;
      { m.cond_size() } -> std::convertible_to<std::int64_t>;
    };
// clang-format on

// ---- the arithmetic, shared by the combinator and hand-written loops ------------------------

/// stacked = [x ; x] (2B x d). Reuses stacked's storage when it already has that shape.
template <class State> void stack_for_guidance(const State& x, State& stacked) {
  const auto b = x.rows();
  stacked.resize(2 * b, x.cols());
  stacked.topRows(b) = x;
  stacked.bottomRows(b) = x;
}

/// rows = [c repeated B times ; null repeated B times] (2B x cond_size).
template <class State, class Vector>
void stack_conditioning(const Vector& cond, const Vector& null_cond, Eigen::Index batch,
                        State& rows) {
  if (cond.size() != null_cond.size())
    diffgrad::detail::throw_argument(
        "models::stack_conditioning", "null_cond",
        diffgrad::detail::concat("length ", cond.size(), " (the conditioning's)"),
        null_cond.size());
  rows.resize(2 * batch, cond.size());
  rows.topRows(batch).rowwise() = cond.transpose();
  rows.bottomRows(batch).rowwise() = null_cond.transpose();
}

/// out = eps_u + w (eps_c - eps_u) from the stacked output [eps_c ; eps_u] (2B x d).
template <class State>
void combine_guidance(const State& stacked_eps, double guidance_scale, State& out) {
  if (stacked_eps.rows() % 2 != 0)
    diffgrad::detail::throw_argument("models::combine_guidance", "stacked_eps",
                                     "an even number of rows ([eps_c ; eps_u])",
                                     stacked_eps.rows());
  diffgrad::detail::require_finite(guidance_scale, "models::combine_guidance", "guidance_scale");
  using Scalar = typename State::Scalar;
  const auto b = stacked_eps.rows() / 2;
  out.resize(b, stacked_eps.cols());
  out = stacked_eps.bottomRows(b) +
        Scalar(guidance_scale) * (stacked_eps.topRows(b) - stacked_eps.bottomRows(b));
}

// ---- the combinator --------------------------------------------------------------------------

template <class Model, class Scalar = double> class ClassifierFreeGuidance {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// True when the wrapped model takes per-row conditioning (one batched call per evaluation).
  static constexpr bool batched = RowConditionedNoiseModel<Model, state_type>;
  static_assert(batched || BatchConditionedNoiseModel<Model, state_type, vector_type>,
                "diffgrad::models::ClassifierFreeGuidance: the model must take per-row "
                "conditioning (eps_rows(x, node, cond_rows, out), cond_size(); see "
                "RowConditionedNoiseModel) or one conditioning vector (eps, cond(), set_cond, "
                "cond_size(); see BatchConditionedNoiseModel)");

  /// `cond` is the conditioning guided toward, `null_cond` the unconditional one (e.g. zero
  /// logits, a null class embedding), both of length model.cond_size(); guidance_scale finite.
  ClassifierFreeGuidance(Model& model, const vector_type& cond, const vector_type& null_cond,
                         double guidance_scale)
      : model_(model) {
    set_cond(cond);
    set_null_cond(null_cond);
    set_guidance_scale(guidance_scale);
  }

  std::int64_t cond_size() const { return static_cast<std::int64_t>(model_.cond_size()); }
  std::int64_t param_size() const requires requires(const Model& m) { m.param_size(); }
  { return static_cast<std::int64_t>(model_.param_size()); }
  /// The wrapped model's parameters (for optimisers and finite-difference checks).
  decltype(auto) params() requires requires(Model& m) { m.params(); }
  { return model_.params(); }

  /// The conditioning guided toward (the one differentiated: dcond is d/dc).
  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  void set_cond(const vector_type& c) {
    require_cond_length(c, "ClassifierFreeGuidance::set_cond", "cond");
    cond_ = c;
  }
  /// The unconditional ("null") conditioning: a constant of the guidance.
  const vector_type& null_cond() const { return null_cond_; }
  void set_null_cond(const vector_type& c) {
    require_cond_length(c, "ClassifierFreeGuidance::set_null_cond", "null_cond");
    null_cond_ = c;
  }
  double guidance_scale() const { return guidance_scale_; }
  void set_guidance_scale(double w) {
    diffgrad::detail::require_finite(w, "ClassifierFreeGuidance", "guidance_scale");
    guidance_scale_ = w;
  }
  Model& model() const { return model_; }

  /// eps = eps_u + w (eps_c - eps_u) for the batch x (B x d).
  void eps(const state_type& x, const Node& n, state_type& out) const {
    const char* where = "ClassifierFreeGuidance::eps";
    check_cond(where);
    if constexpr (batched) {
      stack_for_guidance(x, x2_);
      stack_conditioning(cond_, null_cond_, x.rows(), c2_);
      model_.eps_rows(x2_, n, c2_, e2_);
      require_shape(e2_, x2_, where, "the model's stacked output");
      combine_guidance(e2_, guidance_scale_, out);
    } else {
      CondRestorer restore(model_, saved_cond_);
      model_.set_cond(cond_);
      call_eps(x, n, ec_);
      require_shape(ec_, x, where, "the model's conditional output");
      model_.set_cond(null_cond_);
      call_eps(x, n, eu_);
      require_shape(eu_, x, where, "the model's unconditional output");
      out.resize(x.rows(), x.cols());
      out = eu_ + Scalar(guidance_scale_) * (ec_ - eu_);
    }
  }

  /// dx = (d eps/dx)^T a; *dcond += (d eps/dc)^T a; *dparams += (d eps/dtheta)^T a (summed over
  /// the batch). dcond / dparams may be null. `a` may alias `dx`.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) const
      requires(DifferentiableRowConditionedNoiseModel<Model, state_type, vector_type> ||
               DifferentiableNoiseModel<Model, state_type, vector_type>) {
    const char* where = "ClassifierFreeGuidance::vjp";
    check_cond(where);
    require_shape(a, x, where, "cotangent");
    if (dcond) require_length(*dcond, cond_size(), where, "dcond");
    const Scalar w = Scalar(guidance_scale_), one_minus_w = Scalar(1.0 - guidance_scale_);
    const auto b = x.rows();
    if constexpr (batched) {
      stack_for_guidance(x, x2_);
      stack_conditioning(cond_, null_cond_, b, c2_);
      a2_.resize(2 * b, x.cols());
      a2_.topRows(b) = w * a; // read a before dx (which may alias it) is written
      a2_.bottomRows(b) = one_minus_w * a;
      if (dcond) dc2_.setZero(2 * b, cond_.size());
      model_.vjp_rows(x2_, n, c2_, a2_, dx2_, dcond ? &dc2_ : nullptr, dparams);
      require_shape(dx2_, x2_, where, "the model's stacked dx");
      dx.resize(b, x.cols());
      dx = dx2_.topRows(b) + dx2_.bottomRows(b);
      if (dcond) {
        require_shape(dc2_, c2_, where, "the model's stacked dcond_rows");
        *dcond += dc2_.topRows(b).colwise().sum().transpose();
      }
    } else {
      ac_ = w * a;
      au_ = one_minus_w * a;
      CondRestorer restore(model_, saved_cond_);
      model_.set_cond(cond_);
      call_vjp(x, n, ac_, dxc_, dcond, dparams);
      require_shape(dxc_, x, where, "the model's conditional dx");
      model_.set_cond(null_cond_);
      call_vjp(x, n, au_, dxu_, static_cast<vector_type*>(nullptr), dparams);
      require_shape(dxu_, x, where, "the model's unconditional dx");
      dx.resize(b, x.cols());
      dx = dxc_ + dxu_;
    }
  }

private:
  /// Restores the wrapped model's own conditioning when the two-call path leaves (also by an
  /// exception), so the combinator never changes the model it was given.
  struct CondRestorer {
    Model& model;
    vector_type& saved;
    CondRestorer(Model& m, vector_type& s) : model(m), saved(s) { saved = model.cond(); }
    ~CondRestorer() { model.set_cond(saved); }
    CondRestorer(const CondRestorer&) = delete;
    CondRestorer& operator=(const CondRestorer&) = delete;
  };

  void call_eps(const state_type& x, const Node& n, state_type& out) const {
    if constexpr (NodeAwareNoiseModel<Model, state_type>)
      model_.eps(x, n, out);
    else
      model_.eps(x, n.model_t, out);
  }
  void call_vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
                vector_type* dcond, vector_type* dparams) const {
    if constexpr (requires { model_.vjp(x, n, a, dx, dcond, dparams); })
      model_.vjp(x, n, a, dx, dcond, dparams);
    else
      model_.vjp(x, n.model_t, a, dx, dcond, dparams);
  }

  void require_cond_length(const vector_type& c, const char* where, const char* arg) const {
    require_length(c, cond_size(), where, arg);
    if (!c.allFinite()) diffgrad::detail::throw_argument(where, arg, "finite values", "NaN or Inf");
  }
  void check_cond(const char* where) const {
    // The wrapped model may have been reconfigured since construction.
    require_length(cond_, cond_size(), where, "cond");
    require_length(null_cond_, cond_size(), where, "null_cond");
  }
  template <class V>
  static void require_length(const V& v, std::int64_t size, const char* where, const char* arg) {
    if (static_cast<std::int64_t>(v.size()) != size)
      diffgrad::detail::throw_argument(
          where, arg, diffgrad::detail::concat("length ", size, " (the model's cond_size())"),
          v.size());
  }
  template <class A, class B>
  static void require_shape(const A& got, const B& like, const char* where, const char* arg) {
    if (got.rows() != like.rows() || got.cols() != like.cols())
      diffgrad::detail::throw_argument(
          where, arg, diffgrad::detail::concat("shape ", like.rows(), " x ", like.cols()),
          diffgrad::detail::concat(got.rows(), " x ", got.cols()));
  }

  Model& model_;
  vector_type cond_, null_cond_;
  double guidance_scale_ = 1.0;
  // Scratch of the last call (resized only when the batch size changes).
  mutable state_type x2_, c2_, e2_, a2_, dx2_, dc2_; // one batched call
  mutable state_type ec_, eu_, ac_, au_, dxc_, dxu_; // two calls
  mutable vector_type saved_cond_;
};

/// Deduces the scalar from the conditioning vector: ClassifierFreeGuidance cfg(model, c, null,
/// 7.5) (null may be an expression such as Eigen::VectorXd::Zero(k)).
template <class Model, class Scalar>
ClassifierFreeGuidance(Model&, const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>&,
                       const std::type_identity_t<Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>&,
                       double) -> ClassifierFreeGuidance<Model, Scalar>;

} // namespace diffgrad::models
