// FlowGrad steering (diffgrad/flow/flowgrad.hpp): optimise per-step controls of a generative
// ODE sampler so that its samples move toward a target point, printing the objective per
// iteration, and save scatter plots of the samples before and after.
//
//   flowgrad_steer                       DDIM on an 8-component Gaussian-mixture eps model (a
//                                        diffusion ODE), the paper's xi = 5e-3, lambda = 1e-3
//   flowgrad_steer --model flow          rectified flow to the 8 centres (a Dirac mixture),
//                                        FlowEuler; try --control kick --lr 0.02 there
//   flowgrad_steer --table               the docs/flowgrad.md tables (VJPs, gradient error)
//
// Exits non-zero when the optimisation did not lower the objective (ctest runs it).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numbers>
#include <span>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/font5x7.hpp"
#include "common/main_guard.hpp"
#include "common/png_writer.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/flowgrad.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/models/rectified_flow_mixture.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
const Backend backend;

struct Args {
  std::string model = "ddim";
  int steps = 100;
  int iterations = 30;
  std::string optimizer = "adam";
  double lr = 0.05;
  std::string control = "velocity";
  double xi = 5e-3;
  double lambda = 1e-3;
  std::string reassign = "frozen_jacobian";
  std::string batch_straightness = "max";
  int batch = 64;
  int seed = 1;
  double target_x = 1.6;
  double target_y = 1.6;
  double t_end = 0.99;
  std::string out_dir = examples::default_output_dir();
  bool no_images = false;
  bool table = false;
};

// ---- scatter plots -------------------------------------------------------------------------

/// A scatter plot of [-kExtent, kExtent]^2 with a frame, ticks and numbers on both axes, a title
/// and a legend (text in the 5x7 font of common/font5x7.hpp), so the PNG reads on its own.
class Scatter {
public:
  static constexpr int kPlot = 480; // the plot area, pixels
  static constexpr int kLeft = 48, kTop = 34, kRight = 12, kBottom = 44;
  static constexpr int kWidth = kLeft + kPlot + kRight, kHeight = kTop + kPlot + kBottom;
  static constexpr double kExtent = 2.6; // the plot shows [-kExtent, kExtent]^2

  explicit Scatter(const std::string& title)
      : px_(static_cast<std::size_t>(kWidth * kHeight * 3), 255) {
    for (int i = 0; i <= 10; ++i) { // light grid every 0.52
      const int c = static_cast<int>(std::lround((kPlot - 1) * i / 10.0));
      for (int k = 0; k < kPlot; ++k) {
        set(c, k, 230, 230, 230);
        set(k, c, 230, 230, 230);
      }
    }
    for (int k = -1; k <= kPlot; ++k) { // frame
      set(k, -1, 0, 0, 0);
      set(k, kPlot, 0, 0, 0);
      set(-1, k, 0, 0, 0);
      set(kPlot, k, 0, 0, 0);
    }
    for (int v = -2; v <= 2; ++v) { // ticks and numbers at the integers
      const int c = to_px(v), r = to_px(-v);
      for (int d = 1; d <= 5; ++d) {
        set(c, kPlot + d, 0, 0, 0);
        set(-1 - d, r, 0, 0, 0);
      }
      const std::string label = std::to_string(v);
      text(c - examples::text_width(label, 2) / 2, kPlot + 8, label, 2);
      text(-8 - examples::text_width(label, 2), r - 7, label, 2);
    }
    text(kPlot / 2 - 6, kPlot + 26, "x", 2);
    text(-kLeft + 4, -18, "y", 2);
    // The title at twice the font size where it fits, else at its own size.
    const int scale = examples::text_width(title, 2) <= kPlot + kRight ? 2 : 1;
    text(0, -kTop + (scale == 2 ? 6 : 12), title, scale);
  }
  /// One legend line (a swatch and its text) in the top-left corner of the plot area.
  void legend(const std::string& what, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    const int y = 8 + 14 * legend_lines_++;
    for (int dy = 0; dy < 8; ++dy)
      for (int dx = 0; dx < 8; ++dx) set(8 + dx, y + dy, r, g, b);
    text(22, y, what, 1);
  }
  void point(double x, double y, int radius, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    const int cx = to_px(x), cy = to_px(-y);
    for (int dy = -radius; dy <= radius; ++dy)
      for (int dx = -radius; dx <= radius; ++dx)
        if (dx * dx + dy * dy <= radius * radius) set(cx + dx, cy + dy, r, g, b);
  }
  void square(double x, double y, int half, std::uint8_t shade) {
    const int cx = to_px(x), cy = to_px(-y);
    for (int dy = -half; dy <= half; ++dy)
      for (int dx = -half; dx <= half; ++dx) set(cx + dx, cy + dy, shade, shade, shade);
  }
  void cross(double x, double y, int half) {
    const int cx = to_px(x), cy = to_px(-y);
    for (int d = -half; d <= half; ++d)
      for (int w = -1; w <= 1; ++w) {
        set(cx + d, cy + d + w, 0, 160, 0);
        set(cx + d, cy - d + w, 0, 160, 0);
      }
  }
  void write(const std::string& path) const { examples::write_png(path, kWidth, kHeight, 3, px_); }

private:
  static int to_px(double v) {
    return static_cast<int>(std::lround((v + kExtent) / (2.0 * kExtent) * (kPlot - 1)));
  }
  /// Plot-area coordinates (0, 0 = the plot's top-left); the margins are at negative / > kPlot.
  void set(int x, int y, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    x += kLeft;
    y += kTop;
    if (x < 0 || y < 0 || x >= kWidth || y >= kHeight) return;
    const auto i = static_cast<std::size_t>((y * kWidth + x) * 3);
    px_[i] = r;
    px_[i + 1] = g;
    px_[i + 2] = b;
  }
  void text(int x, int y, const std::string& t, int scale) {
    examples::draw_text(px_, kWidth, kHeight, 3, x + kLeft, y + kTop, t, scale);
  }
  std::vector<std::uint8_t> px_;
  int legend_lines_ = 0;
};

