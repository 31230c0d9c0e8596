# sample_mpi (owner: mpi): sampling and exact gradients split over MPI ranks with the same
# bits for any number of ranks (docs/scaling.md). Built when diffgrad::mpi exists (MPI found).
# The ctest cases run it under mpiexec with 2 ranks and --check (rank 0 recomputes the batch in
# one process and exits 1 unless the bits agree); label mpi, so CI runs them in its Release
# half only (OpenMPI's allocations upset LeakSanitizer).
if(TARGET diffgrad_mpi AND NOT TARGET sample_mpi)
  add_executable(sample_mpi ${CMAKE_CURRENT_SOURCE_DIR}/sample_mpi.cpp)
  target_link_libraries(sample_mpi PRIVATE diffgrad::mpi)
  target_include_directories(sample_mpi PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  diffgrad_target_warnings(sample_mpi)

  # OpenMPI refuses to run as root and to start more ranks than cores without these flags;
  # MPICH's mpiexec does not know them (tests/mpi/CMakeLists.txt sets the same cache entry).
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
  foreach(_diffgrad_mode sample gradient)
    add_test(NAME "example: sample_mpi ${_diffgrad_mode} (2 ranks)"
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 ${MPIEXEC_PREFLAGS}
                     ${DIFFGRAD_MPIEXEC_EXTRA_FLAGS} $<TARGET_FILE:sample_mpi> ${MPIEXEC_POSTFLAGS}
                     --mode ${_diffgrad_mode} --batch 300 --chunk 64 --steps 6 --hidden 16
                     --check)
    set_tests_properties("example: sample_mpi ${_diffgrad_mode} (2 ranks)" PROPERTIES
                         LABELS "example;mpi" PROCESSORS 2 TIMEOUT 120
                         PASS_REGULAR_EXPRESSION "check against one process: identical bits")
  endforeach()
endif()
