// DiffCollage (include/diffgrad/models/collage.hpp) and the backends' gather / scatter_add
// (include/diffgrad/backend/index_map.hpp). Expected values are written out here, never taken
// from the code under test:
//   - gather / scatter_add on a hand-checked 2 x 5 example, and scatter_add = gather^T;
//   - bookkeeping: random linear piece models on a graph with a degree-3 separator and cycles
//     give the weighted sum written out term by term below;
//   - independent coordinates: the composed eps is the exact joint eps (1-D formulas here);
//   - Gaussian chains: the composed precision tends to Sigma^{-1} as sigma -> 0, and for
//     sigma > 0 differs by the amounts derived in closed form here (Bethe vs exact);
//   - a Gaussian Markov ring: approximate even at sigma = 0 (the number is printed);
//   - VJPs vs central differences (float64), gradients through samplers across memory modes,
//     sampler + collage vs sampler + a hand-written dense model, call / pass / allocation
//     counts, and the error messages for bad graphs, models and schedules.
// Norms: relative Frobenius ||A - B|| / ||B|| unless stated.
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "diffgrad/backend/counting_backend.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/collage.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/ve.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using diffgrad::models::Collage;
using diffgrad::models::CollageGraph;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;
using Region = CollageGraph::Region;
using diffgrad::testing::thrown;

namespace {

double rel(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) { return (a - b).norm() / b.norm(); }

/// eps(y) = sigma A y + alpha b per row, element by element (never allocates). Parameters:
/// A (row-major n x n) then b. Counts its calls.
struct LinearPiece {
  Eigen::Index n = 0;
  Vector p; // A then b
  long calls = 0, vjps = 0;
  LinearPiece() = default;
  LinearPiece(Eigen::Index width, unsigned seed) : n(width), p(width * width + width) {
    std::mt19937 gen(seed);
    std::normal_distribution<double> g;
    for (Eigen::Index k = 0; k < p.size(); ++k) p(k) = g(gen);
  }
  std::int64_t dim() const { return n; }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return p.size(); }
  double A(Eigen::Index i, Eigen::Index j) const { return p(i * n + j); }
  double b(Eigen::Index i) const { return p(n * n + i); }
  Eigen::MatrixXd matrix() const {
    Eigen::MatrixXd m(n, n);
    for (Eigen::Index i = 0; i < n; ++i)
      for (Eigen::Index j = 0; j < n; ++j) m(i, j) = A(i, j);
    return m;
  }
  void eps(const State& y, const Node& nd, State& out) {
    ++calls;
    for (Eigen::Index r = 0; r < y.rows(); ++r)
      for (Eigen::Index i = 0; i < n; ++i) {
        double s = 0;
        for (Eigen::Index j = 0; j < n; ++j) s += A(i, j) * y(r, j);
        out(r, i) = nd.sigma * s + nd.alpha * b(i);
      }
  }
  void vjp(const State& y, const Node& nd, const State& a, State& dx, Vector*, Vector* dp) {
    ++vjps;
    for (Eigen::Index r = 0; r < y.rows(); ++r)
      for (Eigen::Index j = 0; j < n; ++j) {
        double s = 0;
        for (Eigen::Index i = 0; i < n; ++i) s += A(i, j) * a(r, i);
        dx(r, j) = nd.sigma * s;
      }
    if (dp)
      for (Eigen::Index r = 0; r < y.rows(); ++r)
        for (Eigen::Index i = 0; i < n; ++i) {
          for (Eigen::Index j = 0; j < n; ++j) (*dp)(i * n + j) += nd.sigma * a(r, i) * y(r, j);
          (*dp)(n * n + i) += nd.alpha * a(r, i);
        }
  }
};

/// eps(y) = sigma tanh(W y + c + z) per row: a nonlinear model with parameters (W then c)
/// and conditioning z (n entries).
struct TanhPiece {
  Eigen::Index n = 0;
  Vector p, z;
  TanhPiece(Eigen::Index width, unsigned seed) : n(width), p(width * width + width), z(width) {
    std::mt19937 gen(seed);
    std::normal_distribution<double> g;
    for (Eigen::Index k = 0; k < p.size(); ++k) p(k) = 0.6 * g(gen);
    for (Eigen::Index k = 0; k < n; ++k) z(k) = 0.3 * g(gen);
  }
  std::int64_t dim() const { return n; }
  std::int64_t cond_size() const { return n; }
  std::int64_t param_size() const { return p.size(); }
  double pre(const State& y, Eigen::Index r, Eigen::Index i) const {
    double s = p(n * n + i) + z(i);
    for (Eigen::Index j = 0; j < n; ++j) s += p(i * n + j) * y(r, j);
    return s;
  }
  void eps(const State& y, const Node& nd, State& out) const {
    for (Eigen::Index r = 0; r < y.rows(); ++r)
      for (Eigen::Index i = 0; i < n; ++i) out(r, i) = nd.sigma * std::tanh(pre(y, r, i));
  }
  void vjp(const State& y, const Node& nd, const State& a, State& dx, Vector* dc,
           Vector* dp) const {
    dx.setZero(y.rows(), n);
    for (Eigen::Index r = 0; r < y.rows(); ++r)
      for (Eigen::Index i = 0; i < n; ++i) {
        const double t = std::tanh(pre(y, r, i));
        const double g = a(r, i) * nd.sigma * (1 - t * t);
        for (Eigen::Index j = 0; j < n; ++j) {
          dx(r, j) += g * p(i * n + j);
          if (dp) (*dp)(i * n + j) += g * y(r, j);
        }
        if (dp) (*dp)(n * n + i) += g;
        if (dc) (*dc)(i) += g;
      }
  }
};

/// Exact eps of N(mu, S): eps = sigma (alpha^2 S + sigma^2 I)^{-1} (y - alpha mu).
struct GaussianPiece {
  Eigen::MatrixXd S;
  Eigen::VectorXd mu;
  std::int64_t dim() const { return S.rows(); }
  void eps(const State& y, const Node& nd, State& out) const {
    const Eigen::MatrixXd P = (nd.alpha * nd.alpha * S +
                               nd.sigma * nd.sigma * Eigen::MatrixXd::Identity(S.rows(), S.rows()))
                                  .inverse();
    const Eigen::MatrixXd centred = y.rowwise() - (nd.alpha * mu).transpose();
    out = nd.sigma * centred * P; // P symmetric
  }
};

Eigen::MatrixXd sub(const Eigen::MatrixXd& S, const std::vector<int>& idx) {
  Eigen::MatrixXd out(idx.size(), idx.size());
  for (std::size_t i = 0; i < idx.size(); ++i)
    for (std::size_t j = 0; j < idx.size(); ++j) out(i, j) = S(idx[i], idx[j]);
  return out;
}

/// E (S_R + s^2 I)^{-1} E^T added with weight c into P (D x D).
void add_block(Eigen::MatrixXd& P, const Eigen::MatrixXd& S, const std::vector<int>& idx, double c,
               double sigma) {
  const Eigen::MatrixXd Q =
      (sub(S, idx) + sigma * sigma * Eigen::MatrixXd::Identity(idx.size(), idx.size())).inverse();
  for (std::size_t i = 0; i < idx.size(); ++i)
    for (std::size_t j = 0; j < idx.size(); ++j) P(idx[i], idx[j]) += c * Q(i, j);
}

