// DiffFlow (include/diffgrad/diffflow/*): exact discrete gradients vs finite differences,
// memory modes, workspace size vs N (no stored noise), closed forms of the loss for linear
// drifts and scores (Gaussian data), the zero-drift score minimiser, the PF-ODE likelihood in t
// vs the closed form of Gaussian data, Hutchinson traces, sampling, grids, training.
// Expected values are written here from the math (docs/diffflow.md), never taken from the
// code under test; Monte-Carlo comparisons use 4 standard errors from independent sub-batches.
#include <catch2/catch.hpp>

#include <cmath>
#include <numbers>
#include <vector>

#include "diffgrad/diffflow/diffflow.hpp"
#include "diffgrad/diffflow/networks.hpp"
#include "diffgrad/diffflow/time_grid.hpp"
#include "diffgrad/diffflow/time_ode.hpp"
#include "diffgrad/diffflow/toy_data.hpp"
#include "diffgrad/diffflow/train.hpp"
#include "diffgrad/models/mlp.hpp"
#include "fd_check.hpp"

using namespace diffgrad;
using namespace diffgrad::diffflow;
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXd;

namespace {

/// f(x, t_i) = sign * p_i x with one parameter per node of a fixed grid (t looked up exactly).
class NodeLinearField {
public:
  using state_type = Mat;
  using vector_type = Vec;
  NodeLinearField(std::vector<double> t, Vec p, double sign) : t_(std::move(t)), p_(std::move(p)), sign_(sign) {}
  void velocity(const Mat& x, double t, Mat& out) const { out = sign_ * p_(index(t)) * x; }
  void velocity_vjp(const Mat& x, double t, const Mat& a, Mat& dx, Vec*, Vec* dp) const {
    const Eigen::Index i = index(t);
    dx = sign_ * p_(i) * a;
    if (dp) (*dp)(i) += sign_ * a.cwiseProduct(x).sum();
  }
  std::int64_t param_size() const { return p_.size(); }
  Vec& params() { return p_; }

private:
  Eigen::Index index(double t) const {
    for (std::size_t i = 0; i < t_.size(); ++i)
      if (t_[i] == t) return static_cast<Eigen::Index>(i);
    FAIL("NodeLinearField: time not on the grid");
    return 0;
  }
  std::vector<double> t_;
  Vec p_;
  double sign_;
};

/// s(x, t) = -c x / v(t), v(t) = s0^2 + g^2 (t - t_data): for c = 1 the exact score of data
/// N(0, s0^2) at t_data under dx = g dW; one parameter c.
class ScaledScore {
public:
  using state_type = Mat;
  using vector_type = Vec;
  ScaledScore(double s0, double g, double c, double t_data = 0.0)
      : s0_(s0), g_(g), t_data_(t_data), p_(Vec::Constant(1, c)) {}
  double v(double t) const { return s0_ * s0_ + g_ * g_ * (t - t_data_); }
  void velocity(const Mat& x, double t, Mat& out) const { out = (-p_(0) / v(t)) * x; }
  void velocity_vjp(const Mat& x, double t, const Mat& a, Mat& dx, Vec*, Vec* dp) const {
    dx = (-p_(0) / v(t)) * a;
    if (dp) (*dp)(0) += -a.cwiseProduct(x).sum() / v(t);
  }
  std::int64_t param_size() const { return 1; }
  Vec& params() { return p_; }

private:
  double s0_, g_, t_data_;
  Vec p_;
};

/// Exact score of N(0, diag(s_j^2)) under the OU dx = -a x dt + g dW:
/// v_j(t) = s_j^2 e^{-2at} + g^2 (1 - e^{-2at}) / (2a).
class OuGaussianScore {
public:
  using state_type = Mat;
  using vector_type = Vec;
  OuGaussianScore(Vec s, double a, double g) : s_(std::move(s)), a_(a), g_(g) {}
  Vec v(double t) const {
    const double e = std::exp(-2 * a_ * t);
    return (s_.array().square() * e + g_ * g_ * (1 - e) / (2 * a_)).matrix();
  }
  void velocity(const Mat& x, double t, Mat& out) const {
    out = -(x.array().rowwise() / v(t).transpose().array()).matrix();
  }
  void velocity_vjp(const Mat&, double t, const Mat& a, Mat& dx, Vec*, Vec*) const {
    dx = -(a.array().rowwise() / v(t).transpose().array()).matrix();
  }
  std::int64_t param_size() const { return 0; }
  Vec& params() { return p_; }

private:
  Vec s_;
  double a_, g_;
  Vec p_;
};

Grid power_grid(int n, double t0, double t1, double e, double g) {
  const PowerTimeGrid timer(n, t0, t1, e);
  return timer.with_diffusion(timer.fixed(), constant_diffusion(g));
}

Mat gaussian_batch(Eigen::Index b, Eigen::Index d, double std, std::uint64_t seed) {
  Mat x(b, d);
  for (Eigen::Index r = 0; r < b; ++r)
    for (Eigen::Index c = 0; c < d; ++c)
      x(r, c) = std * diffgrad::detail::gaussian(seed, 77, static_cast<std::uint64_t>(r * d + c));
  return x;
}

struct MeanSe {
  double mean = 0, se = 0;
};
MeanSe mean_se(const std::vector<double>& v) {
  MeanSe m;
  for (double x : v) m.mean += x;
  m.mean /= static_cast<double>(v.size());
  double var = 0;
  for (double x : v) var += (x - m.mean) * (x - m.mean);
  var /= static_cast<double>(v.size() - 1);
  m.se = std::sqrt(var / static_cast<double>(v.size()));
  return m;
}

models::MlpConfig small_mlp(int dim, double time_scale) {
  models::MlpConfig c;
  c.dim = dim;
  c.time_frequencies = 2;
  c.time_scale = time_scale;
  c.hidden = {8, 8};
  c.activation = models::Activation::tanh;
  return c;
}

} // namespace

