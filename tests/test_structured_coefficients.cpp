// Structured step coefficients (backend/coefficient.hpp) through the whole core: EigenBackend's
// Block2 and ColumnCoeff lincombs against dense references (aliasing, noise indexing, row
// offsets), the sampling engine and the exact discrete adjoint on synthetic schemes whose
// plans use every slot (x, eps, history, noise), checked against a dense re-implementation
// written here and against central finite differences, the counting backend's one pass per
// output, and bad input.
#include <catch2/catch.hpp>

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "diffgrad/backend/counting_backend.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "fd_check.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

namespace {

State pattern(Eigen::Index rows, Eigen::Index cols, double phase) {
  State x(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c)
      x(r, c) = std::sin(0.9 * static_cast<double>(r * cols + c) + phase) +
                0.1 * static_cast<double>(c);
  return x;
}

/// The dense matrix of a Block2 acting on a row [x (d) | v (d)]: kron(A, I_d).
Eigen::MatrixXd dense(const Block2& b, Eigen::Index d) {
  Eigen::MatrixXd k = Eigen::MatrixXd::Zero(2 * d, 2 * d);
  for (Eigen::Index j = 0; j < d; ++j) {
    k(j, j) = b.xx;
    k(j, d + j) = b.xv;
    k(d + j, j) = b.vx;
    k(d + j, d + j) = b.vv;
  }
  return k;
}

/// The dense matrix of a ColumnCoeff on rows of width `cols`.
Eigen::MatrixXd dense(const ColumnCoeff& c, Eigen::Index cols) {
  Eigen::MatrixXd k = Eigen::MatrixXd::Zero(cols, cols);
  for (Eigen::Index j = 0; j < cols; ++j) k(j, j) = c.at(j);
  return k;
}

/// Applies a dense per-row operator: out_row = K row (rows of `x` are the vectors).
State apply(const Eigen::MatrixXd& k, const State& x) {
  State out = x * k.transpose();
  return out;
}

/// The standard-normal state of the library's noise indexing rule.
State noise_state(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, std::uint64_t step,
                  std::uint64_t row_offset = 0) {
  State xi(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c)
      xi(r, c) = detail::gaussian(seed, step,
                                  (row_offset + static_cast<std::uint64_t>(r)) *
                                          static_cast<std::uint64_t>(cols) +
                                      static_cast<std::uint64_t>(c));
  return xi;
}

double rel(const State& a, const State& b) { return (a - b).norm() / b.norm(); }

// ---------------------------------------------------------------------------------------
// A differentiable test model over the whole row: eps(u) = tanh(u W^T + c) * s_node, with
// cond c (length dim) and params W (dim x dim, row-major), s_node = 1 + 0.1 t so the model
// depends on the node.
struct TanhModel {
  Eigen::MatrixXd w;
  Vector c;
  explicit TanhModel(Eigen::Index dim) : w(dim, dim), c(dim) {
    for (Eigen::Index r = 0; r < dim; ++r) {
      c(r) = 0.1 * std::cos(static_cast<double>(r));
      for (Eigen::Index k = 0; k < dim; ++k)
        w(r, k) = 0.4 * std::sin(1.7 * static_cast<double>(r) - 0.6 * static_cast<double>(k)) +
                  (r == k ? 0.3 : 0.0);
    }
  }
  std::int64_t cond_size() const { return c.size(); }
  std::int64_t param_size() const { return w.size(); }
  static double scale(const Node& n) { return 1.0 + 0.1 * n.t; }
  void eps(const State& u, const Node& n, State& out) const {
    out = ((u * w.transpose()).rowwise() + c.transpose()).array().tanh() * scale(n);
  }
  void vjp(const State& u, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) const {
    const State y = ((u * w.transpose()).rowwise() + c.transpose()).array().tanh();
    const State g = (a.array() * (1.0 - y.array().square()) * scale(n)).matrix();
    dx = g * w;
    if (dcond != nullptr) *dcond += g.colwise().sum().transpose();
    if (dparams != nullptr) {
      const Eigen::MatrixXd dw = g.transpose() * u; // dim x dim
      for (Eigen::Index r = 0; r < w.rows(); ++r)
        for (Eigen::Index k = 0; k < w.cols(); ++k) (*dparams)(r * w.cols() + k) += dw(r, k);
    }
  }
};

/// Per-step coefficients for the synthetic schemes: smooth in i, non-symmetric blocks.
Block2 block_at(int i, int slot) {
  const double a = 0.3 * i + 0.7 * slot;
  return {0.8 + 0.1 * std::sin(a), 0.25 * std::cos(a + 0.2), -0.3 * std::sin(a + 1.1),
          0.7 + 0.1 * std::cos(a)};
}

/// A two-step scheme with 2x2 block coefficients: x_{i+1} = A x_i + B e_i + H x_{i-1} +
/// E e_{i-1} (history from step 1 on) + L xi_i with a lower-triangular L (correlated noise).
struct BlockScheme {
  bool noisy = false;
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return noisy; }
  void validate(std::span<const Node> nodes) const {
    if (nodes.size() < 2) throw invalid_argument("BlockScheme: nodes");
  }
  bool accepts_dim(std::int64_t dim) const { return dim % 2 == 0; }
  std::string dim_requirement() const { return "an even number (two halves [x | v])"; }
  BasicStepPlan<Block2> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    BasicStepPlan<Block2> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    p.output.x = block_at(i, 0);
    p.output.e[0] = 0.2 * block_at(i, 1);
    if (i >= 1) {
      p.output.hist_x[0] = 0.1 * block_at(i, 2);
      p.output.hist_e[0] = -0.05 * block_at(i, 3);
    }
    if (noisy) p.noise = Block2{0.3, 0.0, 0.12, 0.2};
    return p;
  }
};

