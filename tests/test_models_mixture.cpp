// Analytic mixture models: Dirac mixture (REFERENCE problem 3), Gaussian mixture, rectified
// flow to a Dirac mixture (problem 4). Closed forms, exact VJPs, stability, bad input.
// Eigen's own no-malloc guard, made to throw (eigen_assert is compiled out in Release), for
// the "no allocation in steady state" test. Must precede every Eigen include.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  do { \
    if (!(x)) throw std::runtime_error("eigen_assert failed: " #x); \
  } while (false)

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/models/rectified_flow_mixture.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "fd_check.hpp"
#include "test_support.hpp"

// Every member compiles (and is warning-free) in float and double.
template class diffgrad::models::DiracMixture<float>;
template class diffgrad::models::DiracMixture<double>;
template class diffgrad::models::GaussianMixture<float>;
template class diffgrad::models::GaussianMixture<double>;
template class diffgrad::models::RectifiedFlowMixture<float>;
template class diffgrad::models::RectifiedFlowMixture<double>;

using namespace diffgrad;
using diffgrad::testing::check_model_vjp;
using diffgrad::testing::State;

namespace {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

Node make_node(double alpha, double sigma) {
  return Node{0.5, alpha, sigma, std::log(alpha / sigma), 0.5};
}

template <class Scalar> State<Scalar> cloud_points(Eigen::Index k, Eigen::Index dim) {
  State<Scalar> y(k, dim);
  for (Eigen::Index i = 0; i < k; ++i)
    for (Eigen::Index j = 0; j < dim; ++j)
      y(i, j) = Scalar(std::cos(0.9 * static_cast<double>(i * dim + j) + 0.3) * 1.2 +
                       0.1 * static_cast<double>(i));
  return y;
}

/// log sum_i pi_i N(x; alpha y_i, sigma^2 I) by the textbook formula, in long double.
long double brute_log_density(const Eigen::RowVectorXd& x, const Mat& y, const Eigen::VectorXd& pi,
                              double alpha, double sigma) {
  long double total = 0;
  const auto d = static_cast<long double>(x.size());
  for (Eigen::Index i = 0; i < y.rows(); ++i) {
    const long double sq = (x - alpha * y.row(i)).squaredNorm();
    total += pi(i) * std::exp(-sq / (2.0L * sigma * sigma)) /
             std::pow(2.0L * 3.14159265358979323846264338327950288L * sigma * sigma, d / 2);
  }
  return std::log(total);
}

void require_vjp_ok(const diffgrad::testing::ModelVjpChecks& c) {
  INFO("x: fd " << c.x.fd_error << " dot " << c.x.dot_product_error);
  INFO("cond: fd " << c.cond.fd_error << " dot " << c.cond.dot_product_error);
  INFO("params: fd " << c.params.fd_error << " dot " << c.params.dot_product_error);
  CHECK(c.x.fd_error < 1e-7);
  CHECK(c.cond.fd_error < 1e-7);
  CHECK(c.params.fd_error < 1e-7);
  CHECK(c.x.dot_product_error < 1e-11);
  CHECK(c.cond.dot_product_error < 1e-11);
  CHECK(c.params.dot_product_error < 1e-11);
}

} // namespace

// ---------------------------------------------------------------- Dirac mixture

TEST_CASE("The mixture models satisfy the model concepts", "[models]") {
  using Vec = Eigen::VectorXd;
  STATIC_REQUIRE(NodeAwareNoiseModel<models::DiracMixture<double>, Mat>);
  STATIC_REQUIRE(DifferentiableNoiseModel<models::DiracMixture<double>, Mat, Vec>);
  STATIC_REQUIRE(DifferentiableNoiseModel<models::GaussianMixture<double>, Mat, Vec>);
  STATIC_REQUIRE(DifferentiableVelocityModel<models::RectifiedFlowMixture<double>, Mat, Vec>);
  STATIC_REQUIRE(DifferentiableNoiseModel<const models::DiracMixture<float>,
                                          State<float>, Eigen::VectorXf>);
}

