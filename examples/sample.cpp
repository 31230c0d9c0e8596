// Sampling digits with any sampler x schedule x time grid.
//
// Two models of the 8x8 handwritten digits (data/digits):
//   mixture  the EXACT noise prediction of the data set (a Dirac mixture on its images,
//            models/dirac_mixture.hpp): every sampler, schedule and grid works unchanged;
//            good samplers land on training images (the exact model memorises by definition),
//            so the distance to the nearest training image measures the sampler's error;
//   mlp      a small MLP (models/mlp.hpp) fitted here in a few seconds to the mixture's eps
//            on the chosen schedule (regression with exact targets, Adam through the MLP's
//            exact parameter VJP), then sampled like any network;
//   torch[:FILE]  the learned class-conditional digits UNet of data/models (a diffusers
//            UNet2DModel in TorchScript) through the LibTorch adapter, one class label per row
//            (--labels); it runs on its own training table with diffusers-compatible nodes
//            (compat/diffusers.hpp: the network takes the integer timestep). Needs an example
//            built with LibTorch (examples/common/torch_model.hpp).
// Prints the time, the nearest-image distance and what a linear classifier reads in the
// samples; writes a PNG grid. Exits non-zero if a sample is not finite, so ctest runs it.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/digits.hpp"
#include "common/image_grid.hpp"
#include "common/linear_classifier.hpp"
#include "common/main_guard.hpp"
#include "common/progress.hpp"
#include "common/torch_model.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_cosine.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Mixture = diffgrad::models::DiracMixture<double>;
using Mlp = diffgrad::models::Mlp<double>;
using Clock = std::chrono::steady_clock;

constexpr const char* kSamplers =
    "ddim, ddpm (DDIM eta = 1),\n  dpm1, dpm2s, dpm3s, dpm2m, dpm3m (DPM-Solver, noise "
    "prediction),\n"
    "  dpm++2s, dpm++3s, dpm++2m, dpm++3m, sde-dpm++1, sde-dpm++2m, sde-dpm++3m,\n"
    "  deis-tab1..3, deis-rhoab1..3, deis-heun, deis-kutta, deis-rk4, deis-logrho2..3, ipndm1..4";

struct Args {
  std::string model = "mixture";
  std::string sampler = "dpm++2m";
  std::string schedule = "vp-linear";
  std::string grid = "uniform-lambda";
  int steps = 20;
  int batch = 32;
  int seed = 0;
  int train_iters = 300;
  int hidden = 128;
  std::string save_mlp;
  std::string labels = "cycle";
  std::string out = examples::default_output_path("sample.png");
  std::string data = examples::default_digits_path();
};

/// Calls f(scheme) with the sampler named `name`; throws for an unknown name.
template <class F> void with_sampler(const std::string& name, F&& f) {
  using diffgrad::SolverPrediction;
  const auto noise = SolverPrediction::noise, data = SolverPrediction::data;
  const auto digit = [&](const std::string& prefix) {
    return name.size() == prefix.size() + 1 && name.compare(0, prefix.size(), prefix) == 0
               ? name.back() - '0'
               : -1;
  };
  using Single = diffgrad::DpmSolverSinglestep;
  if (name == "ddim") return f(diffgrad::Ddim());
  if (name == "ddpm") return f(diffgrad::Ddim(1.0));
  if (name == "dpm1") return f(Single(Single::Options{.order = 1, .prediction = noise}));
  if (name == "dpm2s") return f(Single(Single::Options{.order = 2, .prediction = noise}));
  if (name == "dpm3s") return f(Single(Single::Options{.order = 3, .prediction = noise}));
  if (name == "dpm++2s") return f(Single(Single::Options{.order = 2, .prediction = data}));
  if (name == "dpm++3s") return f(Single(Single::Options{.order = 3, .prediction = data}));
  if (name == "dpm2m") return f(diffgrad::DpmSolverMultistep(2, noise));
  if (name == "dpm3m") return f(diffgrad::DpmSolverMultistep(3, noise));
  if (name == "dpm++2m") return f(diffgrad::DpmSolverMultistep(2, data));
  if (name == "dpm++3m") return f(diffgrad::DpmSolverMultistep(3, data));
  if (name == "sde-dpm++1") return f(diffgrad::SdeDpmSolver(1, data));
  if (name == "sde-dpm++2m") return f(diffgrad::SdeDpmSolver(2, data));
  if (name == "sde-dpm++3m") return f(diffgrad::SdeDpmSolver(3, data));
  if (int k = digit("deis-tab"); k >= 1 && k <= 3) return f(diffgrad::DeisTab(k));
  if (int k = digit("deis-rhoab"); k >= 1 && k <= 3) return f(diffgrad::DeisRhoAb(k));
  if (name == "deis-heun") return f(diffgrad::DeisRhoRk(diffgrad::DeisRkMethod::heun2));
  if (name == "deis-kutta") return f(diffgrad::DeisRhoRk(diffgrad::DeisRkMethod::kutta3));
  if (name == "deis-rk4") return f(diffgrad::DeisRhoRk(diffgrad::DeisRkMethod::rk4));
  if (int k = digit("deis-logrho"); k >= 2 && k <= 3) return f(diffgrad::DeisLogRho(k));
  if (int k = digit("ipndm"); k >= 1 && k <= 4) return f(diffgrad::IPndm(k));
  throw std::runtime_error("unknown --sampler '" + name + "'; one of: " + kSamplers);
}