void save_scatter(const std::string& path, const State& centers, const State& samples,
                  const State& target, bool after, const std::string& title) {
  Scatter s(title);
  for (Eigen::Index k = 0; k < centers.rows(); ++k) s.square(centers(k, 0), centers(k, 1), 5, 150);
  for (Eigen::Index b = 0; b < samples.rows(); ++b) {
    if (after)
      s.point(samples(b, 0), samples(b, 1), 4, 215, 40, 40);
    else
      s.point(samples(b, 0), samples(b, 1), 4, 40, 90, 215);
  }
  s.cross(target(0, 0), target(0, 1), 9);
  if (after)
    s.legend("samples after steering", 215, 40, 40);
  else
    s.legend("samples before steering", 40, 90, 215);
  s.legend("mixture centres", 150, 150, 150);
  s.legend("target", 0, 160, 0);
  s.write(path);
  std::printf("wrote %s\n", path.c_str());
}

// ---- the problem ---------------------------------------------------------------------------

State ring(int points, double radius) {
  State c(points, 2);
  for (int k = 0; k < points; ++k) {
    const double a = 2.0 * std::numbers::pi * k / points;
    c(k, 0) = radius * std::cos(a);
    c(k, 1) = radius * std::sin(a);
  }
  return c;
}

diffgrad::ControlMode parse_control(const std::string& s) {
  if (s == "velocity") return diffgrad::ControlMode::velocity;
  if (s == "kick") return diffgrad::ControlMode::kick;
  throw diffgrad::invalid_argument("--control: expected velocity or kick, got " + s);
}
diffgrad::SegmentGradient parse_reassign(const std::string& s) {
  if (s == "frozen_jacobian") return diffgrad::SegmentGradient::frozen_jacobian;
  if (s == "frozen_velocity") return diffgrad::SegmentGradient::frozen_velocity;
  if (s == "segment") return diffgrad::SegmentGradient::segment;
  throw diffgrad::invalid_argument(
      "--reassign: expected frozen_jacobian, frozen_velocity or segment, got " + s);
}
diffgrad::BatchStraightness parse_batch_straightness(const std::string& s) {
  if (s == "max") return diffgrad::BatchStraightness::max_over_samples;
  if (s == "pooled") return diffgrad::BatchStraightness::pooled;
  throw diffgrad::invalid_argument("--batch-straightness: expected max or pooled, got " + s);
}

