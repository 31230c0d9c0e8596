// Exact discrete adjoint through every StepPlan scheme: central finite differences (x_T,
// conditioning, parameters, noise) on the Gaussian, Dirac-mixture and MLP models, the
// dot-product test on a linear model, the DDIM closed form on Gaussian data, identical
// gradients and exact costs across memory modes, and bad input.
// Heap allocations inside gradient() are counted by tests/alloc_probe.hpp, which must precede
// every Eigen include.
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <span>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "diffgrad/flow/euler.hpp"
#include "diffgrad/flow/heun.hpp"
#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/gaussian_flow.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/models/rectified_flow_mixture.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/deis.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#include "fd_vjp.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

namespace {

// ---------------------------------------------------------------------------------------
// Models local to these tests.

/// eps(x, n) = sigma_n theta (x M^T + z) and velocity(x, t) = theta (x M^T + z): linear in
/// (x, z) with a NON-symmetric M, so the dot-product test <w, J v> = <J^T w, v> is not
/// trivially true. cond = z (length d), param = theta (not used by the linear tests).
struct LinearTestModel {
  Eigen::MatrixXd m;
  Vector z;
  double theta = 1.0;
  explicit LinearTestModel(Eigen::Index d) : m(d, d), z(Vector::Zero(d)) {
    for (Eigen::Index r = 0; r < d; ++r)
      for (Eigen::Index c = 0; c < d; ++c)
        m(r, c) =
            0.6 * std::sin(1.7 * static_cast<double>(r) + 0.9 * static_cast<double>(c * c) + 0.3);
  }
  std::int64_t cond_size() const { return z.size(); }
  std::int64_t param_size() const { return 1; }
  void eps(const State& x, const Node& n, State& out) const { velocity(x, 1.0, out, n.sigma); }
  void vjp(const State&, const Node& n, const State& a, State& dx, Vector* dcond, Vector*) const {
    linear_vjp(a, dx, dcond, n.sigma);
  }
  void velocity(const State& x, double, State& out, double scale = 1.0) const {
    out = (scale * theta) * ((x * m.transpose()).rowwise() + z.transpose());
  }
  void velocity_vjp(const State&, double, const State& a, State& dx, Vector* dcond, Vector*) const {
    linear_vjp(a, dx, dcond, 1.0);
  }
  void linear_vjp(const State& a, State& dx, Vector* dcond, double scale) const {
    dx = (scale * theta) * (a * m);
    if (dcond) *dcond += (scale * theta) * a.colwise().sum().transpose();
  }
};

/// Counts forward and VJP calls of the wrapped model, independently of the executor.
template <class M> struct CountingModel {
  M& inner;
  int evals = 0, vjps = 0;
  std::int64_t cond_size() const { return inner.cond_size(); }
  std::int64_t param_size() const { return inner.param_size(); }
  void eps(const State& x, const Node& n, State& out) requires NodeAwareNoiseModel<M, State> {
    ++evals;
    inner.eps(x, n, out);
  }
  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dc,
           Vector* dp) requires NodeAwareNoiseModel<M, State> {
    ++vjps;
    inner.vjp(x, n, a, dx, dc, dp);
  }
  void velocity(const State& x, double t, State& out) requires VelocityModel<M, State> {
    ++evals;
    inner.velocity(x, t, out);
  }
  void velocity_vjp(const State& x, double t, const State& a, State& dx, Vector* dc,
                    Vector* dp) requires VelocityModel<M, State> {
    ++vjps;
    inner.velocity_vjp(x, t, a, dx, dc, dp);
  }
};

models::DiracMixture<double> dirac_problem() {
  State y(3, 3);
  y << 1.0, 0.0, -0.5, -0.8, 0.6, 0.2, 0.1, -1.0, 0.9;
  models::DiracMixture<double> m(y);
  m.set_cond(Vector::LinSpaced(3, -0.2, 0.3));
  return m;
}
models::RectifiedFlowMixture<double> flow_mixture_problem() {
  State y(3, 3);
  y << 1.0, 0.0, -0.5, -0.8, 0.6, 0.2, 0.1, -1.0, 0.9;
  models::RectifiedFlowMixture<double> m(y);
  m.set_cond(Vector::LinSpaced(3, -0.2, 0.3));
  return m;
}
models::Mlp<double> mlp_problem() {
  models::MlpConfig config;
  config.dim = 3;
  config.cond_dim = 2;
  config.time_frequencies = 2;
  config.hidden = {8};
  config.activation = models::Activation::tanh;
  models::Mlp<double> m(config, 3);
  Vector z(2);
  z << 0.3, -0.2;
  m.set_cond(z);
  return m;
}

// ---------------------------------------------------------------------------------------
// Grids, the forward engine, and the gradient call for diffusion and flow samplers alike.

const VPLinearSchedule& vp_schedule() {
  static const VPLinearSchedule schedule;
  return schedule;
}

struct DiffusionGrid {
  std::vector<Node> nodes;
  int steps() const { return static_cast<int>(nodes.size()) - 1; }
};
struct FlowGrid {
  std::vector<double> times;
  std::vector<Node> nodes;
  int steps() const { return static_cast<int>(nodes.size()) - 1; }
};

DiffusionGrid diffusion_grid(int steps, double t_end = 1e-3) {
  return {make_nodes(vp_schedule(), uniform_t_grid(vp_schedule(), steps, 1.0, t_end))};
}
FlowGrid flow_grid(int steps, double t_end = 0.95) {
  auto times = uniform_flow_grid(steps, 0.0, t_end);
  auto nodes = flow_nodes(times);
  return {std::move(times), std::move(nodes)};
}

/// The sampler's output from the forward engine (run_scheme / sample_flow).
template <class Scheme, class Model>
State sample_output(const Scheme& scheme, const DiffusionGrid& grid, Model& model, const State& x_T,
                    std::span<const State> noise, std::uint64_t seed) {
  const Backend64 backend;
  SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                 x_T.cols());
  ws.given_noise = noise;
  State x = x_T;
  run_scheme(scheme, backend, grid.nodes, NodeAtLambda(vp_schedule()), EpsField<Model>{model}, x,
             ws, SampleOptions{.seed = seed});
  return x;
}
template <class Scheme, class Model>
State sample_output(const Scheme& scheme, const FlowGrid& grid, Model& model, const State& x_T,
                    std::span<const State>, std::uint64_t) {
  State x = x_T;
  sample_flow(scheme, Backend64{}, grid.times, model, x);
  return x;
}

template <class Scheme, class Model, class Loss>
const GradientResult<Backend64>&
compute_gradient(const Scheme& scheme, const DiffusionGrid& grid, Model& model, const State& x_T,
                 Loss&& loss, const GradientOptions& options, GradientWorkspace<Backend64>& ws) {
  return gradient(scheme, Backend64{}, vp_schedule(), grid.nodes, model, x_T, loss, options, ws);
}
template <class Scheme, class Model, class Loss>
const GradientResult<Backend64>&
compute_gradient(const Scheme& scheme, const FlowGrid& grid, Model& model, const State& x_T,
                 Loss&& loss, const GradientOptions& options, GradientWorkspace<Backend64>& ws) {
  return gradient_flow(scheme, Backend64{}, grid.times, model, x_T, loss, options, ws);
}

