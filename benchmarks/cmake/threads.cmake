# EigenBackend on T threads (docs/threading.md): steps vs the same-T copy bandwidth, noise
# throughput and MLP sampling per thread count.
find_package(Threads REQUIRED)
diffgrad_add_benchmark(bench_threads bench_threads.cpp)
target_link_libraries(bench_threads PRIVATE benchmark::benchmark Threads::Threads)
