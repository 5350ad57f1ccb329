# Cross-compiling vmsnap for 64-bit Windows with Debian's mingw-w64 (scripts/build-windows.sh).
# The posix thread model compilers: GCC 12's win32 model has no std::thread/std::mutex.
#
#   cmake -S . -B build-windows -G Ninja \
#         -DCMAKE_TOOLCHAIN_FILE=cmake/Toolchain-mingw-w64.cmake \
#         -DVMSNAP_WINDOWS_DEPS=/var/cache/vmsnap/windows-deps/KEY
#
# VMSNAP_WINDOWS_DEPS is the prefix scripts/build-windows-deps.sh prints: the only place
# headers and libraries are searched for (never the host's /usr/include or /usr/lib).
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)

set(_triple x86_64-w64-mingw32)
set(CMAKE_C_COMPILER ${_triple}-gcc-posix)
set(CMAKE_CXX_COMPILER ${_triple}-g++-posix)
set(CMAKE_RC_COMPILER ${_triple}-windres)
set(CMAKE_AR ${_triple}-ar CACHE FILEPATH "")
set(CMAKE_RANLIB ${_triple}-ranlib CACHE FILEPATH "")

set(VMSNAP_WINDOWS_DEPS "" CACHE PATH "Prefix made by scripts/build-windows-deps.sh")
# try_compile projects inherit the prefix through the environment-free variable list.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES VMSNAP_WINDOWS_DEPS)

set(CMAKE_FIND_ROOT_PATH /usr/${_triple} ${VMSNAP_WINDOWS_DEPS})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
