#pragma once
// diffusers' data-prediction post-processing as a node-aware eps adapter:
//   x0 = (x - sigma eps)/alpha,  x0' = threshold(x0),  eps' = (x - alpha x0')/sigma.
// threshold is, per sample (a row of the B x d state, diffusers' flattened C*H*W):
//   dynamic thresholding (Imagen; diffusers `thresholding=True`, DDPMScheduler._threshold_sample):
//     s = quantile(|x0|, dynamic_thresholding_ratio)  (torch.quantile, linear interpolation)
//     s = clamp(s, 1, sample_max_value);   x0' = clamp(x0, -s, s) / s
//     (torch.clamp: the upper bound wins, so sample_max_value < 1 gives the constant s = max)
//   clipping (DDIMScheduler `clip_sample=True`): x0' = clamp(x0, -clip_sample_range,
//   clip_sample_range)
// As in diffusers, thresholding takes precedence over clip_sample when both are on.
//
// Which diffusers paths this reproduces: DPM-Solver(++) multistep/singlestep with
// thresholding=True (their convert_model_output re-derives eps from the thresholded x0
// exactly like this), and DDIM with use_clipped_model_output=True. DDIM's default
// (use_clipped_model_output=False) keeps the UNclipped eps in the "direction to x_t" term, so
// its step is not a function of one eps and is not an eps adapter.
//
// The quantile follows torch.quantile (torch 2.x): rank = q (n - 1) with q rounded to the
// state's precision, the two neighbouring order statistics, their interpolation in double
// (fma), rounded to the state's precision.
//
// VJP (exact almost everywhere; the map is piecewise smooth): clamp passes the gradient where
// -s <= x0 <= s (torch's clamp convention), s depends on x0 through the two order statistics
// (weights 1 - w and w, times sign(x0)) while 1 < quantile < sample_max_value strictly, and
// entries clamped to +-s contribute nothing to ds (clamp(y, -s, s)/s = +-1 there).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/models/prediction.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

/// diffusers' scheduler options, same names. Default: both off (the identity).
struct ThresholdingOptions {
  bool thresholding = false;                 ///< dynamic thresholding (takes precedence)
  double dynamic_thresholding_ratio = 0.995; ///< the quantile of |x0|
  double sample_max_value = 1.0;             ///< upper clamp of the threshold s
  bool clip_sample = false;       ///< clamp x0 to [-clip_sample_range, clip_sample_range]
  double clip_sample_range = 1.0; ///< (DDIMScheduler's default is clip_sample=True)
};

namespace impl {

/// torch.quantile(values, q) with linear interpolation, for one row (values >= 0 here).
/// Returns the value and the two order-statistic indices with their weights.
struct QuantilePick {
  double value = 0.0;
  Eigen::Index below = 0, above = 0; ///< indices into the row
  double weight_above = 0.0;         ///< w: value = (1 - w) v_below + w v_above
};

template <class Scalar, class Row>
QuantilePick torch_quantile(const Row& abs_row, double q, std::vector<Eigen::Index>& order) {
  const auto n = abs_row.size();
  order.resize(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Eigen::Index{0});
  // torch multiplies the quantile, held in the input's dtype, by n - 1.
  const double rank = static_cast<double>(static_cast<Scalar>(q)) * static_cast<double>(n - 1);
  const auto below_rank = static_cast<Eigen::Index>(std::floor(rank));
  const auto above_rank = static_cast<Eigen::Index>(std::ceil(rank));
  const auto less = [&](Eigen::Index i, Eigen::Index j) { return abs_row(i) < abs_row(j); };
  // Selection instead of a full sort: O(n) per row.
  std::nth_element(order.begin(), order.begin() + below_rank, order.end(), less);
  QuantilePick pick;
  pick.below = order[static_cast<std::size_t>(below_rank)];
  pick.above = pick.below;
  if (above_rank != below_rank)
    pick.above = *std::min_element(order.begin() + below_rank + 1, order.end(), less);
  pick.weight_above = rank - static_cast<double>(below_rank);
  const double lo = static_cast<double>(abs_row(pick.below));
  const double hi = static_cast<double>(abs_row(pick.above));
  pick.value = static_cast<double>(static_cast<Scalar>(std::fma(pick.weight_above, hi - lo, lo)));
  return pick;
}

} // namespace impl

