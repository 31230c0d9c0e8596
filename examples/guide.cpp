// Guided generation through the sampler (the flagship example).
//
// The model is the EXACT noise prediction of the 8x8 handwritten digits (a Dirac mixture on
// the 1797 images of data/digits, models/dirac_mixture.hpp), so there is no training and no
// approximation in the model. A linear classifier is fitted on the same images. The example
// then optimises the initial noise x_T (and, optionally, 10 class logits z that reweight the
// mixture) so that the sampler's output is classified as a chosen target digit:
//
//   min_{x_T, z}  CE( classifier( DDIM_N(x_T; z) ), target )
//
// with Adam, once per gradient mode, from the same start:
//   exact       exact discrete adjoint, every state stored       (gradients/gradient.hpp)
//   checkpoint  the same gradient, binomial checkpointing with s stored states
//   bdia        reversible BDIA-DDIM (gamma = 0.5): O(1) stored states, exact up to the
//               reconstruction error                              (gradients/reversible.hpp)
//   adjoint     AdjointDEIS-1 continuous adjoint on the cached trajectory (approximate)
//   dfea        exact adjoint with the Jacobian replaced by the DF-EA Fisher approximation
//               (fisher/df_ea.hpp): no model derivative at all; x_T only
// and reports, per mode, time per iteration, time over one forward sampling run, trajectory
// states held, peak resident-memory growth (each mode runs in a forked child), and the loss
// and target-hit rate at the end. guide.png shows the samples before and after, one row per
// mode. Exits non-zero if the exact mode fails to lower the loss, so ctest runs it.
//
// --model torch[:FILE] runs the same loop on the learned digits UNet of data/models (a diffusers
// UNet2DModel in TorchScript, float64, through the LibTorch adapter; examples built with
// LibTorch only): guidance toward a digit through a real network. The network is called with
// the unconditional label 10 by default (--label), so the guidance alone steers it; its label
// is an integer input, so only x_T is optimised. Nodes: the integer timesteps
// round(999 (N - i) / N), i = 0..N, of its training table (the network's time input).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cli.hpp"
#include "common/digits.hpp"
#include "common/image_grid.hpp"
#include "common/linear_classifier.hpp"
#include "common/main_guard.hpp"
#include "common/memory.hpp"
#include "common/progress.hpp"
#include "common/torch_model.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/fisher/df_ea.hpp"
#include "diffgrad/gradients/adjoint_deis.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
using Mixture = diffgrad::models::DiracMixture<double>;
using Clock = std::chrono::steady_clock;

struct Args {
  int target = 3;
  int batch = 8;
  int steps = 25;
  int iterations = 30;
  double lr = 0.1;
  double lr_z = 0.5;
  bool no_z = false;
  int snapshots = 4;
  // 0.5, not 1: the time-symmetric gamma = 1 sampler is ~2000x more sensitive to x_T on this
  // model and Adam barely moves it (25% hit); gamma = 0.5 stays close to DDIM. Its inversion
  // amplifies rounding by 2^N (3e7 at N = 25, past the 1e6 warning threshold), yet the measured
  // reconstruction error stays near 1e-8, printed with the row.
  double bdia_gamma = 0.5;
  int seed = 1;
  std::string grid = "uniform-lambda";
  std::string modes = "exact,checkpoint,bdia,adjoint,dfea";
  std::string model = "mixture";
  int label = 10; // the torch model's class label (10 = unconditional)
  std::string out = examples::default_output_path("guide.png");
  std::string data = examples::default_digits_path();
};

