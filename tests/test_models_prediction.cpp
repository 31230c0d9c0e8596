// Prediction-type adapters (eps, x0, v, score) and diffusers' thresholding as eps adapters:
// formulas, round trips, exact VJPs, torch/diffusers reference values, bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/models/thresholding.hpp"
#include "fd_check.hpp"
#include "test_support.hpp"

// Every member compiles (and is warning-free) in float and double.
template class diffgrad::models::SampleThreshold<float>;
template class diffgrad::models::SampleThreshold<double>;
template class diffgrad::models::EpsFromPrediction<diffgrad::models::Mlp<float>&>;
template class diffgrad::models::PredictionFromEps<diffgrad::models::DiracMixture<double>&>;
template class diffgrad::models::ThresholdedEps<diffgrad::models::Mlp<float>&>;
template class diffgrad::models::ThresholdedEps<diffgrad::models::DiracMixture<double>&>;

using namespace diffgrad;
using diffgrad::testing::State;
using models::PredictionType;

namespace {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

Node make_node(double alpha, double sigma) {
  return Node{0.5, alpha, sigma, std::log(alpha / sigma), 0.37};
}

constexpr PredictionType kAllTypes[] = {PredictionType::eps, PredictionType::x0, PredictionType::v,
                                        PredictionType::score};

template <class Scalar> models::DiracMixture<Scalar> reference_mixture() {
  State<Scalar> y(4, 3);
  y << Scalar(0.9), Scalar(-0.4), Scalar(0.2), Scalar(-0.7), Scalar(0.5), Scalar(1.1), Scalar(0.1),
      Scalar(-1.3), Scalar(0.6), Scalar(1.4), Scalar(0.8), Scalar(-0.9);
  models::DiracMixture<Scalar> m(y);
  m.cond() << Scalar(0.2), Scalar(-0.1), Scalar(0.0), Scalar(0.3);
  return m;
}

void require_vjp_ok(const diffgrad::testing::ModelVjpChecks& c, double dot_bar = 1e-11) {
  INFO("x: fd " << c.x.fd_error << " dot " << c.x.dot_product_error);
  INFO("cond: fd " << c.cond.fd_error << " dot " << c.cond.dot_product_error);
  INFO("params: fd " << c.params.fd_error << " dot " << c.params.dot_product_error);
  CHECK(c.x.fd_error < 1e-7);
  CHECK(c.params.fd_error < 1e-7);
  CHECK(c.cond.fd_error < 1e-7);
  CHECK(c.x.dot_product_error < dot_bar);
  CHECK(c.cond.dot_product_error < dot_bar);
  CHECK(c.params.dot_product_error < dot_bar);
}

} // namespace

// ---------------------------------------------------------------- prediction adapters

TEST_CASE("as_prediction writes x0, v, score by their definitions", "[models][prediction]") {
  auto model = reference_mixture<double>();
  const auto x = diffgrad::testing::test_batch<double>(3, 3);
  for (const Node n : {make_node(0.8, 0.6), make_node(0.7, 1.3), make_node(1.0, 5.0)}) {
    Mat eps;
    model.eps(x, n, eps);
    const Mat x0 = (x - n.sigma * eps) / n.alpha;
    Mat got;
    models::as_prediction<PredictionType::x0>(model).eps(x, n, got);
    CHECK((got - x0).norm() < 1e-14 * x0.norm());
    models::as_prediction<PredictionType::v>(model).eps(x, n, got);
    const Mat v = n.alpha * eps - n.sigma * x0;
    CHECK((got - v).norm() < 1e-14 * v.norm());
    models::as_prediction<PredictionType::score>(model).eps(x, n, got);
    CHECK((got + eps / n.sigma).norm() < 1e-14 * eps.norm() / n.sigma);
    models::as_prediction<PredictionType::eps>(model).eps(x, n, got);
    CHECK(got == eps);
  }
}