/// The composed model's precision at VE noise sigma (alpha = 1, mu = 0): eps(x) = sigma P x,
/// so row k of P is eps(e_k) / sigma.
template <class C> Eigen::MatrixXd composed_precision(C& collage, std::int64_t dim, double sigma) {
  const State I = State::Identity(dim, dim);
  State e(dim, dim);
  collage.eps(I, Node{0.0, 1.0, sigma, std::log(1.0 / sigma), 0.0}, e);
  return Eigen::MatrixXd(e) / sigma;
}

std::vector<Region> regions(const models::CollageGroup& g) {
  std::vector<Region> out;
  if (!g.active) return out;
  for (std::int64_t p = 0; p < g.map.pieces(); ++p) {
    Region r;
    for (std::int64_t k = 0; k < g.map.width(); ++k) r.push_back(g.map.index(p, k));
    out.push_back(r);
  }
  return out;
}
std::vector<double> weights(const models::CollageGroup& g) {
  if (!g.active) return {};
  return {g.map.weights().begin(), g.map.weights().end()};
}

Node vp_node(double t) { return VPLinearSchedule().node(t); }

} // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("gather / scatter_add: hand-checked values, transpose, errors", "[collage][backend]") {
  const Backend64 backend;
  // Two pieces of width 2 from rows of width 5: piece 0 = columns (3, 0), piece 1 = (1, 3),
  // weights 2 and -0.5.
  const IndexMap map(5, 2, {3, 0, 1, 3}, {2.0, -0.5});
  State big(2, 5);
  big << 0, 1, 2, 3, 4, 10, 11, 12, 13, 14;
  State pieces;
  backend.gather(big, map, pieces);
  State expected(4, 2); // sample-major: row b * P + p
  expected << 3, 0, 1, 3, 13, 10, 11, 13;
  CHECK(pieces == expected);
  backend.gather(big, map, pieces, 3.0, PieceWeights::apply);
  State weighted(4, 2);
  weighted << 18, 0, -1.5, -4.5, 78, 60, -16.5, -19.5;
  CHECK(pieces == weighted);

  State acc = State::Constant(2, 5, 1.0);
  State src(4, 2);
  src << 1, 2, 3, 4, 5, 6, 7, 8;
  backend.scatter_add(src, map, 1.0, acc, PieceWeights::ignore);
  State sum(2, 5);
  // row 0: col 3 += 1 + 4, col 0 += 2, col 1 += 3; row 1: col 3 += 5 + 8, col 0 += 6, col 1 += 7
  sum << 3, 4, 1, 6, 1, 7, 8, 1, 14, 1;
  CHECK(acc == sum);
  acc.setZero();
  backend.scatter_add(src, map, 0.5, acc); // default: piece weights applied
  State wsum(2, 5);
  // row 0: col 3 = 0.5 (2*1 - 0.5*4) = 0, col 0 = 0.5*2*2 = 2, col 1 = 0.5*(-0.5)*3 = -0.75
  wsum << 2, -0.75, 0, 0, 0, 6, -1.75, 0, 3, 0;
  CHECK(acc == wsum);

  // <scatter_add(Q), X> == <Q, gather(X)> with the same scale and weights (transpose).
  const State X = diffgrad::testing::test_batch<double>(2, 5);
  const State Q = diffgrad::testing::test_batch<double>(4, 2);
  State g, s = State::Zero(2, 5);
  backend.gather(X, map, g, 0.7, PieceWeights::apply);
  backend.scatter_add(Q, map, 0.7, s, PieceWeights::apply);
  CHECK(s.cwiseProduct(X).sum() == Approx(g.cwiseProduct(Q).sum()).epsilon(1e-14));

  // Errors: built maps are checked once; calls check shapes.
  CHECK_THAT(
      thrown([] {
        IndexMap(5, 2, {3, 5});
      }),
      Catch::Contains(
          "argument 'indices' expected column indices in [0, 5) (piece 0, position 1), got 5"));
  CHECK_THAT(thrown([] {
               IndexMap(5, 2, {3, 0, 1, 1});
             }),
             Catch::Contains("piece 1 lists column 1 twice"));
  CHECK_THAT(thrown([] { IndexMap(5, 2, {3, 0, 1}); }), Catch::Contains("argument 'indices'"));
  CHECK_THAT(thrown([] {
               IndexMap(5, 2, {3, 0}, {1.0, 2.0});
             }),
             Catch::Contains("argument 'weights'"));
  State wrong(2, 4);
  CHECK_THAT(thrown([&] { backend.gather(wrong, map, pieces); }),
             Catch::Contains("argument 'big' expected rows of width D = 5"));
  State bad_pieces(3, 2);
  CHECK_THAT(thrown([&] { backend.scatter_add(bad_pieces, map, 1.0, acc); }),
             Catch::Contains("argument 'pieces' expected shape (B*P) x n = 4 x 2"));

  // float states: the same values (all exactly representable).
  const EigenBackend<float> backend32;
  const EigenBackend<float>::state_type big32 = big.cast<float>();
  EigenBackend<float>::state_type p32, acc32 = EigenBackend<float>::state_type::Zero(2, 5);
  backend32.gather(big32, map, p32, 3.0, PieceWeights::apply);
  CHECK(p32 == weighted.cast<float>());
  backend32.scatter_add(src.cast<float>(), map, 0.5, acc32);
  CHECK(acc32 == wsum.cast<float>());

  // CountingBackend forwards and counts, bit for bit.
  const CountingBackend<Backend64> counting;
  State cp, cs = State::Zero(2, 5);
  counting.gather(big, map, cp);
  counting.scatter_add(src, map, 0.5, cs);
  CHECK(counting.index_map_counts() == IndexMapCounts{1, 1, 0});
  CHECK(cp == expected);
  CHECK(cs == wsum);
}

