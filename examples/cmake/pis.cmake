# pis (owner: PIS): the Path Integral Sampler on the 9-mode mixture and Neal's funnel: training,
# the log Z table and a labelled scatter PNG through examples/common/png_writer.hpp (libpng).
# Skipped without libpng. The smoke test uses tiny arguments; it also runs the self-check on
# the optimal control's importance-weighted log Z.
find_package(PNG)
if(PNG_FOUND AND NOT TARGET pis)
  add_executable(pis ${CMAKE_CURRENT_SOURCE_DIR}/pis.cpp)
  target_link_libraries(pis PRIVATE diffgrad::diffgrad PNG::PNG)
  target_include_directories(pis PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(pis PRIVATE DIFFGRAD_EXAMPLES_OUTPUT_DIR="${CMAKE_CURRENT_BINARY_DIR}")
  diffgrad_target_warnings(pis)
  add_test(NAME "example: pis" COMMAND pis --iterations 3 --batch 16 --steps 10 --hidden 8
           --eval-samples 300 --eval-batches 3 --out example_pis.png)
  set_tests_properties("example: pis" PROPERTIES LABELS example)
elseif(NOT PNG_FOUND)
  message(STATUS "diffgrad: libpng not found, the pis example is skipped")
endif()
