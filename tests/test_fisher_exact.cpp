// The exact diffusion Fisher of Dirac and Gaussian mixtures (fisher/exact_fisher.hpp):
// against a finite-difference Hessian of log p_t computed from a textbook long-double density
// (independent of the models), symmetry, the eigenvalue bound 1/sigma^2, trace = trace of the
// matrix, Fisher-vector product = matrix product, closed forms, stability, bad input.
// Eigen's no-malloc guard made to throw (eigen_assert is compiled out in Release); must precede
// every Eigen include.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)                                                                            \
  do {                                                                                             \
    if (!(x)) throw std::runtime_error("eigen_assert failed: " #x);                                \
  } while (false)

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>

#include "diffgrad/fisher/exact_fisher.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::State;

namespace {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr long double kPi = 3.14159265358979323846264338327950288L;

Node make_node(double alpha, double sigma) {
  return Node{0.5, alpha, sigma, std::log(alpha / sigma), 0.5};
}

Mat cloud(Eigen::Index k, Eigen::Index dim, double shift = 0.0) {
  Mat y(k, dim);
  for (Eigen::Index i = 0; i < k; ++i)
    for (Eigen::Index j = 0; j < dim; ++j)
      y(i, j) = std::cos(0.9 * static_cast<double>(i * dim + j) + 0.3) * 1.2 +
                0.1 * static_cast<double>(i) + shift;
  return y;
}

/// log sum_k pi_k N(x; alpha m_k, (alpha^2 s_k^2 + sigma^2) I), textbook, long double.
long double textbook_log_density(const Eigen::VectorXd& x, const Mat& m, const Eigen::VectorXd& s,
                                 const Eigen::VectorXd& pi, double alpha, double sigma) {
  long double total = 0;
  const auto d = static_cast<long double>(x.size());
  for (Eigen::Index k = 0; k < m.rows(); ++k) {
    const long double v = static_cast<long double>(alpha) * alpha * s(k) * s(k) +
                          static_cast<long double>(sigma) * sigma;
    long double sq = 0;
    for (Eigen::Index j = 0; j < x.size(); ++j) {
      const long double r = x(j) - static_cast<long double>(alpha) * m(k, j);
      sq += r * r;
    }
    total += pi(k) * std::exp(-sq / (2 * v)) / std::pow(2 * kPi * v, d / 2);
  }
  return std::log(total);
}

/// Central-difference Hessian of f at x (step h), Richardson-extrapolated from h and h/2:
/// truncation O(h^4), rounding O(u |f| / h^2).
Eigen::MatrixXd fd_hessian(const std::function<long double(const Eigen::VectorXd&)>& f,
                           const Eigen::VectorXd& x, double h) {
  const auto n = x.size();
  const auto at = [&](double step) {
    Eigen::MatrixXd hess(n, n);
    const long double f0 = f(x);
    for (Eigen::Index i = 0; i < n; ++i) {
      for (Eigen::Index j = 0; j <= i; ++j) {
        long double value;
        if (i == j) {
          Eigen::VectorXd p = x, q = x;
          p(i) += step;
          q(i) -= step;
          value = (f(p) - 2 * f0 + f(q)) / (static_cast<long double>(step) * step);
        } else {
          Eigen::VectorXd pp = x, pm = x, mp = x, mm = x;
          pp(i) += step;
          pp(j) += step;
          pm(i) += step;
          pm(j) -= step;
          mp(i) -= step;
          mp(j) += step;
          mm(i) -= step;
          mm(j) -= step;
          value = (f(pp) - f(pm) - f(mp) + f(mm)) / (4 * static_cast<long double>(step) * step);
        }
        hess(i, j) = hess(j, i) = static_cast<double>(value);
      }
    }
    return hess;
  };
  return (4.0 * at(h / 2) - at(h)) / 3.0;
}

struct Case {
  double alpha, sigma;
};
const Case kCases[] = {{0.95, 0.3}, {0.8, 0.6}, {0.5, 0.87}, {0.999, 0.05}};

} // namespace

TEST_CASE("Exact Fisher of a Dirac mixture equals the finite-difference Hessian of -log p_t",
          "[fisher][exact]") {
  const Mat y = cloud(5, 3);
  Eigen::VectorXd pi(5);
  pi << 0.1, 0.3, 0.2, 0.25, 0.15;
  const models::DiracMixture<double> model(y, pi);
  const fisher::ExactFisher fisher(model);
  const auto x = diffgrad::testing::test_batch<double>(4, 3);
  for (const Case c : kCases) {
    const Node n = make_node(c.alpha, c.sigma);
    const auto mats = fisher.matrices(x, n);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::VectorXd xb = x.row(b).transpose();
      const auto logp = [&](const Eigen::VectorXd& v) {
        return textbook_log_density(v, y, Eigen::VectorXd::Zero(5), pi / pi.sum(), c.alpha,
                                    c.sigma);
      };
      const Eigen::MatrixXd h = fd_hessian(logp, xb, 0.01 * c.sigma);
      const double rel = (mats[static_cast<std::size_t>(b)] + h).norm() / h.norm();
      INFO("alpha " << c.alpha << " sigma " << c.sigma << " sample " << b << " rel " << rel);
      CHECK(rel <= 1e-6);
    }
  }
}

