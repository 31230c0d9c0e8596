// Round-trip editing with exact inversion: invert a data sample under one conditioning,
// change the conditioning, regenerate. The model is the exact eps of Gaussian data N(mu, s^2 I)
// whose mean mu is the conditioning, so the ideal (ODE-exact) edit is known in closed form
// and every number printed can be judged:
//   round trip   regenerate under the SAME conditioning: exact inversion gives x0 back to
//                rounding; naive DDIM inversion does not;
//   edit error   the edited sample against the closed-form edit (discretisation error);
//   growth       the amplification diagnostic of the inversion (1 for BDIA gamma = 1).
// Exits non-zero if an exact method whose predicted growth is under the threshold round-trips
// worse than 1e-12, so ctest runs it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/main_guard.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/coupling.hpp"
#include "diffgrad/inversion/edict.hpp"
#include "diffgrad/inversion/edit.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Model = diffgrad::models::GaussianData<double>;

struct Args {
  std::string method = "all";
  int steps = 50;
  double gamma = 1.0;
  double p = 0.93;
  double c = 0.999;
  int batch = 8;
  int dim = 16;
};

double rel(const State& a, const State& b) { return (a - b).norm() / b.norm(); }

/// Inverts x0 under `source`, regenerates under `target`; prints one line; returns the
/// round-trip error, or 0 when the amplification diagnostic already warned that rounding
/// errors would grow too much for an accurate round trip.
template <class Method>
double run(const char* name, const Method& method, const diffgrad::VPLinearSchedule& schedule,
           std::span<const diffgrad::Node> nodes, Model& source, Model& target, const State& x0,
           const State& exact_edit) {
  State edited;
  diffgrad::EditOptions options;
  options.amplification.policy = diffgrad::AmplificationPolicy::warn;
  const auto r = diffgrad::invert_and_regenerate(method, Backend(), schedule, nodes, source, target,
                                                 x0, edited, options);
  std::printf("%-28s round trip %9.2e   edit error %9.2e   growth %9.3g%s   model calls %d\n", name,
              r.round_trip_error, rel(edited, exact_edit), r.inversion.amplification.total,
              r.inversion.amplification.warned ? " (WARNING: above threshold)" : "", r.model_evals);
  return r.inversion.amplification.warned ? 0.0 : r.round_trip_error;
}

} // namespace

int main(int argc, char** argv) {
  Args args;
  examples::Cli cli("invert_edit", "Invert samples of Gaussian data under mean mu (the "
                                   "conditioning), shift mu, regenerate.");
  cli.option("--method", args.method, "bdia | edict | coupling | all");
  cli.option("--steps", args.steps, "number of sampler steps", 1, 1000000);
  cli.option("--gamma", args.gamma, "BDIA mixing, 0 < G <= 1");
  cli.option("--p", args.p, "EDICT mixing, 0 < P <= 1");
  cli.option("--c", args.c, "coupling parameter, 0 < C <= 1");
  cli.option("--batch", args.batch, "samples", 1, 1000000);
  cli.option("--dim", args.dim, "dimension", 1, 1000000);
  if (!cli.parse(argc, argv)) return 2;
  if (args.method != "all" && args.method != "bdia" && args.method != "edict" &&
      args.method != "coupling") {
    std::fprintf(stderr, "invert_edit: --method must be bdia, edict, coupling or all, not '%s'\n",
                 args.method.c_str());
    return 2;
  }
  return examples::run_main("invert_edit", [&] {
    const diffgrad::VPLinearSchedule schedule;
    const auto nodes =
        diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, args.steps, 1.0, 1e-3));
    const diffgrad::Node &noise_node = nodes.front(), &data_node = nodes.back();

    Eigen::VectorXd mu_source(args.dim), mu_target(args.dim);
    for (int j = 0; j < args.dim; ++j) {
      mu_source(j) = std::sin(0.7 * j);
      mu_target(j) = mu_source(j) + (j % 2 == 0 ? 0.5 : -0.5); // the "changed prompt"
    }
    Model source(mu_source, 0.5), target(mu_target, 0.5);

    // A data sample: Philox noise pushed through the exact flow of the source model.
    const Backend backend;
    State x_T = backend.make_state(args.batch, args.dim);
    backend.gaussian(x_T, /*seed=*/7, /*step=*/0);
    const State x0 = source.exact_flow(x_T, noise_node, data_node);
    // The ideal edit: exact inverse flow under the source, exact flow under the target.
    const State exact_edit =
        target.exact_flow(source.exact_flow(x0, data_node, noise_node), noise_node, data_node);

    std::printf("Gaussian data, d = %d, batch %d, %d steps, VP-linear schedule; mu shifted by "
                "+-0.5 (edit size %.3f)\n",
                args.dim, args.batch, args.steps, rel(exact_edit, x0));

    // Naive DDIM inversion for comparison: not exact, its round trip drifts.
    {
      std::vector<diffgrad::Node> reversed(nodes.rbegin(), nodes.rend());
      State z = x0;
      diffgrad::sample(diffgrad::DdimInversion(), backend, schedule, reversed, source, z);
      State back = z, edited = z;
      diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, source, back);
      diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, target, edited);
      std::printf("%-28s round trip %9.2e   edit error %9.2e   (not exact)\n",
                  "DDIM inversion (naive)", rel(back, x0), rel(edited, exact_edit));
    }

    double worst = 0.0;
    char label[64];
    if (args.method == "all" || args.method == "bdia") {
      std::snprintf(label, sizeof label, "BDIA-DDIM gamma=%g", args.gamma);
      worst = std::max(worst, run(label, diffgrad::BdiaDdim(args.gamma), schedule, nodes, source,
                                  target, x0, exact_edit));
    }
    if (args.method == "all" || args.method == "edict") {
      std::snprintf(label, sizeof label, "EDICT p=%g", args.p);
      worst = std::max(worst, run(label, diffgrad::Edict(args.p), schedule, nodes, source, target,
                                  x0, exact_edit));
    }
    if (args.method == "all" || args.method == "coupling") {
      std::snprintf(label, sizeof label, "coupled DDIM c=%g", args.c);
      worst = std::max(worst, run(label, diffgrad::ReversibleCoupling(diffgrad::Ddim(), args.c),
                                  schedule, nodes, source, target, x0, exact_edit));
    }
    if (!(worst <= 1e-12)) {
      std::printf("FAILED: an exact inversion's round trip is %.2e (> 1e-12) although its "
                  "predicted growth is below the threshold\n",
                  worst);
      return 1;
    }
    return 0;
  });
}
