# cmake -P script behind the packaging tests (see CMakeLists.txt beside it).
# Inputs: MODE (find_package | add_subdirectory), DIFFGRAD_SOURCE_DIR, CONSUMER_SOURCE_DIR,
# WORK_DIR (scratch, wiped first), GENERATOR, CXX_COMPILER, EXPECTED_VERSION.
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
# Only the consumer's own code, nothing of diffgrad's tests/examples/benchmarks; CUDA off so
# the test does not depend on a toolkit.
set(_common -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_BUILD_TYPE=Release)

if(MODE STREQUAL "find_package")
  set(_prefix "${WORK_DIR}/prefix")
  run_step("configure diffgrad for installation"
           ${CMAKE_COMMAND} -S "${DIFFGRAD_SOURCE_DIR}" -B "${WORK_DIR}/diffgrad-build" ${_common}
           "-DCMAKE_INSTALL_PREFIX=${_prefix}" -DDIFFGRAD_ENABLE_CUDA=OFF -DDIFFGRAD_BUILD_TESTS=OFF
           -DDIFFGRAD_BUILD_EXAMPLES=OFF -DDIFFGRAD_BUILD_BENCHMARKS=OFF)
  run_step("install diffgrad into ${_prefix}" ${CMAKE_COMMAND} --install "${WORK_DIR}/diffgrad-build")
  # The install tree must stand on its own: the consumer sees only the prefix.
  if(NOT EXISTS "${_prefix}/include/diffgrad/version.hpp")
    message(FATAL_ERROR "packaging: headers were not installed under ${_prefix}/include")
  endif()
  set(_consumer_args "-DCMAKE_PREFIX_PATH=${_prefix}" -DDIFFGRAD_CONSUMER_MODE=find_package)
elseif(MODE STREQUAL "add_subdirectory")
  set(_consumer_args "-DDIFFGRAD_SOURCE_DIR=${DIFFGRAD_SOURCE_DIR}"
                     -DDIFFGRAD_CONSUMER_MODE=add_subdirectory -DDIFFGRAD_ENABLE_CUDA=OFF)
else()
  message(FATAL_ERROR "run_packaging_test.cmake: unknown MODE '${MODE}'")
endif()

run_step("configure the consumer"
         ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/consumer-build" ${_common}
         ${_consumer_args} "-DEXPECTED_VERSION=${EXPECTED_VERSION}")
run_step("build the consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
run_step("run the consumer" "${WORK_DIR}/consumer-build/diffgrad_consumer")
message(STATUS "${last_output}")
