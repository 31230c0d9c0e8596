// Exact discrete adjoint through every StepPlan scheme: central finite differences (x_T,
// conditioning, parameters, noise), the dot-product test on a linear model, the DDIM
// closed form on Gaussian data, identical gradients and exact costs across memory modes,
// and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "fd_vjp.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

namespace {

// ---------------------------------------------------------------------------------------
// Models and helpers local to these tests.

/// eps(x, n) = sigma_n theta (x M^T + z): linear in (x, z), with a NON-symmetric M so the
/// dot-product test <w, J v> = <J^T w, v> is not trivially true. cond = z (length d),
/// param = theta.
struct LinearTestModel {
  Eigen::MatrixXd m;
  Vector z;
  double theta = 1.0;
  explicit LinearTestModel(Eigen::Index d) : m(d, d), z(Vector::Zero(d)) {
    for (Eigen::Index r = 0; r < d; ++r)
      for (Eigen::Index c = 0; c < d; ++c)
        m(r, c) = 0.6 * std::sin(1.7 * static_cast<double>(r) + 0.9 * static_cast<double>(c * c) +
                                 0.3);
  }
  std::int64_t cond_size() const { return z.size(); }
  std::int64_t param_size() const { return 1; }
  void eps(const State& x, const Node& n, State& out) const {
    out = (n.sigma * theta) * ((x * m.transpose()).rowwise() + z.transpose());
  }
  void vjp(const State&, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) const {
    dx = (n.sigma * theta) * (a * m);
    if (dcond) *dcond += (n.sigma * theta) * a.colwise().sum().transpose();
    (void)dparams;  // theta is not needed by the linear tests
  }
};

/// Counts forward and VJP calls of the wrapped model, independently of the executor.
template <class M> struct CountingModel {
  M& inner;
  int evals = 0, vjps = 0;
  std::int64_t cond_size() const { return inner.cond_size(); }
  std::int64_t param_size() const { return inner.param_size(); }
  void eps(const State& x, const Node& n, State& out) {
    ++evals;
    inner.eps(x, n, out);
  }
  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dc, Vector* dp) {
    ++vjps;
    inner.vjp(x, n, a, dx, dc, dp);
  }
};

template <class Model> auto forward_field(Model& model) {
  if constexpr (NodeAwareNoiseModel<Model, State> || NoiseModel<Model, State>)
    return EpsField<Model>{model};
  else
    return VelocityField<Model>{model};
}

/// The sampler's output by the forward engine (run_scheme), with optional given noise.
template <class Scheme, class Model>
State sample_output(const Scheme& scheme, const VPLinearSchedule& schedule,
                    const std::vector<Node>& nodes, Model& model, const State& x_T,
                    std::span<const State> noise, std::uint64_t seed) {
  const Backend64 backend;
  SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                 x_T.cols());
  ws.given_noise = noise;
  State x = x_T;
  run_scheme(scheme, backend, nodes, NodeAtLambda(schedule), forward_field(model), x, ws,
             SampleOptions{.seed = seed});
  return x;
}

double rel_err(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  return (a - b).norm() / b.norm();
}

/// Richardson-extrapolated central difference of f at 0 (error O(h^4)).
template <class F> double central_difference(F&& f, double h) {
  const double d1 = (f(h) - f(-h)) / (2 * h);
  const double d2 = (f(h / 2) - f(-h / 2)) / h;
  return (4 * d2 - d1) / 3;
}

template <class Model> struct FlatAccess {
  std::function<Vector(const Model&)> get;
  std::function<void(Model&, const Vector&)> set;
};

template <class Model> FlatAccess<Model> gaussian_mean_access() {
  return {[](const Model& m) { return Vector(m.mu()); },
          [](Model& m, const Vector& v) { m.mu() = v; }};
}
template <class Model> FlatAccess<Model> gaussian_std_access() {
  return {[](const Model& m) { return Vector::Constant(1, m.s()); },
          [](Model& m, const Vector& v) { m.set_s(v(0)); }};
}

struct FdSteps {
  double x = 1e-3, cond = 1e-3, params = 1e-4, noise = 1e-3;
};

