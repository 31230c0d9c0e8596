// diffgrad::mpi under mpiexec (1 and 2 ranks, see CMakeLists.txt). Every rank compares its
// distributed results with the single-process run of the whole batch on the same chunks
// (parallel::sample_chunked / invert_chunked / gradient_chunked over all chunks, computed
// here on every rank), bit for bit: per-row results (samples, latents, dL/dx_T) and the
// reduced dL/dtheta, dL/dcond and loss. With 1 rank the distributed call IS that run on
// MPI; with 2 ranks the shards are uneven (3 chunks: 2 + 1) or one rank owns nothing
// (1 chunk), so the 1-rank and 2-rank results are shown to be the same bits.
// The per-chunk reference itself is checked against diffgrad::gradient in test_row_chunks.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/mpi/communicator.hpp"
#include "diffgrad/mpi/data_parallel.hpp"
#include "diffgrad/parallel/chunked.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"
#include "test_support.hpp"

using namespace diffgrad;
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

/// A small MLP (GEMM layers, odd d = 3) with conditioning.
models::Mlp<double> mlp() {
  models::MlpConfig config;
  config.dim = 3;
  config.cond_dim = 2;
  config.time_frequencies = 2;
  config.hidden = {16, 16};
  config.activation = models::Activation::silu;
  models::Mlp<double> m(config, 11);
  Vector z(2);
  z << 0.3, -0.2;
  m.set_cond(z);
  return m;
}

/// x_T of the global rows `rows`: standard normal noise keyed by the global row, so each
/// rank draws its rows of the same global x_T.
State draw_x_T(RowRange rows, std::int64_t dim, std::uint64_t base_offset) {
  State x = State::Zero(rows.rows, dim);
  Backend64{}.lincomb(
      x, NoiseTerm{1.0, 1234, 99, base_offset + static_cast<std::uint64_t>(rows.begin)});
  return x;
}

bool same_bits(const State& a, const State& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}
bool same_bits(const Vector& a, const Vector& b) {
  return a.size() == b.size() && (a.array() == b.array()).all();
}

struct Layout {
  std::int64_t batch, chunk_rows;
};
// 3 chunks (3, 3, 1 rows): 2 + 1 over 2 ranks; 1 chunk: rank 1 owns nothing.
const Layout layouts[] = {{7, 3}, {2, 4}};

} // namespace

TEST_CASE("mpi: draws of x_T per rank are the rows of the global draw") {
  const mpi::Communicator comm;
  for (const Layout& l : layouts) {
    const RowChunks chunks(l.batch, l.chunk_rows);
    const RowRange rows = mpi::local_rows(comm, chunks);
    const State global = draw_x_T({0, l.batch}, 3, 5);
    CHECK(same_bits(draw_x_T(rows, 3, 5), global.middleRows(rows.begin, rows.rows)));
    const State gathered = mpi::gather_rows(comm, chunks, draw_x_T(rows, 3, 5));
    if (comm.is_root())
      CHECK(same_bits(gathered, global));
    else
      CHECK(gathered.size() == 0);
  }
}

TEST_CASE("mpi: sampling on 1 or 2 ranks gives the single-process bits (DDIM eta=1, "
          "SDE-DPM-Solver-2, odd row offset)") {
  const mpi::Communicator comm;
  const auto nodes = grid(6);
  auto run = [&](const std::string& name, const auto& scheme) {
    INFO(name);
    for (const Layout& l : layouts) {
      INFO("batch " << l.batch << ", chunk_rows " << l.chunk_rows);
      auto model = mlp();
      const RowChunks chunks(l.batch, l.chunk_rows);
      SampleOptions o;
      o.seed = 77;
      o.row_offset = 5;
      State reference = draw_x_T({0, l.batch}, 3, o.row_offset);
      parallel::sample_chunked(scheme, Backend64{}, schedule(), nodes, model, reference, chunks, o);

      const RowRange rows = mpi::local_rows(comm, chunks);
      State x = draw_x_T(rows, 3, o.row_offset);
      const auto report =
          mpi::sample(comm, scheme, Backend64{}, schedule(), nodes, model, x, chunks, o);
      CHECK(report.chunks_run == mpi::local_chunks(comm, chunks).count());
      CHECK(same_bits(x, reference.middleRows(rows.begin, rows.rows)));
      const State all = mpi::gather_rows(comm, chunks, x);
      if (comm.is_root()) CHECK(same_bits(all, reference));
    }
  };
  run("DDIM eta=1", Ddim(1.0));
  run("SDE-DPM-Solver-2", SdeDpmSolver(2, SolverPrediction::data));
}