// Runs the optimisation with the chosen optimiser on either sampler.
template <class Run> auto with_optimizer(const Args& a, Run&& run) {
  if (a.optimizer == "adam") return run(diffgrad::Adam({.learning_rate = a.lr}));
  if (a.optimizer == "sgd") return run(diffgrad::GradientDescent(a.lr));
  throw diffgrad::invalid_argument("--optimizer: expected adam or sgd, got " + a.optimizer);
}

int steer(const Args& a) {
  const diffgrad::FlowGradOptions options{.control = parse_control(a.control),
                                          .lambda = a.lambda,
                                          .xi = a.xi,
                                          .reassign = parse_reassign(a.reassign),
                                          .batch_straightness =
                                              parse_batch_straightness(a.batch_straightness)};
  const State centers = ring(8, 1.8);
  State x0 = backend.make_state(a.batch, 2);
  backend.gaussian(x0, static_cast<std::uint64_t>(a.seed), 0);
  State target(1, 2);
  target << a.target_x, a.target_y;
  // Mean squared distance to the target over the batch.
  const diffgrad::SquaredDistanceLoss<Backend> loss(target.replicate(a.batch, 1), 1.0 / a.batch);
  auto controls = diffgrad::make_controls(backend, a.steps, a.batch, 2);

  diffgrad::FlowGradOptimizeResult<Backend> r;
  State before;
  if (a.model == "flow") {
    diffgrad::models::RectifiedFlowMixture<double> model(centers);
    const auto times = diffgrad::uniform_flow_grid(a.steps, 0.0, a.t_end);
    std::printf("rectified flow to %d points, FlowEuler, %d steps on [0, %g]\n",
                static_cast<int>(centers.rows()), a.steps, a.t_end);
    auto ws = diffgrad::make_flowgrad_workspace(backend, a.steps, x0);
    const auto nodes = diffgrad::flow_nodes(times);
    before = diffgrad::flowgrad_objective_with(diffgrad::FlowEuler(), backend,
                                               std::span<const diffgrad::Node>(nodes),
                                               diffgrad::VelocityField<decltype(model)>{model}, x0,
                                               std::span<const State>(controls), loss, options, ws)
                 .x_end;
    r = with_optimizer(a, [&](const auto& opt) {
      return diffgrad::flowgrad_optimize_flow(diffgrad::FlowEuler(), backend,
                                              std::span<const double>(times), model, x0, controls,
                                              loss, opt, options, {.iterations = a.iterations});
    });
  } else if (a.model == "ddim") {
    const Eigen::VectorXd stds = Eigen::VectorXd::Constant(8, 0.12);
    diffgrad::models::GaussianMixture<double> model(centers, stds);
    const diffgrad::VPLinearSchedule schedule;
    const auto nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, a.steps, 1.0, 1e-3));
    std::printf("Gaussian mixture (8 components, std 0.12), DDIM, %d steps (VP linear)\n", a.steps);
    auto ws = diffgrad::make_flowgrad_workspace(backend, a.steps, x0);
    before = diffgrad::flowgrad_objective_with(diffgrad::Ddim(), backend,
                                               std::span<const diffgrad::Node>(nodes),
                                               diffgrad::EpsField<decltype(model)>{model}, x0,
                                               std::span<const State>(controls), loss, options, ws)
                 .x_end;
    r = with_optimizer(a, [&](const auto& opt) {
      return diffgrad::flowgrad_optimize(
          diffgrad::Ddim(), backend, std::span<const diffgrad::Node>(nodes), model, x0, controls,
          loss, opt, options, {.iterations = a.iterations});
    });
  } else {
    throw diffgrad::invalid_argument("--model: expected flow or ddim, got " + a.model);
  }

  std::printf("control %s, %s lr %g, xi %g, lambda %g, re-assignment %s, batch %d (%s)\n",
              a.control.c_str(), a.optimizer.c_str(), a.lr, a.xi, a.lambda, a.reassign.c_str(),
              a.batch, a.batch_straightness.c_str());
  std::printf("%4s %12s %12s %12s %9s\n", "iter", "objective", "loss", "penalty", "VJPs");
  for (std::size_t i = 0; i < r.objective_history.size(); ++i) {
    const double j = r.objective_history[i], l = r.loss_history[i];
    if (i < r.segment_history.size())
      std::printf("%4zu %12.6f %12.6f %12.3e %9d\n", i, j, l, j - l, r.segment_history[i]);
    else
      std::printf("%4zu %12.6f %12.6f %12.3e %9s\n", i, j, l, j - l, "-");
  }
  std::printf("best objective %.6f at iteration %d (start %.6f); cost: %lld velocity evals, "
              "%lld VJPs (full backprop: %lld)\n",
              r.best_objective, r.best_iteration, r.objective_history.front(),
              static_cast<long long>(r.cost.model_evals), static_cast<long long>(r.cost.vjps),
              static_cast<long long>(a.iterations) * a.steps);
  if (!a.no_images) {
    const std::string what = "FlowGrad, " + a.model + ", " + std::to_string(a.steps) + " steps";
    save_scatter(a.out_dir + "/flowgrad_before.png", centers, before, target, false,
                 what + ": before");
    char after[160];
    std::snprintf(after, sizeof after, "%s: after (objective %.3g -> %.3g)", what.c_str(),
                  r.objective_history.front(), r.best_objective);
    save_scatter(a.out_dir + "/flowgrad_after.png", centers, r.best_x_end, target, true, after);
  }
  if (!(r.best_objective < r.objective_history.front())) {
    std::fprintf(stderr, "flowgrad_steer: the objective did not decrease\n");
    return 1;
  }
  return 0;
}

