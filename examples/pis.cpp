// pis: the Path Integral Sampler on the 9-mode 2-D Gaussian mixture and Neal's funnel (d = 10,
// x_0 ~ N(0, 9)). Trains PIS-NN and PIS-Grad controls with Adam through the exact discrete
// adjoint of the Euler chain (g = sqrt(0.2), T = 5, N = 100: the official parameterisation),
// then prints a log Z table (bias / std / sqrt(bias^2 + std^2) of the lower bound and of the
// importance-weighted estimate over repeated evaluation batches, and the effective sample
// size), with the closed-form optimal control's row on the mixture, and writes a labelled
// scatter PNG of the samples. Exits 1 when the optimal control's importance-weighted log Z is
// off by more than five of its standard deviations (a broken estimator).
//
//   pis                                   # defaults: 400 Adam steps per configuration
//   pis --iterations 1500 --batch 300     # the official training budget
//   pis --targets mixture --methods grad --out pis.png
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/font5x7.hpp"
#include "common/main_guard.hpp"
#include "common/png_writer.hpp"
#include "common/progress.hpp"
#include "diffgrad/pis/pis.hpp"

namespace {

using namespace diffgrad::pis;

struct Args {
  std::string targets = "mixture,funnel";
  std::string methods = "nn,grad";
  int iterations = 400;
  int batch = 300;
  int steps = 100;
  int eval_samples = 6000;
  int eval_batches = 10;
  int hidden = 64;
  double lr = 5e-3;
  std::uint64_t seed = 1;
  std::string out = examples::default_output_path("pis.png");
  bool no_image = false;
};

bool has(const std::string& list, const std::string& item) {
  std::stringstream ss(list);
  std::string part;
  while (std::getline(ss, part, ','))
    if (part == item) return true;
  return false;
}

struct Row {
  std::string target, method;
  double lb_bias = 0, lb_std = 0, is_bias = 0, is_std = 0, ess = 0, train_seconds = 0;
  int iterations = 0;
  Matrix samples; // the first evaluation batch, for the picture
};

/// Evaluates `control` over `batches` batches of `n` samples: bias and std of both estimates.
template <class C, class T>
Row evaluate(const PathIntegralSampler& pis, C& control, const T& target, const Args& a,
             double log_z) {
  Row row;
  std::vector<double> lb, is;
  double ess = 0;
  examples::ProgressBar bar("evaluating", a.eval_batches);
  for (int k = 0; k < a.eval_batches; ++k) {
    const PisSamples s = pis.sample(control, target, a.eval_samples, 1000003 * (a.seed + 1),
                                    static_cast<std::uint64_t>(k) *
                                        static_cast<std::uint64_t>(a.eval_samples));
    const LogZEstimate e = estimate_log_z(s.log_weights);
    lb.push_back(e.lower_bound - log_z);
    is.push_back(e.importance_weighted - log_z);
    ess += e.ess / a.eval_batches;
    if (k == 0) row.samples = s.x;
    bar.update(k + 1);
  }
  bar.finish();
  const auto stats = [](const std::vector<double>& v, double& mean, double& sd) {
    mean = 0;
    for (double x : v) mean += x / static_cast<double>(v.size());
    double ss = 0;
    for (double x : v) ss += (x - mean) * (x - mean);
    sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0;
  };
  stats(lb, row.lb_bias, row.lb_std);
  stats(is, row.is_bias, row.is_std);
  row.ess = ess;
  return row;
}

template <class C, class T>
Row train_and_evaluate(const PathIntegralSampler& pis, C& control, const T& target,
                       const Args& a, const std::string& label) {
  examples::ProgressBar bar("train " + label, a.iterations);
  const PisTrainResult r =
      pis.train(control, target,
                {.iterations = a.iterations, .batch = a.batch, .learning_rate = a.lr,
                 .seed = a.seed},
                [&](int done, int, double loss) {
                  char note[64];
                  std::snprintf(note, sizeof note, "loss %.4f", loss);
                  bar.update(done, note);
                  return diffgrad::ObserverAction::proceed;
                });
  bar.finish();
  Row row = evaluate(pis, control, target, a, target.log_normalizer());
  row.train_seconds = r.seconds;
  row.iterations = r.iterations_done;
  return row;
}

// ---- the picture: one labelled scatter panel per target -------------------------------------

class Panel {
public:
  static constexpr int kPlot = 360, kLeft = 44, kTop = 40, kRight = 10, kBottom = 40;
  static constexpr int kWidth = kLeft + kPlot + kRight, kHeight = kTop + kPlot + kBottom;

