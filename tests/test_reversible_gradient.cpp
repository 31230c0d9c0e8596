// Reversible (O(1)-memory) gradients of BDIA-DDIM, EDICT and the reversible coupling:
// equal to the store-all exact discrete adjoint (derived by hand below, run on the STORED
// forward states) to <= 1e-10, to central finite differences to <= 1e-7, with the cost
// record showing N forward + N backward model calls, N VJPs and a state count independent
// of N. Also: the test model's own VJP, latent gradients, and the error paths.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "diffgrad/gradients/gradient.hpp" // the generic store-all discrete adjoint
#include "diffgrad/gradients/reversible.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/coupling.hpp"
#include "diffgrad/inversion/edict.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "inversion_test_model.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::testing::MixtureModel;
using diffgrad::testing::test_batch;

namespace {

using St = EigenBackend<double>::state_type;
using Vec = EigenBackend<double>::vector_type;
using Model = MixtureModel<double>;

std::vector<Node> grid(const VPLinearSchedule& s, int n) {
  return make_nodes(s, uniform_t_grid(s, n, 1.0, 1e-3));
}

double rel(const St& a, const St& b) { return (a - b).norm() / b.norm(); }
double rel(const Vec& a, const Vec& b) { return (a - b).norm() / b.norm(); }

/// The loss: L(x0) = <w, x0> + |x0 - r|^2 / 2, so dL/dx0 = w + x0 - r.
struct Loss {
  St w, r;
  Loss() : w(test_batch<double>(4, 3) * 0.7), r(test_batch<double>(4, 3).reverse() * 0.5) {}
  double operator()(const St& x0) const {
    return (w.cwiseProduct(x0)).sum() + 0.5 * (x0 - r).squaredNorm();
  }
  void grad(const St& x0, St& out) const { out = w + x0 - r; }
};

St noise() { return test_batch<double>(4, 3); }
St direction() {
  St v = test_batch<double>(4, 3);
  for (Eigen::Index i = 0; i < v.size(); ++i)
    v.data()[i] = std::cos(2.1 * static_cast<double>(i) + 0.3);
  return v;
}

/// Store-all exact discrete adjoint: each method's forward pass keeps every state it needs;
/// the backward pass is the hand-derived adjoint of the update actually used.
struct Reference {
  St grad_x;
  Vec grad_cond, grad_params;
};

Vec zeros(std::int64_t n) { return Vec::Zero(n); }

Reference bdia_store_all(Model& m, const std::vector<Node>& nodes, double gamma, const St& x_T,
                         const Loss& loss) {
  const int N = static_cast<int>(nodes.size()) - 1;
  std::vector<St> xs(static_cast<std::size_t>(N) + 1);
  St e, dx;
  const Node &n0 = nodes[0], &n1 = nodes[1];
  const double a0 = n1.alpha / n0.alpha, b0 = n1.sigma - n1.alpha * n0.sigma / n0.alpha;
  auto cz = [&](int k) {
    return (nodes[k + 1].alpha - gamma * nodes[k - 1].alpha) / nodes[k].alpha;
  };
  auto ce = [&](int k) {
    return (nodes[k + 1].sigma - gamma * nodes[k - 1].sigma) - nodes[k].sigma * cz(k);
  };
  xs[0] = x_T;
  m.eps(xs[0], n0, e);
  xs[1] = a0 * xs[0] + b0 * e;
  for (int k = 1; k < N; ++k) {
    m.eps(xs[k], nodes[k], e);
    xs[k + 1] = gamma * xs[k - 1] + cz(k) * xs[k] + ce(k) * e;
  }
  std::vector<St> abar(xs.size(), St::Zero(x_T.rows(), x_T.cols()));
  loss.grad(xs[N], abar[N]);
  Reference r{St(), zeros(m.cond_size()), zeros(m.param_size())};
  for (int k = N - 1; k >= 1; --k) {
    m.vjp(xs[k], nodes[k], St(ce(k) * abar[k + 1]), dx, &r.grad_cond, &r.grad_params);
    abar[k] += cz(k) * abar[k + 1] + dx;
    abar[k - 1] += gamma * abar[k + 1];
  }
  m.vjp(xs[0], n0, St(b0 * abar[1]), dx, &r.grad_cond, &r.grad_params);
  r.grad_x = abar[0] + a0 * abar[1] + dx;
  return r;
}

Reference edict_store_all(Model& m, const std::vector<Node>& nodes, double p, bool leapfrog,
                          const St& x_T, const Loss& loss) {
  const int N = static_cast<int>(nodes.size()) - 1;
  // Per step: the two model inputs (second before the step, first after its half-step).
  std::vector<St> in_second(static_cast<std::size_t>(N)), in_first(static_cast<std::size_t>(N));
  St x = x_T, y = x_T, e, dx;
  auto ab = [&](int k, double& a, double& b) {
    const Node &s = nodes[k], &t = nodes[k + 1];
    a = t.alpha / s.alpha;
    b = t.sigma - t.alpha * s.sigma / s.alpha;
  };
  for (int k = 0; k < N; ++k) {
    double a, b;
    ab(k, a, b);
    const bool sw = leapfrog && k % 2 == 1;
    St& f = sw ? y : x;
    St& g = sw ? x : y;
    in_second[k] = g;
    m.eps(g, nodes[k], e);
    f = a * f + b * e;
    in_first[k] = f;
    m.eps(f, nodes[k], e);
    g = a * g + b * e;
    x = p * x + (1 - p) * y;
    y = p * y + (1 - p) * x;
  }
  St xb, yb = St::Zero(x.rows(), x.cols());
  loss.grad(x, xb);
  Reference r{St(), zeros(m.cond_size()), zeros(m.param_size())};
  for (int k = N - 1; k >= 0; --k) {
    double a, b;
    ab(k, a, b);
    // Mixing: x2 = p x1 + (1-p) y1, y2 = p y1 + (1-p) x2.
    const St x2b = xb + (1 - p) * yb;
    const St y1b = p * yb + (1 - p) * x2b;
    St x1b = p * x2b;
    const bool sw = leapfrog && k % 2 == 1;
    St fb = sw ? y1b : x1b, gb = sw ? x1b : y1b;
    // g1 = a g + b eps(f1): adjoint into f1 and g.
    m.vjp(in_first[k], nodes[k], St(b * gb), dx, &r.grad_cond, &r.grad_params);
    fb += dx;
    gb = a * gb;
    // f1 = a f + b eps(g): adjoint into g and f.
    m.vjp(in_second[k], nodes[k], St(b * fb), dx, &r.grad_cond, &r.grad_params);
    gb += dx;
    fb = a * fb;
    xb = sw ? gb : fb;
    yb = sw ? fb : gb;
  }
  r.grad_x = xb + yb;
  return r;
}

Reference coupling_ddim_store_all(Model& m, const std::vector<Node>& nodes, double c, const St& x_T,
                                  const Loss& loss) {
  const int N = static_cast<int>(nodes.size()) - 1;
  std::vector<St> zs(static_cast<std::size_t>(N)), ys_new(static_cast<std::size_t>(N));
  St y = x_T, z = x_T, e, dx;
  auto ddim = [](const Node& s, const Node& t, double& a, double& b) {
    a = t.alpha / s.alpha;
    b = t.sigma - t.alpha * s.sigma / s.alpha;
  };
  for (int k = 0; k < N; ++k) {
    const Node &s = nodes[k], &t = nodes[k + 1];
    double a, b, ai, bi;
    ddim(s, t, a, b);
    ddim(t, s, ai, bi);
    zs[k] = z;
    m.eps(z, s, e);
    y = c * (y - z) + a * z + b * e;
    ys_new[k] = y;
    m.eps(y, t, e);
    z = z + y - (ai * y + bi * e);
  }
  St yb, zb = St::Zero(y.rows(), y.cols());
  loss.grad(y, yb);
  Reference r{St(), zeros(m.cond_size()), zeros(m.param_size())};
  for (int k = N - 1; k >= 0; --k) {
    const Node &s = nodes[k], &t = nodes[k + 1];
    double a, b, ai, bi;
    ddim(s, t, a, b);
    ddim(t, s, ai, bi);
    // z' = z + y' - (ai y' + bi eps(y', t))
    m.vjp(ys_new[k], t, St(-bi * zb), dx, &r.grad_cond, &r.grad_params);
    const St Y = yb + zb - ai * zb + dx; // total dL/dy'
    // y' = c y - c z + a z + b eps(z, s)
    m.vjp(zs[k], s, St(b * Y), dx, &r.grad_cond, &r.grad_params);
    zb = zb - c * Y + a * Y + dx;
    yb = c * Y;
  }
  r.grad_x = yb + zb;
  return r;
}

/// BDIA-DDIM written as a StepPlan scheme with state history (x_{k+1} = gamma x_{k-1} +
/// cz x_k + ce e_k; step 0 is DDIM), with the reference formulas for cz and ce, so the
/// library's generic exact discrete adjoint (gradients/gradient.hpp) applies to it.
struct BdiaAsStepPlan {
  double gamma;
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_nodes(nodes, "BdiaAsStepPlan"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const auto k = static_cast<std::size_t>(i);
    const Node &cur = nodes[k], &next = nodes[k + 1];
    StepPlan p;
    p.stage_node[0] = cur;
    if (i == 0) {
      p.output.x = next.alpha / cur.alpha;
      p.output.e[0] = next.sigma - next.alpha * cur.sigma / cur.alpha;
      return p;
    }
    const Node& prev = nodes[k - 1];
    const double cz = (next.alpha - gamma * prev.alpha) / cur.alpha;
    p.output.x = cz;
    p.output.e[0] = (next.sigma - gamma * prev.sigma) - cur.sigma * cz;
    p.output.hist_x[0] = gamma;
    return p;
  }
};

/// The test loss as a LossFunction (gradients/loss.hpp).
struct LossFunctionAdapter {
  const Loss& loss;
  double operator()(const EigenBackend<double>&, const St& x0, St& grad) const {
    loss.grad(x0, grad);
    return loss(x0);
  }
};

/// Central finite differences of L(sample_from_noise(...)) along x_T + h v, and per entry of
/// the conditioning and the parameters.
template <class Method> struct FiniteDifferences {
  const Method& method;
  const VPLinearSchedule& s;
  const std::vector<Node>& nodes;
  Model model;
  const Loss& loss;
  double h = 1e-5;

  double L(const St& x_T, Model& m) const {
    St x = x_T;
    sample_from_noise(method, EigenBackend<double>(), s, nodes, m, x);
    return loss(x);
  }
  double directional(const St& x_T, const St& v) {
    return (L(x_T + h * v, model) - L(x_T - h * v, model)) / (2 * h);
  }
  Vec cond(const St& x_T) {
    Vec g(model.cond_size());
    for (Eigen::Index j = 0; j < g.size(); ++j) g(j) = entry(x_T, model.cond()(j));
    return g;
  }
  Vec params(const St& x_T) {
    Vec g(model.param_size());
    for (Eigen::Index j = 0; j < g.size(); ++j) g(j) = entry(x_T, model.logits()(j));
    return g;
  }

private:
  double entry(const St& x_T, double& slot) {
    const double keep = slot;
    slot = keep + h;
    const double up = L(x_T, model);
    slot = keep - h;
    const double down = L(x_T, model);
    slot = keep;
    return (up - down) / (2 * h);
  }
};

template <class Method>
ReversibleGradientResult<EigenBackend<double>>
run(const Method& method, Model& model, const std::vector<Node>& nodes, const Loss& loss) {
  const VPLinearSchedule s;
  return reversible_gradient(method, EigenBackend<double>(), s, nodes, model, noise(),
                             [&](const St& x0, St& g) { loss.grad(x0, g); });
}

template <class Method>
void check_against_fd(const Method& method, const ReversibleGradientResult<EigenBackend<double>>& r,
                      const std::vector<Node>& nodes, const Loss& loss) {
  const VPLinearSchedule s;
  FiniteDifferences<Method> fd{method, s, nodes, Model::standard(), loss};
  const St v = direction();
  const double dir = fd.directional(noise(), v);
  const double ours = r.grad_x.cwiseProduct(v).sum();
  const double cond_err = rel(r.grad_cond, fd.cond(noise()));
  const double params_err = rel(r.grad_params, fd.params(noise()));
  INFO("FD: directional " << std::abs(ours - dir) / std::abs(dir) << ", cond " << cond_err
                          << ", params " << params_err);
  CHECK(std::abs(ours - dir) <= 1e-7 * std::abs(dir));
  CHECK(cond_err <= 1e-7);
  CHECK(params_err <= 1e-7);
}

void check_against_reference(const ReversibleGradientResult<EigenBackend<double>>& r,
                             const Reference& ref) {
  const double ex = rel(r.grad_x, ref.grad_x), ec = rel(r.grad_cond, ref.grad_cond),
               ep = rel(r.grad_params, ref.grad_params);
  INFO("vs store-all: x " << ex << ", cond " << ec << ", params " << ep << "; reconstruction error "
                          << r.reconstruction_error);
  CHECK(ex <= 1e-10);
  CHECK(ec <= 1e-10);
  CHECK(ep <= 1e-10);
  CHECK(r.reconstruction_error <= 1e-13);
}

} // namespace

