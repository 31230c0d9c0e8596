#pragma once
// gDDIM samplers for the blurring diffusion (BDM), run in the DCT basis.
//
// Every frequency k of the DCT basis is an independent scalar diffusion with signal scale
// alpha_k(t) = a(t) d_k(t), the common noise scale sigma(t) and log-SNR lambda_k(t) =
// log(alpha_k/sigma) (gddim/bdm_schedule.hpp, docs/gddim_bdm.md). gDDIM's R_t is sigma(t) I,
// so each step is a per-frequency exponential integrator; its coefficients are per-column
// diagonals (ColumnCoeff, backend/coefficient.hpp) held in one table per time grid, built in
// the backend's memory when the scheme is constructed. plan(i) only copies a precomputed plan
// whose ColumnCoeff::values point into that table, so the step loop is the library's engine
// (run_scheme) and its exact discrete adjoint unchanged: one fused pass per step.
//
// Methods (BdmGddimOptions), step s -> t (t < s), per frequency, eps_y the model's eps in the
// DCT basis, h_k = lambda_k(t) - lambda_k(s) > 0:
//   gDDIM, stochasticity l = 0, order q = 1..3 (Adams-Bashforth on eps in t):
//     y_t = Psi_k y_s + sum_{j<q} C_{j,k} eps_y(t_{i-j}),  Psi_k = alpha_k(t)/alpha_k(s),
//     C_{j,k} = int_s^t Psi_k(t, r) G_k(r)^2 / (2 sigma(r)) l_j(r) dr  (q = 1: the closed form
//     sigma_t - Psi_k sigma_s = -sigma_t expm1(h_k)); the first q - 1 steps warm up with the
//     orders the history allows.
//   gDDIM, l in (0, 1] (q = 1):
//     y_t = Psi_k y_s + sigma_t (expm1(-l^2 h_k) - expm1(h_k)) eps_y
//           + sigma_t sqrt(-expm1(-2 l^2 h_k)) xi,     xi ~ N(0, I) in the DCT basis;
//     l = 1 is DDPM's ancestral step per frequency.
//   Euler baseline (q = 1): the lambda-SDE du = [F u + (1 + l^2)/2 G^2 eps/sigma] dt + l G dw
//     integrated by Euler (l = 0: the PF-ODE) or Euler-Maruyama (l > 0) in t:
//     y_t = (1 + (t - s) F_k(s)) y_s + (t - s) (1 + l^2)/2 G_k(s)^2/sigma_s eps_y
//           + l G_k(s) sqrt(s - t) xi.
// The model is evaluated at the grid's nodes: Node{t, a(t), sigma(t), lambda_base(t),
// model_time_scale t} (the base schedule's signal scale a = sqrt(abar), not alpha_k).
//
// State layout: B x (C H W) DCT coefficients, C = channels, each channel's H x W block
// transformed separately (gddim/spectral_field.hpp); the per-frequency values repeat per
// channel in the table. The noise xi is the engine's standard normal state of that shape
// (Philox by global element index, or SamplerWorkspace::given_noise), in the DCT basis.
//
// Convenience entry points: sample_bdm (pixel x_T in, pixel sample out; or x_T drawn) and
// gradient_bdm (the exact discrete gradient through the scheme, with the pixel-space loss
// and x_T; the DCT before and the IDCT after the loop are orthonormal, so their adjoints are
// the opposite transforms).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/concepts/observer.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/gddim/spectral_field.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad::gddim {

/// Which integrator a BdmGddim runs.
enum class BdmMethod {
  gddim, ///< the exponential integrator with R_t = sigma(t) (exact for one data point)
  euler, ///< baseline: Euler on the PF-ODE (stochasticity 0) or Euler-Maruyama (> 0), in t
};

struct BdmGddimOptions {
  int order = 1;                   ///< q = 1..3 model outputs per step (deterministic gDDIM only)
  double stochasticity = 0.0;      ///< l in [0, 1]: 0 deterministic, 1 the reverse SDE
  double model_time_scale = 999.0; ///< the network gets model_t = scale * t (official: 999)
  BdmMethod method = BdmMethod::gddim;
  Eigen::Index channels = 1; ///< image channels C per state row
};