TEST_CASE("DiffFlow gradient vs finite differences (Mlp drift and score, float64)", "[diffflow]") {
  models::Mlp<double> drift(small_mlp(2, 2.0), 11), score(small_mlp(2, 2.0), 12);
  drift.params() *= 3.0; // a clearly non-zero, nonlinear drift
  const Grid grid = power_grid(5, 0.02, 0.5, 0.7, 0.6);
  const Mat x0 = gaussian_batch(3, 2, 1.0, 5);
  DiffFlow flow(drift, score);
  Mat f0;
  drift.velocity(x0, grid.t[0], f0);
  REQUIRE(f0.norm() > 0.5);

  const auto np_f = drift.param_size(), np_s = score.param_size();
  Vec packed(np_f + np_s + x0.size());
  packed << drift.params(), score.params(), diffgrad::testing::flatten(x0);
  const auto unpack = [&](const Vec& p) {
    drift.params() = p.head(np_f);
    score.params() = p.segment(np_f, np_s);
    return diffgrad::testing::unflatten(p.tail(x0.size()), x0.rows(), x0.cols());
  };
  LossOptions opt;
  opt.seed = 3;
  const auto f = [&](const Vec& p, Vec& out) {
    const Mat x = unpack(p);
    out = Vec::Constant(1, flow.loss(grid, x, opt).loss);
  };
  Workspace<double> ws;
  const auto vjp = [&](const Vec& p, const Vec& w) {
    const Mat x = unpack(p);
    const auto g = flow.gradient(grid, x, opt, ws);
    Vec out(p.size());
    out << g.drift, g.score, diffgrad::testing::flatten(g.x0);
    return Vec(w(0) * out);
  };
  const auto check = diffgrad::testing::check_vjp(f, vjp, packed);
  INFO("fd_error " << check.fd_error << " dot_product_error " << check.dot_product_error);
  CHECK(check.fd_error <= 1e-7);
  CHECK(check.dot_product_error <= 1e-9);

  // Each block on its own (a block with a tiny gradient could hide in the joint check).
  unpack(packed);
  const auto g = flow.gradient(grid, x0, opt, ws);
  for (int block = 0; block < 3; ++block) {
    const Eigen::Index begin = block == 0 ? 0 : block == 1 ? np_f : np_f + np_s;
    const Eigen::Index len = block == 0 ? np_f : block == 1 ? np_s : x0.size();
    Vec dir = diffgrad::testing::random_vector(len, 9, static_cast<std::uint64_t>(block));
    dir /= dir.norm();
    Vec full = Vec::Zero(packed.size());
    full.segment(begin, len) = dir;
    const double h = 1e-4;
    Vec a, b, c, e;
    f(packed + h * full, a);
    f(packed - h * full, b);
    f(packed + 2 * h * full, c);
    f(packed - 2 * h * full, e);
    const double fd = (8 * (a(0) - b(0)) - (c(0) - e(0))) / (12 * h);
    Vec exact(packed.size());
    exact << g.drift, g.score, diffgrad::testing::flatten(g.x0);
    const double ad = exact.dot(full);
    INFO("block " << block << " fd " << fd << " adjoint " << ad);
    CHECK(std::abs(fd - ad) <= 1e-7 * std::abs(ad));
  }
  unpack(packed);
}

