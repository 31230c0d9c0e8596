// DF-EA-guided generation: steer samples of a 2-D Dirac mixture (a 3 x 3 grid) toward a target
// with the gradient of L(x0) = |x0 - target|^2 / 2 through the sampler, computed by the exact
// discrete adjoint with three stand-ins for the model's VJP:
//   exact VJP        the mixture's own d eps/dx (what a network's autodiff would give)
//   DF-EA            sigma F_EA a with x0_end = the sampler's (denoised) output: two dot
//                    products, no derivative of the model (fisher/df_ea.hpp)
//   I/sigma^2        the covariance-free baseline (DF-EA with x0_end = x0_hat)
// Guidance: sample unguided from t = 1 to t_guide, then take K normalised gradient steps on
// x_{t_guide} (x <- x - lr sigma g/|g| per sample, the paper's normalisation) through N DDIM
// steps to t = 1e-3, then report the loss and how many samples reach the data point nearest the
// target. Exits non-zero if DF-EA guidance does not lower the mean loss (ctest runs it).
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/main_guard.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/fisher/df_ea.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Mixture = diffgrad::models::DiracMixture<double>;
namespace fisher = diffgrad::fisher;

struct Args {
  double t_guide = 0.1;
  int steps = 10;
  int iterations = 20;
  double lr = 0.3;
  int batch = 256;
  std::string target = "0.8,0.9";
  std::uint64_t seed = 0;
};

/// Reads "X,Y" into x and y; false unless the text is two finite numbers separated by a comma
/// (read as strictly as examples::Cli reads numbers: no spaces, no inf or nan).
bool parse_point(const std::string& text, double& x, double& y) {
  const auto comma = text.find(',');
  if (comma == std::string::npos) return false;
  const auto read = [](const char* first, const char* last, double& v) {
    const auto [end, ec] = std::from_chars(first, last, v);
    return ec == std::errc() && end == last && first != last && std::isfinite(v);
  };
  return read(text.data(), text.data() + comma, x) &&
         read(text.data() + comma + 1, text.data() + text.size(), y);
}

State grid_points() {
  State y(9, 2);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      y(3 * i + j, 0) = -1.0 + i;
      y(3 * i + j, 1) = -1.0 + j;
    }
  return y;
}

/// The covariance-free stand-in F ~ I/sigma^2.
struct IdentityFisher {
  const Mixture& mixture;
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  void eps(const State& x, const diffgrad::Node& n, State& out) const { mixture.eps(x, n, out); }
  void vjp(const State&, const diffgrad::Node& n, const State& a, State& dx, Backend::vector_type*,
           Backend::vector_type*) const {
    dx = a / n.sigma;
  }
};

struct Outcome {
  double loss = 0.0;    // mean L at the end
  double hit = 0.0;     // fraction of samples ending at the data point nearest the target
  double seconds = 0.0; // guidance wall time
  long vjps = 0;        // model VJPs requested by the adjoint
};

int run(const Args& args, double target_x, double target_y);

} // namespace

int main(int argc, char** argv) {
  Args args;
  examples::Cli cli("dfea_guidance",
                    "Guide DDIM samples of a 3 x 3 grid of points toward a target with the "
                    "gradient through\nthe sampler: exact VJP vs DF-EA (no model derivative) "
                    "vs the I/sigma^2 baseline.");
  cli.option("--t-guide", args.t_guide, "guidance time (VP-linear t in (1e-3, 1))", 1e-3, 1.0);
  cli.option("--steps", args.steps, "DDIM steps from t_guide to 1e-3", 1);
  cli.option("--iterations", args.iterations, "normalised gradient steps on x_t_guide", 0);
  cli.option("--lr", args.lr, "step length, in units of sigma(t_guide)", 0.0);
  cli.option("--batch", args.batch, "samples", 1);
  cli.option("--target", args.target, "the target point X,Y");
  cli.option("--seed", args.seed, "Philox seed of the initial noise");
  if (!cli.parse(argc, argv)) return 2;
  double target_x = 0, target_y = 0;
  if (!parse_point(args.target, target_x, target_y) || !(args.t_guide > 1e-3) ||
      !(args.t_guide < 1.0) || !(args.lr > 0)) {
    std::fprintf(stderr,
                 "dfea_guidance: need --target X,Y (two finite numbers), 1e-3 < --t-guide < 1 "
                 "(the first grid runs from t = 1 to t_guide), --lr > 0; got --target '%s', "
                 "--t-guide %g, --lr %g\n",
                 args.target.c_str(), args.t_guide, args.lr);
    return 2;
  }
  return examples::run_main("dfea_guidance", [&] { return run(args, target_x, target_y); });
}