TEST_CASE("DDIM on a one-point DiracMixture is exact (REFERENCE problem 2)", "[models][dirac]") {
  // One data point y: eps is constant along PF-ODE paths, x_t = alpha_t y + sigma_t eps_T.
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  Mat y(1, 2);
  y << 0.7, -1.2;
  models::DiracMixture<double> model(y);
  const auto x_T = diffgrad::testing::test_batch<double>(3, 2);
  const auto nodes = make_nodes(schedule, std::vector<double>{1.0, 0.9, 0.31, 0.3, 0.05, 0.002});
  auto x = x_T;
  sample(Ddim(), backend, schedule, nodes, model, x);
  const Node& a = nodes.front();
  const Node& b = nodes.back();
  const Mat eps_T = ((x_T.rowwise() - a.alpha * y.row(0)) / a.sigma).eval();
  const Mat exact = ((b.sigma * eps_T).rowwise() + b.alpha * y.row(0)).eval();
  CHECK(diffgrad::testing::relative_error<double>(x, exact) < 1e-13);
}

TEMPLATE_TEST_CASE("DiracMixture with one point is the single-point formula", "[models][dirac]",
                   float, double) {
  State<TestType> y(1, 3);
  y << TestType(0.7), TestType(-1.2), TestType(0.4);
  models::DiracMixture<TestType> model(y);
  const auto x = diffgrad::testing::test_batch<TestType>(4, 3);
  const Node n = make_node(0.8, 0.6);
  State<TestType> eps;
  model.eps(x, n, eps);
  // eps = (x - alpha y)/sigma for every sample.
  const State<TestType> expected = ((x.rowwise() - TestType(0.8) * y.row(0)) / TestType(0.6)).eval();
  const double tol = std::is_same_v<TestType, float> ? 1e-6 : 1e-15;
  CHECK(diffgrad::testing::relative_error<TestType>(eps, expected) < tol);
}

TEST_CASE("DiracMixture of two points +-y is y tanh(alpha x.y/sigma^2 + logit gap)",
          "[models][dirac]") {
  // Two points +-y with weights p, 1 - p and logits z: w_+ - w_- = tanh(alpha x.y/sigma^2 + g),
  // g = (log(p/(1-p)) + z_+ - z_-)/2, so x0_hat = y tanh(...).
  Mat y(2, 2);
  y << 0.9, -0.4, -0.9, 0.4;
  Eigen::VectorXd weights(2);
  weights << 0.3, 0.7;
  models::DiracMixture<double> model(y, weights);
  model.cond() << 0.25, -0.5;
  const auto x = diffgrad::testing::test_batch<double>(5, 2);
  const Node n = make_node(0.7, 0.9);
  Mat x0;
  model.x0_hat(x, n, x0);
  const double gap = 0.5 * (std::log(0.3 / 0.7) + 0.75);
  for (Eigen::Index b = 0; b < x.rows(); ++b) {
    const double arg = 0.7 * x.row(b).dot(y.row(0)) / (0.9 * 0.9) + gap;
    const Eigen::RowVectorXd expected = std::tanh(arg) * y.row(0);
    CHECK((x0.row(b) - expected).norm() < 1e-15);
  }
  // alpha = 0 (pure noise): the posterior is the prior, x0_hat = sum pi_i y_i.
  model.cond().setZero();
  model.x0_hat(x, make_node(0.0, 1.0), x0);
  CHECK((x0.row(0) - (0.3 - 0.7) * y.row(0)).norm() < 1e-15);
}

TEST_CASE("DiracMixture VJPs w.r.t. x, logits and points match finite differences",
          "[models][dirac][vjp]") {
  const Mat y = cloud_points<double>(5, 3);
  Eigen::VectorXd weights(5);
  weights << 1, 2, 0.5, 1.5, 1;
  models::DiracMixture<double> model(y, weights);
  model.cond() << 0.1, -0.2, 0.3, 0.0, -0.1;
  const auto x = diffgrad::testing::test_batch<double>(4, 3);
  for (const Node n : {make_node(0.8, 0.6), make_node(0.3, 0.95), make_node(0.9, 0.44)}) {
    INFO("alpha " << n.alpha << " sigma " << n.sigma);
    const auto checks = check_model_vjp(
        [&](const Mat& in, Mat& out) { model.eps(in, n, out); },
        [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
          model.vjp(in, n, a, dx, dc, dp);
        },
        x, &model.cond(), &model.params());
    require_vjp_ok(checks);
  }
}

