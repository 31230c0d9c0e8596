// Multi-threaded CPU execution (docs/threading.md): EigenBackend on T = 1, 2, 3 threads gives
// the same bits for every backend operation, every scheme kind, every gradient memory mode and
// BDIA inversion, at sizes above the parallel thresholds, with odd widths and odd row offsets;
// the pool really ran T participants; its dispatch does not allocate; the noise of sample k
// alone is row k of a batch's; nested calls run inline; the reference mixture models split
// rows into fixed blocks, so their outputs and VJPs are also the same for every T.
//
// The allocation probe must come first (it configures Eigen); the #define keeps this file off
// the tests' shared precompiled header.
#define EIGEN_RUNTIME_NO_MALLOC
#include "alloc_probe.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#if defined(__unix__)
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/detail/philox.hpp"
#include "diffgrad/detail/thread_pool.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/dpm_solver_singlestep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"

using namespace diffgrad;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

namespace {

// Above both parallel thresholds (65536 and 16384 elements), odd width, odd row offset: the
// noise of the first row starts at an odd global index, and the thread boundaries fall inside
// Box-Muller pairs.
constexpr Eigen::Index kBatch = 37, kDim = 1999;
constexpr std::uint64_t kRowOffset = 5;
constexpr std::array<int, 3> kThreadCounts{1, 2, 3};

State pattern(Eigen::Index rows, Eigen::Index cols, double phase) {
  State x(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c)
      x(r, c) = std::sin(0.37 * static_cast<double>(r * cols + c) + phase) +
                0.05 * static_cast<double>(c % 7);
  return x;
}

bool same_bits(const State& a, const State& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0;
}
bool same_bits(const Vector& a, const Vector& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0;
}

/// All T participants of the backend's pool ran a range since the last reset.
void require_all_participated(const Backend64& backend) {
  if (backend.num_threads() == 1) return;
  REQUIRE(backend.thread_pool() != nullptr);
  const std::uint64_t all = (std::uint64_t{1} << backend.num_threads()) - 1;
  CHECK(backend.thread_pool()->participation_mask() == all);
}

/// Counts heap allocations (operator new and Eigen's allocator) while alive.
class AllocationWindow {
public:
  AllocationWindow()
      : new_before_(alloc_probe::operator_new_calls.load()),
        eigen_before_(alloc_probe::eigen_heap_allocations.load()) {
    Eigen::internal::set_is_malloc_allowed(false);
    alloc_probe::counting = true;
  }
  ~AllocationWindow() { stop(); }
  long stop() {
    if (alloc_probe::counting) {
      alloc_probe::counting = false;
      Eigen::internal::set_is_malloc_allowed(true);
      count_ = alloc_probe::operator_new_calls.load() - new_before_ +
               alloc_probe::eigen_heap_allocations.load() - eigen_before_;
    }
    return count_;
  }

private:
  long new_before_, eigen_before_, count_ = 0;
};

/// Elementwise, row-independent and differentiable: eps = tanh(a .* x + c + 0.2 t) - 0.1 x with
/// params a (per column) and cond c (per column). Written per element: no allocation, no GEMM,
/// and row k of a batch is computed exactly as the same sample alone.
struct ElementModel {
  Vector a, c;
  explicit ElementModel(Eigen::Index dim) : a(dim), c(dim) {
    for (Eigen::Index j = 0; j < dim; ++j) {
      a(j) = 0.6 + 0.2 * std::sin(0.3 * static_cast<double>(j));
      c(j) = 0.1 * std::cos(0.7 * static_cast<double>(j));
    }
  }
  std::int64_t cond_size() const { return c.size(); }
  std::int64_t param_size() const { return a.size(); }
  void eps(const State& x, const Node& n, State& out) const {
    out.resize(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index j = 0; j < x.cols(); ++j)
        out(r, j) = std::tanh(a(j) * x(r, j) + c(j) + 0.2 * n.t) - 0.1 * x(r, j);
  }
  void vjp(const State& x, const Node& n, const State& g, State& dx, Vector* dcond,
           Vector* dparams) const {
    dx.resize(x.rows(), x.cols());
    for (Eigen::Index r = 0; r < x.rows(); ++r)
      for (Eigen::Index j = 0; j < x.cols(); ++j) {
        const double y = std::tanh(a(j) * x(r, j) + c(j) + 0.2 * n.t);
        const double s = g(r, j) * (1.0 - y * y);
        if (dcond != nullptr) (*dcond)(j) += s;
        if (dparams != nullptr) (*dparams)(j) += s * x(r, j);
        dx(r, j) = s * a(j) - 0.1 * g(r, j);
      }
  }
};

std::vector<Node> vp_nodes(int steps) {
  const VPLinearSchedule schedule;
  return make_nodes(schedule, make_grid(schedule, GridKind::uniform_lambda, steps));
}

/// run_scheme on T threads; the result must equal T = 1's bit for bit.
template <class Scheme>
void check_scheme(const std::string& name, const Scheme& scheme, std::span<const Node> nodes,
                  NodeAtLambda nal, const State& x_T) {
  INFO(name);
  ElementModel model(x_T.cols());
  SampleOptions options;
  options.seed = 77;
  options.row_offset = kRowOffset;
  State reference;
  for (const int threads : kThreadCounts) {
    INFO("threads " << threads);
    const Backend64 backend(threads);
    REQUIRE(backend.num_threads() == threads);
    if (backend.thread_pool() != nullptr) backend.thread_pool()->reset_participation();
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), x_T.rows(),
                                   x_T.cols());
    State x = x_T;
    run_scheme(scheme, backend, nodes, nal, EpsField<ElementModel>{model}, x, ws, options);
    require_all_participated(backend);
    if (threads == 1)
      reference = x;
    else
      CHECK(same_bits(x, reference));
  }
}

} // namespace