template <class Scheme, class Grid, class Model, class Loss>
GradientResult<Backend64> gradient_once(const Scheme& scheme, const Grid& grid, Model& model,
                                        const State& x_T, Loss&& loss,
                                        const GradientOptions& options) {
  auto ws = make_gradient_workspace(scheme, Backend64{}, grid.nodes, model, x_T, options);
  compute_gradient(scheme, grid, model, x_T, loss, options, ws);
  return std::move(ws.result);
}

/// |a - b| / |b|; |a| when b = 0 (e.g. dL/ds of a one-step flow from t = 0, exactly 0).
double rel_err(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  const double nb = b.norm();
  return nb == 0.0 ? a.norm() : (a - b).norm() / nb;
}

/// Richardson-extrapolated central difference of f at 0 (error O(h^4)).
template <class F> double central_difference(F&& f, double h) {
  const double d1 = (f(h) - f(-h)) / (2 * h);
  const double d2 = (f(h / 2) - f(-h / 2)) / h;
  return (4 * d2 - d1) / 3;
}

/// Reads / writes a flat vector of a model (its conditioning or its parameters).
template <class Model> struct FlatAccess {
  std::function<Vector(const Model&)> get;
  std::function<void(Model&, const Vector&)> set;
};
template <class Model> FlatAccess<Model> mean_access() {
  return {[](const Model& m) { return Vector(m.mu()); },
          [](Model& m, const Vector& v) { m.mu() = v; }};
}
template <class Model> FlatAccess<Model> std_access() {
  return {[](const Model& m) { return Vector::Constant(1, m.s()); },
          [](Model& m, const Vector& v) { m.set_s(v(0)); }};
}
template <class Model> FlatAccess<Model> cond_access() {
  return {[](const Model& m) { return Vector(m.cond()); },
          [](Model& m, const Vector& v) { m.set_cond(v); }};
}
template <class Model> FlatAccess<Model> params_access() {
  return {[](const Model& m) { return Vector(m.params()); },
          [](Model& m, const Vector& v) { m.set_params(v); }};
}

struct FdSteps {
  double x = 1e-3, cond = 1e-3, params = 1e-4, noise = 1e-3;
};

struct SchemeCase {
  std::string name;
  bool given_noise; ///< stochastic schemes: the test gives the noise (else Philox)
};

std::vector<State> noise_states(int steps, Eigen::Index batch, Eigen::Index dim) {
  const Backend64 backend;
  std::vector<State> xi;
  for (int i = 0; i < steps; ++i) {
    xi.push_back(backend.make_state(batch, dim));
    backend.gaussian(xi.back(), 99, static_cast<std::uint64_t>(i));
  }
  return xi;
}

/// Checks dL/dx_T, dL/dcond, dL/dtheta (and dL/dxi_i with given noise) against central
/// differences of the forward engine's output, for L = |x_0 - target|^2 / 2.
template <class Scheme, class Grid, class Model>
void check_against_finite_differences(const SchemeCase& sc, const std::string& model_name,
                                      const Scheme& scheme, const Grid& grid, Model& model,
                                      const FlatAccess<Model>& cond,
                                      const FlatAccess<Model>& params, const State& x_T,
                                      FdSteps h = {}, double tol = 1e-7) {
  const Backend64 backend;
  const std::uint64_t seed = 7;
  const auto noise =
      sc.given_noise ? noise_states(grid.steps(), x_T.rows(), x_T.cols()) : std::vector<State>{};
  State target = diffgrad::testing::test_batch<double>(x_T.rows(), x_T.cols()) * 0.3;
  target.array() += 0.1;
  const SquaredDistanceLoss<Backend64> loss(target);
  const GradientOptions options{
      .wrt_cond = true, .wrt_params = true, .wrt_noise = !noise.empty(), .seed = seed};
  auto ws = make_gradient_workspace(scheme, backend, grid.nodes, model, x_T, options);
  ws.given_noise = noise;
  const auto& r = compute_gradient(scheme, grid, model, x_T, loss, options, ws);

  State scratch = x_T;
  const auto loss_at = [&](const State& x, std::span<const State> xi) {
    return loss(backend, sample_output(scheme, grid, model, x, xi, seed), scratch);
  };
  INFO(sc.name << " on " << model_name);
  CHECK(r.loss == Approx(loss_at(x_T, noise)).epsilon(1e-13));

  State fd_x(x_T.rows(), x_T.cols());
  for (Eigen::Index k = 0; k < x_T.size(); ++k)
    fd_x.data()[k] = central_difference(
        [&](double d) {
          State x = x_T;
          x.data()[k] += d;
          return loss_at(x, noise);
        },
        h.x);
  const auto fd_flat = [&](const FlatAccess<Model>& acc, double step) {
    const Vector p0 = acc.get(model);
    Vector g(p0.size());
    for (Eigen::Index k = 0; k < p0.size(); ++k)
      g(k) = central_difference(
          [&](double d) {
            Vector p = p0;
            p(k) += d;
            acc.set(model, p);
            const double v = loss_at(x_T, noise);
            acc.set(model, p0);
            return v;
          },
          step);
    return g;
  };
  const double err_x = rel_err(r.grad_x, fd_x);
  const double err_c = rel_err(r.grad_cond, fd_flat(cond, h.cond));
  const double err_p = rel_err(r.grad_params, fd_flat(params, h.params));
  INFO("relative errors: dL/dx_T " << err_x << ", dL/dcond " << err_c << ", dL/dtheta " << err_p);
  CHECK(err_x <= tol);
  CHECK(err_c <= tol);
  CHECK(err_p <= tol);

  if (!noise.empty()) {
    std::vector<State> xi(noise.begin(), noise.end());
    Eigen::MatrixXd fd_noise(static_cast<Eigen::Index>(xi.size()), x_T.size());
    Eigen::MatrixXd ad_noise(static_cast<Eigen::Index>(xi.size()), x_T.size());
    for (std::size_t i = 0; i < xi.size(); ++i)
      for (Eigen::Index k = 0; k < x_T.size(); ++k) {
        ad_noise(static_cast<Eigen::Index>(i), k) = r.grad_noise[i].data()[k];
        fd_noise(static_cast<Eigen::Index>(i), k) = central_difference(
            [&](double d) {
              const double keep = xi[i].data()[k];
              xi[i].data()[k] += d;
              const double v = loss_at(x_T, xi);
              xi[i].data()[k] = keep;
              return v;
            },
            h.noise);
      }
    const double err_n = rel_err(ad_noise, fd_noise);
    INFO("dL/dxi relative error " << err_n);
    CHECK(err_n <= tol);
  }
}

