#!/usr/bin/env bash
# Builds the Debian packages vmsnap-agent and vmsnap-vault from this tree:
# a Release configure + build in build-package/, then `cpack -G DEB`.
# Output: build-package/vmsnap-agent_VERSION_ARCH.deb and build-package/vmsnap-vault_VERSION_ARCH.deb
#
#   ./scripts/package.sh                                # version from CMakeLists.txt
#   VMSNAP_PACKAGE_VERSION=0.1.1 ./scripts/package.sh   # another version (e.g. an upgrade test)
#   VMSNAP_BUILD_JOBS=1 ./scripts/package.sh            # build jobs (default: nproc)
#   VMSNAP_PACKAGE_BUILD_DIR=DIR ./scripts/package.sh   # another build dir
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${VMSNAP_PACKAGE_BUILD_DIR:-$ROOT/build-package}"
JOBS="${VMSNAP_BUILD_JOBS:-$(nproc)}"
VERSION="${VMSNAP_PACKAGE_VERSION:-}"

fail() { echo "package.sh: $1: $2. Fix: $3" >&2; exit 1; }

for tool in cmake ninja cpack dpkg-shlibdeps dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 ||
    fail "check tools" "$tool is missing" "run ./scripts/install-deps.sh (dpkg-dev, cmake, ninja-build)"
done

version_arg=()
if [ -n "$VERSION" ]; then
  version_arg=("-DVMSNAP_PACKAGE_VERSION=$VERSION")
else
  # Back to the project version if an earlier run overrode it.
  version_arg=("-UVMSNAP_PACKAGE_VERSION")
fi

# VMSNAP_WERROR=OFF: the packages are release artefacts; GCC 12 -O3 reports a false
# -Wrestrict in agent/mount/image_fs.cpp (std::string operator+) that -Werror would turn into
# a failed package build. The sanitizer build (scripts/test.sh) keeps -Werror.
echo "package.sh: configure (Release) in $BUILD"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
  -DVMSNAP_SANITIZE=OFF -DVMSNAP_WERROR=OFF "${version_arg[@]}" >/dev/null ||
  fail "configure" "cmake failed (output above)" "install the build dependencies: ./scripts/install-deps.sh"

echo "package.sh: build with $JOBS job(s)"
cmake --build "$BUILD" -j "$JOBS" --target vmsnap-agent vmsnap-freeze-guard vmsnap-vault vmsnap \
  vmsnap_agent_changelog vmsnap_vault_changelog ||
  fail "build" "the Release build failed (output above)" "fix the compile error, then run this again"

echo "package.sh: cpack -G DEB"
rm -f "$BUILD"/vmsnap-agent_*.deb "$BUILD"/vmsnap-vault_*.deb
(cd "$BUILD" && cpack -G DEB --config CPackConfig.cmake >"$BUILD/cpack.log" 2>&1) || {
  cat "$BUILD/cpack.log" >&2
  fail "cpack" "building the .deb files failed (log above, $BUILD/cpack.log)" \
    "check installer/ and cmake/Packaging.cmake"
}

shopt -s nullglob
debs=("$BUILD"/vmsnap-agent_*.deb "$BUILD"/vmsnap-vault_*.deb)
[ ${#debs[@]} -eq 2 ] ||
  fail "cpack" "expected 2 packages in $BUILD, found ${#debs[@]}" "see $BUILD/cpack.log"
for d in "${debs[@]}"; do echo "package.sh: built $d"; done
