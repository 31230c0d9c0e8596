// The fixed-chunk rules of data parallelism (parallel/row_chunks.hpp) and the chunked driver
// (parallel/chunked.hpp), without MPI: a chunked run must give the whole-batch run's per-row
// results bit for bit (samples, latents, dL/dx_T, dL/dxi), and its dL/dcond, dL/dtheta and
// loss must be exactly the chunk-ordered sum of one diffgrad::gradient call per chunk.
// Expected values come from the library's ordinary entry points (sample, invert, gradient),
// never from the driver; partition rules are checked against hand-written tables.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/edict.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/models/gaussian_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/parallel/chunked.hpp"
#include "diffgrad/parallel/row_chunks.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#include "test_support.hpp"

using namespace diffgrad;
using parallel::ChunkRange;
using parallel::RowChunks;
using parallel::RowRange;
using Backend64 = EigenBackend<double>;
using State = Backend64::state_type;
using Vector = Backend64::vector_type;

namespace {

const VPLinearSchedule& schedule() {
  static const VPLinearSchedule s;
  return s;
}
std::vector<Node> grid(int steps) {
  return make_nodes(schedule(), uniform_t_grid(schedule(), steps, 1.0, 1e-3));
}

/// A 3-component mixture in odd dimension d = 3 with conditioning logits.
models::GaussianMixture<double> mixture_model() {
  State means(3, 3);
  means << 1.0, -0.5, 0.3, -0.8, 0.6, 0.2, 0.1, -1.0, 0.9;
  Eigen::VectorXd stds(3);
  stds << 0.3, 0.5, 0.2;
  models::GaussianMixture<double> m(means, stds);
  Vector z(3);
  z << 0.2, -0.1, 0.05;
  m.set_cond(z);
  return m;
}

/// The mixture called one row at a time: per-row outputs that cannot depend on the batch.
/// (The mixture itself evaluates a batch with matrix products whose bits change with the
/// batch size: Eigen picks coefficient-based, GEMV or GEMM kernels by shape. Comparing a
/// chunked run with ONE whole-batch call needs a model without that dependence; comparing
/// with per-chunk calls does not, see the MLP case.)
struct RowwiseMixture {
  models::GaussianMixture<double> inner = mixture_model();
  std::int64_t cond_size() const { return inner.cond_size(); }
  std::int64_t param_size() const { return inner.param_size(); }
  void eps(const State& x, const Node& n, State& out) const {
    out.resize(x.rows(), x.cols());
    State row, row_out;
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      row = x.row(r);
      inner.eps(row, n, row_out);
      out.row(r) = row_out;
    }
  }
  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) const {
    dx.resize(x.rows(), x.cols());
    State row, arow, drow;
    for (Eigen::Index r = 0; r < x.rows(); ++r) {
      row = x.row(r);
      arow = a.row(r);
      inner.vjp(row, n, arow, drow, dcond, dparams);
      dx.row(r) = drow;
    }
  }
};
RowwiseMixture mixture() { return {}; }

/// A small MLP (GEMM layers): its per-row outputs MAY depend on the batch, so it is compared
/// with per-chunk calls of diffgrad::gradient (the same batches), not with the whole batch.
models::Mlp<double> mlp() {
  models::MlpConfig config;
  config.dim = 3;
  config.cond_dim = 2;
  config.time_frequencies = 2;
  config.hidden = {8};
  config.activation = models::Activation::tanh;
  models::Mlp<double> m(config, 5);
  Vector z(2);
  z << 0.3, -0.2;
  m.set_cond(z);
  return m;
}

/// Bitwise equality of two states (and their shapes).
bool same_bits(const State& a, const State& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}
bool same_bits(const Vector& a, const Vector& b) {
  return a.size() == b.size() && (a.array() == b.array()).all();
}

template <class F> void for_each_scheme(F&& f) {
  f("DDIM", Ddim());
  f("DDIM eta=1", Ddim(1.0));
  f("DPM-Solver++(2M)", DpmSolverMultistep(2, SolverPrediction::data));
  f("SDE-DPM-Solver-2", SdeDpmSolver(2, SolverPrediction::data));
}

} // namespace

