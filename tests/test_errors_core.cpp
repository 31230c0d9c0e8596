// Error paths of the core: every rejected input throws diffgrad::invalid_argument whose message
// names the function, the argument, what was expected and what was given; a model that
// produces NaN/Inf makes sampling throw diffgrad::numerical_error naming the step.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_cosine.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Catch::Matchers::Contains;
using State = EigenBackend<double>::state_type;

namespace {

using diffgrad::testing::thrown;

/// Matches a message that names the function and the argument, in the format of
/// detail::throw_argument: "<where>: argument '<arg>' expected <...>, got <...>".
class NamesArgument : public Catch::MatcherBase<std::string> {
public:
  NamesArgument(std::string where, std::string arg)
      : prefix_(std::move(where) + ": argument '" + std::move(arg) + "' expected ") {}
  bool match(const std::string& message) const override {
    const auto at = message.find(prefix_);
    return at != std::string::npos && message.find(", got ", at) != std::string::npos;
  }
  std::string describe() const override {
    return "starts with \"" + prefix_ + "\" and says what was given";
  }

private:
  std::string prefix_;
};
NamesArgument names(std::string where, std::string arg) {
  return {std::move(where), std::move(arg)};
}

/// A model that misbehaves on its `bad_call`-th evaluation (0-based) and is the exact
/// Gaussian eps otherwise.
struct BrokenModel {
  enum class Fault { nan, inf, wrong_batch, wrong_dim };
  Fault fault;
  int bad_call = 0;
  int calls = 0;
  models::GaussianData<double> exact = diffgrad::testing::gaussian_problem<double>(2);
  void eps(const State& x, const Node& n, State& out) {
    exact.eps(x, n, out);
    if (calls++ != bad_call) return;
    switch (fault) {
    case Fault::nan: out(0, 1) = std::numeric_limits<double>::quiet_NaN(); break;
    case Fault::inf: out(x.rows() - 1, 0) = -std::numeric_limits<double>::infinity(); break;
    case Fault::wrong_batch: out.resize(x.rows() + 1, x.cols()); break;
    case Fault::wrong_dim: out.resize(x.rows(), x.cols() - 1); break;
    }
  }
};

std::string sample_with(BrokenModel model) {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 5, 1.0, 1e-3));
  State x = diffgrad::testing::test_batch<double>(3, 2);
  if (model.fault == BrokenModel::Fault::nan || model.fault == BrokenModel::Fault::inf)
    return thrown<diffgrad::numerical_error>(
        [&] { sample(Ddim(), backend, schedule, nodes, model, x); });
  return thrown([&] { sample(Ddim(), backend, schedule, nodes, model, x); });
}

} // namespace

TEST_CASE("A non-monotone time grid is rejected, naming 'times' and the index", "[errors]") {
  const VPLinearSchedule s;
  const std::vector<double> zigzag{1.0, 0.5, 0.75, 0.125}; // binary-exact: readable in messages
  CHECK_THAT(thrown([&] { make_nodes(s, zigzag); }), names("make_nodes", "times") &&
                                                         Contains("times[2] = 0.75") &&
                                                         Contains("follows 0.5"));
  const std::vector<double> repeated{1.0, 0.5, 0.5};
  CHECK_THAT(thrown([&] { make_nodes(s, repeated); }), names("make_nodes", "times"));
  const std::vector<double> with_nan{1.0, std::nan(""), 0.1};
  CHECK_THAT(thrown([&] { make_nodes(s, with_nan); }),
             names("make_nodes", "times") && Contains("finite"));
  const std::vector<double> single{1.0};
  CHECK_THAT(thrown([&] { make_nodes(s, single); }),
             names("make_nodes", "times") && Contains("at least 2"));
}

TEST_CASE("Hand-built nodes with non-increasing lambda are rejected by the scheme", "[errors]") {
  const VPLinearSchedule s;
  std::vector<Node> nodes{s.node(1.0), s.node(0.2), s.node(0.5)};
  const EigenBackend<double> backend;
  auto model = diffgrad::testing::gaussian_problem<double>(2);
  State x = diffgrad::testing::test_batch<double>(1, 2);
  CHECK_THAT(thrown([&] { sample(Ddim(), backend, s, nodes, model, x); }),
             names("Ddim", "nodes") && Contains("at node 2"));
  // Inversion wants the opposite direction.
  std::vector<Node> forward{s.node(1.0), s.node(0.5)};
  CHECK_THAT(thrown([&] { DdimInversion().validate(forward); }),
             names("DdimInversion", "nodes") && Contains("data -> noise"));
}