// ---------------------------------------------------------------------------------------
// Every scheme of the library.

/// `steps`: the grid's step count (per-step order lists must match it).
template <class F> void for_each_diffusion_scheme(int steps, F&& f) {
  using P = SolverPrediction;
  std::vector<int> mixed_orders; // 3, 2, 1, 3, 2, 1, ...: stage counts vary per step
  for (int i = 0; i < steps; ++i) mixed_orders.push_back(3 - i % 3);
  f(SchemeCase{"DDIM", false}, Ddim());
  f(SchemeCase{"DDIM eta=0.5 (given noise)", true}, Ddim(0.5));
  f(SchemeCase{"DDIM eta=1 (Philox noise)", false}, Ddim(1.0));
  for (int k = 1; k <= 3; ++k) {
    f(SchemeCase{"DpmSolverSinglestep-" + std::to_string(k) + " data", false},
      DpmSolverSinglestep(k, P::data));
    f(SchemeCase{"DpmSolverSinglestep-" + std::to_string(k) + " noise", false},
      DpmSolverSinglestep(k, P::noise));
  }
  f(SchemeCase{"DpmSolverSinglestep mixed orders 3, 2, 1, ...", false},
    DpmSolverSinglestep(DpmSolverSinglestep::Options{.order = 3, .orders = mixed_orders}));
  f(SchemeCase{"DpmSolverSinglestep::diffusers order 3", false},
    DpmSolverSinglestep::diffusers({.solver_order = 3}));
  for (int k = 2; k <= 3; ++k) {
    f(SchemeCase{"DpmSolverMultistep-" + std::to_string(k) + " data", false},
      DpmSolverMultistep(k, P::data));
    f(SchemeCase{"DpmSolverMultistep-" + std::to_string(k) + " noise", false},
      DpmSolverMultistep(k, P::noise));
  }
  for (int k = 1; k <= 3; ++k)
    f(SchemeCase{"SdeDpmSolver-" + std::to_string(k) + " data (given noise)", true},
      SdeDpmSolver(k, P::data));
  f(SchemeCase{"SdeDpmSolver-2 noise (given noise)", true}, SdeDpmSolver(2, P::noise));
  f(SchemeCase{"SdeDpmSolver-2 data (Philox noise)", false}, SdeDpmSolver(2, P::data));
  for (int r = 1; r <= 3; ++r) {
    f(SchemeCase{"DeisTab-" + std::to_string(r), false}, DeisTab(r));
    f(SchemeCase{"DeisRhoAb-" + std::to_string(r), false}, DeisRhoAb(r));
  }
  f(SchemeCase{"DeisLogRho-3", false}, DeisLogRho(3));
  for (int k = 2; k <= 4; ++k) f(SchemeCase{"IPndm-" + std::to_string(k), false}, IPndm(k));
  f(SchemeCase{"DeisRhoRk heun2", false}, DeisRhoRk(DeisRkMethod::heun2));
  f(SchemeCase{"DeisRhoRk kutta3", false}, DeisRhoRk(DeisRkMethod::kutta3));
  f(SchemeCase{"DeisRhoRk rk4", false}, DeisRhoRk(DeisRkMethod::rk4));
}

template <class F> void for_each_flow_scheme(F&& f) {
  f(SchemeCase{"FlowEuler", false}, FlowEuler());
  f(SchemeCase{"FlowHeun", false}, FlowHeun());
  f(SchemeCase{"FlowHeun final Euler", false}, FlowHeun(true));
}

/// Stage counts of every step, read from the scheme's plans (for the cost formulas).
template <class Scheme>
std::vector<int> stage_counts(const Scheme& scheme, std::span<const Node> nodes,
                              NodeAtLambda node_at_lambda) {
  std::vector<int> s;
  for (int i = 0; i + 1 < static_cast<int>(nodes.size()); ++i)
    s.push_back(scheme.plan(nodes, i, node_at_lambda).num_stages);
  return s;
}

} // namespace

// ---------------------------------------------------------------------------------------
// (a) Central finite differences.

TEST_CASE("discrete adjoint = central finite differences, Gaussian data, every scheme",
          "[adjoint][fd]") {
  const auto grid = diffusion_grid(8);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::GaussianData<double>;
  for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
    auto model = diffgrad::testing::gaussian_problem<double>(3);
    check_against_finite_differences(sc, "Gaussian", scheme, grid, model, mean_access<Model>(),
                                     std_access<Model>(), x_T);
  });
}

TEST_CASE("discrete adjoint = central finite differences, Dirac mixture, every scheme",
          "[adjoint][fd]") {
  // Stop at t = 0.05 (sigma ~ 0.17): nearer t = 0 the posterior weights are so sharp that
  // finite differences, not the adjoint, lose their accuracy.
  const auto grid = diffusion_grid(8, 0.05);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::DiracMixture<double>;
  for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
    auto model = dirac_problem();
    check_against_finite_differences(sc, "Dirac mixture", scheme, grid, model, cond_access<Model>(),
                                     params_access<Model>(), x_T, FdSteps{1e-3, 1e-3, 1e-3, 1e-3});
  });
}

TEST_CASE("discrete adjoint = central finite differences, MLP, every scheme", "[adjoint][fd]") {
  const auto grid = diffusion_grid(6);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::Mlp<double>;
  for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
    auto model = mlp_problem();
    check_against_finite_differences(sc, "MLP", scheme, grid, model, cond_access<Model>(),
                                     params_access<Model>(), x_T, FdSteps{1e-3, 1e-3, 1e-4, 1e-3});
  });
}

TEST_CASE("discrete adjoint through prediction-type adapters (x0, v, score MLPs)",
          "[adjoint][fd]") {
  // The adapters turn a network's prediction into eps (models/prediction.hpp); gradients go
  // through them unchanged, conditioning and parameters included.
  const auto grid = diffusion_grid(6);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using models::PredictionType;
  for (PredictionType type : {PredictionType::x0, PredictionType::v, PredictionType::score}) {
    auto net = mlp_problem();
    auto model = models::as_eps_model(net, type);
    using Model = decltype(model);
    const FlatAccess<Model> cond{[&net](const Model&) { return Vector(net.cond()); },
                                 [&net](Model&, const Vector& v) { net.set_cond(v); }};
    const FlatAccess<Model> params{[&net](const Model&) { return Vector(net.params()); },
                                   [&net](Model&, const Vector& v) { net.set_params(v); }};
    const std::string name = models::prediction_type_name(type);
    check_against_finite_differences(SchemeCase{"DPM-Solver++ 2M", false}, name + "-prediction MLP",
                                     DpmSolverMultistep(2, SolverPrediction::data), grid, model,
                                     cond, params, x_T, FdSteps{1e-3, 1e-3, 1e-4, 1e-3});
    check_against_finite_differences(SchemeCase{"DPM-Solver-3 singlestep", false},
                                     name + "-prediction MLP",
                                     DpmSolverSinglestep(3, SolverPrediction::noise), grid, model,
                                     cond, params, x_T, FdSteps{1e-3, 1e-3, 1e-4, 1e-3});
  }
}

