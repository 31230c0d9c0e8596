// Classifier-free guidance in a loop the user owns (solvers/stepper.hpp), with ONE batched
// conditional/unconditional model call per stage.
//
// The model is the EXACT noise prediction of the 8x8 digits (the Dirac mixture on the 1797
// images of data/digits, models/dirac_mixture.hpp). Class conditioning "digit k" is a vector of
// logits added to the mixture's log-weights: 0 on the images of digit k, -30 on the others
// (the exact class-conditional model); the null conditioning is all zeros (the whole data set).
// As a real network with per-sample class labels does, the model below takes its conditioning
// PER ROW, so each stage evaluates the stacked batch [x ; x] with the rows [c ; null] in one
// call and combines eps = eps_u + w (eps_c - eps_u) (models/guidance.hpp's helpers).
//
// The example checks itself (exit status 1 on a failure, so ctest runs it):
//   1. the Stepper loop equals diffgrad::sample with models::ClassifierFreeGuidance around the
//      same per-row model, bit for bit (one engine, the same arithmetic);
//   2. it equals sample() with ClassifierFreeGuidance around the library's DiracMixture (which
//      has ONE conditioning per batch, so the combinator calls it twice) to rounding (the two
//      mixture implementations round differently; tolerance --tolerance, relative);
// and prints, per guidance scale, the fraction of samples a linear classifier (fitted on the
// same images) assigns to the target digit. cfg.png shows one row per guidance scale.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/digits.hpp"
#include "common/image_grid.hpp"
#include "common/linear_classifier.hpp"
#include "common/main_guard.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/guidance.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/stepper.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
using Mixture = diffgrad::models::DiracMixture<double>;

struct Args {
  int target = 3;
  int batch = 8;
  int steps = 20;
  int seed = 1;
  std::string scales = "0,1,3,7.5";
  double tolerance = 1e-8;
  std::string out = examples::default_output_path("cfg.png");
  std::string data = examples::default_digits_path();
};

/// The digits' exact eps with per-row conditioning logits (a RowConditionedNoiseModel): row b
/// of the batch sees the mixture weights softmax(log w + z_b). One GEMM for the whole stacked
/// batch; the softmax is shifted by the row's nearest point, as DiracMixture does.
class RowConditionedDigits {
public:
  explicit RowConditionedDigits(const Mixture& mixture) : mixture_(mixture) {
    sq_norm_ = mixture.points().rowwise().squaredNorm().transpose();
  }
  std::int64_t cond_size() const { return mixture_.num_points(); }
  int calls() const { return calls_; }

  void eps_rows(const State& x, const diffgrad::Node& n, const State& cond_rows, State& out) const {
    ++calls_;
    const auto y = mixture_.points();
    const double a = n.alpha, s = n.sigma;
    // q_bi = alpha^2 |y_i|^2 - 2 alpha x_b . y_i  (|x_b|^2 cancels in the softmax)
    logits_.noalias() = (-2.0 * a) * (x * y.transpose());
    logits_.rowwise() += (a * a) * sq_norm_;
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      auto l = logits_.row(b);
      const double q_min = l.minCoeff();
      l = mixture_.log_weights().transpose() + cond_rows.row(b) -
          (l.array() - q_min).matrix() / (2.0 * s * s);
      l = (l.array() - l.maxCoeff()).exp().matrix();
      l /= l.sum();
    }
    out.noalias() = logits_ * y; // x0_hat
    out = (x - a * out) / s;     // eps = (x - alpha x0_hat) / sigma
  }

private:
  const Mixture& mixture_;
  Eigen::RowVectorXd sq_norm_;
  mutable State logits_;
  mutable int calls_ = 0;
};

std::vector<double> parse_scales(const std::string& text) {
  std::vector<double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::size_t used = 0;
    double w = 0;
    try {
      w = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || !std::isfinite(w))
      throw std::runtime_error("--scales: expected comma-separated finite numbers, got '" + item +
                               "'");
    out.push_back(w);
  }
  if (out.empty()) throw std::runtime_error("--scales: expected at least one guidance scale");
  return out;
}