TEST_CASE("v-prediction on a VP node is diffusers' eps = alpha v + sigma x",
          "[models][prediction]") {
  // A "network" that predicts v: here the v of the reference mixture.
  auto model = reference_mixture<double>();
  auto v_net = models::as_prediction<PredictionType::v>(model);
  const auto x = diffgrad::testing::test_batch<double>(3, 3);
  const double alpha = 0.6, sigma = 0.8; // alpha^2 + sigma^2 = 1
  const Node n = make_node(alpha, sigma);
  Mat v, eps;
  v_net.eps(x, n, v);
  models::as_eps_model<PredictionType::v>(v_net).eps(x, n, eps);
  CHECK((eps - (alpha * v + sigma * x)).norm() < 1e-14 * eps.norm());
  // ... and x0 = alpha x - sigma v (diffusers' DPM-Solver++ v branch).
  const Mat x0 = (x - sigma * eps) / alpha;
  CHECK((x0 - (alpha * x - sigma * v)).norm() < 1e-14 * x0.norm());
}

TEMPLATE_TEST_CASE("eps -> prediction -> as_eps_model round-trips, values and VJPs",
                   "[models][prediction]", float, double) {
  auto model = reference_mixture<TestType>();
  const auto x = diffgrad::testing::test_batch<TestType>(5, 3);
  const State<TestType> a = diffgrad::testing::test_batch<TestType>(5, 3).reverse();
  const double tol = std::is_same_v<TestType, float> ? 2e-5 : 1e-13;
  using Vec = Eigen::Matrix<TestType, Eigen::Dynamic, 1>;
  for (const Node n : {make_node(0.8, 0.6), make_node(0.7, 1.3), make_node(1.0, 5.0)}) {
    State<TestType> eps, dx;
    Vec dc = Vec::Zero(4), dp = Vec::Zero(12);
    model.eps(x, n, eps);
    model.vjp(x, n, a, dx, &dc, &dp);
    for (const auto type : kAllTypes) {
      INFO(models::prediction_type_name(type) << " alpha " << n.alpha << " sigma " << n.sigma);
      // The inner adapter is an rvalue: the outer one owns it (and references `model`).
      auto round = models::as_eps_model(models::as_prediction(model, type), type);
      STATIC_REQUIRE(DifferentiableNoiseModel<decltype(round), State<TestType>, Vec>);
      State<TestType> eps2, dx2;
      Vec dc2 = Vec::Zero(4), dp2 = Vec::Zero(12);
      round.eps(x, n, eps2);
      round.vjp(x, n, a, dx2, &dc2, &dp2);
      CHECK(diffgrad::testing::relative_error<TestType>(eps2, eps) < tol);
      CHECK(diffgrad::testing::relative_error<TestType>(dx2, dx) < tol);
      // (in double: GCC 12 reports a false -Warray-bounds on Eigen's float packet path here)
      const Eigen::VectorXd dcd = dc.template cast<double>(), dpd = dp.template cast<double>();
      CHECK((dc2.template cast<double>() - dcd).norm() <= tol * dcd.norm());
      CHECK((dp2.template cast<double>() - dpd).norm() <= tol * dpd.norm());
    }
  }
}

TEST_CASE("Prediction adapters around an Mlp: exact VJPs w.r.t. x, z, params",
          "[models][prediction][vjp]") {
  models::MlpConfig c;
  c.dim = 3;
  c.cond_dim = 2;
  c.time_frequencies = 2;
  c.hidden = {6, 6};
  c.activation = models::Activation::tanh;
  models::Mlp<double> net(c, 9);
  net.cond() << 0.4, -0.3;
  const auto x = diffgrad::testing::test_batch<double>(3, 3);
  for (const auto type : kAllTypes) {
    for (const Node n : {make_node(0.8, 0.6), make_node(0.7, 1.3)}) {
      INFO(models::prediction_type_name(type) << " alpha " << n.alpha);
      auto eps_model = models::as_eps_model(net, type);
      CHECK(eps_model.cond_size() == 2);
      CHECK(eps_model.param_size() == net.param_size());
      const auto checks = diffgrad::testing::check_model_vjp(
          [&](const Mat& in, Mat& out) { eps_model.eps(in, n, out); },
          [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
            eps_model.vjp(in, n, a, dx, dc, dp);
          },
          x, &net.cond(), &net.params());
      require_vjp_ok(checks);
    }
  }
}