TEST_CASE("discrete adjoint = central finite differences, flow schemes and velocity models",
          "[adjoint][fd][flow]") {
  const auto grid = flow_grid(8);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  for_each_flow_scheme([&](const SchemeCase& sc, const auto& scheme) {
    {
      using Model = models::GaussianFlow<double>;
      Model model(Vector::LinSpaced(3, 0.5, -0.1), 0.3);
      check_against_finite_differences(sc, "Gaussian flow", scheme, grid, model,
                                       mean_access<Model>(), std_access<Model>(), x_T);
    }
    {
      using Model = models::RectifiedFlowMixture<double>;
      auto model = flow_mixture_problem();
      check_against_finite_differences(sc, "rectified-flow mixture", scheme, grid, model,
                                       cond_access<Model>(), params_access<Model>(), x_T,
                                       FdSteps{1e-3, 1e-3, 1e-3, 1e-3});
    }
    {
      using Model = models::Mlp<double>;
      auto model = mlp_problem();
      check_against_finite_differences(sc, "MLP velocity", scheme, grid, model,
                                       cond_access<Model>(), params_access<Model>(), x_T,
                                       FdSteps{1e-3, 1e-3, 1e-3, 1e-3});
    }
  });
}

// ---------------------------------------------------------------------------------------
// (b) Dot-product test.

namespace {
/// x_0 is linear in (x_T, z, xi) for the linear model: J v is one forward run with
/// (x_T, z, xi) = v, exact to rounding, and J^T w is one gradient with cotangent w.
template <class Scheme, class Grid>
void dot_product_test(const SchemeCase& sc, const Scheme& scheme, const Grid& grid) {
  const Eigen::Index batch = 3, dim = 4;
  LinearTestModel model(dim);
  const State v_x = diffgrad::testing::test_batch<double>(batch, dim);
  State w = diffgrad::testing::test_batch<double>(batch, dim).reverse();
  w.array() += 0.25;
  Vector v_z(dim);
  for (Eigen::Index k = 0; k < dim; ++k) v_z(k) = std::cos(2.1 * static_cast<double>(k) + 1.0);
  const auto v_xi = noise_states(grid.steps(), batch, dim);
  const bool noisy = scheme.stochastic();

  model.z = v_z;
  const State jv = sample_output(scheme, grid, model, v_x, v_xi, 0);
  model.z.setZero(); // J is the same at every point: the model is linear

  const GradientOptions options{.wrt_cond = true, .wrt_noise = noisy};
  auto ws = make_gradient_workspace(scheme, Backend64{}, grid.nodes, model, v_x, options);
  if (noisy) ws.given_noise = v_xi;
  const auto& r = compute_gradient(scheme, grid, model, v_x, w, options, ws);
  double rhs = r.grad_x.cwiseProduct(v_x).sum() + r.grad_cond.dot(v_z);
  if (noisy)
    for (int i = 0; i < grid.steps(); ++i) rhs += r.grad_noise[i].cwiseProduct(v_xi[i]).sum();
  const double lhs = w.cwiseProduct(jv).sum();
  INFO(sc.name << ": <w, Jv> = " << lhs << ", <J^T w, v> = " << rhs << ", relative mismatch "
               << std::abs(lhs - rhs) / std::abs(lhs));
  CHECK(std::abs(lhs - rhs) <= 1e-12 * std::abs(lhs));
  // With a cotangent the reported loss is <w, x_0> at the point (z = 0 now).
  const State x0 = sample_output(scheme, grid, model, v_x, v_xi, 0);
  CHECK(r.loss == Approx(w.cwiseProduct(x0).sum()).epsilon(1e-13));
}
} // namespace

TEST_CASE("dot-product test <w, J v> = <J^T w, v> on a linear model, every scheme",
          "[adjoint][dot]") {
  const auto grid = diffusion_grid(10);
  for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
    dot_product_test(sc, scheme, grid);
  });
  const auto fgrid = flow_grid(10);
  for_each_flow_scheme(
      [&](const SchemeCase& sc, const auto& scheme) { dot_product_test(sc, scheme, fgrid); });
}

// ---------------------------------------------------------------------------------------
// (c) Closed form.

TEST_CASE("DDIM gradient on Gaussian data equals the closed-form product of step factors",
          "[adjoint][closed-form]") {
  // Gaussian data: eps_i(x) = sigma_i (x - alpha_i mu)/v_i, v_i = alpha_i^2 s^2 + sigma_i^2.
  // A DDIM step x_{i+1} = a_i x_i + b_i eps_i(x_i) + c_i xi_i is then affine:
  //   x_{i+1} = k_i x_i + m_i mu + c_i xi_i,  k_i = a_i + b_i sigma_i / v_i,
  //   m_i = -b_i sigma_i alpha_i / v_i,
  // so with the cotangent w of x_N:  dL/dx_T = (prod_i k_i) w,
  //   dL/dmu = sum_i (prod_{j>i} k_j) m_i sum_batch w,  dL/dxi_i = c_i (prod_{j>i} k_j) w,
  // and dL/ds = <w, y_N> with the forward sensitivity y_{i+1} = k_i y_i + b_i d eps_i/ds,
  //   d eps_i/ds = -sigma_i (x_i - alpha_i mu) 2 alpha_i^2 s / v_i^2.
  // a, b, c straight from the DDIM definition: x_t = alpha_t x0 + sqrt(sigma_t^2 - s_eta^2)
  // eps + s_eta xi, x0 = (x_s - sigma_s eps)/alpha_s, s_eta = eta sigma_t sqrt(1 - e^-2h).
  const Backend64 backend;
  const int steps = 12;
  const auto grid = diffusion_grid(steps);
  const auto& nodes = grid.nodes;
  const State x_T = diffgrad::testing::test_batch<double>(3, 2);
  const State w = diffgrad::testing::test_batch<double>(3, 2).colwise().reverse();
  auto model = diffgrad::testing::gaussian_problem<double>(2);
  const double s = model.s();
  for (double eta : {0.0, 0.6}) {
    const auto xi = noise_states(steps, 3, 2);
    std::vector<double> a(steps), b(steps), c(steps), k(steps), m(steps);
    for (int i = 0; i < steps; ++i) {
      const Node& p = nodes[i];
      const Node& q = nodes[i + 1];
      const double h = q.lambda - p.lambda;
      const double s_eta = eta * q.sigma * std::sqrt(1.0 - std::exp(-2.0 * h));
      a[i] = q.alpha / p.alpha;
      b[i] = std::sqrt(q.sigma * q.sigma - s_eta * s_eta) - q.alpha * p.sigma / p.alpha;
      c[i] = s_eta;
      const double v = p.alpha * p.alpha * s * s + p.sigma * p.sigma;
      k[i] = a[i] + b[i] * p.sigma / v;
      m[i] = -b[i] * p.sigma * p.alpha / v;
    }
    // Forward trajectory and the s-sensitivity, by the scalar recurrences.
    State x = x_T, y = State::Zero(3, 2);
    for (int i = 0; i < steps; ++i) {
      const Node& p = nodes[i];
      const double v = p.alpha * p.alpha * s * s + p.sigma * p.sigma;
      const State centred = x.rowwise() - p.alpha * model.mu().transpose();
      const State deps_ds = (-p.sigma * 2.0 * p.alpha * p.alpha * s / (v * v)) * centred;
      y = (k[i] * y + b[i] * deps_ds).eval();
      x = ((k[i] * x).rowwise() + m[i] * model.mu().transpose()).eval() + c[i] * xi[i];
    }
    double prod = 1.0;
    Vector expected_mu = Vector::Zero(2);
    std::vector<double> tail(steps); // prod_{j>i} k_j
    for (int i = steps - 1; i >= 0; --i) {
      tail[i] = prod;
      expected_mu += (prod * m[i]) * w.colwise().sum().transpose();
      prod *= k[i];
    }
    const GradientOptions options{.wrt_cond = true, .wrt_params = true, .wrt_noise = true};
    const Ddim scheme(eta);
    auto ws = make_gradient_workspace(scheme, backend, nodes, model, x_T, options);
    ws.given_noise = xi;
    const auto& r = gradient(scheme, backend, vp_schedule(), nodes, model, x_T, w, options, ws);
    INFO("eta = " << eta);
    CHECK(rel_err(r.x0, x) <= 1e-13);
    CHECK(rel_err(r.grad_x, prod * w) <= 1e-12);
    CHECK(rel_err(r.grad_cond, expected_mu) <= 1e-12);
    const double expected_s = w.cwiseProduct(y).sum();
    CHECK(std::abs(r.grad_params(0) - expected_s) <= 1e-12 * std::abs(expected_s));
    if (eta > 0)
      for (int i = 0; i < steps; ++i)
        CHECK(rel_err(r.grad_noise[i], (c[i] * tail[i]) * w) <= 1e-12);
  }
}

