# sample and guide with `--model torch[:FILE]` (owner: examples on real networks): the learned
# digits UNet of data/models through the LibTorch adapter (examples/common/torch_model.hpp).
# Only when diffgrad::torch exists (LibTorch found); otherwise the two examples build exactly
# as before and refuse --model torch with a message saying they were built without LibTorch.
foreach(_diffgrad_torch_example sample guide)
  if(TARGET diffgrad_torch AND TARGET ${_diffgrad_torch_example})
    target_link_libraries(${_diffgrad_torch_example} PRIVATE diffgrad::torch)
    target_compile_definitions(${_diffgrad_torch_example} PRIVATE
      DIFFGRAD_EXAMPLES_WITH_TORCH=1
      DIFFGRAD_DIGITS_UNET_DIR="${PROJECT_SOURCE_DIR}/data/models")
  endif()
endforeach()

if(TARGET diffgrad_torch AND TARGET sample)
  add_test(NAME "example: sample torch" COMMAND sample --model torch --sampler ddim --steps 4
           --batch 10 --out example_sample_torch.png)
  add_test(NAME "example: sample torch f32" COMMAND sample
           --model torch:${PROJECT_SOURCE_DIR}/data/models/digits_unet_f32.pt --steps 4
           --batch 3 --labels 7 --out example_sample_torch_f32.png)
  set_tests_properties("example: sample torch" "example: sample torch f32"
                       PROPERTIES LABELS "example;torch")
  diffgrad_example_rejects("sample --model torch:missing" "option '--model'.*missing.pt"
                           sample --model torch:missing.pt --steps 2 --batch 1)
  set_tests_properties("example rejects: sample --model torch:missing"
                       "example rejects: sample --model torch:missing (exit code)"
                       PROPERTIES LABELS "example;torch")
endif()
if(TARGET diffgrad_torch AND TARGET guide)
  add_test(NAME "example: guide torch" COMMAND guide --model torch --steps 4 --batch 2
           --iterations 2 --modes exact,bdia --out example_guide_torch.png)
  set_tests_properties("example: guide torch" PROPERTIES LABELS "example;torch")
endif()
if(NOT TARGET diffgrad_torch AND TARGET sample)
  diffgrad_example_rejects("sample --model torch without LibTorch"
                           "sample: option '--model': this example was built without LibTorch"
                           sample --model torch --steps 2 --batch 1)
endif()
if(NOT TARGET diffgrad_torch AND TARGET guide)
  diffgrad_example_rejects("guide --model torch without LibTorch"
                           "guide: option '--model': this example was built without LibTorch"
                           guide --model torch --steps 2 --batch 1)
endif()
