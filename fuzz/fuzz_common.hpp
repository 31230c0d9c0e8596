#pragma once
// Shared policy of the libFuzzer targets (docs/fuzzing.md). Every target states one invariant:
// for ANY input the entry point either returns a valid object or throws one of diffgrad's own
// exceptions (diffgrad::invalid_argument for bad input, diffgrad::numerical_error for unusable
// numbers). A crash, a sanitizer report, or any other exception escaping (std::out_of_range,
// std::length_error, std::bad_alloc, an nlohmann::json exception, ...) is a finding: the target
// aborts so that libFuzzer saves the input.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <typeinfo>

#include "diffgrad/core/error.hpp"

namespace diffgrad::fuzz {

[[noreturn]] inline void finding(const char* target, const char* what) {
  std::fprintf(stderr, "diffgrad fuzz target '%s': invariant violated: %s\n", target, what);
  std::abort();
}

/// Runs body(); diffgrad's exceptions are the documented way to refuse an input, anything else
/// escaping is a finding.
template <class Body> void expect_valid_or_diffgrad_error(const char* target, Body&& body) {
  try {
    body();
  } catch (const diffgrad::invalid_argument&) {
  } catch (const diffgrad::numerical_error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception of type %s: %s\n", typeid(e).name(), e.what());
    finding(target, "an exception other than diffgrad::invalid_argument / numerical_error");
  } catch (...) {
    finding(target, "a non-std exception");
  }
}

} // namespace diffgrad::fuzz