namespace {
/// dL/dx_T of deterministic DDIM on Gaussian data for the cotangent w: prod_i k_i w with
/// k_i = a_i + b_i sigma_i / v_i (the closed form of the test above, eta = 0).
State ddim_gaussian_grad_x(std::span<const Node> nodes, double s, const State& w) {
  double prod = 1.0;
  for (std::size_t i = 0; i + 1 < nodes.size(); ++i) {
    const Node& p = nodes[i];
    const Node& q = nodes[i + 1];
    const double v = p.alpha * p.alpha * s * s + p.sigma * p.sigma;
    prod *= q.alpha / p.alpha + (q.sigma - q.alpha * p.sigma / p.alpha) * p.sigma / v;
  }
  return prod * w;
}

struct LongRunJob {
  int steps = 0;
  MemoryMode memory = MemoryMode::store_all();
  double error = -1.0; ///< relative error of dL/dx_T against the closed form
  std::int64_t forward_steps = 0;
  std::string failure{};
};

/// gradient() through `steps` DDIM steps on d = 2 Gaussian data, checked against the
/// closed form; everything is recorded in the job (it may run on another thread, where
/// Catch assertions are not allowed).
void run_long_gradient(LongRunJob& job) {
  try {
    const auto grid = diffusion_grid(job.steps);
    auto model = diffgrad::testing::gaussian_problem<double>(2);
    const State x_T = diffgrad::testing::test_batch<double>(1, 2);
    const State w = State::Constant(1, 2, 0.5);
    const auto r = gradient(Ddim(), Backend64{}, vp_schedule(), grid.nodes, model, x_T, w,
                            GradientOptions{.memory = job.memory});
    job.error = rel_err(r.grad_x, ddim_gaussian_grad_x(grid.nodes, model.s(), w));
    job.forward_steps = r.cost.forward_steps;
  } catch (const std::exception& e) {
    job.failure = e.what();
  }
}

#if defined(__unix__) || defined(__APPLE__)
void* run_long_gradient_thread(void* job) {
  run_long_gradient(*static_cast<LongRunJob*>(job));
  return nullptr;
}
#endif
} // namespace

TEST_CASE("gradient at N = 1e5 steps: store_all and checkpoint match the closed form",
          "[adjoint][checkpoint][large]") {
  // Building the store_all schedule recursed once per step (a stack overflow near
  // N = 50,000) and took O(N^2) time.
  const int n = 100000;
  for (const auto& [memory, t] : {std::pair{MemoryMode::store_all(), revolve_advances(n, n)},
                                  std::pair{MemoryMode::checkpoint(12), revolve_advances(n, 12)}}) {
    LongRunJob job{n, memory};
    run_long_gradient(job);
    INFO(job.failure);
    REQUIRE(job.failure.empty());
    CHECK(job.error <= 1e-9);
    CHECK(job.forward_steps == t + 1);
  }
}

#if defined(__unix__) || defined(__APPLE__)
TEST_CASE("gradient with store_all runs N = 3000 steps on a thread with a 512 KiB stack",
          "[adjoint][checkpoint]") {
  // std::thread cannot choose its stack size; POSIX threads can.
  pthread_attr_t attr;
  REQUIRE(pthread_attr_init(&attr) == 0);
  REQUIRE(pthread_attr_setstacksize(&attr, 512 * 1024) == 0);
  LongRunJob job{3000, MemoryMode::store_all()};
  pthread_t thread;
  REQUIRE(pthread_create(&thread, &attr, run_long_gradient_thread, &job) == 0);
  REQUIRE(pthread_join(thread, nullptr) == 0);
  pthread_attr_destroy(&attr);
  INFO(job.failure);
  REQUIRE(job.failure.empty());
  CHECK(job.error <= 1e-11);
  CHECK(job.forward_steps == 3000);
}
#endif

// ---------------------------------------------------------------------------------------
// (d) Memory modes and costs.

