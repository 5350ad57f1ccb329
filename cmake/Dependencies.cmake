# Third-party libraries, all from Debian packages (scripts/install-deps.sh installs them).
# Windows (cross build): static libraries built from Debian's source packages and the
# header-only ones, all under VMSNAP_WINDOWS_DEPS (scripts/build-windows-deps.sh); the same
# target names as on Linux, so the rest of the build does not care.
if(WIN32)
  if(NOT VMSNAP_WINDOWS_DEPS OR NOT EXISTS "${VMSNAP_WINDOWS_DEPS}/.complete")
    message(FATAL_ERROR "VMSNAP_WINDOWS_DEPS ('${VMSNAP_WINDOWS_DEPS}') is not a complete "
                        "dependency prefix. Fix: run scripts/build-windows.sh, or pass "
                        "-DVMSNAP_WINDOWS_DEPS=<the prefix scripts/build-windows-deps.sh prints>")
  endif()
  set(_inc ${VMSNAP_WINDOWS_DEPS}/include)
  set(_lib ${VMSNAP_WINDOWS_DEPS}/lib)
  # One IMPORTED target per library: headers (as system headers) and what it links.
  function(_vmsnap_windows_dep name)
    cmake_parse_arguments(ARG "" "LOCATION" "DEFINES;LINKS" ${ARGN})
    if(ARG_LOCATION)
      add_library(${name} STATIC IMPORTED GLOBAL)
      set_target_properties(${name} PROPERTIES IMPORTED_LOCATION ${ARG_LOCATION})
    else()
      add_library(${name} INTERFACE IMPORTED GLOBAL)
    endif()
    set_target_properties(${name} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${_inc}
                                             INTERFACE_COMPILE_DEFINITIONS "${ARG_DEFINES}"
                                             INTERFACE_LINK_LIBRARIES "${ARG_LINKS}")
  endfunction()
  # posix thread model: std::thread is winpthreads, linked statically by -static.
  _vmsnap_windows_dep(Threads::Threads)
  _vmsnap_windows_dep(OpenSSL::Crypto LOCATION ${_lib}/libcrypto.a
                      LINKS ws2_32 crypt32 advapi32 user32 bcrypt)
  _vmsnap_windows_dep(OpenSSL::SSL LOCATION ${_lib}/libssl.a LINKS OpenSSL::Crypto)
  _vmsnap_windows_dep(Boost::headers LINKS ws2_32 mswsock)
  _vmsnap_windows_dep(nlohmann_json::nlohmann_json)
  # Debian's spdlog 1.10 uses the external fmt 9; both header-only here.
  _vmsnap_windows_dep(spdlog::spdlog DEFINES SPDLOG_FMT_EXTERNAL FMT_HEADER_ONLY)
  _vmsnap_windows_dep(CLI11::CLI11)
  _vmsnap_windows_dep(doctest::doctest)
  _vmsnap_windows_dep(PkgConfig::ZSTD LOCATION ${_lib}/libzstd.a)
  # xxhash: header-only (XXH_INLINE_ALL inlines the implementation where xxhash.h is used).
  _vmsnap_windows_dep(PkgConfig::XXHASH DEFINES XXH_INLINE_ALL)
  return()
endif()

find_package(Threads REQUIRED)
find_package(OpenSSL 3 REQUIRED)
find_package(Boost 1.74 REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(doctest REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(ZSTD REQUIRED IMPORTED_TARGET libzstd)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
