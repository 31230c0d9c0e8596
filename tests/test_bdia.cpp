// BDIA-DDIM: coefficients, first steps against hand-computed DDIM, gamma = 0 is DDIM, exact
// round trip (float64 and float32), the amplification diagnostic, round-trip editing, errors,
// and the reversible gradient with gamma < 1 against a closed form and finite differences.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/edit.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "gaussian_data_fd.hpp"
#include "inversion_test_model.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::MixtureModel;
using diffgrad::testing::relative_error;
using diffgrad::testing::test_batch;

namespace {

template <class Scalar> using St = typename EigenBackend<Scalar>::state_type;

std::vector<Node> grid(const VPLinearSchedule& s, int n) {
  return make_nodes(s, uniform_t_grid(s, n, 1.0, 1e-3));
}

/// A data sample to invert: plain DDIM from a fixed noise batch, so x0 looks like model output.
template <class Scalar>
St<Scalar> data_sample(const VPLinearSchedule& s, const std::vector<Node>& nodes,
                       MixtureModel<Scalar>& model) {
  auto x = test_batch<Scalar>(4, 3);
  sample(Ddim(), EigenBackend<Scalar>(), s, nodes, model, x);
  return x;
}

template <class Method> double order_on_gaussian(const Method& m, std::vector<int> steps) {
  const VPLinearSchedule s;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  const auto x_T = test_batch<double>(4, 3);
  std::vector<double> errors;
  for (int n : steps) {
    const auto nodes = grid(s, n);
    auto x = x_T;
    sample_from_noise(m, EigenBackend<double>(), s, nodes, model, x);
    errors.push_back(relative_error<double>(x, model.exact_flow(x_T, nodes.front(), nodes.back())));
  }
  return diffgrad::testing::fitted_order(steps, errors);
}

/// Counts model calls (to show that `refuse` happens before any work).
struct CountingModel {
  MixtureModel<double>& inner;
  int calls = 0;
  void eps(const St<double>& x, const Node& n, St<double>& out) {
    ++calls;
    inner.eps(x, n, out);
  }
};

struct NanModel {
  void eps(const St<double>& x, const Node&, St<double>& out) const {
    out = St<double>::Constant(x.rows(), x.cols(), std::numeric_limits<double>::quiet_NaN());
  }
};

/// docs/math.md exact problem 3: equal-weight Dirac mixture in d = 3 (models/dirac_mixture.hpp).
template <class Scalar> models::DiracMixture<Scalar> dirac() {
  Eigen::MatrixXd points(4, 3);
  points << 1.0, -0.5, 0.3, -0.8, 0.6, -0.2, 0.1, 0.9, 1.1, -0.6, -0.9, 0.4;
  return models::DiracMixture<Scalar>(points.cast<Scalar>());
}

/// Round trip x0 -> latent -> x0 on the Dirac mixture, x0 a DDIM sample of it.
template <class Scalar, class Method> double dirac_round_trip(const Method& method, int n) {
  const VPLinearSchedule s;
  const auto nodes = grid(s, n);
  auto model = dirac<Scalar>();
  const EigenBackend<Scalar> backend;
  auto x0 = test_batch<Scalar>(4, 3);
  sample(Ddim(), backend, s, nodes, model, x0);
  LatentPair<St<Scalar>> latent;
  invert(method, backend, s, nodes, model, x0, latent);
  St<Scalar> back;
  generate(method, backend, s, nodes, model, latent, back);
  return relative_error<Scalar>(back, x0);
}
} // namespace

TEST_CASE("BDIA coefficients match the reference formulas", "[bdia][coeffs]") {
  const VPLinearSchedule s;
  for (double t : {0.9, 0.5, 0.05}) {
    const Node prev = s.node(t + 0.02), cur = s.node(t), next = s.node(t - 0.02);
    for (double gamma : {0.0, 0.5, 0.93, 1.0}) {
      const auto c = coeffs::bdia(prev, cur, next, gamma);
      // docs/math.md in the paper's indexing: i+1 = prev (noisier), i = cur, i-1 = next.
      const double cz = (next.alpha - gamma * prev.alpha) / cur.alpha;
      const double ce = (next.sigma - gamma * prev.sigma) - cur.sigma * cz;
      CHECK(c.prev == gamma);
      CHECK(c.x == Approx(cz).epsilon(1e-14));
      CHECK(c.eps == Approx(ce).margin(1e-14));
    }
  }
}

