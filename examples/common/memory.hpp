#pragma once
// Peak resident memory (Linux /proc) of a piece of work, measured in a forked child so that
// memory freed by earlier work (which malloc keeps and reuses) cannot hide the growth:
//
//   const auto r = examples::run_isolated([&] { ...work...; return std::vector<double>{...}; });
//   r.payload (what the lambda returned), r.peak_growth_bytes
//
// In the child, free heap memory inherited from the parent is handed back to the kernel
// (malloc_trim: otherwise the work would reuse those already-resident pages and its growth
// would not show), the peak is reset (/proc/self/clear_refs, "5"), the resident size is read,
// the work runs, and the growth of the peak (VmHWM) over that start is reported with the
// payload through a pipe. Where /proc or fork is unavailable the work runs in-process and the growth
// is reported as -1.
#include <malloc.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace examples {

/// A field of /proc/self/status in bytes (VmRSS, VmHWM), or -1 when it cannot be read.
inline long long proc_status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.compare(0, key.size(), key) == 0) return std::stoll(line.substr(key.size())) * 1024;
  return -1;
}

/// Returns the heap's free pages to the kernel (glibc), so later allocations that reuse them
/// count as resident growth again.
inline void release_free_heap() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

/// Resets VmHWM to the current resident size (Linux >= 4.0). Returns false if not possible.
inline bool reset_peak_rss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

struct IsolatedResult {
  std::vector<double> payload;
  long long peak_growth_bytes = -1;  ///< VmHWM growth during the work; -1 = not measured
};

template <class Work> IsolatedResult run_isolated(Work&& work) {
  std::fflush(nullptr);  // or the child would print the parent's buffered output again
  int fds[2];
  if (pipe(fds) != 0) return IsolatedResult{work(), -1};
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return IsolatedResult{work(), -1};
  }
  if (pid == 0) {  // child: measure, run, send (count, growth, payload...), exit
    close(fds[0]);
    int code = 0;
    std::vector<double> msg;
    try {
      release_free_heap();
      const bool reset = reset_peak_rss();
      const long long start = proc_status_bytes("VmRSS");
      std::vector<double> payload = work();
      const long long peak = proc_status_bytes("VmHWM");
      msg.push_back(static_cast<double>(payload.size()));
      msg.push_back(reset && start >= 0 && peak >= 0 ? static_cast<double>(peak - start) : -1.0);
      msg.insert(msg.end(), payload.begin(), payload.end());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      code = 1;
    }
    const char* p = reinterpret_cast<const char*>(msg.data());
    std::size_t left = msg.size() * sizeof(double);
    while (left > 0) {
      const ssize_t n = write(fds[1], p, left);
      if (n <= 0) break;
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    close(fds[1]);
    std::fflush(nullptr);
    _exit(code);
  }
  close(fds[1]);
  std::vector<char> bytes;
  char buf[65536];
  for (;;) {
    const ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    bytes.insert(bytes.end(), buf, buf + n);
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || bytes.size() < 2 * sizeof(double))
    throw std::runtime_error("run_isolated: the measured work failed in the child process");
  std::vector<double> msg(bytes.size() / sizeof(double));
  std::memcpy(msg.data(), bytes.data(), msg.size() * sizeof(double));
  IsolatedResult r;
  r.peak_growth_bytes = static_cast<long long>(msg[1]);
  r.payload.assign(msg.begin() + 2, msg.end());
  return r;
}

} // namespace examples
