#pragma once
// Index maps on the device (backend/index_map.hpp, docs/collage.md section 4): the device copy
// of an IndexMap and the two one-pass operations of the Collage combinator,
//
//   gather       pieces(b*P + p, k) = c_p * big(b, idx(p, k))      one thread per (b, p, k)
//   scatter_add  big(b, j) += sum over (p, k) with idx(p, k) = j of c_p * pieces(b*P + p, k)
//                                                                  one thread per (b, j)
//
// with c_p = Scalar(scale * w_p) (weights applied) or Scalar(scale), as EigenBackend.
//
// scatter_add uses NO atomics: floating-point atomics add in whatever order the threads
// arrive, so the result would change from run to run and differ from the CPU. Instead the
// inverse map is built once, on the host, when the map is made (make_index_map): for every
// column j of D, the list of piece elements (p, k) that land on it, in increasing p, as a CSR
// array. The thread of (b, j) starts from big(b, j) and adds the contributions in turn, in
// that order, each product and sum rounded once (mul_rn/add_rn: __dmul_rn/__dadd_rn and the
// float versions, never contracted into an FMA). EigenBackend adds the pieces of a row to
// `big` in increasing p, so the device result is bit-identical to it (on hosts that do not
// contract `dst += c * src`, the default x86-64 flags). A column's list has at most one
// entry per piece (IndexMap refuses a column repeated within a piece), so increasing p is
// the CPU's order exactly.
//
// The functors are host/device (run by launch_for_each on the device and by
// run_for_each_on_host in the host tests), as every kernel of the backend.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "diffgrad/backend/cuda/config.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/index_map.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

/// The inverse of an IndexMap as CSR arrays: the piece elements landing on column j are
/// entries offsets[j] .. offsets[j+1]-1, each the flat position p * n + k of the element in a
/// sample's P x n block of pieces and its piece p, in increasing p.
struct InverseIndexMap {
  std::vector<std::int64_t> offsets;   ///< D + 1 entries, offsets[0] = 0, offsets[D] = P * n
  std::vector<std::int64_t> positions; ///< P * n flat positions p * n + k
  std::vector<std::int64_t> pieces;    ///< P * n pieces p (positions[e] / n, stored: no division)
};

/// Counting sort of the map's P * n entries by column; within a column the entries keep the
/// order of the pieces (stable), i.e. increasing p.
inline InverseIndexMap invert_index_map(const IndexMap& map) {
  const std::int64_t dim = map.dim(), width = map.width(), count = map.pieces() * map.width();
  InverseIndexMap inv;
  inv.offsets.assign(static_cast<std::size_t>(dim + 1), 0);
  for (std::int64_t column : map.indices()) ++inv.offsets[static_cast<std::size_t>(column + 1)];
  for (std::int64_t j = 0; j < dim; ++j)
    inv.offsets[static_cast<std::size_t>(j + 1)] += inv.offsets[static_cast<std::size_t>(j)];
  inv.positions.resize(static_cast<std::size_t>(count));
  inv.pieces.resize(static_cast<std::size_t>(count));
  std::vector<std::int64_t> next(inv.offsets.begin(), inv.offsets.end() - 1);
  for (std::int64_t e = 0; e < count; ++e) {
    const std::int64_t column = map.indices()[static_cast<std::size_t>(e)];
    const auto slot = static_cast<std::size_t>(next[static_cast<std::size_t>(column)]++);
    inv.positions[slot] = e;
    inv.pieces[slot] = e / width;
  }
  return inv;
}

/// The raw pointers the kernels read (device memory on the device, host memory in host runs).
struct IndexMapView {
  const std::int64_t* indices = nullptr;      ///< P * n column indices, piece after piece
  const double* weights = nullptr;            ///< P piece weights
  const std::int64_t* offsets = nullptr;      ///< inverse map (InverseIndexMap), D + 1
  const std::int64_t* positions = nullptr;    ///< P * n
  const std::int64_t* entry_pieces = nullptr; ///< P * n
  std::int64_t dim = 0, width = 0, pieces = 0;
};

namespace detail {
/// c_p of piece p, rounded to Scalar once, as EigenBackend: the product scale * w_p in double.
template <class Scalar>
DIFFGRAD_HOST_DEVICE inline Scalar piece_factor(const IndexMapView& m, bool apply_weights,
                                                double scale, std::int64_t p) {
  return static_cast<Scalar>(apply_weights ? mul_rn(scale, m.weights[p]) : scale);
}
} // namespace detail

/// pieces(b*P + p, k) = c_p big(b, idx(p, k)) for item i = (b*P + p) * n + k, i < B * P * n.
template <class Scalar> struct GatherFunctor {
  Scalar* pieces;
  const Scalar* big;
  IndexMapView map;
  double scale;
  bool apply_weights;

  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t i) const {
    const std::int64_t row = i / map.width, k = i - row * map.width; // row = b*P + p
    const std::int64_t b = row / map.pieces, p = row - b * map.pieces;
    const Scalar value = big[b * map.dim + map.indices[p * map.width + k]];
    const Scalar c = detail::piece_factor<Scalar>(map, apply_weights, scale, p);
    // EigenBackend copies without a multiply when every c_p is 1; 1 * x is x exactly.
    pieces[i] = c == Scalar(1) ? value : detail::mul_rn(c, value);
  }
};