TEST_CASE("The test model's VJP matches finite differences", "[reversible][model]") {
  auto m = Model::standard();
  const VPLinearSchedule s;
  const St x = noise() * 0.6, a = direction();
  const double h = 1e-6;
  for (double t : {0.9, 0.3, 0.02}) {
    const Node n = s.node(t);
    St dx, ep, em;
    Vec dc = Vec::Zero(3), dp = Vec::Zero(3);
    m.vjp(x, n, a, dx, &dc, &dp);
    // <a, eps(x + h v) - eps(x - h v)> / 2h = <dx, v>
    const St v = test_batch<double>(4, 3).reverse();
    m.eps(x + h * v, n, ep);
    m.eps(x - h * v, n, em);
    const double fd = a.cwiseProduct(ep - em).sum() / (2 * h);
    CHECK(dx.cwiseProduct(v).sum() == Approx(fd).epsilon(1e-7));
    for (int j = 0; j < 3; ++j) {
      for (int which = 0; which < 2; ++which) {
        double& slot = which == 0 ? m.cond()(j) : m.logits()(j);
        const double keep = slot;
        slot = keep + h;
        m.eps(x, n, ep);
        slot = keep - h;
        m.eps(x, n, em);
        slot = keep;
        const double g = a.cwiseProduct(ep - em).sum() / (2 * h);
        CHECK((which == 0 ? dc(j) : dp(j)) == Approx(g).epsilon(1e-7).margin(1e-12));
      }
    }
  }
}

