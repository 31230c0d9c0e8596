#pragma once
// IndexMap: P pieces of n coordinates each, taken from rows of width D (the "big" state).
// It is the host description that backends turn into their own copy (make_index_map) and
// then use for two one-pass operations (EigenBackend, CountingBackend; CUDA: see
// docs/collage.md):
//
//   gather(big, map, pieces [, scale, PieceWeights])    pieces(b*P + p, k) = big(b, idx(p, k))
//   scatter_add(pieces, map, scale, big [, PieceWeights]) big(b, idx(p, k)) += pieces(b*P + p, k)
//
// (times scale, and times the piece weight w_p when PieceWeights::apply). With equal scale and
// PieceWeights, scatter_add is exactly the transpose of gather, which is what a composed
// model's VJP needs (docs/collage.md).
//
// Layout of the pieces: sample-major, row b * P + p is piece p of sample b. A sample's
// pieces are then contiguous, so (1) a range of rows of the big batch (a shard, a thread's
// rows, a `row_offset` split) is a contiguous range of piece rows, and (2) one pass over a
// big row gathers or scatters all of its pieces while that row is in cache. A piece model
// sees one batch of B * P rows and does not care about the order.
//
// Every index is checked against D and for duplicates within its piece HERE, once; the
// backend operations then only check shapes (O(1) per call).
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"

namespace diffgrad {

/// Whether gather / scatter_add multiply piece p by its weight w_p (IndexMap::weights()).
enum class PieceWeights { ignore, apply };

class IndexMap {
public:
  IndexMap() = default;

  /// `indices` holds P * width column indices into rows of width `dim`, piece after piece
  /// (piece p's coordinate k at p * width + k). `weights` is empty (all 1) or has P finite
  /// entries. Throws invalid_argument (naming `where`'s argument) for an empty map, an index
  /// outside [0, dim), a coordinate repeated within a piece, or bad weights.
  IndexMap(std::int64_t dim, std::int64_t width, std::vector<std::int64_t> indices,
           std::vector<double> weights = {}, const char* where = "IndexMap")
      : dim_(dim), width_(width), indices_(std::move(indices)), weights_(std::move(weights)) {
    detail::require(dim >= 1, where, "dim", "a row width D >= 1", static_cast<double>(dim));
    detail::require(width >= 1 && width <= dim, where, "width",
                    detail::concat("a piece width in [1, D = ", dim, "]"),
                    static_cast<double>(width));
    const auto size = static_cast<std::int64_t>(indices_.size());
    if (size == 0 || size % width != 0)
      detail::throw_argument(where, "indices",
                             detail::concat("a positive multiple of the piece width ", width,
                                            " (P pieces of ", width, " indices)"),
                             detail::concat(size, " indices"));
    pieces_ = size / width;
    if (weights_.empty()) weights_.assign(static_cast<std::size_t>(pieces_), 1.0);
    if (static_cast<std::int64_t>(weights_.size()) != pieces_)
      detail::throw_argument(where, "weights",
                             detail::concat("one weight per piece (", pieces_, ") or none"),
                             weights_.size());
    std::vector<std::int64_t> seen(static_cast<std::size_t>(dim), -1);
    for (std::int64_t p = 0; p < pieces_; ++p) {
      if (!std::isfinite(weights_[static_cast<std::size_t>(p)]))
        detail::throw_argument(where, "weights", detail::concat("finite weights (piece ", p, ")"),
                               weights_[static_cast<std::size_t>(p)]);
      for (std::int64_t k = 0; k < width; ++k) {
        const std::int64_t i = indices_[static_cast<std::size_t>(p * width + k)];
        if (i < 0 || i >= dim)
          detail::throw_argument(
              where, "indices",
              detail::concat("column indices in [0, ", dim, ") (piece ", p, ", position ", k, ")"),
              i);
        auto& last = seen[static_cast<std::size_t>(i)];
        if (last == p)
          detail::throw_argument(where, "indices",
                                 detail::concat("distinct coordinates within a piece (piece ", p,
                                                " lists column ", i, " twice)"),
                                 detail::concat("a duplicate at position ", k));
        last = p;
      }
    }
    for (double w : weights_) unit_weights_ = unit_weights_ && w == 1.0;
  }

  std::int64_t dim() const { return dim_; }       ///< D: the width of a big row
  std::int64_t width() const { return width_; }   ///< n: coordinates per piece
  std::int64_t pieces() const { return pieces_; } ///< P
  std::span<const std::int64_t> indices() const { return indices_; }
  std::span<const double> weights() const { return weights_; }
  bool unit_weights() const { return unit_weights_; }
  std::int64_t index(std::int64_t piece, std::int64_t k) const {
    return indices_[static_cast<std::size_t>(piece * width_ + k)];
  }
  double weight(std::int64_t piece) const { return weights_[static_cast<std::size_t>(piece)]; }

private:
  std::int64_t dim_ = 0, width_ = 0, pieces_ = 0;
  std::vector<std::int64_t> indices_;
  std::vector<double> weights_;
  bool unit_weights_ = true;
};

} // namespace diffgrad
