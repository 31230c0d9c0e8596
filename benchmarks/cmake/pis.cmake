# Path Integral Sampler tables (owner: PIS; RESULTS.md, no Google Benchmark): log Z of trained
# PIS-NN / PIS-Grad on the 9-mode mixture and the funnel beside the thesis's Table 5.1, and
# the training iteration's time and memory per adjoint memory mode at N = 100 and 1000.
diffgrad_add_benchmark(pis_tables pis_tables.cpp)
