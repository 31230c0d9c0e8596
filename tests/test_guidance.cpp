// Classifier-free guidance (include/diffgrad/models/guidance.hpp). Expected values never come
// from the combinator: they are the wrapped model's own cond and uncond outputs combined here,
// finite differences (tests/fd_check.hpp), or the definition's limits.
//   - per-row conditioned model: ONE eps_rows call per eps and ONE vjp_rows call per VJP, equal
//     to two separate calls (cond rows, null rows) combined by hand, to 0 ulp;
//   - batch-conditioned models (DiracMixture, Mlp): two calls, equal to set_cond + eps by hand
//     to 0 ulp, and the model's own conditioning left as it was (also after an exception);
//   - w = 0 is eps_u exactly, w = 1 is eps_c to rounding;
//   - VJPs w.r.t. x, the conditioning and the parameters vs central differences <= 1e-7 (float64);
//   - a gradient through DDIM via diffgrad::gradient vs finite differences of the sampled loss;
//   - no allocation after the first call with a batch size; clear errors.
#define EIGEN_RUNTIME_NO_MALLOC // alloc_probe counts Eigen's heap allocations (no PCH)
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/guidance.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "fd_check.hpp"

using namespace diffgrad;
using diffgrad::models::ClassifierFreeGuidance;
using State = EigenBackend<double>::state_type;
using Vector = EigenBackend<double>::vector_type;

namespace {

/// A differentiable model with per-row conditioning, written with explicit loops (its rows are
/// computed the same way whatever the batch size):
///   eps_b = tanh(W x_b + U c_b + bias + t v),  params = [W (d x d), U (d x C), bias, v].
/// Counts its calls.
struct RowTanhModel {
  Eigen::Index d, c;
  Vector theta;
  mutable int eps_calls = 0, vjp_calls = 0;

  RowTanhModel(Eigen::Index dim, Eigen::Index cond)
      : d(dim), c(cond), theta(dim * dim + dim * cond + 2 * dim) {
    for (Eigen::Index i = 0; i < theta.size(); ++i)
      theta(i) = 0.6 * std::sin(1.3 * static_cast<double>(i) + 0.4);
  }
  std::int64_t cond_size() const { return c; }
  std::int64_t param_size() const { return theta.size(); }
  Vector& params() { return theta; }
  double W(Eigen::Index i, Eigen::Index j) const { return theta(i * d + j); }
  double U(Eigen::Index i, Eigen::Index k) const { return theta(d * d + i * c + k); }
  double bias(Eigen::Index i) const { return theta(d * d + d * c + i); }
  double v(Eigen::Index i) const { return theta(d * d + d * c + d + i); }