/// The BDM gDDIM scheme over one time grid (see the header comment). B is the backend whose
/// memory holds the coefficient table (EigenBackend: host; the table is shared by copies of
/// the scheme, so copies stay valid).
template <class B> class BdmGddim {
public:
  using coeff_type = ColumnCoeff;
  using plan_type = BasicStepPlan<ColumnCoeff>;
  using table_type = typename B::coefficient_table;

  /// `times`: strictly decreasing (noise to data), at least 2, inside the schedule's domain.
  template <class Vp>
  BdmGddim(const B& backend, const BdmSchedule<Vp>& schedule, std::span<const double> times,
           const BdmGddimOptions& options = {})
      : options_(options), height_(schedule.height()), width_(schedule.width()) {
    const char* where = "BdmGddim";
    diffgrad::detail::require(options.order >= 1 && options.order <= 3, where, "options.order",
                              "1..3 (q model outputs per step)", options.order);
    diffgrad::detail::require(options.stochasticity >= 0.0 && options.stochasticity <= 1.0, where,
                              "options.stochasticity", "0 <= stochasticity <= 1",
                              options.stochasticity);
    diffgrad::detail::require(
        options.model_time_scale > 0.0 && std::isfinite(options.model_time_scale), where,
        "options.model_time_scale", "a positive finite number", options.model_time_scale);
    diffgrad::detail::require(options.channels >= 1, where, "options.channels",
                              "at least 1 channel", static_cast<double>(options.channels));
    if (options.order > 1 && options.stochasticity > 0.0)
      diffgrad::detail::throw_argument(
          where, "options.order",
          "order 1 with stochasticity > 0 (the stochastic gDDIM step is single-step)",
          options.order);
    if (options.order > 1 && options.method == BdmMethod::euler)
      diffgrad::detail::throw_argument(
          where, "options.order", "order 1 for the Euler / Euler-Maruyama baseline", options.order);
    check_times(schedule, times, where);

    const auto steps = static_cast<int>(times.size()) - 1;
    const Eigen::Index k = schedule.size();
    nodes_.reserve(times.size());
    for (const double t : times) {
      Node n = schedule.vp().node(t);
      n.model_t = options.model_time_scale * t;
      nodes_.push_back(n);
    }

    // Host values: rows of H W per-frequency values, each written C times (one per channel).
    std::vector<double> host;
    const auto push_row = [&](const Eigen::VectorXd& v) {
      const auto offset = host.size();
      for (Eigen::Index c = 0; c < options.channels; ++c)
        host.insert(host.end(), v.data(), v.data() + k);
      return offset;
    };
    struct Offsets {
      std::size_t x = 0, noise = 0;
      std::size_t eps[3] = {0, 0, 0};
      int points = 1;
      bool noisy = false;
    };
    std::vector<Offsets> offsets(static_cast<std::size_t>(steps));
    Eigen::VectorXd x(k), e(k), noise(k), f(k), g2(k);
    Eigen::MatrixXd multi;
    for (int i = 0; i < steps; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const double s = times[u], t = times[u + 1];
      Offsets& o = offsets[u];
      if (options.method == BdmMethod::euler) {
        schedule.drift(s, f);
        schedule.diffusion2(s, g2);
        const double dt = t - s, l2 = options.stochasticity * options.stochasticity;
        const double sigma_s = schedule.sigma(s);
        for (Eigen::Index j = 0; j < k; ++j) {
          x[j] = 1.0 + dt * f[j];
          e[j] = dt * 0.5 * (1.0 + l2) * g2[j] / sigma_s;
          noise[j] = options.stochasticity * std::sqrt(g2[j] * (s - t));
        }
        o.x = push_row(x);
        o.eps[0] = push_row(e);
        o.noisy = options.stochasticity > 0.0;
        if (o.noisy) o.noise = push_row(noise);
      } else if (options.stochasticity > 0.0) {
        schedule.stochastic_coeffs(s, t, options.stochasticity, x, e, noise);
        o.x = push_row(x);
        o.eps[0] = push_row(e);
        o.noisy = true;
        o.noise = push_row(noise);
      } else {
        schedule.ddim_coeffs(s, t, x, e);
        o.x = push_row(x);
        o.points = std::min(options.order, i + 1);
        if (o.points == 1) {
          o.eps[0] = push_row(e);
        } else {
          double points[3] = {0.0, 0.0, 0.0};
          for (int j = 0; j < o.points; ++j) points[j] = times[u - static_cast<std::size_t>(j)];
          multi.resize(o.points, k);
          schedule.multistep_coeffs(
              std::span<const double>(points, static_cast<std::size_t>(o.points)), t, multi);
          for (int j = 0; j < o.points; ++j) {
            const Eigen::VectorXd row = multi.row(j).transpose();
            o.eps[j] = push_row(row);
          }
        }
      }
    }
    host_ = host;
    table_ = std::make_shared<const table_type>(
        backend.make_coefficients(std::span<const double>(host.data(), host.size())));
    const double* base = backend.coefficient_data(*table_);
    plans_.resize(static_cast<std::size_t>(steps));
    for (int i = 0; i < steps; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const Offsets& o = offsets[u];
      plan_type& p = plans_[u];
      p.num_stages = 1;
      p.stage_node[0] = nodes_[u];
      p.output.x = ColumnCoeff{base + o.x, 1.0};
      p.output.e[0] = ColumnCoeff{base + o.eps[0], 1.0};
      for (int j = 1; j < o.points; ++j) p.output.hist_e[j - 1] = ColumnCoeff{base + o.eps[j], 1.0};
      if (o.noisy) p.noise = ColumnCoeff{base + o.noise, 1.0};
    }
  }

  int history() const { return options_.order - 1; }
  int stages() const { return 1; }
  bool stochastic() const { return options_.stochasticity > 0.0; }
  int num_steps() const { return static_cast<int>(plans_.size()); }
  const BdmGddimOptions& options() const { return options_; }
  Eigen::Index height() const { return height_; }
  Eigen::Index width() const { return width_; }
  Eigen::Index channels() const { return options_.channels; }
  Eigen::Index dim() const { return options_.channels * height_ * width_; } ///< C H W

  /// The grid's nodes, to pass to run_scheme / discrete_adjoint.
  std::span<const Node> nodes() const { return nodes_; }
  /// The engine's lambda -> node map; this scheme has no intermediate stages, so it is never
  /// called (it throws std::logic_error if it were).
  static NodeAtLambda node_at_lambda() { return NodeAtLambda(no_stages_); }

  /// Refuses a node span that is not this scheme's grid (size, and every t and model_t).
  void validate(std::span<const Node> nodes) const {
    if (nodes.size() != nodes_.size())
      diffgrad::detail::throw_argument(
          "BdmGddim", "nodes",
          diffgrad::detail::concat("the scheme's grid of ", nodes_.size(), " nodes (nodes())"),
          diffgrad::detail::concat(nodes.size(), " nodes"));
    for (std::size_t i = 0; i < nodes.size(); ++i)
      if (nodes[i].t != nodes_[i].t || nodes[i].model_t != nodes_[i].model_t)
        diffgrad::detail::throw_argument(
            "BdmGddim", "nodes",
            diffgrad::detail::concat("the scheme's grid (nodes()): node ", i,
                                     " at t = ", nodes_[i].t, ", model time ", nodes_[i].model_t),
            diffgrad::detail::concat("t = ", nodes[i].t, ", model time ", nodes[i].model_t));
  }

  plan_type plan(std::span<const Node>, int i, NodeAtLambda) const {
    if (i < 0 || i >= num_steps())
      throw std::logic_error(diffgrad::detail::concat(
          "BdmGddim::plan: step ", i, " outside the grid's ", num_steps(), " steps"));
    return plans_[static_cast<std::size_t>(i)];
  }

  bool accepts_dim(std::int64_t dim) const { return dim == this->dim(); }
  std::string dim_requirement() const {
    return diffgrad::detail::concat("C H W = ", dim(), " (", options_.channels, " channels of ",
                                    height_, " x ", width_, " DCT coefficients per row)");
  }

  /// The coefficient table as built on the host (per step: Psi, the eps coefficients newest
  /// first, then the noise std when stochastic; each row C H W long). For inspection.
  const std::vector<double>& host_coefficients() const { return host_; }

private:
  struct NoStages {
    Node node(double) const {
      throw std::logic_error("BdmGddim: the scheme has no intermediate stages to place");
    }
    double t_of_lambda(double lambda) const { return lambda; }
  };
  static inline const NoStages no_stages_{};

  template <class Vp>
  static void check_times(const BdmSchedule<Vp>& schedule, std::span<const double> times,
                          const char* where) {
    diffgrad::detail::require(times.size() >= 2, where, "times", "at least 2 time points",
                              static_cast<double>(times.size()));
    for (std::size_t i = 0; i < times.size(); ++i) {
      const double t = times[i];
      if (!(t >= schedule.t_min() && t <= schedule.t_max()))
        diffgrad::detail::throw_argument(
            where, "times",
            diffgrad::detail::concat("times inside the schedule's domain [", schedule.t_min(), ", ",
                                     schedule.t_max(), "]; at index ", i),
            t);
      if (i > 0 && !(t < times[i - 1]))
        diffgrad::detail::throw_argument(
            where, "times",
            diffgrad::detail::concat("strictly decreasing times (noise to data); at index ", i,
                                     " after ", times[i - 1]),
            t);
    }
  }

  BdmGddimOptions options_;
  Eigen::Index height_, width_;
  std::vector<Node> nodes_;
  std::vector<double> host_;
  std::shared_ptr<const table_type> table_;
  std::vector<plan_type> plans_;
};

