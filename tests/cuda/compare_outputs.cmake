# ctest helper: runs FIRST and SECOND (executables) and fails unless both print the same text.
# Exit code 77 of either (a skipped run) is passed through.
foreach(_which FIRST SECOND)
  execute_process(COMMAND ${${_which}} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out_${_which})
  if(_rc EQUAL 77)
    message("${_out_${_which}}")
    # ctest's SKIP_REGULAR_EXPRESSION matches this line.
    message(STATUS "SKIPPED: ${${_which}} cannot run here")
    return()
  elseif(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${${_which}} failed with ${_rc}: ${_out_${_which}}")
  endif()
endforeach()
if(NOT _out_FIRST STREQUAL _out_SECOND)
  message(FATAL_ERROR "outputs differ:\n  ${FIRST}: ${_out_FIRST}  ${SECOND}: ${_out_SECOND}")
endif()
message(STATUS "identical: ${_out_FIRST}")
