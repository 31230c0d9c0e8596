# DiffFlow table (owner: DiffFlow): NLL of DiffFlow vs a VP diffusion baseline with the same
# networks, loss and budget on a 2-D toy, and training time (no Google Benchmark).
if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/diffflow_tables.cpp AND NOT TARGET diffflow_tables)
  diffgrad_add_benchmark(diffflow_tables diffflow_tables.cpp)
endif()
