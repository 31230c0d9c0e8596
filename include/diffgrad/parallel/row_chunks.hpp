#pragma once
// Fixed global row chunks: the unit of work of data parallelism (docs/scaling.md).
//
// A global batch of B rows is cut into chunks of C rows: chunk k holds the global rows
// [k C, min((k + 1) C, B)), so every chunk but the last has exactly C rows. The partition
// depends only on (B, C), never on how many processes or devices run it. A worker (an MPI
// rank, a GPU) owns a contiguous range of whole chunks; shard() deals the chunks out in
// order, the first (count % workers) workers getting one chunk more (uneven shards are
// allowed, a worker may own none).
//
// Why chunks, and why fixed: every per-row result (samples, inversions, dL/dx_T) is already
// independent of the partition, because the noise is keyed by the global row (row_offset)
// and rows do not interact. What is not is (1) a model whose per-row outputs depend on the
// batch it is called on (GEMM blocking), and (2) a sum over rows (dL/dcond, dL/dtheta, the
// loss). Running the model on exactly these chunks and summing per-chunk partials in chunk
// order makes both the same on every partition, bit for bit.
#include <cstdint>

#include "diffgrad/core/error.hpp"

namespace diffgrad::parallel {

/// A half-open range [first, last) of chunk indices.
struct ChunkRange {
  std::int64_t first = 0;
  std::int64_t last = 0;
  std::int64_t count() const { return last - first; }
  bool empty() const { return last <= first; }
  friend bool operator==(const ChunkRange&, const ChunkRange&) = default;
};

/// A half-open range of rows: [begin, begin + rows).
struct RowRange {
  std::int64_t begin = 0;
  std::int64_t rows = 0;
  std::int64_t end() const { return begin + rows; }
  friend bool operator==(const RowRange&, const RowRange&) = default;
};

/// The fixed chunk partition of a global batch.
class RowChunks {
public:
  /// `batch` global rows (>= 1) in chunks of `chunk_rows` rows (>= 1; a chunk larger than the
  /// batch is allowed and gives one chunk).
  RowChunks(std::int64_t batch, std::int64_t chunk_rows) : batch_(batch), chunk_rows_(chunk_rows) {
    if (batch < 1)
      diffgrad::detail::throw_argument("RowChunks", "batch", "a global batch of at least 1 row",
                                       batch);
    if (chunk_rows < 1)
      diffgrad::detail::throw_argument("RowChunks", "chunk_rows", "at least 1 row per chunk",
                                       chunk_rows);
    count_ = batch / chunk_rows + (batch % chunk_rows != 0 ? 1 : 0);
  }

  std::int64_t batch() const { return batch_; }
  std::int64_t chunk_rows() const { return chunk_rows_; }
  /// Number of chunks: ceil(batch / chunk_rows).
  std::int64_t count() const { return count_; }
  /// All chunks, [0, count()).
  ChunkRange all() const { return {0, count_}; }

  /// The global rows of chunk k.
  RowRange chunk(std::int64_t k) const {
    check_chunk(k, "RowChunks::chunk");
    const std::int64_t begin = k * chunk_rows_;
    const std::int64_t rows = batch_ - begin < chunk_rows_ ? batch_ - begin : chunk_rows_;
    return {begin, rows};
  }

  /// The global rows covered by a range of chunks (contiguous: chunks are).
  RowRange rows_of(ChunkRange range) const {
    check_range(range, "RowChunks::rows_of");
    if (range.empty()) { // no rows, placed where chunk `first` would start
      const std::int64_t begin = range.first * chunk_rows_;
      return {begin < batch_ ? begin : batch_, 0};
    }
    const RowRange first = chunk(range.first), last = chunk(range.last - 1);
    return {first.begin, last.end() - first.begin};
  }

  /// The chunks of worker `rank` of `workers`: contiguous, in order, the first
  /// (count() % workers) workers one chunk more. A worker beyond count() owns none.
  ChunkRange shard(int rank, int workers) const {
    if (workers < 1)
      diffgrad::detail::throw_argument("RowChunks::shard", "workers", "at least 1 worker", workers);
    if (rank < 0 || rank >= workers)
      diffgrad::detail::throw_argument("RowChunks::shard", "rank",
                                       diffgrad::detail::concat("a rank in [0, ", workers, ")"),
                                       rank);
    const std::int64_t base = count_ / workers, extra = count_ % workers;
    const std::int64_t r = rank;
    const std::int64_t first = r * base + (r < extra ? r : extra);
    return {first, first + base + (r < extra ? 1 : 0)};
  }

  /// Throws unless `range` lies within [0, count()) with first <= last.
  void check_range(ChunkRange range, const char* where) const {
    if (range.first < 0 || range.last < range.first || range.last > count_)
      diffgrad::detail::throw_argument(
          where, "chunks", diffgrad::detail::concat("a chunk range within [0, ", count_, ")"),
          diffgrad::detail::concat("[", range.first, ", ", range.last, ")"));
  }

private:
  void check_chunk(std::int64_t k, const char* where) const {
    if (k < 0 || k >= count_)
      diffgrad::detail::throw_argument(
          where, "k", diffgrad::detail::concat("a chunk index in [0, ", count_, ")"), k);
  }

  std::int64_t batch_;
  std::int64_t chunk_rows_;
  std::int64_t count_ = 0;
};

} // namespace diffgrad::parallel