TEST_CASE("mpi: exact inversion (BDIA) on 1 or 2 ranks gives the single-process bits") {
  const mpi::Communicator comm;
  const auto nodes = grid(6);
  const BdiaDdim method(0.5);
  for (const Layout& l : layouts) {
    auto model = mlp();
    const RowChunks chunks(l.batch, l.chunk_rows);
    const State x0_all = 0.8 * draw_x_T({0, l.batch}, 3, 0);
    LatentPair<State> reference;
    parallel::invert_chunked(method, Backend64{}, schedule(), nodes, model, x0_all, reference,
                             chunks, chunks.all());

    const RowRange rows = mpi::local_rows(comm, chunks);
    const State x0 = x0_all.middleRows(rows.begin, rows.rows);
    LatentPair<State> latent;
    mpi::invert(comm, method, Backend64{}, schedule(), nodes, model, x0, latent, chunks);
    CHECK(same_bits(latent.first, reference.first.middleRows(rows.begin, rows.rows)));
    CHECK(same_bits(latent.second, reference.second.middleRows(rows.begin, rows.rows)));
    State back;
    mpi::generate(comm, method, Backend64{}, schedule(), nodes, model, latent, back, chunks);
    const State all = mpi::gather_rows(comm, chunks, back);
    if (comm.is_root()) {
      State whole;
      generate(method, Backend64{}, schedule(), nodes, model, reference, whole);
      // generate over one call vs per chunk: the MLP's GEMMs may change bits with the batch
      // size, so the whole-batch round trip is compared to rounding (relative 1e-12).
      CHECK((all - whole).norm() <= 1e-12 * whole.norm());
      CHECK((all - x0_all).norm() <= 1e-8 * x0_all.norm()); // inversion is exact to rounding
    }
  }
}

