#pragma once
// Offline optimal binomial checkpointing (Griewank's "revolve") for reversing a fixed number
// of sampler steps with a fixed number of stored states.
//
// Counting convention (REFERENCE.md): `snapshots` s counts the stored states INCLUDING the
// initial one, and t(N, s) counts plain one-step advances. Reversing step i needs only the
// state before it (x_i and, for multistep schemes, its history) in the working buffer; the
// adjoint of the first reversed step additionally needs x_N, produced by one extra "output"
// advance. With r the repetition number, beta(s, r - 1) < N <= beta(s, r),
//   beta(s, r) = C(s + r, s),   t(N, s) = r N - beta(s + 1, r - 1),
// which equals the brute-force optimum t(n, s) = min_j [j + t(n - j, s - 1) + t(j, s)],
// t(1, s) = 0, t(n, 1) = n (n - 1) / 2 (tests/test_checkpointing.cpp checks both).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "diffgrad/core/error.hpp"

namespace diffgrad {

namespace detail {
inline constexpr std::int64_t kSaturated = std::numeric_limits<std::int64_t>::max() / 4;
} // namespace detail

/// beta(s, r) = C(s + r, s): the most steps s snapshots reverse with at most r advances of
/// any one step. Saturates at a huge value instead of overflowing; beta(s, r < 0) = 0.
inline std::int64_t revolve_beta(std::int64_t s, std::int64_t r) {
  if (r < 0 || s < 0) return 0;
  // C(s + r, k) with k = min(s, r), built up as C(s + r - k + m, m): every partial product is
  // an exact binomial, so the division is exact.
  const std::int64_t k = std::min(s, r);
  const std::int64_t n = s + r;
  std::int64_t c = 1;
  for (std::int64_t m = 1; m <= k; ++m) {
    const std::int64_t factor = n - k + m;
    if (c > detail::kSaturated / factor) return detail::kSaturated;
    c = c * factor / m;
  }
  return c;
}

/// The repetition number r: the smallest r with beta(s, r) >= n.
inline std::int64_t revolve_repetitions(std::int64_t n, std::int64_t s) {
  detail::require(n >= 1, "revolve_repetitions", "n", "at least 1 step", static_cast<double>(n));
  detail::require(s >= 1, "revolve_repetitions", "s", "at least 1 snapshot",
                  static_cast<double>(s));
  std::int64_t r = 0;
  while (revolve_beta(s, r) < n) ++r;
  return r;
}

/// t(n, s): the minimal number of one-step advances that reverses n steps with s snapshots.
inline std::int64_t revolve_advances(std::int64_t n, std::int64_t s) {
  const std::int64_t r = revolve_repetitions(n, s);
  return r * n - revolve_beta(s + 1, r - 1);
}

/// One instruction of a checkpoint schedule. The executor keeps one working (extended)
/// state, the "current step", and `snapshots` slots.
enum class CheckpointOp {
  store,    ///< copy the current state into `slot`
  restore,  ///< copy `slot` into the working state; the current step becomes that slot's step
  discard,  ///< `slot` is not needed any more (for memory accounting only)
  advance,  ///< advance the working state one step at a time up to step `step`
  output,   ///< from the current step N - 1, produce x_N (beside it) and seed the adjoint
  reverse,  ///< reverse step `step` (== the current step): adjoint x_{step+1} -> x_step
};

struct CheckpointAction {
  CheckpointOp op;
  int step = 0;  ///< advance: target step; reverse: the step reversed; store/restore: its step
  int slot = 0;  ///< store / restore / discard
};

/// An offline schedule for reversing `num_steps` steps with at most `snapshots` stored
/// states (initial state included). Built once, before any model call; executing it costs
/// exactly revolve_advances(num_steps, snapshots) + 1 advances (the +1 is `output`).
class CheckpointSchedule {
public:
  /// Optimal binomial schedule. snapshots >= 1; more than num_steps are never used.
  static CheckpointSchedule revolve(int num_steps, int snapshots) {
    detail::require(num_steps >= 1, "CheckpointSchedule::revolve", "num_steps", "at least 1",
                    num_steps);
    detail::require(snapshots >= 1, "CheckpointSchedule::revolve", "snapshots",
                    "at least 1 stored state (the initial one counts)", snapshots);
    CheckpointSchedule sch;
    sch.num_steps_ = num_steps;
    sch.snapshots_ = std::min(snapshots, num_steps);
    Builder b{sch, 0, false, std::vector<bool>(static_cast<std::size_t>(sch.snapshots_), false),
              0};
    b.store(0);
    b.build(0, num_steps, sch.snapshots_, 0);
    b.discard(0);
    return sch;
  }