TEST_CASE("The pool runs every index once on T participants, without allocating",
          "[threads][pool]") {
  for (const int threads : {2, 3, 5}) {
    detail::ThreadPool pool(threads);
    std::vector<int> hits(1000, 0);
    pool.parallel_for(1000, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) ++hits[static_cast<std::size_t>(i)];
    });
    for (const int h : hits) REQUIRE(h == 1);
    CHECK(pool.participation_mask() == (std::uint64_t{1} << threads) - 1);
    CHECK(pool.dispatches() == 1);

    // Dispatch passes a pointer to the body: no allocation per call.
    std::atomic<long> sum{0};
    AllocationWindow window;
    for (int k = 0; k < 200; ++k)
      pool.parallel_for(64,
                        [&](std::int64_t b, std::int64_t e) { sum += static_cast<long>(e - b); });
    CHECK(window.stop() == 0);
    CHECK(sum.load() == 200 * 64);
  }
}

TEST_CASE("Nested and concurrent calls run inline; exceptions reach the caller",
          "[threads][pool]") {
  detail::ThreadPool pool(3);
  // Nested: a range calling parallel_for again runs the inner range inline on its own thread.
  std::atomic<int> inner_calls{0}, inner_not_whole{0};
  pool.parallel_for(3, [&](std::int64_t, std::int64_t) {
    pool.parallel_for(10, [&](std::int64_t b, std::int64_t e) {
      ++inner_calls;
      if (b != 0 || e != 10) ++inner_not_whole;
    });
  });
  CHECK(inner_calls.load() == 3);
  CHECK(inner_not_whole.load() == 0);
  CHECK(pool.dispatches() == 1);

  // Two user threads on one pool: both finish with every index done once.
  std::vector<int> a(5000, 0), b(5000, 0);
  const auto fill_ones = [&pool](std::vector<int>& v) {
    for (int rep = 0; rep < 50; ++rep)
      pool.parallel_for(static_cast<std::int64_t>(v.size()), [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t i = lo; i < hi; ++i) ++v[static_cast<std::size_t>(i)];
      });
  };
  std::thread other([&] { fill_ones(b); });
  fill_ones(a);
  other.join();
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE((a[i] == 50 && b[i] == 50));

  // The first exception of any range is rethrown after all ranges finished; the pool stays usable.
  std::atomic<int> finished{0};
  CHECK_THROWS_AS(pool.parallel_for(3,
                                    [&](std::int64_t lo, std::int64_t) {
                                      if (lo == 2) throw std::runtime_error("range 2");
                                      ++finished;
                                    }),
                  std::runtime_error);
  CHECK(finished.load() == 2);
  std::atomic<int> after{0};
  pool.parallel_for(3, [&](std::int64_t, std::int64_t) { ++after; });
  CHECK(after.load() == 3);
}

