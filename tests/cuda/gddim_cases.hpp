#pragma once
// CPU-vs-GPU cases for the library's gDDIM samplers (gddim/cld_sampler.hpp: 2x2 blocks over
// [x | v]; gddim/bdm_sampler.hpp: per-frequency tables in the backend's memory), written once
// over the backend like cases.hpp. The samplers compute their coefficients with Eigen on the
// host, so a .cu file including this header needs nvcc's --expt-relaxed-constexpr and
// -diag-suppress=20012 (tests/cuda/CMakeLists.txt sets them for test_cuda_gddim); the CPU
// side is cpu_reference_gddim.cpp. The model is a backend-generic linear field (lincombs only,
// node-dependent), so any CPU/GPU difference is the backends'.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/bdm_schedule.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/gddim/cld_schedule.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::testing {

/// eps(u, node) = (0.6 + 0.2 t) u - 0.3 m, m a fixed state: node-dependent, backend-generic.
template <Backend B> struct LinearField {
  const B* backend;
  const typename B::state_type* m;
  void operator()(const typename B::state_type& u, const Node& n,
                  typename B::state_type& out) const {
    backend->lincomb(out, term(0.6 + 0.2 * n.t, u), term(-0.3, *m));
  }
};

/// The gDDIM cases: 0..2 CLD (q = 1, q = 2, stochasticity 0.5 with the denoising step),
/// 3..5 BDM on 4 x 4 images (q = 1, q = 3, stochasticity 0.5).
inline constexpr int kGddimCases = 6;
inline std::string gddim_case_name(int index) {
  static const char* names[kGddimCases] = {"CLD q = 1", "CLD q = 2", "CLD l = 0.5 + denoise",
                                           "BDM q = 1", "BDM q = 3", "BDM l = 0.5"};
  return names[index];
}

/// Runs case `index` through run_scheme (row offset 2) from a fixed x_T; returns the sample.
template <Backend B, class IO> Parts gddim_case(const B& backend, const IO& io, int index) {
  using State = typename B::state_type;
  const int batch = 5, width = index < 3 ? 6 : 16; // CLD: d = 3 (odd); BDM: 4 x 4
  std::vector<double> m_host = problem_mu_rows(batch, width);
  const State m = io.state(backend, m_host, batch, width);
  State x = io.state(backend, problem_x_T(batch, width), batch, width);
  const LinearField<B> field{&backend, &m};
  SampleOptions options;
  options.seed = 11;
  options.row_offset = 2;
  const auto run = [&](const auto& scheme, NodeAtLambda node_at_lambda) {
    SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), batch, width);
    const auto nodes = scheme.nodes();
    run_scheme(scheme, backend, std::span<const Node>(nodes.data(), nodes.size()), node_at_lambda,
               field, x, ws, options);
  };
  if (index < 3) {
    const gddim::CldSchedule schedule;
    gddim::CldGddimOptions o;
    if (index == 1) o.order = 2;
    if (index == 2) {
      o.stochasticity = 0.5;
      o.denoise = true;
    }
    const gddim::CldGddim scheme(schedule, gddim::cld_quadratic_grid(schedule, 6), o);
    run(scheme, scheme.node_at_lambda());
  } else {
    const gddim::BdmSchedule<> schedule(4, 4);
    const std::vector<double> times{0.8, 0.6, 0.45, 0.3, 0.2, 0.1};
    gddim::BdmGddimOptions o;
    if (index == 4) o.order = 3;
    if (index == 5) o.stochasticity = 0.5;
    const gddim::BdmGddim<B> scheme(backend, schedule, std::span<const double>(times), o);
    run(scheme, gddim::BdmGddim<B>::node_at_lambda());
  }
  Parts parts;
  add_part(parts, "sample", io.host(x));
  return parts;
}

} // namespace diffgrad::testing
