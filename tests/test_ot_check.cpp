// OT check (fisher/ot_check.hpp): the Jacobian of the PF-ODE map against its closed form for
// Gaussian data (with RK4's order) and against finite differences of the integrated map;
// asymmetry <= 1e-10 for affine data (collinear points, axis-aligned and on a rotated line) and
// clearly nonzero for the paper's non-affine three points, on VP, sub-VP, VE and EDM; bad
// input. The hidden [.table] case prints docs/fisher.md's OT table:  ./test_ot_check "[.table]"
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include "diffgrad/fisher/ot_check.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using B = EigenBackend<double>;
using Mat = B::state_type;
using diffgrad::testing::fitted_order;

namespace {

/// The paper's affine data (three points on the vertical line x = 0.2).
Mat affine_points() {
  Mat y(3, 2);
  y << 0.2, -0.4, 0.2, 0.0, 0.2, 0.9;
  return y;
}

/// Four points on a line through (0.3, -0.1) at 0.7 rad: every coordinate pair couples.
Mat rotated_line_points() {
  Mat y(4, 2);
  const double c = std::cos(0.7), s = std::sin(0.7);
  const double offsets[4] = {-0.8, -0.1, 0.35, 1.2};
  for (int i = 0; i < 4; ++i) {
    y(i, 0) = 0.3 + offsets[i] * c;
    y(i, 1) = -0.1 + offsets[i] * s;
  }
  return y;
}

/// The paper's non-affine data: (0, 0.5), (0, 0), (0.5, 0).
Mat three_points() {
  Mat y(3, 2);
  y << 0.0, 0.5, 0.0, 0.0, 0.5, 0.0;
  return y;
}

/// Starting points: 8 draws of N(0, (sigma^2 + 0.1 alpha^2) I) at t_start.
Mat starts(const Node& n) {
  const B backend;
  Mat z(8, 2);
  backend.gaussian(z, 1, 0);
  return z * std::sqrt(n.sigma * n.sigma + 0.1 * n.alpha * n.alpha);
}

template <class S> struct Setup {
  std::string name;
  S schedule;
  double t_start, t_end;
};

template <class F> void for_each_schedule(F&& f) {
  f(Setup<VPLinearSchedule>{"VP", VPLinearSchedule(), 1.0, 1e-3});
  f(Setup<SubVPSchedule>{"sub-VP", SubVPSchedule(), 1.0, 1e-3});
  f(Setup<VESchedule>{"VE", VESchedule(0.01, 50.0), 1.0, 1e-5});
  f(Setup<EDMSchedule>{"EDM", EDMSchedule(0.002, 80.0), 80.0, 0.002});
}

} // namespace

TEST_CASE("OT check: Gaussian data, A = sqrt(v_end / v_start) I with RK4's order", "[fisher][ot]") {
  Mat m(1, 2);
  m << 0.5, 0.5;
  const double s = 0.3;
  const models::GaussianMixture<double> model(m, Eigen::VectorXd::Constant(1, s));
  for_each_schedule([&](const auto& setup) {
    const Node a = setup.schedule.node(setup.t_start), b = setup.schedule.node(setup.t_end);
    const double va = a.alpha * a.alpha * s * s + a.sigma * a.sigma;
    const double vb = b.alpha * b.alpha * s * s + b.sigma * b.sigma;
    const Mat x = starts(a).topRows(2);
    // From 64 steps: below, the error of VP changes sign (local orders 7.2 and 1.4 between 16,
    // 32 and 64 steps) and VE/EDM's lambda span (~11) is pre-asymptotic. sub-VP approaches 4
    // from below (local orders 3.3, 3.75, 3.9, 3.95 from 64 to 1024), so it starts at 128.
    const int first = setup.name == "sub-VP" ? 128 : 64;
    std::vector<int> steps{first, 2 * first, 4 * first, 8 * first, 16 * first};
    std::vector<double> errors;
    for (const int n : steps) {
      const auto r =
          fisher::ot_check(setup.schedule, model, x, setup.t_start, setup.t_end, {.steps = n});
      double err = 0;
      for (const auto& j : r.jacobian)
        err = std::max(err, (j - std::sqrt(vb / va) * Eigen::MatrixXd::Identity(2, 2)).norm() /
                                (std::sqrt(2.0 * vb / va)));
      errors.push_back(err);
      CHECK(r.asymmetry.maxCoeff() <= 1e-14);
    }
    INFO(setup.name << ": errors " << Eigen::Map<Eigen::VectorXd>(errors.data(), 5).transpose()
                    << ", order " << fitted_order(steps, errors));
    CHECK(std::abs(fitted_order(steps, errors) - 4.0) <= 0.2);
    CHECK(errors.back() <= 1e-9);
  });
}

TEST_CASE("OT check: the Jacobian is the derivative of the integrated map", "[fisher][ot]") {
  const VPLinearSchedule schedule;
  const models::DiracMixture<double> model(three_points());
  const Mat x = starts(schedule.node(1.0)).topRows(3);
  const fisher::OtCheckOptions opt{.steps = 40};
  const auto r = fisher::ot_check(schedule, model, x, 1.0, 1e-2, opt);
  const double h = 1e-4;
  for (Eigen::Index j = 0; j < 2; ++j) {
    // Fourth-order central difference of the map x_start -> x_end along coordinate j.
    const auto shifted = [&](double step) {
      Mat xs = x;
      xs.col(j).array() += step;
      return fisher::ot_check(schedule, model, xs, 1.0, 1e-2, opt).x_end;
    };
    const Mat fd =
        (-shifted(2 * h) + 8 * shifted(h) - 8 * shifted(-h) + shifted(-2 * h)) / (12 * h);
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      const Eigen::VectorXd col = r.jacobian[static_cast<std::size_t>(b)].col(j);
      const double err =
          (fd.row(b).transpose() - col).norm() / r.jacobian[static_cast<std::size_t>(b)].norm();
      INFO("sample " << b << " column " << j << " relative error " << err);
      CHECK(err <= 1e-7);
    }
  }
}