TEST_CASE("DiracMixture: d eps/dx = sigma F with REFERENCE's Fisher formula (exact JVP)",
          "[models][dirac][vjp]") {
  // F = I/sigma^2 - (alpha^2/sigma^4) [sum w_i y_i y_i^T - x0 x0^T], assembled per sample from
  // the posterior weights; J = sigma F is symmetric, so J v is an exact JVP.
  const Mat y = cloud_points<double>(6, 2);
  models::DiracMixture<double> model(y);
  const Node n = make_node(0.9, 0.45);
  const auto x = diffgrad::testing::test_batch<double>(3, 2);
  const auto jacobian = [&](const Mat& at, Eigen::Index b) {
    Mat w;
    model.posterior_weights(at, n, w);
    Eigen::VectorXd x0 = (w.row(b) * y).transpose();
    Eigen::MatrixXd second = Eigen::MatrixXd::Zero(2, 2);
    for (Eigen::Index i = 0; i < y.rows(); ++i)
      second += w(b, i) * y.row(i).transpose() * y.row(i);
    const double s2 = n.sigma * n.sigma;
    const Eigen::MatrixXd fisher = Eigen::MatrixXd::Identity(2, 2) / s2 -
                                   (n.alpha * n.alpha / (s2 * s2)) * (second - x0 * x0.transpose());
    return Eigen::MatrixXd(n.sigma * fisher);
  };
  const auto jvp = [&](const Eigen::VectorXd& in, const Eigen::VectorXd& v) {
    const Mat at = diffgrad::testing::unflatten(in, 3, 2);
    const Mat vm = diffgrad::testing::unflatten(v, 3, 2);
    Mat out(3, 2);
    for (Eigen::Index b = 0; b < 3; ++b)
      out.row(b) = (jacobian(at, b) * vm.row(b).transpose()).transpose();
    return diffgrad::testing::flatten(out);
  };
  const auto vjp = [&](const Eigen::VectorXd& in, const Eigen::VectorXd& w) {
    Mat dx;
    model.vjp(diffgrad::testing::unflatten(in, 3, 2), n, diffgrad::testing::unflatten(w, 3, 2), dx,
              nullptr, nullptr);
    return diffgrad::testing::flatten(dx);
  };
  const double err =
      diffgrad::testing::dot_product_error_exact(jvp, vjp, diffgrad::testing::flatten(x), 6);
  INFO("dot-product error vs the analytic Jacobian " << err);
  CHECK(err < 1e-13);
}

TEST_CASE("DiracMixture log density: brute force, score = -eps/sigma, Hessian = -F",
          "[models][dirac][density]") {
  const Mat y = cloud_points<double>(4, 2);
  Eigen::VectorXd weights(4);
  weights << 1, 3, 2, 2;
  models::DiracMixture<double> model(y, weights);
  model.cond() << 0.2, 0.0, -0.3, 0.1;
  const Node n = make_node(0.85, 0.7);
  const auto x = diffgrad::testing::test_batch<double>(3, 2);
  const Eigen::VectorXd logp = model.log_density(x, n);
  Eigen::VectorXd pi = (weights.array().log() + model.cond().array()).exp().matrix();
  pi /= pi.sum();
  for (Eigen::Index b = 0; b < 3; ++b)
    CHECK(logp(b) == Approx(static_cast<double>(brute_log_density(x.row(b), y, pi, n.alpha, n.sigma)))
                         .epsilon(1e-14));
  // Gradient and Hessian of log p_t by central differences (sample 0).
  Mat eps;
  model.eps(x, n, eps);
  const Eigen::VectorXd tr = model.fisher_trace(x, n);
  const double h = 1e-4;
  const auto logp_at = [&](Eigen::RowVectorXd p) {
    Mat one = p;
    return model.log_density(one, n)(0);
  };
  Eigen::MatrixXd hess(2, 2);
  for (int i = 0; i < 2; ++i) {
    Eigen::RowVectorXd ei = Eigen::RowVectorXd::Zero(2);
    ei(i) = h;
    const double grad = (logp_at(x.row(0) + ei) - logp_at(x.row(0) - ei)) / (2 * h);
    CHECK(grad == Approx(-eps(0, i) / n.sigma).epsilon(1e-7));
    for (int j = 0; j < 2; ++j) {
      Eigen::RowVectorXd ej = Eigen::RowVectorXd::Zero(2);
      ej(j) = h;
      hess(i, j) = (logp_at(x.row(0) + ei + ej) - logp_at(x.row(0) + ei - ej) -
                    logp_at(x.row(0) - ei + ej) + logp_at(x.row(0) - ei - ej)) /
                   (4 * h * h);
    }
  }
  // F = -Hessian; vjp gives sigma F a.
  Mat dx;
  for (int i = 0; i < 2; ++i) {
    Mat a = Mat::Zero(3, 2);
    a(0, i) = 1.0;
    model.vjp(x, n, a, dx, nullptr, nullptr);
    for (int j = 0; j < 2; ++j) CHECK(dx(0, j) / n.sigma == Approx(-hess(i, j)).epsilon(1e-6));
  }
  CHECK(tr(0) == Approx(-hess.trace()).epsilon(1e-6));
}