TEST_CASE("BDIA reversible gradient = store-all exact discrete gradient (N = 50)",
          "[reversible][bdia]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  for (double gamma : {1.0, 0.9}) {
    auto model = Model::standard();
    const BdiaDdim method(gamma);
    const auto r = run(method, model, nodes, loss);
    auto ref_model = Model::standard();
    INFO("gamma " << gamma);
    check_against_reference(r, bdia_store_all(ref_model, nodes, gamma, noise(), loss));
    check_against_fd(method, r, nodes, loss);
    // Cost: N forward calls, N - 1 re-evaluations (the last inverse step hands back x_T's
    // DDIM input for free), N VJPs.
    CHECK(r.cost.forward_model_evals == 50);
    CHECK(r.cost.backward_model_evals == 49);
    CHECK(r.cost.vjps == 50);
    CHECK(r.cost.trajectory_states == 2);
    CHECK_FALSE(r.amplification.exceeded);
  }
}

TEST_CASE("BDIA reversible gradient = the library's store-all discrete adjoint (gradient.hpp)",
          "[reversible][bdia][store-all]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  const EigenBackend<double> backend;
  for (double gamma : {1.0, 0.9}) {
    auto model = Model::standard();
    const auto r = run(BdiaDdim(gamma), model, nodes, loss);
    GradientOptions opt;
    opt.wrt_cond = opt.wrt_params = true; // memory: store_all (the default)
    auto ref_model = Model::standard();
    const auto ref = gradient(BdiaAsStepPlan{gamma}, backend, s, nodes, ref_model, noise(),
                              LossFunctionAdapter{loss}, opt);
    const double es = rel(r.sample, ref.x0), ex = rel(r.grad_x, ref.grad_x),
                 ec = rel(r.grad_cond, ref.grad_cond), ep = rel(r.grad_params, ref.grad_params);
    INFO("gamma " << gamma << ": sample " << es << ", x " << ex << ", cond " << ec << ", params "
                  << ep << "; store-all kept " << ref.cost.peak_stored_states << " states, "
                  << ref.cost.model_evals << " evals, " << ref.cost.vjps << " VJPs");
    CHECK(es <= 1e-13);
    CHECK(ex <= 1e-10);
    CHECK(ec <= 1e-10);
    CHECK(ep <= 1e-10);
    // Same number of VJPs; the store-all adjoint keeps O(N) states (x_1 .. x_{N-1}: N - 1),
    // the reversible one 2.
    CHECK(ref.cost.vjps == r.cost.vjps);
    CHECK(ref.cost.peak_stored_states == 49);
  }
}

