// Catch2 main for the MPI tests: MPI is initialised before the tests and finalised after,
// and the exit code is the worst of all ranks', so ctest sees a failure on any rank.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

#include "diffgrad/mpi/communicator.hpp"

int main(int argc, char* argv[]) {
  diffgrad::mpi::Environment environment(argc, argv);
  const int local = Catch::Session().run(argc, argv);
  int worst = 0;
  MPI_Allreduce(&local, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