TEST_CASE("bookkeeping: degree-3 separator and cycles give the explicit weighted sum",
          "[collage]") {
  // D = 9. Factors (width 3): F0 = (0,1,2), F1 = (1,2,3), F2 = (2,1,4), F3 = (4,5,6),
  // F4 = (6,7,8), F5 = (8,0,4). Separators: S = (1,2) in F0, F1, F2 (degree 3); singletons
  // (4) in F2, F3, F5 (degree 3), (0) in F0, F5, (6) in F3, F4, (8) in F4, F5 (degree 2).
  // Cycles: F0 - F5 - F2 - F0 (through 0, 4, {1,2}) and F3 - F4 - F5 - F3 (through 6, 8, 4).
  const std::vector<std::vector<Region>> groups = {
      {{0, 1, 2}, {1, 2, 3}, {2, 1, 4}, {4, 5, 6}, {6, 7, 8}, {8, 0, 4}},
      {{1, 2}},
      {{4}, {0}, {6}, {8}}};
  const CollageGraph graph = CollageGraph::from_regions(9, groups);
  REQUIRE(graph.num_groups() == 3);
  CHECK(weights(graph.group(0)) == std::vector<double>{1, 1, 1, 1, 1, 1});
  CHECK(weights(graph.group(1)) == std::vector<double>{-2});
  CHECK(weights(graph.group(2)) == std::vector<double>{-2, -1, -1, -1});

  LinearPiece f(3, 1), s2(2, 2), s1(1, 3);
  const Backend64 backend;
  Collage<Backend64, LinearPiece> collage(backend, graph, {&f, &s2, &s1}, 4);
  const State x = diffgrad::testing::test_batch<double>(4, 9);
  const Node nd = vp_node(0.4);
  State out;
  collage.eps(x, nd, out);

  // The sum written out: eps = sum_F f(x_F) - 2 s2(x_1, x_2) - 2 s1(x_4) - s1(x_0) - s1(x_6)
  // - s1(x_8), each term placed at its coordinates.
  State expected = State::Zero(4, 9);
  auto add = [&](LinearPiece& m, const std::vector<int>& idx, double c) {
    State y(4, static_cast<Eigen::Index>(idx.size())), e(4, static_cast<Eigen::Index>(idx.size()));
    for (std::size_t k = 0; k < idx.size(); ++k)
      y.col(static_cast<Eigen::Index>(k)) = x.col(idx[k]);
    m.eps(y, nd, e);
    for (std::size_t k = 0; k < idx.size(); ++k)
      expected.col(idx[k]) += c * e.col(static_cast<Eigen::Index>(k));
  };
  add(f, {0, 1, 2}, 1);
  add(f, {1, 2, 3}, 1);
  add(f, {2, 1, 4}, 1);
  add(f, {4, 5, 6}, 1);
  add(f, {6, 7, 8}, 1);
  add(f, {8, 0, 4}, 1);
  add(s2, {1, 2}, -2);
  add(s1, {4}, -2);
  add(s1, {0}, -1);
  add(s1, {6}, -1);
  add(s1, {8}, -1);
  CHECK(rel(out, expected) <= 1e-15);

  // VJP = sum of the pieces' VJPs at the weighted gathered cotangents, written out the same way.
  const State a = diffgrad::testing::test_batch<double>(4, 9) * 0.5 + State::Constant(4, 9, 0.1);
  State dx;
  Vector dp = Vector::Zero(collage.param_size());
  REQUIRE(collage.param_size() == f.param_size() + s2.param_size() + s1.param_size());
  collage.vjp(x, nd, a, dx, nullptr, &dp);
  State dx_expected = State::Zero(4, 9);
  Vector dp_expected = Vector::Zero(dp.size());
  auto add_vjp = [&](LinearPiece& m, const std::vector<int>& idx, double c, Eigen::Index offset) {
    const auto w = static_cast<Eigen::Index>(idx.size());
    State y(4, w), cot(4, w), d(4, w);
    for (Eigen::Index k = 0; k < w; ++k) {
      y.col(k) = x.col(idx[static_cast<std::size_t>(k)]);
      cot.col(k) = c * a.col(idx[static_cast<std::size_t>(k)]);
    }
    Vector g = Vector::Zero(m.param_size());
    m.vjp(y, nd, cot, d, nullptr, &g);
    for (Eigen::Index k = 0; k < w; ++k)
      dx_expected.col(idx[static_cast<std::size_t>(k)]) += d.col(k);
    dp_expected.segment(offset, g.size()) += g;
  };
  const Eigen::Index o1 = f.param_size(), o2 = o1 + s2.param_size();
  add_vjp(f, {0, 1, 2}, 1, 0);
  add_vjp(f, {1, 2, 3}, 1, 0);
  add_vjp(f, {2, 1, 4}, 1, 0);
  add_vjp(f, {4, 5, 6}, 1, 0);
  add_vjp(f, {6, 7, 8}, 1, 0);
  add_vjp(f, {8, 0, 4}, 1, 0);
  add_vjp(s2, {1, 2}, -2, o1);
  add_vjp(s1, {4}, -2, o2);
  add_vjp(s1, {0}, -1, o2);
  add_vjp(s1, {6}, -1, o2);
  add_vjp(s1, {8}, -1, o2);
  CHECK(rel(dx, dx_expected) <= 1e-15);
  CHECK(rel(Eigen::MatrixXd(dp), Eigen::MatrixXd(dp_expected)) <= 1e-15);
}

TEST_CASE("builders: strip, loop and grid regions and counting numbers", "[collage]") {
  using models::chain_graph;
  // Chain of 3 windows of 4 overlapping by 2: D = 8.
  const CollageGraph chain = chain_graph(3, 4, 2);
  CHECK(chain.dim() == 8);
  CHECK(regions(chain.group(0)) == std::vector<Region>{{0, 1, 2, 3}, {2, 3, 4, 5}, {4, 5, 6, 7}});
  CHECK(regions(chain.group(1)) == std::vector<Region>{{2, 3}, {4, 5}});
  CHECK(weights(chain.group(1)) == std::vector<double>{-1, -1});

  // 2-row strip of 2 pieces of width 3, overlap 1: a 2 x 5 image, column r * 5 + c.
  const CollageGraph strip = models::strip_graph({2, 3, 1, 2, 1});
  CHECK(strip.dim() == 10);
  CHECK(regions(strip.group(0)) == std::vector<Region>{{0, 1, 2, 5, 6, 7}, {2, 3, 4, 7, 8, 9}});
  CHECK(regions(strip.group(1)) == std::vector<Region>{{2, 7}});

  // Loop of 3 pieces of width 4, overlap 1: W = 9, the last piece wraps to column 0.
  const CollageGraph loop = models::loop_graph({3, 4, 1, 1, 1});
  CHECK(loop.dim() == 9);
  CHECK(regions(loop.group(0)) == std::vector<Region>{{0, 1, 2, 3}, {3, 4, 5, 6}, {6, 7, 8, 0}});
  CHECK(regions(loop.group(1)) == std::vector<Region>{{3}, {6}, {0}});
  CHECK(weights(loop.group(1)) == std::vector<double>{-1, -1, -1});

  // 2 x 2 tiles of 3 x 3 overlapping by 1: a 5 x 5 image. Corner pixel (2, 2) = 12 is in four
  // tiles, two row overlaps and two column overlaps: counting number 1 - (4 - 2 - 2) = +1.
  const CollageGraph grid = models::grid_graph({2, 2, 3, 3, 1, 1, 1});
  CHECK(grid.dim() == 25);
  CHECK(regions(grid.group(0)).size() == 4);
  CHECK(regions(grid.group(0))[3] == Region{12, 13, 14, 17, 18, 19, 22, 23, 24});
  CHECK(regions(grid.group(1)) == std::vector<Region>{{2, 7, 12}, {12, 17, 22}});
  CHECK(regions(grid.group(2)) == std::vector<Region>{{10, 11, 12}, {12, 13, 14}});
  CHECK(regions(grid.group(3)) == std::vector<Region>{{12}});
  CHECK(weights(grid.group(1)) == std::vector<double>{-1, -1});
  CHECK(weights(grid.group(2)) == std::vector<double>{-1, -1});
  CHECK(weights(grid.group(3)) == std::vector<double>{1});
  // A 1 x 3 grid has no column overlaps and no corners: those groups are inactive.
  const CollageGraph row = models::grid_graph({1, 3, 2, 4, 0, 2, 1});
  CHECK(row.group(0).active);
  CHECK(row.group(1).active);
  CHECK_FALSE(row.group(2).active);
  CHECK_FALSE(row.group(3).active);
}