#if defined(__unix__)
TEST_CASE("A forked child runs the pool's work inline instead of waiting for absent workers",
          "[threads][pool][fork]") {
  const Backend64 backend(3);
  const State a = pattern(kBatch, kDim, 0.1);
  State expected;
  backend.lincomb(expected, NoiseTerm{0.5, 2, 1, kRowOffset}, term(1.0, a)); // workers started
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::alarm(20); // a hang would end the child by SIGALRM: the parent then reports failure
    State out;
    backend.lincomb(out, NoiseTerm{0.5, 2, 1, kRowOffset}, term(1.0, a));
    const bool ok = same_bits(out, expected) && backend.thread_pool()->participation_mask() != 0;
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
#endif

TEST_CASE("Thread counts: constructor, set_num_threads, environment syntax, shared pools",
          "[threads][config]") {
  const Backend64 one(1);
  CHECK(one.num_threads() == 1);
  CHECK(one.thread_pool() == nullptr);
  Backend64 two(2);
  const Backend64 copy = two; // copies share the pool
  CHECK(copy.thread_pool() == two.thread_pool());
  CHECK(Backend64(2).thread_pool() == two.thread_pool()); // one process-wide pool per T
  two.set_num_threads(3);
  CHECK(two.num_threads() == 3);
  CHECK(copy.num_threads() == 2);
  // Below the thresholds a pass runs inline: no dispatch to the workers.
  const State small = pattern(10, 100, 0.2);
  State out;
  const std::int64_t before = two.thread_pool()->dispatches();
  two.lincomb(out, NoiseTerm{1.0, 1, 1, 3}, term(1.0, small));
  two.lincomb(out, term(1.0, small), term(2.0, small));
  CHECK(two.dot(small, small) > 0.0);
  CHECK(two.thread_pool()->dispatches() == before);
  const State large = pattern(70, 1000, 0.2); // 70000 elements: above both thresholds
  two.lincomb(out, term(1.0, large), term(2.0, large));
  CHECK(two.thread_pool()->dispatches() == before + 1);
  CHECK_THROWS_AS(Backend64(0), invalid_argument);
  CHECK_THROWS_AS(Backend64(65), invalid_argument);
  CHECK(detail::hardware_threads() >= 1);
}

TEST_CASE("Every backend operation gives the same bits on 1, 2 and 3 threads",
          "[threads][backend]") {
  const State a = pattern(kBatch, kDim, 0.1), b = pattern(kBatch, kDim, 1.7),
              c = pattern(kBatch, kDim, 2.9);
  // A reference for the noise that does not come from the backend: the scalar generator.
  State xi_ref(kBatch, kDim);
  for (Eigen::Index r = 0; r < kBatch; ++r)
    for (Eigen::Index j = 0; j < kDim; ++j)
      xi_ref(r, j) = detail::gaussian(9, 4,
                                      (kRowOffset + static_cast<std::uint64_t>(r)) * kDim +
                                          static_cast<std::uint64_t>(j));

  std::vector<State> ref;
  double ref_dot = 0.0, ref_sq = 0.0;
  for (const int threads : kThreadCounts) {
    INFO("threads " << threads);
    const Backend64 be(threads);
    if (be.thread_pool() != nullptr) be.thread_pool()->reset_participation();
    std::vector<State> got;
    State out;
    be.lincomb(out, term(0.5, a), term(-1.25, b), term(2.0, c));
    got.push_back(out);
    out = a; // aliasing: out is also an input
    be.lincomb(out, term(0.75, out), term(0.5, b));
    got.push_back(out);
    be.lincomb(out, NoiseTerm{1.0, 9, 4, kRowOffset});
    CHECK(same_bits(out, xi_ref));
    got.push_back(out);
    be.lincomb(out, NoiseTerm{0.3, 9, 4, kRowOffset}, term(1.0, a), term(-0.5, b));
    got.push_back(out);
    for (std::size_t arity = 1; arity <= 9; ++arity) {
      std::vector<LinTerm<State>> terms;
      for (std::size_t k = 0; k < arity; ++k)
        terms.push_back(term(0.1 * static_cast<double>(k + 1), k % 3 == 0   ? a
                                                               : k % 3 == 1 ? b
                                                                            : c));
      be.lincomb(out, std::span<const LinTerm<State>>(terms));
      got.push_back(out);
      be.lincomb(out, std::span<const LinTerm<State>>(terms), NoiseTerm{0.2, 3, arity, kRowOffset});
      got.push_back(out);
    }
    // Block2 (even width) and ColumnCoeff, with and without noise.
    const State ae = pattern(kBatch, 2 * 999, 0.4), be2 = pattern(kBatch, 2 * 999, 1.1);
    const std::array<LinTerm<State, Block2>, 2> bt{
        LinTerm<State, Block2>{Block2{0.9, 0.1, -0.2, 0.8}, &ae},
        LinTerm<State, Block2>{Block2{0.3, -0.4, 0.25, 0.5}, &be2}};
    be.lincomb(out, std::span<const LinTerm<State, Block2>>(bt));
    got.push_back(out);
    be.lincomb(out, std::span<const LinTerm<State, Block2>>(bt),
               BasicNoiseTerm<Block2>{Block2{0.3, 0.0, 0.12, 0.2}, 5, 2, kRowOffset});
    got.push_back(out);
    std::vector<double> table_host(static_cast<std::size_t>(kDim));
    for (std::size_t k = 0; k < table_host.size(); ++k)
      table_host[k] = 0.5 + 0.1 * std::sin(static_cast<double>(k));
    const auto table = be.make_coefficients(table_host);
    const std::array<LinTerm<State, ColumnCoeff>, 2> ct{
        LinTerm<State, ColumnCoeff>{ColumnCoeff{Backend64::coefficient_data(table), 0.7}, &a},
        LinTerm<State, ColumnCoeff>{ColumnCoeff{nullptr, -0.3}, &b}};
    be.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(ct));
    got.push_back(out);
    be.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(ct),
               BasicNoiseTerm<ColumnCoeff>{ColumnCoeff{Backend64::coefficient_data(table), 0.2}, 6,
                                           1, kRowOffset});
    got.push_back(out);
    // gather / scatter_add with weighted overlapping pieces.
    // Overlapping windows: piece p covers columns [333 p, 333 p + 1000), P = 4, weights.
    std::vector<std::int64_t> indices;
    for (std::int64_t p = 0; p < 4; ++p)
      for (std::int64_t k = 0; k < 1000; ++k) indices.push_back(333 * p + k);
    const IndexMap map(kDim, 1000, indices, {0.5, 1.0, -0.25, 2.0});
    State pieces;
    be.gather(a, map, pieces, 0.5, PieceWeights::apply);
    got.push_back(pieces);
    State big = b;
    be.scatter_add(pieces, map, 1.5, big);
    got.push_back(big);
    be.copy(out, c);
    CHECK(same_bits(out, c));
    be.fill(out, 0.25);
    CHECK(out.cwiseEqual(0.25).all());
    // Reductions.
    const double d = be.dot(a, b), s = be.squared_norm(c);
    CHECK(be.all_finite(a));
    State bad = a;
    bad(kBatch - 1, kDim - 2) = std::numeric_limits<double>::quiet_NaN(); // in the last chunk
    CHECK_FALSE(be.all_finite(bad));
    bad(kBatch - 1, kDim - 2) = std::numeric_limits<double>::infinity();
    CHECK_FALSE(be.all_finite(bad));
    require_all_participated(be);
    if (threads == 1) {
      ref = got;
      ref_dot = d;
      ref_sq = s;
      // The chunked reduction is a sum: against a long double sum, relative 1e-13.
      long double exact = 0;
      for (Eigen::Index k = 0; k < a.size(); ++k)
        exact += static_cast<long double>(a.data()[k]) * static_cast<long double>(b.data()[k]);
      CHECK(std::abs(d - static_cast<double>(exact)) <=
            1e-13 * std::abs(static_cast<double>(exact)));
    } else {
      REQUIRE(got.size() == ref.size());
      for (std::size_t k = 0; k < got.size(); ++k) {
        INFO("operation " << k);
        CHECK(same_bits(got[k], ref[k]));
      }
      CHECK(std::memcmp(&d, &ref_dot, sizeof d) == 0);
      CHECK(std::memcmp(&s, &ref_sq, sizeof s) == 0);
    }
  }
}

