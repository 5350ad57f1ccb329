# The Windows agent (issue 8), cross-built with cmake/Toolchain-mingw-w64.cmake: the Windows
# consistency engine (hooks, VSS, the "file"/"command" snapshot providers), linked into
# vmsnap-agent.exe, and windows_tests.exe, the doctest suite run under Wine by
# scripts/windows-test.sh. Included by the root CMakeLists.txt on Windows only.

# The Windows quiesce/snapshot layer (VSS and the service are in vmsnap_platform, see
# platform/CMakeLists.txt), the hooks and the consistency orchestration.
add_library(vmsnap_consistency STATIC ${PROJECT_SOURCE_DIR}/platform/windows/quiesce.cpp
                                      ${PROJECT_SOURCE_DIR}/platform/windows/snapshot.cpp
                                      ${PROJECT_SOURCE_DIR}/platform/snapshot_command.cpp
                                      ${PROJECT_SOURCE_DIR}/agent/hooks.cpp
                                      ${PROJECT_SOURCE_DIR}/agent/consistency.cpp)
# Security descriptors and ACLs (advapi32).
target_link_libraries(vmsnap_consistency PUBLIC vmsnap_platform vmsnap_common vmsnap_settings
                                                nlohmann_json::nlohmann_json Threads::Threads
                                                advapi32)
target_link_libraries(vmsnap_agent_lib PUBLIC vmsnap_consistency)
# platform/windows/env.cpp: CommandLineToArgvW, SHGetKnownFolderPath (shell32), CoTaskMemFree
# (ole32).
target_link_libraries(vmsnap_platform PUBLIC shell32 ole32)
install(TARGETS vmsnap-agent RUNTIME DESTINATION bin)

if(BUILD_TESTING)
  # Portable unit tests (with the composing disk reader) plus the Windows platform tests; tests/vss_test.cpp when it exists.
  # windows_main.cpp: doctest's runner plus the child modes the RunProcess tests start.
  set(_vmsnap_windows_tests ${PROJECT_SOURCE_DIR}/tests/windows_main.cpp
                            ${PROJECT_SOURCE_DIR}/tests/support/test_support_windows.cpp
                            ${PROJECT_SOURCE_DIR}/tests/unit_codec.cpp
                            ${PROJECT_SOURCE_DIR}/tests/unit_misc.cpp
                            ${PROJECT_SOURCE_DIR}/tests/composed_disk_reader_test.cpp
                            ${PROJECT_SOURCE_DIR}/tests/windows_platform_test.cpp)
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/vss_test.cpp)
    list(APPEND _vmsnap_windows_tests ${PROJECT_SOURCE_DIR}/tests/vss_test.cpp)
  endif()
  add_executable(windows_tests ${_vmsnap_windows_tests})
  target_link_libraries(windows_tests PRIVATE vmsnap_agent_lib doctest::doctest)
  # Run by scripts/windows-test.sh under Wine (registered with the Linux build's ctest).
endif()
