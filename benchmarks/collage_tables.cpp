// DiffCollage (models/collage.hpp) tables for benchmarks/RESULTS.md section 7:
//
//   build/benchmarks/collage_tables [repeats]      (default 3 timing repeats; ~1 minute)
//
// Data: a stationary 1-D AR(1) signal, corr(x_i, x_j) = rho^|i - j| (rho = 0.9), unit variance.
// It is Markov, so a chain of windows composes EXACTLY at the data level (the Bethe formula is
// exact on a tree at sigma = 0); every error below comes from composing NOISY marginals and from
// the sampler. The piece models are exact: eps of N(0, S_window), eps = sigma (alpha^2 S +
// sigma^2 I)^{-1} x. VP linear schedule, uniform t grid 1 -> 1e-3, prior N(0, I).
//
// Every sampler here is linear in its Gaussian inputs (x_T and, for outpainting, the noise of
// the replaced part), so the output covariance is computed EXACTLY, without Monte Carlo: run
// the sampler on the identity batch (one row per scalar input), M = outputs, C = M^T M.
//
// (i)   time per sampler step vs the number of pieces (windows of 64 overlapping by 32, batch
//       16, DPM-Solver++(2M)); beside it the exact dense model of the whole strip (D x D).
// (ii)  seam quality vs steps: KL(sampled window law || true window law) for windows aligned
//       with a piece and windows straddling a seam (shifted by half a step), and a single
//       window sampled alone (the sampler's own error). Chain of 16 windows of 8 overlapping
//       by 4, DDIM; and the loop of 16 such windows (D = 64).
// (iii) correlation vs lag on the same chain (D = 68): DiffCollage with DDIM at 25 steps and
//       at 1000 steps (the PF-ODE limit), and replacement outpainting (window by window, the
//       known half replaced by alpha_t y + sigma_t z at every step, fresh z), DDIM 25 / 200.
#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/collage.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/dpm_solver_multistep.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace {

using Backend = diffgrad::EigenBackend<double>;
using State = Backend::state_type;
using Matrix = Eigen::MatrixXd;
namespace m = diffgrad::models;

constexpr double kRho = 0.9;

Matrix ar1(Eigen::Index n, double rho) {
  Matrix S(n, n);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < n; ++j)
      S(i, j) = std::pow(rho, static_cast<double>(std::abs(i - j)));
  return S;
}

/// Exact eps of N(0, S): sigma x (alpha^2 S + sigma^2 I)^{-1}. The matrix is cached per noise
/// level (nodes repeat across steps and runs), so a call is one product.
class GaussianWindow {
public:
  explicit GaussianWindow(const Matrix& S) {
    const Eigen::SelfAdjointEigenSolver<Matrix> es(S);
    V_ = es.eigenvectors();
    lambda_ = es.eigenvalues();
  }
  std::int64_t dim() const { return V_.rows(); }
  std::int64_t cond_size() const { return 0; }
  std::int64_t param_size() const { return 0; }
  const Matrix& gain(double alpha, double sigma) const {
    auto [it, fresh] = cache_.try_emplace({alpha, sigma});
    if (fresh) {
      const Eigen::VectorXd d =
          (sigma * (alpha * alpha * lambda_.array() + sigma * sigma).inverse()).matrix();
      it->second = V_ * d.asDiagonal() * V_.transpose();
    }
    return it->second;
  }
  void eps(const State& x, const diffgrad::Node& n, State& out) const {
    out.noalias() = x * gain(n.alpha, n.sigma); // symmetric
  }

private:
  Matrix V_;
  Eigen::VectorXd lambda_;
  mutable std::map<std::pair<double, double>, Matrix> cache_;
};

std::vector<diffgrad::Node> grid(int steps) {
  const diffgrad::VPLinearSchedule schedule;
  return diffgrad::make_nodes(schedule, diffgrad::uniform_t_grid(schedule, steps, 1.0, 1e-3));
}