TEST_CASE("BDIA reversible gradient on the Dirac mixture = gradient.hpp store-all",
          "[reversible][bdia][store-all][dirac]") {
  // The library's reference model: conditioning = K logits, parameters = the points.
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  const EigenBackend<double> backend;
  Eigen::MatrixXd points(4, 3);
  points << 1.0, -0.5, 0.3, -0.8, 0.6, -0.2, 0.1, 0.9, 1.1, -0.6, -0.9, 0.4;
  models::DiracMixture<double> model(points);
  model.cond() << 0.3, -0.2, 0.1, 0.0;
  const auto r = reversible_gradient(BdiaDdim(1.0), backend, s, nodes, model, noise(),
                                     [&](const St& x0, St& g) { loss.grad(x0, g); });
  GradientOptions opt;
  opt.wrt_cond = opt.wrt_params = true;
  const auto ref = gradient(BdiaAsStepPlan{1.0}, backend, s, nodes, model, noise(),
                            LossFunctionAdapter{loss}, opt);
  const double ex = rel(r.grad_x, ref.grad_x), ec = rel(r.grad_cond, ref.grad_cond),
               ep = rel(r.grad_params, ref.grad_params);
  INFO("x " << ex << ", cond " << ec << ", params " << ep << ", reconstruction "
            << r.reconstruction_error);
  CHECK(ex <= 1e-10);
  CHECK(ec <= 1e-10);
  CHECK(ep <= 1e-10);
  CHECK(r.reconstruction_error <= 1e-13);
}