TEST_CASE("RowChunks: fixed global chunks and contiguous shards") {
  const RowChunks c(11, 4); // chunks of 4, 4, 3 rows
  CHECK(c.count() == 3);
  CHECK(c.chunk(0) == RowRange{0, 4});
  CHECK(c.chunk(1) == RowRange{4, 4});
  CHECK(c.chunk(2) == RowRange{8, 3});
  CHECK(c.rows_of(c.all()) == RowRange{0, 11});
  CHECK(c.rows_of({1, 3}) == RowRange{4, 7});
  CHECK(c.rows_of({3, 3}) == RowRange{11, 0});
  // 3 chunks over 2 workers: the first takes one more.
  CHECK(c.shard(0, 2) == ChunkRange{0, 2});
  CHECK(c.shard(1, 2) == ChunkRange{2, 3});
  // More workers than chunks: the last ones own none.
  CHECK(c.shard(0, 4) == ChunkRange{0, 1});
  CHECK(c.shard(2, 4) == ChunkRange{2, 3});
  CHECK(c.shard(3, 4) == ChunkRange{3, 3});
  CHECK(c.shard(3, 4).empty());
  CHECK(RowChunks(8, 4).count() == 2);
  CHECK(RowChunks(3, 256).count() == 1);
  CHECK(RowChunks(3, 256).chunk(0) == RowRange{0, 3});
  // 7 chunks over 3 workers: 3, 2, 2; every chunk owned exactly once, in order.
  const RowChunks seven(7, 1);
  CHECK(seven.shard(0, 3) == ChunkRange{0, 3});
  CHECK(seven.shard(1, 3) == ChunkRange{3, 5});
  CHECK(seven.shard(2, 3) == ChunkRange{5, 7});
  for (int workers = 1; workers <= 9; ++workers) {
    std::int64_t next = 0;
    for (int r = 0; r < workers; ++r) {
      const ChunkRange s = seven.shard(r, workers);
      CHECK(s.first == next);
      CHECK(s.count() >= 0);
      next = s.last;
    }
    CHECK(next == 7);
  }
}

TEST_CASE("RowChunks: bad input is refused by name") {
  using testing::thrown;
  CHECK_THAT(thrown([] { RowChunks(10, 0); }),
             Catch::Contains("argument 'chunk_rows' expected at least 1 row per chunk, got 0"));
  CHECK_THAT(thrown([] { RowChunks(0, 4); }),
             Catch::Contains("argument 'batch' expected a global batch of at least 1 row, got 0"));
  const RowChunks c(10, 4);
  CHECK_THAT(thrown([&] { (void)c.shard(2, 2); }),
             Catch::Contains("argument 'rank' expected a rank in [0, 2), got 2"));
  CHECK_THAT(thrown([&] { (void)c.shard(0, 0); }), Catch::Contains("argument 'workers'"));
  CHECK_THAT(thrown([&] { (void)c.chunk(3); }),
             Catch::Contains("argument 'k' expected a chunk index in [0, 3), got 3"));
  CHECK_THAT(thrown([&] {
               (void)c.rows_of({2, 4});
             }),
             Catch::Contains("argument 'chunks' expected a chunk range within [0, 3), got [2, 4)"));

  // A shard state that does not hold its chunks' rows.
  auto model = mixture();
  const auto nodes = grid(4);
  State x = testing::test_batch<double>(5, 3);
  CHECK_THAT(thrown([&] {
               parallel::sample_chunked(Ddim(), Backend64{}, schedule(), nodes, model, x, c,
                                        ChunkRange{1, 3});
             }),
             Catch::Contains("sample_chunked: argument 'x' expected 6 rows (global rows [4, 10)"));
  const State cot = State::Ones(5, 3);
  CHECK_THAT(thrown([&] {
               parallel::gradient_chunked(Ddim(), Backend64{}, schedule(), nodes, model,
                                          testing::test_batch<double>(10, 3), cot, c);
             }),
             Catch::Contains("argument 'loss (the cotangent)' expected 10 rows"));
}