/// DiffCollage with DDIM on a chain: the output covariance M^T M (identity batch of x_T).
Matrix collage_covariance(int pieces, int width, int overlap, int steps) {
  const Backend backend;
  GaussianWindow window(ar1(width, kRho)), over(ar1(overlap, kRho));
  const auto graph = m::chain_graph(pieces, width, overlap);
  const auto d = graph.dim();
  m::Collage<Backend, GaussianWindow> collage(backend, graph, {&window, &over}, d);
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes = grid(steps);
  State x = State::Identity(d, d);
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, collage, x);
  return x.transpose() * x;
}

/// The same on a loop of `pieces` windows (every seam, the wrap-around one included, alike).
Matrix loop_covariance(int pieces, int width, int overlap, int steps) {
  const Backend backend;
  GaussianWindow window(ar1(width, kRho)), over(ar1(overlap, kRho));
  const auto graph = m::loop_graph({pieces, width, overlap, 1, 1});
  const auto d = graph.dim();
  m::Collage<Backend, GaussianWindow> collage(backend, graph, {&window, &over}, d);
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes = grid(steps);
  State x = State::Identity(d, d);
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, collage, x);
  return x.transpose() * x;
}

/// Hand-written DDIM on one window of `width` with the exact model, where the first `known`
/// columns are replaced at every step by alpha_t y + sigma_t z. `x` (rows: inputs) holds x_T
/// on entry and the sample on exit; `y` the known values, `z[i]` step i's noise (rows x known).
void ddim_replace(const GaussianWindow& model, const std::vector<diffgrad::Node>& nodes, State& x,
                  const State& y, const std::vector<State>& z, int known) {
  State eps(x.rows(), x.cols());
  for (std::size_t i = 0; i + 1 < nodes.size(); ++i) {
    const auto& s = nodes[i];
    const auto& t = nodes[i + 1];
    if (known > 0) x.leftCols(known) = s.alpha * y + s.sigma * z[i];
    model.eps(x, s, eps);
    x = (t.alpha / s.alpha) * (x - s.sigma * eps) + t.sigma * eps;
  }
  if (known > 0) x.leftCols(known) = y;
}

/// Replacement outpainting on the chain: window 0 by DDIM, then each next window by DDIM with
/// its first `overlap` columns replaced (known: the previous window's last columns). Exact
/// covariance: one identity row per scalar Gaussian input (x_T of each window's new part and
/// the replacement noise of every step).
Matrix outpaint_covariance(int pieces, int width, int overlap, int steps) {
  GaussianWindow window(ar1(width, kRho));
  const auto nodes = grid(steps);
  const int fresh = width - overlap;
  const int d = width + (pieces - 1) * fresh;
  const int inputs = width + (pieces - 1) * (fresh + steps * overlap);
  State out = State::Zero(inputs, d);
  int next_input = 0;
  auto take = [&](int cols) { // `cols` fresh standard-normal inputs as identity columns
    State e = State::Zero(inputs, cols);
    for (int c = 0; c < cols; ++c) e(next_input + c, c) = 1.0;
    next_input += cols;
    return e;
  };
  State x = take(width);
  ddim_replace(window, nodes, x, State(), {}, 0);
  out.leftCols(width) = x;
  for (int p = 1; p < pieces; ++p) {
    const int c0 = p * fresh;
    const State y = out.middleCols(c0, overlap);
    State w(inputs, width);
    w.rightCols(fresh) = take(fresh);
    std::vector<State> z;
    for (int i = 0; i < steps; ++i) z.push_back(take(overlap));
    ddim_replace(window, nodes, w, y, z, overlap);
    out.middleCols(c0 + overlap, fresh) = w.rightCols(fresh);
  }
  return out.transpose() * out;
}

