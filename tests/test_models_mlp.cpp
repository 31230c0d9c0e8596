// The reference MLP: documented layout (checked against a naive per-sample implementation),
// deterministic initialisation, exact VJPs w.r.t. x, z and parameters, save/load, bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <sstream>
#include <vector>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/models/mlp.hpp"
#include "fd_check.hpp"
#include "test_support.hpp"

// Every member compiles (and is warning-free) in float and double.
template class diffgrad::models::Mlp<float>;
template class diffgrad::models::Mlp<double>;

using namespace diffgrad;
using diffgrad::testing::State;
using models::Activation;
using models::Mlp;
using models::MlpConfig;

namespace {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

MlpConfig small_config(Activation act, int cond_dim = 2) {
  MlpConfig c;
  c.dim = 3;
  c.cond_dim = cond_dim;
  c.time_frequencies = 3;
  c.time_scale = 0.7;
  c.hidden = {7, 5};
  c.activation = act;
  return c;
}

/// The network written out from the documentation, one sample at a time, in long double.
std::vector<double> naive_forward(const MlpConfig& c, const Eigen::VectorXd& params,
                                  const std::vector<double>& x, double t,
                                  const Eigen::VectorXd& z) {
  const double pi = 3.14159265358979323846;
  std::vector<long double> h(x.begin(), x.end());
  for (int j = 0; j < c.time_frequencies; ++j)
    h.push_back(std::sin(pi * std::pow(2.0, j) * c.time_scale * t));
  for (int j = 0; j < c.time_frequencies; ++j)
    h.push_back(std::cos(pi * std::pow(2.0, j) * c.time_scale * t));
  for (Eigen::Index j = 0; j < z.size(); ++j) h.push_back(z(j));
  std::vector<int> widths = c.hidden;
  widths.push_back(c.dim);
  Eigen::Index offset = 0;
  for (std::size_t l = 0; l < widths.size(); ++l) {
    const auto in = static_cast<Eigen::Index>(h.size());
    const int out = widths[l];
    std::vector<long double> next(static_cast<std::size_t>(out));
    for (int o = 0; o < out; ++o) {
      long double acc = params(offset + out * in + o); // bias after the weight block
      for (Eigen::Index i = 0; i < in; ++i)
        acc += params(offset + o * in + i) * h[static_cast<std::size_t>(i)];
      const bool hidden = l + 1 < widths.size();
      if (hidden)
        acc = c.activation == Activation::tanh ? std::tanh(acc) : acc / (1 + std::exp(-acc));
      next[static_cast<std::size_t>(o)] = acc;
    }
    offset += out * (in + 1);
    h = next;
  }
  return std::vector<double>(h.begin(), h.end());
}

} // namespace

TEST_CASE("Mlp is a differentiable noise model and velocity model", "[models][mlp]") {
  STATIC_REQUIRE(DifferentiableNoiseModel<Mlp<double>, Mat, Eigen::VectorXd>);
  STATIC_REQUIRE(DifferentiableVelocityModel<Mlp<double>, Mat, Eigen::VectorXd>);
  STATIC_REQUIRE(DifferentiableNoiseModel<Mlp<float>, State<float>, Eigen::VectorXf>);
}

TEST_CASE("Mlp: layout, size and forward match the documented network", "[models][mlp]") {
  for (const auto act : {Activation::tanh, Activation::silu}) {
    const MlpConfig c = small_config(act);
    Mlp<double> net(c, 42);
    // n_0 = 3 + 2*3 + 2 = 11; sizes 7*(11+1) + 5*(7+1) + 3*(5+1).
    CHECK(net.input_size() == 11);
    CHECK(net.param_size() == 7 * 12 + 5 * 8 + 3 * 6);
    CHECK(net.bias_offset(0) == 77);
    CHECK(net.weight_offset(1) == 84);
    net.cond() << 0.3, -0.8;
    const auto x = diffgrad::testing::test_batch<double>(4, 3);
    for (const double t : {0.0, 0.37, 1.0}) {
      Mat out;
      net.eps(x, t, out);
      Mat vel;
      net.velocity(x, t, vel);
      CHECK(vel == out);
      for (Eigen::Index b = 0; b < 4; ++b) {
        const std::vector<double> xb(x.row(b).data(), x.row(b).data() + 3);
        const auto expected = naive_forward(c, net.params(), xb, t, net.cond());
        for (int j = 0; j < 3; ++j)
          CHECK(out(b, j) == Approx(expected[static_cast<std::size_t>(j)]).epsilon(1e-13));
      }
    }
  }
}