TEST_CASE("independent coordinates: the composed eps is the exact joint eps", "[collage]") {
  // Five independent coordinates, x_k in {u_k, v_k} with probabilities (0.3, 0.7). A piece's
  // exact model is the Dirac mixture over all value combinations of its coordinates. Pieces
  // (0,1,2) and (2,3,4) overlap in coordinate 2; each region has its own model (the data are
  // not stationary), so each is a group of its own.
  const double u[5] = {-1.0, 0.5, 2.0, -0.3, 1.2}, v[5] = {1.0, -0.8, 0.4, 0.9, -1.5};
  auto piece_model = [&](const std::vector<int>& idx) {
    const auto n = static_cast<Eigen::Index>(idx.size());
    const Eigen::Index k = Eigen::Index(1) << n;
    State pts(k, n);
    Vector w(k);
    for (Eigen::Index c = 0; c < k; ++c) {
      w(c) = 1.0;
      for (Eigen::Index j = 0; j < n; ++j) {
        const bool hi = ((c >> j) & 1) != 0;
        const int coord = idx[static_cast<std::size_t>(j)];
        pts(c, j) = hi ? v[coord] : u[coord];
        w(c) *= hi ? 0.7 : 0.3;
      }
    }
    return models::DiracMixture<double>(pts, w);
  };
  models::DiracMixture<double> first = piece_model({0, 1, 2}), second = piece_model({2, 3, 4}),
                               overlap = piece_model({2});
  const CollageGraph graph = CollageGraph::from_regions(5, {{{0, 1, 2}}, {{2, 3, 4}}, {{2}}},
                                                        {"left", "right", "overlap"});
  CHECK(weights(graph.group(2)) == std::vector<double>{-1});
  const Backend64 backend;
  Collage<Backend64, models::DiracMixture<double>> collage(backend, graph,
                                                           {&first, &second, &overlap}, 3);
  const State x = diffgrad::testing::test_batch<double>(3, 5) * 1.5;
  for (double t : {0.05, 0.3, 0.7, 0.99}) {
    const Node nd = vp_node(t);
    State out;
    collage.eps(x, nd, out);
    // Exact joint eps per coordinate: (x - alpha E[x0 | x]) / sigma with a 2-point posterior.
    State expected(3, 5);
    for (Eigen::Index r = 0; r < 3; ++r)
      for (int k = 0; k < 5; ++k) {
        const double lu =
            std::log(0.3) - std::pow(x(r, k) - nd.alpha * u[k], 2) / (2 * nd.sigma * nd.sigma);
        const double lv =
            std::log(0.7) - std::pow(x(r, k) - nd.alpha * v[k], 2) / (2 * nd.sigma * nd.sigma);
        const double m = std::max(lu, lv), wu = std::exp(lu - m), wv = std::exp(lv - m);
        const double x0 = (wu * u[k] + wv * v[k]) / (wu + wv);
        expected(r, k) = (x(r, k) - nd.alpha * x0) / nd.sigma;
      }
    INFO("t = " << t << ", sigma = " << nd.sigma);
    CHECK(rel(out, expected) <= 1e-12);
  }
}

namespace {
/// AR(1) covariance rho^|i-j| on n coordinates.
Eigen::MatrixXd ar1(int n, double rho) {
  Eigen::MatrixXd S(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) S(i, j) = std::pow(rho, std::abs(i - j));
  return S;
}
} // namespace

TEST_CASE("Gaussian chain: exact precision at sigma -> 0, Bethe (not exact) for sigma > 0",
          "[collage][gaussian]") {
  // Three coordinates, Sigma_ij = 0.8^|i-j|, factors (0,1), (1,2), separator (1), VE noise.
  const double rho = 0.8;
  const Eigen::MatrixXd S = ar1(3, rho);
  GaussianPiece factor{ar1(2, rho), Eigen::VectorXd::Zero(2)};
  GaussianPiece sep{Eigen::MatrixXd::Identity(1, 1), Eigen::VectorXd::Zero(1)};
  const Backend64 backend;
  Collage<Backend64, GaussianPiece> collage(backend, models::chain_graph(2, 2, 1), {&factor, &sep},
                                            3);

  // sigma -> 0: P_Bethe = Sigma^{-1}, the tridiagonal matrix
  // [[1, -rho, 0], [-rho, 1 + rho^2, -rho], [0, -rho, 1]] / (1 - rho^2).
  Eigen::MatrixXd tri(3, 3);
  tri << 1, -rho, 0, -rho, 1 + rho * rho, -rho, 0, -rho, 1;
  tri /= 1 - rho * rho;
  CHECK(tri(0, 0) == Approx(2.7778).margin(1e-4));
  CHECK(tri(0, 1) == Approx(-2.2222).margin(1e-4));
  CHECK(tri(1, 1) == Approx(4.5556).margin(1e-4));
  const double tiny = 1e-5;
  const Eigen::MatrixXd P0 = composed_precision(collage, 3, tiny);
  INFO("P_Bethe(1e-5) =\n" << P0);
  // (S_f + s^2)^{-1} = S_f^{-1} - s^2 S_f^{-2} + ...: the error is O(s^2 |Sigma^{-2}|) ~ 1e-9.
  CHECK(rel(P0, tri) <= 1e-8);

  // sigma > 0: the composed precision is E_1 (S_f + s^2)^{-1} E_1^T + E_2 (...) E_2^T
  // - E_s (1 + s^2)^{-1} E_s^T (built here independently) and differs from (Sigma + s^2)^{-1}:
  // the exact (0, 2) entry is -0.0448, -0.2113, -0.2423, -0.1177, -0.0218 at sigma = 0.1, 0.3,
  // 0.5, 1, 2 while Bethe's is 0; relative Frobenius error 1.6 %, 9.5 %, 15 %, 16 %, 8.6 %.
  const double sigmas[] = {0.1, 0.3, 0.5, 1.0, 2.0};
  const double exact_02[] = {-0.0448, -0.2113, -0.2423, -0.1177, -0.0218};
  const double rel_err[] = {0.016, 0.095, 0.15, 0.16, 0.086};
  for (int i = 0; i < 5; ++i) {
    const double s = sigmas[i];
    const Eigen::MatrixXd P = composed_precision(collage, 3, s);
    Eigen::MatrixXd bethe = Eigen::MatrixXd::Zero(3, 3);
    add_block(bethe, S, {0, 1}, 1, s);
    add_block(bethe, S, {1, 2}, 1, s);
    add_block(bethe, S, {1}, -1, s);
    const Eigen::MatrixXd exact = (S + s * s * Eigen::MatrixXd::Identity(3, 3)).inverse();
    INFO("sigma = " << s);
    CHECK(rel(P, bethe) <= 1e-13);
    CHECK(P(0, 2) == 0.0);
    CHECK(exact(0, 2) == Approx(exact_02[i]).margin(1e-4));
    const double err = rel(P, exact);
    std::printf("Gaussian chain rho = 0.8: sigma = %.1f  exact P_02 = %+.4f  Bethe P_02 = 0  rel. "
                "Frobenius error %.4f\n",
                s, exact(0, 2), err);
    CHECK(err == Approx(rel_err[i]).epsilon(0.07)); // the quoted values have 2 digits
  }

  // A longer chain with wider overlaps: AR(1) on 8 coordinates, windows of 4 overlapping by 2
  // (a junction tree: pieces two apart are disjoint, the process is Markov of order 1).
  const Eigen::MatrixXd S8 = ar1(8, 0.6);
  GaussianPiece w4{ar1(4, 0.6), Eigen::VectorXd::Zero(4)},
      w2{ar1(2, 0.6), Eigen::VectorXd::Zero(2)};
  Collage<Backend64, GaussianPiece> long_chain(backend, models::chain_graph(3, 4, 2), {&w4, &w2},
                                               8);
  const Eigen::MatrixXd P8 = composed_precision(long_chain, 8, tiny);
  CHECK(rel(P8, S8.inverse()) <= 1e-8);
}

