# diffgrad::mpi: MPI data parallelism (include/diffgrad/mpi/). Placeholder until it lands: no
# target is defined, so nothing depends on MPI.