/// The thresholding rule on its own: x0 -> x0' for a batch, with its VJP.
template <class Scalar> class SampleThreshold {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  explicit SampleThreshold(const ThresholdingOptions& options = {}) : options_(options) {
    const char* where = "ThresholdingOptions";
    if (options.thresholding) {
      diffgrad::detail::require(options.dynamic_thresholding_ratio >= 0.0 &&
                                    options.dynamic_thresholding_ratio <= 1.0,
                                where, "dynamic_thresholding_ratio", "a quantile in [0, 1]",
                                options.dynamic_thresholding_ratio);
      // diffusers accepts any positive value: torch.clamp(q, min=1, max=v) with v < 1 returns v,
      // so the threshold is then the constant v (see apply()).
      diffgrad::detail::require(
          options.sample_max_value > 0.0 && !std::isnan(options.sample_max_value), where,
          "sample_max_value", "a positive number (s = clamp(q, 1, max); max < 1 pins s at max)",
          options.sample_max_value);
    } else if (options.clip_sample) {
      diffgrad::detail::require(
          options.clip_sample_range > 0.0 && !std::isnan(options.clip_sample_range), where,
          "clip_sample_range", "a positive range", options.clip_sample_range);
    }
  }
  const ThresholdingOptions& options() const { return options_; }
  bool active() const { return options_.thresholding || options_.clip_sample; }
  /// The threshold s of each sample in the last apply() (dynamic thresholding only).
  const std::vector<double>& last_scales() const { return scale_; }

  /// x0 -> x0' in place; remembers per sample what the VJP needs.
  void apply(state_type& x0) {
    const auto batch = x0.rows();
    scale_.resize(static_cast<std::size_t>(batch));
    picks_.resize(static_cast<std::size_t>(batch));
    varies_.resize(static_cast<std::size_t>(batch));
    if (options_.thresholding) {
      for (Eigen::Index b = 0; b < batch; ++b) {
        auto row = x0.row(b);
        if (row.hasNaN()) {
          // torch.quantile returns NaN for a row with a NaN, and so does the whole row after
          // the clamp and division; keep that (and keep NaN out of the selection's ordering).
          row.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
          scale_[static_cast<std::size_t>(b)] = std::numeric_limits<double>::quiet_NaN();
          varies_[static_cast<std::size_t>(b)] = false;
          continue;
        }
        abs_row_ = row.cwiseAbs();
        const auto pick =
            impl::torch_quantile<Scalar>(abs_row_, options_.dynamic_thresholding_ratio, order_);
        // s = clamp(q, 1, max) = min(max(q, 1), max), in the state's precision as torch does:
        // torch applies the upper bound last, so max < 1 gives s = max for every q
        // (std::clamp would be undefined there).
        const Scalar q = static_cast<Scalar>(pick.value);
        const Scalar s =
            std::min(std::max(q, Scalar(1)), static_cast<Scalar>(options_.sample_max_value));
        picks_[static_cast<std::size_t>(b)] = pick;
        scale_[static_cast<std::size_t>(b)] = static_cast<double>(s);
        // ds/dq = 1 only strictly inside (1, max): torch's clamp passes no gradient at a bound,
        // and none at all when max < 1 (s is the constant max, the quantile drops out).
        varies_[static_cast<std::size_t>(b)] =
            q > Scalar(1) && q < static_cast<Scalar>(options_.sample_max_value);
        row = (row.array().min(s).max(-s) / s).matrix();
      }
    } else if (options_.clip_sample) {
      const Scalar r = static_cast<Scalar>(options_.clip_sample_range);
      // NaN-propagating clamp, as torch.clamp (Eigen's default min/max may drop a NaN).
      x0 = x0.unaryExpr([r](Scalar v) { return v > r ? r : (v < -r ? -r : v); });
    }
  }

  /// Given the ORIGINAL x0 (before apply) and the cotangent c of x0', writes the cotangent of
  /// x0 into c (in place). Must follow apply() on the same x0.
  void backward(const state_type& x0, state_type& c) const {
    if (options_.thresholding) {
      for (Eigen::Index b = 0; b < x0.rows(); ++b) {
        const auto i = static_cast<std::size_t>(b);
        const Scalar s = static_cast<Scalar>(scale_[i]);
        const auto y = x0.row(b).array();
        auto g = c.row(b).array();
        const auto inside = (y.abs() <= s).template cast<Scalar>();
        // d(clamp(y, -s, s)/s)/ds = -y/s^2 inside, 0 outside.
        const Scalar ds = varies_[i] ? -(g * inside * y).sum() / (s * s) : Scalar(0);
        g = g * inside / s;
        if (ds != Scalar(0)) {
          const auto& p = picks_[i];
          const auto sign = [&](Eigen::Index j) { return Scalar((y(j) > 0) - (y(j) < 0)); };
          g(p.below) += ds * Scalar(1.0 - p.weight_above) * sign(p.below);
          g(p.above) += ds * Scalar(p.weight_above) * sign(p.above);
        }
      }
    } else if (options_.clip_sample) {
      const Scalar r = static_cast<Scalar>(options_.clip_sample_range);
      c = (x0.array().abs() <= r).select(c, Scalar(0));
    }
  }

private:
  ThresholdingOptions options_;
  std::vector<double> scale_;
  std::vector<impl::QuantilePick> picks_;
  std::vector<bool> varies_;
  std::vector<Eigen::Index> order_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> abs_row_;
};

