# diffflow (owner: DiffFlow): trains DiffFlow on a 2-D toy, prints the PF-ODE NLL and writes a
# labelled PNG of samples through libpng (skipped without libpng).
find_package(PNG)
if(PNG_FOUND AND NOT TARGET diffflow AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/diffflow.cpp)
  add_executable(diffflow diffflow.cpp)
  target_link_libraries(diffflow PRIVATE diffgrad::diffgrad PNG::PNG)
  target_include_directories(diffflow PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(diffflow PRIVATE
    DIFFGRAD_EXAMPLES_OUTPUT_DIR="${CMAKE_CURRENT_BINARY_DIR}")
  diffgrad_target_warnings(diffflow)
  add_test(NAME "example: diffflow" COMMAND diffflow --iterations 4 --batch 16 --steps 4
           --hidden 8 --samples 50 --nll-samples 8 --ode-substeps 1 --out example_diffflow.png)
  set_tests_properties("example: diffflow" PROPERTIES LABELS example)
elseif(NOT PNG_FOUND)
  message(STATUS "diffgrad: libpng not found, the diffflow example is skipped")
endif()
