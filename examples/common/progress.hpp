#pragma once
// A one-line progress bar on stderr for the examples' long loops:
//
//   examples::ProgressBar bar("sampling", num_steps);
//   for (...) { ...; bar.update(i + 1); }
//   bar.finish();
//
// It redraws in place ('\r') only when stderr is a terminal; in a log (ctest, CI, a pipe) it
// stays silent, so logs are not flooded. diffgrad's sampler observers have the signature
// obs(step, num_steps, node, state): ProgressBar::observer() returns one.
#include <chrono>
#include <cstdio>
#include <string>
#include <unistd.h>

namespace examples {

class ProgressBar {
public:
  ProgressBar(std::string label, long total)
      : label_(std::move(label)), total_(total > 0 ? total : 1),
        enabled_(isatty(fileno(stderr)) != 0), start_(std::chrono::steady_clock::now()) {}
  ~ProgressBar() { finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  /// Shows `done` of `total`; redraws at most every 1/20 of the run (and at the end).
  void update(long done, const std::string& note = "") {
    if (!enabled_ || finished_) return;
    const long tick = total_ / 20 > 0 ? total_ / 20 : 1;
    if (done != total_ && done - last_ < tick) return;
    last_ = done;
    constexpr int width = 30;
    const int filled = static_cast<int>(width * done / total_);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(stderr, "\r%-12s [%.*s%*s] %ld/%ld %6.1fs %s", label_.c_str(), filled,
                 "##############################", width - filled, "", done, total_, secs,
                 note.c_str());
    std::fflush(stderr);
  }

  /// Ends the line (once).
  void finish() {
    if (!enabled_ || finished_) return;
    finished_ = true;
    std::fprintf(stderr, "\n");
  }

  /// A sampler observer (diffgrad/concepts/observer.hpp) that advances this bar.
  auto observer() {
    return [this](int step, int, const auto&, const auto&) { update(step); };
  }

private:
  std::string label_;
  long total_;
  bool enabled_;
  bool finished_ = false;
  long last_ = -1;
  std::chrono::steady_clock::time_point start_;
};

} // namespace examples
