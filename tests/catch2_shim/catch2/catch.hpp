#pragma once
// Catch2 v3 behind Catch2 v2's single header. The tests are written against Catch2 v2 (Debian 12
// ships only 2.13) and include <catch2/catch.hpp>; tests/CMakeLists.txt puts this directory
// first on their include path when it finds Catch2 v3 (Debian 13, Ubuntu 24.04), so the same
// test files build with both. This header maps the v2 names the tests use onto v3:
//   Approx                     -> Catch::Approx (v2 had it in the global namespace)
//   Catch::Contains("text")    -> Catch::Matchers::ContainsSubstring (v2's string matcher)
//   Catch::MatcherBase<T>      -> Catch::Matchers::MatcherBase<T>
// Catch::Matchers::Contains keeps v3's range overloads; the string overloads below are more
// specialised for string arguments, so `using Catch::Matchers::Contains; Contains("text")`
// means what it meant in v2.
#include <catch2/catch_all.hpp>

#include <cstddef>
#include <string>

#if CATCH_VERSION_MAJOR < 3
#error "tests/catch2_shim is for Catch2 v3; with Catch2 v2 it must not be on the include path"
#endif

namespace Catch {
namespace Matchers {
inline StringContainsMatcher Contains(const std::string& text,
                                      CaseSensitive case_sensitivity = CaseSensitive::Yes) {
  return ContainsSubstring(text, case_sensitivity);
}
inline StringContainsMatcher Contains(std::string&& text,
                                      CaseSensitive case_sensitivity = CaseSensitive::Yes) {
  return ContainsSubstring(text, case_sensitivity);
}
template <std::size_t N>
StringContainsMatcher Contains(const char (&text)[N],
                               CaseSensitive case_sensitivity = CaseSensitive::Yes) {
  return ContainsSubstring(std::string(text), case_sensitivity);
}
} // namespace Matchers

using Matchers::Contains;
template <class T> using MatcherBase = Matchers::MatcherBase<T>;
} // namespace Catch

using Catch::Approx;