TEST_CASE("sample_chunked equals the whole-batch sample bit for bit (uneven chunks, odd d, "
          "odd row offset, stochastic schemes)") {
  const auto nodes = grid(7);
  const State x_T = testing::test_batch<double>(11, 3);
  for_each_scheme([&](const std::string& name, const auto& scheme) {
    INFO(name);
    for (const std::uint64_t offset : {std::uint64_t{0}, std::uint64_t{7}}) {
      INFO("row_offset " << offset);
      auto model = mixture();
      SampleOptions o;
      o.seed = 42;
      o.row_offset = offset;
      State whole = x_T;
      sample(scheme, Backend64{}, schedule(), nodes, model, whole, o);
      for (const std::int64_t chunk_rows : {1, 4, 5, 11, 64}) {
        INFO("chunk_rows " << chunk_rows);
        const RowChunks chunks(11, chunk_rows);
        State x = x_T;
        const auto report =
            parallel::sample_chunked(scheme, Backend64{}, schedule(), nodes, model, x, chunks, o);
        CHECK(report.chunks_run == chunks.count());
        CHECK(same_bits(x, whole));
        // One shard alone: its rows of the whole batch.
        const ChunkRange shard = chunks.shard(1, 2);
        const RowRange rows = chunks.rows_of(shard);
        State part = x_T.middleRows(rows.begin, rows.rows);
        parallel::sample_chunked(scheme, Backend64{}, schedule(), nodes, model, part, chunks, shard,
                                 o);
        CHECK(same_bits(part, whole.middleRows(rows.begin, rows.rows)));
      }
      // The stochastic schemes really draw noise: another seed changes the sample.
      if (name == "DDIM eta=1" || name == "SDE-DPM-Solver-2") {
        State other = x_T;
        SampleOptions o2 = o;
        o2.seed = 43;
        sample(scheme, Backend64{}, schedule(), nodes, model, other, o2);
        CHECK_FALSE(same_bits(other, whole));
      }
    }
  });
}

TEST_CASE("gradient_chunked: per-row results equal the whole batch bit for bit; dcond, dtheta "
          "and the loss are the chunk-ordered sums of per-chunk gradient() calls") {
  const auto nodes = grid(6);
  const std::int64_t batch = 9, chunk_rows = 4; // chunks of 4, 4, 1 rows
  const RowChunks chunks(batch, chunk_rows);
  const State x_T = testing::test_batch<double>(batch, 3);
  const State target = 0.5 * testing::test_batch<double>(batch, 3).reverse();
  for_each_scheme([&](const std::string& name, const auto& scheme) {
    for (const MemoryMode mode : {MemoryMode::store_all(), MemoryMode::checkpoint(2)}) {
      INFO(name << (mode.kind() == MemoryMode::Kind::store_all ? ", store_all" : ", checkpoint"));
      auto model = mixture();
      GradientOptions o;
      o.memory = mode;
      o.wrt_cond = true;
      o.wrt_params = true;
      o.wrt_noise = true;
      o.seed = 9;
      o.row_offset = 3; // odd: noise indices (3 + r) * 3 + c start at an odd element
      // The loss: 1/2 |x0 - target|^2 over the global batch; each chunk sees its rows.
      auto chunk_loss = [&](const Backend64&, const State& x0, State& grad,
                            const parallel::ChunkInfo& info) {
        grad = x0 - target.middleRows(info.row_begin, info.rows);
        return 0.5 * grad.squaredNorm();
      };
      const auto got = parallel::gradient_chunked(scheme, Backend64{}, schedule(), nodes, model,
                                                  x_T, chunk_loss, chunks, o);
      REQUIRE_FALSE(got.cancelled);
      REQUIRE(got.chunk_loss.size() == 3);

      // Whole batch in one call: the same per-row bits.
      const auto whole = gradient(scheme, Backend64{}, schedule(), nodes, model, x_T,
                                  SquaredDistanceLoss<Backend64>(target), o);
      CHECK(same_bits(got.x0, whole.x0));
      CHECK(same_bits(got.grad_x, whole.grad_x));
      REQUIRE(got.grad_noise.size() == whole.grad_noise.size());
      for (std::size_t i = 0; i < whole.grad_noise.size(); ++i)
        CHECK(same_bits(got.grad_noise[i], whole.grad_noise[i]));
      // Sums over rows: the same up to the order of the sum (relative 1e-12).
      CHECK(got.loss == Approx(whole.loss).epsilon(1e-12));
      CHECK((got.grad_params - whole.grad_params).norm() <= 1e-12 * whole.grad_params.norm());
      CHECK((got.grad_cond - whole.grad_cond).norm() <= 1e-12 * whole.grad_cond.norm());

      // Expected sums: one gradient() per chunk, summed here in chunk order.
      Vector params = Vector::Zero(model.param_size()), cond = Vector::Zero(model.cond_size());
      double loss = 0.0;
      for (std::int64_t k = 0; k < chunks.count(); ++k) {
        const RowRange rows = chunks.chunk(k);
        GradientOptions ok = o;
        ok.row_offset = o.row_offset + static_cast<std::uint64_t>(rows.begin);
        const State chunk = x_T.middleRows(rows.begin, rows.rows);
        const auto r =
            gradient(scheme, Backend64{}, schedule(), nodes, model, chunk,
                     SquaredDistanceLoss<Backend64>(target.middleRows(rows.begin, rows.rows)), ok);
        params += r.grad_params;
        cond += r.grad_cond;
        loss += r.loss;
        CHECK(same_bits(got.param_partials[static_cast<std::size_t>(k)], r.grad_params));
      }
      CHECK(same_bits(got.grad_params, params));
      CHECK(same_bits(got.grad_cond, cond));
      CHECK(got.loss == loss);
    }
  });
}

