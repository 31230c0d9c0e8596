#pragma once
// The coefficient kinds of a fused update out = sum_k C_k x_k (+ C_xi xi).
//
// Every scheme in diffgrad is "coefficients computed on the host, then one fused pass over the
// batch". What a coefficient is depends on the diffusion the scheme integrates:
//
//   double       a scalar times the identity: every isotropic diffusion (VP, VE, flows). The
//                fast path; the scalar engine and backends are unchanged by the other kinds.
//   Block2       a 2x2 block acting on the two halves of a state row, [x (d) | v (d)]:
//                out_x = xx x + xv v,  out_v = vx x + vv v  (the matrix A (x) I_d). Linear
//                diffusions with a velocity channel (critically-damped Langevin diffusion).
//   ColumnCoeff  a diagonal matrix over the columns: out[r][k] = c_k x[r][k], one value per
//                column of the state, shared by every row. Diffusions that are diagonal in a
//                fixed orthonormal basis (blurring diffusion in the 2-D DCT basis), with the
//                state held in that basis.
//
// The engine (solvers/sampler.hpp) and the exact discrete adjoint (gradients/
// discrete_adjoint.hpp) are templated over the kind and need only the three traits below:
// is_zero (skip a term), identity (accumulate into a target) and transpose (the adjoint of a
// step applies C^T to cotangents; the scalar and diagonal kinds are symmetric, a block is not).
//
// ColumnCoeff holds a pointer into a coefficient table that the scheme builds once per time
// grid, before the step loop, in the backend's memory (host memory for EigenBackend, device
// memory for CudaBackend: Backend::make_coefficients); the step loop only passes pointers.
#include <cstdint>
#include <type_traits>

#include "diffgrad/config.hpp"

namespace diffgrad {

/// 2x2 block over the halves [x | v] of a state row of even width 2d.
struct Block2 {
  double xx = 0.0, xv = 0.0; ///< out_x = xx * x + xv * v
  double vx = 0.0, vv = 0.0; ///< out_v = vx * x + vv * v

  static constexpr Block2 identity() { return {1.0, 0.0, 0.0, 1.0}; }
  static constexpr Block2 scalar(double c) { return {c, 0.0, 0.0, c}; }
  constexpr Block2 transposed() const { return {xx, vx, xv, vv}; }
  constexpr bool is_zero() const { return xx == 0.0 && xv == 0.0 && vx == 0.0 && vv == 0.0; }
  constexpr Block2& operator+=(const Block2& o) {
    xx += o.xx, xv += o.xv, vx += o.vx, vv += o.vv;
    return *this;
  }
  friend constexpr Block2 operator*(double s, const Block2& b) {
    return {s * b.xx, s * b.xv, s * b.vx, s * b.vv};
  }
  friend constexpr bool operator==(const Block2&, const Block2&) = default;
};

/// Diagonal over the state's columns: column k is scaled by scale * values[k], or by `scale`
/// alone when values is null (so the identity and scalar multiples need no table).
/// `values` points into a table of the backend's memory space with one entry per column.
struct ColumnCoeff {
  const double* values = nullptr;
  double scale = 0.0;

  static constexpr ColumnCoeff identity() { return {nullptr, 1.0}; }
  static constexpr ColumnCoeff scalar(double c) { return {nullptr, c}; }
  constexpr ColumnCoeff transposed() const { return *this; }
  constexpr bool is_zero() const { return scale == 0.0; }
  /// The value for column k (host-side tables only).
  DIFFGRAD_HOST_DEVICE double at(std::int64_t k) const {
    return values == nullptr ? scale : scale * values[k];
  }
  friend constexpr bool operator==(const ColumnCoeff&, const ColumnCoeff&) = default;
};

/// The traits the engines use, one overload set per kind.
constexpr bool is_zero(double c) { return c == 0.0; }
constexpr bool is_zero(const Block2& c) { return c.is_zero(); }
constexpr bool is_zero(const ColumnCoeff& c) { return c.is_zero(); }
constexpr double transpose(double c) { return c; }
constexpr Block2 transpose(const Block2& c) { return c.transposed(); }
constexpr ColumnCoeff transpose(const ColumnCoeff& c) { return c.transposed(); }
template <class Coeff> constexpr Coeff identity_coefficient() {
  if constexpr (std::is_same_v<Coeff, double>)
    return 1.0;
  else
    return Coeff::identity();
}

} // namespace diffgrad