/// The same structure with per-column coefficients from a table built before the loop.
struct ColumnScheme {
  std::vector<double> table_host;
  Backend64::coefficient_table table;
  Eigen::Index dim;
  int steps;
  bool noisy = false;
  ColumnScheme(const Backend64& backend, Eigen::Index d, int n, bool with_noise)
      : dim(d), steps(n), noisy(with_noise) {
    // slots per step: x, e, hist_x, hist_e, noise
    table_host.resize(static_cast<std::size_t>(5 * n * d));
    for (int i = 0; i < n; ++i)
      for (int s = 0; s < 5; ++s)
        for (Eigen::Index k = 0; k < d; ++k)
          table_host[static_cast<std::size_t>((i * 5 + s) * d + k)] =
              (s == 0 ? 0.8 : s == 4 ? 0.25 : 0.15) +
              0.1 * std::sin(0.5 * i + 1.3 * s + 0.7 * static_cast<double>(k));
    table = backend.make_coefficients(table_host);
  }
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return noisy; }
  void validate(std::span<const Node> nodes) const {
    if (static_cast<int>(nodes.size()) != steps + 1) throw invalid_argument("ColumnScheme");
  }
  bool accepts_dim(std::int64_t d) const { return d == dim; }
  std::string dim_requirement() const { return std::to_string(dim) + " (the table's columns)"; }
  ColumnCoeff at(int i, int s, double scale = 1.0) const {
    return {Backend64::coefficient_data(table) + (i * 5 + s) * dim, scale};
  }
  BasicStepPlan<ColumnCoeff> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    BasicStepPlan<ColumnCoeff> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    p.output.x = at(i, 0);
    p.output.e[0] = at(i, 1, 0.5);
    if (i >= 1) {
      p.output.hist_x[0] = at(i, 2);
      p.output.hist_e[0] = at(i, 3, -0.3);
    }
    if (noisy) p.noise = at(i, 4);
    return p;
  }
};

struct NoLambda {
  double t_of_lambda(double) const { return 0.0; }
  Node node(double) const { return Node{}; }
};

std::vector<Node> time_nodes(int n) {
  std::vector<Node> nodes;
  for (int i = 0; i <= n; ++i) nodes.push_back(Node{1.0 - 0.1 * i, 1.0, 1.0, 0.0, 1.0 - 0.1 * i});
  return nodes;
}

