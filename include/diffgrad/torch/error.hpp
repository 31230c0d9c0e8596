#pragma once
// torch's errors as diffgrad errors: every LibTorch call of the adapter runs inside
// rethrow_torch_errors, which turns a c10::Error (shape mismatch in a kernel, a file that is
// no TorchScript archive) or the TorchScript interpreter's std::runtime_error (an operation
// failing inside a module) into diffgrad::torch_error with torch's own message kept (without
// its C++ backtrace) and the adapter function named.
// LibTorch's c10 logging header defines a glog-style CHECK macro, which would silently
// replace a test framework's CHECK (Catch2's); the adapter's headers restore whatever CHECK
// was before they included LibTorch (docs/torch.md).
#pragma push_macro("CHECK")
#include <c10/util/Exception.h>
#pragma pop_macro("CHECK")

#include <stdexcept>
#include <string>
#include <utility>

#include "diffgrad/core/error.hpp"

namespace diffgrad {

/// A LibTorch error raised while the adapter ran a network; what() is
/// "<adapter function>: torch error: <torch's message>".
class torch_error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Runs f(); a c10::Error escaping it becomes diffgrad::torch_error naming `where`, and so
/// does a std::runtime_error: the TorchScript interpreter reports a failing operation inside
/// a module as std::runtime_error (torch::jit::JITException for `raise` in the script), with
/// the TorchScript traceback and torch's original message in what(). diffgrad's own
/// exceptions (invalid_argument, numerical_error, torch_error) pass through unchanged.
template <class F> decltype(auto) rethrow_torch_errors(const char* where, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const torch_error&) {
    throw;
  } catch (const numerical_error&) {
    throw;
  } catch (const c10::Error& e) {
    throw torch_error(concat(where, ": torch error: ", e.what_without_backtrace()));
  } catch (const std::runtime_error& e) {
    throw torch_error(concat(where, ": torch error: ", e.what()));
  }
}

} // namespace detail
} // namespace diffgrad