TEST_CASE("BDIA with gamma = 0 is DDIM to rounding", "[bdia]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto model = MixtureModel<double>::standard();
  const EigenBackend<double> backend;
  auto x_bdia = test_batch<double>(4, 3);
  auto x_ddim = x_bdia;
  sample_from_noise(BdiaDdim(0.0), backend, s, nodes, model, x_bdia);
  sample(Ddim(), backend, s, nodes, model, x_ddim);
  const double err = relative_error<double>(x_bdia, x_ddim);
  INFO("BDIA(gamma=0) vs DDIM relative difference " << err);
  CHECK(err <= 1e-15);
}

TEST_CASE("BDIA sampling: first step is plain DDIM, second is the BDIA update (by hand)",
          "[bdia][first-step]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 10);
  auto model = MixtureModel<double>::standard();
  const double gamma = 0.7;
  const auto x_T = test_batch<double>(4, 3);
  std::vector<St<double>> states;
  auto x = x_T;
  sample_from_noise(BdiaDdim(gamma), EigenBackend<double>(), s, nodes, model, x, {},
                    [&](int, int, const Node&, const St<double>& st) { states.push_back(st); });
  REQUIRE(states.size() == 10);
  const Node &n0 = nodes[0], &n1 = nodes[1], &n2 = nodes[2];
  St<double> e0, e1;
  model.eps(x_T, n0, e0);
  // x_1 = (alpha_1/alpha_0) x_0 + (sigma_1 - alpha_1 sigma_0/alpha_0) eps(x_0)
  const St<double> x1 =
      (n1.alpha / n0.alpha) * x_T + (n1.sigma - n1.alpha * n0.sigma / n0.alpha) * e0;
  CHECK(relative_error<double>(states[0], x1) <= 1e-14);
  // x_2 = gamma x_0 + cz x_1 + ce eps(x_1) with the reference cz, ce
  model.eps(x1, n1, e1);
  const double cz = (n2.alpha - gamma * n0.alpha) / n1.alpha;
  const double ce = (n2.sigma - gamma * n0.sigma) - n1.sigma * cz;
  const St<double> x2 = gamma * x_T + cz * x1 + ce * e1;
  CHECK(relative_error<double>(states[1], x2) <= 1e-13);
  CHECK(relative_error<double>(states.back(), x) == 0.0);
}

TEST_CASE("BDIA inversion: first step z_1 is the hand-computed DDIM inversion step",
          "[bdia][first-step]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 10);
  auto model = MixtureModel<double>::standard();
  const auto x0 = data_sample(s, nodes, model);
  std::vector<St<double>> states;
  std::vector<double> times;
  LatentPair<St<double>> latent;
  const auto rep = invert(BdiaDdim(1.0), EigenBackend<double>(), s, nodes, model, x0, latent, {},
                          [&](int, int, const Node& n, const St<double>& st) {
                            states.push_back(st);
                            times.push_back(n.t);
                          });
  REQUIRE(states.size() == 10);
  CHECK(rep.model_evals == 10);
  CHECK(rep.steps_taken == 10);
  const Node& nN = nodes[10];
  const Node& nM = nodes[9];
  St<double> e;
  model.eps(x0, nN, e);
  const St<double> z1 =
      (nM.alpha / nN.alpha) * x0 + (nM.sigma - nM.alpha * nN.sigma / nN.alpha) * e;
  CHECK(times[0] == nM.t);
  CHECK(relative_error<double>(states[0], z1) <= 1e-14);
  // The last two states reported are the latent pair (z_N, z_{N-1}) = (nodes[0], nodes[1]).
  CHECK(times.back() == nodes[0].t);
  CHECK(relative_error<double>(states.back(), latent.first) == 0.0);
  CHECK(relative_error<double>(states[states.size() - 2], latent.second) == 0.0);
}

TEST_CASE("BDIA gamma = 1 round trip is exact to rounding (N = 50, float64)",
          "[bdia][round-trip]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto model = MixtureModel<double>::standard();
  const EigenBackend<double> backend;
  const auto x0 = data_sample(s, nodes, model);
  for (double gamma : {1.0, 0.95}) {
    LatentPair<St<double>> latent;
    const auto rep = invert(BdiaDdim(gamma), backend, s, nodes, model, x0, latent);
    St<double> back;
    const auto gen = generate(BdiaDdim(gamma), backend, s, nodes, model, latent, back);
    const double err = relative_error<double>(back, x0);
    INFO("gamma " << gamma << " round-trip relative error " << err);
    CHECK(err <= (gamma == 1.0 ? 1e-13 : 1e-12));
    CHECK(rep.model_evals == 50);
    CHECK(gen.model_evals == 49); // the latent already holds z_{N-1}
    CHECK_FALSE(rep.amplification.exceeded);
  }
}