// ---- the docs tables -----------------------------------------------------------------------

Eigen::VectorXd stack(const std::vector<State>& u) {
  Eigen::VectorXd v(static_cast<Eigen::Index>(u.size()) * u.front().size());
  for (std::size_t k = 0; k < u.size(); ++k)
    v.segment(static_cast<Eigen::Index>(k) * u.front().size(), u.front().size()) =
        Eigen::Map<const Eigen::VectorXd>(u[k].data(), u[k].size());
  return v;
}

// One row per xi: VJPs, then relative error and cosine vs xi = 0 for each re-assignment rule.
template <class Gradient> void xi_table(const char* title, Gradient&& gradient) {
  using diffgrad::SegmentGradient;
  const SegmentGradient rules[] = {SegmentGradient::frozen_jacobian,
                                   SegmentGradient::frozen_velocity, SegmentGradient::segment};
  std::printf("\n%s\n\n", title);
  std::printf("| xi | VJPs | error (frozen_jacobian) | cosine | error (frozen_velocity) | cosine "
              "| error (segment) | cosine |\n|---|---|---|---|---|---|---|---|\n");
  const auto [exact, full_vjps] = gradient(0.0, SegmentGradient::frozen_jacobian);
  for (const double xi : {0.0, 1e-3, 5e-3, 1e-2}) {
    std::printf("| %g | %lld |", xi,
                static_cast<long long>(xi == 0.0 ? full_vjps : gradient(xi, rules[0]).second));
    for (const auto rule : rules) {
      const Eigen::VectorXd g = gradient(xi, rule).first;
      std::printf(" %.2e | %.3f |", (g - exact).norm() / exact.norm(),
                  g.dot(exact) / (g.norm() * exact.norm()));
    }
    std::printf("\n");
  }
}

