#pragma once
// Every example's main() runs its body through run_main, so that no exception reaches
// std::terminate (which aborts with "terminate called after throwing ..." and, under ctest,
// a crash instead of a failure): diffgrad's errors (diffgrad::invalid_argument,
// diffgrad::numerical_error, ...) and the examples' own std::runtime_error are printed with the
// program's name and turned into exit status 1.
//
//   int main(int argc, char** argv) {
//     return examples::run_main("guide", [&] { ...; return 0; });
//   }
//
// Exit codes used by the examples: 0 success, 1 a failed run or self-check, 2 bad options.
#include <cstdio>
#include <exception>
#include <new>

namespace examples {

template <class Body> int run_main(const char* program, Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory\n", program);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
  } catch (...) {
    std::fprintf(stderr, "%s: error: unknown exception\n", program);
  }
  return 1;
}

} // namespace examples