TEST_CASE("Exact Fisher of a Gaussian mixture equals the finite-difference Hessian of -log p_t",
          "[fisher][exact]") {
  const Mat m = cloud(4, 3);
  Eigen::VectorXd s(4), pi(4);
  s << 0.3, 0.0, 0.7, 0.1; // one Dirac component
  pi << 0.4, 0.1, 0.3, 0.2;
  const models::GaussianMixture<double> model(m, s, pi);
  const fisher::ExactFisher fisher(model);
  const auto x = diffgrad::testing::test_batch<double>(3, 3);
  for (const Case c : kCases) {
    const Node n = make_node(c.alpha, c.sigma);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::VectorXd xb = x.row(b).transpose();
      const auto logp = [&](const Eigen::VectorXd& v) {
        return textbook_log_density(v, m, s, pi / pi.sum(), c.alpha, c.sigma);
      };
      const Eigen::MatrixXd h = fd_hessian(logp, xb, 0.01 * c.sigma);
      const double rel = (fisher.matrix(x, n, b) + h).norm() / h.norm();
      INFO("alpha " << c.alpha << " sigma " << c.sigma << " sample " << b << " rel " << rel);
      CHECK(rel <= 1e-6);
    }
  }
}

TEST_CASE("Exact Fisher: symmetric, eigenvalues <= 1/sigma^2, trace and product consistent",
          "[fisher][exact]") {
  const Mat y = cloud(7, 4);
  const models::DiracMixture<double> dirac(y);
  Eigen::VectorXd s(7);
  s << 0.2, 0.0, 0.5, 0.1, 0.3, 0.0, 0.8;
  const models::GaussianMixture<double> gmm(y, s);
  const fisher::ExactFisher fd(dirac);
  const fisher::ExactFisher fg(gmm);
  const auto x = diffgrad::testing::test_batch<double>(5, 4);
  const Mat a = diffgrad::testing::test_batch<double>(6, 4).bottomRows(5) * 0.7;
  const auto check = [&](const auto& fisher, const auto& model, const Node& n) {
    const auto mats = fisher.matrices(x, n);
    const Eigen::VectorXd tr = fisher.trace(x, n);
    Mat fa;
    fisher.apply(x, n, a, fa);
    Mat vjp; // the model's own VJP: d eps/dx = sigma F
    model.vjp(x, n, a, vjp, nullptr, nullptr);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::MatrixXd& f = mats[static_cast<std::size_t>(b)];
      CHECK((f - f.transpose()).norm() == 0.0); // bit-for-bit symmetric
      const Eigen::Vector2d range = fisher::symmetric_eigen_range(f);
      CHECK(range(1) <= (1.0 + 1e-12) / (n.sigma * n.sigma));
      CHECK(std::abs(tr(b) - f.trace()) <= 1e-12 * f.cwiseAbs().trace());
      const Eigen::VectorXd fa_ref = f * a.row(b).transpose();
      CHECK((fa.row(b).transpose() - fa_ref).norm() <= 1e-12 * f.norm() * a.row(b).norm());
      CHECK((vjp.row(b).transpose() / n.sigma - fa_ref).norm() <=
            1e-11 * f.norm() * a.row(b).norm());
    }
  };
  for (const Case c : kCases) {
    check(fd, dirac, make_node(c.alpha, c.sigma));
    check(fg, gmm, make_node(c.alpha, c.sigma));
  }
}

