// Catch2 runner of the GPU tests: without a CUDA device (or driver) the executable prints why
// and exits with kSkipReturnCode, which ctest reports as "skipped" (SKIP_RETURN_CODE in
// tests/cuda/CMakeLists.txt). Listing the tests (--list-tests) works without a device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "diffgrad/backend/cuda/error.cuh"

namespace {
constexpr int kSkipReturnCode = 77;
}

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const auto& config = session.configData();
  const bool listing = config.listTests || config.listTestNamesOnly || config.listTags ||
                       config.listReporters || config.showHelp;
  if (!listing && diffgrad::gpu::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device visible (cudaGetDeviceCount == 0); the GPU tests need "
                "one.\n");
    return kSkipReturnCode;
  }
  return session.run();
}