/// Checks dL/dx_T, dL/dcond, dL/dtheta (and dL/dxi_i with given noise) against central
/// differences of the sampler's output, for L = |x_0 - target|^2 / 2.
template <class Scheme, class Model>
void check_against_finite_differences(const std::string& name, const Scheme& scheme,
                                      const std::vector<Node>& nodes, Model& model,
                                      FlatAccess<Model> cond, FlatAccess<Model> params,
                                      const State& x_T, std::span<const State> noise,
                                      double tol = 1e-7, FdSteps h = {}) {
  const VPLinearSchedule schedule;
  const Backend64 backend;
  const std::uint64_t seed = 7;
  State target = diffgrad::testing::test_batch<double>(x_T.rows(), x_T.cols()) * 0.3;
  target.array() += 0.1;
  const SquaredDistanceLoss<Backend64> loss(target);
  const GradientOptions options{.wrt_cond = true, .wrt_params = true,
                                .wrt_noise = !noise.empty(), .seed = seed};
  auto ws = make_gradient_workspace(scheme, backend, nodes, model, x_T, options);
  ws.given_noise = noise;
  const auto& r = gradient(scheme, backend, schedule, nodes, model, x_T, loss, options, ws);

  State scratch = x_T;
  const auto loss_of = [&](const State& x0) { return loss(backend, x0, scratch); };
  const auto loss_at = [&](const State& x, std::span<const State> xi) {
    return loss_of(sample_output(scheme, schedule, nodes, model, x, xi, seed));
  };
  INFO(name);
  CHECK(r.loss == Approx(loss_at(x_T, noise)).epsilon(1e-14));

  State fd_x(x_T.rows(), x_T.cols());
  for (Eigen::Index k = 0; k < x_T.size(); ++k)
    fd_x.data()[k] = central_difference(
        [&](double d) {
          State x = x_T;
          x.data()[k] += d;
          return loss_at(x, noise);
        },
        h.x);
  const double err_x = rel_err(r.grad_x, fd_x);
  INFO("dL/dx_T relative error " << err_x);
  CHECK(err_x <= tol);

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
  const double err_c = rel_err(r.grad_cond, fd_flat(cond, h.cond));
  const double err_p = rel_err(r.grad_params, fd_flat(params, h.params));
  INFO("dL/dcond relative error " << err_c << ", dL/dtheta relative error " << err_p);
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

std::vector<State> noise_states(int steps, Eigen::Index batch, Eigen::Index dim) {
  const Backend64 backend;
  std::vector<State> xi;
  for (int i = 0; i < steps; ++i) {
    xi.push_back(backend.make_state(batch, dim));
    backend.gaussian(xi.back(), 99, static_cast<std::uint64_t>(i));
  }
  return xi;
}

/// Every scheme under test, with a flag: stochastic schemes get their noise given.
template <class F> void for_each_scheme(F&& f) {
  f("DDIM", Ddim(), false);
  f("DDIM eta=0.5 (given noise)", Ddim(0.5), true);
  f("DDIM eta=1 (Philox noise)", Ddim(1.0), false);
}

std::vector<Node> test_nodes(int steps) {
  const VPLinearSchedule schedule;
  return make_nodes(schedule, uniform_t_grid(schedule, steps, 1.0, 1e-3));
}

} // namespace

// ---------------------------------------------------------------------------------------

TEST_CASE("discrete adjoint matches central finite differences on Gaussian data",
          "[adjoint][fd]") {
  const int steps = 8;
  const auto nodes = test_nodes(steps);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::GaussianData<double>;
  for_each_scheme([&](const std::string& name, const auto& scheme, bool given_noise) {
    auto model = diffgrad::testing::gaussian_problem<double>(3);
    const auto noise = given_noise ? noise_states(steps, 2, 3) : std::vector<State>{};
    check_against_finite_differences(name, scheme, nodes, model, gaussian_mean_access<Model>(),
                                     gaussian_std_access<Model>(), x_T, noise);
  });
}

