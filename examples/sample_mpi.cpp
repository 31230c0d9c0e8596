// MPI data parallelism: sample a batch (or take an exact parameter gradient through the
// sampler) split over the ranks of MPI_COMM_WORLD, and print a checksum of the result's bits
// that is the same for any number of ranks:
//
//   mpirun -np 1 build/examples/sample_mpi                   # checksum C
//   mpirun -np 2 build/examples/sample_mpi                   # the same checksum C
//   mpirun -np 2 build/examples/sample_mpi --mode gradient   # dL/dtheta of an MLP, same bits
//
// (as root, OpenMPI also wants --allow-run-as-root; more ranks than cores: --oversubscribe.)
// The batch is cut into fixed chunks of --chunk rows; each rank draws ITS rows of x_T (noise
// keyed by the global row) and runs its whole chunks; a gradient combines its per-chunk
// partials in chunk order (--exchange chain: running sums passed rank to rank, cond + params
// doubles per rank; allgather: every chunk's partial to every rank). The wall time
// of the call (max over ranks, after a barrier) and the bytes exchanged are printed too, so
// the same program is the 1-vs-2-rank benchmark. --check makes rank 0 recompute the whole
// batch in one process and fail (exit 1) unless the bits agree.
#include <mpi.h>

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/main_guard.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/mlp.hpp"
#include "diffgrad/mpi/communicator.hpp"
#include "diffgrad/mpi/data_parallel.hpp"
#include "diffgrad/parallel/chunked.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sde_dpm_solver.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
namespace parallel = diffgrad::parallel;
namespace mpi = diffgrad::mpi;

/// FNV-1a over the bytes of the values: equal checksums mean equal bits (in practice).
std::uint64_t checksum(const double* data, std::size_t count) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < count; ++i) {
    unsigned char bytes[sizeof(double)];
    std::memcpy(bytes, data + i, sizeof(double));
    for (unsigned char b : bytes) h = (h ^ b) * 1099511628211ull;
  }
  return h;
}

struct Settings {
  std::string mode = "sample";
  std::string scheme = "sde-dpm2";
  std::string exchange = "chain";
  int batch = 8192;
  int dim = 2;
  int chunk = 256;
  int steps = 20;
  int hidden = 64;
  std::uint64_t seed = 7;
  bool check = false;
};

/// x_T of the global rows `rows`: standard normal, keyed by the global row.
State draw_x_T(parallel::RowRange rows, int dim, std::uint64_t seed) {
  State x = State::Zero(rows.rows, dim);
  Backend{}.lincomb(
      x, diffgrad::NoiseTerm{1.0, seed, 1u << 20, static_cast<std::uint64_t>(rows.begin)});
  return x;
}