TEST_CASE("DiffFlow memory modes give identical bits; noise is never stored", "[diffflow]") {
  models::Mlp<double> drift(small_mlp(2, 1.0), 1), score(small_mlp(2, 1.0), 2);
  const Mat x0 = gaussian_batch(4, 2, 1.0, 8);
  DiffFlow flow(drift, score);
  const auto run = [&](int n, MemoryMode memory, Workspace<double>& ws) {
    LossOptions o;
    o.seed = 21;
    o.memory = memory;
    return flow.gradient(power_grid(n, 0.01, 0.4, 0.9, 0.5), x0, o, ws);
  };
  Workspace<double> w1, w3, w7;
  const auto a = run(12, MemoryMode::store_all(), w1), b = run(12, MemoryMode::checkpoint(3), w3),
             c = run(12, MemoryMode::recompute(), w7);
  CHECK(a.value.loss == b.value.loss);
  CHECK(a.drift == b.drift);
  CHECK(a.score == b.score);
  CHECK(a.x0 == b.x0);
  CHECK(a.value.loss == c.value.loss);
  CHECK(a.drift == c.drift);
  CHECK(a.score == c.score);
  CHECK(a.x0 == c.x0);
  // Recompute re-runs the chain from z_0 for every step: more model calls, the same VJPs.
  CHECK(c.cost.model_evals > a.cost.model_evals);
  CHECK(c.cost.vjps == a.cost.vjps);
  // The loss without a workspace is the same number.
  LossOptions o;
  o.seed = 21;
  CHECK(flow.loss(power_grid(12, 0.01, 0.4, 0.9, 0.5), x0, o).loss == a.value.loss);
  CHECK(a.value.nll_bound == a.value.loss); // constant g
  // Varying g: the bound adds d log(g_N / g_0) (the sum of d log(g_{i+1} / g_i) telescopes).
  Grid varying = power_grid(4, 0.01, 0.4, 0.9, 1.0);
  varying.g = {0.3, 0.5, 0.7, 1.1, 1.9};
  const auto vv = flow.loss(varying, x0, o);
  CHECK(std::abs(vv.nll_bound - vv.loss - 2 * std::log(1.9 / 0.3)) <= 1e-12 * std::abs(vv.loss));

  // Stored states: the engine runs N + 1 steps (the last one cost-only) and store-all keeps
  // the N states it reverses from, so going from N = 10 to N = 30 adds exactly 20 state
  // buffers (stored noise would add 20 more); checkpoint(4) holds at most 4, whatever N.
  Workspace<double> s10, s30, c10, c30;
  run(10, MemoryMode::store_all(), s10);
  const auto big = run(30, MemoryMode::store_all(), s30);
  CHECK(s30.stored_state_buffers() - s10.stored_state_buffers() == 20);
  CHECK(s10.stored_state_buffers() == 10);
  CHECK(big.cost.peak_stored_states == 30);
  run(10, MemoryMode::checkpoint(4), c10);
  const auto ck = run(30, MemoryMode::checkpoint(4), c30);
  CHECK(c30.stored_state_buffers() == c10.stored_state_buffers());
  CHECK(c30.stored_state_buffers() <= 4);
  CHECK(ck.cost.peak_stored_states <= 4);
  CHECK(ck.drift == big.drift);
  CHECK(s30.engine->given_noise.empty());
}