namespace bdm_detail {

template <class B>
void check_pixels(const BdmGddim<B>& scheme, const ImageBatch& x, const char* where,
                  const char* arg) {
  if (!scheme.accepts_dim(x.cols()))
    diffgrad::detail::throw_argument(where, arg,
                                     diffgrad::detail::concat("rows of ", scheme.dim_requirement()),
                                     diffgrad::detail::concat(x.cols(), " columns"));
}

/// A pixel-space loss seen from the DCT basis: L(IDCT(y0)), dL/dy0 = DCT(dL/dx0).
template <class B, class Loss> struct SpectralLoss {
  Loss& loss;
  const ChannelDct& dct;
  ImageBatch& x0;
  ImageBatch& grad;
  double operator()(const B& backend, const ImageBatch& y0, ImageBatch& grad_y) {
    dct.inverse(y0, x0);
    grad.resize(x0.rows(), x0.cols());
    const double value =
        static_cast<double>(loss(backend, static_cast<const ImageBatch&>(x0), grad));
    dct.forward(grad, grad_y);
    return value;
  }
};

} // namespace bdm_detail

/// Samples with a pixel-space noise model: x holds x_T in pixel space on entry (B x C H W)
/// and the sample in pixel space on exit. The state is transformed to the DCT basis once,
/// the scheme runs there (the model through SpectralEpsField), and the result is transformed
/// back. given_noise (optional, one state per step, in the DCT basis) replaces the Philox
/// noise of stochastic steps. The observer sees DCT-basis states.
template <class B, class Model, class Obs = NullObserver>
SampleResult sample_bdm(const BdmGddim<B>& scheme, const B& backend, Model& model,
                        typename B::state_type& x, const SampleOptions& options = {},
                        std::span<const typename B::state_type> given_noise = {},
                        Obs&& observer = {}) {
  static_assert(
      std::is_same_v<typename B::state_type, ImageBatch>,
      "sample_bdm: the DCT adapters work on double row-major states (EigenBackend<double>)");
  bdm_detail::check_pixels(scheme, x, "sample_bdm", "x");
  const ChannelDct dct(scheme.height(), scheme.width(), scheme.channels());
  dct.forward(x, x);
  SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), B::batch(x), B::dim(x));
  ws.given_noise = given_noise;
  SpectralEpsField<Model> field(model, dct, B::batch(x));
  const SampleResult r = run_scheme(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field,
                                    x, ws, options, std::forward<Obs>(observer));
  dct.inverse(x, x);
  return r;
}