TEST_CASE("The noise of sample k alone is row k of the batch's, on any thread count",
          "[threads][noise]") {
  const Backend64 three(3);
  State batch = State::Zero(kBatch, kDim), single = State::Zero(1, kDim);
  three.lincomb(batch, NoiseTerm{1.0, 11, 2, 0});
  for (const std::uint64_t k : {0u, 1u, 18u, 36u}) {
    const Backend64 one(1);
    one.lincomb(single, NoiseTerm{1.0, 11, 2, k});
    CHECK(same_bits(single, State(batch.row(static_cast<Eigen::Index>(k)))));
  }
  // A whole stochastic sampler: sample k run alone (B = 1, row_offset = k) is row k of the
  // batch run on 3 threads (the model is row-independent, so only the noise could differ).
  const std::vector<Node> nodes = vp_nodes(6);
  const VPLinearSchedule schedule;
  const State x_T = pattern(kBatch, kDim, 0.5);
  ElementModel model(kDim);
  const SdeDpmSolver scheme(2, SolverPrediction::data);
  State x = x_T;
  SampleOptions options;
  options.seed = 5;
  sample(scheme, three, schedule, std::span<const Node>(nodes), model, x, options);
  for (const std::uint64_t k : {0u, 7u, 36u}) {
    State alone = x_T.row(static_cast<Eigen::Index>(k));
    SampleOptions o = options;
    o.row_offset = k;
    sample(scheme, Backend64(1), schedule, std::span<const Node>(nodes), model, alone, o);
    CHECK(same_bits(alone, State(x.row(static_cast<Eigen::Index>(k)))));
  }
}