/// The problem: the model (the exact mixture, or the learned UNet), its schedule and nodes,
/// the classifier, the start x_T. Every mode runs through the same code for both models.
template <class ModelType, class ScheduleType> struct Setup {
  using Model = ModelType;
  using Schedule = ScheduleType;
  /// The mixture's class logits z reweight its points (differentiable conditioning); the
  /// UNet's class label is an integer input: x_T only.
  static constexpr bool has_class_logits = std::is_same_v<Model, Mixture>;
  const Args& args;
  const Backend backend{};
  const Schedule schedule;
  std::vector<diffgrad::Node> nodes;
  std::string grid_name; // how the nodes were chosen (printed)
  examples::Digits digits;
  examples::LinearClassifier classifier{64, 10};
  Model model;
  State x_T;
  Eigen::MatrixXd class_of_point; // K x 10 one-hot: z = class_of_point * class_logits
  State exact_start_grad;         // dL/dx_T at the start (z = 0), exact, for comparison

  /// make_model(digits) -> Model.
  template <class MakeModel>
  Setup(const Args& a, Schedule s, std::vector<diffgrad::Node> n, std::string grid,
        MakeModel&& make_model)
      : args(a), schedule(std::move(s)), nodes(std::move(n)), grid_name(std::move(grid)),
        digits(examples::load_digits(a.data)), model(make_model(digits)) {
    x_T = backend.make_state(a.batch, digits.dim());
    backend.gaussian(x_T, static_cast<std::uint64_t>(a.seed), 0);
    class_of_point = Eigen::MatrixXd::Zero(digits.size(), 10);
    for (Eigen::Index i = 0; i < digits.size(); ++i)
      class_of_point(i, digits.labels[static_cast<std::size_t>(i)]) = 1.0;
  }

  void set_class_logits(const Eigen::VectorXd& c) {
    if constexpr (has_class_logits) model.set_cond((class_of_point * c).cast<double>());
  }
  double loss(const State& x0, State* grad) const {
    return classifier.cross_entropy(x0, args.target, grad);
  }
  double hit_rate(const State& x0) const {
    const auto pred = classifier.predict(x0);
    return static_cast<double>(std::count(pred.begin(), pred.end(), args.target)) /
           static_cast<double>(pred.size());
  }
};

/// One gradient evaluation: loss at the current x_T and z, dL/dx_T and dL/dz (K logits).
struct Gradient {
  double loss = 0;
  State grad_x;
  Vector grad_z;
};

struct ModeOutcome {
  double seconds = 0, first_loss = 0, final_loss = 0, hit_rate = 0;
  double states_held = 0, model_evals = 0, vjps = 0, recon_error = -1;
  double start_grad_error = 0; ///< |dL/dx_T - exact| / |exact| at the common start
  double start_grad_cos = 0;   ///< cosine between dL/dx_T and the exact one there (1 = aligned)
  State final_samples;
};

