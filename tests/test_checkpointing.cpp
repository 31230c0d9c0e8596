// Binomial checkpointing: the closed form t(N, s) and the generated schedules against a
// brute-force dynamic program, the values in docs/math.md, a symbolic replay of every schedule
// (order, slot use, advance count) and bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <set>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "diffgrad/gradients/checkpointing.hpp"

using namespace diffgrad;

namespace {

/// t(n, s) = min_{1 <= j < n} [j + t(n - j, s - 1) + t(j, s)], t(1, s) = 0,
/// t(n, 1) = n (n - 1) / 2: the brute-force optimum, independent of the closed form.
std::vector<std::vector<std::int64_t>> brute_force_table(int n_max, int s_max) {
  std::vector<std::vector<std::int64_t>> t(static_cast<std::size_t>(n_max) + 1,
                                           std::vector<std::int64_t>(s_max + 1, 0));
  for (int n = 1; n <= n_max; ++n)
    for (int s = 1; s <= s_max; ++s) {
      if (n == 1) {
        t[n][s] = 0;
      } else if (s == 1) {
        t[n][s] = static_cast<std::int64_t>(n) * (n - 1) / 2;
      } else {
        std::int64_t best = INT64_MAX;
        for (int j = 1; j < n; ++j) best = std::min(best, j + t[n - j][s - 1] + t[j][s]);
        t[n][s] = best;
      }
    }
  return t;
}

struct Replay {
  std::int64_t advances = 0; // one-step advances, output excluded
  int outputs = 0;
  int peak_slots = 0;
};

/// Executes a schedule symbolically and checks every rule an executor relies on.
Replay replay(const CheckpointSchedule& sch) {
  const int n = sch.num_steps();
  Replay r;
  std::map<int, int> slot_step; // occupied slots -> their step
  int current = 0;
  int next_reverse = n - 1;
  bool output_done = false;
  for (const CheckpointAction& a : sch.actions()) {
    switch (a.op) {
    case CheckpointOp::store:
      REQUIRE(a.slot >= 0);
      REQUIRE(a.slot < sch.snapshots());
      REQUIRE(slot_step.count(a.slot) == 0);
      REQUIRE(a.step == current);
      slot_step[a.slot] = current;
      r.peak_slots = std::max(r.peak_slots, static_cast<int>(slot_step.size()));
      break;
    case CheckpointOp::restore:
      REQUIRE(slot_step.count(a.slot) == 1);
      current = slot_step[a.slot];
      REQUIRE(a.step == current);
      break;
    case CheckpointOp::discard: REQUIRE(slot_step.erase(a.slot) == 1); break;
    case CheckpointOp::advance:
      REQUIRE(a.step > current);
      REQUIRE(a.step <= next_reverse); // never advance past the next step to reverse
      r.advances += a.step - current;
      current = a.step;
      break;
    case CheckpointOp::output:
      REQUIRE_FALSE(output_done);
      REQUIRE(current == n - 1);
      output_done = true;
      ++r.outputs;
      break;
    case CheckpointOp::reverse:
      REQUIRE(output_done);
      REQUIRE(a.step == next_reverse);
      REQUIRE(current == a.step);
      --next_reverse;
      break;
    }
  }
  REQUIRE(next_reverse == -1); // every step reversed, last first
  REQUIRE(slot_step.empty());  // every slot released
  return r;
}

/// The schedule generator as first written, recursively (depth N for store_all): the
/// reference the iterative builder must reproduce action for action. Lowest free slot first.
struct RecursiveReference {
  std::vector<CheckpointAction> actions;
  std::set<int> free_slots;
  int current = 0;
  bool output_done = false;