  Panel(const std::string& title, double xlo, double xhi, double ylo, double yhi,
        const std::string& xlabel, const std::string& ylabel)
      : px_(static_cast<std::size_t>(kWidth * kHeight * 3), 255), xlo_(xlo), xhi_(xhi), ylo_(ylo),
        yhi_(yhi) {
    for (int k = -1; k <= kPlot; ++k) {
      set(k, -1, 0, 0, 0);
      set(k, kPlot, 0, 0, 0);
      set(-1, k, 0, 0, 0);
      set(kPlot, k, 0, 0, 0);
    }
    for (int i = 0; i <= 4; ++i) {
      const double xv = xlo + (xhi - xlo) * i / 4.0, yv = ylo + (yhi - ylo) * i / 4.0;
      const std::string xs = number(xv), ys = number(yv);
      text(to_x(xv) - examples::text_width(xs, 1) / 2, kPlot + 6, xs, 1);
      text(-6 - examples::text_width(ys, 1), to_y(yv) - 3, ys, 1);
    }
    text(kPlot / 2 - examples::text_width(xlabel, 1) / 2, kPlot + 22, xlabel, 1);
    text(-kLeft + 2, -12, ylabel, 1);
    text(0, -kTop + 6, title, 2);
  }
  void legend(const std::string& what, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    const int y = 6 + 12 * lines_++;
    for (int dy = 0; dy < 7; ++dy)
      for (int dx = 0; dx < 7; ++dx) set(6 + dx, y + dy, r, g, b);
    text(18, y, what, 1);
  }
  void point(double x, double y, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    const int cx = to_x(x), cy = to_y(y);
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx)
        if (cx + dx >= 0 && cx + dx < kPlot && cy + dy >= 0 && cy + dy < kPlot)
          set(cx + dx, cy + dy, r, g, b);
  }
  const std::vector<std::uint8_t>& pixels() const { return px_; }

private:
  static std::string number(double v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }
  int to_x(double v) const {
    return static_cast<int>(std::lround((v - xlo_) / (xhi_ - xlo_) * (kPlot - 1)));
  }
  int to_y(double v) const {
    return static_cast<int>(std::lround((yhi_ - v) / (yhi_ - ylo_) * (kPlot - 1)));
  }
  void set(int x, int y, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
    x += kLeft;
    y += kTop;
    if (x < 0 || y < 0 || x >= kWidth || y >= kHeight) return;
    const auto i = static_cast<std::size_t>((y * kWidth + x) * 3);
    px_[i] = r;
    px_[i + 1] = g;
    px_[i + 2] = b;
  }
  void text(int x, int y, const std::string& t, int scale) {
    examples::draw_text(px_, kWidth, kHeight, 3, x + kLeft, y + kTop, t, scale);
  }
  std::vector<std::uint8_t> px_;
  double xlo_, xhi_, ylo_, yhi_;
  int lines_ = 0;
};

struct Colour {
  std::uint8_t r, g, b;
};
Colour colour_of(const std::string& method) {
  if (method == "PIS-NN") return {40, 90, 215};
  if (method == "PIS-Grad") return {215, 40, 40};
  return {0, 150, 0}; // optimal control
}

void write_picture(const std::string& path, const std::vector<Row>& rows) {
  std::vector<Panel> panels;
  for (const std::string target : {"mixture", "funnel"}) {
    bool any = false;
    for (const Row& r : rows) any = any || r.target == target;
    if (!any) continue;
    Panel p = target == "mixture"
                  ? Panel("9-MODE MIXTURE", -8, 8, -8, 8, "X1", "X2")
                  : Panel("FUNNEL D=10", -9, 9, -12, 12, "X0 (LOG-SCALE)", "X1");
    for (const Row& r : rows) {
      if (r.target != target) continue;
      const Colour c = colour_of(r.method);
      const Eigen::Index n = std::min<Eigen::Index>(r.samples.rows(), 1500);
      for (Eigen::Index k = 0; k < n; ++k) p.point(r.samples(k, 0), r.samples(k, 1), c.r, c.g, c.b);
      p.legend(r.method + " SAMPLES", c.r, c.g, c.b);
    }
    panels.push_back(std::move(p));
  }
  if (panels.empty()) return;
  const int w = Panel::kWidth * static_cast<int>(panels.size()), h = Panel::kHeight;
  std::vector<std::uint8_t> img(static_cast<std::size_t>(w * h * 3), 255);
  for (std::size_t k = 0; k < panels.size(); ++k)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < Panel::kWidth; ++x)
        for (int c = 0; c < 3; ++c)
          img[static_cast<std::size_t>((y * w + static_cast<int>(k) * Panel::kWidth + x) * 3 + c)] =
              panels[k].pixels()[static_cast<std::size_t>((y * Panel::kWidth + x) * 3 + c)];
  examples::write_png(path, w, h, 3, img);
  std::printf("wrote %s\n", path.c_str());
}