TEST_CASE("DiffFlow on the engine equals a direct evaluation of the loss (fixed noise)",
          "[diffflow]") {
  // The loss written out step by step with the documented noise keying (the engine's rule for
  // the widened row of width W = 2d + 2), independent of the chain's column bookkeeping.
  models::Mlp<double> drift(small_mlp(3, 2.0), 31), score(small_mlp(3, 2.0), 32);
  drift.params() *= 2.0;
  const Grid grid = power_grid(7, 0.02, 0.6, 0.8, 0.7);
  const Mat x0 = gaussian_batch(5, 3, 1.0, 41);
  const std::uint64_t seed = 17, row_offset = 9;
  const int d = 3, w = 2 * d + 2, n = grid.steps();
  Vec expected = Vec::Zero(x0.rows());
  Mat x = x0, xn, f, fn, sn, xi(x0.rows(), d);
  for (int i = 0; i < n; ++i) {
    const auto i1 = static_cast<std::size_t>(i) + 1;
    const double dt = grid.dt(i);
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (int c = 0; c < d; ++c)
        xi(r, c) = diffgrad::detail::gaussian(
            seed, static_cast<std::uint64_t>(i),
            (row_offset + static_cast<std::uint64_t>(r)) * w + static_cast<std::uint64_t>(c));
    drift.velocity(x, grid.t[i1 - 1], f);
    xn = x + dt * f + grid.g[i1 - 1] * std::sqrt(dt) * xi;
    drift.velocity(xn, grid.t[i1], fn);
    score.velocity(xn, grid.t[i1], sn);
    const Mat eta =
        (x - xn + dt * (fn - grid.g[i1] * grid.g[i1] * sn)) / (grid.g[i1] * std::sqrt(dt));
    expected += 0.5 * (eta.rowwise().squaredNorm() - xi.rowwise().squaredNorm());
    x = xn;
  }
  expected += (0.5 * x.rowwise().squaredNorm()).array().matrix() +
              Vec::Constant(x.rows(), 0.5 * d * std::log(2 * std::numbers::pi));
  DiffFlow flow(drift, score);
  LossOptions o;
  o.seed = seed;
  o.row_offset = row_offset;
  const auto v = flow.loss(grid, x0, o);
  const double err = (v.per_sample - expected).cwiseAbs().maxCoeff();
  INFO("max |engine - direct| = " << err << " for losses of size "
                                  << expected.cwiseAbs().maxCoeff());
  CHECK(err <= 1e-12 * expected.cwiseAbs().maxCoeff());
  // The forward chain (encode) reaches the same x_N.
  CHECK((flow.encode(grid, x0, o) - x).cwiseAbs().maxCoeff() <= 1e-13 * x.cwiseAbs().maxCoeff());
  // Shards: rows 2..4 with row_offset + 2 draw exactly those rows' noise (the networks' GEMMs
  // on 3 rows instead of 5 may round differently).
  LossOptions shard = o;
  shard.row_offset = row_offset + 2;
  const auto part = flow.loss(grid, x0.bottomRows(3), shard);
  CHECK((part.per_sample - v.per_sample.tail(3)).cwiseAbs().maxCoeff() <=
        1e-13 * expected.cwiseAbs().maxCoeff());
}

