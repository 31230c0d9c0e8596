#pragma once
// The CPU side of the CPU-vs-GPU tests: each function runs a case of cases.hpp (or a model
// evaluation) on EigenBackend and returns host vectors. Implemented in cpu_reference.cpp,
// compiled by the host compiler: Eigen never enters a .cu translation unit (under nvcc,
// Eigen 3.4 floods warning #20012-D).
#include <cstdint>
#include <string>
#include <vector>

#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/backend/lincomb_term.hpp"

namespace diffgrad::testing {

// --- the problems' models -----------------------------------------------------------------
/// Dirac mixture of the tests: K = kDiracPoints points (problem_points), weights
/// problem_weights, conditioning logits z_i = 0.1 i - 0.2.
inline constexpr int kDiracPoints = 7;
inline std::vector<double> dirac_cond() {
  std::vector<double> z(kDiracPoints);
  for (int i = 0; i < kDiracPoints; ++i) z[static_cast<std::size_t>(i)] = 0.1 * i - 0.2;
  return z;
}
/// MLP of the tests: hidden {16, 12}, F = 3 time frequencies, c = 2 conditioning entries
/// z = (0.2, -0.1), seed 3; SiLU or tanh.
inline constexpr int kMlpCond = 2;
inline std::vector<double> mlp_cond() { return {0.2, -0.1}; }
inline constexpr std::uint64_t kMlpSeed = 3;

// --- host functor references (EigenBackend) -----------------------------------------------------
/// EigenBackend::lincomb over the given terms (runtime-arity form) and optional noise drawn
/// for global rows row_offset.. (NoiseTerm::row_offset).
std::vector<double> cpu_lincomb(Precision p, const std::vector<double>& coeffs,
                                const std::vector<std::vector<double>>& inputs, double noise_coeff,
                                std::uint64_t seed, std::uint64_t step, int batch, int dim,
                                std::uint64_t row_offset = 0);
/// EigenBackend's 2x2-block lincomb (batch x width states, width even) with noise L.
std::vector<double> cpu_lincomb_block2(Precision p, const std::vector<Block2>& coeffs,
                                       const std::vector<std::vector<double>>& inputs,
                                       const BasicNoiseTerm<Block2>& noise, int batch, int width);
/// A ColumnCoeff without a pointer (host and device tables differ): scale * table[offset + k]
/// for column k, or the scalar `scale` when offset < 0.
struct ColumnSpec {
  std::int64_t offset = -1;
  double scale = 0.0;
};
/// EigenBackend's per-column lincomb with the coefficient table `table` (host memory there).
std::vector<double> cpu_lincomb_columns(Precision p, const std::vector<double>& table,
                                        const std::vector<ColumnSpec>& coeffs,
                                        const std::vector<std::vector<double>>& inputs,
                                        ColumnSpec noise, std::uint64_t seed, std::uint64_t step,
                                        std::uint64_t row_offset, int batch, int width);
double cpu_dot(Precision p, const std::vector<double>& a, const std::vector<double>& b, int batch,
               int dim);

// --- cases.hpp on the CPU ----------------------------------------------------------------------
/// structured_cases.hpp: the block (columns = false) or per-column scheme, sample + gradients.
Parts cpu_structured(bool columns, const Problem& problem, Precision p);
/// gddim_cases.hpp case `index` on EigenBackend<double> (cpu_reference_gddim.cpp).
Parts cpu_gddim(int index);
Parts cpu_sample_gaussian(int index, const Problem& problem, Precision p);
Parts cpu_sample_dirac(int index, const Problem& problem);
Parts cpu_sample_mlp(int index, const Problem& problem, Precision p, bool use_tanh);
Parts cpu_gradient_gaussian(int index, const Problem& problem, const GradientSpec& g, Precision p);
Parts cpu_gradient_dirac(int index, const Problem& problem, const GradientSpec& g);
Parts cpu_gradient_mlp(int index, const Problem& problem, const GradientSpec& g, Precision p);
Parts cpu_inversion_gaussian(int index, const Problem& problem, Precision p);
Parts cpu_continuous_gaussian(const Problem& problem, Precision p);
Parts cpu_continuous_dirac(const Problem& problem);
/// sde_cases.hpp: the SDE layer's OU case (Euler-Maruyama, or exponential Euler).
Parts cpu_sde(bool exponential, const Problem& problem, Precision p);

// --- model evaluations ----------------------------------------------------------------------
/// eps, x0_hat, and vjp (dx, dcond, dparams) of the CPU Dirac mixture at node `n` for the
/// batch x and cotangent a (row-major batch x dim).
Parts cpu_dirac_eval(const std::vector<double>& x, const std::vector<double>& a, int batch, int dim,
                     const Node& n);
/// The CPU Mlp's flat parameters and parameter count for the tests' configuration.
std::vector<double> cpu_mlp_params(int dim, bool use_tanh);
/// eps (= velocity), and vjp (dx, dcond, dparams) of the CPU Mlp at time t.
Parts cpu_mlp_eval(Precision p, const std::vector<double>& x, const std::vector<double>& a,
                   int batch, int dim, double t, bool use_tanh);

} // namespace diffgrad::testing