/// The official BDM grid, quadratic in t: t_i = (sqrt(t_start) + i/N (sqrt(t_end) -
/// sqrt(t_start)))^2, i = 0..N, from t_start (default: where sigma/alpha = 80 for the DC term,
/// the official sampler's start) down to t_end (default 1e-5); the ends are exact.
template <class Vp>
std::vector<double> bdm_quadratic_grid(const BdmSchedule<Vp>& schedule, int steps,
                                       double t_start = -1.0, double t_end = 1e-5) {
  const char* where = "gddim::bdm_quadratic_grid";
  if (t_start < 0.0) {
    if constexpr (requires { schedule.vp().t_start(80.0); })
      t_start = schedule.vp().t_start(80.0);
    else
      diffgrad::detail::throw_argument(where, "t_start",
                                       "a start time (this base schedule has no t_start(rho))",
                                       t_start);
  }
  diffgrad::detail::require(steps >= 1, where, "steps", "at least 1 step", steps);
  diffgrad::detail::require(std::isfinite(t_start) && t_start > schedule.t_min() &&
                                t_start <= schedule.t_max(),
                            where, "t_start", "a time in (t_min, t_max]", t_start);
  diffgrad::detail::require(std::isfinite(t_end) && t_end >= schedule.t_min() && t_end < t_start,
                            where, "t_end", "a time in [t_min, t_start)", t_end);
  const double a = std::sqrt(t_start), b = std::sqrt(t_end);
  std::vector<double> t(static_cast<std::size_t>(steps) + 1);
  for (int i = 0; i <= steps; ++i) {
    const double r = a + (static_cast<double>(i) / steps) * (b - a);
    t[static_cast<std::size_t>(i)] = r * r;
  }
  t.front() = t_start;
  t.back() = t_end;
  return t;
}

/// The Philox "step" index of a drawn x_T: distinct from every sampling step's noise.
inline constexpr std::uint64_t kBdmPriorStream = std::numeric_limits<std::uint64_t>::max();

