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

  # DIFFGRAD_MPIEXEC_EXTRA_FLAGS: cmake/diffgradMpi.cmake (Open MPI: --allow-run-as-root
  # --oversubscribe).
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