TEST_CASE("Exact Fisher closed forms: one Gaussian, one point, far from the data",
          "[fisher][exact]") {
  const Node n = make_node(0.7, 0.5);
  const auto x = diffgrad::testing::test_batch<double>(3, 2);
  SECTION("a single Gaussian N(m, s^2 I): F = I / (alpha^2 s^2 + sigma^2)") {
    Mat m(1, 2);
    m << 0.3, -1.1;
    const models::GaussianMixture<double> model(m, Eigen::VectorXd::Constant(1, 0.4));
    const fisher::ExactFisher fisher(model);
    const double v = 0.7 * 0.7 * 0.16 + 0.25;
    for (Eigen::Index b = 0; b < 3; ++b)
      CHECK((fisher.matrix(x, n, b) - Eigen::MatrixXd::Identity(2, 2) / v).norm() <= 1e-14 / v);
    CHECK((fisher.trace(x, n).array() - 2.0 / v).abs().maxCoeff() <= 1e-13 / v);
    // E|x0|^2 = |posterior mean|^2 + d * posterior variance.
    const Eigen::VectorXd sm = fisher.second_moment(x, n);
    for (Eigen::Index b = 0; b < 3; ++b) {
      const Eigen::RowVector2d mean = m.row(0) + (0.7 * 0.16 / v) * (x.row(b) - 0.7 * m.row(0));
      CHECK(std::abs(sm(b) - (mean.squaredNorm() + 2 * 0.16 * 0.25 / v)) <= 1e-13);
    }
  }
  SECTION("translation invariance with data 1e4 away from the origin") {
    const Mat y = cloud(5, 2);
    Mat shifted = y;
    shifted.array() += 1e4;
    const models::DiracMixture<double> near(y), far(shifted);
    const fisher::ExactFisher f_near(near), f_far(far);
    Mat x_far = x;
    x_far.array() += 0.7 * 1e4;
    for (Eigen::Index b = 0; b < 3; ++b) {
      const Eigen::MatrixXd fn = f_near.matrix(x, n, b);
      // The softmax logits of the far model carry an absolute error u (alpha |y|)^2/sigma^2
      // ~ 1e-8 (the model's GEMM form), which bounds the agreement.
      CHECK((f_far.matrix(x_far, n, b) - fn).norm() <= 1e-6 * fn.norm());
    }
  }
  SECTION("tiny sigma: finite, F -> I/sigma^2 away from the Voronoi boundaries") {
    const Mat y = cloud(5, 2);
    const models::DiracMixture<double> model(y);
    const fisher::ExactFisher fisher(model);
    const Node tiny = make_node(1.0, 1e-4);
    Mat near_points = y.topRows(3);
    near_points.array() += 1e-5;
    const Eigen::VectorXd tr = fisher.trace(near_points, tiny);
    CHECK(tr.allFinite());
    CHECK((tr.array() * 1e-8 - 2.0).abs().maxCoeff() <= 1e-12);
  }
}

TEST_CASE("Exact Fisher in float agrees with double", "[fisher][exact][float]") {
  const Mat y = cloud(6, 3);
  const models::DiracMixture<double> md(y);
  const models::DiracMixture<float> mf(y.cast<float>());
  const fisher::ExactFisher fd(md);
  const fisher::ExactFisher ff(mf);
  const auto x = diffgrad::testing::test_batch<double>(4, 3);
  const Mat a = Mat::Constant(4, 3, 0.5);
  const Node n = make_node(0.9, 0.43);
  Mat out_d;
  State<float> out_f;
  fd.apply(x, n, a, out_d);
  ff.apply(x.cast<float>(), n, a.cast<float>(), out_f);
  CHECK((out_f.cast<double>() - out_d).norm() <= 1e-5 * out_d.norm());
  CHECK((ff.trace(x.cast<float>(), n) - fd.trace(x, n)).norm() <= 1e-5 * fd.trace(x, n).norm());
}

TEST_CASE("Exact Fisher-vector products do not allocate in steady state", "[fisher][exact]") {
  const Mat y = cloud(6, 3);
  Eigen::VectorXd s = Eigen::VectorXd::Constant(6, 0.2);
  const models::DiracMixture<double> dirac(y);
  const models::GaussianMixture<double> gmm(y, s);
  const fisher::ExactFisher fd(dirac);
  const fisher::ExactFisher fg(gmm);
  const auto x = diffgrad::testing::test_batch<double>(4, 3);
  const Mat a = x * 0.3;
  Mat out(4, 3);
  const Node n = make_node(0.8, 0.6);
  const auto calls = [&] {
    fd.apply(x, n, a, out);
    fg.apply(x, n, a, out);
  };
  calls();
  Eigen::internal::set_is_malloc_allowed(false);
  CHECK_NOTHROW(calls());
  Eigen::internal::set_is_malloc_allowed(true);
}