TEST_CASE("Reversible gradients store O(1) states: the same buffers for N = 10 and N = 50",
          "[reversible][memory]") {
  const VPLinearSchedule s;
  const Loss loss;
  auto model = Model::standard();
  const auto n10 = grid(s, 10), n50 = grid(s, 50);
  const auto b10 = run(BdiaDdim(), model, n10, loss), b50 = run(BdiaDdim(), model, n50, loss);
  CHECK(b10.cost.peak_state_buffers == b50.cost.peak_state_buffers);
  CHECK(b50.cost.peak_state_buffers <= 14);
  const auto e10 = run(Edict(), model, n10, loss), e50 = run(Edict(), model, n50, loss);
  CHECK(e10.cost.peak_state_buffers == e50.cost.peak_state_buffers);
  const ReversibleCoupling coupling(Ddim(), 0.999);
  const auto c10 = run(coupling, model, n10, loss), c50 = run(coupling, model, n50, loss);
  CHECK(c10.cost.peak_state_buffers == c50.cost.peak_state_buffers);
  INFO("buffers: BDIA " << b50.cost.peak_state_buffers << ", EDICT " << e50.cost.peak_state_buffers
                        << ", coupling " << c50.cost.peak_state_buffers);
  CHECK(c50.cost.peak_state_buffers <= 20);
}

