// Sample quality of the gDDIM samplers against their baselines on exact mixture models,
// printed as the markdown tables of benchmarks/RESULTS.md (section 6).
//
//   build/benchmarks/gddim_quality [samples]      (default 4000 samples per cell)
//
// CLD: 2-D data, 8 Gaussians of std 0.05 on a circle of radius 2, exact eps (CldMixture),
// quadratic grid 1 -> 1e-3, no denoising step; the prior is the stationary law.
// BDM: 8x8 images, a mixture of the 10 digit glyphs (pixels +-1, std 0.1), exact eps
// (BdmGaussianMixture), quadratic grid from t_start (sigma/alpha = 80) to 1e-5, prior N(0, I)
// in the DCT basis (the official sampler's start).
// Metrics (both can be wrong in either direction, and 1 / 0 is exact):
//   spread = RMS distance of each sample to its nearest mode / the data's RMS distance
//            (std sqrt(dim)); > 1 means blurred or off-mode samples, < 1 collapsed ones.
//   TV     = total-variation distance between the modes' sample shares and their weights.
// Sampling error only: every cell uses the exact eps, so the numbers measure the solvers.
#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numbers>
#include <string>
#include <vector>

#include "common/font5x7.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/cld_sampler.hpp"
#include "diffgrad/models/bdm_mixture.hpp"
#include "diffgrad/models/cld_mixture.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Means = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Quality {
  double spread = 0.0, tv = 0.0;
};

/// spread and TV of `x` (rows = samples) against the modes `means` of std `std`.
Quality quality(const State& x, const Means& means, double std) {
  const Eigen::Index k = means.rows();
  std::vector<double> share(static_cast<std::size_t>(k), 0.0);
  double sq = 0.0;
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    Eigen::Index best = 0;
    double best_d = (x.row(r) - means.row(0)).squaredNorm();
    for (Eigen::Index m = 1; m < k; ++m) {
      const double d = (x.row(r) - means.row(m)).squaredNorm();
      if (d < best_d) best_d = d, best = m;
    }
    sq += best_d;
    share[static_cast<std::size_t>(best)] += 1.0 / static_cast<double>(x.rows());
  }
  Quality q;
  q.spread = std::sqrt(sq / static_cast<double>(x.rows())) /
             (std * std::sqrt(static_cast<double>(x.cols())));
  for (double s : share) q.tv += 0.5 * std::abs(s - 1.0 / static_cast<double>(k));
  return q;
}

std::string cell(const Quality& q) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g / %.3f", q.spread, q.tv);
  return buf;
}

// ---------------------------------------------------------------------------------------
// CLD on the 8-Gaussian ring.

struct CldCase {
  const char* name;
  diffgrad::gddim::CldGddimOptions options;
};

Quality cld_run(const diffgrad::gddim::CldSchedule& schedule, const Means& means, double std,
                const CldCase& c, int nfe, std::int64_t n) {
  using namespace diffgrad::gddim;
  const Backend backend;
  CldGddimOptions o = c.options;
  const CldGddim scheme(schedule, cld_quadratic_grid(schedule, nfe), o);
  CldMixture<double> model(schedule, means, Eigen::VectorXd::Constant(means.rows(), std), {},
                           o.parameterisation);
  State u(n, 2 * means.cols());
  draw_cld_prior(backend, schedule, u, 1234);
  diffgrad::SamplerWorkspace<Backend> ws(backend, scheme.history(), scheme.stages(), n, u.cols());
  diffgrad::SampleOptions so;
  so.seed = 99;
  diffgrad::run_scheme(scheme, backend, std::span<const diffgrad::Node>(scheme.nodes()),
                       diffgrad::NodeAtLambda(scheme), diffgrad::EpsField<CldMixture<double>>{model},
                       u, ws, so);
  const State x = cld_data_half(u);
  return quality(x, means, std);
}

void cld_tables(std::int64_t n) {
  using namespace diffgrad::gddim;
  const CldSchedule schedule{CldParams{}};
  const double std = 0.05;
  Means means(8, 2);
  for (int k = 0; k < 8; ++k) {
    means(k, 0) = 2.0 * std::cos(2.0 * std::numbers::pi * k / 8.0);
    means(k, 1) = 2.0 * std::sin(2.0 * std::numbers::pi * k / 8.0);
  }
  const auto opts = [](int q, double l, CldMethod m, CldParameterisation p) {
    CldGddimOptions o;
    o.order = q;
    o.stochasticity = l;
    o.method = m;
    o.parameterisation = p;
    return o;
  };
  const CldCase cases[] = {
      {"gDDIM R_t, q = 1", opts(1, 0, CldMethod::exponential, CldParameterisation::R)},
      {"gDDIM R_t, q = 2", opts(2, 0, CldMethod::exponential, CldParameterisation::R)},
      {"gDDIM R_t, q = 3", opts(3, 0, CldMethod::exponential, CldParameterisation::R)},
      {"exponential, Cholesky L_t", opts(1, 0, CldMethod::exponential, CldParameterisation::cholesky)},
      {"Euler PF-ODE", opts(1, 0, CldMethod::euler, CldParameterisation::R)},
      {"Euler-Maruyama reverse SDE (l = 1)", opts(1, 1, CldMethod::euler, CldParameterisation::R)},
  };
  const int nfes[] = {5, 10, 20, 50, 100};
  std::printf("\n### CLD, 8 Gaussians on a ring (d = 2), %lld samples: spread / TV\n\n",
              static_cast<long long>(n));
  std::printf("| sampler | NFE 5 | 10 | 20 | 50 | 100 |\n|---|---|---|---|---|---|\n");
  for (const CldCase& c : cases) {
    std::printf("| %s |", c.name);
    for (int nfe : nfes) std::printf(" %s |", cell(cld_run(schedule, means, std, c, nfe, n)).c_str());
    std::printf("\n");
    std::fflush(stdout);
  }
  std::printf("\n### CLD, stochasticity sweep at NFE 50: spread / TV\n\n");
  std::printf("| sampler | l = 0 | 0.1 | 0.3 | 0.5 | 0.7 | 1.0 |\n|---|---|---|---|---|---|---|\n");
  const double ls[] = {0.0, 0.1, 0.3, 0.5, 0.7, 1.0};
  for (const CldMethod m : {CldMethod::exponential, CldMethod::euler}) {
    std::printf("| %s |", m == CldMethod::exponential ? "gDDIM (R_t)" : "Euler-Maruyama");
    for (double l : ls)
      std::printf(" %s |",
                  cell(cld_run(schedule, means, std, {"", opts(1, l, m, CldParameterisation::R)},
                               50, n))
                      .c_str());
    std::printf("\n");
    std::fflush(stdout);
  }
}