TEST_CASE("dot-product test <w, J v> = <J^T w, v> on a linear model", "[adjoint][dot]") {
  // x_0 is linear in (x_T, z, xi) for eps = sigma (x M^T + z): J v is one forward run with
  // (x_T, z, xi) = v, exact to rounding, and J^T w is one gradient with cotangent w.
  const VPLinearSchedule schedule;
  const Backend64 backend;
  const int steps = 10;
  const auto nodes = test_nodes(steps);
  const Eigen::Index batch = 3, dim = 4;
  for_each_scheme([&](const std::string& name, const auto& scheme, bool) {
    LinearTestModel model(dim);
    const State v_x = diffgrad::testing::test_batch<double>(batch, dim);
    State w = diffgrad::testing::test_batch<double>(batch, dim).reverse();
    w.array() += 0.25;
    Vector v_z(dim);
    for (Eigen::Index k = 0; k < dim; ++k) v_z(k) = std::cos(2.1 * static_cast<double>(k) + 1.0);
    const auto v_xi = noise_states(steps, batch, dim);

    model.z = v_z;
    const State jv = sample_output(scheme, schedule, nodes, model, v_x, v_xi, 0);
    model.z.setZero();  // J does not depend on the point: the model is linear

    const GradientOptions options{.wrt_cond = true, .wrt_noise = true};
    auto ws = make_gradient_workspace(scheme, backend, nodes, model, v_x, options);
    ws.given_noise = v_xi;
    const auto& r = gradient(scheme, backend, schedule, nodes, model, v_x, w, options, ws);
    double rhs = r.grad_x.cwiseProduct(v_x).sum() + r.grad_cond.dot(v_z);
    for (int i = 0; i < steps; ++i) rhs += r.grad_noise[i].cwiseProduct(v_xi[i]).sum();
    const double lhs = w.cwiseProduct(jv).sum();
    INFO(name << ": <w, Jv> = " << lhs << ", <J^T w, v> = " << rhs);
    CHECK(std::abs(lhs - rhs) <= 1e-12 * std::abs(lhs));
    // With a cotangent, the reported loss is <w, x_0> at the point (z = 0 now).
    const State x0 = sample_output(scheme, schedule, nodes, model, v_x, v_xi, 0);
    CHECK(r.loss == Approx(w.cwiseProduct(x0).sum()).epsilon(1e-13));
  });
}

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
  const VPLinearSchedule schedule;
  const Backend64 backend;
  const int steps = 12;
  const auto nodes = test_nodes(steps);
  const State x_T = diffgrad::testing::test_batch<double>(3, 2);
  State w = diffgrad::testing::test_batch<double>(3, 2).colwise().reverse();
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
    std::vector<double> tail(steps);  // prod_{j>i} k_j
    for (int i = steps - 1; i >= 0; --i) {
      tail[i] = prod;
      expected_mu += (prod * m[i]) * w.colwise().sum().transpose();
      prod *= k[i];
    }
    const GradientOptions options{.wrt_cond = true, .wrt_params = true, .wrt_noise = true};
    const Ddim scheme(eta);
    auto ws = make_gradient_workspace(scheme, backend, nodes, model, x_T, options);
    ws.given_noise = xi;
    const auto& r = gradient(scheme, backend, schedule, nodes, model, x_T, w, options, ws);
    INFO("eta = " << eta);
    CHECK(rel_err(r.x0, x) <= 1e-13);
    CHECK(rel_err(r.grad_x, prod * w) <= 1e-12);
    CHECK(rel_err(r.grad_cond, expected_mu) <= 1e-12);
    CHECK(std::abs(r.grad_params(0) - w.cwiseProduct(y).sum()) <=
          1e-12 * std::abs(w.cwiseProduct(y).sum()));
    if (eta > 0)
      for (int i = 0; i < steps; ++i) CHECK(rel_err(r.grad_noise[i], (c[i] * tail[i]) * w) <= 1e-12);
  }
}

TEST_CASE("gradients are identical across memory modes; costs match the binomial schedule",
          "[adjoint][checkpoint]") {
  // Expected counts from REFERENCE.md's table of t(N, s), not from the code under test:
  // model evaluations = t(N, s) + 1, VJPs = N for single-stage schemes.
  const VPLinearSchedule schedule;
  const Backend64 backend;
  struct Case {
    int steps;
    MemoryMode memory;
    int s;
    std::int64_t t;
  };
  const std::vector<Case> cases{{10, MemoryMode::checkpoint(2), 2, 20},
                                {10, MemoryMode::recompute(), 1, 45},
                                {10, MemoryMode::checkpoint(9), 9, 9},
                                {50, MemoryMode::checkpoint(5), 5, 122},
                                {100, MemoryMode::checkpoint(8), 8, 245},
                                {100, MemoryMode::checkpoint(99), 99, 99}};
  for (const Case& cs : cases) {
    const auto nodes = test_nodes(cs.steps);
    const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
    for_each_scheme([&](const std::string& name, const auto& scheme, bool) {
      auto gauss = diffgrad::testing::gaussian_problem<double>(3);
      CountingModel<models::GaussianData<double>> model{gauss};
      const State w = x_T.reverse();
      const GradientOptions all{.wrt_cond = true, .wrt_params = true, .wrt_noise = true};
      const auto ref = gradient(scheme, backend, schedule, nodes, model, x_T, w, all);
      CHECK(ref.cost.model_evals == cs.steps);  // store_all: one pass, no recomputation
      CHECK(ref.cost.vjps == cs.steps);
      CHECK(ref.cost.peak_checkpoints <= cs.steps);

      GradientOptions opt = all;
      opt.memory = cs.memory;
      model.evals = model.vjps = 0;
      const auto r = gradient(scheme, backend, schedule, nodes, model, x_T, w, opt);
      INFO(name << ", N = " << cs.steps << ", s = " << cs.s);
      CHECK(model.evals == cs.t + 1);
      CHECK(model.vjps == cs.steps);
      CHECK(r.cost.model_evals == cs.t + 1);
      CHECK(r.cost.vjps == cs.steps);
      CHECK(r.cost.forward_steps == cs.t + 1);
      CHECK(r.cost.peak_checkpoints <= cs.s);
      CHECK(r.cost.peak_stored_states <= cs.s);  // no history for one-step schemes
      CHECK(rel_err(r.grad_x, ref.grad_x) <= 1e-14);
      CHECK(rel_err(r.grad_cond, ref.grad_cond) <= 1e-14);
      CHECK(rel_err(r.grad_params, ref.grad_params) <= 1e-14);
      CHECK(rel_err(r.x0, ref.x0) <= 1e-14);
      for (int i = 0; i < cs.steps; ++i)
        if (ref.grad_noise[i].norm() > 0)
          CHECK(rel_err(r.grad_noise[i], ref.grad_noise[i]) <= 1e-14);
    });
  }
}