/// The mode's gradient oracle and the sampler its samples come from.
template <class S> class Mode {
public:
  using Model = typename S::Model;
  Mode(std::string name, S& s) : name_(std::move(name)), s_(s) {}
  const std::string& name() const { return name_; }

  ModeOutcome run() {
    const Args& a = s_.args;
    const bool with_z = !a.no_z && name_ != "dfea" && S::has_class_logits;
    State x_T = s_.x_T;
    Eigen::VectorXd logits = Eigen::VectorXd::Zero(10);
    diffgrad::Adam adam_x({.learning_rate = a.lr});
    diffgrad::Adam adam_z({.learning_rate = a.lr_z});
    prepare();
    ModeOutcome out;
    examples::ProgressBar bar(name_, a.iterations);
    const auto start = Clock::now();
    for (int it = 0; it < a.iterations; ++it) {
      s_.set_class_logits(logits);
      const Gradient& g = evaluate(x_T, with_z);
      if (it == 0) {
        out.first_loss = g.loss;
        out.start_grad_error = (g.grad_x - s_.exact_start_grad).norm() / s_.exact_start_grad.norm();
        // Whether the gradient points the right way at all (a step past the continuous
        // adjoint's stability bound makes it point away: cosine < 0).
        out.start_grad_cos = g.grad_x.cwiseProduct(s_.exact_start_grad).sum() /
                             (g.grad_x.norm() * s_.exact_start_grad.norm());
      }
      adam_x.step(x_T, g.grad_x);
      if (with_z) {
        Eigen::VectorXd gc = s_.class_of_point.transpose() * g.grad_z; // chain rule z = P c
        adam_z.step(logits, gc);
      }
      std::ostringstream note;
      note.precision(3);
      note << "loss " << g.loss;
      bar.update(it + 1, note.str());
    }
    out.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    bar.finish();
    s_.set_class_logits(logits);
    out.final_samples = x_T;
    sample(out.final_samples);
    out.final_loss = s_.loss(out.final_samples, nullptr);
    out.hit_rate = s_.hit_rate(out.final_samples);
    out.states_held = states_held_;
    out.model_evals = static_cast<double>(evals_) / a.iterations;
    out.vjps = static_cast<double>(vjps_) / a.iterations;
    out.recon_error = recon_error_;
    return out;
  }

private:
  diffgrad::GradientOptions exact_options(bool with_z) const {
    diffgrad::GradientOptions o;
    o.wrt_cond = with_z;
    if (name_ == "checkpoint") o.memory = diffgrad::MemoryMode::checkpoint(s_.args.snapshots);
    return o;
  }

  void prepare() {
    const int n = static_cast<int>(s_.nodes.size()) - 1;
    const auto batch = s_.x_T.rows(), dim = s_.x_T.cols();
    g_.grad_x = s_.backend.make_state(batch, dim);
    g_.grad_z = Vector::Zero(s_.model.cond_size());
    grad_x0_ = s_.backend.make_state(batch, dim);
    if (name_ == "adjoint") cache_.emplace(s_.backend, n, batch, dim);
  }

  // Runs the mode's own sampler (BDIA's for bdia, DDIM otherwise) in place on x.
  void sample(State& x) {
    if (name_ == "bdia")
      diffgrad::sample_from_noise(diffgrad::BdiaDdim(s_.args.bdia_gamma), s_.backend, s_.schedule,
                                  s_.nodes, s_.model, x);
    else
      diffgrad::sample(diffgrad::Ddim(), s_.backend, s_.schedule, s_.nodes, s_.model, x);
  }

  const Gradient& evaluate(const State& x_T, bool with_z) {
    const auto loss = [this](const Backend&, const State& x0, State& grad) {
      return s_.loss(x0, &grad);
    };
    if (name_ == "exact" || name_ == "checkpoint") {
      const auto opt = exact_options(with_z);
      if (!ws_)
        ws_.emplace(diffgrad::make_gradient_workspace(diffgrad::Ddim(), s_.backend, s_.nodes,
                                                      s_.model, x_T, opt));
      const auto& r = diffgrad::gradient(diffgrad::Ddim(), s_.backend, s_.schedule, s_.nodes,
                                         s_.model, x_T, loss, opt, *ws_);
      g_.loss = r.loss;
      g_.grad_x = r.grad_x;
      if (with_z) g_.grad_z = r.grad_cond;
      states_held_ = static_cast<double>(r.cost.peak_stored_states);
      evals_ += r.cost.model_evals;
      vjps_ += r.cost.vjps;
    } else if (name_ == "dfea") {
      diffgrad::fisher::DfEaModel<Model> dfea(s_.model);
      diffgrad::fisher::DfEaEndpointLoss endpoint(dfea, loss, s_.nodes.back());
      diffgrad::GradientOptions opt; // DF-EA approximates d eps/dx only: x_T, no z
      if (!ws_)
        ws_.emplace(diffgrad::make_gradient_workspace(diffgrad::Ddim(), s_.backend, s_.nodes, dfea,
                                                      x_T, opt));
      const auto& r = diffgrad::gradient(diffgrad::Ddim(), s_.backend, s_.schedule, s_.nodes, dfea,
                                         x_T, endpoint, opt, *ws_);
      g_.loss = r.loss;
      g_.grad_x = r.grad_x;
      states_held_ = static_cast<double>(r.cost.peak_stored_states);
      evals_ += dfea.model_evals(); // forward calls + one eps per DF-EA vjp (for x0_hat)
      vjps_ += dfea.vjps();
    } else if (name_ == "bdia") {
      diffgrad::ReversibleGradientOptions opt;
      opt.want_cond = with_z;
      opt.want_params = false;
      const auto r = diffgrad::reversible_gradient(
          diffgrad::BdiaDdim(s_.args.bdia_gamma), s_.backend, s_.schedule, s_.nodes, s_.model, x_T,
          [&](const State& x0, State& out) { g_.loss = s_.loss(x0, &out); }, opt);
      g_.grad_x = r.grad_x;
      if (with_z) g_.grad_z = r.grad_cond;
      states_held_ = r.cost.trajectory_states;
      evals_ += r.cost.forward_model_evals + r.cost.backward_model_evals;
      vjps_ += r.cost.vjps;
      recon_error_ = std::max(recon_error_, r.reconstruction_error);
    } else if (name_ == "adjoint") {
      auto& cache = *cache_;
      cache.reset(x_T);
      State x = x_T;
      const auto fwd = diffgrad::sample(diffgrad::Ddim(), s_.backend, s_.schedule, s_.nodes,
                                        s_.model, x, {}, cache);
      g_.loss = s_.loss(x, &grad_x0_);
      g_.grad_z.setZero();
      // The library checks the grid against AdjointDEIS-1's step-size stability bound
      // (|h| <= ln 3 in log-SNR); under the default policy it reports and calls back.
      diffgrad::AdjointDeisOptions opt;
      opt.stability.on_warning = [this](const diffgrad::AdjointStabilityReport& r) {
        if (stability_warned_) return;
        stability_warned_ = true;
        std::fprintf(stderr,
                     "\nguide: warning: %s: %d of %zu steps exceed the stability bound |h| <= "
                     "%.3f (largest |h| = %.2f, at step %d: the adjoint is multiplied by %.1f "
                     "there instead of shrinking); expect a wrong gradient. Use %smore --steps "
                     "(docs/gradients_continuous.md).\n",
                     r.method, r.steps_beyond, s_.nodes.size() - 1, r.bound, r.max_abs_h,
                     r.max_step, r.factor_at_max,
                     // the torch model's nodes are its integer timesteps: no --grid choice
                     S::has_class_logits ? "--grid uniform-lambda or " : "");
      };
      const auto cost =
          diffgrad::adjoint_deis(s_.backend, s_.model, s_.nodes, cache.states(), grad_x0_,
                                 g_.grad_x, with_z ? &g_.grad_z : nullptr, nullptr, opt);
      states_held_ = static_cast<double>(cache.states().size());
      evals_ += fwd.model_evals + cost.model_evals;
      vjps_ += cost.vjps;
    } else {
      throw std::runtime_error("unknown mode '" + name_ + "'");
    }
    return g_;
  }

  std::string name_;
  S& s_;
  Gradient g_;
  State grad_x0_;
  std::optional<diffgrad::GradientWorkspace<Backend>> ws_;
  std::optional<diffgrad::TrajectoryCache<Backend>> cache_;
  double states_held_ = 0, recon_error_ = -1;
  bool stability_warned_ = false;
  long long evals_ = 0, vjps_ = 0;
};

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

