#!/usr/bin/env bash
# Installs everything vmsnap needs to build, run and test, from Debian 12 packages only.
# Idempotent: does nothing (and needs no network) when everything is already installed.
set -euo pipefail

PACKAGES=(
  # toolchain
  g++ cmake ninja-build pkg-config clang-format
  # libraries
  libboost-dev libssl-dev nlohmann-json3-dev libspdlog-dev libzstd-dev doctest-dev
  libxxhash-dev libcli11-dev libsqlite3-dev libfuse3-dev
  # runtime tools used by the demo and the tests
  openssl jq curl tzdata e2fsprogs xfsprogs btrfs-progs dosfstools util-linux mount coreutils
  fdisk fuse3
  # benchmark peers and measuring tools (bench/bench.sh and its smoke test)
  restic borgbackup zstd time
  # Debian packaging and its checks (scripts/package.sh, tests/packaging_test.sh)
  dpkg-dev lintian
  # the Windows agent: cross compilers (posix threads), Wine to run it, the MSI tools
  # (scripts/build-windows.sh, scripts/windows-test.sh, scripts/build-msi.sh)
  mingw-w64 g++-mingw-w64-x86-64-posix gcc-mingw-w64-x86-64-posix wine wine64 msitools wixl
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