namespace {
struct MemoryCase {
  int steps;
  MemoryMode memory;
  int s;
  std::int64_t t; ///< t(N, s) from docs/math.md / the brute-force DP, not from the code
};
const std::vector<MemoryCase>& memory_cases() {
  static const std::vector<MemoryCase> cases{
      {1, MemoryMode::checkpoint(1), 1, 0},    {2, MemoryMode::recompute(), 1, 1},
      {10, MemoryMode::checkpoint(2), 2, 20},  {10, MemoryMode::recompute(), 1, 45},
      {10, MemoryMode::checkpoint(9), 9, 9},   {10, MemoryMode::checkpoint(50), 10, 9},
      {50, MemoryMode::checkpoint(5), 5, 122}, {100, MemoryMode::checkpoint(8), 8, 245}};
  return cases;
}

/// Gradient identical to store_all; model evaluations and VJPs counted by a wrapper equal
/// sum_i S_i A_i + sum_i (S_i - 1) and sum_i S_i (A_i: how often step i is advanced), i.e.
/// S (t + 1) + (S - 1) N and S N for a fixed stage count S.
template <class Scheme, class Grid, class Model>
void check_memory_modes(const SchemeCase& sc, const Scheme& scheme, const Grid& grid, Model& inner,
                        NodeAtLambda node_at_lambda, const MemoryCase& cs) {
  CountingModel<Model> model{inner};
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  const State w = x_T.reverse();
  const auto noise = noise_states(cs.steps, 2, 3);
  const auto run = [&](const GradientOptions& o) {
    auto ws = make_gradient_workspace(scheme, Backend64{}, grid.nodes, model, x_T, o);
    if (sc.given_noise) ws.given_noise = noise;
    compute_gradient(scheme, grid, model, x_T, w, o, ws);
    return std::move(ws.result);
  };
  const auto stages = stage_counts(scheme, grid.nodes, node_at_lambda);
  std::int64_t sum_s = 0, min_s = 4, max_s = 1;
  for (int k : stages) {
    sum_s += k;
    min_s = std::min<std::int64_t>(min_s, k);
    max_s = std::max<std::int64_t>(max_s, k);
  }
  const std::int64_t n = cs.steps, h = scheme.history();
  INFO(sc.name << ", N = " << n << ", s = " << cs.s);

  GradientOptions all{.wrt_cond = true, .wrt_params = true, .wrt_noise = true};
  const auto ref = run(all);
  CHECK(model.evals == sum_s + (sum_s - n)); // store all: one pass + stage recomputation
  CHECK(model.vjps == sum_s);
  CHECK(ref.cost.model_evals == model.evals);
  CHECK(ref.cost.forward_steps == n);

  GradientOptions opt = all;
  opt.memory = cs.memory;
  model.evals = model.vjps = 0;
  const auto r = run(opt);
  CHECK(model.vjps == sum_s);
  CHECK(r.cost.vjps == sum_s);
  CHECK(r.cost.model_evals == model.evals);
  CHECK(r.cost.forward_steps == cs.t + 1);
  if (min_s == max_s)
    CHECK(model.evals == max_s * (cs.t + 1) + (max_s - 1) * n);
  else
    CHECK((model.evals >= min_s * (cs.t + 1) + (sum_s - n) &&
           model.evals <= max_s * (cs.t + 1) + (sum_s - n)));
  CHECK(r.cost.peak_checkpoints <= cs.s);
  CHECK(r.cost.peak_stored_states <= r.cost.peak_checkpoints * (1 + 2 * h));
  CHECK(rel_err(r.grad_x, ref.grad_x) <= 1e-14);
  CHECK(rel_err(r.grad_cond, ref.grad_cond) <= 1e-14);
  CHECK(rel_err(r.grad_params, ref.grad_params) <= 1e-14);
  CHECK(rel_err(r.x0, ref.x0) <= 1e-14);
  for (int i = 0; i < cs.steps; ++i)
    if (ref.grad_noise[i].norm() > 0) CHECK(rel_err(r.grad_noise[i], ref.grad_noise[i]) <= 1e-14);
}
} // namespace

TEST_CASE("gradients are identical across memory modes; costs match the binomial schedule",
          "[adjoint][checkpoint]") {
  for (const MemoryCase& cs : memory_cases()) {
    const auto grid = diffusion_grid(cs.steps);
    for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
      auto model = diffgrad::testing::gaussian_problem<double>(3);
      check_memory_modes(sc, scheme, grid, model, NodeAtLambda(vp_schedule()), cs);
    });
    const auto fgrid = flow_grid(cs.steps);
    for_each_flow_scheme([&](const SchemeCase& sc, const auto& scheme) {
      models::GaussianFlow<double> model(Vector::LinSpaced(3, 0.5, -0.1), 0.3);
      check_memory_modes(sc, scheme, fgrid, model, NodeAtLambda(detail::no_lambda_map()), cs);
    });
  }
}

TEST_CASE("store_all keeps one vector per step; re-advanced checkpoints carry their history",
          "[adjoint][checkpoint]") {
  // Reversing a single-stage step needs only x_i (the VJP point): store_all never re-advances,
  // so it keeps x_0 .. x_{N-2} (x_{N-1} is the working state) whatever the history, N - 1
  // vectors. (Before: DPM-Solver++ 3M kept x_i, x_{i-1}, x_{i-2}, e_{i-1}, e_{i-2} per step,
  // 1 + 3 + 5 (N - 3).)
  const int n = 10;
  const auto grid = diffusion_grid(n);
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  const auto r = gradient(DpmSolverMultistep(3, SolverPrediction::data), Backend64{}, vp_schedule(),
                          grid.nodes, model, x_T, x_T);
  CHECK(r.cost.peak_checkpoints == n - 1);
  CHECK(r.cost.peak_stored_states == n - 1);
  const auto q = gradient(DpmSolverMultistep(3, SolverPrediction::noise), Backend64{},
                          vp_schedule(), grid.nodes, model, x_T, x_T);
  CHECK(q.cost.peak_stored_states == n - 1);
  // recompute: the one snapshot x_T is re-advanced from, and has no history: 1 vector.
  const auto c =
      gradient(DpmSolverMultistep(3, SolverPrediction::data), Backend64{}, vp_schedule(),
               grid.nodes, model, x_T, x_T, GradientOptions{.memory = MemoryMode::recompute()});
  CHECK(c.cost.peak_stored_states == 1);
  // checkpoint(2) at N = 10 (t = 20): x_T plus one snapshot that is re-advanced from at a
  // step >= 2, which carries x_{i-1}, x_{i-2}, e_{i-1}, e_{i-2}: 1 + 5 vectors at most.
  const auto k =
      gradient(DpmSolverMultistep(3, SolverPrediction::data), Backend64{}, vp_schedule(),
               grid.nodes, model, x_T, x_T, GradientOptions{.memory = MemoryMode::checkpoint(2)});
  CHECK(k.cost.peak_checkpoints == 2);
  CHECK(k.cost.peak_stored_states == 6);
  CHECK((k.grad_x.array() == r.grad_x.array()).all());
}

// ---------------------------------------------------------------------------------------
// (e) The cost table of docs/gradients.md.