TEST_CASE("Gaussian Markov ring: the loop composition is approximate even at sigma = 0",
          "[collage][gaussian]") {
  // A ring of 6 coordinates with circulant tridiagonal precision Q (2 on the diagonal, -0.8 to
  // each ring neighbour), pieces of 3 overlapping by 1 around the loop (loop_graph: the seam
  // 5-0 subtracts its overlap like every other seam). Piece models are the exact marginals.
  const int D = 6;
  Eigen::MatrixXd Q = 2.0 * Eigen::MatrixXd::Identity(D, D);
  for (int i = 0; i < D; ++i) Q(i, (i + 1) % D) = Q((i + 1) % D, i) = -0.8;
  const Eigen::MatrixXd S = Q.inverse();
  // Stationary: every window of 3 (and every coordinate) has the same marginal.
  GaussianPiece piece{sub(S, {0, 1, 2}), Eigen::VectorXd::Zero(3)};
  GaussianPiece point{sub(S, {0}), Eigen::VectorXd::Zero(1)};
  const Backend64 backend;
  Collage<Backend64, GaussianPiece> collage(backend, models::loop_graph({3, 3, 1, 1, 1}),
                                            {&piece, &point}, D);
  const Eigen::MatrixXd P = composed_precision(collage, D, 1e-6);
  // The Bethe precision at sigma = 0, written out: windows (0,1,2), (2,3,4), (4,5,0), points 2, 4,
  // 0.
  Eigen::MatrixXd bethe = Eigen::MatrixXd::Zero(D, D);
  add_block(bethe, S, {0, 1, 2}, 1, 0.0);
  add_block(bethe, S, {2, 3, 4}, 1, 0.0);
  add_block(bethe, S, {4, 5, 0}, 1, 0.0);
  for (int k : {2, 4, 0}) add_block(bethe, S, {k}, -1, 0.0);
  CHECK(rel(P, bethe) <= 1e-9);
  const double err = rel(P, Q);
  std::printf("Gaussian Markov ring (6 coordinates, windows of 3): rel. Frobenius error of the "
              "composed precision at sigma = 0: %.4f\n",
              err);
  CHECK(err > 0.01); // clearly not exact (measured 0.036: docs/collage.md)
}

namespace {
/// <a, f(x + h v)> by Richardson-extrapolated central differences (O(h^4)).
template <class F> double directional(F&& f, double h) {
  const double d1 = (f(h) - f(-h)) / (2 * h), d2 = (f(h / 2) - f(-h / 2)) / h;
  return (4 * d2 - d1) / 3;
}
} // namespace

TEST_CASE("Collage VJP matches finite differences (x, cond, params; float64)", "[collage][vjp]") {
  // A 2 x 2 grid of 3 x 3 tiles overlapping by 1 (5 x 5 image, 25 coordinates). Row and column
  // overlaps have the same width (3) and share one model object: three distinct models, so
  // the composed cond / params are the concatenation [tiles | overlaps | corners].
  TanhPiece tiles(9, 11), overlaps(3, 12), corners(1, 13);
  const Backend64 backend;
  Collage<Backend64, TanhPiece> collage(backend, models::grid_graph({2, 2, 3, 3, 1, 1, 1}),
                                        {&tiles, &overlaps, &overlaps, &corners}, 2);
  REQUIRE(collage.param_size() == 90 + 12 + 2);
  REQUIRE(collage.cond_size() == 9 + 3 + 1);
  const State x = diffgrad::testing::test_batch<double>(2, 25);
  const State a = diffgrad::testing::test_batch<double>(2, 25).reverse() * 0.7;
  const Node nd = vp_node(0.35);
  State dx;
  Vector dc = Vector::Zero(collage.cond_size()), dp = Vector::Zero(collage.param_size());
  collage.vjp(x, nd, a, dx, &dc, &dp);

  auto loss = [&] {
    State e;
    collage.eps(x, nd, e);
    return e.cwiseProduct(a).sum();
  };
  std::mt19937 gen(5);
  std::normal_distribution<double> g;
  // x: three random directions.
  for (int trial = 0; trial < 3; ++trial) {
    State v(2, 25);
    for (Eigen::Index k = 0; k < v.size(); ++k) v.data()[k] = g(gen);
    const double fd = directional(
        [&](double h) {
          State e, xp = x + h * v;
          collage.eps(xp, nd, e);
          return e.cwiseProduct(a).sum();
        },
        1e-3);
    const double exact = dx.cwiseProduct(v).sum();
    CHECK(std::abs(fd - exact) <= 1e-7 * std::abs(exact));
  }
  // cond and params: every model's vectors in one random direction, in the composed order.
  TanhPiece* distinct[] = {&tiles, &overlaps, &corners};
  for (bool params : {false, true}) {
    const Vector& grad = params ? dp : dc;
    Vector dir(grad.size());
    for (Eigen::Index k = 0; k < dir.size(); ++k) dir(k) = g(gen);
    std::vector<Vector> saved;
    for (TanhPiece* m : distinct) saved.push_back(params ? m->p : m->z);
    const double fd = directional(
        [&](double h) {
          Eigen::Index off = 0;
          for (std::size_t i = 0; i < 3; ++i) {
            Vector& target = params ? distinct[i]->p : distinct[i]->z;
            target = saved[i] + h * dir.segment(off, target.size());
            off += target.size();
          }
          return loss();
        },
        1e-3);
    for (std::size_t i = 0; i < 3; ++i) (params ? distinct[i]->p : distinct[i]->z) = saved[i];
    const double exact = grad.dot(dir);
    INFO((params ? "params" : "cond"));
    CHECK(std::abs(fd - exact) <= 1e-7 * std::abs(exact));
  }
  // Single distinct model: dcond / dparams pass through (strip with a shared width: pieces of
  // width 2 overlapping by 1 use a model of width 2, the overlaps one of width 1).
  TanhPiece p2(2, 21), p1(1, 22);
  Collage<Backend64, TanhPiece> chain(backend, models::chain_graph(4, 2, 1), {&p2, &p1}, 2);
  const State xc = diffgrad::testing::test_batch<double>(2, 5);
  const State ac = State::Constant(2, 5, 0.3) + xc * 0.2;
  State dxc;
  chain.vjp(xc, nd, ac, dxc, nullptr, nullptr);
  State v = State::Constant(2, 5, 1.0);
  const double fd = directional(
      [&](double h) {
        State e, xp = xc + h * v;
        chain.eps(xp, nd, e);
        return e.cwiseProduct(ac).sum();
      },
      1e-3);
  CHECK(std::abs(fd - dxc.cwiseProduct(v).sum()) <= 1e-7 * std::abs(fd));
}

