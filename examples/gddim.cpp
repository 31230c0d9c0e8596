// gDDIM on non-isotropic diffusions: sampling the 8x8 digits with the critically-damped
// Langevin diffusion (CLD: a velocity channel beside every pixel, 2x2 block coefficients) and
// with the blurring diffusion (BDM: diagonal in the 2-D DCT basis, per-frequency
// coefficients), from the EXACT eps of the data set (a mixture of point masses on the training
// images, models/cld_mixture.hpp and models/bdm_mixture.hpp), so every difference between the
// rows is the sampler's.
//
// Rows of the PNG (same NFE for all): gDDIM with R_t (q = 1 and 2) against the Cholesky
// parameterisation L_t and the Euler / Euler-Maruyama baselines for CLD; gDDIM (q = 1, 2) and
// Euler for BDM. Printed per row: the RMS pixel distance of each sample to its nearest
// training image (0 = the sampler landed on the data; the exact model memorises by definition).
// Exits non-zero if a sample is not finite, so ctest runs it.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/digits.hpp"
#include "common/image_grid.hpp"
#include "common/main_guard.hpp"
#include "common/png_writer.hpp"
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

struct Args {
  int steps = 20;
  int batch = 10;
  int seed = 0;
  int per_class = 40;
  std::string out = examples::default_output_path("gddim.png");
  std::string data = examples::default_digits_path();
};

/// Median over the samples of the RMS pixel distance to the nearest training image.
double nearest_distance(const State& x, const Means& data) {
  std::vector<double> d(static_cast<std::size_t>(x.rows()));
  for (Eigen::Index r = 0; r < x.rows(); ++r)
    d[static_cast<std::size_t>(r)] =
        std::sqrt((data.rowwise() - x.row(r)).rowwise().squaredNorm().minCoeff() /
                  static_cast<double>(x.cols()));
  std::nth_element(d.begin(), d.begin() + static_cast<std::ptrdiff_t>(d.size() / 2), d.end());
  return d[d.size() / 2];
}

struct Row {
  std::string label;
  State images;
};

State sample_cld(const Args& a, const Means& data, const diffgrad::gddim::CldGddimOptions& o) {
  using namespace diffgrad::gddim;
  const Backend backend;
  const CldSchedule schedule{CldParams{}};
  const CldGddim scheme(schedule, cld_quadratic_grid(schedule, a.steps), o);
  CldMixture<double> model(schedule, data, Eigen::VectorXd::Zero(data.rows()), {},
                           o.parameterisation);
  State u(a.batch, 2 * data.cols());
  draw_cld_prior(backend, schedule, u, static_cast<std::uint64_t>(a.seed));
  diffgrad::SamplerWorkspace<Backend> ws(backend, scheme.history(), scheme.stages(), u.rows(),
                                         u.cols());
  diffgrad::SampleOptions so;
  so.seed = static_cast<std::uint64_t>(a.seed) + 1;
  diffgrad::run_scheme(scheme, backend, std::span<const diffgrad::Node>(scheme.nodes()),
                       diffgrad::NodeAtLambda(scheme),
                       diffgrad::EpsField<CldMixture<double>>{model}, u, ws, so);
  return cld_data_half(u);
}

State sample_bdm_digits(const Args& a, const Means& data,
                        const diffgrad::gddim::BdmGddimOptions& o) {
  using namespace diffgrad::gddim;
  const Backend backend;
  const BdmSchedule<> schedule(8, 8);
  const BdmGddim<Backend> scheme(backend, schedule, bdm_quadratic_grid(schedule, a.steps), o);
  diffgrad::models::BdmGaussianMixture<> model(schedule, data, Eigen::VectorXd::Zero(data.rows()),
                                               Eigen::VectorXd::Ones(data.rows()));
  diffgrad::SampleOptions so;
  so.seed = static_cast<std::uint64_t>(a.seed) + 1;
  return sample_bdm(scheme, backend, model, a.batch, static_cast<std::uint64_t>(a.seed), so);
}

int run(const Args& a) {
  const examples::Digits digits = examples::subset_per_class(examples::load_digits(a.data),
                                                             a.per_class);
  const Means data = digits.images;
  using namespace diffgrad::gddim;
  const auto cld = [](int q, CldMethod m, CldParameterisation p, double l) {
    CldGddimOptions o;
    o.order = q;
    o.method = m;
    o.parameterisation = p;
    o.stochasticity = l;
    return o;
  };
  const auto bdm = [](int q, BdmMethod m) {
    BdmGddimOptions o;
    o.order = q;
    o.method = m;
    return o;
  };
  const std::string n = " " + std::to_string(a.steps);
  std::vector<Row> rows;
  const auto t_start = std::chrono::steady_clock::now();
  rows.push_back({"CLD GDDIM R Q1" + n,
                  sample_cld(a, data, cld(1, CldMethod::exponential, CldParameterisation::R, 0))});
  rows.push_back({"CLD GDDIM R Q2" + n,
                  sample_cld(a, data, cld(2, CldMethod::exponential, CldParameterisation::R, 0))});
  rows.push_back({"CLD CHOLESKY L" + n,
                  sample_cld(a, data,
                             cld(1, CldMethod::exponential, CldParameterisation::cholesky, 0))});
  rows.push_back({"CLD EULER ODE" + n,
                  sample_cld(a, data, cld(1, CldMethod::euler, CldParameterisation::R, 0))});
  rows.push_back({"CLD EULER-M SDE" + n,
                  sample_cld(a, data, cld(1, CldMethod::euler, CldParameterisation::R, 1))});
  rows.push_back({"BDM GDDIM Q1" + n, sample_bdm_digits(a, data, bdm(1, BdmMethod::gddim))});
  rows.push_back({"BDM GDDIM Q2" + n, sample_bdm_digits(a, data, bdm(2, BdmMethod::gddim))});
  rows.push_back({"BDM EULER ODE" + n, sample_bdm_digits(a, data, bdm(1, BdmMethod::euler))});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

  std::printf("gDDIM on the digits (%lld training images, exact mixture eps), NFE %d, "
              "batch %d, %.2f s in all\n",
              static_cast<long long>(data.rows()), a.steps, a.batch, seconds);
  std::printf("%-22s %s\n", "sampler", "median RMS distance to the nearest training image");
  examples::ImageGrid grid(8, 8, a.batch, 6);
  grid.set_title("GDDIM: CLD AND BDM, EXACT MIXTURE EPS");
  bool finite = true;
  for (const Row& r : rows) {
    finite = finite && r.images.allFinite();
    std::printf("%-22s %.4f\n", r.label.c_str(), nearest_distance(r.images, data));
    grid.add_row(r.images.cwiseMax(-1.0).cwiseMin(1.0).eval(), r.label);
  }
  grid.write(a.out);
  std::printf("wrote %s\n", a.out.c_str());
  if (!finite) {
    std::fprintf(stderr, "gddim: a sample is not finite\n");
    return 1;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("gddim", "gDDIM for CLD and blurring diffusion on the digits, exact models");
  cli.option("--steps", a.steps, "model evaluations (steps) per sampler", 1, 100000);
  cli.option("--batch", a.batch, "samples per sampler (one PNG row each)", 1, 10000);
  cli.option("--seed", a.seed, "seed of the priors and the noise", 0);
  cli.option("--per-class", a.per_class, "training images per digit in the mixture", 1, 10000);
  cli.option("--out", a.out, "PNG file of the samples");
  cli.option("--data", a.data, "digits data file");
  if (!cli.parse(argc, argv)) return 2;
  return examples::run_main("gddim", [&] { return run(a); });
}