/// eps' = (x - alpha threshold(x0))/sigma around an eps model (wrap a v/x0 network with
/// as_eps_model first). Lvalues are held by reference, rvalues owned.
template <class Model> class ThresholdedEps {
public:
  using model_type = impl::model_value_t<Model>;
  using state_type = impl::state_of_t<Model>;
  using vector_type = impl::vector_of_t<Model>;
  using Scalar = typename state_type::Scalar;

  template <class M>
  ThresholdedEps(M&& model, const ThresholdingOptions& options)
      : model_(std::forward<M>(model)), threshold_(options) {}

  const ThresholdingOptions& options() const { return threshold_.options(); }
  model_type& model() { return model_; }
  const model_type& model() const { return model_; }
  std::int64_t cond_size() const requires requires(const model_type& m) { m.cond_size(); }
  { return model_.cond_size(); }
  std::int64_t param_size() const requires requires(const model_type& m) { m.param_size(); }
  { return model_.param_size(); }

  void eps(const state_type& x, const Node& n, state_type& out) {
    impl::call_eps(model_, x, n, out);
    if (!threshold_.active()) return;
    check_node(n, "ThresholdedEps::eps");
    x0_ = (x - Scalar(n.sigma) * out) / Scalar(n.alpha);
    threshold_.apply(x0_);
    out = (x - Scalar(n.alpha) * x0_) / Scalar(n.sigma);
  }

  /// dx = (d eps'/dx)^T a, and the inner model's cond/param VJPs with the chained cotangent.
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond,
           vector_type* dparams) requires(impl::NodeAwareVjp<model_type, state_type, vector_type> ||
                                          impl::TimedVjp<model_type, state_type, vector_type>) {
    if (!threshold_.active()) {
      impl::call_vjp(model_, x, n, a, dx, dcond, dparams);
      return;
    }
    check_node(n, "ThresholdedEps::vjp");
    // Recompute the forward pass: x0 = (x - sigma eps)/alpha, then threshold.
    impl::call_eps(model_, x, n, eps_);
    x0_ = (x - Scalar(n.sigma) * eps_) / Scalar(n.alpha);
    x0_thr_ = x0_;
    threshold_.apply(x0_thr_);
    // eps' = (x - alpha x0')/sigma: x0' gets -(alpha/sigma) a, x gets a/sigma directly.
    c_x0_ = Scalar(-n.alpha / n.sigma) * a;
    direct_ = a / Scalar(n.sigma); // read a before dx is written (they may alias)
    threshold_.backward(x0_, c_x0_);
    // x0 = (x - sigma eps)/alpha: x gets c/alpha, eps gets -(sigma/alpha) c.
    direct_ += c_x0_ / Scalar(n.alpha);
    c_eps_ = Scalar(-n.sigma / n.alpha) * c_x0_;
    impl::call_vjp(model_, x, n, c_eps_, dx, dcond, dparams);
    dx += direct_;
  }

private:
  static void check_node(const Node& n, const char* where) {
    impl::require_positive(n.sigma, where, "node.sigma",
                           "sigma > 0 (eps' = (x - alpha x0')/sigma)");
    impl::require_positive(n.alpha, where, "node.alpha", "alpha > 0 (x0 = (x - sigma eps)/alpha)");
  }

  Model model_;
  SampleThreshold<Scalar> threshold_;
  state_type x0_, x0_thr_, eps_, c_x0_, c_eps_, direct_;
};

template <class Model>
ThresholdedEps<Model> thresholded(Model&& model, const ThresholdingOptions& options) {
  return ThresholdedEps<Model>(std::forward<Model>(model), options);
}
/// diffusers `thresholding=True`.
template <class Model>
ThresholdedEps<Model> dynamic_thresholding(Model&& model, double ratio = 0.995,
                                           double sample_max_value = 1.0) {
  ThresholdingOptions o;
  o.thresholding = true;
  o.dynamic_thresholding_ratio = ratio;
  o.sample_max_value = sample_max_value;
  return ThresholdedEps<Model>(std::forward<Model>(model), o);
}
/// DDIMScheduler `clip_sample=True` (with use_clipped_model_output=True, see above).
template <class Model> ThresholdedEps<Model> clip_sample(Model&& model, double range = 1.0) {
  ThresholdingOptions o;
  o.clip_sample = true;
  o.clip_sample_range = range;
  return ThresholdedEps<Model>(std::forward<Model>(model), o);
}

} // namespace diffgrad::models
