# The CUDA backend: target diffgrad::cuda (INTERFACE, header-only like diffgrad::diffgrad)
# = diffgrad::diffgrad + the CUDA runtime + cuBLAS, C++20 for CUDA sources. Included by the top
# CMakeLists.txt when DIFFGRAD_ENABLE_CUDA is ON (the target is then built and tested) or when
# install rules are generated (DIFFGRAD_INSTALL): the installed package always offers the cuda
# component, `find_package(diffgrad COMPONENTS cuda)`, which finds CUDAToolkit itself, so a
# build without nvcc still installs a package that CUDA users can consume.
#
# Architecture: sm_90 (H100/H200) unless CMAKE_CUDA_ARCHITECTURES is given, e.g.
#   cmake -DCMAKE_CUDA_ARCHITECTURES="80;90" ...   or   -DCMAKE_CUDA_ARCHITECTURES=native
# One architecture keeps CI compile time small (every .cu is compiled once per architecture).
add_library(diffgrad_cuda INTERFACE)
add_library(diffgrad::cuda ALIAS diffgrad_cuda)
set_target_properties(diffgrad_cuda PROPERTIES EXPORT_NAME cuda)
# CUDA::cudart and CUDA::cublas are CUDAToolkit's imported targets: found below in this build,
# and by diffgradConfig.cmake for an installed package.
target_link_libraries(diffgrad_cuda INTERFACE diffgrad::diffgrad CUDA::cudart CUDA::cublas)

if(NOT DIFFGRAD_ENABLE_CUDA)
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# C++20 for CUDA sources, in this build tree (the installed package sets it in
# diffgradConfig.cmake, for the consumer's CMake).
if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
  target_compile_features(diffgrad_cuda INTERFACE $<BUILD_INTERFACE:cuda_std_20>)
else()
  # CMake < 3.26 does not know nvcc's C++20 switch (no cuda_std_20 feature): pass it directly.
  target_compile_options(diffgrad_cuda INTERFACE
                         $<BUILD_INTERFACE:$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>>)
endif()
message(STATUS "diffgrad: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES})")

# diffgrad_cuda_target_warnings(<target>): the project's warnings for a target with .cu
# sources: nvcc's own diagnostics and the host compiler's -Wall -Wextra -Wshadow, all errors
# with DIFFGRAD_WARNINGS_AS_ERRORS (C++ sources of the same target get the usual set).
function(diffgrad_cuda_target_warnings target)
  if(COMMAND diffgrad_target_warnings)
    diffgrad_target_warnings(${target})
  endif()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow>)
  if(DIFFGRAD_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings -Xcompiler=-Werror>)
  endif()
endfunction()