TEST_CASE("EDICT reversible gradient = store-all exact discrete gradient (N = 50)",
          "[reversible][edict]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  for (bool leapfrog : {false, true}) {
    auto model = Model::standard();
    const Edict method(0.93, leapfrog);
    const auto r = run(method, model, nodes, loss);
    auto ref_model = Model::standard();
    INFO("leapfrog " << leapfrog);
    check_against_reference(r, edict_store_all(ref_model, nodes, 0.93, leapfrog, noise(), loss));
    check_against_fd(method, r, nodes, loss);
    CHECK(r.cost.forward_model_evals == 100);
    CHECK(r.cost.backward_model_evals == 100);
    CHECK(r.cost.vjps == 100);
  }
}

TEST_CASE("Coupled DDIM reversible gradient = store-all exact discrete gradient (N = 50)",
          "[reversible][coupling]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  for (double c : {0.999, 0.9}) {
    auto model = Model::standard();
    const ReversibleCoupling method(Ddim(), c);
    const auto r = run(method, model, nodes, loss);
    auto ref_model = Model::standard();
    INFO("c " << c);
    check_against_reference(r, coupling_ddim_store_all(ref_model, nodes, c, noise(), loss));
    check_against_fd(method, r, nodes, loss);
    CHECK(r.cost.forward_model_evals == 100);
    CHECK(r.cost.backward_model_evals == 100);
    CHECK(r.cost.vjps == 100);
  }
}

TEST_CASE("Coupled DPM-Solver(++)-2 reversible gradient matches finite differences",
          "[reversible][coupling][dpm-solver]") {
  // Two stages per map: the stage engine's reverse pass (stage inputs, data-prediction
  // expansion) is what is checked here.
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  for (auto pred : {SolverPrediction::noise, SolverPrediction::data}) {
    auto model = Model::standard();
    const ReversibleCoupling method(DpmSolverSinglestep(2, pred), 0.999);
    const auto r = run(method, model, nodes, loss);
    INFO("data prediction " << (pred == SolverPrediction::data) << ", reconstruction error "
                            << r.reconstruction_error);
    CHECK(r.reconstruction_error <= 1e-13);
    check_against_fd(method, r, nodes, loss);
    CHECK(r.cost.forward_model_evals == 200);
    CHECK(r.cost.backward_model_evals == 200);
    CHECK(r.cost.vjps == 200);
  }
}

TEST_CASE("Latent gradients (w.r.t. the inverted pair) match finite differences",
          "[reversible][latent]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  const Loss loss;
  auto model = Model::standard();
  const EigenBackend<double> backend;
  const BdiaDdim method(1.0);
  // A latent from an inversion, as an editing loop would start from.
  St x0 = noise();
  sample_from_noise(method, backend, s, nodes, model, x0);
  LatentPair<St> latent;
  invert(method, backend, s, nodes, model, x0, latent);
  const auto r = reversible_gradient_latent(method, backend, s, nodes, model, latent,
                                            [&](const St& x, St& g) { loss.grad(x, g); });
  CHECK(r.grad_x.size() == 0);
  const St v1 = direction(), v2 = noise().reverse();
  auto L = [&](const St& a, const St& b) {
    St x;
    generate(method, backend, s, nodes, model, LatentPair<St>{a, b}, x);
    return loss(x);
  };
  const double h = 1e-5;
  const double fd = (L(latent.first + h * v1, latent.second + h * v2) -
                     L(latent.first - h * v1, latent.second - h * v2)) /
                    (2 * h);
  const double ours =
      r.grad_latent.first.cwiseProduct(v1).sum() + r.grad_latent.second.cwiseProduct(v2).sum();
  INFO("latent directional derivative " << ours << " vs FD " << fd);
  CHECK(std::abs(ours - fd) <= 1e-7 * std::abs(fd));
  CHECK(r.cost.forward_model_evals == 49);
  CHECK(r.cost.vjps == 49);
}