int run(const Args& a) {
  const auto digits = examples::load_digits(a.data);
  const Backend backend;
  const Mixture mixture(digits.images);
  const RowConditionedDigits model(mixture);
  examples::LinearClassifier classifier(digits.dim(), 10);
  classifier.fit(digits.images, digits.labels);

  // c: the exact class-conditional mixture of digit `target`; null: the whole data set.
  Vector cond(digits.size()), null_cond = Vector::Zero(digits.size());
  for (Eigen::Index i = 0; i < digits.size(); ++i)
    cond(i) = digits.labels[static_cast<std::size_t>(i)] == a.target ? 0.0 : -30.0;

  const diffgrad::VPLinearSchedule schedule;
  const auto nodes = diffgrad::make_nodes(
      schedule, diffgrad::make_grid(schedule, diffgrad::GridKind::uniform_lambda, a.steps));
  const diffgrad::DpmSolverMultistep scheme(2, diffgrad::SolverPrediction::data);
  const diffgrad::NodeAtLambda nal(schedule);
  State x_T = backend.make_state(a.batch, digits.dim());
  backend.gaussian(x_T, static_cast<std::uint64_t>(a.seed), 0);
  x_T *= nodes.front().sigma;

  examples::ImageGrid grid(8, 8, a.batch, 6);
  grid.set_title("CFG, ONE BATCHED CALL PER STAGE, DIGIT " + std::to_string(a.target));
  std::printf("classifier-free guidance toward digit %d: DPM-Solver++(2M), %d steps, batch %d, "
              "exact digits mixture (%lld images)\n",
              a.target, a.steps, a.batch, static_cast<long long>(digits.size()));
  std::printf("%8s %8s %12s %14s %16s %10s\n", "w", "calls", "rows/call", "vs sample()",
              "vs 2-call CFG", "target %");
  bool ok = true;
  const auto t0 = std::chrono::steady_clock::now();
  for (double w : parse_scales(a.scales)) {
    // The user's loop: one model call on [x ; x] with rows [c ; null] per stage.
    diffgrad::SamplerWorkspace<Backend> ws(backend, scheme.history(), scheme.stages(), a.batch,
                                           digits.dim());
    diffgrad::Stepper stepper(scheme, backend, std::span<const diffgrad::Node>(nodes), nal, ws);
    State stacked_x, stacked_cond, stacked_eps, x;
    const int calls_before = model.calls();
    stepper.begin(x_T);
    while (!stepper.done()) {
      diffgrad::models::stack_for_guidance(stepper.model_input(), stacked_x);
      diffgrad::models::stack_conditioning(cond, null_cond, a.batch, stacked_cond);
      model.eps_rows(stacked_x, stepper.model_node(), stacked_cond, stacked_eps);
      diffgrad::models::combine_guidance(stacked_eps, w, stepper.model_output());
      stepper.advance();
    }
    stepper.result(x);
    const int calls = model.calls() - calls_before;

    // 1. The functor API with the combinator around the same per-row model: the same bits.
    State by_sample = x_T;
    diffgrad::models::ClassifierFreeGuidance guided(model, cond, null_cond, w);
    diffgrad::sample(scheme, backend, schedule, std::span<const diffgrad::Node>(nodes), guided,
                     by_sample);
    const bool same_bits = by_sample == x;
    // 2. The combinator around the library's DiracMixture (two calls per stage).
    Mixture two_call_model(digits.images);
    diffgrad::models::ClassifierFreeGuidance two_calls(two_call_model, cond, null_cond, w);
    State by_two_calls = x_T;
    diffgrad::sample(scheme, backend, schedule, std::span<const diffgrad::Node>(nodes), two_calls,
                     by_two_calls);
    const double rel = (by_two_calls - x).norm() / x.norm();

    const auto predicted = classifier.predict(x);
    int hits = 0;
    for (int p : predicted) hits += p == a.target ? 1 : 0;
    std::printf("%8.2f %8d %12d %14s %16.2e %9.0f%%\n", w, calls, 2 * a.batch,
                same_bits ? "identical" : "DIFFERENT", rel, 100.0 * hits / a.batch);
    ok = ok && same_bits && rel <= a.tolerance && calls == stepper.model_evals() && x.allFinite();
    std::ostringstream label;
    label << "W " << w;
    grid.add_row(x.cwiseMax(-1.0).cwiseMin(1.0).eval(), label.str());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  grid.write(a.out);
  std::printf("%.2f s; wrote %s\n", seconds, a.out.c_str());
  if (!ok) {
    std::fprintf(stderr, "cfg: a self-check failed (stepper vs sample() not identical, or the "
                         "two-call combinator off by more than --tolerance, or a non-finite "
                         "sample)\n");
    return 1;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("cfg", "Classifier-free guidance with one batched cond/uncond call per "
                           "stage (own-the-loop Stepper), exact digits model");
  cli.option("--target", a.target, "the digit guided toward", 0, 9);
  cli.option("--batch", a.batch, "samples per guidance scale (one PNG row each)", 1, 10000);
  cli.option("--steps", a.steps, "DPM-Solver++(2M) steps", 1, 100000);
  cli.option("--seed", a.seed, "seed of x_T", 0);
  cli.option("--scales", a.scales, "comma-separated guidance scales w");
  cli.option("--tolerance", a.tolerance,
             "relative tolerance of the one-call loop vs the two-call combinator", 0.0);
  cli.option("--out", a.out, "PNG file of the samples");
  cli.option("--data", a.data, "digits data file");
  if (!cli.parse(argc, argv)) return 2;
  return examples::run_main("cfg", [&] { return run(a); });
}
