# cfg (owner: guidance): classifier-free guidance in a user-owned Stepper loop, one batched
# cond/uncond call per stage, on the exact digits mixture; checks itself against sample() with
# models::ClassifierFreeGuidance and writes a PNG through libpng (skipped without libpng).
find_package(PNG)
if(PNG_FOUND AND NOT TARGET cfg AND EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/cfg.cpp)
  add_executable(cfg cfg.cpp)
  target_link_libraries(cfg PRIVATE diffgrad::diffgrad PNG::PNG)
  target_include_directories(cfg PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_definitions(cfg PRIVATE
    DIFFGRAD_DIGITS_FILE="${PROJECT_SOURCE_DIR}/data/digits/digits.txt"
    DIFFGRAD_EXAMPLES_OUTPUT_DIR="${CMAKE_CURRENT_BINARY_DIR}")
  diffgrad_target_warnings(cfg)
  add_test(NAME "example: cfg" COMMAND cfg --steps 5 --batch 2 --scales 0,3
           --out example_cfg.png)
  set_tests_properties("example: cfg" PROPERTIES LABELS example)
elseif(NOT PNG_FOUND)
  message(STATUS "diffgrad: libpng not found, the cfg example is skipped")
endif()