TEST_CASE("Every scheme kind gives the same bits on 1, 2 and 3 threads", "[threads][schemes]") {
  const std::vector<Node> nodes = vp_nodes(8);
  const VPLinearSchedule schedule;
  const NodeAtLambda nal(schedule);
  const State x_T = pattern(kBatch, kDim, 0.3);
  const std::span<const Node> span(nodes);
  check_scheme("DDIM", Ddim(), span, nal, x_T);
  check_scheme("DDIM eta = 1", Ddim(1.0), span, nal, x_T);
  check_scheme("DPM-Solver++(2M)", DpmSolverMultistep(2, SolverPrediction::data), span, nal, x_T);
  check_scheme("DPM-Solver++(3M)", DpmSolverMultistep(3, SolverPrediction::data), span, nal, x_T);
  check_scheme("DPM-Solver singlestep 3", DpmSolverSinglestep(3, SolverPrediction::noise), span,
               nal, x_T);
  check_scheme("SDE-DPM-Solver++(2M)", SdeDpmSolver(2, SolverPrediction::data), span, nal, x_T);

  // gDDIM: CLD 2x2 blocks over [x | v] (deterministic order 3; stochastic, correlated noise)
  // and BDM per-column tables.
  using namespace diffgrad::gddim;
  const CldSchedule cld{CldParams{}};
  const State x_cld = pattern(kBatch, 2 * 999, 0.9);
  for (const double l : {0.0, 0.6}) {
    CldGddimOptions o;
    o.order = l > 0 ? 1 : 3;
    o.stochasticity = l;
    const CldGddim scheme(cld, cld_quadratic_grid(cld, 6), o);
    check_scheme("CLD gDDIM, stochasticity " + std::to_string(l), scheme,
                 std::span<const Node>(scheme.nodes()), scheme.node_at_lambda(), x_cld);
  }
  const BdmSchedule<> bdm(43, 47); // 2021 columns (odd)
  BdmGddimOptions bo;
  bo.stochasticity = 0.5;
  const BdmGddim<Backend64> bdm_scheme(Backend64(1), bdm, std::vector<double>{0.9, 0.5, 0.2, 0.05},
                                       bo);
  check_scheme("BDM gDDIM, stochasticity 0.5", bdm_scheme, bdm_scheme.nodes(),
               bdm_scheme.node_at_lambda(), pattern(kBatch, 43 * 47, 1.3));
}

