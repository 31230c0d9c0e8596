#pragma once
// CPU-vs-GPU case for the SDE stepping layer (sde/, docs/sde.md), written once over the backend
// like cases.hpp: an Ornstein-Uhlenbeck process with a time-dependent linear drift network,
//   dx = (-a x + f(x, t)) dt + g(t) dW,   f(x, t) = -(c0 + c1 t) x,   g(t) = 0.5 + 0.5 t,
// on a forward-time grid, simulated (Euler-Maruyama or exponential Euler, Philox noise at a
// nonzero row offset) and differentiated (sde_gradient: dL/dx_0 and dL/dxi_i of a squared
// distance, store_all and checkpoint(2)). The drift is written with Backend operations only,
// so any CPU/GPU difference comes from the backends. Running-cost columns need host Eigen
// states and are not part of this case.
#include <cstdint>
#include <string>
#include <vector>

#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/sde/sde.hpp"

namespace diffgrad::testing {

/// f(x, t) = -(c0 + c1 t) x with Backend operations (no parameters).
template <Backend B> class BackendLinearDrift {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;
  BackendLinearDrift(const B& backend, double c0, double c1) : backend_(backend), c0_(c0), c1_(c1) {}
  std::int64_t param_size() const { return 0; }
  void drift(const state_type& x, double t, state_type& out) const {
    backend_.lincomb(out, term(-(c0_ + c1_ * t), x));
  }
  void drift_vjp(const state_type&, double t, const state_type& a, state_type& dx,
                 vector_type*) const {
    backend_.lincomb(dx, term(-(c0_ + c1_ * t), a));
  }

private:
  B backend_;
  double c0_, c1_;
};

inline constexpr std::uint64_t kSdeRowOffset = 5;

template <Backend B, class IO>
Parts sde_case(const B& backend, const IO& io, sde::SdeMethod method, const Problem& p) {
  Parts parts;
  const std::vector<double> times = sde::uniform_times(p.steps, 0.0, 1.0);
  sde::SdeOptions options;
  options.method = method;
  options.ou_rate = 0.7;
  const sde::SdeScheme<B> scheme(
      backend, times, [](double t) { return 0.5 + 0.5 * t; }, p.dim, options);
  BackendLinearDrift<B> model(backend, 0.4, 0.3);

  auto x = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
  SampleOptions so;
  so.seed = p.seed;
  so.row_offset = kSdeRowOffset;
  sde::simulate(scheme, backend, model, x, so);
  add_part(parts, "x_N", io.host(x));

  const auto x0 = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
  std::vector<double> target = problem_mu_rows(p.batch, p.dim);
  for (double& v : target) v = 0.2 - v;
  SquaredDistanceLoss<B> loss(io.state(backend, target, p.batch, p.dim));
  for (int memory : {0, 1}) {
    GradientOptions go;
    go.memory = memory == 0 ? MemoryMode::store_all() : MemoryMode::checkpoint(2);
    go.seed = p.seed;
    go.row_offset = kSdeRowOffset;
    go.wrt_noise = true;
    const auto r = sde::sde_gradient(scheme, backend, model, x0, loss, go);
    const std::string tag = memory == 0 ? " (store_all)" : " (checkpoint 2)";
    add_part(parts, "x_N" + tag, io.host(r.x0));
    add_part(parts, "grad_x" + tag, io.host(r.grad_x));
    for (std::size_t i = 0; i < r.grad_noise.size(); ++i)
      add_part(parts, "grad_noise[" + std::to_string(i) + "]" + tag, io.host(r.grad_noise[i]));
  }
  return parts;
}

} // namespace diffgrad::testing
