#pragma once
// MPI data parallelism (docs/scaling.md): a global batch of B rows in fixed chunks of C rows
// (parallel::RowChunks) is dealt out to the ranks of a communicator, each rank owning a
// contiguous range of whole chunks (RowChunks::shard). Each rank holds only ITS rows of
// x_T / x_0 and runs the MPI-free chunked driver (parallel/chunked.hpp) on them:
//
//   diffgrad::mpi::Communicator comm;                       // MPI_COMM_WORLD
//   const parallel::RowChunks chunks(batch, 256);            // the same on every rank
//   const auto rows = mpi::local_rows(comm, chunks);         // this rank's global rows
//   State x = draw_x_T(rows);                                // noise at row_offset rows.begin
//   mpi::sample(comm, scheme, backend, schedule, nodes, model, x, chunks, {.seed = 7});
//   auto g = mpi::gradient(comm, scheme, backend, schedule, nodes, model, x_T, loss, chunks,
//                          {.wrt_params = true});          // g.grad_params on every rank
//   State all = mpi::gather_rows(comm, chunks, x);           // the whole batch on rank 0
//
// Sampling and inversion need no communication. A gradient exchanges only per-chunk partials
// (the loss, dL/dcond, dL/dtheta of each chunk: 1 + cond_size + param_size doubles per chunk,
// one MPI_Allgatherv) and every rank sums them in global chunk order with the single-process
// rule (parallel::reduce_in_chunk_order): the result equals the single-process chunked run,
// and therefore the 1-rank run, bit for bit, for any number of ranks.
//
// Every function here is collective: call it on every rank of `comm`, with the same chunks
// and options. Inputs are checked on every rank and the outcome agreed (mpi::agree), so a bad
// input or a failing model on one rank throws on all ranks instead of hanging the others.
#include <mpi.h>

#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/mpi/communicator.hpp"
#include "diffgrad/parallel/chunked.hpp"
#include "diffgrad/parallel/row_chunks.hpp"

