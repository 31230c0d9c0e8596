// Binomial checkpointing: the closed form t(N, s) and the generated schedules against a
// brute-force dynamic program, REFERENCE.md's values, a symbolic replay of every schedule
// (order, slot use, advance count) and bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

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
  std::int64_t advances = 0;  // one-step advances, output excluded
  int outputs = 0;
  int peak_slots = 0;
};

/// Executes a schedule symbolically and checks every rule an executor relies on.
Replay replay(const CheckpointSchedule& sch) {
  const int n = sch.num_steps();
  Replay r;
  std::map<int, int> slot_step;  // occupied slots -> their step
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
    case CheckpointOp::discard:
      REQUIRE(slot_step.erase(a.slot) == 1);
      break;
    case CheckpointOp::advance:
      REQUIRE(a.step > current);
      REQUIRE(a.step <= next_reverse);  // never advance past the next step to reverse
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
  REQUIRE(next_reverse == -1);  // every step reversed, last first
  REQUIRE(slot_step.empty());   // every slot released
  return r;
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

TEST_CASE("t(N, s) reproduces REFERENCE.md's values", "[checkpoint]") {
  CHECK(revolve_advances(10, 2) == 20);
  CHECK(revolve_advances(50, 5) == 122);
  CHECK(revolve_advances(100, 8) == 245);
  for (int n : {2, 3, 10, 37, 100, 1000}) {
    CHECK(revolve_advances(n, n - 1) == n - 1);  // store all
    CHECK(revolve_advances(n, 1) == static_cast<std::int64_t>(n) * (n - 1) / 2);
  }
  CHECK(revolve_beta(2, 3) == 10);  // C(5, 2)
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