namespace {
/// E[L] for f = a_i x, s = -c_i x (per node), data N(0, s0^2 I_d), written from the Gaussian
/// recursions: m_i = 1 + a_i dt_i, v_{i+1} = m_i^2 v_i + g_i^2 dt_i,
/// k_i = 1 - (a_{i+1} + g_{i+1}^2 c_{i+1}) dt_i,
/// E|eta_i|^2 = d (v_i - 2 k_i m_i v_i + k_i^2 v_{i+1}) / (g_{i+1}^2 dt_i).
double linear_expected_loss(const Grid& grid, const Vec& a, const Vec& c, double s0, int d) {
  double v = s0 * s0, sum = 0.0;
  const int n = grid.steps();
  for (int i = 0; i < n; ++i) {
    const auto i1 = static_cast<std::size_t>(i) + 1;
    const double dt = grid.dt(i), g0 = grid.g[static_cast<std::size_t>(i)], g1 = grid.g[i1];
    const double m = 1 + a(i) * dt;
    const double vn = m * m * v + g0 * g0 * dt;
    const double k = 1 - (a(i + 1) + g1 * g1 * c(i + 1)) * dt;
    sum += 0.5 * d * (v - 2 * k * m * v + k * k * vn) / (g1 * g1 * dt) - 0.5 * d;
    v = vn;
  }
  return 0.5 * d * std::log(2 * std::numbers::pi) + 0.5 * d * v + sum;
}
} // namespace

TEST_CASE("DiffFlow with a linear drift and score: closed-form E[L] and its gradient", "[diffflow]") {
  const int n = 5, d = 2;
  const double s0 = 0.8;
  const Grid grid = power_grid(n, 0.05, 1.0, 0.8, 0.9);
  Vec a(n + 1), c(n + 1);
  for (int i = 0; i <= n; ++i) {
    a(i) = -0.3 + 0.15 * i;
    c(i) = 0.5 + 0.1 * i;
  }
  NodeLinearField drift(grid.t, a, 1.0), score(grid.t, c, -1.0);
  DiffFlow flow(drift, score);
  // Gradient of the closed form by central differences (it is a smooth function; h = 1e-5
  // leaves ~1e-10 relative error).
  Vec exact_grad(2 * (n + 1));
  for (int j = 0; j < 2 * (n + 1); ++j) {
    const double h = 1e-5;
    Vec ap = a, am = a, cp = c, cm = c;
    if (j <= n) {
      ap(j) += h;
      am(j) -= h;
    } else {
      cp(j - n - 1) += h;
      cm(j - n - 1) -= h;
    }
    exact_grad(j) = (linear_expected_loss(grid, ap, cp, s0, d) -
                     linear_expected_loss(grid, am, cm, s0, d)) / (2 * h);
  }
  exact_grad(n + 1) = 0.0; // c_0 is never used (the score is read at t_1..t_N)
  const double expected = linear_expected_loss(grid, a, c, s0, d);

  const int sub = 40, batch = 2500;
  std::vector<double> losses;
  std::vector<Vec> grads;
  Workspace<double> ws;
  for (int s = 0; s < sub; ++s) {
    const Mat x0 = gaussian_batch(batch, d, s0, 1000 + static_cast<std::uint64_t>(s));
    LossOptions o;
    o.seed = 500 + static_cast<std::uint64_t>(s);
    // Every memory mode of the engine's adjoint takes part (they give the same bits).
    o.memory = s % 3 == 0 ? MemoryMode::store_all()
               : s % 3 == 1 ? MemoryMode::checkpoint(2)
                            : MemoryMode::recompute();
    const auto g = flow.gradient(grid, x0, o, ws);
    losses.push_back(g.value.loss);
    Vec both(2 * (n + 1));
    both << g.drift, g.score;
    grads.push_back(both);
  }
  const MeanSe l = mean_se(losses);
  INFO("E[L] closed form " << expected << " Monte Carlo " << l.mean << " +- " << l.se);
  CHECK(std::abs(l.mean - expected) <= 4 * l.se);
  CHECK(l.se < 0.01 * std::abs(expected));
  for (int j = 0; j < 2 * (n + 1); ++j) {
    std::vector<double> comp;
    for (const auto& g : grads) comp.push_back(g(j));
    const MeanSe m = mean_se(comp);
    INFO("component " << j << " exact " << exact_grad(j) << " adjoint MC " << m.mean << " +- " << m.se);
    CHECK(std::abs(m.mean - exact_grad(j)) <= 4 * m.se + 1e-12);
  }
  // The gradient is not trivially small at this point, so the check has teeth.
  CHECK(exact_grad.norm() > 0.5);
}