/// Calls f(schedule, is_vp) with the schedule named `name`.
template <class F> void with_schedule(const std::string& name, F&& f) {
  if (name == "vp-linear") return f(diffgrad::VPLinearSchedule(), true);
  if (name == "vp-cosine") return f(diffgrad::VPCosineSchedule(), true);
  if (name == "subvp") return f(diffgrad::SubVPSchedule(), true);
  if (name == "discrete")
    return f(diffgrad::DiscreteSchedule::from_beta_schedule(diffgrad::BetaSchedule::linear), true);
  if (name == "ve") return f(diffgrad::VESchedule(), false);
  if (name == "edm") return f(diffgrad::EDMSchedule(), false);
  throw std::runtime_error("unknown --schedule '" + name +
                           "'; one of: vp-linear, vp-cosine, subvp, discrete, ve, edm");
}

diffgrad::GridKind grid_kind(const std::string& name) {
  if (name == "uniform-t") return diffgrad::GridKind::uniform_t;
  if (name == "uniform-lambda") return diffgrad::GridKind::uniform_lambda;
  if (name == "quadratic-t") return diffgrad::GridKind::quadratic_t;
  if (name == "karras") return diffgrad::GridKind::karras;
  throw std::runtime_error("unknown --grid '" + name +
                           "'; one of: uniform-t, uniform-lambda, quadratic-t, karras");
}

/// The MLP model: eps(x, t) = eps of a Gaussian fit of the data (mean m, per-pixel variance v)
///   + net(x, t). The Gaussian part, sigma (x - alpha m) / (alpha^2 v + sigma^2), is exact at
/// high noise, so the network only learns the residual (an EDM-style skip connection): without
/// it, data-prediction samplers amplify the net's error at high noise by sigma/alpha ~ 150.
struct SkipMlp {
  Mlp net;
  Eigen::RowVectorXd mean, var;
  void gaussian_eps(const State& x, const diffgrad::Node& n, State& out) const {
    out = x.rowwise() - n.alpha * mean;
    const Eigen::RowVectorXd scale =
        (n.sigma / (n.alpha * n.alpha * var.array() + n.sigma * n.sigma)).matrix();
    out.array().rowwise() *= scale.array();
  }
  void eps(const State& x, const diffgrad::Node& n, State& out) const {
    gaussian_eps(x, n, skip_);
    net.eps(x, n.model_t, out);
    out += skip_;
  }
  mutable State skip_;
};