TEST_CASE("The step loop does not allocate on 3 threads", "[threads][alloc]") {
  const std::vector<Node> nodes = vp_nodes(6);
  const VPLinearSchedule schedule;
  const State x_T = pattern(kBatch, kDim, 0.3);
  ElementModel model(kDim);
  const Backend64 backend(3);
  const auto run = [&](const auto& scheme) {
    SamplerWorkspace<Backend64> ws(backend, scheme.history(), scheme.stages(), kBatch, kDim);
    State x = x_T;
    SampleOptions options;
    options.row_offset = kRowOffset;
    backend.thread_pool()->reset_participation();
    AllocationWindow window;
    run_scheme(scheme, backend, std::span<const Node>(nodes), NodeAtLambda(schedule),
               EpsField<ElementModel>{model}, x, ws, options);
    const long allocations = window.stop();
    require_all_participated(backend);
    return allocations;
  };
  CHECK(run(Ddim(1.0)) == 0);
  CHECK(run(DpmSolverMultistep(3, SolverPrediction::data)) == 0);
}

TEST_CASE("Gradients in every memory mode give the same bits on 1, 2 and 3 threads",
          "[threads][gradient]") {
  const int n = 6;
  const std::vector<Node> nodes = vp_nodes(n);
  const VPLinearSchedule schedule;
  const State x_T = pattern(kBatch, kDim, 0.6), w = pattern(kBatch, kDim, 2.2);
  ElementModel model(kDim);
  const auto check = [&](const std::string& name, const auto& scheme) {
    INFO(name);
    std::vector<GradientResult<Backend64>> ref;
    for (const int threads : kThreadCounts) {
      INFO("threads " << threads);
      const Backend64 backend(threads);
      if (backend.thread_pool() != nullptr) backend.thread_pool()->reset_participation();
      std::vector<GradientResult<Backend64>> got;
      for (const MemoryMode memory :
           {MemoryMode::store_all(), MemoryMode::checkpoint(2), MemoryMode::recompute()}) {
        GradientOptions options;
        options.memory = memory;
        options.seed = 3;
        options.row_offset = kRowOffset;
        options.wrt_cond = options.wrt_params = options.wrt_noise = true;
        got.push_back(gradient(scheme, backend, schedule, std::span<const Node>(nodes), model, x_T,
                               w, options));
      }
      require_all_participated(backend);
      // Memory modes agree with each other (the same operations) ...
      for (std::size_t m = 1; m < got.size(); ++m) CHECK(same_bits(got[m].grad_x, got[0].grad_x));
      if (threads == 1) {
        ref = got;
        continue;
      }
      // ... and every mode agrees with its own single-threaded run.
      for (std::size_t m = 0; m < got.size(); ++m) {
        INFO("memory mode " << m);
        CHECK(same_bits(got[m].x0, ref[m].x0));
        CHECK(std::memcmp(&got[m].loss, &ref[m].loss, sizeof(double)) == 0);
        CHECK(same_bits(got[m].grad_x, ref[m].grad_x));
        CHECK(same_bits(got[m].grad_cond, ref[m].grad_cond));
        CHECK(same_bits(got[m].grad_params, ref[m].grad_params));
        REQUIRE(got[m].grad_noise.size() == ref[m].grad_noise.size());
        for (std::size_t i = 0; i < got[m].grad_noise.size(); ++i)
          CHECK(same_bits(got[m].grad_noise[i], ref[m].grad_noise[i]));
      }
    }
  };
  check("DDIM eta = 1", Ddim(1.0));
  check("DPM-Solver++(3M)", DpmSolverMultistep(3, SolverPrediction::data));
}