template <class Scheme> int run(const Settings& s, const Scheme& scheme) {
  const mpi::Communicator comm;
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_lambda_grid(schedule, s.steps, 1.0, 1e-3));
  diffgrad::models::MlpConfig config;
  config.dim = s.dim;
  config.cond_dim = 2;
  config.hidden = {s.hidden, s.hidden};
  diffgrad::models::Mlp<double> model(config, 1);
  model.set_cond(Vector::LinSpaced(2, -0.5, 0.5));

  const parallel::RowChunks chunks(s.batch, s.chunk);
  const parallel::RowRange rows = mpi::local_rows(comm, chunks);
  const State x_T = draw_x_T(rows, s.dim, s.seed);
  // The loss: 1/2 |x_0 - 0.5|^2 summed over the batch (a sum over rows, as chunking needs).
  auto loss = [](const Backend&, const State& x0, State& grad, const parallel::ChunkInfo&) {
    grad = x0.array() - 0.5;
    return 0.5 * grad.squaredNorm();
  };

  comm.barrier();
  const double start = MPI_Wtime();
  State result;
  Vector grad_params;
  std::int64_t bytes_sent = 0, bytes_received = 0;
  diffgrad::GradientOptions gopt;
  gopt.wrt_params = true;
  gopt.seed = s.seed;
  gopt.memory = diffgrad::MemoryMode::store_all();
  diffgrad::SampleOptions sopt;
  sopt.seed = s.seed;
  if (s.mode == "sample") {
    result = x_T;
    mpi::sample(comm, scheme, backend, schedule, nodes, model, result, chunks, sopt);
  } else {
    const auto exchange = s.exchange == "chain" ? mpi::Exchange::chain : mpi::Exchange::allgather;
    auto g = mpi::gradient(comm, scheme, backend, schedule, nodes, model, x_T, loss, chunks, gopt,
                           exchange);
    result = std::move(g.local.grad_x);
    grad_params = std::move(g.grad_params);
    bytes_sent = g.exchange.bytes_sent;
    bytes_received = g.exchange.bytes_received;
  }
  const double local_seconds = MPI_Wtime() - start;
  double seconds = 0.0;
  MPI_Allreduce(&local_seconds, &seconds, 1, MPI_DOUBLE, MPI_MAX, comm.get());
  const State all = mpi::gather_rows(comm, chunks, result);

  int status = 0;
  if (comm.is_root()) {
    std::printf("sample_mpi: %d rank(s), mode %s, scheme %s, batch %d x %d, chunks of %d (%lld), "
                "%d steps, MLP 2 x %d\n",
                comm.size(), s.mode.c_str(), s.scheme.c_str(), s.batch, s.dim, s.chunk,
                static_cast<long long>(chunks.count()), s.steps, s.hidden);
    std::printf("checksum %s: %016llx\n", s.mode == "sample" ? "x0" : "dL/dx_T",
                static_cast<unsigned long long>(
                    checksum(all.data(), static_cast<std::size_t>(all.size()))));
    if (s.mode != "sample") {
      std::printf("checksum dL/dtheta: %016llx (%lld parameters)\n",
                  static_cast<unsigned long long>(
                      checksum(grad_params.data(), static_cast<std::size_t>(grad_params.size()))),
                  static_cast<long long>(grad_params.size()));
      std::printf("exchanged per gradient (%s): rank 0 sent %lld bytes, received %lld bytes\n",
                  s.exchange.c_str(), static_cast<long long>(bytes_sent),
                  static_cast<long long>(bytes_received));
    }
    std::printf("wall time: %.3f s (max over ranks)\n", seconds);
    if (s.check) {
      // The single-process run of the whole batch on the same chunks.
      const State whole_x_T = draw_x_T({0, s.batch}, s.dim, s.seed);
      bool same = false;
      if (s.mode == "sample") {
        State x = whole_x_T;
        parallel::sample_chunked(scheme, backend, schedule, nodes, model, x, chunks, sopt);
        same = (x.array() == all.array()).all();
      } else {
        const auto g = parallel::gradient_chunked(scheme, backend, schedule, nodes, model,
                                                  whole_x_T, loss, chunks, gopt);
        same = (g.grad_x.array() == all.array()).all() &&
               (g.grad_params.array() == grad_params.array()).all();
      }
      std::printf("check against one process: %s\n", same ? "identical bits" : "DIFFERENT");
      status = same ? 0 : 1;
    }
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, comm.get());
  return status;
}

} // namespace

int main(int argc, char** argv) {
  mpi::Environment environment(argc, argv);
  Settings s;
  examples::Cli cli("sample_mpi", "Sampling and exact gradients split over MPI ranks, with the "
                                  "same bits for any number of ranks");
  cli.option("--mode", s.mode, "sample | gradient (dL/dtheta of the MLP through the sampler)");
  cli.option("--scheme", s.scheme, "ddim | ddim-eta1 | dpm2m | sde-dpm2");
  cli.option("--exchange", s.exchange, "chain | allgather: how gradient partials are combined");
  cli.option("--batch", s.batch, "global batch (rows)", 1);
  cli.option("--dim", s.dim, "state dimension", 1, 1 << 20);
  cli.option("--chunk", s.chunk, "rows per fixed chunk", 1);
  cli.option("--steps", s.steps, "sampler steps", 1, 100000);
  cli.option("--hidden", s.hidden, "width of the MLP's two hidden layers", 1, 1 << 16);
  cli.option("--seed", s.seed, "noise seed");
  cli.flag("--check", s.check, "rank 0 recomputes everything in one process and compares bits");
  // Every rank parses the same arguments (a bad option is reported by each rank).
  if (!cli.parse(argc, argv)) return 2;
  return examples::run_main("sample_mpi", [&] {
    if (s.mode != "sample" && s.mode != "gradient")
      throw std::runtime_error("option '--mode': expected sample or gradient, got '" + s.mode +
                               "'");
    if (s.exchange != "chain" && s.exchange != "allgather")
      throw std::runtime_error("option '--exchange': expected chain or allgather, got '" +
                               s.exchange + "'");
    if (s.scheme == "ddim") return run(s, diffgrad::Ddim());
    if (s.scheme == "ddim-eta1") return run(s, diffgrad::Ddim(1.0));
    if (s.scheme == "dpm2m")
      return run(s, diffgrad::DpmSolverMultistep(2, diffgrad::SolverPrediction::data));
    if (s.scheme == "sde-dpm2")
      return run(s, diffgrad::SdeDpmSolver(2, diffgrad::SolverPrediction::data));
    throw std::runtime_error(
        "option '--scheme': expected ddim, ddim-eta1, dpm2m or sde-dpm2, got '" + s.scheme + "'");
  });
}