namespace {
/// A hand-written dense equivalent of a collage of LinearPiece models on `regions` with
/// counting numbers `c`: eps(x) = sigma x M^T + alpha m, M = sum c E A E^T, m = sum c E b.
struct DenseEquivalent {
  Eigen::MatrixXd M;
  Eigen::RowVectorXd m;
  void add(const LinearPiece& piece, const std::vector<int>& idx, double c) {
    for (std::size_t i = 0; i < idx.size(); ++i) {
      m(idx[i]) += c * piece.b(static_cast<Eigen::Index>(i));
      for (std::size_t j = 0; j < idx.size(); ++j)
        M(idx[i], idx[j]) +=
            c * piece.A(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j));
    }
  }
  void eps(const State& x, const Node& nd, State& out) const {
    out = nd.sigma * x * M.transpose();
    out.rowwise() += nd.alpha * m;
  }
};
} // namespace

TEST_CASE("sampler + collage equals sampler + a hand-written equivalent model",
          "[collage][sampler]") {
  // Chain of 4 windows of 4 overlapping by 2 (D = 10): windows (0..3), (2..5), (4..7), (6..9),
  // overlaps (2,3), (4,5), (6,7) with weight -1.
  LinearPiece window(4, 31), over(2, 32);
  window.p *= 0.2;
  over.p *= 0.2;
  DenseEquivalent dense{Eigen::MatrixXd::Zero(10, 10), Eigen::RowVectorXd::Zero(10)};
  for (int s : {0, 2, 4, 6}) dense.add(window, {s, s + 1, s + 2, s + 3}, 1);
  for (int s : {2, 4, 6}) dense.add(over, {s, s + 1}, -1);
  const Backend64 backend;
  Collage<Backend64, LinearPiece> collage(backend, models::chain_graph(4, 4, 2), {&window, &over},
                                          3);
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 12, 1.0, 1e-3));
  const State x_T = diffgrad::testing::test_batch<double>(3, 10);
  auto run = [&](const auto& scheme, auto& model) {
    State x = x_T;
    sample(scheme, backend, schedule, std::span<const Node>(nodes), model, x,
           SampleOptions{.seed = 4});
    return x;
  };
  const State a1 = run(Ddim(), collage), b1 = run(Ddim(), dense);
  const State a2 = run(Ddim(1.0), collage), b2 = run(Ddim(1.0), dense);
  const State a3 = run(DpmSolverMultistep(), collage), b3 = run(DpmSolverMultistep(), dense);
  CHECK(rel(a1, b1) <= 1e-13);
  CHECK(rel(a2, b2) <= 1e-13);
  CHECK(rel(a3, b3) <= 1e-13);
}

TEST_CASE("gradient through a sampler with a collage model: identical across memory modes",
          "[collage][gradient]") {
  TanhPiece window(3, 41), over(1, 42);
  const Backend64 backend;
  Collage<Backend64, TanhPiece> collage(backend, models::loop_graph({3, 3, 1, 1, 1}),
                                        {&window, &over}, 2);
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 8, 1.0, 1e-3));
  const State x_T = diffgrad::testing::test_batch<double>(2, 6);
  const State w = diffgrad::testing::test_batch<double>(2, 6).reverse();
  auto grad = [&](MemoryMode memory) {
    return gradient(DpmSolverMultistep(), backend, schedule, std::span<const Node>(nodes), collage,
                    x_T, w,
                    GradientOptions{.memory = memory, .wrt_cond = true, .wrt_params = true});
  };
  const auto r0 = grad(MemoryMode::store_all());
  for (MemoryMode m :
       {MemoryMode::checkpoint(2), MemoryMode::checkpoint(5), MemoryMode::recompute()}) {
    const auto r = grad(m);
    CHECK((r.grad_x - r0.grad_x).cwiseAbs().maxCoeff() == 0.0);
    CHECK((r.grad_params - r0.grad_params).cwiseAbs().maxCoeff() == 0.0);
    CHECK((r.grad_cond - r0.grad_cond).cwiseAbs().maxCoeff() == 0.0);
  }
  // dL/dx_T against central differences of the whole sampler (L = <w, x0>).
  std::mt19937 gen(8);
  std::normal_distribution<double> g;
  State v(2, 6);
  for (Eigen::Index k = 0; k < v.size(); ++k) v.data()[k] = g(gen);
  const double fd = directional(
      [&](double h) {
        State x = x_T + h * v;
        sample(DpmSolverMultistep(), backend, schedule, std::span<const Node>(nodes), collage, x);
        return x.cwiseProduct(w).sum();
      },
      1e-3);
  const double exact = r0.grad_x.cwiseProduct(v).sum();
  CHECK(std::abs(fd - exact) <= 1e-7 * std::abs(exact));
  // ... and against the window model's parameters.
  Vector dir(window.p.size());
  for (Eigen::Index k = 0; k < dir.size(); ++k) dir(k) = g(gen);
  const Vector saved = window.p;
  const double fd_p = directional(
      [&](double h) {
        window.p = saved + h * dir;
        State x = x_T;
        sample(DpmSolverMultistep(), backend, schedule, std::span<const Node>(nodes), collage, x);
        return x.cwiseProduct(w).sum();
      },
      1e-3);
  window.p = saved;
  const double exact_p = r0.grad_params.head(dir.size()).dot(dir);
  CHECK(std::abs(fd_p - exact_p) <= 1e-7 * std::abs(exact_p));
}