/// Dense re-implementation of a one-stage, history-1 plan sequence (the reference for the
/// engine): x_{i+1} = K_x x_i + K_e e_i + K_hx x_{i-1} + K_he e_{i-1} + K_n xi_i.
template <class Scheme, class DenseOf>
State dense_run(const Scheme& scheme, const std::vector<Node>& nodes, const TanhModel& model,
                const State& x_T, const std::vector<State>& noise, DenseOf dense_of) {
  State x = x_T, x_prev, e_prev, e;
  const NoLambda nl;
  for (int i = 0; i + 1 < static_cast<int>(nodes.size()); ++i) {
    const auto p = scheme.plan(nodes, i, NodeAtLambda(nl));
    model.eps(x, nodes[static_cast<std::size_t>(i)], e);
    State next = apply(dense_of(p.output.x), x) + apply(dense_of(p.output.e[0]), e);
    if (i >= 1)
      next += apply(dense_of(p.output.hist_x[0]), x_prev) +
              apply(dense_of(p.output.hist_e[0]), e_prev);
    if (!is_zero(p.noise)) next += apply(dense_of(p.noise), noise[static_cast<std::size_t>(i)]);
    x_prev = x;
    e_prev = e;
    x = next;
  }
  return x;
}

} // namespace

TEST_CASE("Block2 lincomb equals the dense kron(A, I) product, aliasing and noise included",
          "[structured]") {
  const Backend64 backend;
  const Eigen::Index rows = 3, d = 300; // d > the backend's chunk: several chunks per half
  const State a = pattern(rows, 2 * d, 0.1), b = pattern(rows, 2 * d, 1.3);
  const Block2 ka{0.7, -0.2, 0.4, 1.1}, kb{-0.3, 0.5, 0.0, 0.9};
  const State expected = apply(dense(ka, d), a) + apply(dense(kb, d), b);
  const std::array<LinTerm<State, Block2>, 2> terms{LinTerm<State, Block2>{ka, &a},
                                                    LinTerm<State, Block2>{kb, &b}};
  State out;
  backend.lincomb(out, std::span<const LinTerm<State, Block2>>(terms));
  CHECK(rel(out, expected) < 1e-15);

  // out aliases an input: every input of an element pair is read before it is written.
  State alias = a;
  const std::array<LinTerm<State, Block2>, 2> alias_terms{LinTerm<State, Block2>{ka, &alias},
                                                          LinTerm<State, Block2>{kb, &b}};
  backend.lincomb(alias, std::span<const LinTerm<State, Block2>>(alias_terms));
  CHECK(rel(alias, expected) < 1e-15);

  // Correlated noise: L (xi_x, xi_v) with xi at the global indices of both halves.
  const Block2 l{0.5, 0.0, 0.25, 0.75};
  const std::uint64_t seed = 11, step = 4, offset = 7;
  backend.lincomb(out, std::span<const LinTerm<State, Block2>>(terms),
                  BasicNoiseTerm<Block2>{l, seed, step, offset});
  const State with_noise = expected + apply(dense(l, d), noise_state(rows, 2 * d, seed, step, offset));
  CHECK(rel(out, with_noise) < 1e-15);
}