TEST_CASE("Prediction adapters reject bad input", "[models][prediction][errors]") {
  auto model = reference_mixture<double>();
  const auto x = diffgrad::testing::test_batch<double>(2, 3);
  Mat out;
  SECTION("x0 -> eps needs sigma > 0") {
    auto from_x0 =
        models::as_eps_model<PredictionType::x0>(models::as_prediction<PredictionType::x0>(model));
    CHECK_THROWS_WITH(from_x0.eps(x, terminal_data_node(0.0, 0.0), out),
                      Catch::Contains("node.sigma"));
  }
  SECTION("eps -> x0 needs alpha > 0") {
    auto to_x0 = models::as_prediction<PredictionType::x0>(model);
    CHECK_THROWS_WITH(to_x0.eps(x, Node{1.0, 0.0, 1.0, -1e300, 1.0}, out),
                      Catch::Contains("node.alpha"));
  }
  SECTION("unknown prediction type string") {
    CHECK(models::parse_prediction_type("v_prediction") == PredictionType::v);
    CHECK(models::parse_prediction_type("sample") == PredictionType::x0);
    CHECK(models::parse_prediction_type("epsilon") == PredictionType::eps);
    CHECK_THROWS_AS(models::parse_prediction_type("flow"), diffgrad::invalid_argument);
  }
  SECTION("the wrapped model's own checks still apply") {
    auto adapter = models::as_eps_model<PredictionType::v>(model);
    CHECK_THROWS_AS(
        adapter.eps(diffgrad::testing::test_batch<double>(2, 4), make_node(0.8, 0.6), out),
        diffgrad::invalid_argument);
  }
}

// ---------------------------------------------------------------- thresholding

