#pragma once
// CPU-vs-GPU cases for structured step coefficients (backend/coefficient.hpp), written once
// over the backend like cases.hpp: synthetic two-step schemes whose plans use every slot (x,
// eps, history x and eps, noise) with 2x2 blocks (correlated noise across the halves) or
// per-column tables, run through the library's engine (sample) and exact discrete adjoint
// (gradient, transposed blocks), at a nonzero row offset. The column scheme builds its table
// with Backend::make_coefficients once, before any step (device memory on the GPU).
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "backend_models.hpp"
#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/gradients/loss.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad::testing {

/// Smooth in the step, non-symmetric (the adjoint's transposes matter), contracting.
inline Block2 structured_block(int i, int slot) {
  const double a = 0.3 * i + 0.7 * slot;
  return {0.8 + 0.1 * std::sin(a), 0.25 * std::cos(a + 0.2), -0.3 * std::sin(a + 1.1),
          0.7 + 0.1 * std::cos(a)};
}

/// x_{i+1} = A_i x_i + B_i e_i + H_i x_{i-1} + E_i e_{i-1} (from step 1 on) + L_i xi_i, with
/// 2x2 blocks over the halves [x | v] and a lower-triangular L (noise correlated across them).
struct StructuredBlockScheme {
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  void validate(std::span<const Node> nodes) const {
    if (nodes.size() < 2) throw invalid_argument("StructuredBlockScheme: at least two nodes");
  }
  bool accepts_dim(std::int64_t dim) const { return dim % 2 == 0; }
  std::string dim_requirement() const { return "an even number (two halves [x | v])"; }
  BasicStepPlan<Block2> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    BasicStepPlan<Block2> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    p.output.x = structured_block(i, 0);
    p.output.e[0] = 0.2 * structured_block(i, 1);
    if (i >= 1) {
      p.output.hist_x[0] = 0.1 * structured_block(i, 2);
      p.output.hist_e[0] = -0.05 * structured_block(i, 3);
    }
    p.noise = Block2{0.3, 0.0, 0.12 + 0.01 * i, 0.2};
    return p;
  }
};

/// The same structure with per-column coefficients: one table of 5 slots (x, e, hist_x,
/// hist_e, noise) x dim entries per step, in the backend's memory, built at construction.
template <Backend B> struct StructuredColumnScheme {
  typename B::coefficient_table table;
  std::int64_t dim;
  int steps;
  StructuredColumnScheme(const B& backend, std::int64_t d, int n) : dim(d), steps(n) {
    std::vector<double> host(static_cast<std::size_t>(5 * n * d));
    for (int i = 0; i < n; ++i)
      for (int s = 0; s < 5; ++s)
        for (std::int64_t k = 0; k < d; ++k)
          host[static_cast<std::size_t>((i * 5 + s) * d + k)] =
              (s == 0   ? 0.8
               : s == 4 ? 0.25
                        : 0.15) +
              0.1 * std::sin(0.5 * i + 1.3 * s + 0.7 * static_cast<double>(k));
    table = backend.make_coefficients(std::span<const double>(host));
  }
  int history() const { return 1; }
  int stages() const { return 1; }
  bool stochastic() const { return true; }
  void validate(std::span<const Node> nodes) const {
    if (static_cast<int>(nodes.size()) != steps + 1)
      throw invalid_argument("StructuredColumnScheme: the grid it was built for");
  }
  bool accepts_dim(std::int64_t d) const { return d == dim; }
  std::string dim_requirement() const { return std::to_string(dim) + " (the table's columns)"; }
  ColumnCoeff at(int i, int slot, double scale) const {
    return {B::coefficient_data(table) + (i * 5 + slot) * dim, scale};
  }
  BasicStepPlan<ColumnCoeff> plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    BasicStepPlan<ColumnCoeff> p;
    p.stage_node[0] = nodes[static_cast<std::size_t>(i)];
    p.output.x = at(i, 0, 1.0);
    p.output.e[0] = at(i, 1, 0.5);
    if (i >= 1) {
      p.output.hist_x[0] = at(i, 2, 1.0);
      p.output.hist_e[0] = ColumnCoeff::scalar(-0.03); // a table-free term among table terms
    }
    p.noise = at(i, 4, 1.0);
    return p;
  }
};

inline constexpr std::uint64_t kStructuredRowOffset = 3;

/// Sample and exact discrete gradient (store_all and checkpoint(2)) with the block scheme
/// (columns = false) or the column scheme, on the backend-generic Gaussian model.
template <Backend B, class IO>
Parts structured_case(const B& backend, const IO& io, bool columns, const Problem& p) {
  using State = typename B::state_type;
  Parts parts;
  const auto run = [&](const auto& scheme) {
    const std::vector<Node> nodes = diffusion_nodes(p);
    auto model = MakeGaussian{}(backend, io, p);
    auto x = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
    SampleOptions so;
    so.seed = p.seed;
    so.row_offset = kStructuredRowOffset;
    sample(scheme, backend, vp_schedule(), std::span<const Node>(nodes), model, x, so);
    add_part(parts, "sample", io.host(x));
    const State x_T = io.state(backend, problem_x_T(p.batch, p.dim), p.batch, p.dim);
    std::vector<double> target_host = problem_mu_rows(p.batch, p.dim);
    for (double& v : target_host) v = 0.3 - v;
    SquaredDistanceLoss<B> loss(io.state(backend, target_host, p.batch, p.dim));
    for (int memory : {0, 1}) {
      GradientOptions go;
      go.memory = memory == 0 ? MemoryMode::store_all() : MemoryMode::checkpoint(2);
      go.seed = p.seed;
      go.row_offset = kStructuredRowOffset;
      go.wrt_noise = true;
      const auto r = gradient(scheme, backend, vp_schedule(), std::span<const Node>(nodes), model,
                              x_T, loss, go);
      const std::string tag = memory == 0 ? " (store_all)" : " (checkpoint 2)";
      add_part(parts, "x0" + tag, io.host(r.x0));
      add_part(parts, "grad_x" + tag, io.host(r.grad_x));
      for (std::size_t i = 0; i < r.grad_noise.size(); ++i)
        add_part(parts, "grad_noise[" + std::to_string(i) + "]" + tag, io.host(r.grad_noise[i]));
    }
  };
  if (columns)
    run(StructuredColumnScheme<B>(backend, p.dim, p.steps));
  else
    run(StructuredBlockScheme{});
  return parts;
}

} // namespace diffgrad::testing