TEST_CASE("ColumnCoeff lincomb equals the dense diagonal product, tables and scalars",
          "[structured]") {
  const Backend64 backend;
  const Eigen::Index rows = 4, cols = 517; // odd width: noise pairs straddle rows
  const State a = pattern(rows, cols, 0.4), b = pattern(rows, cols, 2.2);
  std::vector<double> host(static_cast<std::size_t>(2 * cols));
  for (std::size_t k = 0; k < host.size(); ++k) host[k] = std::cos(0.37 * static_cast<double>(k));
  const auto table = backend.make_coefficients(host);
  const ColumnCoeff ca{Backend64::coefficient_data(table), 1.5}, cb = ColumnCoeff::scalar(-0.4),
                    cn{Backend64::coefficient_data(table) + cols, 0.5};
  const std::array<LinTerm<State, ColumnCoeff>, 2> terms{LinTerm<State, ColumnCoeff>{ca, &a},
                                                         LinTerm<State, ColumnCoeff>{cb, &b}};
  State separate;
  backend.lincomb(separate, std::span<const LinTerm<State, ColumnCoeff>>(terms));
  CHECK(rel(separate, apply(dense(ca, cols), a) + apply(dense(cb, cols), b)) < 1e-15);
  State out = a; // aliases terms[0]
  const std::array<LinTerm<State, ColumnCoeff>, 2> alias_terms{
      LinTerm<State, ColumnCoeff>{ca, &out}, LinTerm<State, ColumnCoeff>{cb, &b}};
  backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(alias_terms),
                  BasicNoiseTerm<ColumnCoeff>{cn, 3, 9, 5});
  const State expected = apply(dense(ca, cols), a) + apply(dense(cb, cols), b) +
                         apply(dense(cn, cols), noise_state(rows, cols, 3, 9, 5));
  CHECK(rel(out, expected) < 1e-15);
}

TEST_CASE("Noise row offsets: a shard draws exactly its rows of the whole batch's noise",
          "[structured]") {
  const Backend64 backend;
  const Eigen::Index rows = 6, cols = 7; // odd width: a shard can start on an odd index
  const State zero = State::Zero(rows, cols);
  State whole, shard;
  backend.lincomb(whole, NoiseTerm{1.0, 21, 3, 0}, term(1.0, zero));
  const State zero_shard = State::Zero(3, cols);
  for (const std::uint64_t first : {1u, 2u, 3u}) {
    backend.lincomb(shard, NoiseTerm{1.0, 21, 3, first}, term(1.0, zero_shard));
    CHECK(shard == whole.middleRows(static_cast<Eigen::Index>(first), 3));
    const std::array<LinTerm<State>, 1> t{term(1.0, zero_shard)};
    backend.lincomb(shard, std::span<const LinTerm<State>>(t), NoiseTerm{1.0, 21, 3, first});
    CHECK(shard == whole.middleRows(static_cast<Eigen::Index>(first), 3));
  }
  // Row offset 0 keeps the bits every earlier release drew.
  CHECK(whole == noise_state(rows, cols, 21, 3));
}

TEST_CASE("Structured lincombs refuse bad shapes by name", "[structured][errors]") {
  const Backend64 backend;
  const State odd = pattern(2, 5, 0.0), even = pattern(2, 6, 0.0), other = pattern(3, 6, 0.0);
  State out;
  const std::array<LinTerm<State, Block2>, 1> odd_terms{LinTerm<State, Block2>{Block2::identity(), &odd}};
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, Block2>>(odd_terms)),
                    Catch::Contains("even width") && Catch::Contains("5"));
  const std::array<LinTerm<State, Block2>, 2> mixed{LinTerm<State, Block2>{Block2::identity(), &even},
                                                    LinTerm<State, Block2>{Block2::identity(), &other}};
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, Block2>>(mixed)),
                    Catch::Contains("terms[1]") && Catch::Contains("3 x 6"));
  CHECK_THROWS_WITH(backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>()),
                    Catch::Contains("1..9 terms"));
}

TEST_CASE("The engine runs block and column plans exactly as their dense matrices",
          "[structured][engine]") {
  const Backend64 backend;
  const int n = 5;
  const Eigen::Index d = 3;
  const std::vector<Node> nodes = time_nodes(n);
  const State x_T = pattern(2, 2 * d, 0.3);
  TanhModel model(2 * d);
  std::vector<State> noise;
  for (int i = 0; i < n; ++i) noise.push_back(noise_state(2, 2 * d, 5, static_cast<std::uint64_t>(i)));
  const NoLambda nl;

  for (const bool noisy : {false, true}) {
    BlockScheme scheme{noisy};
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), 2, 2 * d);
    State x = x_T;
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
               EpsField<TanhModel>{model}, x, ws, SampleOptions{5});
    const State ref = dense_run(scheme, nodes, model, x_T, noise,
                                [&](const Block2& b) { return dense(b, d); });
    CHECK(rel(x, ref) < 1e-14);
  }
  for (const bool noisy : {false, true}) {
    const ColumnScheme scheme(backend, 2 * d, n, noisy);
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), 2, 2 * d);
    State x = x_T;
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
               EpsField<TanhModel>{model}, x, ws, SampleOptions{5});
    const State ref = dense_run(scheme, nodes, model, x_T, noise,
                                [&](const ColumnCoeff& c) { return dense(c, 2 * d); });
    CHECK(rel(x, ref) < 1e-14);
  }
}