TEST_CASE("gradient_chunked over shards reassembles the single-process run (MLP, uneven "
          "shards)") {
  const auto nodes = grid(5);
  const RowChunks chunks(7, 3); // chunks of 3, 3, 1 rows
  const State x_T = testing::test_batch<double>(7, 3);
  const State cotangent = 0.3 * testing::test_batch<double>(7, 3).array().cos().matrix();
  for_each_scheme([&](const std::string& name, const auto& scheme) {
    INFO(name);
    auto model = mlp();
    GradientOptions o;
    o.wrt_cond = true;
    o.wrt_params = true;
    o.seed = 5;
    o.row_offset = 1;
    const auto all = parallel::gradient_chunked(scheme, Backend64{}, schedule(), nodes, model, x_T,
                                                cotangent, chunks, o);
    // Shards [0, 2) and [2, 3), as 2 ranks would run them.
    std::vector<Vector> params;
    std::vector<double> losses;
    for (int rank = 0; rank < 2; ++rank) {
      const ChunkRange shard = chunks.shard(rank, 2);
      const RowRange rows = chunks.rows_of(shard);
      const State cot = cotangent.middleRows(rows.begin, rows.rows);
      const auto part =
          parallel::gradient_chunked(scheme, Backend64{}, schedule(), nodes, model,
                                     x_T.middleRows(rows.begin, rows.rows), cot, chunks, shard, o);
      CHECK(same_bits(part.x0, all.x0.middleRows(rows.begin, rows.rows)));
      CHECK(same_bits(part.grad_x, all.grad_x.middleRows(rows.begin, rows.rows)));
      params.insert(params.end(), part.param_partials.begin(), part.param_partials.end());
      losses.insert(losses.end(), part.chunk_loss.begin(), part.chunk_loss.end());
    }
    REQUIRE(params.size() == 3);
    Vector expected = Vector::Zero(model.param_size());
    for (const Vector& p : params) expected += p;
    CHECK(same_bits(all.grad_params, expected));
    CHECK(all.loss == (losses[0] + losses[1]) + losses[2]);
    // The MLP's own per-chunk gradient() calls give the partials.
    const State chunk = x_T.middleRows(6, 1);
    GradientOptions o2 = o;
    o2.row_offset = o.row_offset + 6;
    const State cot2 = cotangent.middleRows(6, 1);
    const auto last = gradient(scheme, Backend64{}, schedule(), nodes, model, chunk, cot2, o2);
    CHECK(same_bits(params[2], last.grad_params));
    CHECK(same_bits(all.grad_x.middleRows(6, 1), last.grad_x));
  });
}

TEST_CASE("invert_chunked / generate_chunked equal the whole-batch inversion bit for bit") {
  const auto nodes = grid(8);
  const State x0 = 0.7 * testing::test_batch<double>(10, 3);
  const RowChunks chunks(10, 3); // 3, 3, 3, 1
  auto check = [&](const std::string& name, const auto& method) {
    INFO(name);
    auto model = mixture();
    LatentPair<State> whole;
    invert(method, Backend64{}, schedule(), nodes, model, x0, whole);
    LatentPair<State> latent;
    const auto report = parallel::invert_chunked(method, Backend64{}, schedule(), nodes, model, x0,
                                                 latent, chunks, chunks.all());
    CHECK(report.chunks_run == 4);
    CHECK(same_bits(latent.first, whole.first));
    CHECK(same_bits(latent.second, whole.second));
    State x_whole, x;
    generate(method, Backend64{}, schedule(), nodes, model, whole, x_whole);
    parallel::generate_chunked(method, Backend64{}, schedule(), nodes, model, latent, x, chunks,
                               chunks.all());
    CHECK(same_bits(x, x_whole));
  };
  check("BDIA", BdiaDdim(0.5));
  check("EDICT", Edict(0.93));
}
