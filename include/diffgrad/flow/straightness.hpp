#pragma once
// FlowGrad's straightness measure and non-uniform segmentation (FlowGrad paper, eqs.
// 11-12). With v_k = f(x_k, node_k) the model outputs along the trajectory (velocities; eps
// for DDIM, the velocity of x/alpha in rho):
//   d(a, b) = |a - b|^2 / |b|^2                    (relative change, per sample)
//   S_k = max(d(v_{k-1}, v_k), d(v_{k+1}, v_k))    (one-sided at k = 0 and k = N - 1)
// A small S_k says the trajectory is straight around node k, so the two steps that meet at
// node k can be taken as one. Segmentation (eq. 12): a segment starting at step a takes in
// the next steps while the summed straightness of the nodes it swallows stays below xi:
//   the segment [a, b) is the longest one with  S_{a+1} + ... + S_{b-1} < xi,
// i.e. b = a + m with m the smallest count whose sum S_{a+1} + ... + S_{a+m} reaches xi (or
// the end of the grid). xi = 0 never merges (every segment is one step), so xi = 0 IS exact
// backprop whatever the field; a field with S = 0 everywhere is one segment for any xi > 0.
//
// The authors' code differs (documented, not offered): it sums S of a segment's own steps
// from its first (S_a + ... , one node earlier than eq. 12), closes a segment when the sum
// exceeds xi strictly (so xi = 0 still merges steps with S = 0), pools the batch into one d,
// and reads v_{-1} as the LAST velocity at k = 0 (a Python negative index).
//
// Batches share one segmentation (one VJP per segment for the whole batch): S_k is reduced
// over the samples by BatchStraightness.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/concepts/backend.hpp"
#include "diffgrad/core/error.hpp"