TEMPLATE_TEST_CASE("DiracMixture is finite for far points and tiny sigma", "[models][dirac][stability]",
                   float, double) {
  // Points 1e4 apart, sigma down to 1e-6 (double) / 1e-3 (float), samples near and far.
  State<TestType> y(3, 2);
  y << TestType(1e4), TestType(0), TestType(-1e4), TestType(5), TestType(0), TestType(-1e4);
  models::DiracMixture<TestType> model(y);
  State<TestType> x(4, 2);
  x << TestType(1e4 + 1), TestType(0.5), TestType(-9999), TestType(4), TestType(3e4), TestType(3e4),
      TestType(0), TestType(0);
  const double tiny = std::is_same_v<TestType, float> ? 1e-3 : 1e-6;
  for (const double sigma : {1.0, 0.1, tiny}) {
    const double alpha = std::sqrt(1.0 - sigma * sigma);
    const Node n = make_node(alpha, sigma);
    State<TestType> eps, x0, dx;
    model.eps(x, n, eps);
    model.x0_hat(x, n, x0);
    State<TestType> a = State<TestType>::Ones(4, 2);
    Eigen::Matrix<TestType, Eigen::Dynamic, 1> dz = Eigen::Matrix<TestType, Eigen::Dynamic, 1>::Zero(3);
    Eigen::Matrix<TestType, Eigen::Dynamic, 1> dy = Eigen::Matrix<TestType, Eigen::Dynamic, 1>::Zero(6);
    model.vjp(x, n, a, dx, &dz, &dy);
    INFO("sigma " << sigma);
    CHECK(eps.allFinite());
    CHECK(dx.allFinite());
    CHECK(dz.allFinite());
    CHECK(dy.allFinite());
    CHECK(model.log_density(x, n).allFinite());
    if (sigma <= 0.1) {
      // Well separated: x0_hat is the nearest (scaled) point.
      CHECK((x0.row(0) - y.row(0)).norm() < 1e-3);
      CHECK((x0.row(1) - y.row(1)).norm() < 1e-3);
    }
  }
}

TEST_CASE("Mixture models do not allocate once their buffers are sized", "[models][dirac][gmm]") {
  const Mat y = cloud_points<double>(8, 3);
  models::DiracMixture<double> dirac(y);
  models::GaussianMixture<double> gmm(y, Eigen::VectorXd::Constant(8, 0.3));
  models::RectifiedFlowMixture<double> flow(y);
  const auto x = diffgrad::testing::test_batch<double>(16, 3);
  const Node n = make_node(0.8, 0.6);
  Mat out(16, 3), dx(16, 3), a = Mat::Ones(16, 3);
  Eigen::VectorXd dz = Eigen::VectorXd::Zero(8), dy = Eigen::VectorXd::Zero(24);
  const auto calls = [&] {
    dirac.eps(x, n, out);
    dirac.vjp(x, n, a, dx, &dz, &dy);
    gmm.eps(x, n, out);
    gmm.vjp(x, n, a, dx, &dz, &dy);
    flow.velocity(x, 0.4, out);
    flow.velocity_vjp(x, 0.4, a, dx, &dz, &dy);
  };
  calls();  // sizes the scratch
  Eigen::internal::set_is_malloc_allowed(false);
  CHECK_NOTHROW(calls());
  Eigen::internal::set_is_malloc_allowed(true);
}

