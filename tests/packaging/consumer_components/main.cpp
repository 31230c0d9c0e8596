// Uses each requested optional component of an installed diffgrad: the adapter type for
// LibTorch, the communicator for MPI (compiled and linked only).
#ifdef DIFFGRAD_CONSUMER_USES_TORCH
#include "diffgrad/torch/noise_model.hpp"
#endif
#ifdef DIFFGRAD_CONSUMER_USES_MPI
#include "diffgrad/mpi/data_parallel.hpp"
#endif
#include <cstdio>

int main(int argc, char** argv) {
#ifdef DIFFGRAD_CONSUMER_USES_TORCH
  // Referenced so that the adapter's code is instantiated and linked against LibTorch.
  if (argc > 1) diffgrad::models::TorchNoiseModel<double>::load("model.pt", {});
#endif
#ifdef DIFFGRAD_CONSUMER_USES_MPI
  if (argc > 2) diffgrad::mpi::Environment environment(argc, argv);
#endif
  std::printf("diffgrad components consumer: built\n");
  return 0;
}