namespace diffgrad {

/// How the per-sample straightness of a batch becomes the one S_k that segments it.
enum class BatchStraightness {
  max_over_samples, ///< S_k = max_b S_k(b): merge only where every sample is straight (default)
  pooled,           ///< d over the whole batch as one vector (the authors' code; B = 1: same)
};

/// |a - b|^2 / |b|^2 from the two squared norms; 0/0 = 0 (both velocities zero: straight),
/// x/0 = +inf (a velocity appears from zero: not straight).
inline double relative_change(double diff_sq, double ref_sq) {
  if (ref_sq > 0.0) return diff_sq / ref_sq;
  return diff_sq == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
}

/// Segment starts from the straightness S_0..S_{N-1} and the threshold xi (see the header):
/// writes the first step of every segment, then N, into `starts` (reuses its capacity).
inline void segment_straight_steps(std::span<const double> straightness, double xi,
                                   std::vector<int>& starts) {
  detail::require(xi >= 0.0, "segment_straight_steps", "xi",
                  "a straightness threshold xi >= 0 (0 = no merging, exact backprop)", xi);
  const int n = static_cast<int>(straightness.size());
  detail::require(n >= 1, "segment_straight_steps", "straightness", "at least one step", n);
  starts.clear();
  starts.push_back(0);
  double swallowed = 0.0; // straightness summed over the interior nodes of the open segment
  for (int k = 1; k < n; ++k) {
    swallowed += straightness[static_cast<std::size_t>(k)];
    if (swallowed < xi) continue; // node k becomes interior: steps k-1 and k are merged
    starts.push_back(k);          // NaN lands here too: never merge on a broken measure
    swallowed = 0.0;
  }
  starts.push_back(n);
}

namespace detail {

template <class State>
concept RowAccessState = requires(const State& s) {
  s.rows();
  s.row(0).squaredNorm();
};

/// Computes S_k on the fly while the forward pass produces v_0, v_1, ... (only the previous
/// output is needed); buffers are sized once. push(k, v_prev, v_k) with v_prev unused at k = 0.
template <Backend B> class StraightnessTracker {
public:
  using State = typename B::state_type;

  StraightnessTracker(const B& backend, std::int64_t batch, std::int64_t dim)
      : diff_(backend.make_state(batch, dim)), ref_prev_(static_cast<std::size_t>(batch)),
        ref_cur_(static_cast<std::size_t>(batch)), pending_(static_cast<std::size_t>(batch)),
        sq_(static_cast<std::size_t>(batch)) {}

  /// Starts a trajectory of num_steps outputs; S is written to `out` (size num_steps).
  void begin(BatchStraightness mode, std::span<double> out) {
    mode_ = mode;
    out_ = out;
    if constexpr (!RowAccessState<State>)
      if (mode == BatchStraightness::max_over_samples)
        throw_argument("FlowGrad", "options.batch_straightness",
                       "BatchStraightness::pooled on a backend without per-sample reductions",
                       "max_over_samples");
  }

  void push(const B& backend, int k, const State& v_prev, const State& v) {
    const std::size_t groups = this->groups();
    norms(backend, v, ref_cur_);
    if (k == 0) {
      std::fill_n(pending_.begin(), groups, 0.0); // no v_{-1}: S_0 = d(v_1, v_0)
    } else {
      backend.lincomb(diff_, term(1.0, v), term(-1.0, v_prev));
      norms(backend, diff_, sq_);
      double s_prev = 0.0;
      for (std::size_t g = 0; g < groups; ++g) {
        // d(v_k, v_{k-1}) closes S_{k-1}; d(v_{k-1}, v_k) opens S_k.
        s_prev = std::max(s_prev, std::max(pending_[g], relative_change(sq_[g], ref_prev_[g])));
        pending_[g] = relative_change(sq_[g], ref_cur_[g]);
      }
      out_[static_cast<std::size_t>(k - 1)] = s_prev;
    }
    std::swap(ref_prev_, ref_cur_);
    last_ = k;
  }

  /// Closes S_{N-1} (one-sided: there is no v_N).
  void end() {
    const std::size_t groups = this->groups();
    double s = 0.0;
    for (std::size_t g = 0; g < groups; ++g) s = std::max(s, pending_[g]);
    out_[static_cast<std::size_t>(last_)] = s;
  }

private:
  std::size_t groups() const { return mode_ == BatchStraightness::pooled ? 1 : pending_.size(); }

  // Squared norms per sample (row), or of the whole batch when pooled.
  void norms(const B& backend, const State& v, std::vector<double>& out) const {
    if constexpr (RowAccessState<State>) {
      if (mode_ == BatchStraightness::max_over_samples) {
        for (std::size_t r = 0; r < out.size(); ++r)
          out[r] = v.row(static_cast<decltype(v.rows())>(r)).template cast<double>().squaredNorm();
        return;
      }
    }
    out[0] = backend.dot(v, v);
  }

  State diff_;
  std::vector<double> ref_prev_, ref_cur_, pending_, sq_;
  BatchStraightness mode_ = BatchStraightness::max_over_samples;
  std::span<double> out_{};
  int last_ = 0;
};

} // namespace detail

/// S_0..S_{N-1} of a sequence of model outputs v_0..v_{N-1} (each B x d), written to `out`.
template <Backend B>
void flow_straightness(const B& backend, std::span<const typename B::state_type> velocities,
                       BatchStraightness mode, std::vector<double>& out) {
  detail::require(!velocities.empty(), "flow_straightness", "velocities", "at least one velocity",
                  0);
  out.assign(velocities.size(), 0.0);
  detail::StraightnessTracker<B> tracker(backend, B::batch(velocities.front()),
                                         B::dim(velocities.front()));
  tracker.begin(mode, out);
  for (std::size_t k = 0; k < velocities.size(); ++k)
    tracker.push(backend, static_cast<int>(k), velocities[k == 0 ? 0 : k - 1], velocities[k]);
  tracker.end();
}

} // namespace diffgrad