// ---------------------------------------------------------------------------------------
// BDM on 8x8 digit images.

Means digit_means() {
  Means means = Means::Constant(10, 64, -1.0);
  for (int digit = 0; digit < 10; ++digit) {
    const auto& glyph = examples::kFont5x7[digit];
    for (int row = 0; row < 7; ++row)
      for (int col = 0; col < 5; ++col)
        if ((glyph.rows[static_cast<std::size_t>(row)] >> (4 - col)) & 1)
          means(digit, (row + 0) * 8 + (col + 1)) = 1.0;
  }
  return means;
}


Quality bdm_run(const diffgrad::gddim::BdmSchedule<>& schedule, const Means& means, double std,
                const diffgrad::gddim::BdmGddimOptions& o, int nfe, std::int64_t n) {
  using namespace diffgrad::gddim;
  const Backend backend;
  const BdmGddim<Backend> scheme(backend, schedule,
                                 bdm_quadratic_grid(schedule, nfe), o);
  diffgrad::models::BdmGaussianMixture<> model(schedule, means,
                                               Eigen::VectorXd::Constant(means.rows(), std),
                                               Eigen::VectorXd::Ones(means.rows()));
  diffgrad::SampleOptions so;
  so.seed = 7;
  const State x = sample_bdm(scheme, backend, model, n, 4321, so);
  return quality(x, means, std);
}

void bdm_tables(std::int64_t n) {
  using namespace diffgrad::gddim;
  const BdmSchedule<> schedule(8, 8);
  const Means means = digit_means();
  const double std = 0.1;
  const auto opts = [](int q, double l, BdmMethod m) {
    BdmGddimOptions o;
    o.order = q;
    o.stochasticity = l;
    o.method = m;
    return o;
  };
  struct Case {
    const char* name;
    BdmGddimOptions o;
  };
  const Case cases[] = {
      {"gDDIM, q = 1", opts(1, 0, BdmMethod::gddim)},
      {"gDDIM, q = 2", opts(2, 0, BdmMethod::gddim)},
      {"gDDIM, q = 3", opts(3, 0, BdmMethod::gddim)},
      {"gDDIM, l = 1 (ancestral per frequency)", opts(1, 1, BdmMethod::gddim)},
      {"Euler PF-ODE", opts(1, 0, BdmMethod::euler)},
      {"Euler-Maruyama reverse SDE (l = 1)", opts(1, 1, BdmMethod::euler)},
  };
  const int nfes[] = {5, 10, 20, 50, 100};
  std::printf("\n### BDM, 8x8 digit mixture (10 modes, std 0.1), %lld samples: spread / TV\n\n",
              static_cast<long long>(n));
  std::printf("| sampler | NFE 5 | 10 | 20 | 50 | 100 |\n|---|---|---|---|---|---|\n");
  for (const Case& c : cases) {
    std::printf("| %s |", c.name);
    for (int nfe : nfes) std::printf(" %s |", cell(bdm_run(schedule, means, std, c.o, nfe, n)).c_str());
    std::printf("\n");
    std::fflush(stdout);
  }
  std::printf("\n### BDM, stochasticity sweep at NFE 50: spread / TV\n\n");
  std::printf("| sampler | l = 0 | 0.1 | 0.3 | 0.5 | 0.7 | 1.0 |\n|---|---|---|---|---|---|---|\n");
  const double ls[] = {0.0, 0.1, 0.3, 0.5, 0.7, 1.0};
  for (const BdmMethod m : {BdmMethod::gddim, BdmMethod::euler}) {
    std::printf("| %s |", m == BdmMethod::gddim ? "gDDIM" : "Euler-Maruyama");
    for (double l : ls) std::printf(" %s |", cell(bdm_run(schedule, means, std, opts(1, l, m), 50, n)).c_str());
    std::printf("\n");
    std::fflush(stdout);
  }
}

} // namespace

int main(int argc, char** argv) {
  const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 4000;
  if (n < 1) {
    std::fprintf(stderr, "usage: gddim_quality [samples >= 1]\n");
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  cld_tables(n);
  bdm_tables(n);
  std::printf("\n(%.1f s)\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}