namespace {

// torch.manual_seed(3); x = 2 randn(3, 7) (float32); x[2] *= 0.2 -- and the output of
// diffusers' DPMSolverMultistepScheduler._threshold_sample (diffusers 0.x, torch 2.15) on it.
const std::vector<double> kThresholdInput{
    -0x1.39ef5ep-3, 0x1.7084c8p-1, -0x1.906482p+0, 0x1.24fa44p-3, 0x1.5465d4p+0, 0x1.0b5c18p+0,
    -0x1.55a00ap-2, 0x1.b2731ap-4, 0x1.9e5156p-1,  0x1.38fc44p+0, 0x1.8551e4p+0, -0x1.139b08p-4,
    -0x1.611f22p-1, 0x1.d63366p-1, 0x1.f2f96p-1,   -0x1.e10fap-5, 0x1.8d67c8p-3, 0x1.50418ap-4,
    0x1.153d8ap-3,  0x1.150b46p-1, 0x1.321506p-3};

struct TorchCase {
  double ratio, max_value;
  std::vector<double> out_f32, out_f64;
};

const std::vector<TorchCase> kTorchCases{
    {0.995,
     2.5,
     {-0x1.93416ap-4, 0x1.d95e88p-2, -0x1p+0,       0x1.7855d6p-4, 0x1.b53f56p-1, 0x1.576dbep-1,
      -0x1.b6d2f2p-3, 0x1.1f5d9ep-4, 0x1.120cacp-1, 0x1.9e0c06p-1, 0x1p+0,        -0x1.6c98ecp-5,
      -0x1.d32498p-2, 0x1.370362p-1, 0x1.f2f96p-1,  -0x1.e10fap-5, 0x1.8d67c8p-3, 0x1.50418ap-4,
      0x1.153d8ap-3,  0x1.150b46p-1, 0x1.321506p-3},
     {-0x1.93416a23afdaep-4,
      0x1.d95e87ff8dfaep-2,
      -0x1p+0,
      0x1.7855d6e3dc024p-4,
      0x1.b53f56b9d7429p-1,
      0x1.576dbe1fa785fp-1,
      -0x1.b6d2f2dea7613p-3,
      0x1.1f5d9e16fc187p-4,
      0x1.120cabd2adfe8p-1,
      0x1.9e0c053aa63f7p-1,
      0x1p+0,
      -0x1.6c98ecade6bc2p-5,
      -0x1.d324983ec809bp-2,
      0x1.3703621595155p-1,
      0x1.f2f96p-1,
      -0x1.e10fap-5,
      0x1.8d67c8p-3,
      0x1.50418ap-4,
      0x1.153d8ap-3,
      0x1.150b46p-1,
      0x1.321506p-3}},
    {0.9,
     1.7,
     {-0x1.b91974p-4, 0x1.02e584p-1, -0x1p+0,       0x1.9ba722p-4, 0x1.de4806p-1, 0x1.77a878p-1,
      -0x1.e00182p-3, 0x1.43c38cp-4, 0x1.34c2d2p-1, 0x1.d27da2p-1, 0x1p+0,        -0x1.9ac71ep-5,
      -0x1.0727eep-1, 0x1.5e6818p-1, 0x1.f2f96p-1,  -0x1.e10fap-5, 0x1.8d67c8p-3, 0x1.50418ap-4,
      0x1.153d8ap-3,  0x1.150b46p-1, 0x1.321506p-3},
     {-0x1.b91973c85bb8ep-4,
      0x1.02e582a8ee1a9p-1,
      -0x1p+0,
      0x1.9ba72173f282ap-4,
      0x1.de48044ac2f73p-1,
      0x1.77a877722b68dp-1,
      -0x1.e00180fcf26e9p-3,
      0x1.43c38c1bfe90bp-4,
      0x1.34c2d19ac02d6p-1,
      0x1.d27da206bbe96p-1,
      0x1p+0,
      -0x1.9ac71e03240cap-5,
      -0x1.0727ee6defbb2p-1,
      0x1.5e6817800e126p-1,
      0x1.f2f96p-1,
      -0x1.e10fap-5,
      0x1.8d67c8p-3,
      0x1.50418ap-4,
      0x1.153d8ap-3,
      0x1.150b46p-1,
      0x1.321506p-3}},
    {0.995,
     1.3,
     {-0x1.e2fa1cp-4, 0x1.1b79d6p-1, -0x1p+0,       0x1.c2bc1ap-4, 0x1p+0,        0x1.9b529cp-1,
      -0x1.06c9ep-2,  0x1.4e3128p-4, 0x1.3eb4bap-1, 0x1.e1841cp-1, 0x1p+0,        -0x1.a80234p-5,
      -0x1.0fa1ccp-1, 0x1.69b164p-1, 0x1.f2f96p-1,  -0x1.e10fap-5, 0x1.8d67c8p-3, 0x1.50418ap-4,
      0x1.153d8ap-3,  0x1.150b46p-1, 0x1.321506p-3},
     {-0x1.e2fa1a7627627p-4,
      0x1.1b79d4ec4ec4fp-1,
      -0x1p+0,
      0x1.c2bc19d89d89dp-4,
      0x1p+0,
      0x1.9b529b13b13b1p-1,
      -0x1.06c9e04ec4ec5p-2,
      0x1.4e3127b13b13bp-4,
      0x1.3eb4b84ec4ec5p-1,
      0x1.e18419d89d89dp-1,
      0x1p+0,
      -0x1.a80233b13b13bp-5,
      -0x1.0fa1cb6276276p-1,
      0x1.69b1622762762p-1,
      0x1.f2f96p-1,
      -0x1.e10fap-5,
      0x1.8d67c8p-3,
      0x1.50418ap-4,
      0x1.153d8ap-3,
      0x1.150b46p-1,
      0x1.321506p-3}},
    // sample_max_value < 1 (issue 11): torch.clamp(q, min=1, max=0.5) is 0.5 for every q, so
    // x0' = clamp(x0, -0.5, 0.5)/0.5 (exact in both precisions).
    {0.995,
     0.5,
     {-0x1.39ef5ep-2, 0x1p+0,        -0x1p+0,      0x1.24fa44p-2, 0x1p+0,        0x1p+0,
      -0x1.55a00ap-1, 0x1.b2731ap-3, 0x1p+0,       0x1p+0,        0x1p+0,        -0x1.139b08p-3,
      -0x1p+0,        0x1p+0,        0x1p+0,       -0x1.e10fap-4, 0x1.8d67c8p-2, 0x1.50418ap-3,
      0x1.153d8ap-2,  0x1p+0,        0x1.321506p-2},
     {-0x1.39ef5ep-2, 0x1p+0,        -0x1p+0,      0x1.24fa44p-2, 0x1p+0,        0x1p+0,
      -0x1.55a00ap-1, 0x1.b2731ap-3, 0x1p+0,       0x1p+0,        0x1p+0,        -0x1.139b08p-3,
      -0x1p+0,        0x1p+0,        0x1p+0,       -0x1.e10fap-4, 0x1.8d67c8p-2, 0x1.50418ap-3,
      0x1.153d8ap-2,  0x1p+0,        0x1.321506p-2}},
};

template <class Scalar> State<Scalar> threshold_input() {
  State<Scalar> x(3, 7);
  for (Eigen::Index i = 0; i < 21; ++i)
    x.data()[i] = static_cast<Scalar>(kThresholdInput[static_cast<std::size_t>(i)]);
  return x;
}

} // namespace