TEST_CASE("BDIA gamma = 1 round trip in float32 (N = 50)", "[bdia][round-trip][float32]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto model = MixtureModel<float>::standard();
  const EigenBackend<float> backend;
  const auto x0 = data_sample(s, nodes, model);
  LatentPair<St<float>> latent;
  invert(BdiaDdim(1.0), backend, s, nodes, model, x0, latent);
  St<float> back;
  generate(BdiaDdim(1.0), backend, s, nodes, model, latent, back);
  const double err = relative_error<float>(back, x0);
  INFO("float32 round-trip relative error " << err);
  CHECK(err <= 1e-5);
}

TEST_CASE("BDIA round trip on the Dirac mixture (N = 50)", "[bdia][round-trip][dirac]") {
  // float32 tolerance: near the data end the Dirac mixture's flow contracts by up to
  // sigma_max/sigma_min ~ 95 on this grid, and the mode an inversion rounds into grows by that
  // ratio on the way back, so float32 round trips sit at ~100 u ~ 1e-5 (measured 2e-6 to 2e-5
  // over batches/point scales). The smooth mixture above meets 1e-5 with a wide margin.
  for (const auto& [name, method] : std::vector<std::pair<const char*, BdiaDdim>>{
           {"gamma 1", BdiaDdim(1.0)}, {"gamma 0.95", BdiaDdim(0.95)}}) {
    const double e64 = dirac_round_trip<double>(method, 50);
    const double e32 = dirac_round_trip<float>(method, 50);
    INFO(name << ": float64 " << e64 << ", float32 " << e32);
    CHECK(e64 <= 1e-13);
    CHECK(e32 <= 5e-5);
  }
}

TEST_CASE("BDIA amplification diagnostic: gamma = 0.5, N = 50 warns or refuses",
          "[bdia][amplification]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto inner = MixtureModel<double>::standard();
  const auto x0 = data_sample(s, nodes, inner);
  const EigenBackend<double> backend;

  const auto rep = BdiaDdim(0.5).amplification(50);
  CHECK(rep.per_step == 2.0);
  CHECK(rep.steps == 49);
  CHECK(rep.total == Approx(std::pow(2.0, 49)).epsilon(1e-12));
  CHECK(rep.total > 1e6);
  CHECK(rep.exceeded);
  CHECK(rep.log10_total() == Approx(49 * std::log10(2.0)));
  CHECK(BdiaDdim(1.0).amplification(50).total == 1.0);

  SECTION("warn: flag and callback, the inversion still runs") {
    int callbacks = 0;
    InversionOptions opt;
    opt.amplification.on_warning = [&](const AmplificationReport& r) {
      ++callbacks;
      CHECK(r.total > 1e6);
    };
    LatentPair<St<double>> latent;
    const auto inv = invert(BdiaDdim(0.5), backend, s, nodes, inner, x0, latent, opt);
    CHECK(inv.amplification.warned);
    CHECK(callbacks == 1);
    CHECK(inv.model_evals == 50);
  }
  SECTION("refuse: numerical_error before any model call") {
    CountingModel model{inner};
    InversionOptions opt;
    opt.amplification.policy = AmplificationPolicy::refuse;
    LatentPair<St<double>> latent;
    CHECK_THROWS_AS(invert(BdiaDdim(0.5), backend, s, nodes, model, x0, latent, opt),
                    diffgrad::numerical_error);
    CHECK_THROWS_WITH(invert(BdiaDdim(0.5), backend, s, nodes, model, x0, latent, opt),
                      Catch::Contains("amplification") && Catch::Contains("threshold"));
    CHECK(model.calls == 0);
  }
  SECTION("ignore, or a higher threshold: no flag") {
    InversionOptions opt;
    opt.amplification.policy = AmplificationPolicy::ignore;
    LatentPair<St<double>> latent;
    CHECK_FALSE(
        invert(BdiaDdim(0.5), backend, s, nodes, inner, x0, latent, opt).amplification.warned);
    InversionOptions high;
    high.amplification.threshold = 1e16;
    const auto r = invert(BdiaDdim(0.5), backend, s, nodes, inner, x0, latent, high);
    CHECK_FALSE(r.amplification.exceeded);
    CHECK_FALSE(r.amplification.warned);
  }
}

