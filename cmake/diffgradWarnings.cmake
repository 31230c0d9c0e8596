# diffgrad_target_warnings(<target>): the project's warning set for its own binaries.
function(diffgrad_target_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion>)
  if(DIFFGRAD_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
  if(DIFFGRAD_SANITIZE)
    # UBSan's per-dereference null and alignment checks double GCC's compile time on
    # Eigen-heavy code (measured 28 s -> 14 s for one test file at -O1) and add little here:
    # ASan reports null dereferences, and x86 tolerates misalignment except in Eigen's own
    # aligned loads, which fault loudly anyway.
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer
                                             -fno-sanitize-recover=undefined
                                             -fno-sanitize=alignment,null)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()