TEST_CASE("cost table: evaluations, VJPs and stored states per memory mode", "[adjoint][table]") {
  // Runs the real executor (a 1 x 1 Gaussian problem) and prints the table of
  // docs/gradients.md; each row is also checked against the closed forms.
  const Backend64 backend;
  auto model = diffgrad::testing::gaussian_problem<double>(1);
  const State x_T = State::Constant(1, 1, 0.7);
  std::printf("%6s %5s %8s | %-22s | %-22s | %-24s\n", "N", "s", "t(N,s)", "DDIM evals/VJPs/stored",
              "DPM++3M evals/VJPs/stored", "rhoRK-3 evals/VJPs/stored");
  for (int n : {10, 50, 100, 1000}) {
    const auto grid = diffusion_grid(n);
    std::vector<int> budgets{1, 2, 3, 5, 8, 10, 20};
    std::erase_if(budgets, [n](int s) { return s >= n; });
    budgets.push_back(n); // store all
    for (int s : budgets) {
      const GradientOptions o{.memory = MemoryMode::checkpoint(s)};
      const auto a = gradient(Ddim(), backend, vp_schedule(), grid.nodes, model, x_T, x_T, o);
      const auto b = gradient(DpmSolverMultistep(3, SolverPrediction::data), backend, vp_schedule(),
                              grid.nodes, model, x_T, x_T, o);
      const auto c = gradient(DeisRhoRk(DeisRkMethod::kutta3), backend, vp_schedule(), grid.nodes,
                              model, x_T, x_T, o);
      const std::int64_t t = revolve_advances(n, s);
      std::printf("%6d %5d %8lld | %8lld %6lld %6lld | %8lld %6lld %6lld | %9lld %6lld %6lld\n", n,
                  s, static_cast<long long>(t), static_cast<long long>(a.cost.model_evals),
                  static_cast<long long>(a.cost.vjps),
                  static_cast<long long>(a.cost.peak_stored_states),
                  static_cast<long long>(b.cost.model_evals), static_cast<long long>(b.cost.vjps),
                  static_cast<long long>(b.cost.peak_stored_states),
                  static_cast<long long>(c.cost.model_evals), static_cast<long long>(c.cost.vjps),
                  static_cast<long long>(c.cost.peak_stored_states));
      CHECK(a.cost.model_evals == t + 1);
      CHECK(a.cost.vjps == n);
      CHECK(b.cost.model_evals == t + 1);
      CHECK(c.cost.model_evals == 3 * (t + 1) + 2 * n);
      CHECK(c.cost.vjps == 3 * n);
      CHECK(a.cost.peak_stored_states <= s);
      CHECK(b.cost.peak_stored_states <= 5 * s);
    }
  }
}

// ---------------------------------------------------------------------------------------
// float32.

TEST_CASE("float32 gradients agree with float64 to 2e-5", "[adjoint][float]") {
  // Same problem in both precisions; the float32 error is rounding accumulated over 20 steps
  // (the coefficients are double and rounded once per fused pass).
  using B32 = EigenBackend<float>;
  const auto grid = diffusion_grid(20);
  const State x64 = diffgrad::testing::test_batch<double>(4, 3);
  const B32::state_type x32 = x64.cast<float>();
  const State w64 = x64.reverse();
  const B32::state_type w32 = w64.cast<float>();
  auto m64 = diffgrad::testing::gaussian_problem<double>(3);
  auto m32 = diffgrad::testing::gaussian_problem<float>(3);
  const GradientOptions opt{
      .memory = MemoryMode::checkpoint(4), .wrt_cond = true, .wrt_params = true, .seed = 3};
  const auto check = [&](const std::string& name, const auto& scheme) {
    const auto r64 = gradient(scheme, Backend64{}, vp_schedule(), grid.nodes, m64, x64, w64, opt);
    const auto r32 = gradient(scheme, B32{}, vp_schedule(), grid.nodes, m32, x32, w32, opt);
    const double ex = rel_err(r32.grad_x.template cast<double>(), r64.grad_x);
    const double ec = rel_err(r32.grad_cond.template cast<double>(), r64.grad_cond);
    const double ep = rel_err(r32.grad_params.template cast<double>(), r64.grad_params);
    INFO(name << ": float32 vs float64 relative differences " << ex << ", " << ec << ", " << ep);
    CHECK(ex <= 2e-5);
    CHECK(ec <= 2e-5);
    CHECK(ep <= 2e-5);
  };
  check("DDIM", Ddim());
  check("DDIM eta=0.5 (Philox noise)", Ddim(0.5));
  check("DPM-Solver++ 3M", DpmSolverMultistep(3, SolverPrediction::data));
  check("DPM-Solver-3 singlestep", DpmSolverSinglestep(3, SolverPrediction::noise));
  check("rhoRK-DEIS rk4", DeisRhoRk(DeisRkMethod::rk4));
  check("iPNDM-4", IPndm(4));
}

// ---------------------------------------------------------------------------------------
// The finite-difference VJP wrapper and bad input.

TEST_CASE("the finite-difference VJP wrapper reproduces the analytic adjoint", "[adjoint][fd]") {
  const auto grid = diffusion_grid(6);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::GaussianData<double>;
  auto gauss = diffgrad::testing::gaussian_problem<double>(3);
  diffgrad::testing::FdVjpModel<Model> fd(gauss, 1e-3,
                                          {mean_access<Model>().get, mean_access<Model>().set},
                                          {std_access<Model>().get, std_access<Model>().set});
  const State w = x_T.reverse();
  const GradientOptions opt{.wrt_cond = true, .wrt_params = true};
  for_each_diffusion_scheme(grid.steps(), [&](const SchemeCase& sc, const auto& scheme) {
    if (scheme.stochastic()) return;
    INFO(sc.name);
    const auto exact = gradient_once(scheme, grid, gauss, x_T, w, opt);
    const auto approx = gradient_once(scheme, grid, fd, x_T, w, opt);
    CHECK(rel_err(approx.grad_x, exact.grad_x) <= 1e-9);
    CHECK(rel_err(approx.grad_cond, exact.grad_cond) <= 1e-9);
    CHECK(rel_err(approx.grad_params, exact.grad_params) <= 1e-7);
  });
}