TEST_CASE("the finite-difference VJP wrapper reproduces the analytic adjoint", "[adjoint][fd]") {
  const VPLinearSchedule schedule;
  const Backend64 backend;
  const auto nodes = test_nodes(6);
  const auto x_T = diffgrad::testing::test_batch<double>(2, 3);
  using Model = models::GaussianData<double>;
  auto gauss = diffgrad::testing::gaussian_problem<double>(3);
  diffgrad::testing::FdVjpModel<Model> fd(
      gauss, 1e-3, {gaussian_mean_access<Model>().get, gaussian_mean_access<Model>().set},
      {gaussian_std_access<Model>().get, gaussian_std_access<Model>().set});
  const State w = x_T.reverse();
  const GradientOptions opt{.wrt_cond = true, .wrt_params = true};
  const auto exact = gradient(Ddim(), backend, schedule, nodes, gauss, x_T, w, opt);
  const auto approx = gradient(Ddim(), backend, schedule, nodes, fd, x_T, w, opt);
  CHECK(rel_err(approx.grad_x, exact.grad_x) <= 1e-9);
  CHECK(rel_err(approx.grad_cond, exact.grad_cond) <= 1e-9);
  CHECK(rel_err(approx.grad_params, exact.grad_params) <= 1e-7);
}

TEST_CASE("gradient rejects bad input with diffgrad::invalid_argument", "[adjoint][errors]") {
  const VPLinearSchedule schedule;
  const Backend64 backend;
  const auto nodes = test_nodes(5);
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
  throws_with([&] { gradient(Ddim(), backend, schedule, nodes, model, x_T, State(State::Zero(3, 3))); },
              "cotangent");
  throws_with([&] { (void)MemoryMode::checkpoint(0); }, "snapshots");
  throws_with(
      [&] {
        const SquaredDistanceLoss<Backend64> loss(State::Zero(2, 2));
        gradient(Ddim(), backend, schedule, nodes, model, x_T, loss);
      },
      "x0");
  throws_with([&] { gradient(Ddim(), backend, schedule, nodes, model, State(State::Zero(2, 4)), x_T); },
              "x");
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(0.5), backend, nodes, model, x_T);
        const auto xi = noise_states(3, 2, 3);  // one too few... by two
        ws.given_noise = xi;
        gradient(Ddim(0.5), backend, schedule, nodes, model, x_T, x_T, {}, ws);
      },
      "given_noise");
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        const auto other = test_nodes(7);
        gradient(Ddim(), backend, schedule, other, model, x_T, x_T, {}, ws);
      },
      "ws");
  throws_with(
      [&] {
        auto ws = make_gradient_workspace(Ddim(), backend, nodes, model, x_T);
        gradient(Ddim(), backend, schedule, nodes, model, x_T, x_T,
                 GradientOptions{.wrt_cond = true}, ws);
      },
      "ws");
  throws_with(
      [&] {
        const std::vector<Node> one{nodes[0]};
        gradient(Ddim(), backend, schedule, one, model, x_T, x_T);
      },
      "nodes");
}
