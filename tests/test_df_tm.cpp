// DF-TM (fisher/df_tm.hpp): the trace formula with the exact oracle E[|x0|^2 | x_t] is the
// exact trace (Dirac and Gaussian mixtures, inside the likelihood integrator too); the MLP
// trace network's two targets; a short training run learns (loose, justified bounds); training
// is deterministic; bad input. The trained-network tables live in examples/likelihood.cpp.
#include <catch2/catch.hpp>

#include <cmath>

#include "diffgrad/fisher/df_tm.hpp"
#include "diffgrad/fisher/likelihood.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using B = EigenBackend<double>;
using Mat = B::state_type;

namespace {

Node vp_node(double t) { return VPLinearSchedule().node(t); }

/// Centres of the 8 black squares of a 4 x 4 checkerboard on [-2, 2]^2.
Mat checkerboard() {
  Mat y(8, 2);
  int k = 0;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      if ((i + j) % 2 == 0) {
        y(k, 0) = -1.5 + i;
        y(k, 1) = -1.5 + j;
        ++k;
      }
  return y;
}

models::MlpConfig small_config() {
  models::MlpConfig c;
  c.dim = 2;
  c.hidden = {32, 32};
  return c;
}

} // namespace

TEST_CASE("DF-TM with the exact oracle E[|x0|^2 | x_t] is the exact trace", "[fisher][dftm]") {
  Mat y(5, 3);
  y << -1, 0, 0.5, 1, -1, 0, 0, 1, 1, 0.5, 0.5, -0.5, -0.3, 0.2, 0.9;
  const models::DiracMixture<double> dirac(y);
  Eigen::VectorXd s(5);
  s << 0.2, 0.0, 0.4, 0.1, 0.3;
  const models::GaussianMixture<double> gmm(y, s);
  const Mat x = diffgrad::testing::test_batch<double>(6, 3);
  const auto check = [&](const auto& model) {
    fisher::ExactSecondMoment oracle(model);
    fisher::DfTmTrace dftm(oracle);
    const fisher::ExactFisher exact(model);
    for (const double t : {0.9, 0.5, 0.2, 0.05, 0.01}) {
      const Node n = vp_node(t);
      Mat eps;
      model.eps(x, n, eps);
      Eigen::VectorXd tr;
      dftm(x, n, eps, tr);
      const Eigen::VectorXd ref = exact.trace(x, n);
      // Relative to the trace's natural scale d/sigma^2: the formula cancels I/sigma^2 against
      // (alpha^2/sigma^4) Cov, so where tr F ~ 0 a pointwise relative error is meaningless.
      const double scale = 3.0 / (n.sigma * n.sigma);
      INFO("t " << t << " DF-TM " << tr.transpose() << "\nexact " << ref.transpose());
      CHECK((tr - ref).cwiseAbs().maxCoeff() <= 1e-12 * scale);
    }
    CHECK(dftm.calls() == 5);
  };
  check(dirac);
  check(gmm);
}

TEST_CASE("DF-TM with the exact oracle inside the likelihood integrator", "[fisher][dftm]") {
  const B backend;
  const VPLinearSchedule schedule;
  const models::DiracMixture<double> model(checkerboard());
  fisher::ExactSecondMoment oracle(model);
  fisher::DfTmTrace dftm(oracle);
  fisher::ExactTrace exact(model);
  const Mat x = checkerboard().topRows(4) * 0.999;
  const fisher::GaussianPrior prior(1.0);
  const auto a =
      fisher::log_likelihood(backend, schedule, model, dftm, x, 1e-2, 1.0, prior, {.steps = 32});
  const auto b =
      fisher::log_likelihood(backend, schedule, model, exact, x, 1e-2, 1.0, prior, {.steps = 32});
  CHECK((a.log_likelihood - b.log_likelihood).cwiseAbs().maxCoeff() <= 1e-10);
}