TEMPLATE_TEST_CASE("Dynamic thresholding reproduces diffusers' _threshold_sample",
                   "[models][threshold]", float, double) {
  for (const auto& c : kTorchCases) {
    INFO("ratio " << c.ratio << " sample_max_value " << c.max_value);
    models::ThresholdingOptions o;
    o.thresholding = true;
    o.dynamic_thresholding_ratio = c.ratio;
    o.sample_max_value = c.max_value;
    models::SampleThreshold<TestType> threshold(o);
    State<TestType> x0 = threshold_input<TestType>();
    threshold.apply(x0);
    const auto& expected = std::is_same_v<TestType, float> ? c.out_f32 : c.out_f64;
    double worst_ulps = 0; // in units of the last place of the expected value
    for (Eigen::Index i = 0; i < 21; ++i) {
      const auto e = static_cast<TestType>(expected[static_cast<std::size_t>(i)]);
      const TestType ulp = std::nextafter(std::abs(e), TestType(10)) - std::abs(e);
      worst_ulps = std::max(worst_ulps, static_cast<double>(std::abs(x0.data()[i] - e) / ulp));
    }
    INFO("worst difference " << worst_ulps << " ulp");
    CHECK(worst_ulps == 0.0); // bit-identical in float32 and float64
  }
}

TEST_CASE("Thresholding keeps a NaN visible, like torch", "[models][threshold]") {
  State<double> x0 = threshold_input<double>();
  x0(1, 3) = std::numeric_limits<double>::quiet_NaN();
  State<double> clipped = x0;
  models::ThresholdingOptions o;
  o.thresholding = true;
  o.sample_max_value = 2.0;
  models::SampleThreshold<double> dynamic(o);
  dynamic.apply(x0);
  CHECK(x0.row(1).array().isNaN().all()); // torch.quantile of a row with a NaN is NaN
  CHECK(x0.row(0).allFinite());
  CHECK(x0.row(2).allFinite());
  models::ThresholdingOptions c;
  c.clip_sample = true;
  models::SampleThreshold<double> clip(c);
  clip.apply(clipped);
  CHECK(std::isnan(clipped(1, 3)));
  CHECK(clipped.array().isNaN().count() == 1);
}