TEST_CASE("mpi: x_T and parameter gradients on 1 or 2 ranks give the single-process bits") {
  const mpi::Communicator comm;
  const auto nodes = grid(5);
  auto run = [&](const std::string& name, const auto& scheme) {
    INFO(name);
    for (const Layout& l : layouts) {
      INFO("batch " << l.batch << ", chunk_rows " << l.chunk_rows);
      auto model = mlp();
      const RowChunks chunks(l.batch, l.chunk_rows);
      GradientOptions o;
      o.memory = MemoryMode::checkpoint(2);
      o.wrt_cond = true;
      o.wrt_params = true;
      o.seed = 3;
      o.row_offset = 1;
      const State x_T_all = draw_x_T({0, l.batch}, 3, o.row_offset);
      const State target = 0.25 * draw_x_T({0, l.batch}, 3, 1000);
      auto loss = [&](const Backend64&, const State& x0, State& grad,
                      const parallel::ChunkInfo& info) {
        grad = x0 - target.middleRows(info.row_begin, info.rows);
        return 0.5 * grad.squaredNorm();
      };
      const auto reference = parallel::gradient_chunked(scheme, Backend64{}, schedule(), nodes,
                                                        model, x_T_all, loss, chunks, o);

      const RowRange rows = mpi::local_rows(comm, chunks);
      const State x_T = x_T_all.middleRows(rows.begin, rows.rows);
      for (const mpi::Exchange exchange : {mpi::Exchange::chain, mpi::Exchange::allgather}) {
        INFO((exchange == mpi::Exchange::chain ? "chain" : "allgather"));
        const auto g = mpi::gradient(comm, scheme, Backend64{}, schedule(), nodes, model, x_T, loss,
                                     chunks, o, exchange);
        CHECK(same_bits(g.local.x0, reference.x0.middleRows(rows.begin, rows.rows)));
        CHECK(same_bits(g.local.grad_x, reference.grad_x.middleRows(rows.begin, rows.rows)));
        CHECK(same_bits(g.grad_params, reference.grad_params));
        CHECK(same_bits(g.grad_cond, reference.grad_cond));
        CHECK(g.loss == reference.loss);
        CHECK(g.chunk_loss == reference.chunk_loss);
        // Payload bytes: P = cond + params values; one loss per chunk is all-gathered.
        const std::int64_t p = model.cond_size() + model.param_size();
        const std::int64_t mine = mpi::local_chunks(comm, chunks).count();
        const std::int64_t all = chunks.count();
        const int rank = comm.rank(), last = comm.size() - 1;
        CHECK(g.exchange.values_per_chunk == 1 + p);
        if (exchange == mpi::Exchange::allgather) {
          CHECK(g.exchange.bytes_sent == mine * (1 + p) * 8);
          CHECK(g.exchange.bytes_received == all * (1 + p) * 8);
        } else {
          // Forward to the next rank, or (the last) broadcast the total; receive the prefix
          // from the previous rank and the broadcast total.
          CHECK(g.exchange.bytes_sent == mine * 8 + (last > 0 ? p * 8 : 0));
          CHECK(g.exchange.bytes_received ==
                all * 8 + (rank > 0 ? p * 8 : 0) + (rank < last ? p * 8 : 0));
        }
      }
      const auto g =
          mpi::gradient(comm, scheme, Backend64{}, schedule(), nodes, model, x_T, loss, chunks, o);
      const State grad_x_all = mpi::gather_rows(comm, chunks, g.local.grad_x);
      if (comm.is_root()) CHECK(same_bits(grad_x_all, reference.grad_x));
    }
  };
  run("DDIM", Ddim());
  run("DDIM eta=1", Ddim(1.0));
  run("SDE-DPM-Solver-2", SdeDpmSolver(2, SolverPrediction::data));
}

TEST_CASE("mpi: a bad input on one rank is an error on every rank") {
  const mpi::Communicator comm;
  const auto nodes = grid(3);
  auto model = mlp();
  const RowChunks chunks(7, 3);
  const RowRange rows = mpi::local_rows(comm, chunks);
  // The last rank passes one row too many.
  State x = draw_x_T(rows, 3, 0);
  if (comm.rank() == comm.size() - 1) x = draw_x_T({rows.begin, rows.rows + 1}, 3, 0);
  const std::string message = testing::thrown(
      [&] { mpi::sample(comm, Ddim(), Backend64{}, schedule(), nodes, model, x, chunks); });
  if (comm.rank() == comm.size() - 1)
    CHECK_THAT(message, Catch::Contains("sample_chunked: argument 'x' expected"));
  else
    CHECK_THAT(message,
               Catch::Contains("mpi::sample: rank " + std::to_string(comm.size() - 1) + " of " +
                               std::to_string(comm.size()) + " refused its input"));
  // Ranks that disagree on the partition.
  if (comm.size() > 1) {
    const RowChunks mine(7, comm.rank() == 0 ? 3 : 4);
    State y = draw_x_T(mpi::local_rows(comm, mine), 3, 0);
    CHECK_THAT(testing::thrown([&] {
                 mpi::sample(comm, Ddim(), Backend64{}, schedule(), nodes, model, y, mine);
               }),
               Catch::Contains("mpi::sample: argument 'chunks' expected the same "
                               "RowChunks(batch, chunk_rows) on every rank"));
  }
}