namespace {

/// Gradient of <w, x_0> through `scheme` for (x_T, cond, params, noise) against finite
/// differences, for every memory mode; returns the worst relative error.
template <class Scheme>
void check_structured_gradient(const Scheme& scheme, int n, Eigen::Index dim) {
  const Backend64 backend;
  const std::vector<Node> nodes = time_nodes(n);
  const State x_T = pattern(2, dim, 0.8);
  const State w = pattern(2, dim, 2.9);
  TanhModel model(dim);
  std::vector<State> noise;
  for (int i = 0; i < n; ++i) noise.push_back(noise_state(2, dim, 8, static_cast<std::uint64_t>(i)));
  const NoLambda nl;

  const auto run = [&](const State& x0, const TanhModel& m, const std::vector<State>& xi) {
    TanhModel copy = m;
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), 2, dim);
    ws.given_noise = std::span<const State>(xi);
    State x = x0;
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
               EpsField<TanhModel>{copy}, x, ws);
    return x;
  };

  std::vector<GradientResult<Backend64>> results;
  for (const MemoryMode memory :
       {MemoryMode::store_all(), MemoryMode::checkpoint(2), MemoryMode::recompute()}) {
    GradientOptions options;
    options.memory = memory;
    options.wrt_cond = options.wrt_params = options.wrt_noise = true;
    auto ws = GradientWorkspace<Backend64>::for_scheme(backend, scheme, n, x_T, model.cond_size(),
                                                       model.param_size(), options);
    ws.given_noise = std::span<const State>(noise);
    discrete_adjoint(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
                     EpsField<TanhModel>{model}, EpsVjp<TanhModel>{model}, x_T, w, options, ws);
    results.push_back(ws.result);
  }
  // Identical across memory modes (the same operations on the same states).
  for (std::size_t m = 1; m < results.size(); ++m) {
    CHECK(results[m].grad_x == results[0].grad_x);
    CHECK(results[m].grad_cond == results[0].grad_cond);
    CHECK(results[m].grad_params == results[0].grad_params);
    for (int i = 0; i < n; ++i)
      CHECK(results[m].grad_noise[static_cast<std::size_t>(i)] ==
            results[0].grad_noise[static_cast<std::size_t>(i)]);
  }
  const GradientResult<Backend64>& g = results[0];
  CHECK(rel(g.x0, run(x_T, model, noise)) < 1e-15);

  using testing::flatten;
  const Eigen::VectorXd wf = flatten(w);
  const auto fd = [&](const Eigen::VectorXd& exact, auto&& perturbed_loss, Eigen::Index size) {
    // Central differences along 4 random unit directions, 4th order.
    double worst = 0.0;
    for (std::uint64_t k = 0; k < 4; ++k) {
      Eigen::VectorXd v = testing::random_vector(size, 17, 50 + k);
      v /= v.norm();
      const double h = 1e-4;
      const double fd_value = (8.0 * (perturbed_loss(v, h) - perturbed_loss(v, -h)) -
                               (perturbed_loss(v, 2 * h) - perturbed_loss(v, -2 * h))) /
                              (12.0 * h);
      worst = std::max(worst, std::abs(fd_value - exact.dot(v)) / exact.norm());
    }
    return worst;
  };
  const double ex = fd(
      flatten(g.grad_x),
      [&](const Eigen::VectorXd& v, double h) {
        return wf.dot(flatten(run(x_T + testing::unflatten(h * v, 2, dim), model, noise)));
      },
      x_T.size());
  const double ec = fd(
      g.grad_cond,
      [&](const Eigen::VectorXd& v, double h) {
        TanhModel m = model;
        m.c += h * v;
        return wf.dot(flatten(run(x_T, m, noise)));
      },
      model.cond_size());
  const double ep = fd(
      g.grad_params,
      [&](const Eigen::VectorXd& v, double h) {
        TanhModel m = model;
        for (Eigen::Index k = 0; k < v.size(); ++k) m.w(k / dim, k % dim) += h * v(k);
        return wf.dot(flatten(run(x_T, m, noise)));
      },
      model.param_size());
  Eigen::VectorXd gn(n * x_T.size());
  for (int i = 0; i < n; ++i)
    gn.segment(i * x_T.size(), x_T.size()) = flatten(g.grad_noise[static_cast<std::size_t>(i)]);
  const double en = fd(
      gn,
      [&](const Eigen::VectorXd& v, double h) {
        std::vector<State> xi = noise;
        for (int i = 0; i < n; ++i)
          xi[static_cast<std::size_t>(i)] +=
              testing::unflatten(h * v.segment(i * x_T.size(), x_T.size()), 2, dim);
        return wf.dot(flatten(run(x_T, model, xi)));
      },
      gn.size());
  INFO("x_T " << ex << ", cond " << ec << ", params " << ep << ", noise " << en);
  CHECK(ex < 1e-8);
  CHECK(ec < 1e-8);
  CHECK(ep < 1e-8);
  CHECK(en < 1e-8);
}

} // namespace

