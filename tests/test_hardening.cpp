// Hardening (issue 11): inputs that used to read or write out of bounds, or to pass silently
// as NaN, are refused by the shared mechanism (the engine, the inversion engine, the backend,
// the schedules' constructors, the Mlp layout) with an exception that names the argument.
// Every out-of-bounds case here must throw before touching memory in a Release (NDEBUG)
// build too, where Eigen's own size asserts are compiled out: CI also runs this file under
// AddressSanitizer with NDEBUG.
#include <catch2/catch.hpp>

#include <climits>
#include <cmath>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/coupling.hpp"
#include "diffgrad/inversion/edict.hpp"
#include "diffgrad/models/gaussian.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/edm.hpp"
#include "diffgrad/schedule/sub_vp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_cosine.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using Catch::Matchers::Contains;
using Cpu = EigenBackend<double>;
using State = Cpu::state_type;
using Vector = Cpu::vector_type;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

using diffgrad::testing::thrown;

/// "<where>: argument '<arg>' expected": the prefix of detail::throw_argument.
std::string names(const std::string& where, const std::string& arg) {
  return where + ": argument '" + arg + "' expected ";
}

models::GaussianData<double> gaussian() { return diffgrad::testing::gaussian_problem<double>(2); }

std::vector<Node> vp_nodes(int steps) {
  const VPLinearSchedule s;
  return make_nodes(s, uniform_t_grid(s, steps, 1.0, 1e-3));
}

/// eps = 0.5 whatever x is: a model that never reads its input, so a NaN x_T cannot show up
/// in its output.
struct ConstantModel {
  void eps(const State& x, const Node&, State& out) const {
    out.setConstant(x.rows(), x.cols(), 0.5);
  }
};

/// The exact Gaussian eps whose VJP is broken: dx gets one row too many or too few.
struct BadVjpModel {
  enum class Fault { extra_row, missing_row };
  Fault fault;
  models::GaussianData<double> exact = gaussian();
  std::int64_t cond_size() const { return exact.cond_size(); }
  std::int64_t param_size() const { return exact.param_size(); }
  void eps(const State& x, const Node& n, State& out) const { exact.eps(x, n, out); }
  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) const {
    exact.vjp(x, n, a, dx, dcond, dparams);
    switch (fault) {
    case Fault::extra_row: dx.conservativeResize(dx.rows() + 1, dx.cols()); break;
    case Fault::missing_row: dx.conservativeResize(dx.rows() - 1, dx.cols()); break;
    }
  }
};

} // namespace

// ---- item 2: out-of-bounds reads/writes -------------------------------------------------

TEST_CASE("run_scheme refuses an x whose shape differs from the workspace's", "[hardening]") {
  const VPLinearSchedule schedule;
  const Cpu backend;
  const auto nodes = vp_nodes(4);
  auto model = gaussian();
  SamplerWorkspace<Cpu> ws(backend, 0, 1, 3, 2);
  SamplerWorkspace<Cpu> ws2(backend, 1, 1, 3, 2); // multistep: x and e rings of 2
  for (const Eigen::Index rows : {4, 2}) {        // more rows (overflow), fewer rows (was blamed
                                                  // on the model's output shape)
    INFO("x has " << rows << " rows, the workspace 3");
    State x = diffgrad::testing::test_batch<double>(rows, 2);
    CHECK_THAT(thrown([&] {
                 run_scheme(Ddim(), backend, nodes, NodeAtLambda(schedule),
                            EpsField<decltype(model)>{model}, x, ws);
               }),
               Contains(names("run_scheme", "x")) && Contains("3 x 2") &&
                   Contains(std::to_string(rows) + " x 2"));
    CHECK_THAT(thrown([&] {
                 run_scheme(DpmSolverMultistep(), backend, nodes, NodeAtLambda(schedule),
                            EpsField<decltype(model)>{model}, x, ws2);
               }),
               Contains(names("run_scheme", "x")));
  }
  // A workspace whose public buffers were swapped for states of another shape.
  State x = diffgrad::testing::test_batch<double>(3, 2);
  ws2.e[1] = State::Zero(5, 2);
  CHECK_THAT(thrown([&] {
               run_scheme(DpmSolverMultistep(), backend, nodes, NodeAtLambda(schedule),
                          EpsField<decltype(model)>{model}, x, ws2);
             }),
             Contains(names("run_scheme", "ws")));
}

