#pragma once
// Zero-copy views between diffgrad's row-major Eigen states (B x d, contiguous) and torch
// tensors. torch::from_blob wraps the state's memory without copying (strides {d, 1}, then
// a view to the network's layout, e.g. B x C x H x W); results come back with one copy.
// LibTorch's c10 logging header defines a glog-style CHECK macro, which would silently
// replace a test framework's CHECK (Catch2's); the adapter's headers restore whatever CHECK
// was before they included LibTorch (docs/torch.md).
#pragma push_macro("CHECK")
#include <torch/script.h>
#pragma pop_macro("CHECK")

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "diffgrad/core/error.hpp"

namespace diffgrad::torch_interop {

/// torch's dtype for a diffgrad scalar type (float32 / float64 only).
template <class Scalar> constexpr c10::ScalarType dtype_of() {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad's torch adapter supports float and double states");
  if constexpr (std::is_same_v<Scalar, float>)
    return c10::ScalarType::Float;
  else
    return c10::ScalarType::Double;
}

/// "[2, 1, 8, 8]" for error messages.
inline std::string shape_string(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

/// {rows, sample_shape...}: the network's input shape for a batch of `rows` samples.
inline std::vector<std::int64_t> batch_shape(std::int64_t rows,
                                             const std::vector<std::int64_t>& sample_shape) {
  std::vector<std::int64_t> shape;
  shape.reserve(sample_shape.size() + 1);
  shape.push_back(rows);
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  return shape;
}

/// A tensor that aliases the row-major matrix m (no copy): sizes `shape` (whose product must
/// be m.size()), dtype of Scalar, CPU. The tensor does not own the memory: m must outlive it
/// and must not be resized while it is in use. const matrices are wrapped too: the adapter
/// never writes through such a view (the network must not modify its inputs in place).
template <class Scalar, int Options>
at::Tensor view_of(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Options>& m,
                   c10::IntArrayRef shape) {
  static_assert(Options & Eigen::RowMajor, "view_of needs a row-major matrix (B x d, rows "
                                           "are samples)");
  // Row-major B x d is contiguous with strides {d, 1}; a view to the network's layout is
  // then a plain reshape of contiguous memory.
  const std::int64_t rows = m.rows(), cols = m.cols();
  at::Tensor flat = torch::from_blob(const_cast<Scalar*>(m.data()), {rows, cols}, {cols, 1},
                                     torch::TensorOptions().dtype(dtype_of<Scalar>()));
  return flat.view(shape);
}

/// out (resized to rows x cols, which allocates only when the size changes) = t, one copy;
/// t may be strided, its dtype must be Scalar's and it must have rows * cols elements.
template <class Scalar>
void copy_to(const at::Tensor& t,
             Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& out,
             std::int64_t rows, std::int64_t cols) {
  out.resize(rows, cols);
  at::Tensor dst = torch::from_blob(out.data(), t.sizes(),
                                    torch::TensorOptions().dtype(dtype_of<Scalar>()));
  torch::NoGradGuard no_grad;
  dst.copy_(t);
}

} // namespace diffgrad::torch_interop
