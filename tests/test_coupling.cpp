// Reversible (McCallum-Foster) coupling: one step by hand, exact round trip for DDIM and
// DPM-Solver(++)-2/3 singlestep (float64, float32), the base scheme's convergence order,
// model-call counts, amplification 1/c, and rejected schemes/parameters.
#include <catch2/catch.hpp>

#include <cmath>
#include <utility>
#include <vector>

#include "diffgrad/inversion/coupling.hpp"
#include "diffgrad/inversion/edit.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "inversion_test_model.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::fitted_order;
using diffgrad::testing::MixtureModel;
using diffgrad::testing::relative_error;
using diffgrad::testing::test_batch;

namespace {
template <class Scalar> using St = typename EigenBackend<Scalar>::state_type;

std::vector<Node> grid(const VPLinearSchedule& s, int n) {
  return make_nodes(s, uniform_t_grid(s, n, 1.0, 1e-3));
}
template <class Scalar>
St<Scalar> data_sample(const VPLinearSchedule& s, const std::vector<Node>& nodes,
                       MixtureModel<Scalar>& model) {
  auto x = test_batch<Scalar>(4, 3);
  sample(Ddim(), EigenBackend<Scalar>(), s, nodes, model, x);
  return x;
}

template <class Method>
double round_trip_error(const Method& m, int n, int* inv_evals = nullptr,
                        int* gen_evals = nullptr) {
  const VPLinearSchedule s;
  const auto nodes = grid(s, n);
  auto model = MixtureModel<double>::standard();
  const EigenBackend<double> backend;
  const auto x0 = data_sample(s, nodes, model);
  LatentPair<St<double>> latent;
  const auto inv = invert(m, backend, s, nodes, model, x0, latent);
  St<double> back;
  const auto gen = generate(m, backend, s, nodes, model, latent, back);
  if (inv_evals) *inv_evals = inv.model_evals;
  if (gen_evals) *gen_evals = gen.model_evals;
  return relative_error<double>(back, x0);
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
  INFO("errors " << errors.front() << " ... " << errors.back());
  return fitted_order(steps, errors);
}

/// A scheme that reads history: the coupling must refuse it.
struct TwoStepScheme {
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "TwoStepScheme"); }
  StepPlan plan(std::span<const Node>, int, NodeAtLambda) const { return {}; }
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

TEST_CASE("Coupling steps follow y' = c(y - z) + Phi(z), z' = z + y' - Phi^-1(y') (by hand)",
          "[coupling]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 20);
  auto model = MixtureModel<double>::standard();
  const double c = 0.9;
  const auto x_T = test_batch<double>(3, 3);
  std::vector<St<double>> ys;
  auto x = x_T;
  sample_from_noise(ReversibleCoupling(Ddim(), c), EigenBackend<double>(), s, nodes, model, x, {},
                    [&](int, int, const Node&, const St<double>& st) { ys.push_back(st); });
  REQUIRE(ys.size() == 20);
  St<double> y = x_T, z = x_T, e;
  for (int k = 0; k < 2; ++k) { // the second step has y != z
    const Node &ns = nodes[k], &nt = nodes[k + 1];
    model.eps(z, ns, e);
    const St<double> phi =
        (nt.alpha / ns.alpha) * z + (nt.sigma - nt.alpha * ns.sigma / ns.alpha) * e;
    y = c * y + (1 - c) * z + (phi - z);
    model.eps(y, nt, e);
    const St<double> back =
        (ns.alpha / nt.alpha) * y + (ns.sigma - ns.alpha * nt.sigma / nt.alpha) * e;
    z = z - (back - y);
    INFO("step " << k << " error " << relative_error<double>(ys[k], y));
    CHECK(relative_error<double>(ys[k], y) <= 1e-14);
  }
}

TEST_CASE("Coupled DDIM round trip is exact to rounding (N = 50, float64)",
          "[coupling][round-trip]") {
  for (double c : {0.999, 0.9}) {
    int inv = 0, gen = 0;
    const double err = round_trip_error(ReversibleCoupling(Ddim(), c), 50, &inv, &gen);
    INFO("c " << c << " round-trip relative error " << err);
    CHECK(err <= 1e-13);
    CHECK(inv == 100); // Phi_{s->t} and Phi_{t->s}: 2 model calls per step
    CHECK(gen == 100);
  }
}