int run(const Args& a) {
  std::vector<Row> rows;
  PisNetOptions net;
  net.hidden = {a.hidden, a.hidden};
  bool ok = true;
  for (const std::string target_name : {"mixture", "funnel"}) {
    if (!has(a.targets, target_name)) continue;
    const bool mixture = target_name == "mixture";
    const PathIntegralSampler pis({.dim = mixture ? 2 : 10, .num_steps = a.steps});
    const auto mix = GaussianMixtureTarget::nine_modes();
    const FunnelTarget funnel(10, 3.0);
    const auto add = [&](Row row, const std::string& method) {
      row.target = target_name;
      row.method = method;
      rows.push_back(std::move(row));
    };
    if (mixture) {
      MixtureOptimalControl optimal(pis.config(), mix);
      Row r = evaluate(pis, optimal, mix, a, 0.0);
      // Self-check: the exact control's IS estimate must be unbiased within its spread.
      if (std::abs(r.is_bias) > 5.0 * r.is_std + 0.02) ok = false;
      add(std::move(r), "optimal");
    }
    if (has(a.methods, "nn")) {
      PisNN control(pis.config().dim, net, a.seed);
      add(mixture ? train_and_evaluate(pis, control, mix, a, "PIS-NN")
                  : train_and_evaluate(pis, control, funnel, a, "PIS-NN"),
          "PIS-NN");
    }
    if (has(a.methods, "grad")) {
      if (mixture) {
        PisGrad<GaussianMixtureTarget> control(mix, net, a.seed);
        add(train_and_evaluate(pis, control, mix, a, "PIS-Grad"), "PIS-Grad");
      } else {
        PisGrad<FunnelTarget> control(funnel, net, a.seed);
        add(train_and_evaluate(pis, control, funnel, a, "PIS-Grad"), "PIS-Grad");
      }
    }
  }
  std::printf("\nlog Z estimates (true log Z = 0), %d evaluation batches of %d samples, N = %d, "
              "%d Adam steps of batch %d\n",
              a.eval_batches, a.eval_samples, a.steps, a.iterations, a.batch);
  std::printf("%-8s %-9s | %-27s | %-27s | %5s | %s\n", "target", "control",
              "lower bound  B / S / A", "importance-weighted B/S/A", "ESS", "train s/it");
  for (const Row& r : rows)
    std::printf("%-8s %-9s | %8.4f %8.4f %8.4f | %8.4f %8.4f %8.4f | %5.3f | %s\n",
                r.target.c_str(), r.method.c_str(), r.lb_bias, r.lb_std, std::hypot(r.lb_bias, r.lb_std),
                r.is_bias, r.is_std, std::hypot(r.is_bias, r.is_std), r.ess,
                r.iterations > 0
                    ? std::to_string(r.train_seconds / r.iterations).c_str()
                    : "-");
  if (!a.no_image) write_picture(a.out, rows);
  if (!ok) {
    std::fprintf(stderr, "pis: the optimal control's importance-weighted log Z is biased\n");
    return 1;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  return examples::run_main("pis", [&] {
    Args a;
    examples::Cli cli("pis", "Path Integral Sampler on the 9-mode mixture and the funnel: "
                             "training, log Z table, scatter PNG");
    cli.option("--targets", a.targets, "comma list of mixture, funnel");
    cli.option("--methods", a.methods, "comma list of nn (PIS-NN), grad (PIS-Grad)");
    cli.option("--iterations", a.iterations, "Adam steps per training", 0, 1000000);
    cli.option("--batch", a.batch, "training batch", 1, 1000000);
    cli.option("--steps", a.steps, "Euler steps N over T = 5", 1, 100000);
    cli.option("--eval-samples", a.eval_samples, "samples per evaluation batch", 1, 10000000);
    cli.option("--eval-batches", a.eval_batches, "evaluation batches (bias/std over them)", 1,
               100000);
    cli.option("--hidden", a.hidden, "width of the two hidden layers", 1, 4096);
    cli.option("--lr", a.lr, "Adam learning rate", 1e-12, 10.0);
    cli.option("--seed", a.seed, "seed of the networks, training noise and evaluation noise");
    cli.option("--out", a.out, "scatter PNG path");
    cli.flag("--no-image", a.no_image, "skip the PNG");
    if (!cli.parse(argc, argv)) return 2;
    return run(a);
  });
}