TEST_CASE("DiracMixture rejects bad input with diffgrad::invalid_argument", "[models][dirac][errors]") {
  const Mat y = cloud_points<double>(3, 2);
  models::DiracMixture<double> model(y);
  const Node n = make_node(0.8, 0.6);
  Mat out, dx;
  SECTION("state dimension mismatch") {
    const auto x = diffgrad::testing::test_batch<double>(2, 3);
    CHECK_THROWS_AS(model.eps(x, n, out), diffgrad::invalid_argument);
    CHECK_THROWS_WITH(model.eps(x, n, out), Catch::Contains("'x'") && Catch::Contains("dimension 2"));
  }
  SECTION("wrong conditioning size") {
    CHECK_THROWS_AS(model.set_cond(Eigen::VectorXd::Zero(2)), diffgrad::invalid_argument);
    model.cond() = Eigen::VectorXd::Zero(4);
    const auto x = diffgrad::testing::test_batch<double>(2, 2);
    CHECK_THROWS_WITH(model.eps(x, n, out), Catch::Contains("cond") && Catch::Contains("length 3"));
  }
  SECTION("wrong parameter size") {
    CHECK_THROWS_AS(model.set_params(Eigen::VectorXd::Zero(5)), diffgrad::invalid_argument);
    const auto x = diffgrad::testing::test_batch<double>(2, 2);
    Eigen::VectorXd dp = Eigen::VectorXd::Zero(5);
    CHECK_THROWS_WITH(model.vjp(x, n, Mat::Ones(2, 2), dx, nullptr, &dp),
                      Catch::Contains("dparams") && Catch::Contains("length 6"));
  }
  SECTION("cotangent shape and dcond size") {
    const auto x = diffgrad::testing::test_batch<double>(2, 2);
    CHECK_THROWS_AS(model.vjp(x, n, Mat::Ones(3, 2), dx, nullptr, nullptr), diffgrad::invalid_argument);
    Eigen::VectorXd dc = Eigen::VectorXd::Zero(2);
    CHECK_THROWS_AS(model.vjp(x, n, Mat::Ones(2, 2), dx, &dc, nullptr), diffgrad::invalid_argument);
  }
  SECTION("sigma = 0 node") {
    const auto x = diffgrad::testing::test_batch<double>(2, 2);
    CHECK_THROWS_WITH(model.eps(x, terminal_data_node(0.0, 0.0), out), Catch::Contains("node.sigma"));
  }
  SECTION("bad construction") {
    CHECK_THROWS_AS(models::DiracMixture<double>(y, Eigen::VectorXd::Ones(2)), diffgrad::invalid_argument);
    Eigen::VectorXd w(3);
    w << 1, 0, 1;
    CHECK_THROWS_AS(models::DiracMixture<double>(y, w), diffgrad::invalid_argument);
  }
}

// ---------------------------------------------------------------- Gaussian mixture

TEMPLATE_TEST_CASE("GaussianMixture with one component is Gaussian data", "[models][gmm]", float,
                   double) {
  Eigen::Matrix<TestType, Eigen::Dynamic, 1> mu(3);
  mu << TestType(0.5), TestType(-0.2), TestType(1.1);
  const double s = 0.35;
  const State<TestType> means = mu.transpose();
  models::GaussianMixture<TestType> model(means, Eigen::VectorXd::Constant(1, s));
  const auto x = diffgrad::testing::test_batch<TestType>(4, 3);
  const double tol = std::is_same_v<TestType, float> ? 2e-6 : 1e-14;
  for (const Node n : {make_node(0.8, 0.6), make_node(0.1, 0.995), make_node(0.999, 0.0447)}) {
    // REFERENCE problem 1: eps = sigma (x - alpha mu)/(alpha^2 s^2 + sigma^2), d eps/dx = sigma/v I.
    const double v = n.alpha * n.alpha * s * s + n.sigma * n.sigma;
    const State<TestType> expected =
        (TestType(n.sigma / v) * (x.rowwise() - TestType(n.alpha) * mu.transpose())).eval();
    State<TestType> eps, dx;
    model.eps(x, n, eps);
    CHECK(diffgrad::testing::relative_error<TestType>(eps, expected) < tol);
    const State<TestType> a = diffgrad::testing::test_batch<TestType>(4, 3).reverse();
    model.vjp(x, n, a, dx, nullptr, nullptr);
    CHECK(diffgrad::testing::relative_error<TestType>(dx, (TestType(n.sigma / v) * a).eval()) < tol);
  }
}

