#pragma once
// CPU-vs-GPU cases, written ONCE as templates over the backend: the CPU reference translation
// unit (cpu_reference.cpp) instantiates them with EigenBackend, the .cu tests with
// CudaBackend, and the results meet as host vectors. Only the library's generic code runs
// in between (sample, sample_flow, gradient, gradient_flow, invert/generate, reversible
// gradients, Cycle-SDE, AdjointDEIS), so a case passing on both backends shows that this
// code path is backend-agnostic.
//
// IO (per backend): state(backend, host values, batch, dim) -> State, host(State or Vector)
// -> std::vector<double>. MakeModel: backend -> model (a backend model or a device/CPU pair
// of the same model).
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backend_models.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/gradients/adjoint_deis.hpp"
#include "diffgrad/gradients/cycle_sde.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/gradients/sde_adjoint_deis.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/coupling.hpp"
#include "diffgrad/inversion/edict.hpp"
#include "diffgrad/inversion/edit.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::testing {

/// Named result vectors of one case, compared part by part.
using Parts = std::vector<std::pair<std::string, std::vector<double>>>;

/// Appends a part. Defined out of line (cpu_reference.cpp): GCC 12 at -O3 reports a false
/// -Warray-bounds in the inlined vector<pair<string, vector>> growth path.
void add_part(Parts& parts, std::string name, std::vector<double> values);

/// Makes the backend-generic Gaussian model for a problem.
struct MakeGaussian {
  template <Backend B, class IO>
  BackendGaussian<B> operator()(const B& backend, const IO& io, const Problem& p) const {
    return BackendGaussian<B>(
        backend, io.state(backend, problem_mu_rows(p.batch, p.dim), p.batch, p.dim), kGaussianStd);
  }
};

/// Sample with catalog scheme `index` from problem_x_T.
template <Backend B, class IO, class MakeModel>
Parts sample_case(const B& backend, const IO& io, const MakeModel& make_model, int index,
                  const Problem& p) {
  Parts parts;
  with_scheme(index, p.steps, [&](const std::string&, const auto& scheme, bool is_flow) {
    auto model = make_model(backend, io, p);
    auto x = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
    const SampleOptions options{.seed = p.seed};
    using Model = decltype(model);
    if (is_flow) {
      if constexpr (VelocityModel<Model, typename B::state_type>) {
        const std::vector<double> times = flow_times(p);
        sample_flow(scheme, backend, std::span<const double>(times), model, x, options);
      } else {
        return; // no velocity field: flow schemes do not apply to this model
      }
    } else {
      const std::vector<Node> nodes = diffusion_nodes(p);
      sample(scheme, backend, vp_schedule(), std::span<const Node>(nodes), model, x, options);
    }
    add_part(parts, "sample", io.host(x));
  });
  return parts;
}

/// How a gradient case runs (gradients/gradient.hpp options).
struct GradientSpec {
  int memory = 0; ///< 0 store_all, 1 checkpoint(snapshots), 2 recompute
  int snapshots = 3;
  bool wrt_cond = false;
  bool wrt_params = false;
  bool wrt_noise = false;
  bool given_noise = false; ///< stochastic steps read stored noise states (Cycle-SDE style)
};

inline GradientOptions gradient_options(const GradientSpec& g, const Problem& p) {
  GradientOptions o;
  o.memory = g.memory == 0   ? MemoryMode::store_all()
             : g.memory == 1 ? MemoryMode::checkpoint(g.snapshots)
                             : MemoryMode::recompute();
  o.wrt_cond = g.wrt_cond;
  o.wrt_params = g.wrt_params;
  o.wrt_noise = g.wrt_noise;
  o.seed = p.seed;
  return o;
}