TEST_CASE("run_scheme refuses given noise of another shape", "[hardening]") {
  const VPLinearSchedule schedule;
  const Cpu backend;
  const auto nodes = vp_nodes(4);
  auto model = gaussian();
  for (const Eigen::Index rows : {2, 4}) {
    INFO("noise of step 2 has " << rows << " rows, the state 3");
    State x = diffgrad::testing::test_batch<double>(3, 2);
    SamplerWorkspace<Cpu> ws(backend, 0, 1, 3, 2);
    std::vector<State> noise(4, State::Ones(3, 2));
    noise[2] = State::Ones(rows, 2);
    ws.given_noise = noise;
    CHECK_THAT(thrown([&] {
                 run_scheme(Ddim(0.5), backend, nodes, NodeAtLambda(schedule),
                            EpsField<decltype(model)>{model}, x, ws);
               }),
               Contains(names("run_scheme", "ws.given_noise[2]")) && Contains("3 x 2"));
  }
}

TEST_CASE("EigenBackend::lincomb checks every term's shape, with and without noise",
          "[hardening][backend]") {
  const Cpu backend;
  const State a = State::Ones(3, 2);
  const State big = State::Ones(4, 2), small = State::Ones(2, 2);
  for (const State* other : {&big, &small}) {
    State out = State::Zero(3, 2);
    const LinTerm<State> terms[] = {term(1.0, a), term(2.0, *other)};
    CHECK_THAT(thrown([&] { backend.lincomb(out, std::span<const LinTerm<State>>(terms)); }),
               Contains(names("EigenBackend::lincomb", "terms[1]")) && Contains("3 x 2"));
    CHECK_THAT(thrown([&] {
                 backend.lincomb(out, std::span<const LinTerm<State>>(terms), NoiseTerm{1.0, 1, 2});
               }),
               Contains(names("EigenBackend::lincomb", "terms[1]")));
    // The fixed-arity form: terms that disagree with each other.
    CHECK_THAT(thrown([&] { backend.lincomb(out, term(1.0, a), term(2.0, *other)); }),
               Contains(names("EigenBackend::lincomb", "terms[1]")));
  }
  // An output of another shape takes the terms' shape, in every form (as CudaBackend does):
  // never written out of bounds.
  const LinTerm<State> same[] = {term(1.0, a), term(2.0, a)};
  for (const Eigen::Index rows : {2, 4}) {
    State out = State::Zero(rows, 2);
    backend.lincomb(out, std::span<const LinTerm<State>>(same));
    CHECK(out == State::Constant(3, 2, 3.0));
    State noisy = State::Zero(rows, 2);
    backend.lincomb(noisy, std::span<const LinTerm<State>>(same), NoiseTerm{1.0, 1, 2});
    State expected = State::Zero(3, 2);
    backend.lincomb(expected, NoiseTerm{1.0, 1, 2}, term(3.0, a));
    CHECK(noisy == expected);
  }
}

TEST_CASE("Reversible steppers check the shape of the model VJP's dx", "[hardening][inversion]") {
  const VPLinearSchedule s;
  const Cpu backend;
  const auto nodes = vp_nodes(5);
  const State x_T = diffgrad::testing::test_batch<double>(3, 2);
  auto cot = [](const State& x0, State& g) { g = x0; };
  for (const auto fault : {BadVjpModel::Fault::extra_row, BadVjpModel::Fault::missing_row}) {
    BadVjpModel model{fault};
    INFO("fault " << static_cast<int>(fault));
    const auto expect = Contains("model vjp: expected dx of shape 3 x 2, got ");
    CHECK_THAT(
        thrown([&] { reversible_gradient(BdiaDdim(1.0), backend, s, nodes, model, x_T, cot); }),
        expect);
    CHECK_THAT(
        thrown([&] { reversible_gradient(Edict(0.93), backend, s, nodes, model, x_T, cot); }),
        expect);
    CHECK_THAT(thrown([&] {
                 reversible_gradient(ReversibleCoupling<Ddim>(Ddim(), 0.99), backend, s, nodes,
                                     model, x_T, cot);
               }),
               expect);
  }
}

// ---- item 4: refuse non-finite inputs by name -------------------------------------------

TEST_CASE("sample refuses a non-finite x_T by name, whatever the model does with it",
          "[hardening]") {
  const VPLinearSchedule schedule;
  const Cpu backend;
  const auto nodes = vp_nodes(4);
  auto exact = gaussian();
  ConstantModel constant;
  for (const double bad : {kNaN, kInf}) {
    State x = diffgrad::testing::test_batch<double>(3, 2);
    x(1, 1) = bad;
    // The exact model propagates the NaN (it was blamed on the model's output) ...
    CHECK_THAT(thrown([&] { sample(Ddim(), backend, schedule, nodes, exact, x); }),
               Contains(names("sample", "x")) && Contains("finite"));
    // ... a model that ignores x hid it (the sample came back NaN without a word).
    CHECK_THAT(thrown([&] { sample(Ddim(), backend, schedule, nodes, constant, x); }),
               Contains(names("sample", "x")));
    SamplerWorkspace<Cpu> ws(backend, 0, 1, 3, 2);
    CHECK_THAT(thrown([&] {
                 run_scheme(Ddim(), backend, nodes, NodeAtLambda(schedule),
                            EpsField<ConstantModel>{constant}, x, ws);
               }),
               Contains(names("run_scheme", "x")));
  }
  // check_finite = false turns every finiteness check off, this one included.
  State x = diffgrad::testing::test_batch<double>(3, 2);
  x(0, 0) = kNaN;
  SampleOptions unchecked;
  unchecked.check_finite = false;
  CHECK_NOTHROW(sample(Ddim(), backend, schedule, nodes, constant, x, unchecked));
}

