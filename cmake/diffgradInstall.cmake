# Install rules (DIFFGRAD_INSTALL): headers, the CMake package (find_package(diffgrad CONFIG),
# components diffgrad::diffgrad and, on request, diffgrad::cuda, diffgrad::torch and
# diffgrad::mpi: diffgradConfig.cmake.in), a pkg-config file and the
# license. Everything goes under share/ and include/: the library is header-only, so one
# install serves every architecture.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(_diffgrad_cmake_dir ${CMAKE_INSTALL_DATADIR}/cmake/diffgrad)

install(TARGETS diffgrad EXPORT diffgradTargets)
install(DIRECTORY include/diffgrad DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT diffgradTargets NAMESPACE diffgrad:: DESTINATION ${_diffgrad_cmake_dir})
# The cuda component in its own export file, read only when a consumer asks for it (it needs
# CUDAToolkit); the target is header-only too, so installs built without nvcc carry it.
install(TARGETS diffgrad_cuda EXPORT diffgradCudaTargets)
install(EXPORT diffgradCudaTargets NAMESPACE diffgrad:: DESTINATION ${_diffgrad_cmake_dir})

configure_package_config_file(cmake/diffgradConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfig.cmake
  INSTALL_DESTINATION ${_diffgrad_cmake_dir})
# Header-only: any architecture can use the package.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/diffgradConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfigVersion.cmake
        DESTINATION ${_diffgrad_cmake_dir})

# pkg-config: share/pkgconfig/diffgrad.pc, relocatable (paths relative to the file itself).
set(_diffgrad_pc_dir ${CMAKE_INSTALL_DATADIR}/pkgconfig)
file(RELATIVE_PATH _diffgrad_pc_prefix_from_pcdir "/root/${_diffgrad_pc_dir}" "/root")
string(REGEX REPLACE "/$" "" _diffgrad_pc_prefix_from_pcdir "${_diffgrad_pc_prefix_from_pcdir}")
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(_diffgrad_pc_includedir "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(_diffgrad_pc_includedir "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(cmake/diffgrad.pc.in ${CMAKE_CURRENT_BINARY_DIR}/diffgrad.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/diffgrad.pc DESTINATION ${_diffgrad_pc_dir})

install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/diffgrad)
