#pragma once
// The chunked driver: sampling, exact inversion and exact gradients run chunk by chunk over
// the fixed global row chunks of parallel/row_chunks.hpp. No MPI here: one process runs all
// chunks (or any range of them) with it, and diffgrad::mpi (include/diffgrad/mpi/) runs each
// rank's range with the same code and exchanges only per-chunk partial sums.
//
// Per chunk k (global rows [b, b + n)) the driver calls the library's ordinary entry point
// (diffgrad::sample, diffgrad::gradient, diffgrad::invert / generate) on exactly those n rows
// with row_offset = options.row_offset + b, so
//   - the model is called on the same batches whatever the partition (its per-row outputs
//     then match bit for bit even where GEMM blocking depends on the batch size);
//   - the noise is the global batch's noise (keyed by the global row);
//   - dL/dcond, dL/dtheta and the loss come back as one partial per chunk, summed in chunk
//     order by reduce_in_chunk_order(): one rule, used by the single process and by every
//     rank after the exchange, so the sums are the same bits too.
// Rows never interact in these engines, so the per-row results (samples, latents, dL/dx_T,
// dL/dxi) of the chunked run equal those of one whole-batch call whenever the model's
// per-row outputs do not depend on the batch (the reference mixtures evaluated row-wise, any
// row-wise model); the parameter gradient differs from the whole-batch call only in the
// order of its sum (docs/scaling.md).
//
// States: the driver slices rows (state.middleRows(b, n)): EigenBackend states and any
// row-major host matrix with that Eigen interface. Buffers of one chunk's shape are made
// once per call (two shapes at most: C rows and the last chunk's); the step loops inside
// never allocate.
#include <Eigen/Core>
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/parallel/row_chunks.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::parallel {

/// A state whose rows the driver can copy in and out (Eigen dense matrices).
template <class State>
concept RowSliceableState = requires(State& s, const State& c, std::int64_t i) {
  { c.rows() } -> std::convertible_to<std::int64_t>;
  { c.cols() } -> std::convertible_to<std::int64_t>;
  s = c.middleRows(i, i);
  s.middleRows(i, i) = c;
};

/// Where a chunk sits: its global index, its global rows and its first row in the caller's
/// (shard-local) state. Passed to a chunk loss.
struct ChunkInfo {
  std::int64_t index = 0;     ///< global chunk index k
  std::int64_t row_begin = 0; ///< first global row of the chunk (0-based within the batch)
  std::int64_t rows = 0;      ///< rows in the chunk
  std::int64_t local_row = 0; ///< first row of the chunk in the shard's states
};

/// A loss that needs to know which rows it sees (a per-row target, a weight per sample):
///   double loss(const Backend&, const State& x0_chunk, State& grad_chunk, const ChunkInfo&).
/// The global loss is the chunk-ordered sum of the chunk losses, so a loss must be a sum
/// over rows (divide by the GLOBAL batch size for a mean, never by the chunk's).
template <class L, class B>
concept ChunkLoss = Backend<B> &&
    requires(L& loss, const B& backend, const typename B::state_type& x0,
             typename B::state_type& grad, const ChunkInfo& info) {
  { loss(backend, x0, grad, info) } -> std::convertible_to<double>;
};

/// Adds partials to `sum` in the order given: sum = (((sum + p_0) + p_1) + ...), element by
/// element. Continuing a sum is the same as summing in one go, so a prefix computed on one
/// rank and continued on the next gives the bits of the single-process sum.
template <class Vector>
void accumulate_in_chunk_order(Vector& sum, std::span<const Vector> partials) {
  for (const Vector& p : partials) {
    if (p.size() != sum.size())
      diffgrad::detail::throw_argument("accumulate_in_chunk_order", "partials",
                                       diffgrad::detail::concat("partials of length ", sum.size()),
                                       p.size());
    sum += p; // element-wise: each element's sum is p_0 + p_1 + ... in this order
  }
}

/// dL/dcond, dL/dtheta and L summed over chunk partials in chunk order, starting from zero:
/// the ONE reduction rule of the single-process and the distributed runs (the same code, so
/// the same bits). `partials` are in ascending chunk order; `size` is the length of each.
template <class Vector>
Vector reduce_in_chunk_order(std::span<const Vector> partials, std::int64_t size) {
  Vector sum = Vector::Zero(static_cast<Eigen::Index>(size));
  accumulate_in_chunk_order(sum, partials);
  return sum;
}
inline double reduce_in_chunk_order(std::span<const double> partials) {
  double sum = 0.0;
  for (double p : partials) sum += p;
  return sum;
}

/// What sample_chunked / invert_chunked / generate_chunked did.
struct ChunkedReport {
  std::int64_t chunks_run = 0;  ///< chunks processed (all of the range unless cancelled)
  std::int64_t model_evals = 0; ///< model calls summed over the chunks
  int steps_taken = 0;          ///< steps of one chunk (every chunk takes the same steps)
  bool cancelled = false;
};

/// The chunked gradient of the chunks [chunks.first, chunks.last): per-row results for their
/// rows, one partial per chunk, and the partials' chunk-ordered sums.
template <Backend B> struct ChunkedGradientResult {
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;
  ChunkRange chunks;                       ///< the chunks this result holds
  state_type x0;                           ///< the samples of their rows
  state_type grad_x;                       ///< dL/dx_T of their rows
  std::vector<state_type> grad_noise;      ///< dL/dxi_i of their rows, per step (wrt_noise)
  std::vector<double> chunk_loss;          ///< L of each chunk (chunk order)
  std::vector<vector_type> cond_partials;  ///< dL/dcond of each chunk (wrt_cond)
  std::vector<vector_type> param_partials; ///< dL/dtheta of each chunk (wrt_params)
  double loss = 0.0;                       ///< reduce_in_chunk_order(chunk_loss)
  vector_type grad_cond;   ///< reduce_in_chunk_order(cond_partials) (empty unless wrt_cond)
  vector_type grad_params; ///< reduce_in_chunk_order(param_partials) (empty unless wrt_params)
  GradientCost cost;       ///< summed over chunks (peaks: the largest chunk's)
  bool cancelled = false;  ///< options.progress stopped a chunk: the gradients are incomplete
};

namespace impl {

template <class State> std::int64_t rows_of_state(const State& s) {
  return static_cast<std::int64_t>(s.rows());
}

/// Throws unless `x` holds exactly the rows of `range` (a shard's state).
template <class State>
void require_shard_rows(const State& x, const RowChunks& chunks, ChunkRange range,
                        const char* where, const char* arg) {
  chunks.check_range(range, where);
  const RowRange rows = chunks.rows_of(range);
  if (rows_of_state(x) != rows.rows)
    diffgrad::detail::throw_argument(
        where, arg,
        diffgrad::detail::concat(rows.rows, " rows (global rows [", rows.begin, ", ", rows.end(),
                                 ") = chunks [", range.first, ", ", range.last, ") of ",
                                 chunks.count(), " chunks of ", chunks.chunk_rows(),
                                 " rows, batch ", chunks.batch(), ")"),
        diffgrad::detail::concat(rows_of_state(x), " rows"));
}

/// Calls f(info) for each chunk of `range`, in chunk order; stops when f returns false.
template <class F> std::int64_t for_each_chunk(const RowChunks& chunks, ChunkRange range, F&& f) {
  const std::int64_t first_row = chunks.rows_of(range).begin;
  std::int64_t run = 0;
  for (std::int64_t k = range.first; k < range.last; ++k) {
    const RowRange rows = chunks.chunk(k);
    ++run;
    if (!f(ChunkInfo{k, rows.begin, rows.rows, rows.begin - first_row})) break;
  }
  return run;
}

/// Two buffers at most per shape role: one of C rows, one of the last chunk's rows.
template <class T> struct ByChunkShape {
  std::optional<T> full, tail;
  template <class Make> T& get(bool is_full, Make&& make) {
    std::optional<T>& slot = is_full ? full : tail;
    if (!slot) slot.emplace(make());
    return *slot;
  }
};

inline std::uint64_t chunk_row_offset(std::uint64_t base, const ChunkInfo& info) {
  return base + static_cast<std::uint64_t>(info.row_begin);
}

} // namespace impl

/// Samples the rows of `range` chunk by chunk: x holds those rows of x_T on entry and of the
/// sample on exit; options.row_offset is the global index of the BATCH's row 0 (0 for a
/// batch of its own). Equal, row for row, to sample() on the whole batch (see the header).
template <class Scheme, Backend B, class S, class Model>
ChunkedReport sample_chunked(const Scheme& scheme, const B& backend, const S& schedule,
                             std::span<const Node> nodes, Model& model, typename B::state_type& x,
                             const RowChunks& chunks, ChunkRange range,
                             const SampleOptions& options = {}) {
  using State = typename B::state_type;
  static_assert(RowSliceableState<State>,
                "diffgrad::parallel::sample_chunked: the backend's state must be a row-major "
                "host matrix with Eigen's middleRows (EigenBackend)");
  impl::require_shard_rows(x, chunks, range, "sample_chunked", "x");
  ChunkedReport report;
  State chunk;
  report.chunks_run = impl::for_each_chunk(chunks, range, [&](const ChunkInfo& info) {
    chunk = x.middleRows(info.local_row, info.rows);
    SampleOptions o = options;
    o.row_offset = impl::chunk_row_offset(options.row_offset, info);
    const SampleResult r = diffgrad::sample(scheme, backend, schedule, nodes, model, chunk, o);
    x.middleRows(info.local_row, info.rows) = chunk;
    report.model_evals += r.model_evals;
    report.steps_taken = r.steps_taken;
    return true;
  });
  return report;
}

/// All chunks (a single process).
template <class Scheme, Backend B, class S, class Model>
ChunkedReport sample_chunked(const Scheme& scheme, const B& backend, const S& schedule,
                             std::span<const Node> nodes, Model& model, typename B::state_type& x,
                             const RowChunks& chunks, const SampleOptions& options = {}) {
  return sample_chunked(scheme, backend, schedule, nodes, model, x, chunks, chunks.all(), options);
}

/// Exact inversion (BdiaDdim, Edict, ReversibleCoupling) of the rows of `range`, chunk by
/// chunk: x0 holds their data, `latent` receives their latent pair (reshaped if needed).
/// The methods are deterministic: the chunking only fixes the model's batches.
template <ReversibleMethod M, Backend B, class S, class Model>
ChunkedReport invert_chunked(const M& method, const B& backend, const S& schedule,
                             std::span<const Node> nodes, Model& model,
                             const typename B::state_type& x0,
                             LatentPair<typename B::state_type>& latent, const RowChunks& chunks,
                             ChunkRange range, const InversionOptions& options = {}) {
  using State = typename B::state_type;
  static_assert(RowSliceableState<State>,
                "diffgrad::parallel::invert_chunked: the backend's state must be a row-major "
                "host matrix with Eigen's middleRows (EigenBackend)");
  impl::require_shard_rows(x0, chunks, range, "invert_chunked", "x0");
  latent.first = backend.make_state(x0.rows(), x0.cols());
  latent.second = backend.make_state(x0.rows(), x0.cols());
  ChunkedReport report;
  State chunk;
  LatentPair<State> pair;
  report.chunks_run = impl::for_each_chunk(chunks, range, [&](const ChunkInfo& info) {
    chunk = x0.middleRows(info.local_row, info.rows);
    const InversionReport r =
        diffgrad::invert(method, backend, schedule, nodes, model, chunk, pair, options);
    latent.first.middleRows(info.local_row, info.rows) = pair.first;
    latent.second.middleRows(info.local_row, info.rows) = pair.second;
    report.model_evals += r.model_evals;
    report.steps_taken = r.steps_taken;
    report.cancelled = r.cancelled;
    return !r.cancelled;
  });
  return report;
}

/// Latent -> data for the rows of `range`, chunk by chunk (the inverse of invert_chunked).
template <ReversibleMethod M, Backend B, class S, class Model>
ChunkedReport generate_chunked(const M& method, const B& backend, const S& schedule,
                               std::span<const Node> nodes, Model& model,
                               const LatentPair<typename B::state_type>& latent,
                               typename B::state_type& x, const RowChunks& chunks, ChunkRange range,
                               const GenerateOptions& options = {}) {
  using State = typename B::state_type;
  static_assert(RowSliceableState<State>,
                "diffgrad::parallel::generate_chunked: the backend's state must be a row-major "
                "host matrix with Eigen's middleRows (EigenBackend)");
  impl::require_shard_rows(latent.first, chunks, range, "generate_chunked", "latent.first");
  impl::require_shard_rows(latent.second, chunks, range, "generate_chunked", "latent.second");
  x = backend.make_state(latent.first.rows(), latent.first.cols());
  ChunkedReport report;
  State chunk;
  LatentPair<State> pair;
  report.chunks_run = impl::for_each_chunk(chunks, range, [&](const ChunkInfo& info) {
    pair.first = latent.first.middleRows(info.local_row, info.rows);
    pair.second = latent.second.middleRows(info.local_row, info.rows);
    const GenerateReport r =
        diffgrad::generate(method, backend, schedule, nodes, model, pair, chunk, options);
    x.middleRows(info.local_row, info.rows) = chunk;
    report.model_evals += r.model_evals;
    report.steps_taken = r.steps_taken;
    report.cancelled = r.cancelled;
    return !r.cancelled;
  });
  return report;
}

/// Exact gradient of the rows of `range`, chunk by chunk: one diffgrad::gradient call per
/// chunk (row_offset = options.row_offset + the chunk's first row), per-row results copied
/// into the shard's rows, dL/dcond, dL/dtheta and L kept per chunk and summed in chunk order.
/// `loss` is one of
///   - a cotangent dL/dx_0: a state holding the rows of `range` (sliced per chunk);
///   - a ChunkLoss: loss(backend, x0_chunk, grad_chunk, ChunkInfo) (per-row targets);
///   - a LossFunction that works on any number of rows (applied to each chunk).
/// The global loss must be a sum over rows (see ChunkLoss).
template <class Scheme, Backend B, class S, class Model, class Loss>
ChunkedGradientResult<B> gradient_chunked(const Scheme& scheme, const B& backend, const S& schedule,
                                          std::span<const Node> nodes, Model& model,
                                          const typename B::state_type& x_T, Loss&& loss,
                                          const RowChunks& chunks, ChunkRange range,
                                          const GradientOptions& options = {}) {
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  static_assert(RowSliceableState<State>,
                "diffgrad::parallel::gradient_chunked: the backend's state must be a row-major "
                "host matrix with Eigen's middleRows (EigenBackend)");
  constexpr bool is_cotangent = std::is_same_v<std::remove_cvref_t<Loss>, State>;
  impl::require_shard_rows(x_T, chunks, range, "gradient_chunked", "x_T");
  if constexpr (is_cotangent) {
    impl::require_shard_rows(loss, chunks, range, "gradient_chunked", "loss (the cotangent)");
    if (loss.cols() != x_T.cols())
      diffgrad::detail::throw_argument("gradient_chunked", "loss (the cotangent)",
                                       diffgrad::detail::concat(x_T.cols(), " columns, like x_T"),
                                       loss.cols());
  }

  ChunkedGradientResult<B> out;
  out.chunks = range;
  out.x0 = backend.make_state(x_T.rows(), x_T.cols());
  out.grad_x = backend.make_state(x_T.rows(), x_T.cols());
  const auto cond_size = static_cast<std::int64_t>(model.cond_size());
  const auto param_size = static_cast<std::int64_t>(model.param_size());

  impl::ByChunkShape<GradientWorkspace<B>> workspaces;
  State chunk, cotangent;
  out.cost = GradientCost{};
  impl::for_each_chunk(chunks, range, [&](const ChunkInfo& info) {
    chunk = x_T.middleRows(info.local_row, info.rows);
    GradientOptions o = options;
    o.row_offset = impl::chunk_row_offset(options.row_offset, info);
    GradientWorkspace<B>& ws = workspaces.get(info.rows == chunks.chunk_rows(), [&] {
      return diffgrad::make_gradient_workspace(scheme, backend, nodes, model, chunk, o);
    });
    const GradientResult<B>* r = nullptr;
    if constexpr (is_cotangent) {
      cotangent = loss.middleRows(info.local_row, info.rows);
      r = &diffgrad::gradient(scheme, backend, schedule, nodes, model, chunk, cotangent, o, ws);
    } else if constexpr (ChunkLoss<std::remove_reference_t<Loss>, B>) {
      auto chunk_loss = [&loss, &info](const B& b, const State& x0, State& grad) -> double {
        return static_cast<double>(loss(b, x0, grad, info));
      };
      r = &diffgrad::gradient(scheme, backend, schedule, nodes, model, chunk, chunk_loss, o, ws);
    } else {
      r = &diffgrad::gradient(scheme, backend, schedule, nodes, model, chunk, loss, o, ws);
    }
    out.x0.middleRows(info.local_row, info.rows) = r->x0;
    out.grad_x.middleRows(info.local_row, info.rows) = r->grad_x;
    if (options.wrt_noise) {
      if (out.grad_noise.empty())
        out.grad_noise.assign(r->grad_noise.size(), backend.make_state(x_T.rows(), x_T.cols()));
      for (std::size_t i = 0; i < r->grad_noise.size(); ++i)
        out.grad_noise[i].middleRows(info.local_row, info.rows) = r->grad_noise[i];
    }
    out.chunk_loss.push_back(r->loss);
    if (options.wrt_cond) out.cond_partials.push_back(r->grad_cond);
    if (options.wrt_params) out.param_partials.push_back(r->grad_params);
    out.cost.model_evals += r->cost.model_evals;
    out.cost.vjps += r->cost.vjps;
    out.cost.forward_steps += r->cost.forward_steps;
    out.cost.peak_checkpoints = std::max(out.cost.peak_checkpoints, r->cost.peak_checkpoints);
    out.cost.peak_stored_states = std::max(out.cost.peak_stored_states, r->cost.peak_stored_states);
    out.cancelled = r->cancelled;
    return !r->cancelled;
  });
  out.loss = reduce_in_chunk_order(std::span<const double>(out.chunk_loss));
  if (options.wrt_cond)
    out.grad_cond = reduce_in_chunk_order(std::span<const Vector>(out.cond_partials), cond_size);
  if (options.wrt_params)
    out.grad_params =
        reduce_in_chunk_order(std::span<const Vector>(out.param_partials), param_size);
  return out;
}

/// All chunks (a single process).
template <class Scheme, Backend B, class S, class Model, class Loss>
ChunkedGradientResult<B>
gradient_chunked(const Scheme& scheme, const B& backend, const S& schedule,
                 std::span<const Node> nodes, Model& model, const typename B::state_type& x_T,
                 Loss&& loss, const RowChunks& chunks, const GradientOptions& options = {}) {
  return gradient_chunked(scheme, backend, schedule, nodes, model, x_T, std::forward<Loss>(loss),
                          chunks, chunks.all(), options);
}

} // namespace diffgrad::parallel