TEST_CASE("Exact Fisher rejects bad input with diffgrad::invalid_argument", "[fisher][errors]") {
  const Mat y = cloud(3, 2);
  const models::DiracMixture<double> model(y);
  const fisher::ExactFisher fisher(model);
  const auto x = diffgrad::testing::test_batch<double>(2, 2);
  Mat out;
  SECTION("cotangent shape") {
    CHECK_THROWS_WITH(fisher.apply(x, make_node(0.8, 0.6), Mat::Ones(3, 2), out),
                      Catch::Contains("'a'") && Catch::Contains("shape 2 x 2"));
  }
  SECTION("state dimension") {
    CHECK_THROWS_AS(fisher.trace(diffgrad::testing::test_batch<double>(2, 3), make_node(0.8, 0.6)),
                    diffgrad::invalid_argument);
  }
  SECTION("sigma = 0") {
    CHECK_THROWS_WITH(fisher.trace(x, Node{0.0, 1.0, 0.0, 1e300, 0.0}),
                      Catch::Contains("node.sigma") && Catch::Contains("positive"));
  }
  SECTION("sample index") {
    CHECK_THROWS_WITH(fisher.matrix(x, make_node(0.8, 0.6), 2),
                      Catch::Contains("'b'") && Catch::Contains("[0, 2)"));
  }
}

TEST_CASE("Table: exact Fisher vs finite-difference Hessian", "[.table][fisher_fd]") {
  const Mat y = cloud(5, 3);
  Eigen::VectorXd pi(5), s(5);
  pi << 0.1, 0.3, 0.2, 0.25, 0.15;
  s << 0.3, 0.0, 0.7, 0.1, 0.2;
  const models::DiracMixture<double> dirac(y, pi);
  const models::GaussianMixture<double> gmm(y, s, pi);
  const fisher::ExactFisher fd(dirac);
  const fisher::ExactFisher fg(gmm);
  const auto x = diffgrad::testing::test_batch<double>(8, 3);
  std::printf("Exact Fisher F vs -Hessian(log p_t) by Richardson-extrapolated central differences "
              "of a long-double textbook density (h = 0.01 sigma), d = 3, K = 5, 8 points x; "
              "max over the points of |F + H_fd|_F / |H_fd|_F; lambda_max(F) sigma^2 (<= 1); "
              "|tr F - trace(F matrix)| / |F|_F\n");
  std::printf("| alpha | sigma | Dirac: FD rel. error | Dirac: max lambda sigma^2 | Gaussian "
              "mixture: FD rel. error | GMM: max lambda sigma^2 | max trace mismatch |\n"
              "|---|---|---|---|---|---|---|\n");
  for (const Case c : kCases) {
    const Node n = make_node(c.alpha, c.sigma);
    double e1 = 0, e2 = 0, l1 = -1e300, l2 = -1e300, tm = 0;
    const Eigen::VectorXd trd = fd.trace(x, n), trg = fg.trace(x, n);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::VectorXd xb = x.row(b).transpose();
      const auto ld = [&](const Eigen::VectorXd& v) {
        return textbook_log_density(v, y, Eigen::VectorXd::Zero(5), pi / pi.sum(), c.alpha,
                                    c.sigma);
      };
      const auto lg = [&](const Eigen::VectorXd& v) {
        return textbook_log_density(v, y, s, pi / pi.sum(), c.alpha, c.sigma);
      };
      const Eigen::MatrixXd hd = fd_hessian(ld, xb, 0.01 * c.sigma),
                            hg = fd_hessian(lg, xb, 0.01 * c.sigma);
      const Eigen::MatrixXd md = fd.matrix(x, n, b), mg = fg.matrix(x, n, b);
      e1 = std::max(e1, (md + hd).norm() / hd.norm());
      e2 = std::max(e2, (mg + hg).norm() / hg.norm());
      l1 = std::max(l1, fisher::symmetric_eigen_range(md)(1) * c.sigma * c.sigma);
      l2 = std::max(l2, fisher::symmetric_eigen_range(mg)(1) * c.sigma * c.sigma);
      tm = std::max({tm, std::abs(trd(b) - md.trace()) / md.norm(),
                     std::abs(trg(b) - mg.trace()) / mg.norm()});
    }
    std::printf("| %.3g | %.3g | %.1e | %.4f | %.1e | %.4f | %.1e |\n", c.alpha, c.sigma, e1, l1,
                e2, l2, tm);
  }
}