TEST_CASE("DiffFlow with zero drift on 1-D Gaussian data: the exact score minimises the loss",
          "[diffflow]") {
  const double s0 = 0.7, g = 1.0;
  const int n = 6;
  const Grid grid = power_grid(n, 0.02, 1.0, 0.9, g);
  LinearDrift<double> drift([](double) { return 0.0; });
  // Closed forms (data at t_0): v_i = s0^2 + g^2 (t_i - t_0), r_i = v_i / v_{i+1};
  // min E[L] = log(2 pi)/2 + v_N/2 + sum_i (r_i - 1)/2.
  double expected = 0.5 * std::log(2 * std::numbers::pi);
  const auto vt = [&](int i) {
    return s0 * s0 + g * g * (grid.t[static_cast<std::size_t>(i)] - grid.t[0]);
  };
  expected += 0.5 * vt(n);
  for (int i = 0; i < n; ++i) expected += 0.5 * (vt(i) / vt(i + 1) - 1);

  // For fixed noise the batch loss is exactly quadratic in the score scale c: three values
  // give its minimiser c* and minimum.
  const int sub = 40, batch = 4000;
  std::vector<double> cstar, lmin, l_at_one;
  for (int s = 0; s < sub; ++s) {
    const Mat x0 = gaussian_batch(batch, 1, s0, 2000 + static_cast<std::uint64_t>(s));
    LossOptions o;
    o.seed = 900 + static_cast<std::uint64_t>(s);
    double l[3];
    for (int k = 0; k < 3; ++k) {
      ScaledScore score(s0, g, 0.5 * k + 0.5, grid.t[0]); // c = 0.5, 1, 1.5
      DiffFlow flow(drift, score);
      l[k] = flow.loss(grid, x0, o).loss;
    }
    const double curv = (l[2] - 2 * l[1] + l[0]) / (2 * 0.25); // L = A + B c + C c^2: C
    const double slope1 = (l[2] - l[0]) / (2 * 0.5);          // dL/dc at c = 1
    const double c_min = 1.0 - slope1 / (2 * curv);
    cstar.push_back(c_min);
    lmin.push_back(l[1] - slope1 * slope1 / (4 * curv));
    l_at_one.push_back(l[1]);
  }
  const MeanSe c = mean_se(cstar), m = mean_se(lmin), one = mean_se(l_at_one);
  INFO("c* = " << c.mean << " +- " << c.se << "; min loss " << m.mean << " +- " << m.se
               << "; closed form " << expected << "; loss at c = 1: " << one.mean);
  CHECK(std::abs(c.mean - 1.0) <= 4 * c.se);
  CHECK(c.se < 0.02);
  CHECK(std::abs(m.mean - expected) <= 4 * m.se + 1e-12);
  CHECK(std::abs(one.mean - expected) <= 4 * one.se);
}