TEST_CASE("cost: one model call per group per stage, counted passes, no allocation in the loop",
          "[collage][counting]") {
  using Counting = CountingBackend<Backend64>;
  const Counting backend;
  LinearPiece window(4, 51), over(2, 52);
  window.p *= 0.2;
  over.p *= 0.2;
  Collage<Counting, LinearPiece> collage(backend, models::chain_graph(6, 4, 2), {&window, &over},
                                         3);
  const VPLinearSchedule schedule;
  const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, 10, 1.0, 1e-3));
  const DpmSolverMultistep scheme;
  const State x_T = diffgrad::testing::test_batch<double>(3, collage.dim());
  SamplerWorkspace<Counting> ws(backend, scheme.history(), scheme.stages(), 3, collage.dim());
  State x = x_T;
  const BackendCounts before = backend.counts();
  const IndexMapCounts maps_before = backend.index_map_counts();
  const long new_before = alloc_probe::operator_new_calls.load(),
             eigen_before = alloc_probe::eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  alloc_probe::counting = true;
  const SampleResult result =
      run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
                 EpsField<decltype(collage)>{collage}, x, ws);
  alloc_probe::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  const long allocations = alloc_probe::operator_new_calls.load() - new_before +
                           alloc_probe::eigen_heap_allocations.load() - eigen_before;
  CHECK(allocations == 0);
  const auto evals = result.model_evals;
  CHECK(window.calls == evals); // one call per group per stage, all 6 windows (x 3 samples) at once
  CHECK(over.calls == evals);
  const IndexMapCounts maps = backend.index_map_counts() - maps_before;
  CHECK(maps.gathers == 2 * evals);
  CHECK(maps.scatters == 2 * evals);
  CHECK(maps.index_maps == 0);
  const BackendCounts c = backend.counts() - before;
  CHECK(c.fills == evals); // the composed output is zeroed once per call
  CHECK(c.make_state == 0);

  // The gradient: one VJP call per group per adjoint stage, no allocation once the
  // workspace exists.
  auto gws = make_gradient_workspace(scheme, backend, std::span<const Node>(nodes), collage, x_T);
  const State w = State::Constant(3, collage.dim(), 0.5);
  (void)gradient(scheme, backend, schedule, std::span<const Node>(nodes), collage, x_T, w, {}, gws);
  window.vjps = 0;
  over.vjps = 0;
  const long new_b = alloc_probe::operator_new_calls.load(),
             eigen_b = alloc_probe::eigen_heap_allocations.load();
  Eigen::internal::set_is_malloc_allowed(false);
  alloc_probe::counting = true;
  const auto& r =
      gradient(scheme, backend, schedule, std::span<const Node>(nodes), collage, x_T, w, {}, gws);
  alloc_probe::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK(alloc_probe::operator_new_calls.load() - new_b +
            alloc_probe::eigen_heap_allocations.load() - eigen_b ==
        0);
  CHECK(window.vjps == r.cost.vjps);
  CHECK(over.vjps == r.cost.vjps);

  // A model object serving several groups is called once for all of them: a 2 x 2 grid of
  // 4 x 4 tiles overlapping by 2, row overlaps (4 x 2) and column overlaps (2 x 4) share one
  // model of width 8: three calls per evaluation (tiles, overlaps, corners), the result equal
  // to the sum written per group.
  LinearPiece tile(16, 61), band(8, 62), corner(4, 63);
  const CollageGraph grid = models::grid_graph({2, 2, 4, 4, 2, 2, 1});
  Collage<Counting, LinearPiece> shared(backend, grid, {&tile, &band, &band, &corner}, 2);
  CHECK(shared.calls_per_eval() == 3);
  const State xg = diffgrad::testing::test_batch<double>(2, shared.dim());
  State eg;
  const long band_before = band.calls;
  const IndexMapCounts m0 = backend.index_map_counts();
  shared.eps(xg, vp_node(0.3), eg);
  CHECK(band.calls - band_before == 1);
  CHECK((backend.index_map_counts() - m0).gathers == 3);
  // The same sum with each group as its own call (the overlaps through two equal copies).
  LinearPiece band2 = band;
  Collage<Counting, LinearPiece> separate(backend, grid, {&tile, &band, &band2, &corner}, 2);
  CHECK(separate.calls_per_eval() == 4);
  State es;
  separate.eps(xg, vp_node(0.3), es);
  CHECK(rel(eg, es) <= 1e-15);
}

TEST_CASE("errors: bad graphs, models and schedules", "[collage][errors]") {
  using models::CollageGraph;
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1, 4}}});
             }),
             Catch::Contains("column indices in [0, 4)"));
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1, 1}}});
             }),
             Catch::Contains("lists column 1 twice"));
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1, 2}, {2, 3}}});
             }),
             Catch::Contains("regions of one width per group"));
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1}, {1, 0}}});
             }),
             Catch::Contains("expected distinct regions"));
  // Two factors meeting without a separator: coordinate 1 counted twice.
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(3, {{{0, 1}, {1, 2}}});
             }),
             Catch::Contains("got 2 for coordinate 1"));
  // A separator smaller than the intersection (1,2) of its factors: coordinate 2 counted twice.
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1, 2}, {1, 2, 3}}, {{1}}});
             }),
             Catch::Contains("got 2 for coordinate 2"));
  // A separator inside no factor: it is a factor of its own, counted on top.
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1}, {2, 3}}, {{1, 2}}});
             }),
             Catch::Contains("counted exactly once"));
  // A coordinate in no region.
  CHECK_THAT(thrown([] {
               CollageGraph::from_regions(4, {{{0, 1}, {1, 2}}, {{1}}});
             }),
             Catch::Contains("got 0 for coordinate 3 (it is in no region)"));
  CHECK_THAT(thrown([] { models::chain_graph(3, 4, 3); }),
             Catch::Contains("argument 'shape.overlap'"));
  CHECK_THAT(thrown([] {
               models::loop_graph({1, 4, 1, 1, 1});
             }),
             Catch::Contains("argument 'shape.pieces'"));

  const Backend64 backend;
  LinearPiece w4(4, 1), w2(2, 2), w3(3, 3);
  const CollageGraph graph = models::chain_graph(3, 4, 2);
  using C = Collage<Backend64, LinearPiece>;
  CHECK_THAT(thrown([&] { C(backend, graph, {&w4}); }),
             Catch::Contains("one model per group of the graph (2)"));
  CHECK_THAT(thrown([&] { C(backend, graph, {&w4, nullptr}); }), Catch::Contains("got null"));
  CHECK_THAT(
      thrown([&] {
        C(backend, graph, {&w4, &w3});
      }),
      Catch::Contains(
          "expected a model of dimension 2 (the width of group 1 'overlaps') for group 1, got "
          "dimension 3"));
  C collage(backend, graph, {&w4, &w2});
  State out;
  State same = State::Zero(2, 8);
  CHECK_THAT(thrown([&] { collage.eps(same, vp_node(0.5), same); }),
             Catch::Contains("Collage::eps: argument 'out' expected a state other than 'x'"));
  CHECK_THAT(thrown([&] { collage.eps(State::Zero(2, 7), vp_node(0.5), out); }),
             Catch::Contains("Collage::eps: argument 'x' expected rows of width D = 8"));

  // All pieces must share one schedule.
  const VPLinearSchedule vp, vp_other(0.1, 15.0);
  const VESchedule ve;
  CHECK_NOTHROW(models::require_same_schedule(vp, VPLinearSchedule(), "overlap schedule"));
  CHECK_THAT(thrown([&] { models::require_same_schedule(vp, vp_other, "overlap schedule"); }),
             Catch::Contains("argument 'overlap schedule' expected the reference schedule"));
  CHECK_THAT(thrown([&] { models::require_same_schedule(vp, ve, "piece schedule"); }),
             Catch::Contains("argument 'piece schedule'"));
}