  RecursiveReference(int n, int s) {
    for (int k = 0; k < s; ++k) free_slots.insert(k);
    const int first = store(0);
    build(0, n, s, first);
    discard(first);
  }
  void push(CheckpointOp op, int step, int slot) { actions.push_back({op, step, slot}); }
  int store(int step) {
    const int slot = *free_slots.begin();
    free_slots.erase(free_slots.begin());
    push(CheckpointOp::store, step, slot);
    return slot;
  }
  void discard(int slot) {
    free_slots.insert(slot);
    push(CheckpointOp::discard, 0, slot);
  }
  void bring(int step, int slot) {
    if (current != step) push(CheckpointOp::restore, step, slot);
    current = step;
  }
  void advance_to(int step) {
    push(CheckpointOp::advance, step, 0);
    current = step;
  }
  void reverse_current() {
    if (!output_done) push(CheckpointOp::output, current, 0);
    output_done = true;
    push(CheckpointOp::reverse, current, 0);
  }
  // The optimal split by exhaustive search of j + t(n - j, s - 1) + t(j, s) (smallest j
  // among equal minima), independent of the builder's bisection.
  static int split(int n, int s) {
    int best_j = 1;
    std::int64_t best = INT64_MAX;
    for (int j = 1; j < n; ++j) {
      const std::int64_t f = j + revolve_advances(n - j, s - 1) + revolve_advances(j, s);
      if (f < best) best = f, best_j = j;
    }
    return best_j;
  }
  void build(int a, int n, int s, int slot) {
    if (n == 1) {
      bring(a, slot);
      reverse_current();
      return;
    }
    if (s == 1) {
      for (int k = n - 1; k >= 0; --k) {
        bring(a, slot);
        if (k > 0) advance_to(a + k);
        reverse_current();
      }
      return;
    }
    const int j = split(n, s);
    bring(a, slot);
    advance_to(a + j);
    if (n - j == 1) {
      reverse_current();
    } else {
      const int sub = store(a + j);
      build(a + j, n - j, s - 1, sub);
      discard(sub);
    }
    build(a, j, s, slot);
  }
};

bool same_actions(const CheckpointSchedule& sch, const std::vector<CheckpointAction>& ref) {
  const auto acts = sch.actions();
  if (acts.size() != ref.size()) return false;
  for (std::size_t k = 0; k < ref.size(); ++k)
    if (acts[k].op != ref[k].op || acts[k].step != ref[k].step || acts[k].slot != ref[k].slot)
      return false;
  return true;
}

/// Replay's rules without a Catch assertion per action (millions of them at N = 100,000):
/// returns the advance count, or -1 at the first broken rule.
std::int64_t quick_replay(const CheckpointSchedule& sch) {
  const int n = sch.num_steps();
  std::vector<int> slot_step(static_cast<std::size_t>(sch.snapshots()), -1);
  std::int64_t advances = 0;
  int current = 0, next_reverse = n - 1, held = 0;
  bool output_done = false;
  for (const CheckpointAction& a : sch.actions()) {
    const bool slot_ok = a.slot >= 0 && a.slot < sch.snapshots();
    int* held_step = slot_ok ? &slot_step[static_cast<std::size_t>(a.slot)] : nullptr;
    switch (a.op) {
    case CheckpointOp::store:
      if (!slot_ok || *held_step != -1 || a.step != current) return -1;
      *held_step = current;
      ++held;
      break;
    case CheckpointOp::restore:
      if (!slot_ok || *held_step != a.step) return -1;
      current = a.step;
      break;
    case CheckpointOp::discard:
      if (!slot_ok || *held_step == -1) return -1;
      *held_step = -1;
      --held;
      break;
    case CheckpointOp::advance:
      if (a.step <= current || a.step > next_reverse) return -1;
      advances += a.step - current;
      current = a.step;
      break;
    case CheckpointOp::output:
      if (output_done || current != n - 1) return -1;
      output_done = true;
      break;
    case CheckpointOp::reverse:
      if (!output_done || a.step != next_reverse || current != a.step) return -1;
      --next_reverse;
      break;
    }
  }
  return next_reverse == -1 && held == 0 ? advances : -1;
}

} // namespace

TEST_CASE("closed-form t(N, s) and the schedules match a brute-force DP (N <= 40, s <= 6)",
          "[checkpoint]") {
  const int n_max = 40, s_max = 6;
  const auto dp = brute_force_table(n_max, s_max);
  for (int n = 1; n <= n_max; ++n)
    for (int s = 1; s <= s_max; ++s) {
      INFO("N = " << n << ", s = " << s);
      REQUIRE(revolve_advances(n, s) == dp[n][s]);
      const auto sch = CheckpointSchedule::revolve(n, s);
      const Replay r = replay(sch);
      REQUIRE(r.advances == dp[n][s]);
      REQUIRE(sch.advances() == dp[n][s]);
      REQUIRE(r.outputs == 1);
      REQUIRE(r.peak_slots <= s);
      REQUIRE(sch.peak_snapshots() == r.peak_slots);
    }
}

TEST_CASE("t(N, s) reproduces the known values", "[checkpoint]") {
  CHECK(revolve_advances(10, 2) == 20);
  CHECK(revolve_advances(50, 5) == 122);
  CHECK(revolve_advances(100, 8) == 245);
  for (int n : {2, 3, 10, 37, 100, 1000}) {
    CHECK(revolve_advances(n, n - 1) == n - 1); // store all
    CHECK(revolve_advances(n, 1) == static_cast<std::int64_t>(n) * (n - 1) / 2);
  }
  CHECK(revolve_beta(2, 3) == 10); // C(5, 2)
  CHECK(revolve_beta(5, 0) == 1);
  CHECK(revolve_beta(3, -1) == 0);
  CHECK(revolve_repetitions(10, 2) == 3);
}