TEST_CASE("PF-ODE likelihood in t: Gaussian data through an OU drift, exact trace", "[diffflow]") {
  Vec s(2);
  s << 0.6, 1.3;
  const double a = 0.8, g = 1.1, t0 = 0.01, t1 = 1.5;
  LinearDrift<double> drift([a](double) { return -a; });
  OuGaussianScore score(s, a, g);
  const ProbabilityFlow flow(drift, score, constant_diffusion(g));
  Mat x(4, 2);
  x << 0.1, -0.4, 1.0, 2.0, -0.7, 0.3, 0.0, -1.9;
  const auto log_normal_diag = [](const Mat& y, const Vec& v) {
    Vec out(y.rows());
    for (Eigen::Index b = 0; b < y.rows(); ++b) {
      out(b) = 0;
      for (Eigen::Index j = 0; j < y.cols(); ++j)
        out(b) += -0.5 * y(b, j) * y(b, j) / v(j) - 0.5 * std::log(2 * std::numbers::pi * v(j));
    }
    return out;
  };
  const auto prior = [&](const Mat& y) { return log_normal_diag(y, score.v(t1)); };
  const Vec expected = log_normal_diag(x, score.v(t0));
  double err_prev = 0;
  for (int steps : {10, 20, 40}) {
    std::vector<double> times;
    for (int i = 0; i <= steps; ++i) times.push_back(t0 + (t1 - t0) * i / steps);
    JacobianTrace trace;
    const auto r = log_likelihood_in_t(flow, trace, x, times, prior);
    const double err = (r.log_likelihood - expected).cwiseAbs().maxCoeff();
    INFO("steps " << steps << " max error " << err);
    if (steps == 40) CHECK(err <= 1e-7 * expected.cwiseAbs().maxCoeff());
    if (steps > 10) CHECK(err < err_prev / 10); // fourth order: 16x per halving
    err_prev = err;
    CHECK(trace.vjps() == 4 * steps * 2);
    // Rademacher probes are exact for a diagonal Jacobian (z_j^2 = 1).
    if (steps == 40) {
      HutchinsonTrace hutch({.probes = 1, .rademacher = true, .seed = 4});
      const auto h = log_likelihood_in_t(flow, hutch, x, times, prior);
      CHECK((h.log_likelihood - r.log_likelihood).cwiseAbs().maxCoeff() <= 1e-12);
    }
  }
}

TEST_CASE("Hutchinson trace is unbiased for a full Jacobian (Mlp probability flow)", "[diffflow]") {
  models::Mlp<double> drift(small_mlp(3, 1.0), 3), score(small_mlp(3, 1.0), 4);
  const ProbabilityFlow flow(drift, score, constant_diffusion(0.7));
  const Mat x = gaussian_batch(2, 3, 1.0, 6);
  JacobianTrace exact;
  Vec tr;
  exact(flow, x, 0.3, tr);
  // One probe per call, 400 independent seeds: mean within 4 standard errors.
  std::vector<double> est0, est1;
  for (int k = 0; k < 400; ++k) {
    HutchinsonTrace h({.probes = 1, .rademacher = false, .seed = static_cast<std::uint64_t>(k)});
    Vec e;
    h(flow, x, 0.3, e);
    est0.push_back(e(0));
    est1.push_back(e(1));
  }
  const MeanSe m0 = mean_se(est0), m1 = mean_se(est1);
  CHECK(std::abs(m0.mean - tr(0)) <= 4 * m0.se);
  CHECK(std::abs(m1.mean - tr(1)) <= 4 * m1.se);
}

TEST_CASE("Sampling: the lambda family with exact scores keeps the Gaussian marginal",
          "[diffflow]") {
  // Zero drift, data N(0, s0^2): the exact score -x / (s0^2 + g^2 t). From N(0, v_N), every
  // member of the family ends near N(0, s0^2 + g^2 t_0) (error O(dt)).
  const double s0 = 0.5, g = 1.0;
  const Grid grid = power_grid(400, 0.01, 1.0, 1.0, g);
  LinearDrift<double> drift([](double) { return 0.0; });
  ScaledScore score(s0, g, 1.0);
  const double v0 = s0 * s0 + g * g * grid.t.front(), vn = s0 * s0 + g * g * grid.t.back();
  for (double lam : {0.0, 0.5, 1.0}) {
    Mat x = gaussian_batch(20000, 1, std::sqrt(vn), 31);
    diffflow::SampleOptions o;
    o.stochasticity = lam;
    o.seed = 8;
    sample(drift, score, grid, x, o);
    const double var = x.squaredNorm() / static_cast<double>(x.size());
    INFO("lambda " << lam << " variance " << var << " expected " << v0);
    // MC: var of a sample variance ~ 2 v^2 / n -> se ~ 0.0026 at n = 20000.
    CHECK(std::abs(var - v0) <= 0.02);
  }
  // The ODE member maps N(0, v_N) samples deterministically: rescaling by sqrt(v_0 / v_N).
  Mat x(3, 1);
  x << -1.0, 0.2, 0.9;
  Mat y = x;
  diffflow::SampleOptions o;
  o.stochasticity = 0.0;
  sample(drift, score, grid, y, o);
  CHECK((y - x * std::sqrt(v0 / vn)).cwiseAbs().maxCoeff() <= 2e-3);
  // Reproducible.
  Mat p = x, q = x;
  o.stochasticity = 1.0;
  sample(drift, score, grid, p, o);
  sample(drift, score, grid, q, o);
  CHECK(p == q);
}

