#!/usr/bin/env bash
# Cross-builds the Windows agent (vmsnap-agent.exe) and its test executable
# (windows_tests.exe) with Debian's mingw-w64 into build-windows/ (or $VMSNAP_WINDOWS_BUILD_DIR).
# The dependencies come from scripts/build-windows-deps.sh (built once, then cached).
#
# Usage: build-windows.sh [--jobs N]     (default 1: the build machine's cores are shared)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_DIR="${VMSNAP_WINDOWS_BUILD_DIR:-$ROOT/build-windows}"
JOBS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "build-windows: unknown argument '$1'. Fix: see --help" >&2; exit 2 ;;
  esac
done

t0=$SECONDS
PREFIX="$("$ROOT/scripts/build-windows-deps.sh" | tee /dev/stderr | sed -n 's/^prefix: //p' | tail -n1)"
[ -n "$PREFIX" ] || { echo "build-windows: the dependency build printed no prefix" >&2; exit 1; }
echo "build-windows: dependencies ready in $((SECONDS - t0)) s ($PREFIX)"

t0=$SECONDS
mkdir -p "$BUILD_DIR"
cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/Toolchain-mingw-w64.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DVMSNAP_WINDOWS_DEPS="$PREFIX" >"$BUILD_DIR/configure.log" 2>&1 ||
  { cat "$BUILD_DIR/configure.log" >&2; echo "build-windows: cmake configure failed" >&2; exit 1; }
cmake --build "$BUILD_DIR" -j"$JOBS" --target vmsnap-agent windows_tests
echo "build-windows: built in $((SECONDS - t0)) s: $BUILD_DIR/agent/vmsnap-agent.exe," \
     "$BUILD_DIR/windows_tests.exe"