TEST_CASE("exact reference pieces from crops of a data set", "[collage][mixture]") {
  // Strips of length 6; the window data set holds every window of width 3 of every strip.
  State strips(2, 6);
  strips << 0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15;
  const State windows = models::window_crops(strips, 3);
  REQUIRE(windows.rows() == 8);
  CHECK(windows.row(5) == (Eigen::RowVector3d() << 11, 12, 13).finished());
  const State wrapped = models::window_crops(strips, 3, true);
  REQUIRE(wrapped.rows() == 12);
  CHECK(wrapped.row(5) == (Eigen::RowVector3d() << 5, 0, 1).finished());
  const std::vector<std::int64_t> coords = {4, 1};
  const State crop = models::crop_points(strips, coords);
  CHECK(crop == (State(2, 2) << 4, 1, 14, 11).finished());
  CHECK_THAT(thrown([&] { models::crop_points(strips, std::vector<std::int64_t>{6}); }),
             Catch::Contains("argument 'coords'"));

  // The marginal of a Dirac mixture on coordinates (0, 2) is the mixture of the cropped
  // points: its eps equals the full model's eps on x with the other coordinates integrated
  // out, checked at a point where the third coordinate's posterior does not matter: compare
  // the cropped model with a brute-force marginal posterior here.
  State pts(3, 3);
  pts << 0.0, 1.0, -1.0, 2.0, 0.5, 1.5, -1.0, -2.0, 0.3;
  const std::vector<std::int64_t> keep = {0, 2};
  models::DiracMixture<double> marginal(models::crop_points(pts, keep));
  const Node nd = vp_node(0.5);
  State x(1, 2), e(1, 2);
  x << 0.4, -0.2;
  marginal.eps(x, nd, e);
  double wsum = 0, x00 = 0, x02 = 0;
  for (int i = 0; i < 3; ++i) {
    const double d2 =
        std::pow(x(0, 0) - nd.alpha * pts(i, 0), 2) + std::pow(x(0, 1) - nd.alpha * pts(i, 2), 2);
    const double wi = std::exp(-d2 / (2 * nd.sigma * nd.sigma));
    wsum += wi;
    x00 += wi * pts(i, 0);
    x02 += wi * pts(i, 2);
  }
  CHECK(e(0, 0) == Approx((x(0, 0) - nd.alpha * x00 / wsum) / nd.sigma).epsilon(1e-12));
  CHECK(e(0, 1) == Approx((x(0, 1) - nd.alpha * x02 / wsum) / nd.sigma).epsilon(1e-12));
}

TEST_CASE("Gaussian chain through a sampler: output covariance = the ODE prediction, not Sigma",
          "[collage][gaussian][sampler]") {
  // AR(1), rho = 0.8, three coordinates, factors (0,1), (1,2), separator (1), VE noise from
  // sigma = 80 to 0.002 (x_T ~ N(0, Sigma + 80^2 I), the exact marginal). The deterministic
  // sampler is linear in x_T, so C_out = J C_T J^T from its Jacobian J (the sampler run on the
  // identity batch gives J^T) -- no Monte Carlo. The PF-ODE with the composed score,
  // dx/dsigma = sigma P_Bethe(sigma) x, predicts dC/dlog(sigma) = sigma^2 (P C + C P), solved
  // here by RK4 with P_Bethe written out (add_block).
  const double rho = 0.8, s_min = 0.002, s_max = 80.0;
  const Eigen::MatrixXd S = ar1(3, rho);
  GaussianPiece factor{ar1(2, rho), Eigen::VectorXd::Zero(2)};
  GaussianPiece sep{Eigen::MatrixXd::Identity(1, 1), Eigen::VectorXd::Zero(1)};
  const Backend64 backend;
  Collage<Backend64, GaussianPiece> collage(backend, models::chain_graph(2, 2, 1), {&factor, &sep},
                                            3);
  const VESchedule schedule(s_min, s_max, 0.0, 1.0);
  const Eigen::MatrixXd C_T = S + s_max * s_max * Eigen::MatrixXd::Identity(3, 3);

  auto bethe = [&](double s) {
    Eigen::MatrixXd P = Eigen::MatrixXd::Zero(3, 3);
    add_block(P, S, {0, 1}, 1, s);
    add_block(P, S, {1, 2}, 1, s);
    add_block(P, S, {1}, -1, s);
    return P;
  };
  auto rhs = [&](double u, const Eigen::MatrixXd& C) {
    const double s = std::exp(u);
    const Eigen::MatrixXd P = bethe(s);
    return Eigen::MatrixXd(s * s * (P * C + C * P));
  };
  Eigen::MatrixXd C = C_T;
  const int n_ode = 4000;
  const double u0 = std::log(s_max), u1 = std::log(s_min), h = (u1 - u0) / n_ode;
  for (int i = 0; i < n_ode; ++i) {
    const double u = u0 + i * h;
    const Eigen::MatrixXd k1 = rhs(u, C), k2 = rhs(u + h / 2, C + h / 2 * k1),
                          k3 = rhs(u + h / 2, C + h / 2 * k2), k4 = rhs(u + h, C + h * k3);
    C += h / 6 * (k1 + 2 * k2 + 2 * k3 + k4);
  }
  const double corr_ode = C(0, 2) / std::sqrt(C(0, 0) * C(2, 2));
  std::printf(
      "Gaussian chain rho = 0.8 through the PF-ODE with the composed score: corr(x_1, x_3) = "
      "%.4f (true %.4f), corr(x_1, x_2) = %.4f (true 0.8)\n",
      corr_ode, rho * rho, C(0, 1) / std::sqrt(C(0, 0) * C(1, 1)));
  CHECK(corr_ode == Approx(0.39).margin(0.01)); // "about 0.39 instead of 0.64"

  const State I = State::Identity(3, 3);
  for (int steps : {50, 200}) {
    const auto nodes = make_nodes(schedule, uniform_t_grid(schedule, steps, 1.0, 0.0));
    State x = I;
    sample(DpmSolverMultistep(), backend, schedule, std::span<const Node>(nodes), collage, x);
    const Eigen::MatrixXd J = Eigen::MatrixXd(x).transpose();
    const Eigen::MatrixXd C_out = J * C_T * J.transpose();
    const double err_ode = rel(C_out, C),
                 err_true = rel(C_out, S + s_min * s_min * Eigen::MatrixXd::Identity(3, 3));
    std::printf("  DPM-Solver++(2M), %3d steps: rel. error of C_out vs the ODE prediction %.2e, vs "
                "the true "
                "covariance %.3f\n",
                steps, err_ode, err_true);
    CHECK(err_ode <= (steps == 50 ? 1e-2 : 1e-3));
    CHECK(err_true > 0.1);
  }
}