TEST_CASE("BDIA inversion and regeneration give the same bits on 1, 2 and 3 threads",
          "[threads][bdia]") {
  const std::vector<Node> nodes = vp_nodes(8);
  const VPLinearSchedule schedule;
  const State x0 = pattern(kBatch, kDim, 0.2) * 0.5;
  ElementModel model(kDim);
  LatentPair<State> ref_latent;
  State ref_back;
  for (const int threads : kThreadCounts) {
    INFO("threads " << threads);
    const Backend64 backend(threads);
    if (backend.thread_pool() != nullptr) backend.thread_pool()->reset_participation();
    LatentPair<State> latent;
    invert(BdiaDdim(0.5), backend, schedule, std::span<const Node>(nodes), model, x0, latent);
    State back;
    generate(BdiaDdim(0.5), backend, schedule, std::span<const Node>(nodes), model, latent, back);
    require_all_participated(backend);
    if (threads == 1) {
      ref_latent = latent;
      ref_back = back;
      // Round trip (a BDIA property, not a threading one): relative 1e-10 in float64.
      CHECK((back - x0).norm() <= 1e-10 * x0.norm());
    } else {
      CHECK(same_bits(latent.first, ref_latent.first));
      CHECK(same_bits(latent.second, ref_latent.second));
      CHECK(same_bits(back, ref_back));
    }
  }
}

namespace {

/// eps, x0_hat-free VJP (dx, dcond, dparams) of a mixture model on T threads.
struct ModelOutputs {
  State eps, dx;
  Vector dcond, dparams;
};

template <class Model> ModelOutputs model_outputs(Model& model, const State& x, const State& cot) {
  const Node node{0.4, 0.8, 0.6, 0.0, 0.4};
  ModelOutputs o;
  model.eps(x, node, o.eps);
  o.dcond = Vector::Zero(model.cond_size());
  o.dparams = Vector::Zero(model.param_size());
  model.vjp(x, node, cot, o.dx, &o.dcond, &o.dparams);
  return o;
}

template <class Model> void check_model_threads(const std::string& name, Model model) {
  INFO(name);
  const Eigen::Index batch = 201, dim = model.dim(); // 4 row blocks, the last one partial
  const State x = pattern(batch, dim, 0.7), cot = pattern(batch, dim, 1.9);
  ModelOutputs ref;
  for (const int threads : kThreadCounts) {
    INFO("threads " << threads);
    model.set_num_threads(threads);
    REQUIRE(model.num_threads() == threads);
    const Backend64 same(threads); // the model shares the process-wide pool of this size
    if (same.thread_pool() != nullptr) same.thread_pool()->reset_participation();
    ModelOutputs o = model_outputs(model, x, cot);
    require_all_participated(same);
    // Steady state: a second call with the same shapes does not allocate.
    AllocationWindow window;
    model_outputs(model, x, cot);
    CHECK(window.stop() <= 4); // the returned ModelOutputs' four buffers, nothing inside
    if (threads == 1) {
      ref = o;
      // Row blocks against one sample at a time (a batch of one row is one block): relative
      // 1e-12 (the GEMM and the one-row product round differently); the batch sums likewise.
      Vector dcond = Vector::Zero(model.cond_size()), dparams = Vector::Zero(model.param_size());
      double worst = 0.0;
      for (Eigen::Index r = 0; r < batch; ++r) {
        const ModelOutputs one = model_outputs(model, State(x.row(r)), State(cot.row(r)));
        worst = std::max(worst, (one.eps.row(0) - o.eps.row(r)).norm() / o.eps.row(r).norm());
        worst = std::max(worst, (one.dx.row(0) - o.dx.row(r)).norm() / o.dx.row(r).norm());
        dcond += one.dcond;
        dparams += one.dparams;
      }
      CHECK(worst < 1e-12);
      CHECK((dcond - o.dcond).norm() <= 1e-12 * o.dcond.norm());
      CHECK((dparams - o.dparams).norm() <= 1e-12 * o.dparams.norm());
    } else {
      CHECK(same_bits(o.eps, ref.eps));
      CHECK(same_bits(o.dx, ref.dx));
      CHECK(same_bits(o.dcond, ref.dcond));
      CHECK(same_bits(o.dparams, ref.dparams));
    }
  }
}

Eigen::MatrixXd mixture_points(Eigen::Index k, Eigen::Index dim) {
  Eigen::MatrixXd p(k, dim);
  for (Eigen::Index i = 0; i < k; ++i)
    for (Eigen::Index j = 0; j < dim; ++j)
      p(i, j) = std::sin(1.1 * static_cast<double>(i) + 0.3 * static_cast<double>(j));
  return p;
}

} // namespace