TEST_CASE("Mlp: the initialiser is deterministic and torch-like", "[models][mlp]") {
  const MlpConfig c = small_config(Activation::silu);
  Mlp<double> a(c, 7), b(c, 7), other(c, 8);
  CHECK(a.params() == b.params());
  CHECK((a.params() - other.params()).norm() > 0.1);
  // U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, weights and biases alike.
  for (std::size_t l = 0; l + 1 < a.widths().size(); ++l) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.widths()[l]));
    const Eigen::Index begin = a.weight_offset(l), end = a.bias_offset(l) + a.widths()[l + 1];
    const Eigen::VectorXd block = a.params().segment(begin, end - begin);
    CHECK(block.cwiseAbs().maxCoeff() <= bound);
    CHECK(block.cwiseAbs().maxCoeff() > 0.7 * bound); // spread over the interval
    CHECK(std::abs(block.mean()) < 0.35 * bound);
  }
  // float and double draw the same numbers (rounded).
  Mlp<float> f(c, 7);
  CHECK((f.params().cast<double>() - a.params()).cwiseAbs().maxCoeff() < 1e-7);
}

TEST_CASE("Mlp VJPs w.r.t. x, z and parameters match finite differences", "[models][mlp][vjp]") {
  for (const auto act : {Activation::tanh, Activation::silu}) {
    INFO("activation " << models::activation_name(act));
    Mlp<double> net(small_config(act), 3);
    net.cond() << 0.5, -0.25;
    const auto x = diffgrad::testing::test_batch<double>(3, 3);
    for (const bool as_velocity : {false, true}) {
      const double t = 0.43;
      const auto checks = diffgrad::testing::check_model_vjp(
          [&](const Mat& in, Mat& out) {
            if (as_velocity)
              net.velocity(in, t, out);
            else
              net.eps(in, t, out);
          },
          [&](const Mat& in, const Mat& a, Mat& dx, Eigen::VectorXd* dc, Eigen::VectorXd* dp) {
            if (as_velocity)
              net.velocity_vjp(in, t, a, dx, dc, dp);
            else
              net.vjp(in, t, a, dx, dc, dp);
          },
          x, &net.cond(), &net.params());
      INFO("velocity " << as_velocity << " x fd " << checks.x.fd_error << " dot "
                       << checks.x.dot_product_error << " | z fd " << checks.cond.fd_error
                       << " dot " << checks.cond.dot_product_error << " | params fd "
                       << checks.params.fd_error << " dot " << checks.params.dot_product_error);
      CHECK(checks.x.fd_error < 1e-7);
      CHECK(checks.cond.fd_error < 1e-7);
      CHECK(checks.params.fd_error < 1e-7);
      CHECK(checks.x.dot_product_error < 1e-11);
      CHECK(checks.cond.dot_product_error < 1e-11);
      CHECK(checks.params.dot_product_error < 1e-11);
    }
  }
}

TEST_CASE("Mlp VJP accumulates into dcond/dparams and sums over the batch", "[models][mlp][vjp]") {
  Mlp<double> net(small_config(Activation::tanh), 5);
  net.cond() << 0.1, 0.2;
  const auto x = diffgrad::testing::test_batch<double>(4, 3);
  const Mat a = diffgrad::testing::test_batch<double>(4, 3).reverse();
  Eigen::VectorXd dc_all = Eigen::VectorXd::Zero(2),
                  dp_all = Eigen::VectorXd::Zero(net.param_size());
  Mat dx_all;
  net.vjp(x, 0.2, a, dx_all, &dc_all, &dp_all);
  Eigen::VectorXd dc_sum = Eigen::VectorXd::Constant(2, 1.0),
                  dp_sum = Eigen::VectorXd::Constant(net.param_size(), 1.0);
  for (Eigen::Index b = 0; b < 4; ++b) {
    Mat dx;
    net.vjp(x.row(b), 0.2, a.row(b), dx, &dc_sum, &dp_sum);
    CHECK((dx - dx_all.row(b)).norm() < 1e-14);
  }
  CHECK((dc_sum - dc_all - Eigen::VectorXd::Ones(2)).norm() < 1e-13);
  CHECK((dp_sum - dp_all - Eigen::VectorXd::Ones(net.param_size())).norm() < 1e-13);
}