TEST_CASE("Round-trip editing: invert under one conditioning, regenerate under another",
          "[bdia][edit]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto source = MixtureModel<double>::standard();
  auto target = source;
  target.cond() << -0.4, 0.3, 0.2; // the "changed prompt": a shifted mixture
  const EigenBackend<double> backend;
  const auto x0 = data_sample(s, nodes, source);
  St<double> edited;
  const auto r =
      invert_and_regenerate(BdiaDdim(1.0), backend, s, nodes, source, target, x0, edited);
  INFO("round trip " << r.round_trip_error << ", edit change " << r.edit_change);
  CHECK(r.round_trip_error <= 1e-13);
  CHECK(r.edit_change > 0.05);
  CHECK(r.model_evals == 50 + 49 + 49);
  // The edit is generate() under the target from the same latent.
  St<double> again;
  generate(BdiaDdim(1.0), backend, s, nodes, target, r.latent, again);
  CHECK(relative_error<double>(edited, again) == 0.0);
  // Without the round-trip check: fewer model calls, NaN error.
  EditOptions opt;
  opt.measure_round_trip = false;
  const auto r2 =
      invert_and_regenerate(BdiaDdim(1.0), backend, s, nodes, source, target, x0, edited, opt);
  CHECK(std::isnan(r2.round_trip_error));
  CHECK(r2.model_evals == 50 + 49);
}

TEST_CASE("BDIA convergence order on Gaussian data: 2 at gamma = 1, 1 below", "[bdia][order]") {
  // gamma = 1 is a leapfrog-type two-step rule (second order; its DDIM starting step has an
  // O(h^2) local error, which stays O(h^2) globally); gamma < 1 mixes in (1 - gamma) of the
  // first-order DDIM increment. The gamma = 1 asymptotic regime starts late on this grid
  // (uniform t, large lambda steps near t_min), hence the larger N.
  const double o1 = order_on_gaussian(BdiaDdim(1.0), {640, 1280, 2560, 5120, 10240});
  const double o05 = order_on_gaussian(BdiaDdim(0.5), {20, 40, 80, 160, 320});
  INFO("gamma 1: order " << o1 << ", gamma 0.5: order " << o05);
  CHECK(o1 == Approx(2.0).margin(0.2));
  CHECK(o05 == Approx(1.0).margin(0.2));
}