/// Packs / unpacks a ModeOutcome through run_isolated's payload of doubles.
std::vector<double> pack(const ModeOutcome& m) {
  std::vector<double> v{m.seconds,          m.first_loss,    m.final_loss, m.hit_rate,
                        m.states_held,      m.model_evals,   m.vjps,       m.recon_error,
                        m.start_grad_error, m.start_grad_cos};
  v.insert(v.end(), m.final_samples.data(), m.final_samples.data() + m.final_samples.size());
  return v;
}
ModeOutcome unpack(const std::vector<double>& v, Eigen::Index batch, Eigen::Index dim) {
  ModeOutcome m;
  m.seconds = v[0], m.first_loss = v[1], m.final_loss = v[2], m.hit_rate = v[3];
  m.states_held = v[4], m.model_evals = v[5], m.vjps = v[6], m.recon_error = v[7];
  m.start_grad_error = v[8], m.start_grad_cos = v[9];
  m.final_samples = Eigen::Map<const State>(v.data() + 10, batch, dim);
  return m;
}

int run(const Args& a);

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("guide",
                    "Guided generation: optimise the initial noise x_T (and 10 class logits z) "
                    "through a DDIM sampler\nso that the exact digits model produces a chosen "
                    "digit; compares gradient modes in time, memory\nand final loss. Writes a PNG "
                    "of the samples before and after (one row per mode).");
  cli.option("--target", a.target, "digit to steer toward", 0, 9);
  cli.option("--batch", a.batch, "samples optimised together", 1, 4096);
  cli.option("--steps", a.steps, "DDIM steps N (VP-linear schedule, t from 1 to 1e-3)", 2, 100000);
  cli.option("--grid", a.grid,
             "uniform-lambda | uniform-t (uniform-t breaks the adjoint mode at small N)");
  cli.option("--iterations", a.iterations, "Adam iterations per mode", 1, 1000000);
  cli.option("--lr", a.lr, "Adam learning rate for x_T", 0.0);
  cli.option("--lr-z", a.lr_z, "Adam learning rate for the class logits z", 0.0);
  cli.flag("--no-z", a.no_z, "optimise x_T only (z stays 0)");
  cli.option("--snapshots", a.snapshots, "stored states of the checkpoint mode (x_T included)", 1);
  cli.option("--bdia-gamma", a.bdia_gamma,
             "BDIA mixing gamma of the bdia mode (1 = time-symmetric)", 1e-3, 1.0);
  cli.option("--seed", a.seed, "Philox seed of the initial noise x_T", 0);
  cli.option("--modes", a.modes, "comma-separated subset of exact,checkpoint,bdia,adjoint,dfea");
  cli.option("--out", a.out, "PNG file: initial samples, then one row per mode");
  cli.option("--data", a.data, "digits data file");
  cli.option("--model", a.model,
             "mixture (the exact digits model) or torch[:FILE] (the learned digits UNet, "
             "float64; default data/models/digits_unet_f64.pt; needs LibTorch)");
  cli.option("--label", a.label,
             "torch model: the class label it is called with (10 = unconditional)", 0, 10);
  if (!cli.parse(argc, argv)) return 2;
  std::string torch_path;
  if (examples::is_torch_model(a.model, torch_path)) {
    if (const auto refusal = examples::torch_unavailable_message("guide"); !refusal.empty()) {
      std::fprintf(stderr, "%s\n", refusal.c_str());
      return 2;
    }
    if (a.grid != "uniform-lambda") {
      std::fprintf(stderr, "guide: option '--grid' does not apply to the torch model (it runs "
                           "at integer timesteps of its training table)\n");
      return 2;
    }
  } else if (a.model != "mixture") {
    std::fprintf(stderr, "guide: option '--model': expected mixture, torch or torch:FILE, got '%s'\n",
                 a.model.c_str());
    return 2;
  }
  if (a.grid != "uniform-lambda" && a.grid != "uniform-t") {
    std::fprintf(stderr, "guide: option '--grid': expected uniform-lambda or uniform-t, got '%s'\n",
                 a.grid.c_str());
    return 2;
  }
  for (const auto& name : split(a.modes))
    if (name != "exact" && name != "checkpoint" && name != "bdia" && name != "adjoint" &&
        name != "dfea") {
      std::fprintf(stderr,
                   "guide: option '--modes': expected a comma-separated subset of "
                   "exact,checkpoint,bdia,adjoint,dfea, got '%s'\n",
                   a.modes.c_str());
      return 2;
    }
  return examples::run_main("guide", [&] { return run(a); });
}

