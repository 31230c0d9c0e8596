// Prints a hash of the bits of many Philox Gaussian draws and portable log/sin/cos values.
// Built twice (tests/cuda/CMakeLists.txt): with the project's flags and with FMA contraction
// forced on (-mfma -ffp-contract=fast). The CPU/GPU noise identity (detail/portable_math.hpp)
// requires both builds to print the same hash: no product may be fused into an FMA. On a CPU
// without FMA instructions the contracted build cannot run: it exits with 77 (skipped).
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "diffgrad/detail/philox.hpp"
#include "diffgrad/detail/portable_math.hpp"

namespace {
std::uint64_t mix(std::uint64_t h, double v) {
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return (h ^ b) * 1099511628211ull; // FNV-1a step on the 64-bit word
}
} // namespace

int main() {
#if defined(DIFFGRAD_NEEDS_FMA) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  if (!__builtin_cpu_supports("fma")) {
    std::printf("SKIPPED: no FMA instructions on this CPU\n");
    return 77;
  }
#endif
  std::uint64_t h = 1469598103934665603ull;
  for (std::uint64_t i = 0; i < 1000000; ++i) h = mix(h, diffgrad::detail::gaussian(123, i % 7, i));
  for (std::uint64_t i = 1; i <= 200000; ++i) {
    const double u = static_cast<double>(i) / 200000.0;
    h = mix(h, diffgrad::detail::portable::log_normal(u));
    h = mix(h, diffgrad::detail::portable::log_normal(u * 1099511627776.0)); // exact: 2^40
    h = mix(h, diffgrad::detail::portable::sin_or_cos_two_pi(u, true));
    h = mix(h, diffgrad::detail::portable::sin_or_cos_two_pi(u, false));
  }
  std::printf("%016llx\n", static_cast<unsigned long long>(h));
  return 0;
}
