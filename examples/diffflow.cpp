// DiffFlow on a 2-D toy: trains a learned forward drift f_theta and a backward score s_theta
// (two Mlps) with the exact stochastic adjoint of the DiffFlow loss and Adam, then
//   - prints the held-out negative log-likelihood through the probability-flow ODE (RK4 in t,
//     exact trace; also Hutchinson with one probe),
//   - writes a labelled PNG: the data, the forward chain's end x_N (should look like N(0, I)),
//     samples of the backward chain (lambda = 1) and of the probability-flow ODE (lambda = 0).
// Ctrl-C stops training early (the run then evaluates what it has).
//
//   diffflow --toy two_rings --iterations 2000 --out diffflow.png
#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/font5x7.hpp"
#include "common/main_guard.hpp"
#include "common/png_writer.hpp"
#include "common/progress.hpp"
#include "diffgrad/diffflow/diffflow.hpp"
#include "diffgrad/diffflow/likelihood.hpp"
#include "diffgrad/diffflow/toy_data.hpp"
#include "diffgrad/diffflow/train.hpp"
#include "diffgrad/models/mlp.hpp"

namespace {

using namespace diffgrad::diffflow;
using State = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

std::atomic<bool> g_stop{false};
extern "C" void on_sigint(int) { g_stop = true; }

/// A row of square scatter panels over [-extent, extent]^2, each with a title, plus a caption.
class Panels {
public:
  static constexpr int kSize = 300, kPad = 10, kTitle = 22, kCaption = 18;
  Panels(int count, double extent)
      : extent_(extent), width_(count * (kSize + kPad) + kPad),
        height_(kTitle + kSize + kPad + kCaption),
        px_(static_cast<std::size_t>(width_ * height_ * 3), 255) {
    for (int p = 0; p < count; ++p) {
      const int x0 = kPad + p * (kSize + kPad);
      for (int k = -1; k <= kSize; ++k) {
        set(x0 + k, kTitle - 1, 0);
        set(x0 + k, kTitle + kSize, 0);
        set(x0 - 1, kTitle + k, 0);
        set(x0 + kSize, kTitle + k, 0);
      }
      // Axes through the origin, light.
      for (int k = 0; k < kSize; ++k) {
        set(x0 + kSize / 2, kTitle + k, 225);
        set(x0 + k, kTitle + kSize / 2, 225);
      }
    }
  }
  void title(int panel, const std::string& text) {
    examples::draw_text(px_, width_, height_, 3, kPad + panel * (kSize + kPad) + 2, 6, text, 1);
  }
  void caption(const std::string& text) {
    examples::draw_text(px_, width_, height_, 3, kPad, kTitle + kSize + kPad, text, 1);
  }
  void points(int panel, const State& x, std::uint8_t shade) {
    const int x0 = kPad + panel * (kSize + kPad);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const int cx = static_cast<int>(std::lround((x(b, 0) + extent_) / (2 * extent_) * (kSize - 1)));
      const int cy = static_cast<int>(std::lround((extent_ - x(b, 1)) / (2 * extent_) * (kSize - 1)));
      if (cx < 0 || cy < 0 || cx >= kSize || cy >= kSize) continue;
      set(x0 + cx, kTitle + cy, shade);
    }
  }
  void write(const std::string& path) const { examples::write_png(path, width_, height_, 3, px_); }

private:
  void set(int x, int y, std::uint8_t v) {
    if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
    const auto i = static_cast<std::size_t>((y * width_ + x) * 3);
    px_[i] = px_[i + 1] = px_[i + 2] = v;
  }
  double extent_;
  int width_, height_;
  std::vector<std::uint8_t> px_;
};

} // namespace

