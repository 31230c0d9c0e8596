#pragma once
// Prediction-type adapters: solvers only ever see an eps model; what the network predicts is
// converted here (docs/architecture.md). With x = alpha x0 + sigma eps (general alpha, sigma):
//   eps    eps                          (PredictionType::eps, diffusers "epsilon")
//   x0     x0 = (x - sigma eps)/alpha   (PredictionType::x0,  diffusers "sample")
//   v      v = alpha eps - sigma x0     (PredictionType::v,   diffusers "v_prediction")
//   score  s = -eps/sigma               (PredictionType::score)
// Inverting each for eps:
//   from x0:    eps = (x - alpha m)/sigma
//   from v:     eps = (alpha m + sigma x)/(alpha^2 + sigma^2)   (VP: alpha m + sigma x, as diffusers)
//   from score: eps = -sigma m
// Every conversion is out = A x + B m with node scalars A, B, so the VJP is
//   dx = A a + (dm/dx)^T (B a), and the inner model's cond/param VJPs get the cotangent B a.
//
//   auto eps_model = as_eps_model<PredictionType::v>(net);  // node-aware eps model
//   auto net_like  = as_prediction<PredictionType::v>(eps_model_of_known_data);  // inverse
//
// The wrapped model's raw output is read through its eps(x, t_or_node, out) method (a
// diffgrad::Mlp, a user network, or any NoiseModel-shaped object), and it is called with the
// node's model time unless it asks for the whole Node. Lvalues are held by reference (the
// model must outlive the adapter); rvalues (e.g. another adapter) are moved in and owned.
#include <Eigen/Core>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

enum class PredictionType { eps, x0, v, score };

inline const char* prediction_type_name(PredictionType p) {
  switch (p) {
  case PredictionType::eps: return "eps";
  case PredictionType::x0: return "x0";
  case PredictionType::v: return "v";
  case PredictionType::score: return "score";
  }
  return "?";
}

/// diffusers' prediction_type strings ("epsilon", "sample", "v_prediction") and our names
/// ("eps", "x0", "v", "score").
inline PredictionType parse_prediction_type(std::string_view s) {
  if (s == "epsilon" || s == "eps") return PredictionType::eps;
  if (s == "sample" || s == "x0") return PredictionType::x0;
  if (s == "v_prediction" || s == "v") return PredictionType::v;
  if (s == "score") return PredictionType::score;
  diffgrad::detail::throw_argument("parse_prediction_type", "s",
                                   "one of epsilon/eps, sample/x0, v_prediction/v, score",
                                   std::string(s));
}

/// out = A x + B m, the affine map between a prediction and eps at one node.
struct AffineCoeffs {
  double x = 0.0;      ///< A
  double inner = 1.0;  ///< B
};

namespace impl {
inline void require_positive(double v, const char* where, const char* arg, const char* why) {
  if (!(v > 0.0) || !std::isfinite(v))
    diffgrad::detail::throw_argument(where, arg, why, v);
}
} // namespace impl

/// eps = A x + B m for a network predicting `type` (the adapter's direction).
inline AffineCoeffs eps_from_prediction_coeffs(PredictionType type, const Node& n) {
  const char* where = "eps_from_prediction";
  switch (type) {
  case PredictionType::eps: return {0.0, 1.0};
  case PredictionType::x0:
    impl::require_positive(n.sigma, where, "node.sigma", "sigma > 0 (eps = (x - alpha x0)/sigma)");
    return {1.0 / n.sigma, -n.alpha / n.sigma};
  case PredictionType::v: {
    const double r = n.alpha * n.alpha + n.sigma * n.sigma;
    impl::require_positive(r, where, "node", "alpha^2 + sigma^2 > 0");
    return {n.sigma / r, n.alpha / r};
  }
  case PredictionType::score: return {0.0, -n.sigma};
  }
  return {};
}

/// m = A x + B eps: the prediction of `type` made from eps (the inverse direction).
inline AffineCoeffs prediction_from_eps_coeffs(PredictionType type, const Node& n) {
  const char* where = "prediction_from_eps";
  switch (type) {
  case PredictionType::eps: return {0.0, 1.0};
  case PredictionType::x0:
    impl::require_positive(n.alpha, where, "node.alpha", "alpha > 0 (x0 = (x - sigma eps)/alpha)");
    return {1.0 / n.alpha, -n.sigma / n.alpha};
  case PredictionType::v:
    // v = alpha eps - sigma (x - sigma eps)/alpha = ((alpha^2 + sigma^2) eps - sigma x)/alpha.
    impl::require_positive(n.alpha, where, "node.alpha", "alpha > 0 (v needs x0)");
    return {-n.sigma / n.alpha, (n.alpha * n.alpha + n.sigma * n.sigma) / n.alpha};
  case PredictionType::score:
    impl::require_positive(n.sigma, where, "node.sigma", "sigma > 0 (score = -eps/sigma)");
    return {0.0, -1.0 / n.sigma};
  }
  return {};
}

