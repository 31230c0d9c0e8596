#pragma once
// The fused update of the CUDA backend: out = sum_k c_k x_k (+ c_xi xi) over the whole batch
// in ONE pass, for any number of terms N (a template parameter: no fixed maximum arity, and
// the per-element loop over terms is fully unrolled).
//
// Kernel math is a host/device functor (LincombFunctor) run by the generic launcher
// (launch.cuh); host tests run the same functor on host memory.
//
// Vectorised: one functor call ("item") handles 16 bytes per term (float: 4 elements,
// double: 2) with one 128-bit load per term and one 128-bit store; the last item of a size
// that is not a multiple of the width falls back to element-wise code. Every DeviceState is
// its own cudaMallocAsync allocation (>= 256-byte aligned), so the aligned path always applies
// to states; raw pointers that are not 16-byte aligned are rejected with
// cudaErrorMisalignedAddress.
//
// Rounding matches EigenBackend element for element: Eigen evaluates
//   out = ((c_0 x_0 + c_1 x_1) + c_2 x_2) + ... + Scalar(c_xi * xi)
// in Scalar with every product and sum rounded once (no FMA on x86-64 without -mfma). The
// device does exactly that through __fmul_rn/__fadd_rn (__dmul_rn/__dadd_rn), which nvcc
// never contracts into FMAs, and the noise is detail::gaussian (bit-identical on both sides,
// see detail/portable_math.hpp). A host build that contracts (e.g. -march=native with
// -ffp-contract=fast) makes the CPU side differ by an ulp; the noise stays identical.
#include <cstdint>
#include <cstring>

#include "diffgrad/backend/cuda/config.cuh"
#include "diffgrad/backend/cuda/launch.cuh"
#include "diffgrad/detail/philox.hpp"

DIFFGRAD_CUDA_NAMESPACE_BEGIN

namespace detail {

// One rounding per operation, never contracted on the device.
DIFFGRAD_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DIFFGRAD_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
DIFFGRAD_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DIFFGRAD_HOST_DEVICE inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

/// 16 bytes of Scalars: the unit of the vectorised loads and stores.
template <class Scalar> struct Packet {
  static constexpr int kWidth = static_cast<int>(16 / sizeof(Scalar));
  Scalar v[kWidth];
};

/// 128-bit load / store of an aligned packet (float4 / double2 on the device; memcpy on the
/// host, which is alias-safe).
template <class Scalar> DIFFGRAD_HOST_DEVICE inline Packet<Scalar> load_packet(const Scalar* p) {
  Packet<Scalar> r;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Scalar) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    r.v[0] = q.x;
    r.v[1] = q.y;
    r.v[2] = q.z;
    r.v[3] = q.w;
  } else {
    const double2 q = *reinterpret_cast<const double2*>(p);
    r.v[0] = q.x;
    r.v[1] = q.y;
  }
#else
  std::memcpy(r.v, p, sizeof r.v);
#endif
  return r;
}
template <class Scalar>
DIFFGRAD_HOST_DEVICE inline void store_packet(Scalar* p, const Packet<Scalar>& r) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Scalar) == 4)
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  else
    *reinterpret_cast<double2*>(p) = make_double2(r.v[0], r.v[1]);
#else
  std::memcpy(p, r.v, sizeof r.v);
#endif
}

inline bool is_aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & std::uintptr_t{15}) == 0;
}

