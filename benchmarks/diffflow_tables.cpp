// DiffFlow table: held-out NLL (nats, PF-ODE in t with the exact trace) on a 2-D toy for
//   - DiffFlow: learned drift f_theta (Mlp) + score s_theta (Mlp), g = 0.2, t in [0.001, 0.05],
//     power grid e = 0.9, random grids, N steps (the paper's 2-D setting);
//   - a VP diffusion baseline: fixed drift f = -beta(t) x / 2, g = sqrt(beta(t)),
//     beta(t) = 0.1 + 19.9 t on [0.001, 1] (x_N ~ N(0, I) up to e^-5), the same score Mlp, the
//     same loss (the discrete path KL, i.e. DDPM's L with an Euler chain), N steps, the same
//     iterations, batch and Adam step;
// and the training time of each. Both NLLs integrate the probability-flow ODE on the same kind
// of grid (power e = 0.5 in t, i.e. denser at the data end, `--ode-steps` RK4 steps).
//
//   diffflow_tables --iterations 2000 --batch 256 --steps 30 [--checkpoints s]
//
// The chains and their gradients run on the library's engine and exact discrete adjoint
// (docs/diffflow.md section 2); --checkpoints picks its memory mode (same bits, other cost).
#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/main_guard.hpp"
#include "diffgrad/diffflow/diffflow.hpp"
#include "diffgrad/diffflow/likelihood.hpp"
#include "diffgrad/diffflow/toy_data.hpp"
#include "diffgrad/diffflow/train.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/mlp.hpp"