/// big(b, j) += the contributions to column j in increasing p, added in turn, for item
/// i = b * D + j, i < B * D. Columns no piece covers are left untouched.
template <class Scalar> struct ScatterAddFunctor {
  Scalar* big;
  const Scalar* pieces;
  IndexMapView map;
  double scale;
  bool apply_weights;

  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t i) const {
    const std::int64_t b = i / map.dim, j = i - b * map.dim;
    const std::int64_t begin = map.offsets[j], end = map.offsets[j + 1];
    if (begin == end) return;
    const Scalar* sample = pieces + b * map.pieces * map.width; // sample b's P x n block
    Scalar acc = big[i];
    for (std::int64_t e = begin; e < end; ++e) {
      const Scalar c = detail::piece_factor<Scalar>(map, apply_weights, scale, map.entry_pieces[e]);
      const Scalar value = sample[map.positions[e]];
      acc = detail::add_rn(acc, c == Scalar(1) ? value : detail::mul_rn(c, value));
    }
    big[i] = acc;
  }
};

/// An IndexMap in device memory: the indices, the weights and the inverse map, uploaded once,
/// synchronously (CudaBackend::make_index_map, before the step loop). Copies share the device
/// memory (like CoefficientTable), so a copy is cheap and never allocates.
class DeviceIndexMap {
public:
  DeviceIndexMap() = default;
  DeviceIndexMap(const IndexMap& host, cudaStream_t stream)
      : dim_(host.dim()), width_(host.width()), pieces_(host.pieces()),
        unit_weights_(host.unit_weights()) {
    if (pieces_ == 0) return; // an empty (default) IndexMap: the operations refuse it
    const InverseIndexMap inv = invert_index_map(host);
    const std::int64_t count = pieces_ * width_;
    // One int64 buffer: [indices (P n) | offsets (D + 1) | positions (P n) | pieces (P n)].
    std::vector<std::int64_t> packed;
    packed.reserve(static_cast<std::size_t>(3 * count + dim_ + 1));
    packed.insert(packed.end(), host.indices().begin(), host.indices().end());
    packed.insert(packed.end(), inv.offsets.begin(), inv.offsets.end());
    packed.insert(packed.end(), inv.positions.begin(), inv.positions.end());
    packed.insert(packed.end(), inv.pieces.begin(), inv.pieces.end());
    auto ints = std::make_shared<DeviceBuffer<std::int64_t>>(
        static_cast<std::int64_t>(packed.size()), stream);
    host_detail::copy_to_device_raw(ints->data(), packed.data(),
                                    packed.size() * sizeof(std::int64_t), stream, "DeviceIndexMap");
    auto weights = std::make_shared<DeviceBuffer<double>>(pieces_, stream);
    host_detail::copy_to_device_raw(weights->data(), host.weights().data(),
                                    host.weights().size_bytes(), stream, "DeviceIndexMap");
    ints_ = std::move(ints);
    weights_ = std::move(weights);
  }

  std::int64_t dim() const { return dim_; }       ///< D
  std::int64_t width() const { return width_; }   ///< n
  std::int64_t pieces() const { return pieces_; } ///< P (0: an empty map)
  bool unit_weights() const { return unit_weights_; }

  /// The device pointers (not readable on the host).
  IndexMapView view() const {
    IndexMapView v;
    v.dim = dim_;
    v.width = width_;
    v.pieces = pieces_;
    if (!ints_) return v;
    const std::int64_t count = pieces_ * width_;
    const std::int64_t* base = ints_->data();
    v.indices = base;
    v.offsets = base + count;
    v.positions = base + count + dim_ + 1;
    v.entry_pieces = base + 2 * count + dim_ + 1;
    v.weights = weights_->data();
    return v;
  }

private:
  std::int64_t dim_ = 0, width_ = 0, pieces_ = 0;
  bool unit_weights_ = true;
  std::shared_ptr<const DeviceBuffer<std::int64_t>> ints_;
  std::shared_ptr<const DeviceBuffer<double>> weights_;
};

/// Enqueues the gather of `rows` big rows on `stream` (B * P * n threads' worth of items).
template <class Scalar>
cudaError_t gather(Scalar* pieces, const Scalar* big, std::int64_t rows, const IndexMapView& map,
                   double scale, bool apply_weights, cudaStream_t stream) {
  return launch_for_each(GatherFunctor<Scalar>{pieces, big, map, scale, apply_weights},
                         rows * map.pieces * map.width, stream);
}

/// Enqueues the scatter-add into `rows` big rows on `stream` (B * D items).
template <class Scalar>
cudaError_t scatter_add(Scalar* big, const Scalar* pieces, std::int64_t rows,
                        const IndexMapView& map, double scale, bool apply_weights,
                        cudaStream_t stream) {
  return launch_for_each(ScatterAddFunctor<Scalar>{big, pieces, map, scale, apply_weights},
                         rows * map.dim, stream);
}

DIFFGRAD_CUDA_NAMESPACE_END