TEST_CASE("A time outside the schedule's domain is rejected, naming 't'", "[errors]") {
  CHECK_THAT(thrown([] { VPLinearSchedule().node(1.5); }),
             names("VPLinearSchedule::node", "t") && Contains("[0.001, 1]") && Contains("1.5"));
  CHECK_THAT(thrown([] { VPCosineSchedule().node(0.0); }), names("VPCosineSchedule::node", "t"));
  CHECK_THAT(thrown([] { VESchedule().node(-0.1); }), names("VESchedule::node", "t"));
  CHECK_THAT(thrown([] { SubVPSchedule().node(2.0); }), names("SubVPSchedule::node", "t"));
  CHECK_THAT(thrown([] { EDMSchedule().node(100.0); }), names("EDMSchedule::node", "t"));
  CHECK_THAT(thrown([] { DiscreteSchedule::from_beta_schedule(BetaSchedule::linear).node(0.0); }),
             names("DiscreteSchedule::node", "t"));
  CHECK_THAT(thrown([] {
               DiscreteSchedule::from_beta_schedule(BetaSchedule::linear).timestep_node(1000);
             }),
             names("DiscreteSchedule::timestep_node", "k") && Contains("got 1000"));
}

TEST_CASE("Grid arguments outside their ranges are rejected, each by name", "[errors]") {
  const VPLinearSchedule s;
  CHECK_THAT(thrown([&] { uniform_t_grid(s, 0, 1.0, 0.1); }),
             names("uniform_t_grid", "num_steps") && Contains("got 0"));
  CHECK_THAT(thrown([&] { uniform_lambda_grid(s, 10, 1.5, 0.1); }),
             names("uniform_lambda_grid", "t_start") && Contains("got 1.5"));
  CHECK_THAT(thrown([&] { quadratic_t_grid(s, 10, 0.1, 0.5); }),
             names("quadratic_t_grid", "t_start"));
  CHECK_THAT(thrown([&] { karras_grid(s, 10, 1.0, 1e-4); }),
             names("karras_grid", "t_end") && Contains("t_min = 0.001"));
  CHECK_THAT(thrown([&] { karras_grid(s, 10, 1.0, 0.01, 0.0); }),
             names("karras_grid", "rho") && Contains("got 0"));
}

TEST_CASE("Bad schedule parameters are rejected, each by name", "[errors]") {
  CHECK_THAT(thrown([] { VPLinearSchedule(0.0, 20.0); }), names("VPLinearSchedule", "beta_min"));
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 0.05); }), names("VPLinearSchedule", "beta_max"));
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 20.0, 0.5, 0.4); }),
             names("VPLinearSchedule", "t_min"));
  CHECK_THAT(thrown([] { VPCosineSchedule(0.0); }), names("VPCosineSchedule", "s"));
  CHECK_THAT(thrown([] { VPCosineSchedule(0.008, 1e-3, 1.0); }),
             names("VPCosineSchedule", "t_max") && Contains("got 1"));
  CHECK_THAT(thrown([] { VPCosineSchedule(0.008, 0.0, 0.9); }), names("VPCosineSchedule", "t_min"));
  CHECK_THAT(thrown([] { VESchedule(-1.0, 50.0); }), names("VESchedule", "sigma_min"));
  CHECK_THAT(thrown([] { VESchedule(0.01, 0.001); }), names("VESchedule", "sigma_max"));
  CHECK_THAT(thrown([] { VESchedule(0.01, 50.0, 1.0, 1.0); }), names("VESchedule", "t_min"));
  CHECK_THAT(thrown([] { SubVPSchedule(-0.1); }), names("SubVPSchedule", "beta_min"));
  CHECK_THAT(thrown([] { EDMSchedule(0.0, 80.0); }), names("EDMSchedule", "sigma_min"));
  CHECK_THAT(thrown([] { EDMSchedule(1.0, 0.5); }), names("EDMSchedule", "sigma_max"));
  CHECK_THAT(thrown([] { make_betas(BetaSchedule::linear, 1); }),
             names("make_betas", "num_train_timesteps") && Contains("got 1"));
  CHECK_THAT(thrown([] {
               DiscreteSchedule::from_betas({0.1, 1.5, 0.2});
             }),
             names("DiscreteSchedule::from_betas", "betas") && Contains("got 1.5"));
  CHECK_THAT(thrown([] {
               DiscreteSchedule::from_alphas_cumprod({0.9, 0.95, 0.5});
             }),
             names("DiscreteSchedule", "alphas_cumprod") && Contains("strictly decreasing"));
  CHECK_THAT(thrown([] { DiscreteSchedule::from_alphas_cumprod({0.9}); }),
             names("DiscreteSchedule", "alphas_cumprod") && Contains("at least 2"));
}