TEST_CASE("Exact discrete gradients through block plans (transposed blocks) vs finite differences",
          "[structured][gradient]") {
  check_structured_gradient(BlockScheme{true}, 5, 6);
}

TEST_CASE("Exact discrete gradients through column plans vs finite differences",
          "[structured][gradient]") {
  const Backend64 backend;
  check_structured_gradient(ColumnScheme(backend, 6, 5, true), 5, 6);
}

TEST_CASE("Block plans: one fused pass per step and no allocation in the loop", "[structured]") {
  const CountingBackend<Backend64> backend;
  const int n = 7;
  const std::vector<Node> nodes = time_nodes(n);
  TanhModel model(4);
  const NoLambda nl;
  BlockScheme scheme{true};
  SamplerWorkspace<CountingBackend<Backend64>> ws(backend, 1, 1, 3, 4);
  State x = pattern(3, 4, 0.0);
  backend.reset();
  run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
             EpsField<TanhModel>{model}, x, ws);
  const BackendCounts c = backend.counts();
  CHECK(c.lincomb_passes == n);
  CHECK(c.noise_passes == n);
  CHECK(c.make_state == 0);
  CHECK(c.copies == 2); // x in, x out
}

TEST_CASE("The engine refuses a state width the scheme cannot take, before the first step",
          "[structured][errors]") {
  const Backend64 backend;
  const std::vector<Node> nodes = time_nodes(3);
  TanhModel model(5);
  const NoLambda nl;
  BlockScheme scheme{false};
  SamplerWorkspace<Backend64> ws(backend, 1, 1, 2, 5);
  State x = pattern(2, 5, 0.0);
  CHECK_THROWS_WITH(run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(nl),
                               EpsField<TanhModel>{model}, x, ws),
                    Catch::Contains("run_scheme") && Catch::Contains("'x'") &&
                        Catch::Contains("even number") && Catch::Contains("width 5"));
  GradientOptions options;
  auto gws = GradientWorkspace<Backend64>::for_scheme(backend, scheme, 3, x, 5, 25, options);
  CHECK_THROWS_WITH(discrete_adjoint(scheme, backend, std::span<const Node>(nodes),
                                     NodeAtLambda(nl), EpsField<TanhModel>{model},
                                     EpsVjp<TanhModel>{model}, x, x, options, gws),
                    Catch::Contains("gradient") && Catch::Contains("even number"));
}