TEST_CASE("clip_sample clamps x0; inactive options are the identity", "[models][threshold]") {
  auto model = reference_mixture<double>();
  const Mat x = 3.0 * diffgrad::testing::test_batch<double>(4, 3);
  const Node n = make_node(0.8, 0.6);
  Mat eps, eps_clip, eps_id;
  model.eps(x, n, eps);
  const Mat x0 = (x - n.sigma * eps) / n.alpha;
  REQUIRE(x0.cwiseAbs().maxCoeff() > 0.8); // the test must actually clip
  auto clipped = models::clip_sample(model, 0.8);
  clipped.eps(x, n, eps_clip);
  const Mat x0_clip = (x - n.sigma * eps_clip) / n.alpha;
  CHECK((x0_clip - x0.cwiseMax(-0.8).cwiseMin(0.8)).norm() < 1e-14);
  auto identity = models::thresholded(model, models::ThresholdingOptions{});
  identity.eps(x, n, eps_id);
  CHECK(eps_id == eps);
  // thresholding takes precedence over clip_sample (diffusers' DDIM order).
  models::ThresholdingOptions both;
  both.thresholding = true;
  both.sample_max_value = 1.0; // s = 1: clamp to [-1, 1]
  both.clip_sample = true;
  both.clip_sample_range = 0.5;
  auto dyn = models::thresholded(model, both);
  dyn.eps(x, n, eps_clip);
  CHECK(((x - n.sigma * eps_clip) / n.alpha - x0.cwiseMax(-1.0).cwiseMin(1.0)).norm() < 1e-14);
}

TEST_CASE("Thresholded eps: exact VJPs away from the kinks", "[models][threshold][vjp]") {
  // Points with coordinates up to ~2.6, so |x0| reaches ~2 and the threshold s moves with x0.
  Mat y(3, 6);
  y << 2.6, -0.3, 1.2, -2.1, 0.5, 1.7, -1.4, 2.2, -0.6, 0.9, -2.4, 0.2, 0.4, -1.9, 2.4, -0.8, 1.5,
      -1.1;
  models::DiracMixture<double> model(y);
  model.cond() << 0.1, -0.2, 0.05;
  // A noisy node, so the posterior over the points is spread out and the logits' gradient is
  // not negligible (finite differences in z would measure only rounding otherwise).
  const Node n = make_node(0.5, std::sqrt(0.75));
  const Mat x = 0.5 * diffgrad::testing::test_batch<double>(3, 6) + Mat::Constant(3, 6, 0.1);
  struct Case {
    const char* name;
    models::ThresholdingOptions options;
  };
  std::vector<Case> cases(3);
  cases[0].name = "dynamic, s inside (1, max)";
  cases[0].options.thresholding = true;
  cases[0].options.dynamic_thresholding_ratio = 0.7; // rank 3.5: between two order statistics
  cases[0].options.sample_max_value = 3.0;
  cases[1].name = "dynamic, s clamped at max";
  cases[1].options.thresholding = true;
  cases[1].options.dynamic_thresholding_ratio = 0.9;
  cases[1].options.sample_max_value = 1.05;
  cases[2].name = "clip_sample";
  cases[2].options.clip_sample = true;
  cases[2].options.clip_sample_range = 1.0;
  // Every |x0| must be well away from the kinks (the threshold and the order statistics'
  // ties), or finite differences straddle them.
  Mat eps;
  model.eps(x, n, eps);
  const Mat x0 = (x - n.sigma * eps) / n.alpha;
  for (const auto& c : cases) {
    INFO(c.name);
    models::SampleThreshold<double> probe(c.options);
    Mat thr = x0;
    probe.apply(thr);
    for (Eigen::Index b = 0; b < 3; ++b) {
      std::vector<double> mags(x0.row(b).data(), x0.row(b).data() + 6);
      std::sort(mags.begin(), mags.end(),
                [](double p, double q) { return std::abs(p) < std::abs(q); });
      for (std::size_t j = 1; j < mags.size(); ++j)
        REQUIRE(std::abs(mags[j]) - std::abs(mags[j - 1]) > 1e-2);
      const double s = c.options.thresholding ? probe.last_scales()[static_cast<std::size_t>(b)]
                                              : c.options.clip_sample_range;
      INFO("sample " << b << " threshold " << s);
      for (double m : mags) REQUIRE(std::abs(std::abs(m) - s) > 1e-3);
    }
    auto wrapped = models::thresholded(model, c.options);
    // Ridders' extrapolation starts from a small step, inside the smooth piece.
    diffgrad::testing::FdOptions fd;
    fd.ridders_step = 1e-3;
    const auto checks = diffgrad::testing::check_model_vjp(
        [&](const Mat& in, Mat& out) { wrapped.eps(in, n, out); },
        [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
          wrapped.vjp(in, n, a, dx, dc, dp);
        },
        x, &model.cond(), &model.params(), fd);
    // J v from a 1e-3 starting step carries ~1e-16/1e-3 rounding into Ridders' table, so the
    // dot-product test is good to ~1e-10 here (1e-13 on the smooth models).
    require_vjp_ok(checks, 1e-9);
  }
}