  int num_steps() const { return num_steps_; }
  int snapshots() const { return snapshots_; }  ///< slots the executor must allocate
  std::span<const CheckpointAction> actions() const { return actions_; }
  std::int64_t advances() const { return advances_; }  ///< one-step advances, output excluded
  int peak_snapshots() const { return peak_; }         ///< slots in use at once, at most

private:
  // Recursive generator. Precondition of build(a, n, s, slot): state a is held in `slot`;
  // steps a .. a + n - 1 are to be reversed (the adjoint at a + n is known) using at most
  // s slots, `slot` included.
  struct Builder {
    CheckpointSchedule& sch;
    int current;  // step of the working state
    bool output_done;
    std::vector<bool> used;
    int in_use;

    void push(CheckpointOp op, int step, int slot) { sch.actions_.push_back({op, step, slot}); }
    int store(int step) {
      const auto it = std::find(used.begin(), used.end(), false);
      const int slot = static_cast<int>(it - used.begin());
      *it = true;
      sch.peak_ = std::max(sch.peak_, ++in_use);
      push(CheckpointOp::store, step, slot);
      return slot;
    }
    void discard(int slot) {
      used[static_cast<std::size_t>(slot)] = false;
      --in_use;
      push(CheckpointOp::discard, 0, slot);
    }
    void bring(int step, int slot) {  // make `step` the working state, restoring from `slot`
      if (current != step) {
        push(CheckpointOp::restore, step, slot);
        current = step;
      }
    }
    void advance_to(int step) {
      sch.advances_ += step - current;
      push(CheckpointOp::advance, step, 0);
      current = step;
    }
    void reverse_current() {
      if (!output_done) {  // the first reversal is of step N - 1: x_N and the loss come first
        push(CheckpointOp::output, current, 0);
        output_done = true;
      }
      push(CheckpointOp::reverse, current, 0);
    }
    void build(int a, int n, int s, int slot) {
      if (n == 1) {
        bring(a, slot);
        reverse_current();
        return;
      }
      if (s == 1) {  // no spare slot: re-advance from a for every step, last first
        for (int k = n - 1; k >= 0; --k) {
          bring(a, slot);
          if (k > 0) advance_to(a + k);
          reverse_current();
        }
        return;
      }
      const int j = optimal_split(n, s);
      bring(a, slot);
      advance_to(a + j);
      if (n - j == 1) {
        // The single remaining step is reversed from the working state: no slot needed.
        reverse_current();
      } else {
        const int sub = store(a + j);
        build(a + j, n - j, s - 1, sub);
        discard(sub);
      }
      build(a, j, s, slot);
    }
  };

  // argmin over 1 <= j < n of f(j) = j + t(n - j, s - 1) + t(j, s). f is convex in j (t(., s)
  // is piecewise linear with nondecreasing integer slopes r), so binary search its first
  // nonnegative forward difference.
  static int optimal_split(int n, int s) {
    const auto f = [n, s](std::int64_t j) {
      return j + revolve_advances(n - j, s - 1) + revolve_advances(j, s);
    };
    std::int64_t lo = 1, hi = n - 1;  // the minimiser lies in [lo, hi]
    while (lo < hi) {
      const std::int64_t mid = lo + (hi - lo) / 2;
      if (f(mid + 1) - f(mid) >= 0)
        hi = mid;
      else
        lo = mid + 1;
    }
    return static_cast<int>(lo);
  }

  int num_steps_ = 0;
  int snapshots_ = 0;
  std::vector<CheckpointAction> actions_;
  std::int64_t advances_ = 0;
  int peak_ = 0;
};

} // namespace diffgrad