/// xi[e] = gaussian(seed, step, first + e) for e < W (W even), bit for bit, from whole
/// Box-Muller pairs: W / 2 pairs when `first` is even, W / 2 + 1 when it is odd (a batch whose
/// global first element, row_offset * d, is odd; or the v half of an odd-width block row).
/// Only compile-time indices, so the values stay in registers on the device; the parity
/// branch is uniform across a launch (every item starts at an even local offset).
template <int W>
DIFFGRAD_HOST_DEVICE inline void gaussian_packet(std::uint64_t seed, std::uint64_t step,
                                                 std::uint64_t first, double (&xi)[W]) {
  static_assert(W % 2 == 0, "gaussian_packet: an even number of elements");
  if (first % 2 == 0) {
    DIFFGRAD_UNROLL
    for (int p = 0; p < W / 2; ++p)
      diffgrad::detail::gaussian_pair(seed, step, first / 2 + static_cast<std::uint64_t>(p),
                                      xi[2 * p], xi[2 * p + 1]);
  } else {
    double pairs[W + 2];
    DIFFGRAD_UNROLL
    for (int p = 0; p <= W / 2; ++p)
      diffgrad::detail::gaussian_pair(seed, step, first / 2 + static_cast<std::uint64_t>(p),
                                      pairs[2 * p], pairs[2 * p + 1]);
    DIFFGRAD_UNROLL
    for (int e = 0; e < W; ++e) xi[e] = pairs[e + 1];
  }
}

} // namespace detail

/// The noise summand c * xi(seed, step, first_index + element index) (diffgrad::NoiseTerm on
/// the device). first_index is the GLOBAL index of the batch's element 0, row_offset * d
/// (backend/lincomb_term.hpp), so element i of the batch draws gaussian(first_index + i).
struct NoiseParams {
  double coeff = 0.0;
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
  std::uint64_t first_index = 0;
};

/// One summand c * x of the fused update, on raw device (or, in host tests, host) memory.
template <class Scalar> struct Term {
  double coeff;
  const Scalar* data;
};

/// out[i] = sum_{k < N} coeff[k] in[k][i] (+ Scalar(noise.coeff xi_i) when WithNoise), for
/// item `it` = elements [it W, min((it + 1) W, size)), W = Packet<Scalar>::kWidth.
template <class Scalar, int N, bool WithNoise> struct LincombFunctor {
  static_assert(N >= 1 || WithNoise, "LincombFunctor: at least one term or the noise");
  static constexpr int kWidth = detail::Packet<Scalar>::kWidth;
  static constexpr int kSlots = N > 0 ? N : 1;

  Scalar* out;
  const Scalar* in[kSlots];
  Scalar coeff[kSlots];
  NoiseParams noise;
  std::int64_t size;

  /// Number of items (functor calls) covering `size` elements.
  static std::int64_t items(std::int64_t size) { return (size + kWidth - 1) / kWidth; }

  /// One element from its N inputs and its noise value xi (ignored without noise).
  DIFFGRAD_HOST_DEVICE Scalar combine(const Scalar (&x)[kSlots], double xi) const {
    Scalar acc{};
    if constexpr (N > 0) {
      acc = detail::mul_rn(coeff[0], x[0]);
      DIFFGRAD_UNROLL
      for (int k = 1; k < N; ++k) acc = detail::add_rn(acc, detail::mul_rn(coeff[k], x[k]));
    }
    if constexpr (WithNoise) {
      const auto scaled = static_cast<Scalar>(diffgrad::detail::portable::mul_rn(noise.coeff, xi));
      acc = N > 0 ? detail::add_rn(acc, scaled) : scaled;
    }
    return acc;
  }

  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t item) const {
    const std::int64_t first = item * kWidth;
    if (first + kWidth <= size) {
      detail::Packet<Scalar> x[kSlots];
      DIFFGRAD_UNROLL
      for (int k = 0; k < N; ++k) x[k] = detail::load_packet(in[k] + first);
      double xi[kWidth] = {};
      if constexpr (WithNoise)
        detail::gaussian_packet(noise.seed, noise.step,
                                noise.first_index + static_cast<std::uint64_t>(first), xi);
      detail::Packet<Scalar> r;
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) {
        Scalar xe[kSlots] = {};
        DIFFGRAD_UNROLL
        for (int k = 0; k < N; ++k) xe[k] = x[k].v[e];
        r.v[e] = combine(xe, xi[e]);
      }
      detail::store_packet(out + first, r);
    } else {
      for (std::int64_t i = first; i < size; ++i) {
        Scalar xe[kSlots] = {};
        DIFFGRAD_UNROLL
        for (int k = 0; k < N; ++k) xe[k] = in[k][i];
        double xi = 0.0;
        if constexpr (WithNoise)
          xi = diffgrad::detail::gaussian(noise.seed, noise.step,
                                          noise.first_index + static_cast<std::uint64_t>(i));
        out[i] = combine(xe, xi);
      }
    }
  }
};