/// Mean over positions of corr(x_i, x_{i+k}).
double mean_corr(const Matrix& C, int k) {
  double s = 0;
  const Eigen::Index n = C.rows() - k;
  for (Eigen::Index i = 0; i < n; ++i) s += C(i, i + k) / std::sqrt(C(i, i) * C(i + k, i + k));
  return s / static_cast<double>(n);
}

/// KL(N(0, C) || N(0, S)).
double kl(const Matrix& C, const Matrix& S) {
  const Eigen::LLT<Matrix> ls(S), lc(C);
  const double logdet_s = 2 * ls.matrixLLT().diagonal().array().log().sum();
  const double logdet_c = 2 * lc.matrixLLT().diagonal().array().log().sum();
  return 0.5 * ((ls.solve(C)).trace() - static_cast<double>(C.rows()) + logdet_s - logdet_c);
}

void table_time(int repeats) {
  std::printf("\n### (i) Time per sampler step vs number of pieces\n\n");
  std::printf("Windows of 64 overlapping by 32 (exact Gaussian window eps, one 64 x 64 product per "
              "piece), batch 16, DPM-Solver++(2M) 20 steps, best of %d runs; the dense column "
              "is the exact model of the whole strip (one D x D product).\n\n",
              repeats);
  std::printf("| pieces | D | collage ms/step | us/step per piece | dense ms/step |\n");
  std::printf("|---:|---:|---:|---:|---:|\n");
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const int steps = 20, batch = 16, width = 64, overlap = 32;
  const auto nodes = grid(steps);
  GaussianWindow window(ar1(width, kRho)), over(ar1(overlap, kRho));
  for (int pieces : {2, 4, 8, 16, 32, 64}) {
    const auto graph = m::chain_graph(pieces, width, overlap);
    const auto d = graph.dim();
    m::Collage<Backend, GaussianWindow> collage(backend, graph, {&window, &over}, batch);
    GaussianWindow dense(ar1(d, kRho));
    State x0(batch, d);
    backend.gaussian(x0, 1, 0);
    auto best = [&](auto& model) {
      double t_best = 1e300;
      for (int r = 0; r < repeats; ++r) {
        State x = x0;
        const auto t0 = std::chrono::steady_clock::now();
        diffgrad::sample(diffgrad::DpmSolverMultistep(), backend, schedule, nodes, model, x);
        t_best = std::min(
            t_best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      return 1e3 * t_best / steps;
    };
    (void)best(collage); // warm the per-node caches
    (void)best(dense);
    const double tc = best(collage), td = best(dense);
    std::printf("| %d | %lld | %.3f | %.1f | %.3f |\n", pieces, static_cast<long long>(d), tc,
                1e3 * tc / pieces, td);
  }
}

void table_seams() {
  const int pieces = 16, width = 8, overlap = 4, step = width - overlap;
  std::printf("\n### (ii) Seam quality vs number of steps\n\n");
  std::printf("AR(1), rho = %.1f, chain of %d windows of %d overlapping by %d (D = %d), DDIM. "
              "KL(sampled law of an %d-coordinate window || true law), exact (no Monte "
              "Carlo), averaged over the windows of each kind; 0 = exact.\n\n",
              kRho, pieces, width, overlap, width + (pieces - 1) * step, width);
  std::printf(
      "| steps | one window alone | collage: piece-aligned windows | collage: "
      "seam-straddling windows | collage: worst window | loop of 16: aligned / straddling |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  const Matrix S = ar1(width, kRho);
  for (int steps : {5, 10, 25, 50, 100, 1000}) {
    const Matrix alone = collage_covariance(1, width, overlap, steps);
    const Matrix C = collage_covariance(pieces, width, overlap, steps);
    double aligned = 0, straddling = 0, worst = 0;
    int na = 0, ns = 0;
    for (Eigen::Index s = 0; s + width <= C.rows(); ++s) {
      const double v = kl(C.block(s, s, width, width), S);
      worst = std::max(worst, v);
      if (s % step == 0) aligned += v, ++na;
      if (s % step == step / 2) straddling += v, ++ns;
    }
    // The loop: windows at every offset, wrapped (its law is invariant under rotation by a
    // step, so the wrap-around seam is like every other seam).
    const Matrix L = loop_covariance(pieces, width, overlap, steps);
    const Eigen::Index n = L.rows();
    double loop_aligned = 0, loop_straddling = 0;
    for (Eigen::Index s = 0; s < n; ++s) {
      Matrix w(width, width);
      for (int i = 0; i < width; ++i)
        for (int j = 0; j < width; ++j) w(i, j) = L((s + i) % n, (s + j) % n);
      const double v = kl(w, S);
      if (s % step == 0) loop_aligned += v / pieces;
      if (s % step == step / 2) loop_straddling += v / pieces;
    }
    std::printf("| %d | %.4f | %.4f | %.4f | %.4f | %.4f / %.4f |\n", steps, kl(alone, S),
                aligned / na, straddling / ns, worst, loop_aligned, loop_straddling);
  }
}

void table_lags() {
  const int pieces = 16, width = 8, overlap = 4;
  std::printf("\n### (iii) Correlation vs lag: DiffCollage vs replacement outpainting\n\n");
  std::printf(
      "Same chain (D = 68). Mean over positions of corr(x_i, x_{i+k}) of the exact "
      "output covariance; the error column is sampled - true. DDIM for both methods; "
      "1000 steps is the PF-ODE limit of DiffCollage (outpainting: 200 steps, its exact "
      "covariance needs one input row per replaced noise value). Lag 0: the mean variance.\n\n");
  const Matrix c25 = collage_covariance(pieces, width, overlap, 25);
  const Matrix c1000 = collage_covariance(pieces, width, overlap, 1000);
  const Matrix o25 = outpaint_covariance(pieces, width, overlap, 25);
  const Matrix o200 = outpaint_covariance(pieces, width, overlap, 200);
  std::printf("| lag k | true rho^k | collage 25 | collage 1000 (ODE) | outpaint 25 | outpaint "
              "200 |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  auto var = [](const Matrix& C) {
    const double v = C.diagonal().mean();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3f (%+.3f)", v, v - 1.0);
    return std::string(buf);
  };
  std::printf("| 0 (variance) | 1 | %s | %s | %s | %s |\n", var(c25).c_str(), var(c1000).c_str(),
              var(o25).c_str(), var(o200).c_str());
  for (int k : {1, 2, 4, 8, 16, 32}) {
    const double t = std::pow(kRho, k);
    auto cell = [&](const Matrix& C) {
      const double v = mean_corr(C, k);
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.3f (%+.3f)", v, v - t);
      return std::string(buf);
    };
    std::printf("| %d | %.3f | %s | %s | %s | %s |\n", k, t, cell(c25).c_str(), cell(c1000).c_str(),
                cell(o25).c_str(), cell(o200).c_str());
  }
}

/// The hand-written DDIM (outpainting) must be the library's DDIM when nothing is replaced.
bool self_check() {
  const Backend backend;
  const diffgrad::VPLinearSchedule schedule;
  const auto nodes = grid(10);
  GaussianWindow window(ar1(8, kRho));
  State a(3, 8);
  backend.gaussian(a, 5, 0);
  State b = a;
  diffgrad::sample(diffgrad::Ddim(), backend, schedule, nodes, window, a);
  ddim_replace(window, nodes, b, State(), {}, 0);
  const double err = (a - b).cwiseAbs().maxCoeff() / a.cwiseAbs().maxCoeff();
  if (!(err <= 1e-12)) {
    std::fprintf(stderr, "collage_tables: hand-written DDIM differs from the library's (%.3g)\n",
                 err);
    return false;
  }
  return true;
}

} // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 3;
  if (!self_check()) return 1;
  const auto t0 = std::chrono::steady_clock::now();
  table_time(repeats);
  table_seams();
  table_lags();
  std::printf("\n(total %.1f s)\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}