TEST_CASE("OT check: affine data gives a symmetric Jacobian on every schedule", "[fisher][ot]") {
  const models::DiracMixture<double> vertical(affine_points());
  const models::DiracMixture<double> rotated(rotated_line_points());
  for_each_schedule([&](const auto& setup) {
    const Mat x = starts(setup.schedule.node(setup.t_start));
    for (const auto* model : {&vertical, &rotated}) {
      const auto r =
          fisher::ot_check(setup.schedule, *model, x, setup.t_start, setup.t_end, {.steps = 100});
      INFO(setup.name << ": max asymmetry " << r.asymmetry.maxCoeff());
      CHECK(r.asymmetry.maxCoeff() <= 1e-10);
      CHECK(r.min_symmetric_eigenvalue.minCoeff() > 0.0);
    }
  });
}

TEST_CASE("OT check: non-affine three-point data gives a clearly asymmetric Jacobian",
          "[fisher][ot]") {
  const models::DiracMixture<double> model(three_points());
  for_each_schedule([&](const auto& setup) {
    const Mat x = starts(setup.schedule.node(setup.t_start));
    const auto r =
        fisher::ot_check(setup.schedule, model, x, setup.t_start, setup.t_end, {.steps = 100});
    INFO(setup.name << ": asymmetry " << r.asymmetry.transpose());
    // Measured: mean 2.9%, max 11% over these 8 starts (docs/fisher.md); the value depends on
    // the start (the paper's percentages depend on unreported draws and are not asserted).
    CHECK(r.asymmetry.mean() > 0.01);
    CHECK(r.asymmetry.maxCoeff() > 0.05);
  });
}

TEST_CASE("ot_check rejects bad input with diffgrad::invalid_argument", "[fisher][ot][errors]") {
  const VPLinearSchedule schedule;
  const models::DiracMixture<double> model(three_points());
  const Mat x = Mat::Zero(2, 2);
  CHECK_THROWS_WITH(fisher::ot_check(schedule, model, x, 0.5, 0.6),
                    Catch::Contains("t_start/t_end"));
  CHECK_THROWS_WITH(fisher::ot_check(schedule, model, x, 1.0, 1e-3, {.steps = 0}),
                    Catch::Contains("options.steps"));
  CHECK_THROWS_WITH(fisher::ot_check(schedule, model, Mat::Zero(2, 3), 1.0, 1e-3),
                    Catch::Contains("x_start") && Catch::Contains("dimension 2"));
  CHECK(fisher::asymmetry_index(Eigen::MatrixXd::Zero(2, 2)) == 0.0);
  Eigen::MatrixXd antisym(2, 2);
  antisym << 0, 1, -1, 0;
  CHECK(std::abs(fisher::asymmetry_index(antisym) - std::sqrt(2.0)) <= 1e-15);
}

TEST_CASE("Table: OT asymmetry of the PF-ODE map", "[.table][ot]") {
  const models::DiracMixture<double> vertical(affine_points());
  const models::DiracMixture<double> rotated(rotated_line_points());
  const models::DiracMixture<double> nonaffine(three_points());
  Mat m(1, 2);
  m << 0.5, 0.5;
  const models::GaussianMixture<double> gaussian(m, Eigen::VectorXd::Constant(1, 0.3));
  std::printf("Asymmetry |A - A^T|_F / (sqrt 2 |A|_F) of the PF-ODE map x_T -> x_{t_min}, RK4 "
              "(400 steps, uniform lambda), exact Fisher; 8 starts x_T ~ N(0, (sigma^2 + 0.1 "
              "alpha^2) I); mean / max over the starts; min eig = smallest eigenvalue of (A + "
              "A^T)/2 over the starts\n");
  std::printf("| schedule | single Gaussian N((0.5,0.5), 0.09 I) | affine, x = 0.2 line | affine, "
              "rotated line | non-affine {(0,0.5),(0,0),(0.5,0)} | non-affine min eig |\n"
              "|---|---|---|---|---|---|\n");
  for_each_schedule([&](const auto& setup) {
    const Mat x = starts(setup.schedule.node(setup.t_start));
    const auto run = [&](const auto& model) {
      return fisher::ot_check(setup.schedule, model, x, setup.t_start, setup.t_end, {.steps = 400});
    };
    const auto g = run(gaussian), v = run(vertical), r = run(rotated), n = run(nonaffine);
    std::printf("| %s | %.1e / %.1e | %.1e / %.1e | %.1e / %.1e | %.2f%% / %.2f%% | %.2e |\n",
                setup.name.c_str(), g.asymmetry.mean(), g.asymmetry.maxCoeff(), v.asymmetry.mean(),
                v.asymmetry.maxCoeff(), r.asymmetry.mean(), r.asymmetry.maxCoeff(),
                100 * n.asymmetry.mean(), 100 * n.asymmetry.maxCoeff(),
                n.min_symmetric_eigenvalue.minCoeff());
  });
}