  double pre(const State& x, const State& cr, Eigen::Index b, Eigen::Index i, double t) const {
    double s = bias(i) + t * v(i);
    for (Eigen::Index j = 0; j < d; ++j) s += W(i, j) * x(b, j);
    for (Eigen::Index k = 0; k < c; ++k) s += U(i, k) * cr(b, k);
    return s;
  }
  void eps_rows(const State& x, const Node& n, const State& cr, State& out) const {
    ++eps_calls;
    out.resize(x.rows(), d);
    for (Eigen::Index b = 0; b < x.rows(); ++b)
      for (Eigen::Index i = 0; i < d; ++i) out(b, i) = std::tanh(pre(x, cr, b, i, n.model_t));
  }
  void vjp_rows(const State& x, const Node& n, const State& cr, const State& a, State& dx,
                State* dcr, Vector* dp) const {
    ++vjp_calls;
    const State a_copy = a;
    dx.setZero(x.rows(), d);
    for (Eigen::Index b = 0; b < x.rows(); ++b)
      for (Eigen::Index i = 0; i < d; ++i) {
        const double th = std::tanh(pre(x, cr, b, i, n.model_t));
        const double g = a_copy(b, i) * (1.0 - th * th);
        for (Eigen::Index j = 0; j < d; ++j) dx(b, j) += g * W(i, j);
        if (dcr)
          for (Eigen::Index k = 0; k < c; ++k) (*dcr)(b, k) += g * U(i, k);
        if (dp) {
          for (Eigen::Index j = 0; j < d; ++j) (*dp)(i * d + j) += g * x(b, j);
          for (Eigen::Index k = 0; k < c; ++k) (*dp)(d * d + i * c + k) += g * cr(b, k);
          (*dp)(d * d + d * c + i) += g;
          (*dp)(d * d + d * c + d + i) += g * n.model_t;
        }
      }
  }
};

/// A per-row model whose output has the wrong number of rows (a broken user model).
struct HalfBatchModel {
  std::int64_t cond_size() const { return 1; }
  void eps_rows(const State& x, const Node&, const State&, State& out) const {
    out = x.topRows(x.rows() / 2);
  }
};

State rows_of(const Vector& v, Eigen::Index batch) {
  State r(batch, v.size());
  r.rowwise() = v.transpose();
  return r;
}

State test_x(Eigen::Index batch, Eigen::Index dim) {
  State x(batch, dim);
  for (Eigen::Index b = 0; b < batch; ++b)
    for (Eigen::Index j = 0; j < dim; ++j)
      x(b, j) = std::cos(0.7 * static_cast<double>(b * dim + j) + 0.3);
  return x;
}

Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> mixture_points() {
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> y(4, 3);
  y << 1.0, 0.5, -0.3, -0.8, 0.2, 0.9, 0.1, -1.1, 0.4, 0.6, 0.7, -0.9;
  return y;
}

Node node_at(double alpha) { return Node{0.5, alpha, std::sqrt(1 - alpha * alpha), 0.0, 0.37}; }

long allocations_during(const auto& body) {
  const long before = alloc_probe::total_allocations();
  Eigen::internal::set_is_malloc_allowed(false);
  alloc_probe::counting = true;
  body();
  alloc_probe::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  return alloc_probe::total_allocations() - before;
}

} // namespace

TEST_CASE("CFG on a per-row model: one batched call, equal to cond and uncond calls",
          "[guidance]") {
  RowTanhModel model(3, 2);
  const Vector c = (Vector(2) << 0.8, -0.4).finished();
  const Vector null_c = Vector::Zero(2);
  const State x = test_x(5, 3);
  const Node n = node_at(0.8);
  for (double w : {0.0, 1.0, 2.5, 7.5, -0.5}) {
    INFO("w = " << w);
    ClassifierFreeGuidance cfg(model, c, null_c, w);
    STATIC_REQUIRE(decltype(cfg)::batched);
    STATIC_REQUIRE(DifferentiableNoiseModel<decltype(cfg), State, Vector>);
    model.eps_calls = 0;
    State out;
    cfg.eps(x, n, out);
    CHECK(model.eps_calls == 1);
    State ec, eu;
    model.eps_rows(x, n, rows_of(c, 5), ec);
    model.eps_rows(x, n, rows_of(null_c, 5), eu);
    const State expected = eu + w * (ec - eu);
    CHECK(out == expected); // 0 ulp: the same rows, the same arithmetic
    if (w == 0.0) CHECK(out == eu);
    if (w == 1.0) CHECK((out - ec).cwiseAbs().maxCoeff() <= 4e-16 * ec.cwiseAbs().maxCoeff());
  }
}