namespace {

using namespace diffgrad::diffflow;
using Net = diffgrad::models::Mlp<double>;
using State = Net::state_type;

struct Row {
  std::string name;
  double nll = 0, nll_se = 0, bound = 0, seconds = 0;
  int iterations = 0;
  long long params = 0;
};

struct Setup {
  ToyOptions toy;
  int iterations = 2000, batch = 256, steps = 30, hidden = 64, nll_samples = 2000, ode_steps = 240;
  double lr = 3e-3;
  int checkpoints = 0; ///< 0: MemoryMode::store_all(); s > 0: checkpoint(s)
  std::uint64_t seed = 1;
};

/// Denoising score matching for the VP baseline (the usual way a diffusion model is trained):
/// per iteration `groups` times t ~ U(t0, 1), each shared by batch/groups samples (Mlp takes one
/// t per call), x_t = alpha x_0 + sigma eps, loss |eps_hat(x_t, t) - eps|^2 / 2 for the noise
/// network eps_hat (score s = -eps_hat / sigma): the usual epsilon-prediction objective.
template <class EpsNet, class Alpha>
double train_dsm(EpsNet& score, Alpha&& alpha_of, double t0, const Setup& s, int groups) {
  diffgrad::Adam adam({.learning_rate = s.lr});
  const int per = std::max(1, s.batch / groups);
  State x0, eps(per, 2), xt, out, a, dx;
  Eigen::VectorXd grad(score.param_size());
  const auto start = std::chrono::steady_clock::now();
  for (int it = 0; it < s.iterations; ++it) {
    grad.setZero();
    draw_toy(s.toy, per * groups, s.seed, static_cast<std::uint64_t>(it), x0);
    for (int k = 0; k < groups; ++k) {
      const std::uint64_t key = static_cast<std::uint64_t>(it) * 4096 + static_cast<std::uint64_t>(k);
      const auto r = diffgrad::detail::philox4x32_10(
          diffgrad::detail::Philox4x32{{static_cast<std::uint32_t>(k), static_cast<std::uint32_t>(it),
                                        0x64736du /* "dsm" */, 0u}},
          s.seed + 3);
      const double u = diffgrad::detail::uniform_open0(r.v[0], r.v[1]);
      const double t = t0 + (1.0 - t0) * u; // t ~ U(t0, 1]
      const double alpha = alpha_of(t), sigma = std::sqrt(1.0 - alpha * alpha);
      for (int b = 0; b < per; ++b)
        for (int c = 0; c < 2; ++c)
          eps(b, c) = diffgrad::detail::gaussian(s.seed + 4, key, static_cast<std::uint64_t>(2 * b + c));
      xt = alpha * x0.middleRows(k * per, per) + sigma * eps;
      score.velocity(xt, t, out);
      a = (out - eps) / static_cast<double>(per * groups); // out = eps_hat, s = -eps_hat / sigma
      score.velocity_vjp(xt, t, a, dx, nullptr, &grad);
    }
    adam.step(score.params(), grad);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

template <class Drift, class Score>
Row run(const std::string& name, Drift& drift, Score& score, const PowerTimeGrid& timer,
        const DiffusionFn& g, const Setup& s) {
  TrainOptions o;
  o.iterations = s.iterations;
  o.batch = s.batch;
  o.lr_drift = o.lr_score = s.lr;
  o.seed = s.seed;
  o.memory = s.checkpoints > 0 ? diffgrad::MemoryMode::checkpoint(s.checkpoints)
                               : diffgrad::MemoryMode::store_all();
  const auto data = [&](int b, std::uint64_t seed, std::uint64_t draw, State& x) {
    draw_toy(s.toy, b, seed, draw, x);
  };
  std::fprintf(stderr, "%s: training %d iterations...\n", name.c_str(), s.iterations);
  const auto tr = train(drift, score, timer, g, data, o, [&](const TrainProgress& p) {
    if ((p.iteration + 1) % std::max(1, s.iterations / 5) == 0)
      std::fprintf(stderr, "  %d: loss %.4f (%.1f s)\n", p.iteration + 1, p.loss, p.seconds);
    return true;
  });
  State test;
  draw_toy(s.toy, s.nll_samples, s.seed ^ 0x7e57u, 0, test);
  JacobianTrace trace;
  const auto times = PowerTimeGrid(s.ode_steps, timer.t_start(), timer.t_end(), 0.5).fixed();
  const auto ll = pf_ode_log_likelihood(drift, score, g, trace, test, times);
  Row r;
  r.name = name;
  r.nll = -ll.log_likelihood.mean();
  r.nll_se = std::sqrt((ll.log_likelihood.array() + r.nll).square().sum() /
                       (static_cast<double>(test.rows()) * static_cast<double>(test.rows() - 1)));
  const Grid grid = timer.with_diffusion(timer.fixed(), g);
  r.bound = DiffFlow(drift, score).loss(grid, test, {.seed = s.seed + 99}).nll_bound;
  r.seconds = tr.seconds;
  r.iterations = tr.iterations;
  r.params = static_cast<long long>(drift.param_size() + score.param_size());
  return r;
}

} // namespace

int main(int argc, char** argv) {
  return examples::run_main("diffflow_tables", [&] {
    examples::Cli cli("diffflow_tables",
                      "NLL of DiffFlow vs a VP diffusion baseline (same networks, loss and "
                      "budget) on a 2-D toy, and training time.");
    Setup s;
    std::string toy = "two_rings";
    cli.option("--toy", toy, "two_rings or checkerboard");
    cli.option("--iterations", s.iterations, "training iterations (each model)", 0);
    cli.option("--batch", s.batch, "batch size", 1);
    cli.option("--steps", s.steps, "N: chain steps (each model)", 1, 100000);
    cli.option("--hidden", s.hidden, "hidden width (2 hidden layers)", 1, 4096);
    cli.option("--lr", s.lr, "Adam step", 1e-8, 1.0);
    cli.option("--nll-samples", s.nll_samples, "held-out points", 2);
    cli.option("--ode-steps", s.ode_steps, "RK4 steps of the PF-ODE", 1, 1000000);
    cli.option("--seed", s.seed, "seed");
    cli.option("--checkpoints", s.checkpoints,
               "memory of the engine's adjoint: 0 = store_all, s > 0 = checkpoint(s)", 0);
    std::string models = "diffflow,vp,dsm";
    cli.option("--models", models, "rows to run: any of diffflow, vp, dsm (comma separated)");
    if (!cli.parse(argc, argv)) return 2;
    s.toy.toy = parse_toy(toy);

    const auto config = [&](double time_scale) {
      diffgrad::models::MlpConfig c;
      c.dim = 2;
      c.time_frequencies = 4;
      c.time_scale = time_scale;
      c.hidden = {s.hidden, s.hidden};
      c.activation = diffgrad::models::Activation::silu;
      return c;
    };
    std::vector<Row> rows;
    const auto wanted = [&](const char* m) { return models.find(m) != std::string::npos; };
    if (wanted("diffflow")) {
      const double t0 = 0.001, t1 = 0.05;
      Net drift_net(config(1.0 / t1), 2 * s.seed + 1), score(config(1.0 / t1), 2 * s.seed + 2);
      ScaledField drift(drift_net, 1.0 / (t1 - t0));
      rows.push_back(run("DiffFlow (learned f, g = 0.2, T = 0.05)", drift, score,
                         PowerTimeGrid(s.steps, t0, t1, 0.9), constant_diffusion(0.2), s));
    }
    if (wanted("vp")) {
      const double b0 = 0.1, b1 = 20.0;
      const auto beta = [=](double t) { return b0 + (b1 - b0) * t; };
      const auto alpha = [=](double t) { return std::exp(-0.5 * (b0 * t + 0.5 * (b1 - b0) * t * t)); };
      LinearDrift<double> drift([=](double t) { return -0.5 * beta(t); });
      Net eps(config(1.0), 2 * s.seed + 2);
      ScaledField score(eps, [=](double t) { return -1.0 / std::sqrt(1.0 - alpha(t) * alpha(t)); });
      rows.push_back(run("VP baseline, path-KL loss (f = -beta x/2, g = sqrt(beta), T = 1)", drift, score,
                         PowerTimeGrid(s.steps, 1e-3, 1.0, 1.0),
                         [=](double t) { return std::sqrt(beta(t)); }, s));
    }
    if (wanted("dsm")) {
      const double b0 = 0.1, b1 = 20.0, t0 = 1e-3;
      const auto beta = [=](double t) { return b0 + (b1 - b0) * t; };
      const auto alpha = [=](double t) { return std::exp(-0.5 * (b0 * t + 0.5 * (b1 - b0) * t * t)); };
      LinearDrift<double> drift([=](double t) { return -0.5 * beta(t); });
      Net eps(config(1.0), 2 * s.seed + 2);
      ScaledField score(eps, [=](double t) { return -1.0 / std::sqrt(1.0 - alpha(t) * alpha(t)); });
      std::fprintf(stderr, "VP baseline, denoising score matching: training %d iterations...\n",
                   s.iterations);
      const double secs = train_dsm(eps, alpha, t0, s, 16);
      Setup none = s;
      none.iterations = 0;
      const DiffusionFn g = [=](double t) { return std::sqrt(beta(t)); };
      Row r = run("VP baseline, denoising score matching (16 t per batch)", drift, score,
                  PowerTimeGrid(s.steps, t0, 1.0, 1.0), g, none);
      r.seconds = secs;
      r.iterations = s.iterations;
      rows.push_back(r);
    }
    std::printf("\nDiffFlow vs VP baseline on %s: %d iterations, batch %d, N = %d, 2 x %d hidden "
                "SiLU Mlps, Adam %g; NLL on %d held-out points (PF-ODE, RK4 %d steps, exact "
                "trace); adjoint memory %s\n\n",
                toy_name(s.toy.toy), s.iterations, s.batch, s.steps, s.hidden, s.lr,
                s.nll_samples, s.ode_steps,
                s.checkpoints > 0 ? ("checkpoint(" + std::to_string(s.checkpoints) + ")").c_str()
                                  : "store_all");
    std::printf("| model | params | NLL (nats) | path-KL bound (nats) | train time (s) | ms/iter |\n");
    std::printf("|---|---:|---:|---:|---:|---:|\n");
    for (const auto& r : rows)
      std::printf("| %s | %lld | %.3f +- %.3f | %.3f | %.1f | %.1f |\n", r.name.c_str(), r.params,
                  r.nll, r.nll_se, r.bound, r.seconds,
                  r.iterations > 0 ? 1e3 * r.seconds / r.iterations : 0.0);
    return 0;
  });
}