namespace {

/// The whole example on one Setup (either model); `model_line` describes the model.
template <class S> int run_setup(const Args& a, S& s, const std::string& model_line) {
  {
    const double acc = s.classifier.fit(s.digits.images, s.digits.labels);
    s.exact_start_grad =
        diffgrad::gradient(
            diffgrad::Ddim(), s.backend, s.schedule, s.nodes, s.model, s.x_T,
            [&s](const Backend&, const State& x0, State& g) { return s.loss(x0, &g); })
            .grad_x;
    const auto batch = s.x_T.rows(), dim = s.x_T.cols();

    // The unguided samples and the cost of one forward sampling run (the ratio's unit).
    State before = s.x_T;
    const auto t0 = Clock::now();
    diffgrad::sample(diffgrad::Ddim(), s.backend, s.schedule, s.nodes, s.model, before);
    const double forward_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    const auto pred = s.classifier.predict(before);
    std::printf("%s; linear classifier train accuracy %.3f\n", model_line.c_str(), acc);
    std::printf("steer %d samples toward digit %d: DDIM, %d steps (%s grid); %d Adam "
                "iterations; optimising x_T%s\n",
                a.batch, a.target, a.steps, s.grid_name.c_str(), a.iterations,
                a.no_z || !S::has_class_logits ? "" : " and z");
    std::printf("before: loss %.4f, classified as", s.loss(before, nullptr));
    for (int p : pred) std::printf(" %d", p);
    std::printf("  (one DDIM sampling run: %.2f ms)\n\n", 1e3 * forward_seconds);

    examples::ImageGrid grid(s.digits.rows, s.digits.cols, a.batch);
    grid.set_title("target " + std::to_string(a.target) + ", DDIM " + std::to_string(a.steps) +
                   " steps, " + s.grid_name + "; hit = share classified as " + std::to_string(a.target));
    {
      const double hit = s.hit_rate(before);
      char label[64];
      std::snprintf(label, sizeof label, "unguided %3.0f%%", 100 * hit);
      grid.add_row(before, label);
    }
    const double state_kib = static_cast<double>(batch * dim) * sizeof(double) / 1024.0;
    std::printf("%-11s %9s %9s %6s %6s %7s %10s %8s %9s %6s %9s %6s\n", "mode", "ms/iter",
                "grad/fwd", "evals", "VJPs", "states", "state KiB", "RSS MiB", "vs exact", "cos",
                "loss", "hit");
    bool ok = true;
    for (const auto& name : split(a.modes)) {
      Mode<S> mode(name, s);
      const auto iso = examples::run_isolated([&] { return pack(mode.run()); });
      const ModeOutcome m = unpack(iso.payload, batch, dim);
      const double per_iter = m.seconds / a.iterations;
      std::printf(
          "%-11s %9.2f %9.1f %6.0f %6.0f %7.0f %10.1f %8.2f %9.1e %6.2f %9.4f %5.0f%%",
          name.c_str(), 1e3 * per_iter, per_iter / forward_seconds, m.model_evals, m.vjps,
          m.states_held, m.states_held * state_kib,
          iso.peak_growth_bytes < 0 ? -1.0 : static_cast<double>(iso.peak_growth_bytes) / 1048576.0,
          m.start_grad_error, m.start_grad_cos, m.final_loss, 100 * m.hit_rate);
      if (m.recon_error >= 0) std::printf("  (reconstruction error %.1e)", m.recon_error);
      std::printf("\n");
      char label[64];
      std::snprintf(label, sizeof label, "%s %3.0f%%", name.c_str(), 100 * m.hit_rate);
      grid.add_row(m.final_samples, label);
      if (name == "exact" && !(m.final_loss < m.first_loss)) ok = false;
    }
    grid.write(a.out);
    std::printf("\nwrote %s: first row unguided, then one row per mode (%s), each labelled with "
                "its mode and hit rate\n",
                a.out.c_str(), a.modes.c_str());
    std::printf("columns: ms/iter = one gradient + Adam step; grad/fwd = that over one DDIM "
                "run; evals, VJPs = model calls per gradient;\nstates = trajectory states held "
                "at once; RSS = peak resident growth while the mode ran;\nvs exact = "
                "|dL/dx_T - exact DDIM gradient| / |exact| at the common start (bdia "
                "differentiates its own sampler); cos = cosine between the two (< 0: "
                "points away);\nloss, hit = loss and share of samples "
                "classified as the target after the last step.\n");
    if (!ok) {
      std::fprintf(stderr, "guide: the exact mode did not lower the loss\n");
      return 1;
    }
    return 0;
  }
}

int run(const Args& a) {
  std::string torch_path;
  if (examples::is_torch_model(a.model, torch_path)) {
#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH
    // The gradient path stays in float64: the float64 network (a trace bakes in its dtype).
    if (examples::torch_file_is_float32(torch_path))
      throw std::runtime_error("option '--model': guide differentiates in float64 and needs the "
                               "float64 network (e.g. data/models/digits_unet_f64.pt), got the "
                               "float32 file '" +
                               torch_path + "'");
    auto schedule = examples::digits_unet_schedule();
    auto nodes = examples::integer_timestep_nodes(schedule, a.steps);
    using Net = diffgrad::models::TorchNoiseModel<double>;
    Setup<Net, diffgrad::DiscreteSchedule> s(
        a, std::move(schedule), std::move(nodes), "integer timesteps 999..0",
        [&](const examples::Digits&) {
          Net net = examples::load_digits_unet<double>(torch_path);
          examples::set_digit_labels(net, std::vector<std::int64_t>(
                                              static_cast<std::size_t>(a.batch), a.label));
          return net;
        });
    const std::string line = "learned digits UNet (" + torch_path + ", float64, class label " +
                             std::to_string(a.label) +
                             (a.label == 10 ? " = unconditional" : "") + ")";
    return run_setup(a, s, line);
#endif
  }
  const diffgrad::VPLinearSchedule schedule;
  auto nodes = diffgrad::make_nodes(schedule,
                                    a.grid == "uniform-t"
                                        ? diffgrad::uniform_t_grid(schedule, a.steps, 1.0, 1e-3)
                                        : diffgrad::uniform_lambda_grid(schedule, a.steps, 1.0, 1e-3));
  Setup<Mixture, diffgrad::VPLinearSchedule> s(
      a, schedule, std::move(nodes), a.grid,
      [](const examples::Digits& digits) { return Mixture(digits.images); });
  const std::string line = "exact digits model: " + std::to_string(s.digits.size()) +
                           " images of 8x8";
  return run_setup(a, s, line);
}

} // namespace