TEST_CASE("run_scheme refuses NaN in the given noise by name", "[hardening]") {
  const VPLinearSchedule schedule;
  const Cpu backend;
  const auto nodes = vp_nodes(4);
  ConstantModel model;
  State x = diffgrad::testing::test_batch<double>(3, 2);
  SamplerWorkspace<Cpu> ws(backend, 0, 1, 3, 2);
  std::vector<State> noise(4, State::Ones(3, 2));
  noise[3](2, 1) = kNaN;
  ws.given_noise = noise;
  CHECK_THAT(thrown([&] {
               run_scheme(Ddim(0.5), backend, nodes, NodeAtLambda(schedule),
                          EpsField<ConstantModel>{model}, x, ws);
             }),
             Contains(names("run_scheme", "ws.given_noise[3]")) && Contains("finite"));
}

TEST_CASE("The inversion entry points refuse non-finite inputs by name", "[hardening][inversion]") {
  const VPLinearSchedule s;
  const Cpu backend;
  const auto nodes = vp_nodes(5);
  auto model = gaussian();
  ConstantModel constant;
  State bad = diffgrad::testing::test_batch<double>(3, 2);
  bad(2, 0) = kNaN;
  const State good = diffgrad::testing::test_batch<double>(3, 2);

  LatentPair<State> latent;
  CHECK_THAT(thrown([&] { invert(BdiaDdim(1.0), backend, s, nodes, model, bad, latent); }),
             Contains(names("invert", "x0")));
  CHECK_THAT(thrown([&] { invert(Edict(0.93), backend, s, nodes, constant, bad, latent); }),
             Contains(names("invert", "x0")));

  State x;
  const LatentPair<State> bad_first{bad, good}, bad_second{good, bad};
  CHECK_THAT(thrown([&] { generate(Edict(0.93), backend, s, nodes, constant, bad_first, x); }),
             Contains(names("generate", "latent.first")));
  CHECK_THAT(thrown([&] { generate(BdiaDdim(1.0), backend, s, nodes, model, bad_second, x); }),
             Contains(names("generate", "latent.second")));

  State y = bad;
  CHECK_THAT(thrown([&] { sample_from_noise(BdiaDdim(1.0), backend, s, nodes, constant, y); }),
             Contains(names("sample_from_noise", "x")));
  CHECK_THAT(
      thrown([&] { sample_from_noise(ReversibleCoupling<Ddim>(), backend, s, nodes, model, y); }),
      Contains(names("sample_from_noise", "x")));
}

// ---- items 4 and 5: schedules whose alpha underflows are refused at construction ----------

