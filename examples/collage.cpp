// DiffCollage: long content from a model of short windows (models/collage.hpp).
//
// The data are a stationary Gaussian texture, 8 rows high: separable AR(1) correlation
// rho_row^|dr| rho_col^|dc| (a vector AR(1) process along the columns, so it is Markov in the
// column index). The piece models are EXACT: the eps of N(0, S) for an 8 x 8 window and for its
// 8 x 4 overlap, eps = sigma (alpha^2 S + sigma^2 I)^{-1} x. Data with this local structure is
// what DiffCollage composes correctly at the data level; mixtures of a few whole strips do
// not (neighbouring windows then pick different strips, docs/collage.md section 3).
//
// Rows of the PNG (DPM-Solver++(2M), VP linear schedule):
//   (a) a long strip: 23 windows of 8 x 8 overlapping by 4 (8 x 96);
//   (b) a 360-degree loop of 12 windows (8 x 48), drawn twice side by side so the wrap-around
//       seam sits in the middle of the picture and at both ends;
//   (c) guidance through the sampler: the strip's x_T is moved along dL/dx_T (the library's
//       exact discrete adjoint through the collage) to brighten columns 40..55; before/after;
//   (d) a visual demo with digits: the exact piece models of ALL 8 x 8 windows (and 8 x 4
//       overlaps) of one long strip of digit glyphs (0123456789...), a stationary Dirac mixture.
//       Labelled as a demo: neighbouring windows may pick different offsets of the training
//       strip, so the long strip shows plausible glyph fragments, not a copy of the data.
// Printed: the lag-1 column correlation of each row (true rho_col), the bright region's mean
// before/after, and a finite-difference check of the gradient.
// Exits non-zero if a sample is not finite, the gradient disagrees with finite differences,
// or the guidance fails to brighten the region, so ctest runs it.
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/image_grid.hpp"
#include "common/main_guard.hpp"
#include "common/png_writer.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/models/collage.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "common/font5x7.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Vector = Backend::vector_type;
namespace m = diffgrad::models;

constexpr int kHeight = 8, kWindow = 8, kOverlap = 4;

struct Args {
  int steps = 25;
  int batch = 2;
  int seed = 0;
  int strip_pieces = 23; // width 8 + 22 * 4 = 96
  int loop_pieces = 12;  // width 12 * 4 = 48, drawn twice
  int iterations = 6;
  double rho_row = 0.8, rho_col = 0.85;
  std::string out = examples::default_output_path("collage.png");
};

/// Exact eps (and its VJP) of zero-mean Gaussian data N(0, S), from S's eigendecomposition:
/// eps = sigma x V diag(1 / (alpha^2 lambda + sigma^2)) V^T (rows are samples).
struct GaussianWindow {
  Eigen::MatrixXd V;
  Eigen::VectorXd lambda;
  explicit GaussianWindow(const Eigen::MatrixXd& S) {
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(S);
    V = es.eigenvectors();
    lambda = es.eigenvalues();
  }
  std::int64_t dim() const { return V.rows(); }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  Eigen::MatrixXd precision(const diffgrad::Node& n) const {
    const Eigen::VectorXd d =
        (n.alpha * n.alpha * lambda.array() + n.sigma * n.sigma).inverse().matrix();
    return V * d.asDiagonal() * V.transpose();
  }
  void eps(const State& x, const diffgrad::Node& n, State& out) const {
    out.noalias() = n.sigma * (x * precision(n)); // symmetric: its own transpose
  }
  void vjp(const State&, const diffgrad::Node& n, const State& a, State& dx, Vector*,
           Vector*) const {
    dx.noalias() = n.sigma * (a * precision(n));
  }
};