TEST_CASE("CFG VJP on a per-row model: one batched call, vs two calls and finite differences",
          "[guidance]") {
  RowTanhModel model(3, 2);
  const Vector c = (Vector(2) << 0.8, -0.4).finished();
  ClassifierFreeGuidance cfg(model, c, Vector::Zero(2), 3.0);
  const State x = test_x(4, 3);
  const Node n = node_at(0.7);
  State a = test_x(4, 3).reverse();

  // Against the two separate VJPs (rows conditioned on c, rows on null) combined by hand.
  model.vjp_calls = 0;
  State dx;
  Vector dcond = Vector::Zero(2), dparams = Vector::Zero(model.param_size());
  cfg.vjp(x, n, a, dx, &dcond, &dparams);
  CHECK(model.vjp_calls == 1);
  State dxc, dxu, dcr = State::Zero(4, 2), dcr_null = State::Zero(4, 2);
  Vector dpc = Vector::Zero(model.param_size()), dpu = dpc;
  model.vjp_rows(x, n, rows_of(c, 4), State(3.0 * a), dxc, &dcr, &dpc);
  model.vjp_rows(x, n, rows_of(Vector::Zero(2), 4), State((1.0 - 3.0) * a), dxu, &dcr_null, &dpu);
  CHECK((dx - (dxc + dxu)).cwiseAbs().maxCoeff() <= 1e-15 * dx.cwiseAbs().maxCoeff());
  CHECK((dcond - dcr.colwise().sum().transpose()).cwiseAbs().maxCoeff() <=
        1e-15 * dcond.cwiseAbs().maxCoeff());
  CHECK((dparams - (dpc + dpu)).cwiseAbs().maxCoeff() <= 1e-15 * dparams.cwiseAbs().maxCoeff());

  // `a` may alias dx.
  State aliased = a;
  cfg.vjp(x, n, aliased, aliased, nullptr, nullptr);
  CHECK(aliased == dx);

  // Against central differences (relative, fd_check's measure), x / cond / params.
  const auto checks =
      testing::check_model_vjp([&](const State& in, State& out) { cfg.eps(in, n, out); },
                               [&](const State& in, const State& cot, State& dxo, Vector* dc,
                                   Vector* dp) { cfg.vjp(in, n, cot, dxo, dc, dp); },
                               x, &cfg.cond(), &model.params());
  CHECK(checks.x.fd_error <= 1e-7);
  CHECK(checks.cond.fd_error <= 1e-7);
  CHECK(checks.params.fd_error <= 1e-7);
  CHECK(checks.x.dot_product_error <= 1e-9);
}

TEST_CASE("CFG on batch-conditioned models: two calls, model conditioning restored", "[guidance]") {
  using Mixture = models::DiracMixture<double>;
  Mixture mixture(mixture_points());
  const Vector own = (Vector(4) << 0.1, 0.2, 0.3, 0.4).finished();
  mixture.set_cond(own);
  const Vector logits = (Vector(4) << 2.0, -1.0, 0.5, 0.0).finished();
  const Vector null_c = Vector::Zero(4);
  const State x = test_x(6, 3);
  const Node n = node_at(0.6);
  ClassifierFreeGuidance cfg(mixture, logits, null_c, 4.0);
  STATIC_REQUIRE(!decltype(cfg)::batched);
  State out;
  cfg.eps(x, n, out);
  CHECK(mixture.cond() == own);
  Mixture by_hand(mixture_points());
  State ec, eu;
  by_hand.set_cond(logits);
  by_hand.eps(x, n, ec);
  by_hand.set_cond(null_c);
  by_hand.eps(x, n, eu);
  CHECK(out == State(eu + 4.0 * (ec - eu)));

  // w = 0 and w = 1 limits.
  cfg.set_guidance_scale(0.0);
  cfg.eps(x, n, out);
  CHECK(out == eu);
  cfg.set_guidance_scale(1.0);
  cfg.eps(x, n, out);
  CHECK((out - ec).cwiseAbs().maxCoeff() <= 4e-16 * ec.cwiseAbs().maxCoeff());

  // VJPs vs finite differences (the mixture's points are its parameters).
  cfg.set_guidance_scale(2.5);
  const auto checks =
      testing::check_model_vjp([&](const State& in, State& o) { cfg.eps(in, n, o); },
                               [&](const State& in, const State& cot, State& dxo, Vector* dc,
                                   Vector* dp) { cfg.vjp(in, n, cot, dxo, dc, dp); },
                               x, &cfg.cond(), &mixture.params());
  CHECK(checks.x.fd_error <= 1e-7);
  CHECK(checks.cond.fd_error <= 1e-7);
  CHECK(checks.params.fd_error <= 1e-7);
  CHECK(mixture.cond() == own);

  // The Mlp takes the model time, not the node: the combinator passes node.model_t.
  models::MlpConfig config;
  config.dim = 3;
  config.cond_dim = 2;
  config.hidden = {5};
  models::Mlp<double> mlp(config, 11);
  ClassifierFreeGuidance mlp_cfg(mlp, Vector((Vector(2) << 1.0, -1.0).finished()),
                                 Vector(Vector::Zero(2)), 3.0);
  mlp_cfg.eps(x, n, out);
  mlp.set_cond((Vector(2) << 1.0, -1.0).finished());
  mlp.eps(x, n.model_t, ec);
  mlp.set_cond(Vector::Zero(2));
  mlp.eps(x, n.model_t, eu);
  CHECK(out == State(eu + 3.0 * (ec - eu)));
  const auto mlp_checks =
      testing::check_model_vjp([&](const State& in, State& o) { mlp_cfg.eps(in, n, o); },
                               [&](const State& in, const State& cot, State& dxo, Vector* dc,
                                   Vector* dp) { mlp_cfg.vjp(in, n, cot, dxo, dc, dp); },
                               x, &mlp_cfg.cond(), &mlp.params());
  CHECK(mlp_checks.x.fd_error <= 1e-7);
  CHECK(mlp_checks.cond.fd_error <= 1e-7);
  CHECK(mlp_checks.params.fd_error <= 1e-7);
}

