#pragma once
// CPU-vs-GPU cases of the BDM sampler with a PIXEL-space model (gddim/cuda/spectral_field.cuh
// vs gddim/spectral_field.hpp), written once over the backend like gddim_cases.hpp: the
// .cu side (test_cuda_bdm_spectral.cu) runs them on CudaBackend<double> with the device Dirac
// mixture, cpu_reference_bdm_spectral.cpp on EigenBackend<double> with the CPU one (same
// points, weights and logits: cuda_io.cuh / cpu_reference.cpp). The images are 2 channels of
// 4 x 3 (H != W and C > 1, so a transposed or mis-strided DCT cannot pass), batch 3, row
// offset 2. Include the device overloads (spectral_field.cuh) BEFORE this header in a .cu.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::testing {

inline constexpr int kBdmHeight = 4, kBdmWidth = 3, kBdmChannels = 2, kBdmBatch = 3;
inline constexpr int kBdmDim = kBdmChannels * kBdmHeight * kBdmWidth;

/// The Dirac mixture's problem (cpu_reference.cpp's MakeDirac / cuda_io.cuh's MakeDiracGpu
/// read dim from it).
inline Problem bdm_spectral_problem() {
  Problem p;
  p.batch = kBdmBatch;
  p.dim = kBdmDim;
  p.seed = 11;
  return p;
}

/// Sampling cases: q = 1, q = 3, stochasticity 0.5 (Philox noise in the DCT basis), and q = 2
/// from an x_T drawn by sample_bdm(scheme, backend, model, batch, prior_seed, options).
/// Gradient cases: q = 2 with a pixel cotangent (store_all), stochasticity 0.5 with the
/// squared-distance loss (checkpoint(2), wrt noise).
inline constexpr int kBdmSampleCases = 4, kBdmGradientCases = 2;
inline std::string bdm_sample_case_name(int i) {
  static const char* names[kBdmSampleCases] = {"BDM pixel Dirac q = 1", "BDM pixel Dirac q = 3",
                                               "BDM pixel Dirac l = 0.5",
                                               "BDM pixel Dirac q = 2, drawn x_T"};
  return names[i];
}
inline std::string bdm_gradient_case_name(int i) {
  static const char* names[kBdmGradientCases] = {"BDM pixel Dirac q = 2, cotangent",
                                                 "BDM pixel Dirac l = 0.5, loss, checkpoint(2)"};
  return names[i];
}

inline const std::vector<double>& bdm_spectral_times() {
  static const std::vector<double> t{0.8, 0.6, 0.45, 0.3, 0.2, 0.1};
  return t;
}

/// Runs sample_bdm (the backend's overload) for case `index` from a fixed pixel x_T.
template <Backend B, class IO, class MakeModel>
Parts bdm_spectral_sample_case(const B& backend, const IO& io, const MakeModel& make_model,
                               int index) {
  using State = typename B::state_type;
  const Problem p = bdm_spectral_problem();
  auto model = make_model(backend, io, p);
  State x = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
  const gddim::BdmSchedule<> schedule(kBdmHeight, kBdmWidth);
  gddim::BdmGddimOptions o;
  o.channels = kBdmChannels;
  if (index == 1) o.order = 3;
  if (index == 2) o.stochasticity = 0.5;
  if (index == 3) o.order = 2;
  const gddim::BdmGddim<B> scheme(backend, schedule, std::span<const double>(bdm_spectral_times()),
                                  o);
  SampleOptions options;
  options.seed = p.seed;
  options.row_offset = 2;
  if (index == 3) // bdm_sampler.hpp's generic entry point, which calls the backend's overload
    x = gddim::sample_bdm(scheme, backend, model, p.batch, /*prior_seed=*/5, options);
  else
    gddim::sample_bdm(scheme, backend, model, x, options);
  Parts parts;
  add_part(parts, "sample", io.host(x));
  return parts;
}

/// Runs gradient_bdm (the backend's overload) for case `index`: x0, dL/dx_T, dL/dcond,
/// dL/dparams and, for the stochastic case, dL/dxi per step.
template <Backend B, class IO, class MakeModel>
Parts bdm_spectral_gradient_case(const B& backend, const IO& io, const MakeModel& make_model,
                                 int index) {
  using State = typename B::state_type;
  const Problem p = bdm_spectral_problem();
  auto model = make_model(backend, io, p);
  const State x_T = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
  const gddim::BdmSchedule<> schedule(kBdmHeight, kBdmWidth);
  gddim::BdmGddimOptions o;
  o.channels = kBdmChannels;
  GradientOptions options;
  options.wrt_cond = true;
  options.wrt_params = true;
  options.seed = p.seed;
  options.row_offset = 2;
  if (index == 0) {
    o.order = 2;
  } else {
    o.stochasticity = 0.5;
    options.memory = MemoryMode::checkpoint(2);
    options.wrt_noise = true;
  }
  const gddim::BdmGddim<B> scheme(backend, schedule, std::span<const double>(bdm_spectral_times()),
                                  o);
  Parts parts;
  const auto emit = [&](const GradientResult<B>& r) {
    add_part(parts, "x0", io.host(r.x0));
    add_part(parts, "grad_x", io.host(r.grad_x));
    add_part(parts, "grad_cond", io.host(r.grad_cond));
    add_part(parts, "grad_params", io.host(r.grad_params));
    for (std::size_t i = 0; i < r.grad_noise.size(); ++i)
      add_part(parts, "grad_noise[" + std::to_string(i) + "]", io.host(r.grad_noise[i]));
  };
  if (index == 0) {
    const State cotangent = io.state(backend, problem_mu_rows(p.batch, p.dim), p.batch, p.dim);
    emit(gddim::gradient_bdm(scheme, backend, model, x_T, cotangent, options));
  } else {
    std::vector<double> target = problem_mu_rows(p.batch, p.dim);
    for (double& v : target) v = 0.3 - v;
    SquaredDistanceLoss<B> loss(io.state(backend, target, p.batch, p.dim));
    emit(gddim::gradient_bdm(scheme, backend, model, x_T, loss, options));
  }
  return parts;
}

// --- the CPU side (cpu_reference_bdm_spectral.cpp, EigenBackend<double>) ---------------------
/// gddim::ChannelDct forward (or inverse) of a row-major batch x (channels h w) host batch.
std::vector<double> cpu_channel_dct(const std::vector<double>& in, int batch, int channels,
                                    int height, int width, bool inverse);
Parts cpu_bdm_spectral_sample(int index);
Parts cpu_bdm_spectral_gradient(int index);

} // namespace diffgrad::testing