namespace diffgrad::mpi {

using parallel::ChunkRange;
using parallel::RowChunks;
using parallel::RowRange;

/// This rank's chunks and global rows.
inline ChunkRange local_chunks(const Communicator& comm, const RowChunks& chunks) {
  return chunks.shard(comm.rank(), comm.size());
}
inline RowRange local_rows(const Communicator& comm, const RowChunks& chunks) {
  return chunks.rows_of(local_chunks(comm, chunks));
}

namespace impl {

/// Every rank must use the same partition: checked with one small MPI_Allreduce.
inline void require_same_chunks(const Communicator& comm, const RowChunks& chunks,
                                const char* where) {
  const std::int64_t mine[2] = {chunks.batch(), chunks.chunk_rows()};
  std::int64_t low[2] = {0, 0}, high[2] = {0, 0};
  check(MPI_Allreduce(mine, low, 2, MPI_INT64_T, MPI_MIN, comm.get()), "MPI_Allreduce");
  check(MPI_Allreduce(mine, high, 2, MPI_INT64_T, MPI_MAX, comm.get()), "MPI_Allreduce");
  if (low[0] != high[0] || low[1] != high[1])
    diffgrad::detail::throw_argument(
        where, "chunks", "the same RowChunks(batch, chunk_rows) on every rank",
        diffgrad::detail::concat("batch in [", low[0], ", ", high[0], "] and chunk_rows in [",
                                 low[1], ", ", high[1], "] across the ", comm.size(), " ranks"));
}

} // namespace impl

/// Samples this rank's rows (x: its rows of x_T in, of the sample out), chunk by chunk. No
/// communication beyond the agreement on the chunks and on errors.
template <class Scheme, Backend B, class S, class Model>
parallel::ChunkedReport sample(const Communicator& comm, const Scheme& scheme, const B& backend,
                               const S& schedule, std::span<const Node> nodes, Model& model,
                               typename B::state_type& x, const RowChunks& chunks,
                               const SampleOptions& options = {}) {
  impl::require_same_chunks(comm, chunks, "mpi::sample");
  parallel::ChunkedReport report;
  agree(comm, "mpi::sample", [&] {
    report = parallel::sample_chunked(scheme, backend, schedule, nodes, model, x, chunks,
                                      local_chunks(comm, chunks), options);
  });
  return report;
}

/// Exact inversion of this rank's rows (x0 -> latent), chunk by chunk.
template <ReversibleMethod M, Backend B, class S, class Model>
parallel::ChunkedReport invert(const Communicator& comm, const M& method, const B& backend,
                               const S& schedule, std::span<const Node> nodes, Model& model,
                               const typename B::state_type& x0,
                               LatentPair<typename B::state_type>& latent, const RowChunks& chunks,
                               const InversionOptions& options = {}) {
  impl::require_same_chunks(comm, chunks, "mpi::invert");
  parallel::ChunkedReport report;
  agree(comm, "mpi::invert", [&] {
    report = parallel::invert_chunked(method, backend, schedule, nodes, model, x0, latent, chunks,
                                      local_chunks(comm, chunks), options);
  });
  return report;
}

/// Latent -> data for this rank's rows, chunk by chunk.
template <ReversibleMethod M, Backend B, class S, class Model>
parallel::ChunkedReport generate(const Communicator& comm, const M& method, const B& backend,
                                 const S& schedule, std::span<const Node> nodes, Model& model,
                                 const LatentPair<typename B::state_type>& latent,
                                 typename B::state_type& x, const RowChunks& chunks,
                                 const GenerateOptions& options = {}) {
  impl::require_same_chunks(comm, chunks, "mpi::generate");
  parallel::ChunkedReport report;
  agree(comm, "mpi::generate", [&] {
    report = parallel::generate_chunked(method, backend, schedule, nodes, model, latent, x, chunks,
                                        local_chunks(comm, chunks), options);
  });
  return report;
}

/// What one distributed gradient exchanged (this rank's view).
struct ExchangeStats {
  std::int64_t values_per_chunk = 0; ///< 1 + cond_size + param_size (wanted ones only)
  std::int64_t bytes_sent = 0;       ///< this rank's partials: local chunks * values * 8
  std::int64_t bytes_received = 0;   ///< every rank's partials, this rank's included
};

/// A distributed gradient: this rank's per-row results, and the global sums (on every rank).
template <Backend B> struct DistributedGradientResult {
  using vector_type = typename B::vector_type;
  parallel::ChunkedGradientResult<B> local; ///< this rank's rows and chunk partials
  std::vector<double> chunk_loss;           ///< L of every chunk, in global chunk order
  double loss = 0.0;                        ///< sum of chunk_loss in chunk order
  vector_type grad_cond;   ///< dL/dcond over the whole batch (empty unless wrt_cond)
  vector_type grad_params; ///< dL/dtheta over the whole batch (empty unless wrt_params)
  ExchangeStats exchange;
};

/// Exact gradient over the global batch: this rank's chunks through the chunked driver
/// (per-row results in result.local), then one MPI_Allgatherv of the per-chunk partials
/// (as doubles: exact for float and double scalars) and the chunk-ordered sums on every
/// rank. `loss` as for parallel::gradient_chunked (a cotangent holds this rank's rows; a
/// ChunkLoss sees global row indices). options.progress cannot stop a distributed gradient
/// (every rank must reach the exchange): it is refused.
template <class Scheme, Backend B, class S, class Model, class Loss>
DistributedGradientResult<B>
gradient(const Communicator& comm, const Scheme& scheme, const B& backend, const S& schedule,
         std::span<const Node> nodes, Model& model, const typename B::state_type& x_T, Loss&& loss,
         const RowChunks& chunks, const GradientOptions& options = {}) {
  using Vector = typename B::vector_type;
  using Scalar = typename Vector::Scalar;
  static_assert(std::is_same_v<Scalar, double> || std::is_same_v<Scalar, float>,
                "diffgrad::mpi::gradient: host float or double vectors (EigenBackend)");
  impl::require_same_chunks(comm, chunks, "mpi::gradient");
  const ChunkRange mine = local_chunks(comm, chunks);
  const auto cond_size = options.wrt_cond ? static_cast<std::int64_t>(model.cond_size()) : 0;
  const auto param_size = options.wrt_params ? static_cast<std::int64_t>(model.param_size()) : 0;
  const std::int64_t per_chunk = 1 + cond_size + param_size;

  DistributedGradientResult<B> out;
  std::vector<double> send;
  agree(comm, "mpi::gradient", [&] {
    if (options.progress)
      throw diffgrad::invalid_argument(
          "mpi::gradient: argument 'options.progress' expected empty (a distributed gradient "
          "cannot be stopped on one rank), got a callback");
    mpi_count(chunks.count() * per_chunk, "mpi::gradient", "chunk partials");
    out.local = parallel::gradient_chunked(scheme, backend, schedule, nodes, model, x_T,
                                           std::forward<Loss>(loss), chunks, mine, options);
    // Pack [loss, dcond..., dtheta...] per local chunk, chunk after chunk.
    send.reserve(static_cast<std::size_t>(mine.count() * per_chunk));
    for (std::int64_t j = 0; j < mine.count(); ++j) {
      const auto u = static_cast<std::size_t>(j);
      send.push_back(out.local.chunk_loss[u]);
      if (options.wrt_cond)
        for (Eigen::Index i = 0; i < out.local.cond_partials[u].size(); ++i)
          send.push_back(static_cast<double>(out.local.cond_partials[u](i)));
      if (options.wrt_params)
        for (Eigen::Index i = 0; i < out.local.param_partials[u].size(); ++i)
          send.push_back(static_cast<double>(out.local.param_partials[u](i)));
    }
  });

  // Every rank's block lands at its first chunk: the buffer is in global chunk order.
  std::vector<int> counts(static_cast<std::size_t>(comm.size()));
  std::vector<int> offsets(static_cast<std::size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    const ChunkRange s = chunks.shard(r, comm.size());
    counts[static_cast<std::size_t>(r)] = static_cast<int>(s.count() * per_chunk);
    offsets[static_cast<std::size_t>(r)] = static_cast<int>(s.first * per_chunk);
  }
  std::vector<double> all(static_cast<std::size_t>(chunks.count() * per_chunk));
  check(MPI_Allgatherv(send.data(), static_cast<int>(send.size()), MPI_DOUBLE, all.data(),
                       counts.data(), offsets.data(), MPI_DOUBLE, comm.get()),
        "MPI_Allgatherv");

  // Unpack into per-chunk partials and sum them with the single-process rule.
  std::vector<Vector> cond_parts, param_parts;
  out.chunk_loss.resize(static_cast<std::size_t>(chunks.count()));
  for (std::int64_t k = 0; k < chunks.count(); ++k) {
    const double* p = all.data() + k * per_chunk;
    out.chunk_loss[static_cast<std::size_t>(k)] = p[0];
    if (options.wrt_cond)
      cond_parts.push_back(
          Eigen::Map<const Eigen::VectorXd>(p + 1, cond_size).template cast<Scalar>());
    if (options.wrt_params)
      param_parts.push_back(
          Eigen::Map<const Eigen::VectorXd>(p + 1 + cond_size, param_size).template cast<Scalar>());
  }
  out.loss = parallel::reduce_in_chunk_order(std::span<const double>(out.chunk_loss));
  if (options.wrt_cond)
    out.grad_cond = parallel::reduce_in_chunk_order(std::span<const Vector>(cond_parts), cond_size);
  if (options.wrt_params)
    out.grad_params =
        parallel::reduce_in_chunk_order(std::span<const Vector>(param_parts), param_size);
  out.exchange.values_per_chunk = per_chunk;
  out.exchange.bytes_sent = static_cast<std::int64_t>(send.size() * sizeof(double));
  out.exchange.bytes_received = static_cast<std::int64_t>(all.size() * sizeof(double));
  return out;
}

/// The whole batch on `root` (rows in global order), an empty state on the other ranks:
/// every rank passes its rows (`local`, as sample / gradient leave them).
template <class State>
State gather_rows(const Communicator& comm, const RowChunks& chunks, const State& local,
                  int root = 0) {
  using Scalar = typename State::Scalar;
  static_assert(parallel::RowSliceableState<State> && State::IsRowMajor,
                "diffgrad::mpi::gather_rows: a row-major host state (EigenBackend)");
  impl::require_same_chunks(comm, chunks, "mpi::gather_rows");
  std::int64_t dim = 0;
  agree(comm, "mpi::gather_rows", [&] {
    if (root < 0 || root >= comm.size())
      diffgrad::detail::throw_argument("mpi::gather_rows", "root",
                                       diffgrad::detail::concat("a rank in [0, ", comm.size(), ")"),
                                       root);
    parallel::impl::require_shard_rows(local, chunks, local_chunks(comm, chunks),
                                       "mpi::gather_rows", "local");
    mpi_count(chunks.batch() * static_cast<std::int64_t>(local.cols()), "mpi::gather_rows",
              "the gathered state");
    dim = static_cast<std::int64_t>(local.cols());
  });
  // All ranks must agree on the width too (a rank with no rows still passes 0 x d).
  std::int64_t low = 0, high = 0;
  check(MPI_Allreduce(&dim, &low, 1, MPI_INT64_T, MPI_MIN, comm.get()), "MPI_Allreduce");
  check(MPI_Allreduce(&dim, &high, 1, MPI_INT64_T, MPI_MAX, comm.get()), "MPI_Allreduce");
  if (low != high)
    diffgrad::detail::throw_argument("mpi::gather_rows", "local",
                                     "the same number of columns on every rank",
                                     diffgrad::detail::concat("widths in [", low, ", ", high, "]"));
  std::vector<int> counts, offsets;
  State all;
  if (comm.rank() == root) {
    all.resize(static_cast<Eigen::Index>(chunks.batch()), static_cast<Eigen::Index>(dim));
    for (int r = 0; r < comm.size(); ++r) {
      const RowRange rows = chunks.rows_of(chunks.shard(r, comm.size()));
      counts.push_back(static_cast<int>(rows.rows * dim));
      offsets.push_back(static_cast<int>(rows.begin * dim));
    }
  }
  check(MPI_Gatherv(local.data(), static_cast<int>(local.size()), datatype<Scalar>(), all.data(),
                    counts.data(), offsets.data(), datatype<Scalar>(), root, comm.get()),
        "MPI_Gatherv");
  return all;
}

} // namespace diffgrad::mpi