TEST_CASE("Thresholding rejects bad options", "[models][threshold][errors]") {
  auto model = reference_mixture<double>();
  models::ThresholdingOptions o;
  o.thresholding = true;
  o.dynamic_thresholding_ratio = 1.5;
  CHECK_THROWS_WITH(models::thresholded(model, o), Catch::Contains("dynamic_thresholding_ratio"));
  o.dynamic_thresholding_ratio = 0.995;
  o.sample_max_value = 0.5; // accepted, as diffusers does (s pinned at 0.5)
  CHECK_NOTHROW(models::thresholded(model, o));
  for (double bad : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()}) {
    o.sample_max_value = bad;
    CHECK_THROWS_WITH(models::thresholded(model, o), Catch::Contains("sample_max_value"));
  }
  CHECK_THROWS_WITH(models::clip_sample(model, -1.0), Catch::Contains("clip_sample_range"));
  auto ok = models::dynamic_thresholding(model);
  Mat out;
  CHECK_THROWS_WITH(
      ok.eps(diffgrad::testing::test_batch<double>(2, 3), terminal_data_node(0, 0), out),
      Catch::Contains("node.sigma"));
}

// ---------------------------------------------------------------- thresholding VJP vs FD

namespace {

/// <c, J v> by central differences of the thresholding map in double, with the quantile taken
/// at q_eff (= the quantile as the Scalar-precision map holds it, so both pick the same order
/// statistics).
double threshold_fd(const Mat& x0, const Mat& v, const Mat& c, models::ThresholdingOptions o,
                    double q_eff, double step) {
  o.dynamic_thresholding_ratio = q_eff;
  models::SampleThreshold<double> t(o);
  Mat plus = x0 + step * v, minus = x0 - step * v;
  t.apply(plus);
  t.apply(minus);
  return (c.array() * (plus - minus).array()).sum() / (2.0 * step);
}

/// Rows of d distinct magnitudes in [0.2, 3.2), well apart (>= 0.03) and random signs, so that
/// finite differences never straddle a kink (ties of order statistics, |x0| = s).
Mat spread_rows(Eigen::Index rows, Eigen::Index d, unsigned seed) {
  Mat x(rows, d);
  std::uint64_t state = seed;
  const auto next = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * 0x1p-53;
  };
  for (Eigen::Index r = 0; r < rows; ++r) {
    std::vector<double> mags(static_cast<std::size_t>(d));
    for (Eigen::Index j = 0; j < d; ++j)
      mags[static_cast<std::size_t>(j)] =
          0.2 + 3.0 * static_cast<double>(j) / static_cast<double>(d);
    for (Eigen::Index j = d - 1; j > 0; --j) // shuffle
      std::swap(mags[static_cast<std::size_t>(j)],
                mags[static_cast<std::size_t>(next() * static_cast<double>(j + 1))]);
    for (Eigen::Index j = 0; j < d; ++j)
      x(r, j) = (next() < 0.5 ? -1.0 : 1.0) * mags[static_cast<std::size_t>(j)];
  }
  return x;
}

} // namespace

