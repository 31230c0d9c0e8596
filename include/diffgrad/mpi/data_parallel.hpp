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
// Sampling and inversion need no communication. A gradient exchanges only sums of per-chunk
// partials (the loss, dL/dcond, dL/dtheta), combined in global chunk order with the
// single-process rule (parallel::reduce_in_chunk_order): by default a chain of running sums
// (O(cond + params) bytes per rank), or an all-gather of every chunk's partial (Exchange).
// The result equals the single-process chunked run, and so the 1-rank run, bit for bit, for
// any number of ranks.
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

/// How a distributed gradient combines the per-chunk partials of dL/dcond and dL/dtheta.
/// Both give the single-process bits; they differ in bytes and in depth.
enum class Exchange {
  /// The running sum travels rank 0 -> 1 -> ... -> last (each rank adds its chunks in
  /// order: a prefix continued is the sequential sum), then the last rank broadcasts it.
  /// Per rank O(P) bytes (P = cond + params values): at most P sent, P received and the
  /// broadcast; ranks - 1 sequential hops. The default.
  chain,
  /// One MPI_Allgatherv of every chunk's partials, then every rank sums all chunks in order.
  /// Per rank (chunks * P) values received: one collective, no sequential hops; for small
  /// models on many ranks.
  allgather,
};

