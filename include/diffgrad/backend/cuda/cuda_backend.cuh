#pragma once
// CUDA backend: the same Backend concept as EigenBackend, on device memory, so every solver,
// gradient and inversion method runs on the GPU through the same code (docs/architecture.md).
//
//   cudaStream_t stream = ...;                         // or nullptr: the default stream
//   diffgrad::gpu::CudaBackend<float> backend(stream);
//   auto x = diffgrad::gpu::to_device<float>(host_x, batch, dim, stream);
//   diffgrad::sample(diffgrad::DpmSolverMultistep(2), backend, schedule, nodes, model, x);
//   std::vector<float> out = diffgrad::gpu::to_host(x);
//
// Every operation is enqueued on the backend's stream and returns without waiting, except
// the reductions (dot, squared_norm, all_finite), which return a value to the host and so
// synchronise the stream. Errors: bad arguments throw diffgrad::invalid_argument like the
// CPU backend; failed CUDA calls throw diffgrad::gpu::cuda_error.
//
// Semantics that mirror EigenBackend (so generic code behaves the same on both):
//  - make_state gives a zero-filled B x d state; `out` of lincomb/copy is reallocated to the
//    inputs' shape when it differs (as an Eigen assignment resizes);
//  - lincomb rounds like Eigen's expression and draws bit-identical Philox noise, at the
//    global element index (NoiseTerm::row_offset + r) * d + c;
//  - the float backend draws noise in double and rounds once;
//  - structured coefficients (backend/coefficient.hpp): lincomb over spans of Block2 and
//    ColumnCoeff terms (structured_lincomb.cuh), ColumnCoeff tables in device memory made by
//    make_coefficients before the step loop;
//  - index maps (backend/index_map.hpp, the Collage combinator): make_index_map uploads a map
//    and its inverse once; gather and scatter_add (index_map.cuh) give EigenBackend's bits,
//    scatter_add without atomics.
// A backend is cheap to copy; copies share the reduction scratch, so one backend (and its
// copies) must be used from one host thread at a time, like CountingBackend.
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/cuda/config.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"
#include "diffgrad/backend/cuda/error.cuh"
#include "diffgrad/backend/cuda/index_map.cuh"
#include "diffgrad/backend/cuda/lincomb.cuh"
#include "diffgrad/backend/cuda/reduce.cuh"
#include "diffgrad/backend/cuda/structured_lincomb.cuh"
#include "diffgrad/backend/index_map.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