/// Exact discrete gradient of L = |x0 - target|^2 / 2 through catalog scheme `index`.
template <Backend B, class IO, class MakeModel>
Parts gradient_case(const B& backend, const IO& io, const MakeModel& make_model, int index,
                    const Problem& p, const GradientSpec& g) {
  Parts parts;
  with_scheme(index, p.steps, [&](const std::string&, const auto& scheme, bool is_flow) {
    using State = typename B::state_type;
    auto model = make_model(backend, io, p);
    const State x_T = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
    std::vector<double> target_host = problem_mu_rows(p.batch, p.dim);
    for (double& v : target_host) v = 0.3 - v;
    SquaredDistanceLoss<B> loss(io.state(backend, target_host, p.batch, p.dim));
    const GradientOptions options = gradient_options(g, p);
    std::vector<State> noise;
    const auto emit = [&](const GradientResult<B>& r) {
      add_part(parts, "x0", io.host(r.x0));
      add_part(parts, "loss", std::vector<double>{r.loss});
      add_part(parts, "grad_x", io.host(r.grad_x));
      if (g.wrt_cond) add_part(parts, "grad_cond", io.host(r.grad_cond));
      if (g.wrt_params) add_part(parts, "grad_params", io.host(r.grad_params));
      for (std::size_t i = 0; i < r.grad_noise.size(); ++i)
        add_part(parts, "grad_noise[" + std::to_string(i) + "]", io.host(r.grad_noise[i]));
    };
    using Model = decltype(model);
    if (is_flow) {
      if constexpr (DifferentiableVelocityModel<Model, State, typename B::vector_type>) {
        const std::vector<double> times = flow_times(p);
        auto ws = make_gradient_workspace(scheme, backend, flow_nodes(times), model, x_T, options);
        emit(gradient_flow(scheme, backend, std::span<const double>(times), model, x_T, loss,
                           options, ws));
      } else {
        return; // no velocity field: flow schemes do not apply to this model
      }
    } else {
      const std::vector<Node> nodes = diffusion_nodes(p);
      auto ws = make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), model, x_T,
                                        options);
      if (g.given_noise) {
        for (int i = 0; i < p.steps; ++i) {
          noise.push_back(backend.make_state(p.batch, p.dim));
          backend.gaussian(noise.back(), p.seed + 100, static_cast<std::uint64_t>(i));
        }
        ws.given_noise = std::span<const State>(noise);
      }
      emit(gradient(scheme, backend, vp_schedule(), std::span<const Node>(nodes), model, x_T, loss,
                    options, ws));
    }
  });
  return parts;
}

/// The exactly invertible methods (inversion/*.hpp): f(name, method).
template <class F> void for_each_inversion_method(F&& f) {
  f(std::string("BDIA gamma=1"), BdiaDdim(1.0));
  f(std::string("BDIA gamma=0.5"), BdiaDdim(0.5));
  f(std::string("EDICT p=0.93"), Edict(0.93));
  f(std::string("EDICT leapfrog"), Edict(0.9, true));
  f(std::string("coupling DDIM"), ReversibleCoupling(Ddim(), 0.999));
  f(std::string("coupling DPM-Solver-2"),
    ReversibleCoupling(DpmSolverSinglestep(2, SolverPrediction::data), 0.99));
  f(std::string("coupling DPM-Solver-3"),
    ReversibleCoupling(DpmSolverSinglestep(3, SolverPrediction::data), 0.99));
}
inline int inversion_method_count() {
  int n = 0;
  for_each_inversion_method([&](const std::string&, const auto&) { ++n; });
  return n;
}
template <class F> void with_inversion_method(int index, F&& f) {
  int i = 0;
  for_each_inversion_method([&](const std::string& name, const auto& method) {
    if (i++ == index) f(name, method);
  });
}

/// sample_from_noise, invert the sample, generate from the latent; the reversible gradient of
/// <w, sample> w.r.t. x_T; and an edit (invert_and_regenerate under a shifted Gaussian).
template <Backend B, class IO, class MakeModel>
Parts inversion_case(const B& backend, const IO& io, const MakeModel& make_model, int index,
                     const Problem& p) {
  Parts parts;
  with_inversion_method(index, [&](const std::string&, const auto& method) {
    using State = typename B::state_type;
    auto model = make_model(backend, io, p);
    const std::vector<Node> nodes = diffusion_nodes(p);
    const std::span<const Node> ns(nodes);
    State x = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
    const State x_T = x;
    sample_from_noise(method, backend, vp_schedule(), ns, model, x);
    add_part(parts, "sample_from_noise", io.host(x));
    LatentPair<State> latent;
    invert(method, backend, vp_schedule(), ns, model, x, latent);
    add_part(parts, "latent.first", io.host(latent.first));
    add_part(parts, "latent.second", io.host(latent.second));
    State regenerated = backend.make_state(p.batch, p.dim);
    generate(method, backend, vp_schedule(), ns, model, latent, regenerated);
    add_part(parts, "generate(invert(x))", io.host(regenerated));
    std::vector<double> w_host = problem_x_T(p.batch, p.dim);
    for (double& v : w_host) v = 0.5 * v + 0.1;
    const State w = io.state(backend, w_host, p.batch, p.dim);
    const auto r = reversible_gradient(
        method, backend, vp_schedule(), ns, model, x_T,
        [&](const State&, State& out) { backend.copy(out, w); },
        ReversibleGradientOptions{.want_cond = false, .want_params = false});
    add_part(parts, "reversible sample", io.host(r.sample));
    add_part(parts, "reversible grad_x", io.host(r.grad_x));
    // Editing: invert under the model, regenerate under a Gaussian with a shifted mean.
    std::vector<double> shifted = problem_mu_rows(p.batch, p.dim);
    for (double& v : shifted) v += 0.5;
    BackendGaussian<B> target(backend, io.state(backend, shifted, p.batch, p.dim), kGaussianStd);
    State edited = backend.make_state(p.batch, p.dim);
    const auto e = invert_and_regenerate(method, backend, vp_schedule(), ns, model, target, x,
                                         edited, EditOptions{.measure_round_trip = false});
    add_part(parts, "invert_and_regenerate edited", io.host(edited));
    add_part(parts, "invert_and_regenerate edit_change", std::vector<double>{e.edit_change});
  });
  return parts;
}