/// What one distributed gradient exchanged (this rank's view, payload bytes only).
struct ExchangeStats {
  Exchange method = Exchange::chain;
  std::int64_t values_per_chunk = 0; ///< 1 + cond_size + param_size (the wanted ones)
  std::int64_t bytes_sent = 0;       ///< payload this rank sent (its root part of a broadcast)
  std::int64_t bytes_received = 0;   ///< payload this rank received (its own block included
                                     ///< for allgather)
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

namespace impl {

/// [dcond | dtheta] of one chunk (or a running sum) as doubles: exact for float and double.
template <class Vector>
void pack(std::vector<double>& out, const Vector* cond, const Vector* params) {
  if (cond)
    for (Eigen::Index i = 0; i < cond->size(); ++i) out.push_back(static_cast<double>((*cond)(i)));
  if (params)
    for (Eigen::Index i = 0; i < params->size(); ++i)
      out.push_back(static_cast<double>((*params)(i)));
}
template <class Vector>
void unpack(const double* p, std::int64_t cond_size, std::int64_t param_size, Vector& cond,
            Vector& params) {
  using Scalar = typename Vector::Scalar;
  cond = Eigen::Map<const Eigen::VectorXd>(p, cond_size).template cast<Scalar>();
  params = Eigen::Map<const Eigen::VectorXd>(p + cond_size, param_size).template cast<Scalar>();
}

/// Every rank's block of `per_rank(r)` values at offset `first(r)`, gathered on every rank.
template <class Count, class First>
std::vector<double> allgather(const Communicator& comm, const std::vector<double>& send,
                              std::int64_t total, Count&& per_rank, First&& first) {
  std::vector<int> counts(static_cast<std::size_t>(comm.size()));
  std::vector<int> offsets(static_cast<std::size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    counts[static_cast<std::size_t>(r)] = static_cast<int>(per_rank(r));
    offsets[static_cast<std::size_t>(r)] = static_cast<int>(first(r));
  }
  std::vector<double> all(static_cast<std::size_t>(total));
  check(MPI_Allgatherv(send.data(), static_cast<int>(send.size()), MPI_DOUBLE, all.data(),
                       counts.data(), offsets.data(), MPI_DOUBLE, comm.get()),
        "MPI_Allgatherv");
  return all;
}

} // namespace impl

/// Exact gradient over the global batch: this rank's chunks through the chunked driver
/// (per-row results in result.local), then the per-chunk partials are combined in global
/// chunk order (`exchange`: a chain of running sums, or an all-gather of every partial) and
/// the chunk losses all-gathered: every rank gets the loss, dL/dcond and dL/dtheta of the
/// single-process chunked run, bit for bit. `loss` as for parallel::gradient_chunked (a
/// cotangent holds this rank's rows; a ChunkLoss sees global row indices).
/// options.progress cannot stop a distributed gradient (every rank must reach the exchange):
/// it is refused.
template <class Scheme, Backend B, class S, class Model, class Loss>
DistributedGradientResult<B>
gradient(const Communicator& comm, const Scheme& scheme, const B& backend, const S& schedule,
         std::span<const Node> nodes, Model& model, const typename B::state_type& x_T, Loss&& loss,
         const RowChunks& chunks, const GradientOptions& options = {},
         Exchange exchange = Exchange::chain) {
  using Vector = typename B::vector_type;
  using Scalar = typename Vector::Scalar;
  static_assert(std::is_same_v<Scalar, double> || std::is_same_v<Scalar, float>,
                "diffgrad::mpi::gradient: host float or double vectors (EigenBackend)");
  impl::require_same_chunks(comm, chunks, "mpi::gradient");
  const ChunkRange mine = local_chunks(comm, chunks);
  const auto cond_size = options.wrt_cond ? static_cast<std::int64_t>(model.cond_size()) : 0;
  const auto param_size = options.wrt_params ? static_cast<std::int64_t>(model.param_size()) : 0;
  const std::int64_t values = cond_size + param_size; // per partial, the loss apart

  DistributedGradientResult<B> out;
  out.exchange.method = exchange;
  out.exchange.values_per_chunk = 1 + values;
  agree(comm, "mpi::gradient", [&] {
    if (options.progress)
      throw diffgrad::invalid_argument(
          "mpi::gradient: argument 'options.progress' expected empty (a distributed gradient "
          "cannot be stopped on one rank), got a callback");
    if (exchange != Exchange::chain && exchange != Exchange::allgather)
      diffgrad::detail::throw_argument("mpi::gradient", "exchange", "Exchange::chain or allgather",
                                       static_cast<int>(exchange));
    mpi_count(chunks.count() * (exchange == Exchange::allgather ? values + 1 : 1), "mpi::gradient",
              "chunk partials");
    out.local = parallel::gradient_chunked(scheme, backend, schedule, nodes, model, x_T,
                                           std::forward<Loss>(loss), chunks, mine, options);
  });
  const Vector* no_vector = nullptr;
  std::int64_t sent = 0, received = 0;

  // The chunk losses (one double per chunk), in global chunk order on every rank.
  out.chunk_loss = impl::allgather(
      comm, out.local.chunk_loss, chunks.count(),
      [&](int r) { return chunks.shard(r, comm.size()).count(); },
      [&](int r) { return chunks.shard(r, comm.size()).first; });
  sent += mine.count() * 8;
  received += chunks.count() * 8;
  out.loss = parallel::reduce_in_chunk_order(std::span<const double>(out.chunk_loss));

  if (values > 0 && exchange == Exchange::allgather) {
    std::vector<double> send;
    send.reserve(static_cast<std::size_t>(mine.count() * values));
    for (std::int64_t j = 0; j < mine.count(); ++j) {
      const auto u = static_cast<std::size_t>(j);
      impl::pack(send, options.wrt_cond ? &out.local.cond_partials[u] : no_vector,
                 options.wrt_params ? &out.local.param_partials[u] : no_vector);
    }
    const std::vector<double> all = impl::allgather(
        comm, send, chunks.count() * values,
        [&](int r) { return chunks.shard(r, comm.size()).count() * values; },
        [&](int r) { return chunks.shard(r, comm.size()).first * values; });
    sent += static_cast<std::int64_t>(send.size()) * 8;
    received += static_cast<std::int64_t>(all.size()) * 8;
    std::vector<Vector> cond_parts(static_cast<std::size_t>(chunks.count()));
    std::vector<Vector> param_parts(static_cast<std::size_t>(chunks.count()));
    for (std::int64_t k = 0; k < chunks.count(); ++k)
      impl::unpack(all.data() + k * values, cond_size, param_size,
                   cond_parts[static_cast<std::size_t>(k)],
                   param_parts[static_cast<std::size_t>(k)]);
    if (options.wrt_cond)
      out.grad_cond =
          parallel::reduce_in_chunk_order(std::span<const Vector>(cond_parts), cond_size);
    if (options.wrt_params)
      out.grad_params =
          parallel::reduce_in_chunk_order(std::span<const Vector>(param_parts), param_size);
  } else if (values > 0) {
    // The chain: receive the prefix sum of the chunks before ours, continue it, pass it on.
    Vector cond = Vector::Zero(static_cast<Eigen::Index>(cond_size));
    Vector params = Vector::Zero(static_cast<Eigen::Index>(param_size));
    std::vector<double> buffer;
    buffer.reserve(static_cast<std::size_t>(values));
    constexpr int tag = 0x6467; // "dg"
    if (comm.rank() > 0) {
      buffer.resize(static_cast<std::size_t>(values));
      check(MPI_Recv(buffer.data(), static_cast<int>(values), MPI_DOUBLE, comm.rank() - 1, tag,
                     comm.get(), MPI_STATUS_IGNORE),
            "MPI_Recv");
      received += values * 8;
      impl::unpack(buffer.data(), cond_size, param_size, cond, params);
    }
    parallel::accumulate_in_chunk_order(cond, std::span<const Vector>(out.local.cond_partials));
    parallel::accumulate_in_chunk_order(params, std::span<const Vector>(out.local.param_partials));
    buffer.clear();
    impl::pack(buffer, &cond, &params);
    const int last = comm.size() - 1;
    if (comm.rank() < last) {
      check(MPI_Send(buffer.data(), static_cast<int>(values), MPI_DOUBLE, comm.rank() + 1, tag,
                     comm.get()),
            "MPI_Send");
      sent += values * 8;
    }
    check(MPI_Bcast(buffer.data(), static_cast<int>(values), MPI_DOUBLE, last, comm.get()),
          "MPI_Bcast");
    if (comm.rank() == last)
      sent += comm.size() > 1 ? values * 8 : 0;
    else
      received += values * 8;
    impl::unpack(buffer.data(), cond_size, param_size, cond, params);
    if (options.wrt_cond) out.grad_cond = std::move(cond);
    if (options.wrt_params) out.grad_params = std::move(params);
  } else {
    out.grad_cond = Vector::Zero(0);
    out.grad_params = Vector::Zero(0);
  }
  out.exchange.bytes_sent = sent;
  out.exchange.bytes_received = received;
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