TEST_CASE("Mixture models: fixed row and component blocks give the same bits on 1, 2, 3 threads",
          "[threads][models]") {
  // 70 components: 3 component blocks (32, 32, 6); d = 33 (odd).
  const Eigen::MatrixXd points = mixture_points(70, 33);
  check_model_threads("DiracMixture", models::DiracMixture<double>(points));
  Eigen::VectorXd stds(70);
  for (Eigen::Index k = 0; k < 70; ++k) stds(k) = 0.1 + 0.01 * static_cast<double>(k % 5);
  check_model_threads("GaussianMixture", models::GaussianMixture<double>(points, stds));
}

namespace {

/// The Mlp's eps and VJP on T threads (once it offers set_num_threads): fixed row blocks and
/// fixed blocks of output neurons, so the same bits for every T.
template <class Model> void check_mlp_threads(Model model) {
  if constexpr (requires(Model & m) { m.set_num_threads(2); }) {
    // 3 row blocks of Mlp::kRowBlock, the last one partial.
    const Eigen::Index batch = 2 * Model::kRowBlock + 89, dim = 33;
    const State x = pattern(batch, dim, 0.4), cot = pattern(batch, dim, 2.4);
    State ref_eps, ref_dx;
    Vector ref_dcond, ref_dparams;
    for (const int threads : kThreadCounts) {
      INFO("threads " << threads);
      model.set_num_threads(threads);
      const Backend64 same(threads);
      if (same.thread_pool() != nullptr) same.thread_pool()->reset_participation();
      State eps, dx;
      Vector dcond = Vector::Zero(model.cond_size()), dparams = Vector::Zero(model.param_size());
      model.eps(x, 0.3, eps);
      model.vjp(x, 0.3, cot, dx, &dcond, &dparams);
      require_all_participated(same);
      if (threads == 1) {
        ref_eps = eps;
        ref_dx = dx;
        ref_dcond = dcond;
        ref_dparams = dparams;
      } else {
        CHECK(same_bits(eps, ref_eps));
        CHECK(same_bits(dx, ref_dx));
        CHECK(same_bits(dcond, ref_dcond));
        CHECK(same_bits(dparams, ref_dparams));
      }
    }
  } else {
    WARN("models::Mlp has no set_num_threads yet: its threading is not tested");
  }
}

} // namespace

TEST_CASE("Mlp: row blocks give the same bits on 1, 2 and 3 threads", "[threads][models][mlp]") {
  models::MlpConfig config;
  config.dim = 33;
  config.cond_dim = 3;
  config.hidden = {70, 40};
  config.activation = models::Activation::tanh;
  check_mlp_threads(models::Mlp<double>(config, 11));
  config.activation = models::Activation::silu;
  check_mlp_threads(models::Mlp<double>(config, 12));
}
