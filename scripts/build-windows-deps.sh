#!/usr/bin/env bash
# Builds the Windows (x86_64, mingw-w64 posix threads) dependencies of vmsnap-agent from
# Debian's own source packages and installs them, static, into a cache prefix:
#
#   PREFIX/include   headers: OpenSSL and zstd (built), plus the header-only libraries
#                    (Boost, nlohmann-json, CLI11, doctest, spdlog, fmt, xxhash) linked from the
#                    host's Debian packages, one directory each. Host /usr/include itself is
#                    never on the cross include path (it would pull in glibc headers).
#   PREFIX/lib       libssl.a, libcrypto.a, libzstd.a
#
# PREFIX defaults to /var/cache/vmsnap/windows-deps/KEY, where KEY changes with this script,
# the cross compiler and the source package versions: a second run finds PREFIX/.complete
# and does nothing. Prints "prefix: PREFIX" as its last line.
#
# Usage: build-windows-deps.sh [--cache-dir DIR] [--jobs N]
#   env VMSNAP_WINDOWS_DEPS_CACHE=DIR is the same as --cache-dir DIR.
set -euo pipefail

CACHE_DIR="${VMSNAP_WINDOWS_DEPS_CACHE:-/var/cache/vmsnap/windows-deps}"
JOBS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --cache-dir) CACHE_DIR="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-windows-deps: unknown argument '$1'. Fix: see --help" >&2; exit 2 ;;
  esac
done

HOST=x86_64-w64-mingw32
CC="$HOST-gcc-posix"
CXX="$HOST-g++-posix"
SOURCE_PACKAGES=(openssl libzstd)
SRC_LIST=/etc/apt/sources.list.d/vmsnap-deb-src.sources

die() { echo "build-windows-deps: $*" >&2; exit 1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

for tool in "$CC" "$CXX" "$HOST-ar" "$HOST-ranlib" dpkg-source; do
  command -v "$tool" >/dev/null ||
    die "$tool not found. Fix: ./scripts/install-deps.sh (mingw-w64, g++-mingw-w64-x86-64-posix, dpkg-dev)"
done

# --- deb-src entries (idempotent) ------------------------------------------------------------
source_versions() {  # the versions of a source package apt knows, newest first
  apt-cache showsrc "$1" 2>/dev/null | awk '/^Version:/ {print $2}' | sort -rV | tr '\n' ' '
}
if [ ! -f "$SRC_LIST" ]; then
  echo "build-windows-deps: adding deb-src entries ($SRC_LIST)"
  $SUDO tee "$SRC_LIST" >/dev/null <<'EOF'
# Added by vmsnap scripts/build-windows-deps.sh: Debian source packages for the Windows
# cross build of the agent's dependencies.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
need_update=0
for p in "${SOURCE_PACKAGES[@]}"; do [ -n "$(source_versions "$p")" ] || need_update=1; done
if [ "$need_update" = 1 ]; then
  echo "build-windows-deps: apt-get update (source package lists)"
  $SUDO apt-get update -qq
fi
declare -A VERSIONS
for p in "${SOURCE_PACKAGES[@]}"; do
  VERSIONS[$p]="$(source_versions "$p")"
  [ -n "${VERSIONS[$p]}" ] ||
    die "apt knows no source package '$p'. Fix: check $SRC_LIST and run apt-get update"
done

# --- cache key -------------------------------------------------------------------------------
KEY="$( { sha256sum "$0" | cut -d' ' -f1
          "$CXX" --version | head -n1
          for p in "${SOURCE_PACKAGES[@]}"; do echo "$p=${VERSIONS[$p]}"; done
        } | sha256sum | cut -c1-16)"
PREFIX="$CACHE_DIR/$KEY"
if [ -f "$PREFIX/.complete" ]; then
  echo "build-windows-deps: cached: $(grep -E '^(openssl|libzstd)=' "$PREFIX/.complete" | tr '\n' ' ')"
  echo "prefix: $PREFIX"
  exit 0
fi

echo "build-windows-deps: building into $PREFIX"
mkdir -p "$CACHE_DIR"
STAGE="$(mktemp -d "$CACHE_DIR/.stage-$KEY.XXXXXX")"
WORK="$(mktemp -d "$CACHE_DIR/.work-$KEY.XXXXXX")"
trap 'rm -rf "$WORK" "$STAGE"' EXIT
mkdir -p "$STAGE/include" "$STAGE/lib"