TEST_CASE("Reversible gradients: amplification policy and bad input", "[reversible][errors]") {
  const VPLinearSchedule s;
  const auto nodes = grid(s, 50);
  auto model = Model::standard();
  const EigenBackend<double> backend;
  const auto cot = [](const St& x0, St& g) { g = x0; };
  ReversibleGradientOptions refuse;
  refuse.amplification.policy = AmplificationPolicy::refuse;
  CHECK_THROWS_AS(
      reversible_gradient(BdiaDdim(0.5), backend, s, nodes, model, noise(), cot, refuse),
      diffgrad::numerical_error);
  const auto warned = reversible_gradient(BdiaDdim(0.5), backend, s, nodes, model, noise(), cot);
  CHECK(warned.amplification.warned);
  CHECK(warned.amplification.total > 1e6);
  CHECK_THROWS_WITH(reversible_gradient(BdiaDdim(0.0), backend, s, nodes, model, noise(), cot),
                    Catch::Contains("gamma > 0"));
  const auto bad_cot = [](const St&, St& g) { g = St::Zero(1, 1); };
  CHECK_THROWS_WITH(reversible_gradient(BdiaDdim(), backend, s, nodes, model, noise(), bad_cot),
                    Catch::Contains("cotangent") && Catch::Contains("4 x 3"));
  // Unwanted gradients stay empty.
  ReversibleGradientOptions x_only;
  x_only.want_cond = x_only.want_params = false;
  const auto r = reversible_gradient(Edict(), backend, s, nodes, model, noise(), cot, x_only);
  CHECK(r.grad_cond.size() == 0);
  CHECK(r.grad_params.size() == 0);
  CHECK(r.grad_x.rows() == 4);
}

namespace {
/// The test model with a VJP that writes NaN (into dx, dcond or dparams) at one node.
struct PoisonedVjpModel {
  enum class Target { dx, dcond, dparams };
  Model inner = Model::standard();
  double poison_t = 0.0;
  Target target = Target::dx;
  std::int64_t cond_size() const { return inner.cond_size(); }
  std::int64_t param_size() const { return inner.param_size(); }
  void eps(const St& x, const Node& n, St& out) const { inner.eps(x, n, out); }
  void vjp(const St& x, const Node& n, const St& a, St& dx, Vec* dcond, Vec* dparams) const {
    inner.vjp(x, n, a, dx, dcond, dparams);
    if (n.t != poison_t) return;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    if (target == Target::dx) dx(0, 1) = nan;
    if (target == Target::dcond && dcond) (*dcond)(0) = nan;
    if (target == Target::dparams && dparams) (*dparams)(0) = nan;
  }
};

template <class F> std::string numerical_message(F&& f) {
  try {
    f();
  } catch (const diffgrad::numerical_error& e) {
    return e.what();
  }
  return "no diffgrad::numerical_error";
}
} // namespace