TEMPLATE_TEST_CASE("Thresholding VJP = finite differences at non-half, default and near-whole "
                   "quantile ranks",
                   "[models][threshold][vjp]", float, double) {
  using S = TestType;
  struct Case {
    const char* name;
    Eigen::Index d;
    double ratio, max_value;
  };
  // rank = float-or-double(q) (d - 1). The interpolation weights w and 1 - w of the two order
  // statistics differ in every case but the last two (a swapped pair would pass a rank of k.5).
  const std::vector<Case> cases{
      {"rank 4.8 (d = 7, q = 0.8)", 7, 0.8, 10.0},
      {"rank 6.6 (d = 12, q = 0.6)", 12, 0.6, 10.0},
      {"default ratio 0.995, d = 64: rank 62.685", 64, 0.995, 10.0},
      {"default ratio 0.995, d = 250: rank 247.755", 250, 0.995, 10.0},
      // float(0.7) = 0.699999988: rank 6.99999988 picks order statistics 6 and 7 with
      // w = 0.99999988 in float, the single statistic 7 (rank 7.0) in double.
      {"near-whole rank 7 (d = 11, q = 0.7)", 11, 0.7, 10.0},
      // float(0.9) = 0.899999976: rank 8.99999976 (float) / 9.0 (double, 0.9 * 10 rounds up).
      {"near-whole rank 9 (d = 11, q = 0.9)", 11, 0.9, 10.0},
      // sample_max_value < 1: s is the constant 0.5, the quantile drops out of the VJP.
      {"sample_max_value 0.5 (constant threshold)", 9, 0.995, 0.5},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    models::ThresholdingOptions o;
    o.thresholding = true;
    o.dynamic_thresholding_ratio = c.ratio;
    o.sample_max_value = c.max_value;
    const Mat x0 = spread_rows(3, c.d, 17u + static_cast<unsigned>(c.d));
    const Mat v = spread_rows(3, c.d, 5u) / 3.0;
    const Mat ct = spread_rows(3, c.d, 9u) / 3.0;
    const double q_eff = static_cast<double>(static_cast<S>(c.ratio));
    // The map in Scalar precision: the thresholds it picks (rank from Scalar(q)) ...
    models::SampleThreshold<S> t(o);
    State<S> x0s = x0.cast<S>();
    State<S> applied = x0s;
    t.apply(applied);
    for (std::size_t b = 0; b < 3; ++b) {
      const double s = t.last_scales()[b];
      INFO("sample " << b << " threshold " << s);
      // Away from the clamp's kink |x0| = s, except at a near-whole rank, where s sits on the
      // order statistic it (almost) equals: clamp(y, -s, s)/s = +-1 on both sides there.
      for (Eigen::Index j = 0; j < c.d; ++j)
        REQUIRE((std::abs(std::abs(x0(static_cast<Eigen::Index>(b), j)) - s) > 1e-3 ||
                 std::abs(std::abs(x0(static_cast<Eigen::Index>(b), j)) - s) < 1e-6 * s));
      if (c.max_value >= 1.0) REQUIRE(s > 1.0); // the quantile term is live
    }
    // ... and its VJP against double-precision finite differences of the same map.
    State<S> g = ct.cast<S>();
    t.backward(x0s, g);
    const double vjp = (g.template cast<double>().array() * v.array()).sum();
    const double fd = threshold_fd(x0, v, ct, o, q_eff, 1e-6);
    INFO("vjp " << vjp << " fd " << fd);
    const double tol = std::is_same_v<S, float> ? 2e-5 : 1e-8;
    CHECK(std::abs(vjp - fd) <= tol * (1.0 + std::abs(fd)));
    // Per entry: the cotangent of each order statistic (one-hot directions), which separates
    // the weights w and 1 - w even where the total above would hide a swap.
    for (Eigen::Index j = 0; j < c.d; ++j) {
      Mat e = Mat::Zero(3, c.d);
      e.col(j).setOnes();
      const double fd_j = threshold_fd(x0, e, ct, o, q_eff, 1e-6);
      const double vjp_j = static_cast<double>(g.col(j).sum());
      INFO("entry " << j << " vjp " << vjp_j << " fd " << fd_j);
      CHECK(std::abs(vjp_j - fd_j) <= tol * (1.0 + std::abs(fd_j)));
    }
  }
}