TEST_CASE("Ddim rejects eta outside [0, 1]", "[errors][ddim]") {
  CHECK_THAT(thrown([] { Ddim(-0.1); }), names("Ddim", "eta") && Contains("got -0.1"));
  CHECK_THAT(thrown([] { Ddim(1.5); }), names("Ddim", "eta") && Contains("0 <= eta <= 1"));
  CHECK_THAT(thrown([] { Ddim(std::nan("")); }), names("Ddim", "eta"));
}

TEST_CASE("A model output whose batch size differs from the state's is rejected", "[errors]") {
  CHECK_THAT(sample_with({BrokenModel::Fault::wrong_batch, 2}),
             Contains("model output: expected shape 3 x 2") && Contains("got 4 x 2 at step 2"));
}

TEST_CASE("A model output whose dimension differs from the state's is rejected", "[errors]") {
  CHECK_THAT(sample_with({BrokenModel::Fault::wrong_dim, 0}),
             Contains("model output: expected shape 3 x 2") && Contains("got 3 x 1 at step 0"));
}

TEST_CASE("A state whose dimension differs from the model's is rejected by the model", "[errors]") {
  const auto model = diffgrad::testing::gaussian_problem<double>(2);
  State x(3, 5), out(3, 5);
  x.setZero();
  CHECK_THAT(thrown([&] { model.eps(x, VPLinearSchedule().node(0.5), out); }),
             names("GaussianData::eps", "x") && Contains("dimension 2") && Contains("got 5"));
  CHECK_THAT(thrown([] { models::GaussianData<double>(Eigen::VectorXd::Zero(2), 0.0); }),
             names("GaussianData", "s"));
}

TEST_CASE("NaN from the model raises numerical_error at the step where it appeared", "[errors]") {
  CHECK_THAT(sample_with({BrokenModel::Fault::nan, 3}),
             Contains("model output") && Contains("NaN or Inf at step 3") && Contains("t = "));
}

TEST_CASE("Inf from the model raises numerical_error at the step where it appeared", "[errors]") {
  CHECK_THAT(sample_with({BrokenModel::Fault::inf, 0}),
             Contains("NaN or Inf at step 0") && Contains("model time"));
}

TEST_CASE("The finiteness check can be switched off", "[errors]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 5, 1.0, 1e-3));
  State x = diffgrad::testing::test_batch<double>(3, 2);
  BrokenModel model{BrokenModel::Fault::nan, 1};
  SampleOptions options;
  options.check_finite = false;
  CHECK_NOTHROW(sample(Ddim(), backend, schedule, nodes, model, x, options));
  CHECK_FALSE(x.allFinite()); // the NaN propagated, as asked
}

TEST_CASE("run_scheme rejects a workspace built for another scheme", "[errors]") {
  const VPLinearSchedule schedule;
  const EigenBackend<double> backend;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 4, 1.0, 1e-3));
  auto model = diffgrad::testing::gaussian_problem<double>(2);
  State x = diffgrad::testing::test_batch<double>(3, 2);
  SamplerWorkspace<EigenBackend<double>> wrong(backend, /*history=*/2, /*stages=*/1, 3, 2);
  CHECK_THAT(thrown([&] {
               run_scheme(Ddim(), backend, nodes, NodeAtLambda(schedule),
                          EpsField<decltype(model)>{model}, x, wrong);
             }),
             Contains("run_scheme: argument 'ws' expected"));
  SamplerWorkspace<EigenBackend<double>> ws(backend, 0, 1, 3, 2);
  std::vector<State> too_little_noise(2, State::Zero(3, 2));
  ws.given_noise = too_little_noise;
  CHECK_THAT(thrown([&] {
               run_scheme(Ddim(0.5), backend, nodes, NodeAtLambda(schedule),
                          EpsField<decltype(model)>{model}, x, ws);
             }),
             names("run_scheme", "ws.given_noise") && Contains("(4)") && Contains("got 2"));
}
