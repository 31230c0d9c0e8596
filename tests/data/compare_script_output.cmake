# cmake -DPYTHON=<python> -DSCRIPT=<script.py> -DEXPECTED=<file> -P compare_script_output.cmake
# Runs the script and fails unless its standard output equals the committed file byte for byte.
execute_process(COMMAND "${PYTHON}" "${SCRIPT}" OUTPUT_VARIABLE _actual RESULT_VARIABLE _rc
                ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "${SCRIPT} failed (exit ${_rc}):\n${_err}")
endif()
file(READ "${EXPECTED}" _expected)
if(NOT _actual STREQUAL _expected)
  message(FATAL_ERROR "${EXPECTED} differs from what ${SCRIPT} prints: regenerate it with\n"
                      "  python3 ${SCRIPT} > ${EXPECTED}\nand review the diff (a change in the "
                      "noise streams is a breaking change, see CHANGELOG.md)")
endif()
message(STATUS "${EXPECTED} matches ${SCRIPT}")