/// Draws x_T ~ N(0, I) (batch rows, C H W columns; element (r, c) is the Philox normal
/// gaussian(prior_seed, kBdmPriorStream, (options.row_offset + r) C H W + c)) and samples;
/// returns the pixel-space sample.
template <class B, class Model>
typename B::state_type sample_bdm(const BdmGddim<B>& scheme, const B& backend, Model& model,
                                  std::int64_t batch, std::uint64_t prior_seed,
                                  const SampleOptions& options = {}) {
  diffgrad::detail::require(batch >= 1, "sample_bdm", "batch", "a batch of at least 1 sample",
                            static_cast<double>(batch));
  typename B::state_type x = backend.make_state(batch, scheme.dim());
  backend.lincomb(x, NoiseTerm{1.0, prior_seed, kBdmPriorStream, options.row_offset});
  sample_bdm(scheme, backend, model, x, options);
  return x;
}

/// A workspace for gradient_bdm with these options (x_T: the pixel-space x_T's shape).
template <class B, class Model>
GradientWorkspace<B> make_bdm_gradient_workspace(const BdmGddim<B>& scheme, const B& backend,
                                                 Model& model, const typename B::state_type& x_T,
                                                 const GradientOptions& options = {}) {
  bdm_detail::check_pixels(scheme, x_T, "make_bdm_gradient_workspace", "x_T");
  return GradientWorkspace<B>::for_scheme(backend, scheme, scheme.num_steps(), x_T,
                                          static_cast<std::int64_t>(model.cond_size()),
                                          static_cast<std::int64_t>(model.param_size()), options);
}

/// The exact discrete gradient of loss(x_0) through the BDM sampler, x_0 the pixel-space
/// sample from the pixel-space x_T (the library's discrete_adjoint with the spectral
/// adapters; all memory modes). `loss` is a LossFunction on pixel states or a pixel-space
/// cotangent dL/dx_0. On return ws.result holds x0 and grad_x (dL/dx_T) in PIXEL space,
/// grad_cond / grad_params as usual, and grad_noise in the DCT basis (where the noise lives).
/// Allocates the transform and the adapters' scratch per call (small next to the run).
template <class B, class Model, class LossOrCotangent>
const GradientResult<B>& gradient_bdm(const BdmGddim<B>& scheme, const B& backend, Model& model,
                                      const typename B::state_type& x_T, LossOrCotangent&& loss,
                                      const GradientOptions& options, GradientWorkspace<B>& ws) {
  using State = typename B::state_type;
  static_assert(
      std::is_same_v<State, ImageBatch>,
      "gradient_bdm: the DCT adapters work on double row-major states (EigenBackend<double>)");
  bdm_detail::check_pixels(scheme, x_T, "gradient_bdm", "x_T");
  const ChannelDct dct(scheme.height(), scheme.width(), scheme.channels());
  State y_T(x_T.rows(), x_T.cols());
  dct.forward(x_T, y_T);
  SpectralEpsField<Model> field(model, dct, x_T.rows());
  SpectralEpsVjp<Model> vjp(model, dct, x_T.rows());
  if constexpr (std::is_same_v<std::remove_cvref_t<LossOrCotangent>, State>) {
    bdm_detail::check_pixels(scheme, loss, "gradient_bdm", "cotangent");
    State cot(loss.rows(), loss.cols());
    dct.forward(loss, cot);
    discrete_adjoint(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, vjp, y_T, cot,
                     options, ws);
  } else {
    State x0(x_T.rows(), x_T.cols()), grad(x_T.rows(), x_T.cols());
    bdm_detail::SpectralLoss<B, std::remove_reference_t<LossOrCotangent>> spectral{loss, dct, x0,
                                                                                   grad};
    discrete_adjoint(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, vjp, y_T,
                     spectral, options, ws);
  }
  dct.inverse(ws.result.x0, ws.result.x0);
  dct.inverse(ws.result.grad_x, ws.result.grad_x);
  return ws.result;
}

/// Allocating convenience: builds the workspace and returns a copy of the result.
template <class B, class Model, class LossOrCotangent>
GradientResult<B> gradient_bdm(const BdmGddim<B>& scheme, const B& backend, Model& model,
                               const typename B::state_type& x_T, LossOrCotangent&& loss,
                               const GradientOptions& options = {}) {
  auto ws = make_bdm_gradient_workspace(scheme, backend, model, x_T, options);
  gradient_bdm(scheme, backend, model, x_T, std::forward<LossOrCotangent>(loss), options, ws);
  return ws.result;
}

} // namespace diffgrad::gddim