int main(int argc, char** argv) {
  return examples::run_main("diffflow", [&] {
    examples::Cli cli("diffflow",
                      "Train DiffFlow (learned forward drift + backward score, exact stochastic "
                      "adjoint) on a 2-D toy; print the PF-ODE NLL; write a labelled PNG.");
    std::string toy = "two_rings", out = examples::default_output_path("diffflow.png");
    int iterations = 2000, batch = 256, steps = 30, hidden = 64, samples = 4000, nll_samples = 1000,
        substeps = 4;
    double drift_scale = 1.0, score_scale = 1.0;
    double lr = 5e-3, g = 0.2, t_start = 0.001, t_end = 0.05, exponent = 0.9;
    std::uint64_t seed = 1;
    bool fixed_grid = false;
    cli.option("--toy", toy, "two_rings or checkerboard");
    cli.option("--iterations", iterations, "training iterations", 0);
    cli.option("--batch", batch, "training batch size", 1);
    cli.option("--steps", steps, "N: steps of the chain", 1, 100000);
    cli.option("--hidden", hidden, "width of the two hidden layers of each network", 1, 4096);
    cli.option("--lr", lr, "Adam learning rate (both networks)", 1e-8, 1.0);
    cli.option("--g", g, "constant diffusion g", 1e-6, 100.0);
    cli.option("--t-start", t_start, "first time t_0", 0.0, 1e6);
    cli.option("--t-end", t_end, "last time t_N", 1e-9, 1e6);
    cli.option("--exponent", exponent, "power grid exponent e (t uniform in t^e)", 1e-3, 100.0);
    cli.option("--drift-scale", drift_scale, "f = drift_scale / (t_end - t_start) * Mlp(x, t)",
               -1e6, 1e6);
    cli.option("--score-scale", score_scale, "s = score_scale * Mlp(x, t)", -1e6, 1e6);
    cli.flag("--fixed-grid", fixed_grid, "train on the fixed grid (default: random grids)");
    cli.option("--samples", samples, "samples drawn for the PNG", 1);
    cli.option("--nll-samples", nll_samples, "held-out points for the NLL", 1);
    cli.option("--ode-substeps", substeps, "RK4 steps per chain interval for the NLL", 1, 1000);
    cli.option("--seed", seed, "seed of data, grids, noise and initialisation");
    cli.option("--out", out, "PNG path");
    if (!cli.parse(argc, argv)) return 2;

    const ToyOptions data{.toy = parse_toy(toy)};
    const PowerTimeGrid timer(steps, t_start, t_end, exponent);
    const DiffusionFn diffusion = constant_diffusion(g);
    diffgrad::models::MlpConfig cfg;
    cfg.dim = 2;
    cfg.time_frequencies = 4;
    cfg.time_scale = 1.0 / t_end; // network time in [0, 1]
    cfg.hidden = {hidden, hidden};
    cfg.activation = diffgrad::models::Activation::silu;
    diffgrad::models::Mlp<double> drift_net(cfg, seed * 2 + 1), score_net(cfg, seed * 2 + 2);
    // Output scales: the drift must carry the data to N(0, I) within t_end - t_start, so it is
    // O(1 / T); the score of the nearly deterministic flow is O(1 / (g^2 T)) where it matters.
    ScaledField drift(drift_net, drift_scale / (t_end - t_start));
    ScaledField score(score_net, score_scale);

    std::printf("DiffFlow on %s: N = %d, t in [%g, %g], power grid e = %g (%s), g = %g\n",
                toy_name(data.toy), steps, t_start, t_end, exponent,
                fixed_grid ? "fixed" : "random per iteration", g);
    std::printf("networks: 2 Mlps 2+%d -> %d -> %d -> 2 (SiLU), %lld parameters each; Adam lr %g, "
                "batch %d\n",
                2 * cfg.time_frequencies, hidden, hidden,
                static_cast<long long>(drift.param_size()), lr, batch);
    std::signal(SIGINT, on_sigint);
    TrainOptions topt;
    topt.iterations = iterations;
    topt.batch = batch;
    topt.lr_drift = topt.lr_score = lr;
    topt.random_grid = !fixed_grid;
    topt.seed = seed;
    examples::ProgressBar bar("training", iterations);
    double window = 0;
    int in_window = 0;
    const int report_every = std::max(1, iterations / 10);
    const auto draw = [&](int b, std::uint64_t s, std::uint64_t d, State& x) { draw_toy(data, b, s, d, x); };
    const auto tr = train(drift, score, timer, diffusion, draw, topt, [&](const TrainProgress& p) {
      window += p.loss;
      ++in_window;
      char note[64];
      std::snprintf(note, sizeof note, "loss %.3f", p.loss);
      bar.update(p.iteration + 1, note);
      if ((p.iteration + 1) % report_every == 0) {
        bar.finish();
        std::printf("  iteration %6d  mean loss %.4f  (%.1f s)\n", p.iteration + 1,
                    window / in_window, p.seconds);
        window = 0;
        in_window = 0;
      }
      return !g_stop.load();
    });
    bar.finish();
    std::printf("trained %d iterations in %.1f s (%.2f ms/iteration)%s\n", tr.iterations,
                tr.seconds, tr.iterations > 0 ? 1e3 * tr.seconds / tr.iterations : 0.0,
                tr.stopped ? " [stopped by Ctrl-C]" : "");

    // Held-out NLL through the PF-ODE on the fixed grid, refined.
    State test;
    draw_toy(data, nll_samples, seed ^ 0x7e57u, 0, test);
    const Grid grid = timer.with_diffusion(timer.fixed(), diffusion);
    const auto times = refine(grid.t, substeps);
    JacobianTrace exact;
    const auto ll = pf_ode_log_likelihood(drift, score, diffusion, exact, test, times);
    HutchinsonTrace hutch({.probes = 1, .rademacher = true, .seed = seed});
    const auto llh = pf_ode_log_likelihood(drift, score, diffusion, hutch, test, times);
    const double nll = -ll.log_likelihood.mean();
    const double se = std::sqrt((ll.log_likelihood.array() + nll).square().sum() /
                                (static_cast<double>(nll_samples) * (nll_samples - 1)));
    std::printf("held-out NLL (PF-ODE, RK4 %zu steps in t): exact trace %.4f +- %.4f nats, "
                "Hutchinson (1 probe) %.4f nats\n",
                times.size() - 1, nll, se, -llh.log_likelihood.mean());
    const auto lv = DiffFlow(drift, score).loss(grid, test, {.seed = seed + 99});
    std::printf("DiffFlow loss on the held-out points (fixed grid; an upper bound of the backward "
                "chain's NLL): %.4f nats\n",
                lv.nll_bound);

    // Samples.
    State x_data, x_enc, x_chain, x_ode;
    draw_toy(data, samples, seed ^ 0xda7au, 0, x_data);
    x_enc = DiffFlow(drift, score).encode(grid, x_data, {.seed = seed + 5});
    x_chain = State(samples, 2);
    for (Eigen::Index b = 0; b < samples; ++b)
      for (int c = 0; c < 2; ++c)
        x_chain(b, c) = diffgrad::detail::gaussian(seed + 11, 0, static_cast<std::uint64_t>(b * 2 + c));
    x_ode = x_chain;
    sample(drift, score, grid, x_chain, {.stochasticity = 1.0, .seed = seed + 12});
    auto ode_times = refine(grid.t, substeps);
    std::reverse(ode_times.begin(), ode_times.end());
    const ProbabilityFlow<decltype(drift), decltype(score), DiffusionFn> flow(drift, score, diffusion);
    integrate_ode(flow, x_ode, ode_times);

    Panels panels(4, 3.2);
    panels.title(0, std::string("data: ") + toy_name(data.toy));
    panels.title(1, "forward chain x_N (want N(0,I))");
    panels.title(2, "backward chain (lambda = 1)");
    panels.title(3, "PF-ODE, RK4 (lambda = 0)");
    panels.points(0, x_data, 0);
    panels.points(1, x_enc, 0);
    panels.points(2, x_chain, 0);
    panels.points(3, x_ode, 0);
    char caption[200];
    std::snprintf(caption, sizeof caption,
                  "DiffFlow, N = %d, g = %g, %d iterations; held-out NLL %.3f nats (PF-ODE); "
                  "axes [-3.2, 3.2]",
                  steps, g, tr.iterations, nll);
    panels.caption(caption);
    panels.write(out);
    std::printf("wrote %s\n", out.c_str());
    if (!std::isfinite(nll)) {
      std::fprintf(stderr, "diffflow: the NLL is not finite\n");
      return 1;
    }
    return 0;
  });
}
