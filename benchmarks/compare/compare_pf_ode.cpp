// Driver of bench_torchdiffeq_adjoint.py: the gradient of L = <w, x(t_min)> for the PF-ODE of
// the VP-linear schedule (t from 1 to 1e-3, uniform log-SNR grid of N steps, float64) with the
// MLP as eps, with respect to x_T and the MLP's parameters.
//
//   compare_pf_ode --weights F --x F --w F --steps N --scheme ddim|dpm++2m|dpm3s|rk4
//                  [--gradient exact|adjoint1|adjoint2m] [--memory store_all|checkpoint]
//                  [--snapshots 5] [--reps 3] [--out-grad F] [--out-grad-params F]
//   exact      the exact discrete adjoint of the scheme (gradients/gradient.hpp)
//   adjoint1/2m  AdjointDEIS-1 / -2M on the cached DDIM / DPM-Solver++ 2M trajectory
//              (gradients/adjoint_deis.hpp), the continuous adjoint discretised
// The reference ("exact" gradient of the ODE) is --scheme rk4 (rhoRK-DEIS RK4, order 4) with
// --gradient exact and large N; the script checks it by halving N.
#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/adjoint_deis.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "driver_io.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
using Mlp = diffgrad::models::Mlp<double>;

struct Outcome {
  State grad_x;
  Vector grad_params;
  double evals = 0, vjps = 0, states = 0;
};

template <class F> void with_scheme(const std::string& name, F&& f) {
  using diffgrad::SolverPrediction;
  if (name == "ddim") return f(diffgrad::Ddim());
  if (name == "dpm++2m") return f(diffgrad::DpmSolverMultistep(2, SolverPrediction::data));
  if (name == "dpm3s")
    return f(diffgrad::DpmSolverSinglestep(
        diffgrad::DpmSolverSinglestep::Options{.order = 3, .prediction = SolverPrediction::noise}));
  if (name == "rk4") return f(diffgrad::DeisRhoRk(diffgrad::DeisRkMethod::rk4));
  throw std::runtime_error("unknown --scheme " + name);
}

} // namespace

int main(int argc, char** argv) {
  try {
    const driver::Args a(argc, argv);
    const Backend backend;
    const diffgrad::VPLinearSchedule schedule;
    const int steps = a.integer("steps", 50);
    const auto nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, steps, 1.0, 1e-3));
    const std::span<const diffgrad::Node> span(nodes);
    auto model = Mlp::load(a.str("weights"));
    const State x_T = driver::read_matrix(a.str("x"));
    const State w = driver::read_matrix(a.str("w"));
    const std::string kind = a.str("gradient", "exact");
    const std::string scheme_name = a.str("scheme", "ddim");

    // One gradient, everything it needs built inside (so the first call's peak is the mode's).
    const auto once = [&]() -> Outcome {
      Outcome o;
      if (kind == "exact") {
        diffgrad::GradientOptions opt;
        opt.wrt_params = true;
        if (a.str("memory", "store_all") == "checkpoint")
          opt.memory = diffgrad::MemoryMode::checkpoint(a.integer("snapshots", 5));
        with_scheme(scheme_name, [&](const auto& scheme) {
          const auto r = diffgrad::gradient(scheme, backend, schedule, span, model, x_T, w, opt);
          o.grad_x = r.grad_x;
          o.grad_params = r.grad_params;
          o.evals = static_cast<double>(r.cost.model_evals);
          o.vjps = static_cast<double>(r.cost.vjps);
          o.states = static_cast<double>(r.cost.peak_stored_states);
        });
      } else if (kind == "adjoint1" || kind == "adjoint2m") {
        const bool second = kind == "adjoint2m";
        diffgrad::TrajectoryCache<Backend> cache(backend, steps, x_T.rows(), x_T.cols());
        cache.reset(x_T);
        State x = x_T;
        // AdjointDEIS-2M pairs with the multistep forward solver of the same order.
        const auto fwd =
            second ? diffgrad::sample(diffgrad::DpmSolverMultistep(2, diffgrad::SolverPrediction::noise),
                                      backend, schedule, span, model, x, {}, cache)
                   : diffgrad::sample(diffgrad::Ddim(), backend, schedule, span, model, x, {}, cache);
        o.grad_params = Vector::Zero(model.param_size());
        diffgrad::AdjointDeisOptions opt;
        opt.order = second ? 2 : 1;
        const auto cost = diffgrad::adjoint_deis(backend, model, span, cache.states(), w, o.grad_x,
                                                 nullptr, &o.grad_params, opt);
        o.evals = fwd.model_evals + cost.model_evals;
        o.vjps = cost.vjps;
        o.states = static_cast<double>(cache.states().size());
      } else {
        throw std::runtime_error("unknown --gradient " + kind);
      }
      return o;
    };

    double peak_mib = 0;
    Outcome first;
    {
      const driver::PeakMeter meter;
      first = once();
      peak_mib = meter.growth_mib();
    }
    if (a.has("out-grad")) driver::write_matrix(a.str("out-grad"), first.grad_x);
    if (a.has("out-grad-params"))
      driver::write_matrix(a.str("out-grad-params"), first.grad_params.transpose());
    std::vector<double> times;
    for (int r = 0; r < a.integer("reps", 3); ++r) {
      const auto start = std::chrono::steady_clock::now();
      once();
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    driver::Json()
        .add("seconds", driver::median(times))
        .add("peak_mib", peak_mib)
        .add("model_evals", first.evals)
        .add("vjps", first.vjps)
        .add("stored_states", first.states)
        .print();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_pf_ode: %s\n", e.what());
    return 1;
  }
}
