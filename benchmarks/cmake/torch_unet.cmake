# The learned digits UNet (data/models/) through the LibTorch adapter: the C++ sides of
# benchmarks/compare/bench_unet_*.py. Built only with diffgrad::torch (LibTorch found).
if(NOT TARGET diffgrad_torch)
  return()
endif()
foreach(_unet_driver unet_gradient unet_speed unet_inversion)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_unet_driver}.cpp)
    diffgrad_add_benchmark(${_unet_driver} ${_unet_driver}.cpp)
    target_link_libraries(${_unet_driver} PRIVATE diffgrad::torch)
    # The committed model files and digits, for the drivers' defaults.
    target_compile_definitions(${_unet_driver} PRIVATE
      DIFFGRAD_MODELS_DIR="${PROJECT_SOURCE_DIR}/data/models"
      DIFFGRAD_DIGITS_FILE="${PROJECT_SOURCE_DIR}/data/digits/digits.txt")
  endif()
endforeach()
