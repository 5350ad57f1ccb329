# Mounting recovery points without downloading them, and single-file restore (issue 9):
# library vmsnap_mount (FUSE image filesystem, block cache, loop/mount layout), the admin CLI
# `vmsnap`, and the mount_tests suite. Included at the end of the root CMakeLists.txt.
# Needs libfuse3 (Debian: libfuse3-dev to build, fuse3 to run).

pkg_check_modules(FUSE3 REQUIRED IMPORTED_TARGET fuse3)

add_library(vmsnap_mount STATIC
  ${PROJECT_SOURCE_DIR}/agent/mount/block_cache.cpp
  ${PROJECT_SOURCE_DIR}/agent/mount/image_source.cpp
  ${PROJECT_SOURCE_DIR}/agent/mount/image_fs.cpp
  ${PROJECT_SOURCE_DIR}/agent/mount/system.cpp
  ${PROJECT_SOURCE_DIR}/agent/mount/attach.cpp
  ${PROJECT_SOURCE_DIR}/agent/mount/restore_files.cpp)
target_link_libraries(vmsnap_mount PUBLIC vmsnap_agent_lib vmsnap_settings Threads::Threads
                                   PRIVATE PkgConfig::FUSE3)

add_executable(vmsnap ${PROJECT_SOURCE_DIR}/vault/admin_cli.cpp)
target_link_libraries(vmsnap PRIVATE vmsnap_mount vmsnap_admin_lib vmsnap_agent_lib CLI11::CLI11)
install(TARGETS vmsnap RUNTIME DESTINATION bin)

if(BUILD_TESTING)
  file(GLOB VMSNAP_MOUNT_TEST_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/mount_*.cpp)
  add_executable(mount_tests ${PROJECT_SOURCE_DIR}/tests/unit_main.cpp
                             ${VMSNAP_MOUNT_TEST_SOURCES})
  target_link_libraries(mount_tests PRIVATE vmsnap_mount vmsnap_test_support doctest::doctest)
  target_compile_definitions(mount_tests PRIVATE VMSNAP_ADMIN_BINARY="$<TARGET_FILE:vmsnap>")
  add_dependencies(mount_tests vmsnap vmsnap-agent vmsnap-vault)
  add_test(NAME mount COMMAND mount_tests)
endif()

if(BUILD_TESTING)
  # A one-file FUSE filesystem whose reads of a chosen range fail with EIO, for the data path's
  # test of a disk that cannot be read (tests/support/eio_fs.cpp). Not installed.
  add_executable(vmsnap-test-eio-fs ${PROJECT_SOURCE_DIR}/tests/support/eio_fs.cpp)
  target_link_libraries(vmsnap-test-eio-fs PRIVATE vmsnap_settings PkgConfig::FUSE3)
  target_compile_definitions(data_path_tests
                             PRIVATE VMSNAP_EIO_FS_BINARY="$<TARGET_FILE:vmsnap-test-eio-fs>")
  add_dependencies(data_path_tests vmsnap-test-eio-fs)
endif()
