include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(HATTN_CONFIG_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/HybridAttention)
install(TARGETS hattn EXPORT HybridAttentionTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/hattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT HybridAttentionTargets NAMESPACE HybridAttention:: DESTINATION ${HATTN_CONFIG_DIR})
export(EXPORT HybridAttentionTargets NAMESPACE HybridAttention::
       FILE ${PROJECT_BINARY_DIR}/HybridAttentionTargets.cmake)

set(HATTN_BUILT_WITH_CUDA ${HATTN_CUDA})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/HybridAttentionConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/HybridAttentionConfig.cmake
                              INSTALL_DESTINATION ${HATTN_CONFIG_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/HybridAttentionConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/HybridAttentionConfig.cmake
              ${PROJECT_BINARY_DIR}/HybridAttentionConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/XsimdXtlShim.cmake
        DESTINATION ${HATTN_CONFIG_DIR})