TEST_CASE("GaussianMixture with zero stds is the Dirac mixture (two-point tanh closed form)",
          "[models][gmm]") {
  Mat m(2, 2);
  m << 0.9, -0.4, -0.9, 0.4;
  models::GaussianMixture<double> model(m, Eigen::VectorXd::Zero(2));
  const auto x = diffgrad::testing::test_batch<double>(5, 2);
  const Node n = make_node(0.7, 0.9);
  Mat eps;
  model.eps(x, n, eps);
  for (Eigen::Index b = 0; b < x.rows(); ++b) {
    const Eigen::RowVectorXd x0 = std::tanh(0.7 * x.row(b).dot(m.row(0)) / 0.81) * m.row(0);
    const Eigen::RowVectorXd expected = (x.row(b) - 0.7 * x0) / 0.9;
    CHECK((eps.row(b) - expected).norm() < 1e-14);
  }
}

TEST_CASE("GaussianMixture VJPs and log density", "[models][gmm][vjp]") {
  const Mat means = cloud_points<double>(4, 3);
  Eigen::VectorXd stds(4), weights(4);
  stds << 0.2, 0.5, 0.05, 1.0;
  weights << 1, 2, 3, 0.5;
  models::GaussianMixture<double> model(means, stds, weights);
  model.cond() << 0.3, -0.1, 0.0, 0.2;
  const auto x = diffgrad::testing::test_batch<double>(3, 3);
  for (const Node n : {make_node(0.8, 0.6), make_node(0.95, 0.3)}) {
    INFO("alpha " << n.alpha);
    const auto checks = check_model_vjp(
        [&](const Mat& in, Mat& out) { model.eps(in, n, out); },
        [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
          model.vjp(in, n, a, dx, dc, dp);
        },
        x, &model.cond(), &model.params());
    require_vjp_ok(checks);
    // log p_t by the textbook formula (component variances v_k).
    Eigen::VectorXd pi = (weights.array().log() + model.cond().array()).exp().matrix();
    pi /= pi.sum();
    const Eigen::VectorXd logp = model.log_density(x, n);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      long double total = 0;
      for (Eigen::Index k = 0; k < 4; ++k) {
        const long double v = n.alpha * n.alpha * stds(k) * stds(k) + n.sigma * n.sigma;
        const long double sq = (x.row(b) - n.alpha * means.row(k)).squaredNorm();
        total += pi(k) * std::exp(-sq / (2 * v)) /
                 std::pow(2.0L * 3.14159265358979323846264338327950288L * v, 1.5L);
      }
      CHECK(logp(b) == Approx(static_cast<double>(std::log(total))).epsilon(1e-14));
    }
  }
}

TEST_CASE("GaussianMixture rejects bad input", "[models][gmm][errors]") {
  const Mat means = cloud_points<double>(2, 2);
  models::GaussianMixture<double> model(means, Eigen::VectorXd::Constant(2, 0.3));
  Mat out;
  const Node n = make_node(0.8, 0.6);
  CHECK_THROWS_AS(model.eps(diffgrad::testing::test_batch<double>(2, 3), n, out), diffgrad::invalid_argument);
  CHECK_THROWS_AS(model.set_cond(Eigen::VectorXd::Zero(3)), diffgrad::invalid_argument);
  CHECK_THROWS_AS(model.set_params(Eigen::VectorXd::Zero(3)), diffgrad::invalid_argument);
  CHECK_THROWS_AS(models::GaussianMixture<double>(means, Eigen::VectorXd::Constant(3, 0.3)),
                  diffgrad::invalid_argument);
  CHECK_THROWS_AS(models::GaussianMixture<double>(means, Eigen::VectorXd::Constant(2, -0.3)),
                  diffgrad::invalid_argument);
  models::GaussianMixture<double> dirac(means, Eigen::VectorXd::Zero(2));
  CHECK_THROWS_WITH(dirac.eps(diffgrad::testing::test_batch<double>(2, 2), terminal_data_node(0, 0), out),
                    Catch::Contains("node.sigma"));
}