TEST_CASE("large schedules replay correctly with the optimal advance count", "[checkpoint]") {
  for (int n : {50, 100, 1000}) {
    for (int s : {1, 2, 3, 5, 8, 10, 20}) {
      if (s > n) continue;
      const auto sch = CheckpointSchedule::revolve(n, s);
      const Replay r = replay(sch);
      INFO("N = " << n << ", s = " << s);
      CHECK(r.advances == revolve_advances(n, s));
      CHECK(r.peak_slots <= s);
    }
    const auto all = CheckpointSchedule::revolve(n, n);
    CHECK(replay(all).advances == n - 1);
  }
  // Binomial growth: s ~ log N snapshots keep the work at O(N log N).
  CHECK(revolve_advances(1000, 10) <= 1000 * 4);
}

TEST_CASE("checkpoint schedules reject bad input", "[checkpoint][errors]") {
  CHECK_THROWS_AS(CheckpointSchedule::revolve(0, 2), diffgrad::invalid_argument);
  CHECK_THROWS_AS(CheckpointSchedule::revolve(10, 0), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(CheckpointSchedule::revolve(10, 0),
                    Catch::Contains("snapshots") && Catch::Contains("got 0"));
  CHECK_THROWS_AS(revolve_advances(0, 1), diffgrad::invalid_argument);
  CHECK_THROWS_AS(revolve_advances(5, 0), diffgrad::invalid_argument);
}

TEST_CASE("schedules equal the recursive reference generator action for action (N <= 60)",
          "[checkpoint]") {
  for (int n = 1; n <= 60; ++n)
    for (int s = 1; s <= n + 1; ++s) {
      INFO("N = " << n << ", s = " << s);
      const RecursiveReference ref(n, std::min(s, n));
      REQUIRE(same_actions(CheckpointSchedule::revolve(n, s), ref.actions));
    }
  for (const auto& [n, s] : std::vector<std::pair<int, int>>{
           {1000, 2}, {1000, 7}, {777, 40}, {500, 500}, {2000, 1999}}) {
    INFO("N = " << n << ", s = " << s);
    const RecursiveReference ref(n, std::min(s, n));
    REQUIRE(same_actions(CheckpointSchedule::revolve(n, s), ref.actions));
  }
}

TEST_CASE("N = 1e5: store_all and checkpoint schedules build and replay", "[checkpoint]") {
  // Building was recursive (N deep for store_all: a stack overflow near N = 50,000) and
  // O(N^2) (a linear free-slot search), 5 s here at N = 100,000.
  const int n = 100000;
  for (int s : {n, n - 1, 1000, 12, 2}) {
    INFO("s = " << s);
    const auto t0 = std::chrono::steady_clock::now();
    const auto sch = CheckpointSchedule::revolve(n, s);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    UNSCOPED_INFO("N = " << n << ", s = " << s << ": built in " << seconds << " s");
    CHECK(quick_replay(sch) == revolve_advances(n, s));
    CHECK(sch.advances() == revolve_advances(n, s));
    CHECK(sch.peak_snapshots() <= std::min(s, n));
  }
}

#if defined(__unix__) || defined(__APPLE__)
namespace {
struct ThreadJob {
  int n = 0;
  std::int64_t replayed = -2;
};
void* build_on_thread(void* arg) {
  auto* job = static_cast<ThreadJob*>(arg);
  job->replayed = quick_replay(CheckpointSchedule::revolve(job->n, job->n));
  return nullptr;
}
} // namespace

TEST_CASE("store_all schedules build on a thread with a 512 KiB stack (N = 20000)",
          "[checkpoint]") {
  // The recursive builder overflowed such a stack at N of about 3,000.
  pthread_attr_t attr;
  REQUIRE(pthread_attr_init(&attr) == 0);
  REQUIRE(pthread_attr_setstacksize(&attr, 512 * 1024) == 0);
  ThreadJob job{20000};
  pthread_t thread;
  REQUIRE(pthread_create(&thread, &attr, build_on_thread, &job) == 0);
  REQUIRE(pthread_join(thread, nullptr) == 0);
  pthread_attr_destroy(&attr);
  CHECK(job.replayed == job.n - 1);
}
#endif