/// Separable AR(1) covariance of a height x width block, layout r * width + c.
Eigen::MatrixXd texture_covariance(int height, int width, double rho_row, double rho_col) {
  const int n = height * width;
  Eigen::MatrixXd S(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      S(i, j) = std::pow(rho_row, std::abs(i / width - j / width)) *
                std::pow(rho_col, std::abs(i % width - j % width));
  return S;
}

/// Lag-1 correlation along the columns, averaged over rows, positions and samples (the
/// texture is stationary with unit variance: E[x_c x_{c+1}] = rho_col); `wrap` for loops.
double lag1_column_correlation(const State& x, int width, bool wrap) {
  double sum = 0, sq = 0;
  long count = 0;
  for (Eigen::Index b = 0; b < x.rows(); ++b)
    for (int r = 0; r < kHeight; ++r)
      for (int c = 0; c < width - (wrap ? 0 : 1); ++c) {
        const double u = x(b, r * width + c), v = x(b, r * width + (c + 1) % width);
        sum += u * v;
        sq += 0.5 * (u * u + v * v);
        ++count;
      }
  return count > 0 ? sum / sq : 0.0;
}

/// Mean of the columns [c0, c1) of every row of sample b.
/// One long training strip, kHeight rows, of the digit glyphs 0123456789 repeated (6 columns
/// per glyph: 5 of glyph, 1 of spacing; pixels -1 background, +1 ink), at least `width` wide.
Eigen::MatrixXd digit_strip(int width) {
  const int glyphs = (width + 5) / 6 + 1;
  Eigen::MatrixXd img = Eigen::MatrixXd::Constant(kHeight, glyphs * 6, -1.0);
  for (int g = 0; g < glyphs; ++g) {
    const auto& glyph = examples::kFont5x7[g % 10];
    for (int r = 0; r < 7; ++r)
      for (int c = 0; c < 5; ++c)
        if ((glyph.rows[static_cast<std::size_t>(r)] >> (4 - c)) & 1) img(r, g * 6 + c) = 1.0;
  }
  return img;
}

/// Every kHeight x w crop of `img` at every column offset, one row-major crop per row.
State all_crops(const Eigen::MatrixXd& img, int w) {
  const auto offsets = static_cast<Eigen::Index>(img.cols() - w + 1);
  State out(offsets, kHeight * w);
  for (Eigen::Index o = 0; o < offsets; ++o)
    for (int r = 0; r < kHeight; ++r)
      for (int c = 0; c < w; ++c) out(o, r * w + c) = img(r, o + c);
  return out;
}

double region_mean(const State& x, Eigen::Index b, int width, int c0, int c1) {
  double s = 0;
  for (int r = 0; r < kHeight; ++r)
    for (int c = c0; c < c1; ++c) s += x(b, r * width + c);
  return s / (kHeight * (c1 - c0));
}

int run(const Args& a) {
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes =
      diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, a.steps, 1.0, 1e-3));
  const std::span<const diffgrad::Node> node_span(nodes);
  const diffgrad::DpmSolverMultistep solver;
  GaussianWindow window(texture_covariance(kHeight, kWindow, a.rho_row, a.rho_col));
  GaussianWindow overlap(texture_covariance(kHeight, kOverlap, a.rho_row, a.rho_col));

  // (a) the long strip.
  const m::StripShape strip_shape{a.strip_pieces, kWindow, kOverlap, kHeight, 1};
  m::Collage<Backend, GaussianWindow> strip(backend, m::strip_graph(strip_shape),
                                            {&window, &overlap}, a.batch);
  const int strip_w = static_cast<int>(m::strip_width(strip_shape));
  State x_T(a.batch, strip.dim());
  backend.gaussian(x_T, static_cast<std::uint64_t>(a.seed), 0);
  State strip_x = x_T;
  diffgrad::sample(solver, backend, schedule, nodes, strip, strip_x);

  // (b) the loop, drawn twice side by side.
  const m::StripShape loop_shape{a.loop_pieces, kWindow, kOverlap, kHeight, 1};
  m::Collage<Backend, GaussianWindow> loop(backend, m::loop_graph(loop_shape), {&window, &overlap},
                                           a.batch);
  const int loop_w = static_cast<int>(m::loop_width(loop_shape));
  State loop_x(a.batch, loop.dim());
  backend.gaussian(loop_x, static_cast<std::uint64_t>(a.seed) + 1, 0);
  diffgrad::sample(solver, backend, schedule, nodes, loop, loop_x);
  State loop_twice(a.batch, kHeight * 2 * loop_w);
  for (Eigen::Index b = 0; b < a.batch; ++b)
    for (int r = 0; r < kHeight; ++r)
      for (int c = 0; c < 2 * loop_w; ++c)
        loop_twice(b, r * 2 * loop_w + c) = loop_x(b, r * loop_w + c % loop_w);

  // (c) guidance: brighten columns [c0, c1) of the strip through the sampler. Loss per sample:
  // 0.5 max(0, target - region mean)^2 (zero once the region is bright enough).
  const int c0 = std::min(40, strip_w / 2), c1 = std::min(c0 + 16, strip_w);
  const double target = 1.5;
  const auto loss = [&](const Backend&, const State& x0, State& grad) {
    grad.setZero(x0.rows(), x0.cols());
    double value = 0;
    const double w = 1.0 / (kHeight * (c1 - c0));
    for (Eigen::Index b = 0; b < x0.rows(); ++b) {
      const double gap = std::max(0.0, target - region_mean(x0, b, strip_w, c0, c1));
      value += 0.5 * gap * gap;
      for (int r = 0; r < kHeight; ++r)
        for (int c = c0; c < c1; ++c) grad(b, r * strip_w + c) = -gap * w;
    }
    return value;
  };
  // Finite-difference check of dL/dx_T along a fixed direction (central differences; the
  // sampler is linear in x_T here, so the only error is rounding).
  int failures = 0;
  {
    const auto g = diffgrad::gradient(solver, backend, schedule, node_span, strip, x_T, loss);
    State dir(a.batch, strip.dim());
    backend.gaussian(dir, 99, 0);
    const double h = 1e-3;
    auto loss_at = [&](double s) {
      State x = x_T + s * dir, scratch;
      diffgrad::sample(solver, backend, schedule, nodes, strip, x);
      return loss(backend, x, scratch);
    };
    const double fd = (loss_at(h) - loss_at(-h)) / (2 * h);
    const double exact = (g.grad_x.array() * dir.array()).sum();
    const double rel = std::abs(fd - exact) / std::max(1e-12, std::abs(exact));
    std::printf("gradient check: <dL/dx_T, v> = %.8f, central difference %.8f (relative %.1e)\n",
                exact, fd, rel);
    if (!(rel <= 1e-6)) {
      std::fprintf(stderr, "collage: the gradient disagrees with finite differences\n");
      ++failures;
    }
  }
  // Descent on x_T: each iteration moves every sample's x_T a fixed distance (0.05 sqrt(D))
  // against its gradient (none once the sample reached the target), so x_T stays close to a
  // typical prior draw.
  State guided_T = x_T;
  for (int it = 0; it < a.iterations; ++it) {
    const auto g = diffgrad::gradient(solver, backend, schedule, node_span, strip, guided_T, loss);
    for (Eigen::Index b = 0; b < guided_T.rows(); ++b) {
      const double norm = g.grad_x.row(b).norm();
      if (norm > 0)
        guided_T.row(b) -=
            0.05 * std::sqrt(static_cast<double>(strip.dim())) / norm * g.grad_x.row(b);
    }
  }
  State guided_x = guided_T;
  diffgrad::sample(solver, backend, schedule, nodes, strip, guided_x);

  const double true_lag1 = a.rho_col;
  std::printf("DiffCollage, exact 8x8 Gaussian-texture window model (rho_row %.2f, rho_col %.2f), "
              "DPM-Solver++(2M) %d steps, batch %d\n",
              a.rho_row, a.rho_col, a.steps, a.batch);
  std::printf("lag-1 column correlation (true %.3f): strip %.3f, loop %.3f, guided strip %.3f\n",
              true_lag1, lag1_column_correlation(strip_x, strip_w, false),
              lag1_column_correlation(loop_x, loop_w, true),
              lag1_column_correlation(guided_x, strip_w, false));
  double before = 0, after = 0;
  for (Eigen::Index b = 0; b < a.batch; ++b) {
    before += region_mean(strip_x, b, strip_w, c0, c1) / a.batch;
    after += region_mean(guided_x, b, strip_w, c0, c1) / a.batch;
  }
  std::printf("guided region (columns %d..%d) mean: before %.3f, after %.3f (target %.1f, %d "
              "iterations)\n",
              c0, c1 - 1, before, after, target, a.iterations);

  // (d) the digit demo: exact models of all windows/overlaps of one long glyph strip.
  const Eigen::MatrixXd glyph_strip = digit_strip(strip_w);
  m::DiracMixture<double> digit_window(all_crops(glyph_strip, kWindow));
  m::DiracMixture<double> digit_overlap(all_crops(glyph_strip, kOverlap));
  m::Collage<Backend, m::DiracMixture<double>> digits(backend, m::strip_graph(strip_shape),
                                                     {&digit_window, &digit_overlap}, a.batch);
  State digits_x(a.batch, digits.dim());
  backend.gaussian(digits_x, static_cast<std::uint64_t>(a.seed) + 2, 0);
  diffgrad::sample(solver, backend, schedule, nodes, digits, digits_x);
  std::printf("digit demo: %lld training windows of one glyph strip, sample range [%.2f, %.2f] "
              "(data in [-1, 1]: values beyond are seams where neighbouring windows disagree)\n",
              static_cast<long long>(all_crops(glyph_strip, kWindow).rows()), digits_x.minCoeff(),
              digits_x.maxCoeff());

  examples::ImageGrid grid(kHeight, strip_w, 1, 4, -2.5, 2.5);
  grid.set_title("DIFFCOLLAGE: GAUSSIAN TEXTURE, EXACT 8X8 WINDOW MODEL");
  grid.add_row(strip_x, "A STRIP " + std::to_string(a.strip_pieces) + " WINDOWS");
  if (2 * loop_w == strip_w) grid.add_row(loop_twice, "B LOOP X2, SEAM MID");
  grid.add_row(strip_x, "C BEFORE GUIDANCE");
  grid.add_row(guided_x, "C AFTER: COLS " + std::to_string(c0) + "-" + std::to_string(c1 - 1));
  grid.add_row(digits_x * 2.5, "D DEMO: DIGIT WINDOWS");
  grid.write(a.out);
  std::printf("wrote %s\n", a.out.c_str());

  if (!strip_x.allFinite() || !loop_x.allFinite() || !guided_x.allFinite() ||
      !digits_x.allFinite()) {
    std::fprintf(stderr, "collage: a sample is not finite\n");
    ++failures;
  }
  if (a.iterations > 0 && !(after > before + 0.25)) {
    std::fprintf(stderr, "collage: guidance did not brighten the region (%.3f -> %.3f)\n", before,
                 after);
    ++failures;
  }
  return failures == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  Args a;
  examples::Cli cli("collage", "DiffCollage: a long strip, a loop and guidance through the "
                               "sampler, from an exact window model of a Gaussian texture");
  cli.option("--steps", a.steps, "DPM-Solver++(2M) steps", 2, 100000);
  cli.option("--batch", a.batch, "samples per row", 1, 1000);
  cli.option("--seed", a.seed, "seed of x_T", 0);
  cli.option("--strip-pieces", a.strip_pieces, "windows in the strip (23: width 96)", 2, 10000);
  cli.option("--loop-pieces", a.loop_pieces, "windows in the loop (12: width 48)", 2, 10000);
  cli.option("--iterations", a.iterations, "guidance steps on x_T", 0, 10000);
  cli.option("--rho-row", a.rho_row, "texture correlation between neighbouring rows", 0.0, 0.99);
  cli.option("--rho-col", a.rho_col, "texture correlation between neighbouring columns", 0.0, 0.99);
  cli.option("--out", a.out, "PNG file");
  if (!cli.parse(argc, argv)) return 2;
  return examples::run_main("collage", [&] { return run(a); });
}
