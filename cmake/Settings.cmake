# The one place that picks the platform and the compiler settings.
#
# vmsnap_settings: an INTERFACE target every vmsnap target links. It carries the C++ standard,
# the warning policy (-Wall -Wextra -Werror) and, with -DVMSNAP_SANITIZE=ON, ASan+UBSan.
# VMSNAP_PLATFORM: "linux" or "windows", chosen once here from the target system; the build
# compiles exactly one of platform/linux or platform/windows.

if(WIN32)
  set(VMSNAP_PLATFORM windows)
else()
  set(VMSNAP_PLATFORM linux)
endif()
message(STATUS "vmsnap platform: ${VMSNAP_PLATFORM}")

option(VMSNAP_SANITIZE "Build with AddressSanitizer and UndefinedBehaviorSanitizer" OFF)
option(VMSNAP_WERROR "Treat warnings as errors" ON)

add_library(vmsnap_settings INTERFACE)
target_compile_features(vmsnap_settings INTERFACE cxx_std_20)
target_compile_options(vmsnap_settings INTERFACE -Wall -Wextra -Wno-missing-field-initializers)
if(VMSNAP_WERROR)
  target_compile_options(vmsnap_settings INTERFACE -Werror)
endif()
target_compile_definitions(vmsnap_settings INTERFACE BOOST_ASIO_NO_DEPRECATED
                                                     BOOST_BEAST_USE_STD_STRING_VIEW)
if(VMSNAP_SANITIZE)
  target_compile_options(vmsnap_settings INTERFACE -fsanitize=address,undefined
                                                   -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_link_options(vmsnap_settings INTERFACE -fsanitize=address,undefined)
endif()
target_include_directories(vmsnap_settings INTERFACE ${PROJECT_SOURCE_DIR})

# Windows (mingw-w64 cross build, cmake/Toolchain-mingw-w64.cmake): Windows 10 API level,
# lean <windows.h>, UTF-16 Win32 API (the platform layer converts from UTF-8), and a fully
# static executable (libgcc, libstdc++, winpthreads) that runs without extra DLLs.
if(VMSNAP_PLATFORM STREQUAL "windows")
  # _POSIX_THREAD_SAFE_FUNCTIONS: mingw-w64's gmtime_r/localtime_r.
  target_compile_definitions(vmsnap_settings INTERFACE _WIN32_WINNT=0x0A00 WINVER=0x0A00
                                                       WIN32_LEAN_AND_MEAN NOMINMAX UNICODE
                                                       _UNICODE _POSIX_THREAD_SAFE_FUNCTIONS=200112L)
  # Boost.Beast objects exceed COFF's default section count.
  target_compile_options(vmsnap_settings INTERFACE -Wa,-mbig-obj)
  target_link_options(vmsnap_settings INTERFACE -static -static-libgcc -static-libstdc++)
  if(VMSNAP_SANITIZE)
    message(FATAL_ERROR "VMSNAP_SANITIZE is not available in the Windows cross build. "
                        "Fix: configure without -DVMSNAP_SANITIZE=ON")
  endif()
endif()
