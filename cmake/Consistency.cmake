# The Linux consistency engine (issue 3): mount discovery, the freeze guard and freeze session,
# pre/post scripts, snapshot providers and the consistency orchestration, plus their tests.
# Included at the end of the root CMakeLists.txt (after the common/platform/agent targets).

if(VMSNAP_PLATFORM STREQUAL "linux")
  add_library(vmsnap_consistency STATIC
    ${PROJECT_SOURCE_DIR}/platform/linux/quiesce.cpp
    ${PROJECT_SOURCE_DIR}/platform/linux/snapshot.cpp
    ${PROJECT_SOURCE_DIR}/platform/snapshot_command.cpp
    ${PROJECT_SOURCE_DIR}/agent/hooks.cpp
    ${PROJECT_SOURCE_DIR}/agent/consistency.cpp)
  target_link_libraries(vmsnap_consistency PUBLIC vmsnap_platform vmsnap_common vmsnap_settings
                                                  nlohmann_json::nlohmann_json Threads::Threads)

  # The backup pipeline (agent/backup.cpp) runs the engine.
  target_link_libraries(vmsnap_agent_lib PUBLIC vmsnap_consistency)

  # Small, separate and dependency-light: it runs while filesystems are frozen. Built next to
  # vmsnap-agent, which looks for it in its own directory first (then the install path).
  add_executable(vmsnap-freeze-guard ${PROJECT_SOURCE_DIR}/platform/linux/freeze_guard_main.cpp)
  target_link_libraries(vmsnap-freeze-guard PRIVATE vmsnap_settings nlohmann_json::nlohmann_json
                                                    Threads::Threads)
  set_target_properties(vmsnap-freeze-guard PROPERTIES
    RUNTIME_OUTPUT_DIRECTORY $<TARGET_FILE_DIR:vmsnap-agent>)
  install(TARGETS vmsnap-freeze-guard RUNTIME DESTINATION libexec/vmsnap)

  if(BUILD_TESTING)
    file(GLOB VMSNAP_CONSISTENCY_TEST_SOURCES CONFIGURE_DEPENDS
         ${PROJECT_SOURCE_DIR}/tests/consistency_*.cpp)
    # The pipeline test is its own executable: it uses tests/support (vault, agent binary),
    # whose vmsnap::test::TempDir differs from the one in consistency_fixtures.hpp.
    list(FILTER VMSNAP_CONSISTENCY_TEST_SOURCES EXCLUDE REGEX "consistency_pipeline_test\\.cpp$")
    add_executable(consistency_tests ${VMSNAP_CONSISTENCY_TEST_SOURCES})
    target_link_libraries(consistency_tests PRIVATE vmsnap_consistency doctest::doctest)
    target_compile_definitions(consistency_tests PRIVATE
      VMSNAP_FREEZE_GUARD_PATH="$<TARGET_FILE:vmsnap-freeze-guard>")
    add_dependencies(consistency_tests vmsnap-freeze-guard)
    add_test(NAME consistency COMMAND consistency_tests)

    # End to end: the real vmsnap-agent against a real vault, on filesystems it freezes.
    add_executable(consistency_pipeline_tests ${PROJECT_SOURCE_DIR}/tests/unit_main.cpp
                                              ${PROJECT_SOURCE_DIR}/tests/consistency_pipeline_test.cpp)
    target_link_libraries(consistency_pipeline_tests PRIVATE vmsnap_test_support
                                                             doctest::doctest)
    add_dependencies(consistency_pipeline_tests vmsnap-agent vmsnap-vault vmsnap-freeze-guard)
    add_dependencies(consistency_tests consistency_pipeline_tests)
    add_test(NAME consistency_pipeline COMMAND consistency_pipeline_tests)
  endif()
endif()