TEST_CASE("gradient rejects bad input with diffgrad::invalid_argument", "[adjoint][errors]") {
  const Backend64 backend;
  const auto grid = diffusion_grid(5);
  const auto& nodes = grid.nodes;
  const auto& schedule = vp_schedule();
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto throws_with = [](auto&& f, const std::string& needle) {
    try {
      f();
      FAIL("no exception; expected one mentioning '" << needle << "'");
    } catch (const diffgrad::invalid_argument& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  // Wrong cotangent shape.
  throws_with(
      [&] { gradient(Ddim(), backend, schedule, nodes, model, x_T, State(State::Zero(3, 3))); },
      "argument 'cotangent' expected shape 2 x 3");
  // s < 1.
  throws_with([&] { (void)MemoryMode::checkpoint(0); }, "argument 'snapshots'");
  // A loss whose target has the wrong shape.
  throws_with(
      [&] {
        const SquaredDistanceLoss<Backend64> loss(State::Zero(2, 2));
        gradient(Ddim(), backend, schedule, nodes, model, x_T, loss);
      },
      "argument 'x0'");
  // A loss writing a gradient of the wrong shape.
  throws_with(
      [&] {
        auto bad = [](const Backend64&, const State&, State& g) {
          g = State::Zero(1, 1);
          return 0.0;
        };
        gradient(Ddim(), backend, schedule, nodes, model, x_T, bad);
      },
      "loss gradient");
  // x_T of the wrong dimension for the model.
  throws_with(
      [&] {
        const State wrong = State::Zero(2, 4);
        gradient(Ddim(), backend, schedule, nodes, model, wrong, wrong);
      },
      "argument 'x'");
  // x_T not the workspace's shape.
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        const State other = State::Zero(4, 3);
        gradient(Ddim(), backend, schedule, nodes, model, other, other, {}, ws);
      },
      "argument 'x_T'");
  // Too few given noise states.
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(0.5), backend, nodes, model, x_T);
        const auto xi = noise_states(3, 2, 3);
        ws.given_noise = xi;
        gradient(Ddim(0.5), backend, schedule, nodes, model, x_T, x_T, {}, ws);
      },
      "argument 'ws.given_noise' expected one noise state per step (5)");
  // Given noise of the wrong shape.
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(0.5), backend, nodes, model, x_T);
        const auto xi = noise_states(5, 2, 2);
        ws.given_noise = xi;
        gradient(Ddim(0.5), backend, schedule, nodes, model, x_T, x_T, {}, ws);
      },
      "ws.given_noise[i]");
  // Non-finite inputs are named (they were blamed on the model's first output, or passed
  // unseen by a model that ignores x); check_finite = false lets them through.
  for (const double bad : {std::nan(""), HUGE_VAL}) {
    State x_bad = x_T;
    x_bad(1, 2) = bad;
    throws_with(
        [&] { gradient(Ddim(), backend, schedule, nodes, model, x_bad, x_T); },
        "gradient: argument 'x_T' expected finite values (x_T at nodes[0]), got NaN or Inf");
    throws_with(
        [&] {
          auto ws = make_gradient_workspace(Ddim(0.5), backend, nodes, model, x_T);
          auto xi = noise_states(5, 2, 3);
          xi[3](0, 1) = bad;
          ws.given_noise = xi;
          gradient(Ddim(0.5), backend, schedule, nodes, model, x_T, x_T, {}, ws);
        },
        "gradient: argument 'ws.given_noise[3]' expected finite values, got NaN or Inf");
  }
  {
    State x_bad = x_T;
    x_bad(0, 0) = std::nan("");
    CHECK_NOTHROW(gradient(Ddim(), backend, schedule, nodes, model, x_bad, x_T,
                           GradientOptions{.check_finite = false}));
  }
  // A workspace for another grid, scheme or options.
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        const auto other = diffusion_grid(7);
        gradient(Ddim(), backend, schedule, other.nodes, model, x_T, x_T, {}, ws);
      },
      "argument 'ws'");
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        gradient(DpmSolverMultistep(2, SolverPrediction::data), backend, schedule, nodes, model,
                 x_T, x_T, {}, ws);
      },
      "argument 'ws'");
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        gradient(Ddim(), backend, schedule, nodes, model, x_T, x_T,
                 GradientOptions{.wrt_cond = true}, ws);
      },
      "argument 'ws'");
  // Too few nodes; unordered nodes.
  throws_with(
      [&] {
        const std::vector<Node> one{nodes[0]};
        gradient(Ddim(), backend, schedule, one, model, x_T, x_T);
      },
      "argument 'nodes'");
  throws_with(
      [&] {
        std::vector<Node> reversed(nodes.rbegin(), nodes.rend());
        gradient(Ddim(), backend, schedule, reversed, model, x_T, x_T);
      },
      "argument 'nodes'");
}

// ---------------------------------------------------------------------------------------
// No allocation once the workspace exists.

namespace {
/// Gaussian-data eps and VJP written element by element, so the model never allocates (the
/// reference GaussianData builds Eigen temporaries, which is the model's business).
struct NonAllocatingGaussian {
  Vector mu = Vector::LinSpaced(3, 0.5, -0.1);
  double s = 0.2;
  std::int64_t cond_size() const { return mu.size(); }
  std::int64_t param_size() const { return 0; }
  void eps(const State& x, const Node& n, State& out) const {
    const double v = n.alpha * n.alpha * s * s + n.sigma * n.sigma;
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index c = 0; c < x.cols(); ++c)
        out(r, c) = n.sigma * (x(r, c) - n.alpha * mu(c)) / v;
  }
  void vjp(const State&, const Node& n, const State& a, State& dx, Vector* dcond, Vector*) const {
    const double v = n.alpha * n.alpha * s * s + n.sigma * n.sigma;
    for (Eigen::Index r = 0; r < a.rows(); ++r)
      for (Eigen::Index c = 0; c < a.cols(); ++c) {
        dx(r, c) = n.sigma / v * a(r, c);
        if (dcond) (*dcond)(c) -= n.sigma * n.alpha / v * a(r, c);
      }
  }
};

template <class Scheme> long allocations_in_gradient(const Scheme& scheme, MemoryMode memory) {
  const auto grid = diffusion_grid(12);
  NonAllocatingGaussian model;
  const State x_T = diffgrad::testing::test_batch<double>(2, 3);
  const SquaredDistanceLoss<Backend64> loss(State(State::Constant(2, 3, 0.1)));
  const GradientOptions opt{.memory = memory, .wrt_cond = true, .wrt_noise = true};
  auto ws = make_gradient_workspace(scheme, Backend64{}, grid.nodes, model, x_T, opt);
  const long before = alloc_probe::total_allocations();
  Eigen::internal::set_is_malloc_allowed(false);
  alloc_probe::counting = true;
  gradient(scheme, Backend64{}, vp_schedule(), grid.nodes, model, x_T, loss, opt, ws);
  alloc_probe::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  return alloc_probe::total_allocations() - before;
}
} // namespace

TEST_CASE("gradient() with a prebuilt workspace does not allocate", "[adjoint][alloc]") {
  { // the probe itself sees Eigen allocations and operator new
    const long before = alloc_probe::total_allocations();
    Eigen::internal::set_is_malloc_allowed(false);
    alloc_probe::counting = true;
    const State tmp = State::Zero(4, 4);
    const auto* boxed = new int(3);
    alloc_probe::counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
    delete boxed;
    CHECK(tmp.size() == 16);
    CHECK(alloc_probe::total_allocations() - before == 2);
  }
  for (MemoryMode m :
       {MemoryMode::store_all(), MemoryMode::checkpoint(3), MemoryMode::recompute()}) {
    CHECK(allocations_in_gradient(Ddim(), m) == 0);
    CHECK(allocations_in_gradient(Ddim(0.7), m) == 0);
    CHECK(allocations_in_gradient(DpmSolverMultistep(3, SolverPrediction::data), m) == 0);
    CHECK(allocations_in_gradient(SdeDpmSolver(2, SolverPrediction::data), m) == 0);
    CHECK(allocations_in_gradient(DpmSolverSinglestep(3, SolverPrediction::data), m) == 0);
    CHECK(allocations_in_gradient(DeisRhoRk(DeisRkMethod::rk4), m) == 0);
    CHECK(allocations_in_gradient(DeisRhoAb(3), m) == 0);
    CHECK(allocations_in_gradient(IPndm(4), m) == 0);
  }
}
