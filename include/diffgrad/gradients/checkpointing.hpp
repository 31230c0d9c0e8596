#pragma once
// Offline optimal binomial checkpointing (Griewank's "revolve") for reversing a fixed number
// of sampler steps with a fixed number of stored states.
//
// Counting convention (docs/math.md): `snapshots` s counts the stored states INCLUDING the
// initial one, and t(N, s) counts plain one-step advances. Reversing step i needs only the
// state before it (x_i and, for multistep schemes, its history) in the working buffer; the
// adjoint of the first reversed step additionally needs x_N, produced by one extra "output"
// advance. With r the repetition number, beta(s, r - 1) < N <= beta(s, r),
//   beta(s, r) = C(s + r, s),   t(N, s) = r N - beta(s + 1, r - 1),
// which equals the brute-force optimum t(n, s) = min_j [j + t(n - j, s - 1) + t(j, s)],
// t(1, s) = 0, t(n, 1) = n (n - 1) / 2 (tests/test_checkpointing.cpp checks both).
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
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
  // beta(s, .) is increasing: gallop to an upper bound, then bisect. A linear scan costs
  // O(r) binomials, and r grows like sqrt(2 n) for s = 2, which made building a large
  // schedule with few snapshots quadratic.
  if (revolve_beta(s, 0) >= n) return 0;
  std::int64_t lo = 0, hi = 1; // invariant: beta(s, lo) < n
  while (revolve_beta(s, hi) < n) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) { // beta(s, lo) < n <= beta(s, hi)
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (revolve_beta(s, mid) < n)
      lo = mid;
    else
      hi = mid;
  }
  return hi;
}

/// t(n, s): the minimal number of one-step advances that reverses n steps with s snapshots.
inline std::int64_t revolve_advances(std::int64_t n, std::int64_t s) {
  const std::int64_t r = revolve_repetitions(n, s);
  return r * n - revolve_beta(s + 1, r - 1);
}

/// One instruction of a checkpoint schedule. The executor keeps one working (extended)
/// state, the "current step", and `snapshots` slots.
enum class CheckpointOp {
  store,   ///< copy the current state into `slot`
  restore, ///< copy `slot` into the working state; the current step becomes that slot's step
  discard, ///< `slot` is not needed any more (for memory accounting only)
  advance, ///< advance the working state one step at a time up to step `step`
  output,  ///< from the current step N - 1, produce x_N (beside it) and seed the adjoint
  reverse, ///< reverse step `step` (== the current step): adjoint x_{step+1} -> x_step
};

struct CheckpointAction {
  CheckpointOp op;
  int step = 0; ///< advance: target step; reverse: the step reversed; store/restore: its step
  int slot = 0; ///< store / restore / discard
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
    Builder b(sch);
    b.run();
    return sch;
  }

  int num_steps() const { return num_steps_; }
  int snapshots() const { return snapshots_; } ///< slots the executor must allocate
  std::span<const CheckpointAction> actions() const { return actions_; }
  std::int64_t advances() const { return advances_; } ///< one-step advances, output excluded
  int peak_snapshots() const { return peak_; }        ///< slots in use at once, at most

private:
  // The generator. A task build(a, n, s, slot) has the precondition: state a is held in
  // `slot`; steps a .. a + n - 1 are to be reversed (the adjoint at a + n is known) using at
  // most s slots, `slot` included. It is the recursion
  //   build(a, n, s, slot): bring a, advance to a + j, sub = store(a + j),
  //                         build(a + j, n - j, s - 1, sub), discard(sub), build(a, j, s, slot)
  // run on an explicit task stack: with s >= n (store_all) the optimal split is j = 1 and
  // the recursion is N deep, which overflowed the call stack at N of about 50,000 (3,000 on
  // a 512 KiB thread). The stack holds at most two pending tasks per level of s.
  class Builder {
  public:
    explicit Builder(CheckpointSchedule& sch) : sch_(sch) {
      // Lowest free slot first (as the linear search this replaces did, so schedules are
      // unchanged), from a min-heap: O(log s) per store instead of O(s).
      std::vector<int> all(static_cast<std::size_t>(sch.snapshots_));
      for (int k = 0; k < sch.snapshots_; ++k) all[static_cast<std::size_t>(k)] = k;
      free_ = FreeSlots(std::greater<int>(), std::move(all));
    }

    void run() {
      const int first = store(0);
      tasks_.push_back({Task::kBuild, 0, sch_.num_steps_, sch_.snapshots_, first});
      while (!tasks_.empty()) {
        const Task t = tasks_.back();
        tasks_.pop_back();
        if (t.kind == Task::kDiscard)
          discard(t.slot);
        else
          build(t.a, t.n, t.s, t.slot);
      }
      discard(first);
    }

  private:
    struct Task {
      enum Kind { kBuild, kDiscard } kind;
      int a, n, s, slot;
    };
    using FreeSlots = std::priority_queue<int, std::vector<int>, std::greater<int>>;

    void push(CheckpointOp op, int step, int slot) { sch_.actions_.push_back({op, step, slot}); }
    int store(int step) {
      const int slot = free_.top();
      free_.pop();
      sch_.peak_ = std::max(sch_.peak_, ++in_use_);
      push(CheckpointOp::store, step, slot);
      return slot;
    }
    void discard(int slot) {
      free_.push(slot);
      --in_use_;
      push(CheckpointOp::discard, 0, slot);
    }
    void bring(int step, int slot) { // make `step` the working state, restoring from `slot`
      if (current_ != step) {
        push(CheckpointOp::restore, step, slot);
        current_ = step;
      }
    }
    void advance_to(int step) {
      sch_.advances_ += step - current_;
      push(CheckpointOp::advance, step, 0);
      current_ = step;
    }
    void reverse_current() {
      if (!output_done_) { // the first reversal is of step N - 1: x_N and the loss come first
        push(CheckpointOp::output, current_, 0);
        output_done_ = true;
      }
      push(CheckpointOp::reverse, current_, 0);
    }
    // One level of the recursion; the two sub-builds it leads to go onto the task stack,
    // the one to run first on top.
    void build(int a, int n, int s, int slot) {
      if (n == 1) {
        bring(a, slot);
        reverse_current();
        return;
      }
      if (s == 1) { // no spare slot: re-advance from a for every step, last first
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
      tasks_.push_back({Task::kBuild, a, j, s, slot}); // runs last
      if (n - j == 1) {
        // The single remaining step is reversed from the working state: no slot needed.
        reverse_current();
      } else {
        const int sub = store(a + j);
        tasks_.push_back({Task::kDiscard, 0, 0, 0, sub});
        tasks_.push_back({Task::kBuild, a + j, n - j, s - 1, sub}); // runs first
      }
    }

    CheckpointSchedule& sch_;
    int current_ = 0; // step of the working state
    bool output_done_ = false;
    int in_use_ = 0;
    FreeSlots free_;
    std::vector<Task> tasks_;
  };

  // argmin over 1 <= j < n of f(j) = j + t(n - j, s - 1) + t(j, s). f is convex in j (t(., s)
  // is piecewise linear with nondecreasing integer slopes r), so binary search its first
  // nonnegative forward difference.
  static int optimal_split(int n, int s) {
    const auto f = [n, s](std::int64_t j) {
      return j + revolve_advances(n - j, s - 1) + revolve_advances(j, s);
    };
    std::int64_t lo = 1, hi = n - 1; // the minimiser lies in [lo, hi]
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