TEST_CASE("df_tm_trace closed form: one Gaussian", "[fisher][dftm]") {
  // Data N(m, s^2 I): T = |mu_post|^2 + d tau^2, tr F = d / (alpha^2 s^2 + sigma^2).
  const Node n = vp_node(0.3);
  const double s = 0.6, v = n.alpha * n.alpha * s * s + n.sigma * n.sigma;
  Mat hat(2, 2);
  hat << 0.3, -0.2, 1.0, 0.5;
  const double tau2 = s * s * n.sigma * n.sigma / v;
  const Eigen::VectorXd t = hat.rowwise().squaredNorm().array() + 2 * tau2;
  const Eigen::VectorXd tr = fisher::df_tm_trace(n, t, hat);
  CHECK((tr.array() - 2.0 / v).abs().maxCoeff() <= 1e-12 * 2.0 / (n.sigma * n.sigma));
}

TEST_CASE("MlpTraceNetwork reads the MLP as T for both targets", "[fisher][dftm]") {
  models::Mlp<double> mlp(small_config(), 4);
  const Mat x = diffgrad::testing::test_batch<double>(3, 2);
  const Node n = vp_node(0.4);
  Mat raw;
  mlp.eps(x, -0.1 * n.lambda, raw); // log-SNR time input (the default)
  Mat hat(3, 2);
  hat << 0.1, 0.2, -0.3, 0.4, 0.5, -0.6;
  Eigen::VectorXd t;
  fisher::MlpTraceNetwork<double> second(mlp);
  second(x, n, hat, t);
  CHECK((t - raw.rowwise().sum()).norm() <= 1e-15 * t.norm());
  fisher::MlpTraceNetwork<double> variance(mlp, fisher::TraceTarget::scaled_posterior_variance);
  variance(x, n, hat, t);
  const Eigen::VectorXd expected =
      hat.rowwise().squaredNorm() + (n.sigma * n.sigma / (n.alpha * n.alpha)) * raw.rowwise().sum();
  CHECK((t - expected).norm() <= 1e-14 * expected.norm());
  fisher::MlpTraceNetwork<double> by_t(mlp, fisher::TraceTarget::second_moment,
                                       fisher::TraceNetworkTime::schedule_t);
  CHECK(by_t.time_input(n) == n.t);
}

TEST_CASE("A short training run learns E[|x0|^2 | x_t] and is deterministic",
          "[fisher][dftm][train]") {
  // 300 Adam steps of a 32 x 32 MLP (~0.3 s). Bounds are loose on purpose: they catch a
  // training loop that does not learn (wrong sign, wrong target, lost gradient), not the
  // accuracy a full run reaches (docs/fisher.md). The loss floor is the conditional variance of
  // the targets, so the loss is compared with the untrained first step, and T with the exact
  // oracle at a noise level where it is smooth (sigma ~ 0.8).
  const VPLinearSchedule schedule;
  const Mat data = checkerboard();
  const models::DiracMixture<double> model(data);
  const fisher::ExactFisher exact(model);
  fisher::TraceTrainingOptions opt;
  opt.steps = 300;
  opt.batch = 128;
  opt.seed = 5;
  const auto denoise = [&](const Mat& x, const Node& n, Mat& out) { model.x0_hat(x, n, out); };
  const B backend;
  Mat noise(256, 2);
  backend.gaussian(noise, 17, 0);
  const Node n = schedule.node(0.3);
  Mat x(256, 2);
  for (Eigen::Index b = 0; b < 256; ++b)
    x.row(b) = n.alpha * data.row(b % 8) + n.sigma * noise.row(b);
  Mat hat;
  model.x0_hat(x, n, hat);
  const Eigen::VectorXd t_exact = exact.second_moment(x, n);

  fisher::MlpTraceNetwork<double> net(models::Mlp<double>(small_config(), 1));
  Eigen::VectorXd before;
  net(x, n, hat, before);
  const auto report = fisher::train_trace_network(net, schedule, data, opt);
  Eigen::VectorXd after;
  net(x, n, hat, after);
  const double err_before = (before - t_exact).cwiseAbs().mean() / t_exact.mean();
  const double err_after = (after - t_exact).cwiseAbs().mean() / t_exact.mean();
  INFO("loss " << report.first_loss << " -> " << report.final_loss << "; |T - T_exact| / T "
               << err_before << " -> " << err_after);
  CHECK(report.final_loss < 0.5 * report.first_loss);
  CHECK(err_after < 0.2);
  CHECK(err_after < 0.25 * err_before);

  fisher::MlpTraceNetwork<double> again(models::Mlp<double>(small_config(), 1));
  fisher::train_trace_network(again, schedule, data, opt);
  CHECK(again.mlp().params() == net.mlp().params());

  fisher::MlpTraceNetwork<double> var(models::Mlp<double>(small_config(), 1),
                                      fisher::TraceTarget::scaled_posterior_variance);
  const auto var_report = fisher::train_trace_network(var, schedule, data, opt, denoise);
  Eigen::VectorXd var_t;
  var(x, n, hat, var_t);
  const double var_err = (var_t - t_exact).cwiseAbs().mean() / t_exact.mean();
  INFO("variance target: loss " << var_report.first_loss << " -> " << var_report.final_loss
                                << "; |T - T_exact| / T " << var_err);
  CHECK(var_err < 0.2);
}

