#pragma once
// The device side of the CPU-vs-GPU cases (cases.hpp): host <-> device IO for CudaBackend,
// the device model factories matching cpu_reference.cpp's, and the part-by-part comparison.
#include <catch2/catch.hpp>

#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "cases.hpp"
#include "cpu_reference.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/models/cuda/dirac_mixture.cuh"
#include "diffgrad/models/cuda/mlp.cuh"

namespace diffgrad::testing {

template <class Scalar> struct CudaIO {
  using B = ::diffgrad::gpu::CudaBackend<Scalar>;
  using State = ::diffgrad::gpu::DeviceState<Scalar>;
  using Vector = ::diffgrad::gpu::DeviceVector<Scalar>;
  State state(const B& backend, const std::vector<double>& v, int batch, int dim) const {
    const std::vector<Scalar> s(v.begin(), v.end());
    return ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(s), batch, dim,
                                              backend.stream());
  }
  std::vector<double> host(const State& s) const {
    const std::vector<Scalar> h = ::diffgrad::gpu::to_host(s);
    return std::vector<double>(h.begin(), h.end());
  }
  std::vector<double> host(const Vector& v) const {
    const std::vector<Scalar> h = ::diffgrad::gpu::to_host(v);
    return std::vector<double>(h.begin(), h.end());
  }
};

template <class Scalar>
void set_device_vector(::diffgrad::gpu::DeviceVector<Scalar>& dst, const std::vector<double>& v) {
  const std::vector<Scalar> s(v.begin(), v.end());
  ::diffgrad::gpu::copy_to_device(std::span<const Scalar>(s), dst);
}

/// The Dirac mixture of cpu_reference.cpp, on the device.
struct MakeDiracGpu {
  template <class IO>
  models::gpu::DiracMixture<double> operator()(const ::diffgrad::gpu::CudaBackend<double>& b,
                                               const IO&, const Problem& p) const {
    const std::vector<double> pts = problem_points(kDiracPoints, p.dim);
    const std::vector<double> w = problem_weights(kDiracPoints);
    models::gpu::DiracMixture<double> m(b, pts, kDiracPoints, p.dim, w);
    set_device_vector(m.cond(), dirac_cond());
    return m;
  }
};

inline models::gpu::MlpConfig gpu_mlp_config(int dim, bool use_tanh) {
  models::gpu::MlpConfig c;
  c.dim = dim;
  c.cond_dim = kMlpCond;
  c.time_frequencies = 3;
  c.time_scale = 1.0;
  c.hidden = {16, 12};
  c.activation = use_tanh ? models::gpu::Activation::tanh : models::gpu::Activation::silu;
  return c;
}

/// The MLP of cpu_reference.cpp, on the device (same config, same seed).
template <class Scalar> struct MakeMlpGpu {
  bool use_tanh = false;
  template <class IO>
  models::gpu::Mlp<Scalar> operator()(const ::diffgrad::gpu::CudaBackend<Scalar>& b, const IO&,
                                      const Problem& p) const {
    models::gpu::Mlp<Scalar> m(b, gpu_mlp_config(p.dim, use_tanh), kMlpSeed);
    set_device_vector(m.cond(), mlp_cond());
    return m;
  }
};

/// Largest error over the parts of one comparison (for the printed summaries).
struct Agreement {
  double max_error = 0.0;
  std::size_t differing_elements = 0; ///< elements that differ in any bit
  std::size_t elements = 0;
};

/// Checks every part of `gpu` against `cpu` within `tol` (max-norm relative error).
inline Agreement check_parts(const Parts& gpu, const Parts& cpu, double tol,
                             const std::string& label) {
  Agreement a;
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    INFO(label << ": " << gpu[i].first);
    REQUIRE(gpu[i].first == cpu[i].first);
    REQUIRE(gpu[i].second.size() == cpu[i].second.size());
    const double e = max_relative_error(gpu[i].second, cpu[i].second);
    INFO("max relative error " << e << " (tolerance " << tol << ")");
    CHECK(e <= tol);
    a.max_error = std::max(a.max_error, e);
    a.differing_elements += bitwise_mismatches(gpu[i].second, cpu[i].second);
    a.elements += gpu[i].second.size();
  }
  return a;
}

inline void print_agreement(const std::string& label, const Agreement& a) {
  std::printf("  %-48s max rel. error %.3e  bit-identical %zu/%zu\n", label.c_str(), a.max_error,
              a.elements - a.differing_elements, a.elements);
}

} // namespace diffgrad::testing