TEST_CASE("Schedules refuse parameters for which alpha underflows or lambda is not finite",
          "[hardening][schedule]") {
  // log alpha(1) = -(3000 - 0.1)/4 - 0.05 = -750: alpha = 0 in double. This used to surface
  // as "model output: NaN" at the first step.
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 3000); }),
             Contains("VPLinearSchedule: arguments 'beta_min', 'beta_max', 't_max' expected") &&
                 Contains("-750"));
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 20, 1e-3, 30); }), // t_max = 30: -4479
             Contains("VPLinearSchedule: arguments 'beta_min', 'beta_max', 't_max' expected"));
  CHECK_THAT(thrown([] { SubVPSchedule(0.1, 3000); }),
             Contains("SubVPSchedule: arguments 'beta_min', 'beta_max', 't_max' expected"));
  // The other end: sigma(t_min) rounds to 0, lambda(t_min) = +inf.
  CHECK_THAT(thrown([] { VPLinearSchedule(1e-300, 20, 1e-300); }),
             Contains("VPLinearSchedule: arguments 'beta_min', 'beta_max', 't_min' expected"));
  CHECK_THAT(thrown([] { SubVPSchedule(1e-300, 20, 1e-300); }),
             Contains("SubVPSchedule: arguments 'beta_min', 'beta_max', 't_min' expected"));
  CHECK_THAT(thrown([] { VPCosineSchedule(0.008, 1e-322); }),
             Contains("VPCosineSchedule: arguments 's', 't_min' expected"));
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 20, 1e-3, kInf); }),
             Contains(names("VPLinearSchedule", "t_max")));
  CHECK_THAT(thrown([] { VPLinearSchedule(0.1, 20, kNaN); }),
             Contains(names("VPLinearSchedule", "t_min")));
  CHECK_THAT(thrown([] { VPCosineSchedule(0.008, kNaN); }),
             Contains(names("VPCosineSchedule", "t_min")));
  CHECK_THAT(thrown([] { EDMSchedule(0.002, kInf); }), Contains(names("EDMSchedule", "sigma_max")));
  CHECK_THAT(thrown([] { VESchedule(0.01, kInf); }), Contains(names("VESchedule", "sigma_max")));
  // sigma(t_max) = 0.01 * 5000^1000 overflows.
  CHECK_THAT(thrown([] { VESchedule(0.01, 50, 1e-5, 1000); }),
             Contains("VESchedule: arguments 'sigma_min', 'sigma_max', 't_max' expected"));
  CHECK_THAT(thrown([] { VESchedule(0.01, 50, 1e-5, kInf); }),
             Contains(names("VESchedule", "t_max")));

  // Extreme but representable settings still construct, and every node is finite.
  const VPLinearSchedule steep(0.1, 2800); // log alpha(1) = -700
  const Node end = steep.node(1.0);
  CHECK(end.alpha > 0.0);
  CHECK(std::isfinite(end.lambda));
  CHECK_NOTHROW(VPCosineSchedule(0.008, 1e-3, 0.99999999));
  CHECK_NOTHROW(VESchedule(0.01, 50, 0.0, 1.0));
  CHECK_NOTHROW(EDMSchedule(1e-6, 1e6));
}

// ---- item 6: integer overflow in the Mlp layout -----------------------------------------

TEST_CASE("Mlp refuses sizes whose arithmetic overflows, from a config or a file",
          "[hardening][models]") {
  using Mlp = models::Mlp<double>;
  // dim + 2F + cond_dim overflows int.
  models::MlpConfig wide_input;
  wide_input.dim = INT_MAX;
  wide_input.cond_dim = 10;
  wide_input.hidden = {};
  CHECK_THAT(thrown([&] { Mlp net(wide_input); }), Contains("Mlp: argument 'config'"));
  // Three 2e9 x 2e9 weight matrices: 1.2e19 parameters overflow std::int64_t.
  models::MlpConfig deep;
  deep.dim = 2;
  deep.hidden = {2000000000, 2000000000, 2000000000, 2000000000};
  CHECK_THAT(thrown([&] { Mlp net(deep); }), Contains("Mlp: argument 'config.hidden'"));
  // Fits std::int64_t (4e18 parameters) but not as a byte count.
  models::MlpConfig huge;
  huge.dim = 2;
  huge.hidden = {2000000000, 2000000000};
  CHECK_THAT(thrown([&] { Mlp net(huge); }), Contains("Mlp: argument 'config.hidden'"));

  // The same sizes from a corrupt file.
  std::istringstream corrupt("diffgrad-mlp 1\ndim 2\ncond_dim 0\ntime_frequencies 4\n"
                             "time_scale 1\nactivation silu\nhidden 4 2000000000 2000000000 "
                             "2000000000 2000000000\nparams 7\n");
  CHECK_THAT(thrown([&] { Mlp::load(corrupt); }), Contains("config.hidden"));
  std::istringstream wide("diffgrad-mlp 1\ndim 2147483647\ncond_dim 10\n"
                          "time_frequencies 4\ntime_scale 1\nactivation silu\nhidden 0\n"
                          "params 7\n");
  CHECK_THAT(thrown([&] { Mlp::load(wide); }), Contains("Mlp: argument 'config'"));
  // A file that declares many parameters but holds few fails at the first missing value
  // (the parameters are read before anything of the declared size is allocated).
  std::istringstream truncated("diffgrad-mlp 1\ndim 2\ncond_dim 0\ntime_frequencies 0\n"
                               "time_scale 1\nactivation tanh\nhidden 1 3\nparams 17\n0.5\n0.25\n");
  CHECK_THAT(thrown([&] { Mlp::load(truncated); }),
             Contains(names("Mlp::load", "stream")) && Contains("17 parameter values"));
  // A sane network still round-trips.
  models::MlpConfig small;
  small.dim = 2;
  small.hidden = {3};
  const Mlp net(small, 5);
  std::stringstream io;
  net.save(io);
  const Mlp back = Mlp::load(io);
  CHECK(back.params() == net.params());
}
