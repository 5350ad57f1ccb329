# The Linux consistency engine (issue 3): mount discovery, the freeze guard and freeze session,
# pre/post scripts, snapshot providers and the consistency orchestration, plus their tests.
# Included at the end of the root CMakeLists.txt (after the common/platform/agent targets).

if(VMSNAP_PLATFORM STREQUAL "linux")
  add_library(vmsnap_consistency STATIC
    ${PROJECT_SOURCE_DIR}/platform/linux/quiesce.cpp
    ${PROJECT_SOURCE_DIR}/platform/linux/snapshot.cpp
    ${PROJECT_SOURCE_DIR}/agent/hooks.cpp
    ${PROJECT_SOURCE_DIR}/agent/consistency.cpp)
  target_link_libraries(vmsnap_consistency PUBLIC vmsnap_platform vmsnap_common vmsnap_settings
                                                  nlohmann_json::nlohmann_json Threads::Threads)

  # Small, separate and dependency-light: it runs while filesystems are frozen.
  add_executable(vmsnap-freeze-guard ${PROJECT_SOURCE_DIR}/platform/linux/freeze_guard_main.cpp)
  target_link_libraries(vmsnap-freeze-guard PRIVATE vmsnap_settings nlohmann_json::nlohmann_json
                                                    Threads::Threads)
  install(TARGETS vmsnap-freeze-guard RUNTIME DESTINATION libexec/vmsnap)

  if(BUILD_TESTING)
    file(GLOB VMSNAP_CONSISTENCY_TEST_SOURCES CONFIGURE_DEPENDS
         ${PROJECT_SOURCE_DIR}/tests/consistency_*.cpp)
    add_executable(consistency_tests ${VMSNAP_CONSISTENCY_TEST_SOURCES})
    target_link_libraries(consistency_tests PRIVATE vmsnap_consistency doctest::doctest)
    target_compile_definitions(consistency_tests PRIVATE
      VMSNAP_FREEZE_GUARD_PATH="$<TARGET_FILE:vmsnap-freeze-guard>")
    add_dependencies(consistency_tests vmsnap-freeze-guard)
    add_test(NAME consistency COMMAND consistency_tests)
  endif()
endif()
