# cmake -P script: the code block between
#   <!-- BEGIN <path> -->  and  <!-- END <path> -->
# in README.md must be byte-identical to the file <path>, so the README never shows code that
# CI does not compile and run. Inputs: -DREADME=<README.md> -DSOURCE_ROOT=<repo> -DPATH=<path>.
cmake_minimum_required(VERSION 3.21)
file(READ "${README}" readme)
file(READ "${SOURCE_ROOT}/${PATH}" source)
set(begin_marker "<!-- BEGIN ${PATH} -->\n```cpp\n")
set(end_marker "```\n<!-- END ${PATH} -->")
string(FIND "${readme}" "${begin_marker}" begin)
string(FIND "${readme}" "${end_marker}" end)
if(begin EQUAL -1 OR end EQUAL -1)
  message(FATAL_ERROR "README.md has no block marked <!-- BEGIN ${PATH} --> ... <!-- END ${PATH} -->")
endif()
string(LENGTH "${begin_marker}" begin_length)
math(EXPR start "${begin} + ${begin_length}")
math(EXPR length "${end} - ${start}")
string(SUBSTRING "${readme}" ${start} ${length} snippet)
if(NOT snippet STREQUAL source)
  message(FATAL_ERROR "README.md's copy of ${PATH} differs from the file: paste the file "
                      "between the markers again")
endif()
message(STATUS "README.md shows ${PATH} verbatim")