template <class Scalar> class CudaBackend {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad::gpu::CudaBackend supports float and double");

public:
  using scalar_type = Scalar;
  using state_type = DeviceState<Scalar>;
  using vector_type = DeviceVector<Scalar>;
  using index_type = std::int64_t;

  /// All work goes to `stream` (not owned; must outlive the backend and its states).
  /// Construction touches no device: it cannot fail on a machine without a GPU.
  explicit CudaBackend(cudaStream_t stream = nullptr)
      : stream_(stream), scratch_(std::make_shared<ReduceScratch>()) {}

  cudaStream_t stream() const { return stream_; }
  /// Waits until everything enqueued on the stream has finished.
  void synchronize() const {
    check(cudaStreamSynchronize(stream_), "CudaBackend::synchronize", "cudaStreamSynchronize");
  }

  /// Allocates a zero-filled B x d state. Never called inside a step loop.
  state_type make_state(index_type batch, index_type dim) const {
    if (batch < 0 || dim < 0)
      diffgrad::detail::throw_argument("CudaBackend::make_state", "batch/dim", "non-negative sizes",
                                       diffgrad::detail::concat(batch, " x ", dim));
    return state_type(batch, dim, stream_);
  }
  vector_type make_vector(index_type size) const {
    if (size < 0)
      diffgrad::detail::throw_argument("CudaBackend::make_vector", "size", "a non-negative size",
                                       size);
    return vector_type(size, stream_);
  }

  static index_type batch(const state_type& x) { return x.batch(); }
  static index_type dim(const state_type& x) { return x.dim(); }

  /// out = sum_k c_k x_k, one fused pass, any number of terms. `out` may alias any input.
  template <class... States> void lincomb(state_type& out, LinTerm<States>... terms) const {
    static_assert((std::is_same_v<States, state_type> && ...), "lincomb: terms must be states");
    static_assert(sizeof...(States) >= 1, "lincomb: at least one term");
    prepare_output(out, "CudaBackend::lincomb", *terms.vec...);
    check(gpu::lincomb(out.data(), out.size(), stream_,
                       Term<Scalar>{terms.coeff, terms.vec->data()}...),
          "CudaBackend::lincomb", "kernel launch");
  }

  /// out = sum_k c_k x_k + c xi (zero or more terms), one fused pass. Element (r, c) of the
  /// B x d batch draws xi at the global index (noise.row_offset + r) * d + c.
  template <class... States>
  void lincomb(state_type& out, NoiseTerm noise, LinTerm<States>... terms) const {
    static_assert((std::is_same_v<States, state_type> && ...), "lincomb: terms must be states");
    if constexpr (sizeof...(States) > 0) prepare_output(out, "CudaBackend::lincomb", *terms.vec...);
    check(gpu::lincomb_noise(out.data(), out.size(), stream_, to_params(noise, out.dim()),
                             Term<Scalar>{terms.coeff, terms.vec->data()}...),
          "CudaBackend::lincomb", "kernel launch");
  }

  /// Runtime arity (1..kMaxLincombTerms terms): dispatches to the fused fixed-arity kernel.
  void lincomb(state_type& out, std::span<const LinTerm<state_type>> terms,
               NoiseTerm noise = {}) const {
    if (terms.empty() || terms.size() > static_cast<std::size_t>(kMaxLincombTerms))
      diffgrad::detail::throw_argument("CudaBackend::lincomb", "terms",
                                       diffgrad::detail::concat("1..", kMaxLincombTerms, " terms"),
                                       terms.size());
    dispatch(out, terms, noise, std::make_index_sequence<kMaxLincombTerms>{});
  }

  /// 2x2 blocks over the halves [x (d) | v (d)] of each row (backend/coefficient.hpp):
  /// out_x = sum_t (xx x_t + xv v_t), out_v = sum_t (vx x_t + vv v_t), plus L (xi_x, xi_v) with
  /// xi_x, xi_v at the global indices (row_offset + r) 2d + j and (row_offset + r) 2d + d + j.
  /// One fused pass, 1..kMaxLincombTerms terms of one shape and even width; out may alias any
  /// input (and is reallocated to the terms' shape when it differs).
  void lincomb(state_type& out, std::span<const LinTerm<state_type, Block2>> terms,
               BasicNoiseTerm<Block2> noise = {}) const {
    const state_type& first = structured_terms(terms);
    if (first.dim() % 2 != 0)
      diffgrad::detail::throw_argument(
          "CudaBackend::lincomb", "terms",
          "states of even width (two halves [x | v]) for 2x2 block coefficients",
          diffgrad::detail::concat("width ", first.dim()));
    take_shape(out, first);
    std::array<Block2Term<Scalar>, kMaxLincombTerms> raw{};
    for (std::size_t t = 0; t < terms.size(); ++t) raw[t] = {terms[t].coeff, terms[t].vec->data()};
    check(gpu::lincomb_block2(out.data(), out.batch(), out.dim() / 2, stream_,
                              std::span<const Block2Term<Scalar>>(raw.data(), terms.size()), noise),
          "CudaBackend::lincomb", "kernel launch (2x2 blocks)");
  }

  /// Per-column diagonal coefficients (backend/coefficient.hpp): column k of term t is scaled
  /// by scale * values[k] (values: a DEVICE pointer into a table of make_coefficients, one
  /// entry per column) or by scale alone (values == nullptr); the noise adds
  /// c_xi[k] xi at the global element index. One fused pass; out may alias any input.
  void lincomb(state_type& out, std::span<const LinTerm<state_type, ColumnCoeff>> terms,
               BasicNoiseTerm<ColumnCoeff> noise = {}) const {
    take_shape(out, structured_terms(terms));
    std::array<ColumnTerm<Scalar>, kMaxLincombTerms> raw{};
    for (std::size_t t = 0; t < terms.size(); ++t) raw[t] = {terms[t].coeff, terms[t].vec->data()};
    check(gpu::lincomb_columns(out.data(), out.size(), out.dim(), stream_,
                               std::span<const ColumnTerm<Scalar>>(raw.data(), terms.size()),
                               noise),
          "CudaBackend::lincomb", "kernel launch (per-column coefficients)");
  }

  /// A per-grid coefficient table in device memory (ColumnCoeff::values points into it):
  /// uploaded once, synchronously, before the step loop. Copies of the table share the
  /// device memory, so pointers into it survive copies of whatever holds it.
  using coefficient_table = CoefficientTable;
  coefficient_table make_coefficients(std::span<const double> host_values) const {
    return coefficient_table(host_values, stream_);
  }
  /// The table's device pointer (for ColumnCoeff::values; not readable on the host).
  static const double* coefficient_data(const coefficient_table& table) { return table.data(); }

  /// An IndexMap (backend/index_map.hpp) in device memory, with its inverse (CSR by column)
  /// for the atomic-free scatter_add: uploaded once, synchronously, before the step loop.
  /// Copies share the device memory.
  using index_map_type = DeviceIndexMap;
  index_map_type make_index_map(const IndexMap& map) const { return index_map_type(map, stream_); }

  /// pieces(b*P + p, k) = scale [* w_p] * big(b, map.index(p, k)), as EigenBackend::gather
  /// (same bits). `pieces` takes the shape (B*P) x n (reallocated only if it has another
  /// shape); it must not be `big` itself.
  void gather(const state_type& big, const index_map_type& map, state_type& pieces,
              double scale = 1.0, PieceWeights piece_weights = PieceWeights::ignore) const {
    const char* where = "CudaBackend::gather";
    check_index_map_big(big, map, where);
    if (&big == &pieces)
      diffgrad::detail::throw_argument(where, "pieces", "a state other than 'big'",
                                       "the same object");
    const index_type rows = big.batch();
    if (pieces.batch() != rows * map.pieces() || pieces.dim() != map.width())
      pieces = state_type(rows * map.pieces(), map.width(), stream_);
    check(gpu::gather(pieces.data(), big.data(), rows, map.view(), scale,
                      piece_weights == PieceWeights::apply, stream_),
          where, "kernel launch");
  }

  /// big(b, map.index(p, k)) += scale [* w_p] * pieces(b*P + p, k), as
  /// EigenBackend::scatter_add (same bits: each big element adds its contributions in turn,
  /// in increasing p; no atomics). `big` keeps its shape: B x D with B*P = pieces rows.
  void scatter_add(const state_type& pieces, const index_map_type& map, double scale,
                   state_type& big, PieceWeights piece_weights = PieceWeights::apply) const {
    const char* where = "CudaBackend::scatter_add";
    check_index_map_big(big, map, where);
    if (&big == &pieces)
      diffgrad::detail::throw_argument(where, "pieces", "a state other than 'big'",
                                       "the same object");
    const index_type rows = big.batch(), p_count = map.pieces(), n = map.width();
    if (pieces.batch() != rows * p_count || pieces.dim() != n)
      diffgrad::detail::throw_argument(
          where, "pieces",
          diffgrad::detail::concat("shape (B*P) x n = ", rows * p_count, " x ", n, " (B = ", rows,
                                   " rows of 'big', P = ", p_count, " pieces of width ", n, ")"),
          diffgrad::detail::concat(pieces.batch(), " x ", pieces.dim()));
    check(gpu::scatter_add(big.data(), pieces.data(), rows, map.view(), scale,
                           piece_weights == PieceWeights::apply, stream_),
          where, "kernel launch");
  }

  /// dst = src (dst is reallocated when its shape differs).
  void copy(state_type& dst, const state_type& src) const {
    if (&dst == &src) return;
    if (dst.batch() != src.batch() || dst.dim() != src.dim())
      dst = state_type(src.batch(), src.dim(), stream_);
    host_detail::copy_device(dst.data(), src.data(),
                             static_cast<std::size_t>(src.size()) * sizeof(Scalar), stream_,
                             "CudaBackend::copy");
  }
  void fill(state_type& dst, double value) const {
    if (value == 0.0 && !std::signbit(value)) {
      host_detail::zero_device(dst.data(), static_cast<std::size_t>(dst.size()) * sizeof(Scalar),
                               stream_, "CudaBackend::fill");
      return;
    }
    check(gpu::fill(dst.data(), dst.size(), static_cast<Scalar>(value), stream_),
          "CudaBackend::fill", "kernel launch");
  }

  /// Sum over the whole batch, accumulated in double. Synchronises the stream.
  double dot(const state_type& a, const state_type& b) const {
    require_same_shape(a, b, "CudaBackend::dot", "b");
    double result = 0.0;
    check(scratch_->dot(a.data(), b.data(), a.size(), stream_, result), "CudaBackend::dot",
          "reduction");
    return result;
  }
  double squared_norm(const state_type& a) const { return dot(a, a); }
  /// No NaN or Inf anywhere in the batch. Synchronises the stream.
  bool all_finite(const state_type& a) const {
    bool result = true;
    check(scratch_->all_finite(a.data(), a.size(), stream_, result), "CudaBackend::all_finite",
          "reduction");
    return result;
  }

  /// Writes xi(seed, step) into out (bit-identical to EigenBackend::gaussian).
  void gaussian(state_type& out, std::uint64_t seed, std::uint64_t step) const {
    lincomb(out, NoiseTerm{1.0, seed, step});
  }

private:
  /// The device noise parameters for a batch of width `dim`: element 0 of the batch is the
  /// global element row_offset * dim (unsigned arithmetic, as EigenBackend's).
  static NoiseParams to_params(const NoiseTerm& n, index_type dim) {
    return NoiseParams{n.coeff, n.seed, n.step, n.row_offset * static_cast<std::uint64_t>(dim)};
  }

  /// The big state of a gather / scatter_add has rows of the map's width D (O(1) check).
  static void check_index_map_big(const state_type& big, const index_map_type& map,
                                  const char* where) {
    if (map.pieces() == 0)
      diffgrad::detail::throw_argument(where, "map", "a built IndexMap (P >= 1 pieces)",
                                       "an empty map");
    if (big.dim() != map.dim())
      diffgrad::detail::throw_argument(
          where, "big",
          diffgrad::detail::concat("rows of width D = ", map.dim(), " (the map's dim)"),
          diffgrad::detail::concat(big.dim(), " columns"));
  }

  static void require_same_shape(const state_type& a, const state_type& b, const char* where,
                                 const char* arg) {
    if (a.batch() != b.batch() || a.dim() != b.dim())
      diffgrad::detail::throw_argument(
          where, arg, diffgrad::detail::concat("shape ", a.batch(), " x ", a.dim()),
          diffgrad::detail::concat(b.batch(), " x ", b.dim()));
  }

  /// All inputs must share one shape; `out` takes it (reallocated only when it differs, which
  /// never happens inside the engines' step loops: their buffers are made with that shape).
  template <class... Rest>
  void prepare_output(state_type& out, [[maybe_unused]] const char* where, const state_type& first,
                      const Rest&... rest) const {
    (require_same_shape(first, rest, where, "terms"), ...);
    if (out.batch() != first.batch() || out.dim() != first.dim())
      out = state_type(first.batch(), first.dim(), stream_);
  }

  /// Structured lincombs: 1..kMaxLincombTerms terms of terms[0]'s shape (the first that
  /// differs is named by its index). Returns terms[0]'s state.
  template <class Coeff>
  static const state_type& structured_terms(std::span<const LinTerm<state_type, Coeff>> terms) {
    if (terms.empty() || terms.size() > static_cast<std::size_t>(kMaxLincombTerms))
      diffgrad::detail::throw_argument("CudaBackend::lincomb", "terms",
                                       diffgrad::detail::concat("1..", kMaxLincombTerms, " terms"),
                                       terms.size());
    const state_type& first = *terms[0].vec;
    for (std::size_t t = 1; t < terms.size(); ++t) {
      const state_type& x = *terms[t].vec;
      if (x.batch() != first.batch() || x.dim() != first.dim())
        diffgrad::detail::throw_argument(
            "CudaBackend::lincomb", diffgrad::detail::concat("terms[", t, "]").c_str(),
            diffgrad::detail::concat("shape ", first.batch(), " x ", first.dim(),
                                     " (that of terms[0])"),
            diffgrad::detail::concat(x.batch(), " x ", x.dim()));
    }
    return first;
  }
  /// `out` takes `shape`'s shape (after every check, so a refused call leaves it untouched).
  /// Aliasing out with a term implies equal shapes, so this never frees an input.
  void take_shape(state_type& out, const state_type& shape) const {
    if (out.batch() != shape.batch() || out.dim() != shape.dim())
      out = state_type(shape.batch(), shape.dim(), stream_);
  }

  template <std::size_t... Is>
  void dispatch(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                std::index_sequence<Is...>) const {
    // One branch per arity; each is a single fused kernel.
    ((terms.size() == Is + 1
          ? (call_fixed(out, terms, noise, std::make_index_sequence<Is + 1>{}), true)
          : false) ||
     ...);
  }
  template <std::size_t... Js>
  void call_fixed(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                  std::index_sequence<Js...>) const {
    if (noise.coeff != 0.0)
      lincomb(out, noise, terms[Js]...);
    else
      lincomb(out, terms[Js]...);
  }

  cudaStream_t stream_;
  std::shared_ptr<ReduceScratch> scratch_;
};

DIFFGRAD_CUDA_NAMESPACE_END
