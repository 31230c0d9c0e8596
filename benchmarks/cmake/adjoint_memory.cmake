# Stored vectors and peak RSS of the exact discrete adjoint's store_all mode (no Google
# Benchmark needed; run build/benchmarks/adjoint_memory).
diffgrad_add_benchmark(adjoint_memory adjoint_memory.cpp)