TEST_CASE("Power and random time grids", "[diffflow]") {
  const PowerTimeGrid timer(30, 0.001, 0.05, 0.9);
  const auto t = timer.fixed();
  REQUIRE(t.size() == 31);
  CHECK(t.front() == 0.001);
  CHECK(t.back() == 0.05);
  for (int i = 0; i <= 30; ++i)
    CHECK(std::abs(t[static_cast<std::size_t>(i)] -
                   std::pow(std::pow(0.001, 0.9) + i / 30.0 * (std::pow(0.05, 0.9) - std::pow(0.001, 0.9)), 1 / 0.9)) <= 1e-15);
  // e < 1: steps grow toward the noise end (the reference code's behaviour).
  CHECK(t[30] - t[29] > t[1] - t[0]);
  const auto r1 = timer.random(5, 0), r2 = timer.random(5, 0), r3 = timer.random(5, 1);
  CHECK(r1 == r2);
  CHECK(r1 != r3);
  const double a = std::pow(0.001, 0.9), b = std::pow(0.05, 0.9), cell = (b - a) / 29;
  for (int i = 1; i < 30; ++i) {
    const double u = std::pow(r1[static_cast<std::size_t>(i)], 0.9);
    CHECK(u >= a + (i - 1) * cell - 1e-15);
    CHECK(u <= a + i * cell + 1e-15);
    CHECK(r1[static_cast<std::size_t>(i)] > r1[static_cast<std::size_t>(i) - 1]);
  }
  CHECK_THROWS_WITH(PowerTimeGrid(0, 0.0, 1.0, 1.0), Catch::Contains("steps"));
  CHECK_THROWS_WITH(PowerTimeGrid(3, 0.5, 0.1, 1.0), Catch::Contains("t_end"));
  Grid bad{{0.0, 0.2, 0.1}, {1, 1, 1}};
  CHECK_THROWS_WITH(bad.validate("here"), Catch::Contains("grid.t"));
}

TEST_CASE("DiffFlow training is seeded, reproducible, stoppable, and lowers the loss", "[diffflow]") {
  const PowerTimeGrid timer(6, 0.001, 0.05, 0.9);
  const auto data = [](int batch, std::uint64_t seed, std::uint64_t draw, Mat& out) {
    draw_toy(ToyOptions{}, batch, seed, draw, out);
  };
  const auto make = [] {
    models::MlpConfig c = small_mlp(2, 20.0);
    c.hidden = {16, 16};
    c.activation = models::Activation::silu;
    return c;
  };
  TrainOptions o;
  o.iterations = 60;
  o.batch = 64;
  o.lr_drift = o.lr_score = 1e-2;
  o.seed = 4;
  std::vector<double> first, second;
  models::Mlp<double> f1(make(), 1), s1(make(), 2), f2(make(), 1), s2(make(), 2);
  train(f1, s1, timer, constant_diffusion(0.2), data, o, [&](const TrainProgress& p) {
    first.push_back(p.loss);
    return true;
  });
  train(f2, s2, timer, constant_diffusion(0.2), data, o, [&](const TrainProgress& p) {
    second.push_back(p.loss);
    return true;
  });
  CHECK(first == second);
  CHECK(f1.params() == f2.params());
  double head = 0, tail = 0;
  for (int i = 0; i < 10; ++i) {
    head += first[static_cast<std::size_t>(i)];
    tail += first[first.size() - 1 - static_cast<std::size_t>(i)];
  }
  CHECK(tail < head);
  models::Mlp<double> f3(make(), 1), s3(make(), 2);
  const auto r = train(f3, s3, timer, constant_diffusion(0.2), data, o,
                       [](const TrainProgress& p) { return p.iteration < 4; });
  CHECK(r.stopped);
  CHECK(r.iterations == 5);
}
