# diffgrad::mpi: MPI data parallelism (include/diffgrad/mpi/). The MPI-free chunk rules and the
# chunked driver (include/diffgrad/parallel/) are part of diffgrad::diffgrad; only the headers
# that include <mpi.h> need this component. Defined when an MPI C++ installation is found
# (Debian: libopenmpi-dev or libmpich-dev) and DIFFGRAD_ENABLE_MPI is on; everything else
# builds without MPI.
find_package(MPI QUIET COMPONENTS CXX)
option(DIFFGRAD_ENABLE_MPI "Build the diffgrad::mpi component (MPI data parallelism)" ${MPI_CXX_FOUND})
if(DIFFGRAD_ENABLE_MPI)
  if(NOT MPI_CXX_FOUND)
    message(FATAL_ERROR "diffgrad: DIFFGRAD_ENABLE_MPI is ON but no MPI C++ installation was "
                        "found (Debian: apt-get install libopenmpi-dev openmpi-bin); set "
                        "MPI_CXX_COMPILER or turn the option off")
  endif()
  message(STATUS "diffgrad: MPI ${MPI_CXX_VERSION} found: diffgrad::mpi is available "
                 "(mpiexec: ${MPIEXEC_EXECUTABLE})")
  add_library(diffgrad_mpi INTERFACE)
  add_library(diffgrad::mpi ALIAS diffgrad_mpi)
  # Installed and exported as diffgrad::mpi (the export name drops the prefix).
  set_target_properties(diffgrad_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(diffgrad_mpi INTERFACE diffgrad::diffgrad MPI::MPI_CXX)

  # mpiexec flags for the MPI tests and examples: Open MPI refuses to run as root and to start
  # more ranks than cores without these; MPICH's mpiexec does not know them.
  if(NOT DEFINED DIFFGRAD_MPIEXEC_EXTRA_FLAGS)
    set(_diffgrad_mpiexec_flags "")
    execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version
                    OUTPUT_VARIABLE _diffgrad_mpiexec_version ERROR_QUIET)
    if(_diffgrad_mpiexec_version MATCHES "Open MPI|OpenRTE")
      set(_diffgrad_mpiexec_flags --allow-run-as-root --oversubscribe)
    endif()
    set(DIFFGRAD_MPIEXEC_EXTRA_FLAGS "${_diffgrad_mpiexec_flags}" CACHE STRING
        "Extra mpiexec flags for diffgrad's MPI tests and examples")
  endif()
else()
  message(STATUS "diffgrad: diffgrad::mpi is not built (MPI not found or DIFFGRAD_ENABLE_MPI=OFF)")
endif()
