# diffgrad::torch: the LibTorch adapter (include/diffgrad/torch/, header-only). Built when
# LibTorch is found (Debian: libtorch-dev; or the LibTorch inside a PyPI torch wheel:
# -DCMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')).
# Without LibTorch the option is quietly OFF and nothing depends on it.
find_package(Torch QUIET)
set(_diffgrad_torch_default OFF)
if(Torch_FOUND)
  set(_diffgrad_torch_default ON)
endif()
option(DIFFGRAD_ENABLE_TORCH "Build the LibTorch adapter diffgrad::torch and its tests"
       ${_diffgrad_torch_default})
if(NOT DIFFGRAD_ENABLE_TORCH)
  return()
endif()
if(NOT Torch_FOUND)
  message(FATAL_ERROR "DIFFGRAD_ENABLE_TORCH is ON but LibTorch was not found: install "
                      "libtorch-dev, or point CMAKE_PREFIX_PATH (or Torch_DIR) at a LibTorch, "
                      "e.g. python -c 'import torch; print(torch.utils.cmake_prefix_path)'")
endif()

add_library(diffgrad_torch INTERFACE)
add_library(diffgrad::torch ALIAS diffgrad_torch)
target_link_libraries(diffgrad_torch INTERFACE diffgrad::diffgrad ${TORCH_LIBRARIES})
# LibTorch's headers do not compile cleanly under -Wall -Wextra -Wpedantic -Wshadow
# -Wconversion: make them system headers for our targets, whatever the imported target says
# (CMake already treats imported include directories as SYSTEM unless a project asks
# otherwise; this keeps it true for a LibTorch found by plain variables too).
target_include_directories(diffgrad_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
# LibTorch needs C++17; diffgrad needs C++20 (from diffgrad::diffgrad).
message(STATUS "diffgrad: LibTorch ${Torch_VERSION} found (${Torch_DIR}): diffgrad::torch is built")
