#pragma once
// The Collage combinator's CPU-vs-GPU case, written once as a template over the backend (as
// cases.hpp): cpu_reference_collage.cpp instantiates it with EigenBackend and the CPU Dirac
// mixture, test_cuda_collage.cu with CudaBackend and the device Dirac mixture. Only generic
// code runs in between (Collage, sample, gradient), so agreement shows the combinator is
// backend-agnostic on the device.
//
// The case: a chain of 4 windows of width 6 overlapping by 2 (D = 18, three separators of
// degree 2, weight -1), a window model and an overlap model (Dirac mixtures of K = 5 points,
// distinct objects: two model calls per evaluation), a batch of 3.
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "cases.hpp"
#include "cpu_reference_collage.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/models/collage.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::testing {

inline std::vector<double> collage_values(std::size_t n, double phase) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = std::sin(0.53 * static_cast<double>(i) + phase) * (0.8 + 0.3 * phase);
  return v;
}

/// eps and VJP (dx) of the composed model at one node, DDIM, DDIM eta = 1 (Philox noise at the
/// big state's indices) and DPM-Solver++(2M) samples, and the exact discrete gradient of
/// |x0 - target|^2 / 2 w.r.t. x_T through DDIM. make_dirac(backend, points (K x width,
/// row-major), K, width, weights, conditioning logits) builds a Dirac mixture of the backend.
template <Backend B, class IO, class MakeDirac>
Parts collage_case(const B& backend, const IO& io, const MakeDirac& make_dirac,
                   const CollageProblem& cp = {}) {
  using State = typename B::state_type;
  const int k = cp.points, dim = cp.dim(), batch = cp.batch;
  const auto ku = static_cast<std::size_t>(k);
  std::vector<double> weights(ku), window_cond(ku), overlap_cond(ku);
  for (std::size_t i = 0; i < ku; ++i) {
    weights[i] = 1.0 + 0.3 * static_cast<double>(i % 2);
    window_cond[i] = 0.1 * static_cast<double>(i) - 0.2;
    overlap_cond[i] = -0.05 * static_cast<double>(i);
  }
  auto window =
      make_dirac(backend, collage_values(ku * static_cast<std::size_t>(cp.piece_width), 0.1), k,
                 cp.piece_width, weights, window_cond);
  auto overlap = make_dirac(backend, collage_values(ku * static_cast<std::size_t>(cp.overlap), 0.7),
                            k, cp.overlap, weights, overlap_cond);
  using Model = decltype(window);
  models::Collage<B, Model> collage(backend,
                                    models::chain_graph(cp.pieces, cp.piece_width, cp.overlap),
                                    {&window, &overlap}, batch);

  Parts parts;
  const auto size = static_cast<std::size_t>(batch) * static_cast<std::size_t>(dim);
  const State x = io.state(backend, collage_values(size, 0.4), batch, dim);
  const State a = io.state(backend, collage_values(size, 1.3), batch, dim);
  const Node node = make_nodes(vp_schedule(), std::vector<double>{0.45, 0.2})[0];
  State out = backend.make_state(batch, dim), dx = backend.make_state(batch, dim);
  collage.eps(x, node, out);
  add_part(parts, "eps", io.host(out));
  collage.vjp(x, node, a, dx, nullptr, nullptr);
  add_part(parts, "vjp dx", io.host(dx));

  Problem p;
  p.batch = batch;
  p.dim = dim;
  p.steps = 9;
  const std::vector<Node> nodes = diffusion_nodes(p);
  const auto run = [&](const auto& scheme, const char* name) {
    State x_T = io.state(backend, collage_values(size, 2.2), batch, dim);
    sample(scheme, backend, vp_schedule(), std::span<const Node>(nodes), collage, x_T,
           SampleOptions{.seed = 11});
    add_part(parts, name, io.host(x_T));
  };
  run(Ddim(), "DDIM sample");
  run(Ddim(1.0), "DDIM eta=1 sample");
  run(DpmSolverMultistep(2, SolverPrediction::data), "DPM-Solver++(2M) sample");

  const State x_T = io.state(backend, collage_values(size, 2.2), batch, dim);
  std::vector<double> target = collage_values(size, 0.9);
  SquaredDistanceLoss<B> loss(io.state(backend, target, batch, dim));
  GradientOptions options;
  options.seed = 11;
  const auto r = gradient(Ddim(), backend, vp_schedule(), std::span<const Node>(nodes), collage,
                          x_T, loss, options);
  add_part(parts, "gradient x0", io.host(r.x0));
  add_part(parts, "gradient loss", std::vector<double>{r.loss});
  add_part(parts, "gradient grad_x", io.host(r.grad_x));
  return parts;
}

} // namespace diffgrad::testing
