# Install rules and package config: find_package(diffgrad CONFIG) from the install tree.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS diffgrad EXPORT diffgradTargets)
install(DIRECTORY include/diffgrad DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT diffgradTargets NAMESPACE diffgrad::
        DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/diffgrad)
configure_package_config_file(cmake/diffgradConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/diffgrad)
# Header-only: any architecture can use the package.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/diffgradConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/diffgradConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/diffgrad)