TEST_CASE("Coupled DPM-Solver(++) singlestep round trip is exact to rounding (N = 50)",
          "[coupling][round-trip][dpm-solver]") {
  for (int order : {2, 3}) {
    for (auto pred : {SolverPrediction::noise, SolverPrediction::data}) {
      int inv = 0, gen = 0;
      const double err = round_trip_error(
          ReversibleCoupling(DpmSolverSinglestep(order, pred), 0.999), 50, &inv, &gen);
      INFO("order " << order << " data " << (pred == SolverPrediction::data) << " error " << err);
      CHECK(err <= 1e-13);
      CHECK(inv == 2 * order * 50);
      CHECK(gen == 2 * order * 50);
    }
  }
}

TEST_CASE("Coupled DDIM round trip in float32 (N = 50)", "[coupling][round-trip][float32]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto model = MixtureModel<float>::standard();
  const EigenBackend<float> backend;
  const auto x0 = data_sample(s, nodes, model);
  LatentPair<St<float>> latent;
  const ReversibleCoupling method(Ddim(), 0.999);
  invert(method, backend, s, nodes, model, x0, latent);
  St<float> back;
  generate(method, backend, s, nodes, model, latent, back);
  const double err = relative_error<float>(back, x0);
  INFO("float32 round-trip relative error " << err);
  CHECK(err <= 1e-5);
}

TEST_CASE("Coupled DDIM round trip on the Dirac mixture (N = 50)",
          "[coupling][round-trip][dirac]") {
  // float32 tolerance: near the data end the Dirac mixture's flow contracts by up to
  // sigma_max/sigma_min ~ 95 on this grid, and the mode an inversion rounds into grows by that
  // ratio on the way back, so float32 round trips sit at ~100 u ~ 1e-5 (measured 2e-6 to 2e-5
  // over batches/point scales). The smooth mixture above meets 1e-5 with a wide margin.
  for (const auto& [name, method] : std::vector<std::pair<const char*, ReversibleCoupling<Ddim>>>{
           {"c 0.999", ReversibleCoupling(Ddim(), 0.999)},
           {"c 0.9", ReversibleCoupling(Ddim(), 0.9)}}) {
    const double e64 = dirac_round_trip<double>(method, 50);
    const double e32 = dirac_round_trip<float>(method, 50);
    INFO(name << ": float64 " << e64 << ", float32 " << e32);
    CHECK(e64 <= 1e-13);
    CHECK(e32 <= 5e-5);
  }
}

TEST_CASE("The coupling keeps the base scheme's order on Gaussian data", "[coupling][order]") {
  const double ddim = order_on_gaussian(ReversibleCoupling(Ddim(), 0.999), {20, 40, 80, 160, 320});
  INFO("coupled DDIM order " << ddim);
  CHECK(ddim == Approx(1.0).margin(0.2));
  const double dpm2 =
      order_on_gaussian(ReversibleCoupling(DpmSolverSinglestep(2, SolverPrediction::noise), 0.999),
                        {20, 40, 80, 160, 320});
  INFO("coupled DPM-Solver-2 order " << dpm2);
  CHECK(dpm2 == Approx(2.0).margin(0.2));
}

TEST_CASE("Coupling amplification is 1/c per step", "[coupling][amplification]") {
  const auto r = ReversibleCoupling(Ddim(), 0.999).amplification(50);
  CHECK(r.per_step == Approx(1.0 / 0.999));
  CHECK(r.steps == 50);
  CHECK(r.total == Approx(std::pow(0.999, -50)).epsilon(1e-12));
  CHECK_FALSE(r.exceeded);
  const auto bad = ReversibleCoupling(Ddim(), 0.7).amplification(50);
  CHECK(bad.total > 1e6);
  CHECK(bad.exceeded);
}

TEST_CASE("Coupled editing through the generic edit API", "[coupling][edit]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto source = MixtureModel<double>::standard();
  auto target = source;
  target.cond() << 0.3, 0.3, -0.3;
  const auto x0 = data_sample(s, nodes, source);
  St<double> edited;
  const auto r = invert_and_regenerate(ReversibleCoupling(Ddim(), 0.999), EigenBackend<double>(), s,
                                       nodes, source, target, x0, edited);
  CHECK(r.round_trip_error <= 1e-13);
  CHECK(r.edit_change > 0.05);
}

TEST_CASE("ReversibleCoupling rejects bad parameters and schemes", "[coupling][errors]") {
  CHECK_THROWS_WITH(ReversibleCoupling(Ddim(), 0.0),
                    Catch::Contains("'c'") && Catch::Contains("0 < c <= 1"));
  CHECK_THROWS_AS(ReversibleCoupling(Ddim(), 1.5), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(ReversibleCoupling(Ddim(0.5), 0.999),
                    Catch::Contains("scheme") && Catch::Contains("deterministic"));
  CHECK_THROWS_WITH(ReversibleCoupling(TwoStepScheme{}, 0.999),
                    Catch::Contains("scheme") && Catch::Contains("history() == 0"));
}