TEST_CASE("Mlp: a batch of several row blocks is the documented network row by row",
          "[models][mlp]") {
  // 2 full blocks and a partial one: every block boundary and the tail go through the
  // forward-only scratch path (eps) and the whole-batch path of the VJP.
  const Eigen::Index batch = 2 * Mlp<double>::kRowBlock + 37;
  for (const auto act : {Activation::tanh, Activation::silu}) {
    const MlpConfig c = small_config(act);
    Mlp<double> net(c, 17);
    net.cond() << -0.4, 0.9;
    const auto x = diffgrad::testing::test_batch<double>(batch, 3);
    Mat out;
    net.eps(x, 0.61, out);
    REQUIRE(out.rows() == batch);
    for (Eigen::Index b = 0; b < batch; b += 13) {
      const std::vector<double> xb(x.row(b).data(), x.row(b).data() + 3);
      const auto expected = naive_forward(c, net.params(), xb, 0.61, net.cond());
      for (int j = 0; j < 3; ++j)
        CHECK(out(b, j) == Approx(expected[static_cast<std::size_t>(j)]).epsilon(1e-13));
    }
    // eps may overwrite its input (each block reads its rows before writing them).
    Mat in_place = x;
    net.eps(in_place, 0.61, in_place);
    CHECK(in_place == out);
    // The VJP over the blocks is the sum of one-row VJPs (relative 1e-12: one row is a GEMV).
    const Mat a = diffgrad::testing::test_batch<double>(batch, 3).reverse();
    Eigen::VectorXd dp_all = Eigen::VectorXd::Zero(net.param_size()),
                    dp_sum = Eigen::VectorXd::Zero(net.param_size());
    Mat dx_all, dx;
    net.vjp(x, 0.61, a, dx_all, nullptr, &dp_all);
    for (Eigen::Index b = 0; b < batch; ++b) {
      net.vjp(x.row(b), 0.61, a.row(b), dx, nullptr, &dp_sum);
      CHECK((dx - dx_all.row(b)).norm() <= 1e-12 * (1.0 + dx.norm()));
    }
    CHECK((dp_sum - dp_all).norm() <= 1e-12 * dp_all.norm());
    // Any block size computes the same function (to rounding): 7-row blocks.
    net.set_row_block(7);
    CHECK(net.row_block() == 7);
    Mat out7;
    net.eps(x, 0.61, out7);
    CHECK((out7 - out).norm() <= 1e-13 * out.norm());
  }
  Mlp<double> net(small_config(Activation::silu), 1);
  CHECK_THROWS_WITH(net.set_row_block(0), Catch::Contains("rows") && Catch::Contains("1..2^20"));
}

TEST_CASE("Mlp: out may not alias x when the output size differs", "[models][mlp][errors]") {
  MlpConfig c = small_config(Activation::silu);
  c.output_dim = 2;
  const Mlp<double> net(c, 3);
  Mat x = diffgrad::testing::test_batch<double>(5, 3);
  CHECK_THROWS_WITH(net.eps(x, 0.1, x), Catch::Contains("out") && Catch::Contains("aliases x"));
  Mat out;
  net.eps(x, 0.1, out);
  CHECK(out.rows() == 5);
  CHECK(out.cols() == 2);
}

