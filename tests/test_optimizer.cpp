// Optimisers: known single steps, and Adam / gradient descent driving a quadratic loss down
// through a 20-step DDIM sampler (optimising x_T, the conditioning, the parameters).
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/optimizer.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

TEST_CASE("optimiser steps have their textbook values", "[optimizer]") {
  State x(1, 3);
  x << 1.0, -2.0, 0.5;
  State g(1, 3);
  g << 0.5, -4.0, 0.0;
  GradientDescent gd(0.1);
  State y = x;
  gd.step(y, g);
  CHECK(y(0, 0) == Approx(0.95));
  CHECK(y(0, 1) == Approx(-1.6));
  CHECK(y(0, 2) == Approx(0.5));
  // Adam's first step with bias correction: m_hat = g, v_hat = g^2, so it moves by
  // lr g / (|g| + eps): lr in the direction of -sign(g).
  Adam adam({.learning_rate = 0.01});
  y = x;
  adam.step(y, g);
  CHECK(y(0, 0) == Approx(1.0 - 0.01 * 0.5 / (0.5 + 1e-8)));
  CHECK(y(0, 1) == Approx(-2.0 + 0.01 * 4.0 / (4.0 + 1e-8)));
  CHECK(y(0, 2) == 0.5);
  // Second step with the same gradient: m_hat = g, v_hat = g^2 again.
  adam.step(y, g);
  CHECK(y(0, 0) == Approx(1.0 - 2 * 0.01 * 0.5 / (0.5 + 1e-8)));
  CHECK(adam.iterations() == 2);
  // Works on float vectors as well (moments kept in double).
  Eigen::VectorXf v = Eigen::VectorXf::Ones(2);
  Eigen::VectorXf gv = Eigen::VectorXf::Constant(2, 2.0f);
  GradientDescent(0.25).step(v, gv);
  CHECK(v(0) == 0.5f);
}

namespace {
struct DdimProblem {
  VPLinearSchedule schedule;
  Backend64 backend;
  std::vector<Node> nodes = make_nodes(schedule, uniform_t_grid(schedule, 20, 1.0, 1e-3));
  State target = State::Constant(2, 3, 0.25);
};
} // namespace

TEST_CASE("gradient descent on x_T decreases a quadratic loss through 20 DDIM steps",
          "[optimizer]") {
  // x_0 = k x_T + c is affine for Gaussian data, so L(x_T) = |k x_T + c - y|^2 / 2 is a
  // quadratic with Hessian k^2 I: gradient descent with lr k^2 < 1 contracts every step.
  DdimProblem p;
  auto model = diffgrad::testing::gaussian_problem<double>(3);
  State x_T = diffgrad::testing::test_batch<double>(2, 3);
  const SquaredDistanceLoss<Backend64> loss(p.target);
  const GradientOptions opt{.memory = MemoryMode::checkpoint(4)};
  auto ws = make_gradient_workspace(Ddim(), p.backend, p.nodes, model, x_T, opt);
  GradientDescent gd(25.0);
  std::vector<double> losses;
  for (int it = 0; it < 20; ++it) {
    const auto& r = gradient(Ddim(), p.backend, p.schedule, p.nodes, model, x_T, loss, opt, ws);
    losses.push_back(r.loss);
    gd.step(x_T, r.grad_x);
  }
  for (std::size_t k = 1; k < losses.size(); ++k) CHECK(losses[k] < losses[k - 1]);
  INFO("loss " << losses.front() << " -> " << losses.back());
  CHECK(losses.back() < 1e-8 * losses.front());
  // The contraction factor per step is constant on a quadratic: (1 - lr k^2)^2.
  const double q1 = losses[2] / losses[1], q2 = losses[15] / losses[14];
  CHECK(q1 == Approx(q2).epsilon(1e-6));
}

TEST_CASE("Adam decreases the loss through 20 DDIM steps (x_T, condition, parameters)",
          "[optimizer]") {
  DdimProblem p;
  const SquaredDistanceLoss<Backend64> loss(p.target);
  SECTION("x_T and the condition mu of the Gaussian model") {
    auto model = diffgrad::testing::gaussian_problem<double>(3);
    State x_T = diffgrad::testing::test_batch<double>(2, 3);
    const GradientOptions opt{.wrt_cond = true};
    auto ws = make_gradient_workspace(Ddim(), p.backend, p.nodes, model, x_T, opt);
    Adam adam_x({.learning_rate = 0.05}), adam_mu({.learning_rate = 0.05});
    double first = 0, last = 0;
    for (int it = 0; it < 200; ++it) {
      const auto& r = gradient(Ddim(), p.backend, p.schedule, p.nodes, model, x_T, loss, opt, ws);
      if (it == 0) first = r.loss;
      last = r.loss;
      adam_x.step(x_T, r.grad_x);
      adam_mu.step(model.mu(), r.grad_cond);
    }
    INFO("loss " << first << " -> " << last);
    CHECK(last < 1e-3 * first);
  }
  SECTION("the parameters of an MLP noise model") {
    models::MlpConfig config;
    config.dim = 3;
    config.hidden = {16};
    config.activation = models::Activation::tanh;
    models::Mlp<double> model(config, 5);
    const State x_T = diffgrad::testing::test_batch<double>(2, 3);
    const GradientOptions opt{.wrt_params = true};
    auto ws = make_gradient_workspace(Ddim(), p.backend, p.nodes, model, x_T, opt);
    Adam adam({.learning_rate = 0.01});
    double first = 0, last = 0;
    for (int it = 0; it < 100; ++it) {
      const auto& r = gradient(Ddim(), p.backend, p.schedule, p.nodes, model, x_T, loss, opt, ws);
      if (it == 0) first = r.loss;
      last = r.loss;
      adam.step(model.params(), r.grad_params);
    }
    INFO("loss " << first << " -> " << last);
    CHECK(last < 0.1 * first);
  }
}

TEST_CASE("optimisers reject bad input", "[optimizer][errors]") {
  CHECK_THROWS_AS(GradientDescent(0.0), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(GradientDescent(-1.0), Catch::Contains("learning_rate"));
  CHECK_THROWS_WITH(Adam({.learning_rate = 0.1, .beta1 = 1.0}), Catch::Contains("beta1"));
  CHECK_THROWS_WITH(Adam({.learning_rate = 0.1, .beta2 = -0.1}), Catch::Contains("beta2"));
  CHECK_THROWS_WITH(Adam({.learning_rate = 0.1, .epsilon = 0.0}), Catch::Contains("epsilon"));
  State x = State::Zero(2, 3);
  const State g = State::Zero(3, 2);
  CHECK_THROWS_WITH(GradientDescent(0.1).step(x, g),
                    Catch::Contains("argument 'grad' expected shape 2 x 3"));
  Adam adam;
  adam.step(x, State(State::Zero(2, 3)));
  State y = State::Zero(1, 3);
  CHECK_THROWS_WITH(adam.step(y, State(State::Zero(1, 3))), Catch::Contains("reset()"));
  adam.reset();
  adam.step(y, State(State::Zero(1, 3)));
  CHECK(adam.iterations() == 1);
}
