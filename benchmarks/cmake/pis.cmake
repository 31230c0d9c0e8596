# Path Integral Sampler tables (owner: PIS; RESULTS.md, no Google Benchmark): log Z of trained
# PIS-NN / PIS-Grad on the 9-mode mixture and the funnel beside the thesis's Table 5.1, and
# the training iteration's time and memory per adjoint memory mode at N = 100 and 1000.
diffgrad_add_benchmark(pis_tables pis_tables.cpp)
# Eigen's AVX-512 exp (pexp_double: .exp() of the log-weights and mixture responsibilities)
# trips GCC 12's -Wuninitialized inside avx512fintrin.h under -march=native, like the
# -Wmaybe-uninitialized case in benchmarks/CMakeLists.txt; not in diffgrad's code.
if(DIFFGRAD_BENCH_NATIVE AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_compile_options(pis_tables PRIVATE -Wno-uninitialized)
endif()
