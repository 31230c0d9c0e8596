#pragma once
// Shared by the benchmark programs: a reporter that keeps the median of every benchmark (so
// the program can print its ratio table after Google Benchmark's own output), the machine
// load, and argv handling that turns on repetitions and random interleaving by default (the
// machine is shared: interleaving spreads load changes over all benchmarks alike, so the
// ratios measured in one run stay fair).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace bench {

struct Median {
  double seconds = 0; ///< median real time per iteration
  std::map<std::string, double> counters;
};

/// Console output as usual, and the medians kept by benchmark name (aggregate "median").
class MedianReporter : public benchmark::ConsoleReporter {
public:
  void ReportRuns(const std::vector<Run>& runs) override {
    benchmark::ConsoleReporter::ReportRuns(runs);
    for (const auto& r : runs) {
      const bool single = r.repetitions <= 1 && r.run_type == Run::RT_Iteration;
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (r.error_occurred || !(single || median)) continue;
      Median m;
      m.seconds = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      for (const auto& [name, counter] : r.counters) m.counters[name] = counter.value;
      // Keyed "function/args" (no "/manual_time" or repetition suffixes).
      medians[r.run_name.function_name + "/" + r.run_name.args] = m;
    }
  }
  const Median* find(const std::string& name) const {
    const auto it = medians.find(name);
    return it == medians.end() ? nullptr : &it->second;
  }
  std::map<std::string, Median> medians;
};

/// "load average: 1m 5m 15m" from /proc/loadavg.
inline std::string load_average() {
  std::ifstream in("/proc/loadavg");
  double a = 0, b = 0, c = 0;
  in >> a >> b >> c;
  char text[96];
  std::snprintf(text, sizeof text, "load average %.2f %.2f %.2f", a, b, c);
  return text;
}

/// argv with defaults prepended (repetitions, random interleaving, median-only aggregates);
/// flags the user passes come later and win.
inline std::vector<char*> with_defaults(int argc, char** argv, int repetitions) {
  static std::vector<std::string> storage;
  storage = {"--benchmark_repetitions=" + std::to_string(repetitions),
             "--benchmark_enable_random_interleaving=true",
             "--benchmark_report_aggregates_only=true"};
  std::vector<char*> out{argv[0]};
  for (auto& s : storage) out.push_back(s.data());
  for (int i = 1; i < argc; ++i) out.push_back(argv[i]);
  return out;
}

/// Reads and removes "--reps N" (default `default_reps`), prepends the defaults of
/// with_defaults and hands the rest to Google Benchmark. Returns the repetitions.
inline int initialize(int argc, char** argv, int default_reps) {
  int reps = default_reps;
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else
      rest.push_back(argv[i]);
  }
  auto args = with_defaults(static_cast<int>(rest.size()), rest.data(), reps);
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  return reps;
}

} // namespace bench
