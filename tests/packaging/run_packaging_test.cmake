# cmake -P script behind the packaging tests (see CMakeLists.txt beside it).
# Inputs: MODE (find_package | add_subdirectory | find_package_cuda | find_package_components),
# COMPONENTS (comma-separated, for find_package_components), DIFFGRAD_SOURCE_DIR,
# CONSUMER_SOURCE_DIR, WORK_DIR (scratch, wiped first), GENERATOR, CXX_COMPILER,
# EXPECTED_VERSION; CUDA_COMPILER for find_package_cuda; PKG_CONFIG (optional) for
# find_package, which then also compiles the consumer with `pkg-config --cflags --libs diffgrad`.
cmake_minimum_required(VERSION 3.21)

foreach(_var MODE DIFFGRAD_SOURCE_DIR CONSUMER_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER
             EXPECTED_VERSION)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "run_packaging_test.cmake: -D${_var}=... is required")
  endif()
endforeach()

# Runs one command; stops the test with its output when it fails.
function(run_step what)
  message(STATUS "packaging (${MODE}): ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "packaging (${MODE}): '${what}' failed (exit ${_rc}):\n${_out}")
  endif()
  set(last_output "${_out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
# Only the consumer's own code, nothing of diffgrad's tests/examples/benchmarks.
set(_common -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_BUILD_TYPE=Release)

if(MODE MATCHES "^find_package")
  # Install from a tree configured as on a machine without Catch2 and without CUDA: the tests
  # are on (so the Catch2 detection runs and must only skip them), CUDA is off. The install
  # must still offer the cuda component (find_package_cuda uses it).
  set(_prefix "${WORK_DIR}/prefix")
  run_step("configure diffgrad for installation (no Catch2, no CUDA)"
           ${CMAKE_COMMAND} -S "${DIFFGRAD_SOURCE_DIR}" -B "${WORK_DIR}/diffgrad-build" ${_common}
           "-DCMAKE_INSTALL_PREFIX=${_prefix}" -DDIFFGRAD_ENABLE_CUDA=OFF
           -DCMAKE_DISABLE_FIND_PACKAGE_Catch2=ON -DDIFFGRAD_BUILD_TESTS=ON
           -DDIFFGRAD_BUILD_EXAMPLES=OFF -DDIFFGRAD_BUILD_BENCHMARKS=OFF)
  if(NOT last_output MATCHES "Catch2 \\(v2 or v3\\) not found, the Catch2 tests are skipped")
    message(FATAL_ERROR "packaging: without Catch2 the configure did not say the tests are "
                        "skipped:\n${last_output}")
  endif()
  run_step("install diffgrad into ${_prefix}" ${CMAKE_COMMAND} --install "${WORK_DIR}/diffgrad-build")
  # The install tree must stand on its own: the consumer sees only the prefix.
  foreach(_file include/diffgrad/version.hpp share/cmake/diffgrad/diffgradConfig.cmake
                share/cmake/diffgrad/diffgradCudaTargets.cmake share/pkgconfig/diffgrad.pc
                share/doc/diffgrad/LICENSE)
    if(NOT EXISTS "${_prefix}/${_file}")
      message(FATAL_ERROR "packaging: ${_file} was not installed under ${_prefix}")
    endif()
  endforeach()
  set(_consumer_args "-DCMAKE_PREFIX_PATH=${_prefix}" -DDIFFGRAD_CONSUMER_MODE=find_package)
elseif(MODE STREQUAL "add_subdirectory")
  # No CUDA option passed: a subproject must default to CUDA off. find_package(Eigen3) is
  # disabled: the consumer defines Eigen3::Eigen itself and diffgrad must reuse it.
  set(_consumer_args "-DDIFFGRAD_SOURCE_DIR=${DIFFGRAD_SOURCE_DIR}"
                     -DDIFFGRAD_CONSUMER_MODE=add_subdirectory
                     -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=ON -DCMAKE_DISABLE_FIND_PACKAGE_Catch2=ON)
else()
  message(FATAL_ERROR "run_packaging_test.cmake: unknown MODE '${MODE}'")
endif()

if(MODE STREQUAL "find_package_cuda")
  if(NOT CUDA_COMPILER)
    message(FATAL_ERROR "run_packaging_test.cmake: -DCUDA_COMPILER=... is required")
  endif()
  run_step("configure the CUDA consumer (find_package(diffgrad COMPONENTS cuda))"
           ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/consumer-build" ${_common}
           "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}" "-DCMAKE_PREFIX_PATH=${_prefix}")
  run_step("build the CUDA consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
  message(STATUS "packaging (${MODE}): built; not run (no GPU needed)")
  return()
endif()

if(MODE STREQUAL "find_package_components")
  # COMPONENTS comes comma-separated (a list would be split by the test's command line).
  string(REPLACE "," ";" _components "${COMPONENTS}")
  run_step("configure the components consumer (find_package(diffgrad COMPONENTS ${_components}))"
           ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/consumer-build" ${_common}
           "-DCMAKE_PREFIX_PATH=${_prefix}" "-DCOMPONENTS=${_components}")
  run_step("build the components consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
  run_step("run the components consumer" "${WORK_DIR}/consumer-build/diffgrad_components_consumer")
  return()
endif()

run_step("configure the consumer"
         ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/consumer-build" ${_common}
         ${_consumer_args} "-DEXPECTED_VERSION=${EXPECTED_VERSION}")
run_step("build the consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
run_step("run the consumer" "${WORK_DIR}/consumer-build/diffgrad_consumer")
message(STATUS "${last_output}")

# pkg-config: the same program compiled with nothing but `pkg-config --cflags --libs diffgrad`.
if(MODE STREQUAL "find_package" AND PKG_CONFIG)
  execute_process(COMMAND ${CMAKE_COMMAND} -E env "PKG_CONFIG_PATH=${_prefix}/share/pkgconfig"
                          "${PKG_CONFIG}" --cflags --libs diffgrad
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _cflags ERROR_VARIABLE _err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "packaging: pkg-config --cflags --libs diffgrad failed:\n${_err}")
  endif()
  separate_arguments(_cflags UNIX_COMMAND "${_cflags}")
  run_step("compile the consumer with pkg-config's flags (${_cflags})"
           "${CXX_COMPILER}" -std=c++20 -O1 ${_cflags}
           "-DDIFFGRAD_CONSUMER_EXPECTED_VERSION=\"${EXPECTED_VERSION}\""
           "${CONSUMER_SOURCE_DIR}/main.cpp" -o "${WORK_DIR}/consumer-pkg-config")
  run_step("run the pkg-config consumer" "${WORK_DIR}/consumer-pkg-config")
endif()