TEST_CASE("DF-TM pieces reject bad input with diffgrad::invalid_argument",
          "[fisher][dftm][errors]") {
  const VPLinearSchedule schedule;
  const Mat data = checkerboard();
  fisher::MlpTraceNetwork<double> net(models::Mlp<double>(small_config(), 1));
  SECTION("training options") {
    fisher::TraceTrainingOptions opt;
    opt.steps = 0;
    CHECK_THROWS_WITH(fisher::train_trace_network(net, schedule, data, opt),
                      Catch::Contains("options.steps"));
    opt = {};
    opt.batch = 4;
    CHECK_THROWS_WITH(fisher::train_trace_network(net, schedule, data, opt),
                      Catch::Contains("options.batch"));
    opt = {};
    opt.ema_decay = 1.0;
    CHECK_THROWS_WITH(fisher::train_trace_network(net, schedule, data, opt),
                      Catch::Contains("ema_decay"));
    opt = {};
    opt.t_min = 0.5;
    opt.t_max = 0.4;
    CHECK_THROWS_WITH(fisher::train_trace_network(net, schedule, data, opt),
                      Catch::Contains("t_min/t_max"));
  }
  SECTION("data") {
    CHECK_THROWS_WITH(fisher::train_trace_network(net, schedule, Mat::Zero(3, 3)),
                      Catch::Contains("'data'") && Catch::Contains("dimension 2"));
  }
  SECTION("variance target without a denoiser") {
    fisher::MlpTraceNetwork<double> var(models::Mlp<double>(small_config(), 1),
                                        fisher::TraceTarget::scaled_posterior_variance);
    CHECK_THROWS_WITH(fisher::train_trace_network(var, schedule, data),
                      Catch::Contains("denoiser"));
  }
  SECTION("trace network returning the wrong number of values") {
    auto bad = [](const Mat&, const Node&, const auto&, Eigen::VectorXd& out) {
      out = Eigen::VectorXd::Zero(1);
    };
    fisher::DfTmTrace dftm(bad);
    const Mat x = data.topRows(3);
    Eigen::VectorXd tr;
    CHECK_THROWS_WITH(dftm(x, vp_node(0.5), x, tr),
                      Catch::Contains("trace network output") && Catch::Contains("3 values"));
  }
  SECTION("df_tm_trace sizes") {
    CHECK_THROWS_WITH(fisher::df_tm_trace(vp_node(0.5), Eigen::VectorXd::Zero(2), data),
                      Catch::Contains("second_moment") && Catch::Contains("length 8"));
  }
}

TEST_CASE("DF-TM with a float MLP trace network", "[fisher][dftm][float]") {
  // The provider forms x0_hat in double; a float network must accept it.
  models::MlpConfig c = small_config();
  fisher::MlpTraceNetwork<double> net_d(models::Mlp<double>(c, 2),
                                        fisher::TraceTarget::scaled_posterior_variance);
  fisher::MlpTraceNetwork<float> net_f(models::Mlp<float>(c, net_d.mlp().params().cast<float>()),
                                       fisher::TraceTarget::scaled_posterior_variance);
  const Mat x = checkerboard().topRows(3) * 0.9;
  const Node n = vp_node(0.2);
  Mat eps = x * 0.1;
  fisher::DfTmTrace pd(net_d);
  fisher::DfTmTrace pf(net_f);
  Eigen::VectorXd td, tf;
  pd(x, n, eps, td);
  const EigenBackend<float>::state_type xf = x.cast<float>(), ef = eps.cast<float>();
  pf(xf, n, ef, tf);
  CHECK((tf - td).norm() <= 1e-5 * td.norm());
}