namespace impl {

template <class M> using model_value_t = std::remove_cvref_t<M>;

template <class M, class = void> struct state_of {
  using type = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
};
template <class M> struct state_of<M, std::void_t<typename model_value_t<M>::state_type>> {
  using type = typename model_value_t<M>::state_type;
};
/// The state type of a model: its state_type, else a row-major double matrix.
template <class M> using state_of_t = typename state_of<M>::type;
template <class M>
using vector_of_t = Eigen::Matrix<typename state_of_t<M>::Scalar, Eigen::Dynamic, 1>;

/// Calls model.eps with the whole node if the model asks for it, else with the model time.
template <class Model, class State>
void call_eps(Model& model, const State& x, const Node& n, State& out) {
  if constexpr (NodeAwareNoiseModel<Model, State>)
    model.eps(x, n, out);
  else
    model.eps(x, n.model_t, out);
}

template <class Model, class State, class Vector>
concept NodeAwareVjp = requires(Model& m, const State& x, const Node& n, const State& a, State& dx,
                                Vector* dc, Vector* dp) { m.vjp(x, n, a, dx, dc, dp); };
template <class Model, class State, class Vector>
concept TimedVjp = requires(Model& m, const State& x, double t, const State& a, State& dx,
                            Vector* dc, Vector* dp) { m.vjp(x, t, a, dx, dc, dp); };

template <class Model, class State, class Vector>
void call_vjp(Model& model, const State& x, const Node& n, const State& a, State& dx, Vector* dc,
              Vector* dp) {
  if constexpr (NodeAwareVjp<Model, State, Vector>)
    model.vjp(x, n, a, dx, dc, dp);
  else
    model.vjp(x, n.model_t, a, dx, dc, dp);
}

/// out = A x + B inner(x): the common body of both adapter directions.
template <class Model> class AffineOutputAdapter {
public:
  using model_type = model_value_t<Model>;
  using state_type = state_of_t<Model>;
  using vector_type = vector_of_t<Model>;
  using Scalar = typename state_type::Scalar;

  template <class M>
  AffineOutputAdapter(M&& model, PredictionType type)
      : model_(std::forward<M>(model)), type_(type) {}

  PredictionType type() const { return type_; }
  model_type& model() { return model_; }
  const model_type& model() const { return model_; }

  std::int64_t cond_size() const
    requires requires(const model_type& m) { m.cond_size(); }
  {
    return model_.cond_size();
  }
  std::int64_t param_size() const
    requires requires(const model_type& m) { m.param_size(); }
  {
    return model_.param_size();
  }

protected:
  void apply(const state_type& x, const Node& n, state_type& out, AffineCoeffs c) {
    call_eps(model_, x, n, out);
    if (c.x == 0.0 && c.inner == 1.0) return;
    if (c.x == 0.0)
      out *= Scalar(c.inner);
    else
      out = Scalar(c.x) * x + Scalar(c.inner) * out;  // element-wise: out may be read in place
  }

  void apply_vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
                 vector_type* dcond, vector_type* dparams, AffineCoeffs c) {
    if (c.inner == 1.0 && c.x == 0.0) {
      call_vjp(model_, x, n, a, dx, dcond, dparams);
      return;
    }
    scaled_ = Scalar(c.inner) * a;  // the inner model's cotangent B a (no allocation once sized)
    if (c.x != 0.0) direct_ = Scalar(c.x) * a;  // read a before dx is written (they may alias)
    call_vjp(model_, x, n, scaled_, dx, dcond, dparams);
    if (c.x != 0.0) dx += direct_;
  }

private:
  Model model_;  // a reference for lvalues, an owned value for rvalues
  PredictionType type_;
  state_type scaled_, direct_;
};

} // namespace impl

/// A node-aware eps model made from a network that predicts `type`.
template <class Model> class EpsFromPrediction : public impl::AffineOutputAdapter<Model> {
  using base = impl::AffineOutputAdapter<Model>;

public:
  using typename base::state_type;
  using typename base::vector_type;
  using base::base;

  void eps(const state_type& x, const Node& n, state_type& out) {
    this->apply(x, n, out, eps_from_prediction_coeffs(this->type(), n));
  }
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams)
    requires(impl::NodeAwareVjp<typename base::model_type, state_type, vector_type> ||
             impl::TimedVjp<typename base::model_type, state_type, vector_type>)
  {
    this->apply_vjp(x, n, a, dx, dcond, dparams, eps_from_prediction_coeffs(this->type(), n));
  }
};

/// The inverse: from an eps model, a "network" whose eps() returns the `type` prediction
/// (to feed a prediction-type consumer, or to test round trips).
template <class Model> class PredictionFromEps : public impl::AffineOutputAdapter<Model> {
  using base = impl::AffineOutputAdapter<Model>;

public:
  using typename base::state_type;
  using typename base::vector_type;
  using base::base;

  /// Writes the `type` prediction (named eps() so that adapters and solvers can call it).
  void eps(const state_type& x, const Node& n, state_type& out) {
    this->apply(x, n, out, prediction_from_eps_coeffs(this->type(), n));
  }
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams)
    requires(impl::NodeAwareVjp<typename base::model_type, state_type, vector_type> ||
             impl::TimedVjp<typename base::model_type, state_type, vector_type>)
  {
    this->apply_vjp(x, n, a, dx, dcond, dparams, prediction_from_eps_coeffs(this->type(), n));
  }
};

/// eps model from a network predicting `type` (runtime choice, e.g. from a config string).
template <class Model> EpsFromPrediction<Model> as_eps_model(Model&& model, PredictionType type) {
  return EpsFromPrediction<Model>(std::forward<Model>(model), type);
}
template <PredictionType Type, class Model> EpsFromPrediction<Model> as_eps_model(Model&& model) {
  return EpsFromPrediction<Model>(std::forward<Model>(model), Type);
}

/// A `type`-predicting network from an eps model.
template <class Model> PredictionFromEps<Model> as_prediction(Model&& model, PredictionType type) {
  return PredictionFromEps<Model>(std::forward<Model>(model), type);
}
template <PredictionType Type, class Model> PredictionFromEps<Model> as_prediction(Model&& model) {
  return PredictionFromEps<Model>(std::forward<Model>(model), Type);
}

} // namespace diffgrad::models