TEST_CASE("CFG: no allocation after the first call with a batch size", "[guidance]") {
  RowTanhModel model(3, 2);
  ClassifierFreeGuidance cfg(model, Vector((Vector(2) << 0.8, -0.4).finished()),
                             Vector(Vector::Zero(2)), 3.0);
  const State x = test_x(4, 3), a = test_x(4, 3).reverse();
  const Node n = node_at(0.7);
  State out, dx;
  Vector dcond = Vector::Zero(2), dparams = Vector::Zero(model.param_size());
  cfg.eps(x, n, out);
  // RowTanhModel's vjp_rows copies its cotangent (allocates): count the combinator's own
  // buffers through eps (the wrapped eps_rows does not allocate once `out` has its shape).
  CHECK(allocations_during([&] { cfg.eps(x, n, out); }) == 0);
  CHECK(allocations_during([&] { cfg.eps(x, n, out); }) == 0);

  models::DiracMixture<double> mixture(mixture_points());
  ClassifierFreeGuidance two_calls(mixture, Vector((Vector(4) << 2.0, -1.0, 0.5, 0.0).finished()),
                                   Vector(Vector::Zero(4)), 4.0);
  const State x3 = test_x(4, 3), a3 = test_x(4, 3).reverse();
  Vector dc4 = Vector::Zero(4), dp = Vector::Zero(mixture.param_size());
  two_calls.eps(x3, n, out);
  two_calls.vjp(x3, n, a3, dx, &dc4, &dp);
  CHECK(allocations_during([&] {
          two_calls.eps(x3, n, out);
          two_calls.vjp(x3, n, a3, dx, &dc4, &dp);
        }) == 0);
}

TEST_CASE("CFG: gradient through DDIM vs finite differences", "[guidance]") {
  // d/dx_T, d/dc and d/dtheta of L = 0.5 |x_0 - target|^2 after 6 DDIM steps of the guided
  // model (checkpointed), vs fourth-order central differences of the sampled loss.
  RowTanhModel model(2, 2);
  model.theta *= 0.5;
  ClassifierFreeGuidance cfg(model, Vector((Vector(2) << 0.7, -0.3).finished()),
                             Vector(Vector::Zero(2)), 2.0);
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 6, 1.0, 1e-3));
  const Ddim scheme;
  const EigenBackend<double> backend;
  const State x_T = test_x(3, 2);
  const State target = State::Constant(3, 2, 0.3);
  const auto sampled_loss = [&](const State& x_start) {
    State x = x_start;
    sample(scheme, backend, schedule, std::span<const Node>(nodes), cfg, x);
    return 0.5 * (x - target).squaredNorm();
  };
  GradientOptions options;
  options.wrt_cond = true;
  options.wrt_params = true;
  options.memory = MemoryMode::checkpoint(2);
  const auto r = gradient(scheme, backend, schedule, std::span<const Node>(nodes), cfg, x_T,
                          SquaredDistanceLoss<EigenBackend<double>>(target), options);
  CHECK(std::abs(r.loss - sampled_loss(x_T)) <= 1e-14 * r.loss);
  const auto fd = [&](auto&& perturb, Eigen::Index size, auto&& value) {
    Eigen::VectorXd g(size);
    for (Eigen::Index k = 0; k < size; ++k) {
      const double h = 1e-5;
      const auto f = [&](double s) {
        perturb(k, s);
        const double v = value();
        perturb(k, -s);
        return v;
      };
      g(k) = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h);
    }
    return g;
  };
  State xp = x_T;
  const Eigen::VectorXd g_x = fd([&](Eigen::Index k, double s) { xp.data()[k] += s; }, x_T.size(),
                                 [&] { return sampled_loss(xp); });
  const Eigen::VectorXd g_c = fd([&](Eigen::Index k, double s) { cfg.cond()(k) += s; }, 2,
                                 [&] { return sampled_loss(x_T); });
  const Eigen::VectorXd g_p = fd([&](Eigen::Index k, double s) { model.theta(k) += s; },
                                 model.param_size(), [&] { return sampled_loss(x_T); });
  const Eigen::VectorXd exact_x =
      Eigen::Map<const Eigen::VectorXd>(r.grad_x.data(), r.grad_x.size());
  CHECK((exact_x - g_x).norm() <= 1e-7 * g_x.norm());
  CHECK((r.grad_cond - g_c).norm() <= 1e-7 * g_c.norm());
  CHECK((r.grad_params - g_p).norm() <= 1e-7 * g_p.norm());
}