/// Fits the MLP residual to the mixture's exact eps on `schedule`: each Adam step takes 8 times
/// t (half uniform in t, half uniform in lambda), 32 images each, noised, and regresses the
/// exact eps there. Gradients come from the MLP's exact parameter VJP.
template <class S>
SkipMlp fit_mlp(const S& schedule, const Mixture& mixture, const examples::Digits& digits,
                const Args& a) {
  diffgrad::models::MlpConfig config;
  config.dim = digits.dim();
  config.hidden = {a.hidden, a.hidden};
  config.time_frequencies = 6;
  config.time_scale = 1.0 / schedule.t_max(); // the network sees t / t_max in (0, 1]
  SkipMlp model{
      Mlp(config, static_cast<std::uint64_t>(a.seed)), digits.images.colwise().mean(), {}, {}};
  model.var = (digits.images.rowwise() - model.mean).colwise().squaredNorm() /
              static_cast<double>(digits.size());
  Mlp& mlp = model.net;
  diffgrad::Adam adam({.learning_rate = 2e-3});
  std::mt19937_64 rng(static_cast<std::uint64_t>(a.seed) + 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<Eigen::Index> pick(0, digits.size() - 1);
  constexpr int groups = 8, group = 32;
  const Backend backend;
  State x = backend.make_state(group, config.dim), target = x, out = x, dx = x, residual = x;
  State skip = x;
  Mixture::vector_type grad(mlp.param_size());
  const double l_min = schedule.lambda(schedule.t_max()), l_max = schedule.lambda(schedule.t_min());
  examples::ProgressBar bar("fit MLP", a.train_iters);
  double running = 0;
  for (int it = 0; it < a.train_iters; ++it) {
    grad.setZero();
    double loss = 0;
    for (int g = 0; g < groups; ++g) {
      const double t = g % 2 == 0
                           ? schedule.t_min() + unit(rng) * (schedule.t_max() - schedule.t_min())
                           : schedule.t_of_lambda(l_min + unit(rng) * (l_max - l_min));
      const diffgrad::Node n = schedule.node(t);
      for (Eigen::Index b = 0; b < group; ++b) {
        x.row(b) = n.alpha * digits.images.row(pick(rng));
        for (Eigen::Index j = 0; j < config.dim; ++j) x(b, j) += n.sigma * normal(rng);
      }
      mixture.eps(x, n, target);
      model.gaussian_eps(x, n, skip);
      mlp.eps(x, n.model_t, out);
      residual = out + skip - target;
      const double scale = 1.0 / (groups * group * config.dim);
      loss += residual.squaredNorm() * scale;
      residual *= 2.0 * scale;
      mlp.vjp(x, n.model_t, residual, dx, nullptr, &grad);
    }
    adam.step(mlp.params(), grad);
    running = it == 0 ? loss : 0.98 * running + 0.02 * loss;
    char note[48];
    std::snprintf(note, sizeof note, "mse %.4f", running);
    bar.update(it + 1, note);
  }
  bar.finish();
  std::printf("MLP %d-%d-%d-%d (%lld parameters) fitted to the exact eps: %d Adam steps, running "
              "mse %.4f (eps has unit variance)\n",
              static_cast<int>(mlp.input_size()), a.hidden, a.hidden, config.dim,
              static_cast<long long>(mlp.param_size()), a.train_iters, running);
  return model;
}

int report(const Args& a, const std::string& description, const State& images,
           const examples::Digits& digits, const examples::LinearClassifier& classifier,
           int model_evals, double seconds, const std::vector<std::int64_t>& labels, int columns);

template <class S>
int run(const Args& a, const S& schedule, bool is_vp, const examples::Digits& digits,
        const examples::LinearClassifier& classifier) {
  const Backend backend;
  Mixture mixture(digits.images);
  const auto times = diffgrad::make_grid(schedule, grid_kind(a.grid), a.steps);
  const auto nodes = diffgrad::make_nodes(schedule, times);
  State x = backend.make_state(a.batch, digits.dim());
  backend.gaussian(x, static_cast<std::uint64_t>(a.seed), 0);
  x *= nodes.front().sigma; // x_T ~ N(0, sigma_T^2 I): unit variance for VP, sigma_max for VE/EDM

  std::optional<SkipMlp> mlp;
  if (a.model == "mlp") {
    if (!is_vp)
      throw std::runtime_error("--model mlp is fitted on variance-preserving schedules only "
                               "(vp-linear, vp-cosine, subvp, discrete); got " +
                               a.schedule);
    mlp.emplace(fit_mlp(schedule, mixture, digits, a));
    if (!a.save_mlp.empty()) {
      // Mlp::save(path) leaves the close to the stream's destructor, whose failure (a full
      // disk) nobody sees: write through our own stream and check the close.
      std::ofstream os(a.save_mlp);
      if (!os) throw std::runtime_error("cannot open " + a.save_mlp + " for writing");
      mlp->net.save(os);
      os.close();
      if (!os) throw std::runtime_error("writing " + a.save_mlp + " failed (disk full?)");
      std::printf("saved the MLP to %s (format: models/mlp.hpp, Mlp::save)\n", a.save_mlp.c_str());
    }
  } else if (a.model != "mixture") {
    throw std::runtime_error("unknown --model '" + a.model +
                             "'; one of: mixture, mlp, torch, torch:FILE");
  }

  diffgrad::SampleResult result;
  double seconds = 0;
  with_sampler(a.sampler, [&](const auto& scheme) {
    examples::ProgressBar bar("sampling", a.steps);
    const auto start = Clock::now();
    diffgrad::SampleOptions options;
    options.seed = static_cast<std::uint64_t>(a.seed) + 1000;
    if (mlp)
      result = diffgrad::sample(scheme, backend, schedule, nodes, *mlp, x, options, bar.observer());
    else
      result =
          diffgrad::sample(scheme, backend, schedule, nodes, mixture, x, options, bar.observer());
    seconds = std::chrono::duration<double>(Clock::now() - start).count();
  });

  // Samples end at alpha(t_min) * data: divide it out before comparing with the images.
  const State images = x / nodes.back().alpha;
  const std::string description = a.model + " model, " + a.sampler + " sampler, " + a.schedule +
                                  " schedule, " + a.grid + " grid";
  return report(a, description, images, digits, classifier, result.model_evals, seconds, {},
                std::min(a.batch, 16));
}

/// Prints the time, the nearest-image distance and the classifier's reading of `images`
/// (one sample per row, pixels in [-1, 1]), writes the PNG grid; 1 if a sample is not finite.
/// `labels`: the class label each row was asked for (torch model), or empty.
int report(const Args& a, const std::string& description, const State& images,
           const examples::Digits& digits, const examples::LinearClassifier& classifier,
           int model_evals, double seconds, const std::vector<std::int64_t>& labels,
           int columns) {
  double mean_nearest = 0, worst_nearest = 0;
  for (Eigen::Index b = 0; b < images.rows(); ++b) {
    const double d =
        std::sqrt((digits.images.rowwise() - images.row(b)).rowwise().squaredNorm().minCoeff() /
                  static_cast<double>(digits.dim()));
    mean_nearest += d / static_cast<double>(images.rows());
    worst_nearest = std::max(worst_nearest, d);
  }
  std::array<int, 10> histogram{};
  const auto predicted = classifier.predict(images);
  for (int p : predicted) ++histogram[static_cast<std::size_t>(p)];

  std::printf("%s, %d steps, %d samples: %d model calls in %.3f s (%.2f ms per call)\n",
              description.c_str(), a.steps, a.batch, model_evals, seconds,
              1e3 * seconds / model_evals);
  std::printf("RMS pixel distance to the nearest training image (pixels in [-1, 1]): mean %.4f, "
              "worst %.4f\n",
              mean_nearest, worst_nearest);
  std::printf("classifier reads the samples as:");
  for (int c = 0; c < 10; ++c) std::printf("  %d: %d", c, histogram[static_cast<std::size_t>(c)]);
  std::printf("\n");
  int asked = 0, agreed = 0;
  for (std::size_t b = 0; b < labels.size() && b < predicted.size(); ++b)
    if (labels[b] >= 0 && labels[b] <= 9) {
      ++asked;
      if (predicted[b] == labels[b]) ++agreed;
    }
  if (asked > 0)
    std::printf("classifier reads the requested digit in %d of %d class-conditional samples "
                "(%.0f%%)\n",
                agreed, asked, 100.0 * agreed / asked);
  examples::ImageGrid grid(digits.rows, digits.cols, columns);
  grid.add_row(images);
  grid.write(a.out);
  std::printf("wrote %s\n", a.out.c_str());
  if (!images.allFinite()) {
    std::fprintf(stderr, "sample: non-finite samples\n");
    return 1;
  }
  return 0;
}

#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH
/// Row b's class label for the UNet: --labels cycle (b mod 10: a column per digit), uncond
/// (10, the network's unconditional label) or one digit 0..9 for every row.
std::vector<std::int64_t> unet_labels(const Args& a) {
  std::vector<std::int64_t> labels(static_cast<std::size_t>(a.batch));
  for (std::size_t b = 0; b < labels.size(); ++b) {
    if (a.labels == "cycle")
      labels[b] = static_cast<std::int64_t>(b % 10);
    else if (a.labels == "uncond")
      labels[b] = 10;
    else
      labels[b] = a.labels[0] - '0';
  }
  return labels;
}

/// Calls f(scheme, nodes) with the sampler named `name` as diffusers' scheduler of that name
/// sets it up on the network's training table (compat/diffusers.hpp): the nodes sit at
/// diffusers' integer timesteps, the network's time input.
template <class F>
void with_unet_sampler(const std::string& name, const diffgrad::DiscreteSchedule& schedule,
                       int steps, F&& f) {
  namespace compat = diffgrad::compat;
  if (name == "ddim" || name == "ddpm") {
    compat::DdimSchedulerConfig config; // DDIMScheduler(clip_sample=False), as in training
    config.clip_sample = false;
    const auto setup = compat::ddim_setup(schedule, config, steps, name == "ddpm" ? 1.0 : 0.0);
    return f(setup.scheme, setup.nodes);
  }
  if (name == "dpm2m" || name == "dpm3m" || name == "dpm++2m" || name == "dpm++3m") {
    compat::DpmSolverMultistepSchedulerConfig config; // DPMSolverMultistepScheduler()
    config.solver_order = name[name.size() - 2] - '0';
    config.algorithm_type = name.rfind("dpm++", 0) == 0 ? diffgrad::DpmAlgorithm::dpmsolver_pp
                                                        : diffgrad::DpmAlgorithm::dpmsolver;
    const auto setup = compat::dpm_solver_multistep_setup(schedule, config, steps);
    return f(setup.scheme, setup.nodes);
  }
  throw std::runtime_error("option '--sampler': the torch model runs diffusers' schedulers "
                           "(integer timesteps): expected one of ddim, ddpm, dpm2m, dpm3m, "
                           "dpm++2m, dpm++3m, got '" +
                           name + "'");
}

/// Samples the digits UNet in the file's dtype (float64 or float32) and reports in double.
template <class Scalar>
int run_torch(const Args& a, const std::string& path, const examples::Digits& digits,
              const examples::LinearClassifier& classifier) {
  using TorchBackend = diffgrad::EigenBackend<Scalar>;
  auto net = examples::load_digits_unet<Scalar>(path);
  const auto labels = unet_labels(a);
  examples::set_digit_labels(net, labels);
  const auto schedule = examples::digits_unet_schedule();
  const TorchBackend backend;
  auto x = backend.make_state(a.batch, digits.dim());
  backend.gaussian(x, static_cast<std::uint64_t>(a.seed), 0); // x_T ~ N(0, I), as diffusers
  State images;
  diffgrad::SampleResult result;
  double seconds = 0;
  with_unet_sampler(a.sampler, schedule, a.steps, [&](const auto& scheme, const auto& nodes) {
    examples::ProgressBar bar("sampling", a.steps);
    diffgrad::SampleOptions options;
    options.seed = static_cast<std::uint64_t>(a.seed) + 1000;
    const auto start = Clock::now();
    result = diffgrad::sample(scheme, backend, schedule, nodes, net, x, options, bar.observer());
    seconds = std::chrono::duration<double>(Clock::now() - start).count();
    images = x.template cast<double>() / nodes.back().alpha;
  });
  const std::string description =
      std::string("torch model (") + path + ", " + (sizeof(Scalar) == 4 ? "float32" : "float64") +
      ", labels " + a.labels + "), " + a.sampler +
      " sampler, diffusers' nodes on the training table";
  return report(a, description, images, digits, classifier, result.model_evals, seconds, labels,
                a.labels == "cycle" ? std::min(a.batch, 10) : std::min(a.batch, 16));
}

int run_torch(const Args& a, const std::string& path, const examples::Digits& digits,
              const examples::LinearClassifier& classifier) {
  return examples::torch_file_is_float32(path) ? run_torch<float>(a, path, digits, classifier)
                                               : run_torch<double>(a, path, digits, classifier);
}
#endif

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("sample",
                    std::string("Sample 8x8 digits with any sampler, schedule and time grid, from "
                                "the exact mixture model of the data\nor from a small MLP fitted "
                                "to it. Samplers:\n  ") +
                        kSamplers);
  cli.option("--model", a.model,
             "mixture (exact eps of the data), mlp (fitted here), or torch[:FILE] (the learned "
             "digits UNet, default data/models/digits_unet_f64.pt; needs LibTorch)");
  cli.option("--sampler", a.sampler, "sampler name (list above)");
  cli.option("--schedule", a.schedule, "vp-linear, vp-cosine, subvp, discrete, ve or edm");
  cli.option("--grid", a.grid, "uniform-t, uniform-lambda, quadratic-t or karras");
  cli.option("--steps", a.steps, "sampler steps N", 1, 1000000);
  cli.option("--batch", a.batch, "number of samples", 1, 1000000);
  cli.option("--seed", a.seed, "seed of x_T (and of the MLP fit)", 0);
  cli.option("--train-iters", a.train_iters, "MLP: Adam steps of the fit", 0);
  cli.option("--hidden", a.hidden, "MLP: width of its two hidden layers", 1, 65536);
  cli.option("--save-mlp", a.save_mlp, "MLP: save the fitted network to this file");
  cli.option("--labels", a.labels,
             "torch: class label per row: cycle (row b gets b mod 10), uncond, or a digit 0..9");
  cli.option("--out", a.out, "PNG file of the samples");
  cli.option("--data", a.data, "digits data file");
  if (!cli.parse(argc, argv)) return 2;
  if (a.steps < 1 || a.batch < 1 || a.train_iters < 0 || a.hidden < 1) {
    std::fprintf(stderr,
                 "sample: need --steps >= 1, --batch >= 1, --train-iters >= 0, --hidden >= 1\n");
    return 2;
  }
  std::string torch_path;
  const bool torch_model = examples::is_torch_model(a.model, torch_path);
  if (torch_model) {
    if (const auto refusal = examples::torch_unavailable_message("sample"); !refusal.empty()) {
      std::fprintf(stderr, "%s\n", refusal.c_str());
      return 2;
    }
    if (a.labels != "cycle" && a.labels != "uncond" &&
        !(a.labels.size() == 1 && a.labels[0] >= '0' && a.labels[0] <= '9')) {
      std::fprintf(stderr,
                   "sample: option '--labels': expected cycle, uncond or a digit 0..9, got '%s'\n",
                   a.labels.c_str());
      return 2;
    }
    if (a.schedule != "vp-linear" || a.grid != "uniform-lambda") {
      std::fprintf(stderr, "sample: options '--schedule' and '--grid' do not apply to the torch "
                           "model (it runs on its training table at diffusers' timesteps)\n");
      return 2;
    }
  }
  return examples::run_main("sample", [&] {
    const auto digits = examples::load_digits(a.data);
    examples::LinearClassifier classifier(digits.dim(), 10);
    classifier.fit(digits.images, digits.labels);
#ifdef DIFFGRAD_EXAMPLES_WITH_TORCH
    if (torch_model) return run_torch(a, torch_path, digits, classifier);
#endif
    int code = 0;
    with_schedule(a.schedule, [&](const auto& schedule, bool is_vp) {
      code = run(a, schedule, is_vp, digits, classifier);
    });
    return code;
  });
}