int print_tables() {
  // The test problem of tests/test_flowgrad.cpp ("Dirac-mixture flow, N = 100").
  State points(4, 2);
  points << 1.5, 0.5, -1.0, 1.2, 0.3, -1.4, -1.2, -0.8;
  Eigen::VectorXd weights(4);
  weights << 1.0, 2.0, 1.5, 0.7;
  diffgrad::models::RectifiedFlowMixture<double> model(points, weights);
  State x0(1, 2), target(1, 2);
  for (int j = 0; j < 2; ++j) {
    x0(0, j) = std::sin(1.3 * j + 0.7) * 1.5;
    target(0, j) = 0.4 * std::cos(0.9 * j) + 0.2;
  }
  const diffgrad::SquaredDistanceLoss<Backend> loss(target);
  for (const double t_end : {0.99, 0.9}) {
    const auto times = diffgrad::uniform_flow_grid(100, 0.0, t_end);
    for (const auto mode : {diffgrad::ControlMode::velocity, diffgrad::ControlMode::kick}) {
      auto ws = diffgrad::make_flowgrad_workspace(backend, 100, x0);
      const auto u = diffgrad::make_controls(backend, 100, 1, 2);
      const std::string title =
          std::string("Dirac-mixture rectified flow, FlowEuler N = 100 on [0, ") +
          (t_end == 0.99 ? "0.99" : "0.9") + "], " + diffgrad::control_mode_name(mode) +
          " controls u = 0";
      xi_table(title.c_str(), [&](double xi, diffgrad::SegmentGradient rule) {
        const auto& r = diffgrad::flowgrad_gradient_flow(
            diffgrad::FlowEuler(), backend, std::span<const double>(times), model, x0,
            std::span<const State>(u), loss, {.control = mode, .xi = xi, .reassign = rule}, ws);
        return std::pair{stack(r.grad_controls), r.cost.vjps};
      });
    }
  }
  // DDIM on the Dirac-mixture eps model (the same points), 100 steps.
  diffgrad::models::DiracMixture<double> eps_model(points, weights);
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, 100, 1.0, 1e-3));
  auto ws = diffgrad::make_flowgrad_workspace(backend, 100, x0);
  const auto u = diffgrad::make_controls(backend, 100, 1, 2);
  xi_table("DDIM (VP linear, uniform t, 100 steps) on the Dirac-mixture eps model, velocity "
           "controls u = 0",
           [&](double xi, diffgrad::SegmentGradient rule) {
             const auto& r = diffgrad::flowgrad_gradient(
                 diffgrad::Ddim(), backend, std::span<const diffgrad::Node>(nodes), eps_model, x0,
                 std::span<const State>(u), loss, {.xi = xi, .reassign = rule}, ws);
             return std::pair{stack(r.grad_controls), r.cost.vjps};
           });
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("flowgrad_steer",
                    "FlowGrad: steer the samples of a 2-D mixture toward a target point by "
                    "optimising per-step controls of the sampler; saves before/after scatter "
                    "plots (blue: before, red: after, gray: mixture centres, green: target).");
  cli.option("--model", a.model,
             "ddim (Gaussian mixture, DDIM) | flow (rectified flow, FlowEuler)");
  cli.option("--steps", a.steps, "sampler steps N", 1, 1000000);
  cli.option("--iterations", a.iterations, "optimiser updates M", 1, 1000000);
  cli.option("--optimizer", a.optimizer, "adam | sgd");
  cli.option("--lr", a.lr, "learning rate (kick controls with sgd want ~1e-3)");
  cli.option("--control", a.control, "velocity (paper) | kick (authors' code)");
  cli.option("--xi", a.xi, "straightness threshold (0 = exact backprop)");
  cli.option("--lambda", a.lambda, "control penalty weight");
  cli.option("--reassign", a.reassign, "frozen_jacobian | frozen_velocity | segment");
  cli.option("--batch-straightness", a.batch_straightness,
             "max (merge where every sample is straight) | pooled (authors' code)");
  cli.option("--batch", a.batch, "samples", 1, 1000000);
  cli.option("--seed", a.seed, "noise seed", 0);
  cli.option("--target-x", a.target_x, "target point, x");
  cli.option("--target-y", a.target_y, "target point, y");
  cli.option("--t-end", a.t_end, "flow: last time of the grid (< 1; the field is singular at 1)");
  cli.option("--out-dir", a.out_dir, "where the PNGs go");
  cli.flag("--no-images", a.no_images, "skip the PNGs");
  cli.flag("--table", a.table, "print the docs/flowgrad.md tables and exit");
  if (!cli.parse(argc, argv)) return 2;
  return examples::run_main("flowgrad_steer", [&] {
    if (a.table) return print_tables();
    return steer(a);
  });
}