namespace {

int run(const Args& args, double target_x, double target_y) {
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const State data = grid_points();
  Mixture mixture(data);
  const Eigen::RowVector2d target(target_x, target_y);
  Eigen::Index nearest = 0;
  (data.rowwise() - target).rowwise().squaredNorm().minCoeff(&nearest);

  // Unguided start at t_guide.
  const auto to_guide = diffgrad::make_nodes(
      schedule, diffgrad::uniform_lambda_grid(schedule, 100, 1.0, args.t_guide));
  State x_guide(args.batch, 2);
  backend.gaussian(x_guide, args.seed, 0);
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, std::span<const diffgrad::Node>(to_guide),
                   mixture, x_guide);
  const auto nodes = diffgrad::make_nodes(
      schedule, diffgrad::uniform_lambda_grid(schedule, args.steps, args.t_guide, 1e-3));
  const std::span<const diffgrad::Node> span(nodes);
  const double sigma = nodes.front().sigma;
  const diffgrad::SquaredDistanceLoss<Backend> loss(State(target.replicate(args.batch, 1)));

  const auto finish = [&](const State& x_t, Outcome& o) {
    State x = x_t;
    diffgrad::sample(diffgrad::Ddim(), backend, schedule, span, mixture, x);
    State hat;
    mixture.x0_hat(x, nodes.back(), hat); // the data point each sample landed on
    o.loss = 0.5 * (x.rowwise() - target).rowwise().squaredNorm().mean();
    int hits = 0;
    for (Eigen::Index b = 0; b < hat.rows(); ++b)
      hits += (hat.row(b) - data.row(nearest)).norm() < 1e-3;
    o.hit = static_cast<double>(hits) / static_cast<double>(hat.rows());
  };
  // K normalised gradient steps with the gradient from `grad_of(x, ws)`.
  const auto guide = [&](auto& model, auto&& loss_fn) {
    Outcome o;
    State x = x_guide;
    auto ws = diffgrad::make_gradient_workspace(diffgrad::Ddim(), backend, span, model, x);
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < args.iterations; ++k) {
      const auto& r =
          diffgrad::gradient(diffgrad::Ddim(), backend, schedule, span, model, x, loss_fn, {}, ws);
      o.vjps += static_cast<long>(r.cost.vjps);
      for (Eigen::Index b = 0; b < x.rows(); ++b) {
        const double g = r.grad_x.row(b).norm();
        if (g > 0 && std::isfinite(g)) x.row(b) -= (args.lr * sigma / g) * r.grad_x.row(b);
      }
    }
    o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    finish(x, o);
    return o;
  };

  Outcome none;
  finish(x_guide, none);
  const Outcome exact = guide(mixture, loss);
  struct EpsOnly { // what DF-EA sees: eps, nothing else
    const Mixture& m;
    void eps(const State& x, const diffgrad::Node& n, State& out) const { m.eps(x, n, out); }
  } eps_only{mixture};
  fisher::DfEaModel dfea(eps_only);
  fisher::DfEaEndpointLoss denoised(dfea, loss, nodes.back());
  Outcome ea = guide(dfea, denoised);
  fisher::DfEaEndpointLoss raw(dfea, loss);
  const Outcome ea_raw = guide(dfea, raw);
  IdentityFisher identity{mixture};
  const Outcome id = guide(identity, loss);

  std::printf(
      "Guidance toward (%.2f, %.2f) (nearest data point (%.0f, %.0f)) at t = %.3g (sigma %.3f), "
      "%d DDIM steps to t = 1e-3, %d normalised steps of %.2f sigma, %d samples\n",
      target(0), target(1), data(nearest, 0), data(nearest, 1), args.t_guide, sigma, args.steps,
      args.iterations, args.lr, args.batch);
  std::printf(
      "| gradient | mean loss | samples at the nearest point | model VJPs | guidance time (s) |\n"
      "|---|---|---|---|---|\n");
  const auto row = [](const char* name, const Outcome& o, const char* vjps) {
    std::printf("| %s | %.4f | %.1f%% | %s | %.3f |\n", name, o.loss, 100 * o.hit, vjps, o.seconds);
  };
  row("none (unguided)", none, "0");
  const std::string exact_vjps = std::to_string(exact.vjps);
  row("exact VJP", exact, exact_vjps.c_str());
  row("DF-EA, denoised endpoint", ea, "0");
  row("DF-EA, raw endpoint", ea_raw, "0");
  row("I/sigma^2 baseline", id, "0");
  if (!(ea.loss < none.loss)) {
    std::printf("FAILED: DF-EA guidance did not lower the mean loss\n");
    return 1;
  }
  return 0;
}

} // namespace