TEST_CASE("Reversible gradients refuse a NaN cotangent or VJP with gradient()'s messages",
          "[reversible][errors]") {
  // They returned NaN gradients silently; gradient() refuses both, and the messages must be
  // the same (one shared check), so each case runs through gradient() as well.
  const VPLinearSchedule s;
  const auto nodes = grid(s, 12);
  const EigenBackend<double> backend;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto nan_cot = [nan](const St& x0, St& g) {
    g = x0;
    g(1, 2) = nan;
  };
  auto clean = Model::standard();
  const BdiaDdim bdia;
  const Edict edict;
  const ReversibleCoupling coupling(Ddim(), 0.999);

  // A NaN cotangent (dL/dx0).
  St nan_w = noise();
  nan_w(1, 2) = nan;
  const std::string from_gradient =
      numerical_message([&] { gradient(Ddim(), backend, s, nodes, clean, noise(), nan_w); });
  CHECK(from_gradient == "gradient: the loss gradient dL/dx0 is not finite");
  const auto check_cotangent = [&](const auto& method) {
    CHECK(numerical_message([&] {
            reversible_gradient(method, backend, s, nodes, clean, noise(), nan_cot);
          }) == "reversible_gradient: the loss gradient dL/dx0 is not finite");
    const LatentPair<St> latent{noise(), noise()};
    CHECK(numerical_message([&] {
            reversible_gradient_latent(method, backend, s, nodes, clean, latent, nan_cot);
          }) == "reversible_gradient_latent: the loss gradient dL/dx0 is not finite");
  };
  check_cotangent(bdia);
  check_cotangent(edict);
  check_cotangent(coupling);
  // check_finite = false lets it through, as in gradient().
  ReversibleGradientOptions unchecked;
  unchecked.check_finite = false;
  CHECK_NOTHROW(reversible_gradient(bdia, backend, s, nodes, clean, noise(), nan_cot, unchecked));

  // A non-finite start state is named before any model call.
  St x_bad = noise();
  x_bad(2, 0) = nan;
  const auto plain_cot = [](const St&, St& g) { g = noise(); };
  CHECK_THROWS_WITH(
      reversible_gradient(edict, backend, s, nodes, clean, x_bad, plain_cot),
      "reversible_gradient: argument 'x_T' expected finite values (x_T at nodes[0]), got NaN or "
      "Inf");
  const LatentPair<St> bad_latent{noise(), x_bad};
  CHECK_THROWS_WITH(
      reversible_gradient_latent(bdia, backend, s, nodes, clean, bad_latent, plain_cot),
      "reversible_gradient_latent: argument 'latent.second' expected finite values, got NaN or "
      "Inf");

  // A VJP writing NaN into dx, dcond or dparams at the node of step 7 (the VJP at nodes[k]
  // belongs to step k for DDIM, BDIA, EDICT and the coupled DDIM alike).
  using Target = PoisonedVjpModel::Target;
  for (const auto& [target, names] :
       {std::pair{Target::dx, "values, got"}, std::pair{Target::dcond, "values in dcond, got"},
        std::pair{Target::dparams, "values in dparams, got"}}) {
    PoisonedVjpModel model;
    model.poison_t = nodes[7].t;
    model.target = target;
    const std::string expected = numerical_message([&] {
      gradient(Ddim(), backend, s, nodes, model, noise(), noise(),
               GradientOptions{.wrt_cond = true, .wrt_params = true});
    });
    INFO("gradient(): " << expected);
    CHECK(expected.find("model vjp: expected finite values") == 0);
    CHECK(expected.find(names) != std::string::npos);
    CHECK(expected.find("at step 7 (t = ") != std::string::npos);
    const auto cot = [](const St&, St& g) { g = noise(); };
    const auto same_as_gradient = [&](const std::string& message) {
      CHECK(message == expected);
      CHECK(message.find("at step 7 (t = ") != std::string::npos);
    };
    same_as_gradient(numerical_message(
        [&] { reversible_gradient(bdia, backend, s, nodes, model, noise(), cot); }));
    same_as_gradient(numerical_message(
        [&] { reversible_gradient(edict, backend, s, nodes, model, noise(), cot); }));
    same_as_gradient(numerical_message(
        [&] { reversible_gradient(coupling, backend, s, nodes, model, noise(), cot); }));
  }
}