TEST_CASE("CFG: clear errors", "[guidance][errors]") {
  RowTanhModel model(3, 2);
  const Vector c = Vector::Ones(2), null_c = Vector::Zero(2);
  const auto message = [](auto&& f) {
    try {
      f();
    } catch (const diffgrad::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  using Catch::Matchers::Contains;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THAT(message([&] { ClassifierFreeGuidance(model, c, null_c, nan); }),
             Contains("guidance_scale") && Contains("finite"));
  CHECK_THAT(message([&] {
               ClassifierFreeGuidance(model, c, null_c, std::numeric_limits<double>::infinity());
             }),
             Contains("guidance_scale"));
  CHECK_THAT(message([&] { ClassifierFreeGuidance(model, Vector(Vector::Ones(3)), null_c, 2.0); }),
             Contains("'cond'") && Contains("length 2") && Contains("got 3"));
  CHECK_THAT(message([&] { ClassifierFreeGuidance(model, c, Vector::Zero(1), 2.0); }),
             Contains("'null_cond'") && Contains("length 2"));
  CHECK_THAT(message([&] { ClassifierFreeGuidance(model, c, Vector::Constant(2, nan), 2.0); }),
             Contains("'null_cond'") && Contains("finite"));
  ClassifierFreeGuidance cfg(model, c, null_c, 2.0);
  CHECK_THAT(message([&] { cfg.set_guidance_scale(nan); }), Contains("guidance_scale"));
  CHECK(cfg.guidance_scale() == 2.0);
  State dx;
  CHECK_THAT(
      message([&] { cfg.vjp(test_x(2, 3), node_at(0.5), test_x(3, 3), dx, nullptr, nullptr); }),
      Contains("'cotangent'") && Contains("shape 2 x 3") && Contains("got 3 x 3"));
  Vector short_dcond = Vector::Zero(1);
  CHECK_THAT(message([&] {
               cfg.vjp(test_x(2, 3), node_at(0.5), test_x(2, 3), dx, &short_dcond, nullptr);
             }),
             Contains("'dcond'") && Contains("length 2"));
  HalfBatchModel broken;
  ClassifierFreeGuidance bad(broken, Vector(Vector::Ones(1)), Vector(Vector::Zero(1)), 2.0);
  State out;
  CHECK_THAT(message([&] { bad.eps(test_x(2, 3), node_at(0.5), out); }),
             Contains("stacked output") && Contains("shape 4 x 3") && Contains("got 2 x 3"));
  CHECK_THAT(message([&] {
               State odd(3, 2);
               odd.setZero();
               models::combine_guidance(odd, 2.0, out);
             }),
             Contains("stacked_eps") && Contains("even"));

  // The model's own conditioning is restored when the wrapped model throws.
  models::DiracMixture<double> mixture(mixture_points());
  const Vector own = Vector::Constant(4, 0.25);
  mixture.set_cond(own);
  ClassifierFreeGuidance two_calls(mixture, Vector(Vector::Ones(4)), Vector(Vector::Zero(4)), 2.0);
  CHECK_THAT(message([&] { two_calls.eps(test_x(2, 5), node_at(0.5), out); }), Contains("'x'"));
  CHECK(mixture.cond() == own);
}