# Source packages are downloaded once into CACHE_DIR/sources (apt-get source verifies the
# signed Sources index and the files' checksums) and unpacked with their Debian patches.
# Newest version first; an older one apt also lists is used when the newest cannot be
# downloaded (a security-archive mirror that lags behind its index).
SOURCES_DIR="$CACHE_DIR/sources"
declare -A BUILT
fetch() {  # fetch PACKAGE -> prints the unpacked source directory; sets BUILT[PACKAGE]
  local pkg="$1" ver dsc
  mkdir -p "$SOURCES_DIR"
  for ver in ${VERSIONS[$pkg]}; do
    dsc="$SOURCES_DIR/${pkg}_${ver#*:}.dsc"
    if [ ! -f "$dsc" ]; then
      (cd "$SOURCES_DIR" &&
        apt-get source --download-only -qq "$pkg=$ver" >>"$WORK/$pkg.fetch.log" 2>&1) || continue
    fi
    rm -rf "$WORK/$pkg-src"
    dpkg-source --no-check -x "$dsc" "$WORK/$pkg-src" >>"$WORK/$pkg.fetch.log" 2>&1 || continue
    BUILT[$pkg]="$ver"
    echo "$WORK/$pkg-src"
    return 0
  done
  cat "$WORK/$pkg.fetch.log" >&2
  die "no version of source package $pkg (${VERSIONS[$pkg]}) could be downloaded. Fix: check the network to deb.debian.org"
}

# --- OpenSSL: static libcrypto + libssl --------------------------------------------------------
t0=$SECONDS
fetch openssl >"$WORK/openssl.dir"
src="$(cat "$WORK/openssl.dir")"
(
  cd "$src"
  # OPENSSLDIR (openssl.cnf) and the module/engine dirs are compiled in and searched at run
  # time: they must be directories only administrators can write, never a path a user could
  # create (the build's own prefix would become C:\var\cache\... on Windows). A relative
  # --openssldir is below --prefix: C:/Program Files/vmsnap/openssl/ssl.
  ./Configure mingw64 no-shared no-tests no-module no-engine no-dso \
    --cross-compile-prefix="$HOST-" --prefix="C:/Program Files/vmsnap/openssl" \
    --openssldir=ssl --libdir=lib \
    CC=gcc-posix CXX=g++-posix >"$WORK/openssl.configure.log" 2>&1 ||
    { tail -n 30 "$WORK/openssl.configure.log" >&2; exit 1; }
  make -j"$JOBS" build_libs >"$WORK/openssl.build.log" 2>&1 ||
    { tail -n 40 "$WORK/openssl.build.log" >&2; exit 1; }
  # The libraries and the headers (generated ones included) straight from the build tree.
  cp libcrypto.a libssl.a "$STAGE/lib/"
  mkdir -p "$STAGE/include/openssl"
  cp include/openssl/*.h "$STAGE/include/openssl/"
) || die "building OpenSSL failed (logs above). Fix: see the error; rerun after fixing"
echo "build-windows-deps: openssl ${BUILT[openssl]} built in $((SECONDS - t0)) s"

# --- zstd: static libzstd (single-threaded, no legacy formats) ---------------------------------
t0=$SECONDS
fetch libzstd >"$WORK/libzstd.dir"
src="$(cat "$WORK/libzstd.dir")"
(
  cd "$src/lib"
  make -j"$JOBS" libzstd.a CC="$CC" AR="$HOST-ar" RANLIB="$HOST-ranlib" ZSTD_LEGACY_SUPPORT=0 \
    >"$WORK/zstd.build.log" 2>&1 || { tail -n 30 "$WORK/zstd.build.log" >&2; exit 1; }
  cp libzstd.a "$STAGE/lib/"
  cp zstd.h zdict.h zstd_errors.h "$STAGE/include/"
) || die "building zstd failed (log above)"
echo "build-windows-deps: zstd ${BUILT[libzstd]} built in $((SECONDS - t0)) s"

# --- header-only libraries from the host's Debian packages ------------------------------------
for dir in boost nlohmann CLI doctest spdlog fmt; do
  [ -d "/usr/include/$dir" ] ||
    die "/usr/include/$dir is missing. Fix: ./scripts/install-deps.sh"
  ln -s "/usr/include/$dir" "$STAGE/include/$dir"
done
for f in xxhash.h xxh3.h; do
  [ -f "/usr/include/$f" ] || die "/usr/include/$f is missing. Fix: ./scripts/install-deps.sh"
  cp "/usr/include/$f" "$STAGE/include/"
done

{
  echo "key=$KEY"
  for p in "${SOURCE_PACKAGES[@]}"; do echo "$p=${BUILT[$p]}"; done
  "$CXX" --version | head -n1
} >"$STAGE/.complete"
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
# Older prefixes (another script or source version) are no longer used.
for old in "$CACHE_DIR"/*/; do
  old="${old%/}"
  [ "$old" != "$PREFIX" ] && [ -f "$old/.complete" ] && rm -rf "$old"
done
trap 'rm -rf "$WORK"' EXIT
echo "prefix: $PREFIX"
