#pragma once
// What DiffFlow needs of its two networks, the forward drift f_theta(x, t) and the backward
// score s_theta(x, t): a time-dependent vector field on B x d row-major states with a VJP
// w.r.t. its input and its flat parameter vector. models::Mlp satisfies it as is (its input is
// [x | sin/cos time features | z], read through velocity / velocity_vjp); so does any class
// with the same five members:
//
//   using state_type  = Eigen row-major B x d matrix;   using vector_type = Eigen column vector;
//   void velocity(const state_type& x, double t, state_type& out) const;      // out = F(x, t)
//   void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
//                     vector_type* dcond, vector_type* dparams) const;
//       // dx = (dF/dx)^T a (overwritten), *dparams += (dF/dtheta)^T a summed over the batch
//       // (dcond is always passed as nullptr here)
//   std::int64_t param_size() const;   vector_type& params();   (flat parameter vector)
//
// Also here: a parameter-free linear drift f = c(t) x (the fixed drift of a VP/OU or VE
// diffusion baseline, trained with the same loss and networks as DiffFlow).
#include <Eigen/Core>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <utility>

#include "diffgrad/core/error.hpp"

namespace diffgrad::diffflow {

template <class N>
concept TimeField = requires(const N& cn, N& n, const typename N::state_type& x, double t,
                             typename N::state_type& out, typename N::vector_type* v) {
  typename N::state_type;
  typename N::vector_type;
  cn.velocity(x, t, out);
  cn.velocity_vjp(x, t, x, out, v, v);
  { cn.param_size() } -> std::convertible_to<std::int64_t>;
  n.params();
};

/// f(x, t) = c(t) x with no parameters: c = -beta(t)/2 gives the VP (OU) forward drift,
/// c = 0 the VE / Brownian one.
template <class Scalar> class LinearDrift {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  explicit LinearDrift(std::function<double(double)> coefficient) : c_(std::move(coefficient)) {
    if (!c_) diffgrad::detail::throw_argument("LinearDrift", "coefficient", "a callable c(t)", "an empty function");
  }
  void velocity(const state_type& x, double t, state_type& out) const { out = Scalar(c_(t)) * x; }
  void velocity_vjp(const state_type&, double t, const state_type& a, state_type& dx,
                    vector_type*, vector_type*) const {
    dx = Scalar(c_(t)) * a;
  }
  std::int64_t param_size() const { return 0; }
  vector_type& params() { return params_; }
  const vector_type& params() const { return params_; }

private:
  std::function<double(double)> c_;
  vector_type params_;
};

/// c(t) F(x, t) for a TimeField F, c a constant or a function of t. A constant puts a
/// network's O(1) output on the scale the chain needs (DiffFlow's drift must move the data O(1)
/// within a short horizon T, i.e. f = O(1/T); with c = 1/T the network stays O(1) and Adam's
/// step means the same thing); c(t) = -1/sigma(t) turns a noise-prediction network into a
/// score (the usual parameterisation of a VP diffusion).
template <TimeField Net> class ScaledField {
public:
  using state_type = typename Net::state_type;
  using vector_type = typename Net::vector_type;
  using Scalar = typename state_type::Scalar;
  ScaledField(Net& net, double scale) : net_(net), c_([scale](double) { return scale; }) {
    diffgrad::detail::require(std::isfinite(scale), "ScaledField", "scale", "a finite number", scale);
  }
  ScaledField(Net& net, std::function<double(double)> scale) : net_(net), c_(std::move(scale)) {
    if (!c_)
      diffgrad::detail::throw_argument("ScaledField", "scale", "a callable c(t)", "an empty function");
  }
  void velocity(const state_type& x, double t, state_type& out) const {
    net_.velocity(x, t, out);
    out *= Scalar(c_(t));
  }
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dcond, vector_type* dparams) const {
    scaled_ = Scalar(c_(t)) * a;
    net_.velocity_vjp(x, t, scaled_, dx, dcond, dparams);
  }
  std::int64_t param_size() const { return net_.param_size(); }
  vector_type& params() { return net_.params(); }
  const vector_type& params() const { return net_.params(); }
  double scale(double t) const { return c_(t); }
  Net& net() { return net_; }

private:
  Net& net_;
  std::function<double(double)> c_;
  mutable state_type scaled_;
};

} // namespace diffgrad::diffflow