/// out[i] = value for i < size (vectorised like LincombFunctor).
template <class Scalar> struct FillFunctor {
  static constexpr int kWidth = detail::Packet<Scalar>::kWidth;
  Scalar* out;
  Scalar value;
  std::int64_t size;
  static std::int64_t items(std::int64_t size) { return (size + kWidth - 1) / kWidth; }
  DIFFGRAD_HOST_DEVICE void operator()(std::int64_t item) const {
    const std::int64_t first = item * kWidth;
    if (first + kWidth <= size) {
      detail::Packet<Scalar> r;
      DIFFGRAD_UNROLL
      for (int e = 0; e < kWidth; ++e) r.v[e] = value;
      detail::store_packet(out + first, r);
    } else {
      for (std::int64_t i = first; i < size; ++i) out[i] = value;
    }
  }
};

/// Builds the functor for terms t_0..t_{N-1} (coefficients rounded to Scalar as Eigen does).
template <bool WithNoise, class Scalar, class... Terms>
LincombFunctor<Scalar, static_cast<int>(sizeof...(Terms)), WithNoise>
make_lincomb_functor(Scalar* out, std::int64_t size, NoiseParams noise, Terms... terms) {
  LincombFunctor<Scalar, static_cast<int>(sizeof...(Terms)), WithNoise> f{};
  f.out = out;
  f.size = size;
  f.noise = noise;
  [[maybe_unused]] int k = 0;
  ((f.in[k] = terms.data, f.coeff[k] = static_cast<Scalar>(terms.coeff), ++k), ...);
  return f;
}

/// Launches a lincomb functor on `stream` (status code; the host API throws).
template <class Scalar, int N, bool WithNoise>
cudaError_t launch(const LincombFunctor<Scalar, N, WithNoise>& f, cudaStream_t stream) {
  if (f.size <= 0) return cudaSuccess;
  if (!detail::is_aligned16(f.out)) return cudaErrorMisalignedAddress;
  for (int k = 0; k < N; ++k)
    if (!detail::is_aligned16(f.in[k])) return cudaErrorMisalignedAddress;
  return launch_for_each(f, f.items(f.size), stream);
}

/// out = sum_k t_k.coeff * t_k.data, any number of terms, one fused pass on `stream`.
template <class Scalar, class... Terms>
cudaError_t lincomb(Scalar* out, std::int64_t size, cudaStream_t stream, Term<Scalar> first,
                    Terms... rest) {
  return launch(make_lincomb_functor<false>(out, size, NoiseParams{}, first, rest...), stream);
}

/// out = sum_k t_k.coeff * t_k.data + noise.coeff * xi (zero or more terms), one pass.
template <class Scalar, class... Terms>
cudaError_t lincomb_noise(Scalar* out, std::int64_t size, cudaStream_t stream, NoiseParams noise,
                          Terms... terms) {
  return launch(make_lincomb_functor<true>(out, size, noise, terms...), stream);
}

/// out[i] = value, one pass.
template <class Scalar>
cudaError_t fill(Scalar* out, std::int64_t size, Scalar value, cudaStream_t stream) {
  if (size <= 0) return cudaSuccess;
  if (!detail::is_aligned16(out)) return cudaErrorMisalignedAddress;
  const FillFunctor<Scalar> f{out, value, size};
  return launch_for_each(f, f.items(size), stream);
}

DIFFGRAD_CUDA_NAMESPACE_END
