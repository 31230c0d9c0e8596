#pragma once
// Test models written with Backend operations only, so the SAME code runs on EigenBackend
// (in the CPU reference translation unit) and on CudaBackend (in the .cu tests): any
// CPU/GPU difference in a sampler run then comes from the backends, not from two model
// implementations. Gaussian data N(mu, s^2 I) (docs/math.md, exact test problem 1):
//   eps(x, node)       = sigma (x - alpha mu) / v,       v = alpha^2 s^2 + sigma^2
//   velocity(x, t)     = c_t x + (1 - c_t t) mu,         c_t = (t s^2 - (1 - t)) / var_t,
//                                                        var_t = (1 - t)^2 + t^2 s^2
// (the rectified flow of models/gaussian_flow.hpp). mu is given as a B x d state (every row
// the mean). VJPs are w.r.t. x only (cond_size() = param_size() = 0).
#include <cstdint>
#include <utility>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::testing {

template <Backend B> class BackendGaussian {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;

  BackendGaussian(const B& backend, state_type mu_rows, double s)
      : backend_(backend), mu_(std::move(mu_rows)), s_(s) {}

  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }

  double variance(const Node& n) const { return n.alpha * n.alpha * s_ * s_ + n.sigma * n.sigma; }

  void eps(const state_type& x, const Node& n, state_type& out) const {
    const double v = variance(n);
    backend_.lincomb(out, term(n.sigma / v, x), term(-n.sigma * n.alpha / v, mu_));
  }
  void vjp(const state_type&, const Node& n, const state_type& a, state_type& dx, vector_type*,
           vector_type*) const {
    backend_.lincomb(dx, term(n.sigma / variance(n), a));
  }

  double slope(double t) const {
    return (t * s_ * s_ - (1.0 - t)) / ((1.0 - t) * (1.0 - t) + t * t * s_ * s_);
  }
  void velocity(const state_type& x, double t, state_type& out) const {
    const double c = slope(t);
    backend_.lincomb(out, term(c, x), term(1.0 - c * t, mu_));
  }
  void velocity_vjp(const state_type&, double t, const state_type& a, state_type& dx, vector_type*,
                    vector_type*) const {
    backend_.lincomb(dx, term(slope(t), a));
  }

private:
  B backend_;
  state_type mu_;
  double s_;
};

/// A velocity-only view of BackendGaussian (so gradient() picks the velocity adapters).
template <Backend B> class BackendGaussianFlow {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;
  explicit BackendGaussianFlow(const BackendGaussian<B>& g) : g_(g) {}
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  void velocity(const state_type& x, double t, state_type& out) const { g_.velocity(x, t, out); }
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dc, vector_type* dp) const {
    g_.velocity_vjp(x, t, a, dx, dc, dp);
  }

private:
  const BackendGaussian<B>& g_;
};

} // namespace diffgrad::testing
