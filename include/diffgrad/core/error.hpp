#pragma once
// Error reporting: every rejected input names the argument, what was expected and what
// was given. All checks run on the host, before or between fused passes.
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace diffgrad {

/// Thrown for invalid user input (bad grid, out-of-range parameter, shape mismatch).
class invalid_argument : public std::invalid_argument {
public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown when a numerical result is unusable (NaN/Inf from the model, non-invertible step).
class numerical_error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts> std::string concat(const Parts&... parts) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << parts);
  return os.str();
}

/// Throws diffgrad::invalid_argument("<where>: argument '<arg>' expected <expected>, got <given>").
template <class Given>
[[noreturn]] void throw_argument(const char* where, const char* arg, const std::string& expected,
                                 const Given& given) {
  throw invalid_argument(
      concat(where, ": argument '", arg, "' expected ", expected, ", got ", given));
}

inline void require(bool ok, const char* where, const char* arg, const std::string& expected,
                    double given) {
  if (!ok) throw_argument(where, arg, expected, given);
}
/// Same, for a literal `expected`: builds the message only on failure, so a passing check
/// never allocates (checks run inside validate() and plan(), i.e. around the step loop).
inline void require(bool ok, const char* where, const char* arg, const char* expected,
                    double given) {
  if (!ok) throw_argument(where, arg, std::string(expected), given);
}

inline void require_finite(double value, const char* where, const char* arg) {
  if (!std::isfinite(value)) throw_argument(where, arg, "a finite number", value);
}

/// Checked size arithmetic for non-negative std::int64_t operands (layer widths, parameter
/// counts): false on overflow, where the plain expression would be undefined behaviour.
inline bool checked_add(std::int64_t a, std::int64_t b, std::int64_t& out) {
  if (a < 0 || b < 0 || a > std::numeric_limits<std::int64_t>::max() - b) return false;
  out = a + b;
  return true;
}
inline bool checked_mul(std::int64_t a, std::int64_t b, std::int64_t& out) {
  if (a < 0 || b < 0 || (b != 0 && a > std::numeric_limits<std::int64_t>::max() / b)) return false;
  out = a * b;
  return true;
}

} // namespace detail
} // namespace diffgrad