// ---------------------------------------------------------------- rectified flow

TEST_CASE("RectifiedFlowMixture: one point and two points in closed form", "[models][flow]") {
  const auto x = diffgrad::testing::test_batch<double>(4, 2);
  Mat y1(1, 2);
  y1 << 0.7, -1.1;
  models::RectifiedFlowMixture<double> one(y1);
  Mat two_pts(2, 2);
  two_pts << 0.9, -0.4, -0.9, 0.4;
  models::RectifiedFlowMixture<double> two(two_pts);
  for (const double t : {0.0, 0.3, 0.9, 0.999}) {
    INFO("t " << t);
    Mat v;
    one.velocity(x, t, v);
    // One point: v = (y - x)/(1 - t), the straight line to y.
    const Mat expected = ((-x).rowwise() + y1.row(0)) / (1 - t);
    CHECK((v - expected).norm() < 1e-14 * expected.norm());
    two.velocity(x, t, v);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const double s = 1 - t;
      const Eigen::RowVectorXd x0 = std::tanh(t * x.row(b).dot(two_pts.row(0)) / (s * s)) * two_pts.row(0);
      CHECK((v.row(b) - (x0 - x.row(b)) / s).norm() < 1e-12 * (1 + v.row(b).norm()));
    }
  }
}

TEST_CASE("RectifiedFlowMixture velocity VJPs match finite differences", "[models][flow][vjp]") {
  const Mat y = cloud_points<double>(5, 2);
  models::RectifiedFlowMixture<double> model(y);
  model.cond() << 0.2, 0.1, -0.3, 0.0, 0.4;
  const auto x = diffgrad::testing::test_batch<double>(3, 2);
  for (const double t : {0.0, 0.4, 0.6}) {
    INFO("t " << t);
    const auto checks = check_model_vjp(
        [&](const Mat& in, Mat& out) { model.velocity(in, t, out); },
        [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
          model.velocity_vjp(in, t, a, dx, dc, dp);
        },
        x, &model.cond(), &model.params());
    require_vjp_ok(checks);
  }
}

TEMPLATE_TEST_CASE("RectifiedFlowMixture near t = 1 is finite; t >= 1 is refused",
                   "[models][flow][stability][errors]", float, double) {
  State<TestType> y(3, 2);
  y << TestType(1), TestType(0), TestType(-1), TestType(2), TestType(300), TestType(-300);
  models::RectifiedFlowMixture<TestType> model(y);
  const auto x = diffgrad::testing::test_batch<TestType>(4, 2);
  const double near_one = std::is_same_v<TestType, float> ? 1 - 1e-4 : 1 - 1e-9;
  State<TestType> v, dx;
  model.velocity(x, near_one, v);
  CHECK(v.allFinite());
  model.velocity_vjp(x, near_one, State<TestType>::Ones(4, 2), dx, nullptr, nullptr);
  CHECK(dx.allFinite());
  CHECK_THROWS_AS(model.velocity(x, 1.0, v), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(model.velocity(x, 1.5, v), Catch::Contains("'t'") && Catch::Contains("[0, 1)"));
  CHECK_THROWS_AS(model.velocity(x, -0.1, v), diffgrad::invalid_argument);
  CHECK_THROWS_AS(model.velocity_vjp(x, 1.0, x, dx, nullptr, nullptr), diffgrad::invalid_argument);
  CHECK_THROWS_AS(model.velocity(diffgrad::testing::test_batch<TestType>(4, 3), 0.5, v),
                  diffgrad::invalid_argument);
}