/// Cycle-SDE: record an SDE-DPM-Solver-2 (data) path, encode it into per-step noises, replay;
/// then AdjointDEIS-1/-2M (cached and re-solved) and SDE-AdjointDEIS on the recorded paths.
template <Backend B, class IO, class MakeModel>
Parts continuous_case(const B& backend, const IO& io, const MakeModel& make_model,
                      const Problem& p) {
  using State = typename B::state_type;
  Parts parts;
  auto model = make_model(backend, io, p);
  const std::vector<Node> nodes = diffusion_nodes(p);
  const std::span<const Node> ns(nodes);
  const State x_T = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
  std::vector<double> g_host = problem_mu_rows(p.batch, p.dim);
  for (double& v : g_host) v = 1.0 - v;
  const State grad_x0 = io.state(backend, g_host, p.batch, p.dim);

  // SDE path, Cycle-SDE encode + replay.
  const SdeDpmSolver sde(2, SolverPrediction::data);
  TrajectoryCache<B> sde_path(backend, p.steps, p.batch, p.dim);
  State x = x_T;
  sde_path.reset(x);
  sample(sde, backend, vp_schedule(), ns, model, x, SampleOptions{.seed = p.seed}, sde_path);
  add_part(parts, "SDE sample", io.host(x));
  std::vector<State> noises;
  for (int i = 0; i < p.steps; ++i) noises.push_back(backend.make_state(p.batch, p.dim));
  cycle_sde_encode(sde, backend, vp_schedule(), ns, model, sde_path.states(),
                   std::span<State>(noises));
  add_part(parts, "Cycle-SDE noise[0]", io.host(noises.front()));
  add_part(parts, "Cycle-SDE noise[last]", io.host(noises.back()));
  State replayed = x_T;
  cycle_sde_replay(sde, backend, vp_schedule(), ns, model, replayed,
                   std::span<const State>(noises));
  add_part(parts, "Cycle-SDE replay", io.host(replayed));
  State grad = backend.make_state(p.batch, p.dim);
  sde_adjoint_deis(backend, model, ns, sde_path.states(), grad_x0, grad);
  add_part(parts, "SDE-AdjointDEIS-1 grad_xT", io.host(grad));

  // ODE path (DDIM), AdjointDEIS-1 and -2M cached, and -1 re-solved.
  TrajectoryCache<B> ode_path(backend, p.steps, p.batch, p.dim);
  x = x_T;
  ode_path.reset(x);
  sample(Ddim(), backend, vp_schedule(), ns, model, x, SampleOptions{}, ode_path);
  for (int order = 1; order <= 2; ++order) {
    adjoint_deis(backend, model, ns, ode_path.states(), grad_x0, grad, nullptr, nullptr,
                 AdjointDeisOptions{.order = order});
    add_part(parts, "AdjointDEIS-" + std::to_string(order) + " grad_xT", io.host(grad));
  }
  adjoint_deis_resolve(backend, model, ns, x, grad_x0, grad);
  add_part(parts, "AdjointDEIS-1 re-solved grad_xT", io.host(grad));
  add_part(parts, "AdjointDEIS-1 re-solved x_T", io.host(x));
  return parts;
}

} // namespace diffgrad::testing