TEST_CASE("BDIA rejects bad input", "[bdia][errors]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 10);
  auto model = MixtureModel<double>::standard();
  const EigenBackend<double> backend;
  const auto x0 = test_batch<double>(2, 3);
  LatentPair<St<double>> latent;
  CHECK_THROWS_WITH(BdiaDdim(-0.1), Catch::Contains("gamma") && Catch::Contains("0 <= gamma <= 1"));
  CHECK_THROWS_AS(BdiaDdim(1.5), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(invert(BdiaDdim(0.0), backend, s, nodes, model, x0, latent),
                    Catch::Contains("gamma > 0"));
  std::vector<Node> reversed(nodes.rbegin(), nodes.rend());
  CHECK_THROWS_WITH(invert(BdiaDdim(), backend, s, reversed, model, x0, latent),
                    Catch::Contains("nodes") && Catch::Contains("increasing lambda"));
  InversionOptions bad;
  bad.amplification.threshold = 0.5;
  CHECK_THROWS_WITH(invert(BdiaDdim(), backend, s, nodes, model, x0, latent, bad),
                    Catch::Contains("amplification.threshold"));
  LatentPair<St<double>> mismatched{test_batch<double>(2, 3), test_batch<double>(3, 3)};
  St<double> out;
  CHECK_THROWS_WITH(generate(BdiaDdim(), backend, s, nodes, model, mismatched, out),
                    Catch::Contains("latent.second") && Catch::Contains("2 x 3"));
  NanModel nan_model;
  auto x = x0;
  CHECK_THROWS_AS(sample_from_noise(BdiaDdim(), backend, s, nodes, nan_model, x),
                  diffgrad::numerical_error);
}

TEST_CASE("BDIA with gamma < 1: reversible gradient = closed form = central finite differences",
          "[bdia][gradient]") {
  // On Gaussian data eps(x) = sigma (x - alpha mu) / v (v = alpha^2 s^2 + sigma^2) is affine in
  // x, so BDIA is a linear two-term recursion (coefficients written out from the paper's
  // definition, not taken from the library):
  //   x_1     = a_0 x_0 + b_0 eps_0                                  (the DDIM first step)
  //   x_{k+1} = gamma x_{k-1} + cz_k x_k + ce_k eps_k,
  //   cz_k = (alpha_{k+1} - gamma alpha_{k-1}) / alpha_k,
  //   ce_k = (sigma_{k+1} - gamma sigma_{k-1}) - sigma_k cz_k.
  // Tangents of x_N along x_T, mu and s follow by the same recursion (forward mode); the
  // reversible (reverse-mode, reconstructing) gradient must match them, and central finite
  // differences of the sampler itself.
  using StateD = St<double>;
  const VPLinearSchedule s;
  const EigenBackend<double> backend;
  const auto nodes = grid(s, 12);
  const auto x_T = test_batch<double>(3, 2);
  const StateD w = test_batch<double>(3, 2) * 0.7, r = test_batch<double>(3, 2).reverse() * 0.4;
  auto loss = [&](const StateD& x0) {
    return w.cwiseProduct(x0).sum() + 0.5 * (x0 - r).squaredNorm();
  };
  for (double gamma : {0.9, 0.6}) {
    INFO("gamma " << gamma);
    auto model = diffgrad::testing::gaussian_problem<double>(2);
    const auto g = reversible_gradient(BdiaDdim(gamma), backend, s, nodes, model, x_T,
                                       [&](const StateD& x0, StateD& out) { out = w + x0 - r; });

    // Closed form: values, and tangents along x_T (a scalar factor), mu_j (a scalar factor on
    // column j) and s (per element), carried for the two latest states.
    const double sd = model.s();
    const Eigen::RowVectorXd mu = model.mu().transpose();
    const int N = static_cast<int>(nodes.size()) - 1;
    auto v_of = [&](const Node& n) { return n.alpha * n.alpha * sd * sd + n.sigma * n.sigma; };
    // One update x_next = p x_prev + c x_cur + e eps(x_cur) with its tangents.
    struct Tangent {
      StateD x, ds;
      double dxT, dmu;
    };
    auto step = [&](const Tangent& prev, const Tangent& cur, const Node& n, double p, double c,
                    double e) {
      const double v = v_of(n), k = e * n.sigma / v; // d(e eps)/dx = k
      const StateD centred = cur.x.rowwise() - n.alpha * mu;
      Tangent next;
      next.x = p * prev.x + c * cur.x + k * centred;
      next.dxT = p * prev.dxT + (c + k) * cur.dxT;
      next.dmu = p * prev.dmu + (c + k) * cur.dmu - k * n.alpha;
      next.ds = p * prev.ds + (c + k) * cur.ds -
                (e * n.sigma * 2.0 * n.alpha * n.alpha * sd / (v * v)) * centred;
      return next;
    };
    const StateD zero = StateD::Zero(3, 2);
    Tangent prev{zero, zero, 0.0, 0.0}, cur{x_T, zero, 1.0, 0.0};
    {
      const Node &n0 = nodes[0], &n1 = nodes[1];
      cur =
          step(prev, cur, n0, 0.0, n1.alpha / n0.alpha, n1.sigma - n1.alpha * n0.sigma / n0.alpha);
      prev = Tangent{x_T, zero, 1.0, 0.0};
    }
    for (int k = 1; k < N; ++k) {
      const Node &np = nodes[k - 1], &nk = nodes[k], &nn = nodes[k + 1];
      const double cz = (nn.alpha - gamma * np.alpha) / nk.alpha;
      const double ce = (nn.sigma - gamma * np.sigma) - nk.sigma * cz;
      Tangent next = step(prev, cur, nk, gamma, cz, ce);
      prev = std::move(cur);
      cur = std::move(next);
    }
    const StateD g0 = w + cur.x - r; // dL/dx_0
    INFO("reconstruction error " << g.reconstruction_error);
    CHECK(relative_error<double>(g.sample, cur.x) <= 1e-12);
    CHECK(relative_error<double>(g.grad_x, StateD(cur.dxT * g0)) <= 1e-10);
    const Eigen::VectorXd grad_mu = cur.dmu * g0.colwise().sum().transpose();
    CHECK((g.grad_cond - grad_mu).norm() <= 1e-10 * grad_mu.norm());
    CHECK(g.grad_params(0) == Approx(g0.cwiseProduct(cur.ds).sum()).epsilon(1e-10));

    // Central finite differences of the sampler, step 1e-5.
    const double h = 1e-5;
    auto L = [&](const StateD& x_start, models::GaussianData<double>& m) {
      StateD y = x_start;
      sample_from_noise(BdiaDdim(gamma), backend, s, nodes, m, y);
      return loss(y);
    };
    diffgrad::testing::check_gaussian_data_gradient_fd(
        L, x_T, model, {g.grad_x, g.grad_cond, g.grad_params(0)}, h);
  }
}