TEST_CASE("Mlp save/load round-trips exactly", "[models][mlp][io]") {
  MlpConfig c = small_config(Activation::silu, 0);
  c.hidden = {6};
  Mlp<double> net(c, 11);
  std::stringstream ss;
  net.save(ss);
  const Mlp<double> back = Mlp<double>::load(ss);
  CHECK(back.params() == net.params());
  CHECK(back.config().hidden == c.hidden);
  CHECK(back.config().time_scale == c.time_scale);
  CHECK(back.config().activation == Activation::silu);
  const auto x = diffgrad::testing::test_batch<double>(2, 3);
  Mat y1, y2;
  net.eps(x, 0.3, y1);
  back.eps(x, 0.3, y2);
  CHECK(y1 == y2);
  // Through a file, and into float.
  const std::string path = "test_models_mlp_roundtrip.txt";
  net.save(path);
  const Mlp<float> as_float = Mlp<float>::load(path);
  std::remove(path.c_str());
  CHECK((as_float.params().cast<double>() - net.params()).cwiseAbs().maxCoeff() < 1e-7);
}

TEST_CASE("Mlp::save reports a full disk instead of leaving a truncated file",
          "[models][mlp][io]") {
  // /dev/full accepts the open and fails the writes; the last buffered block fails at close.
  std::FILE* probe = std::fopen("/dev/full", "w");
  if (probe == nullptr) {
    WARN("no /dev/full on this system: nothing to check");
    return;
  }
  std::fclose(probe);
  MlpConfig c = small_config(Activation::silu, 0);
  c.hidden = {6};
  const Mlp<double> net(c, 11);
  CHECK_THROWS_WITH(net.save(std::string("/dev/full")),
                    Catch::Matchers::Contains("Mlp::save") && Catch::Matchers::Contains("failed"));
}

TEST_CASE("Mlp rejects bad input with diffgrad::invalid_argument", "[models][mlp][errors]") {
  Mlp<double> net(small_config(Activation::tanh), 1);
  Mat out, dx;
  SECTION("state dimension mismatch") {
    CHECK_THROWS_WITH(net.eps(diffgrad::testing::test_batch<double>(2, 4), 0.1, out),
                      Catch::Contains("'x'") && Catch::Contains("dimension 3"));
  }
  SECTION("wrong conditioning size") {
    CHECK_THROWS_AS(net.set_cond(Eigen::VectorXd::Zero(3)), diffgrad::invalid_argument);
    net.cond() = Eigen::VectorXd::Zero(1);
    CHECK_THROWS_WITH(net.eps(diffgrad::testing::test_batch<double>(2, 3), 0.1, out),
                      Catch::Contains("cond") && Catch::Contains("length 2"));
  }
  SECTION("wrong parameter size") {
    CHECK_THROWS_AS(net.set_params(Eigen::VectorXd::Zero(5)), diffgrad::invalid_argument);
    Eigen::VectorXd dp = Eigen::VectorXd::Zero(5);
    CHECK_THROWS_WITH(net.vjp(diffgrad::testing::test_batch<double>(2, 3), 0.1, Mat::Ones(2, 3), dx,
                              nullptr, &dp),
                      Catch::Contains("dparams"));
  }
  SECTION("bad configuration") {
    MlpConfig c = small_config(Activation::tanh);
    c.hidden = {4, 0};
    CHECK_THROWS_WITH(Mlp<double>(c), Catch::Contains("config.hidden"));
    c = small_config(Activation::tanh);
    c.dim = 0;
    CHECK_THROWS_AS(Mlp<double>(c), diffgrad::invalid_argument);
  }
  SECTION("malformed files") {
    std::stringstream wrong_header("not-an-mlp 1\n");
    CHECK_THROWS_AS(Mlp<double>::load(wrong_header), diffgrad::invalid_argument);
    std::stringstream ss;
    net.save(ss);
    std::string text = ss.str();
    text.resize(text.size() / 2); // truncated parameter list
    std::stringstream truncated(text);
    CHECK_THROWS_WITH(Mlp<double>::load(truncated), Catch::Contains("parameter values"));
    CHECK_THROWS_AS(Mlp<double>::load(std::string("/nonexistent/dir/mlp.txt")),
                    diffgrad::invalid_argument);
  }
}
