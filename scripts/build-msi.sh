#!/usr/bin/env bash
# Builds the Windows agent's MSI (installer/windows/vmsnap-agent.wxs) with wixl (msitools)
# from a cross-built vmsnap-agent.exe (scripts/build-windows.sh).
#
#   ./scripts/build-msi.sh                                   # defaults below
#   ./scripts/build-msi.sh --exe PATH --version 0.1.1 --output out/vmsnap-agent.msi
#
#   --exe PATH       the x86-64 vmsnap-agent.exe (default: build-windows/agent/vmsnap-agent.exe)
#   --version X.Y.Z  MSI ProductVersion (default: the project version in CMakeLists.txt);
#                    a higher version upgrades an installed one in place
#   --output PATH    the MSI to write (default: build-windows/vmsnap-agent-VERSION-x64.msi)
#
# The MSI is written under a temporary name next to PATH and renamed at the end: a failed
# build never leaves a half-written MSI. Prints "msi: PATH" as its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXE="$ROOT/build-windows/agent/vmsnap-agent.exe"
VERSION=""
OUTPUT=""

fail() { echo "build-msi.sh: $1: $2. Fix: $3" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --exe) EXE="${2:?}"; shift 2 ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --output) OUTPUT="${2:?}"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) fail "arguments" "unknown argument '$1'" "see ./scripts/build-msi.sh --help" ;;
  esac
done

command -v wixl >/dev/null 2>&1 ||
  fail "check tools" "wixl is missing" "apt-get install wixl (msitools)"

if [ -z "$VERSION" ]; then
  VERSION="$(sed -nE 's/^project\(vmsnap VERSION ([0-9.]+).*/\1/p' "$ROOT/CMakeLists.txt")"
  [ -n "$VERSION" ] || fail "read version" "no 'project(vmsnap VERSION X.Y.Z' in CMakeLists.txt" \
    "pass --version X.Y.Z"
fi
# MSI ProductVersion: major.minor.build, at most 255.255.65535.
if ! [[ "$VERSION" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -gt 255 ] ||
   [ "${BASH_REMATCH[2]}" -gt 255 ] || [ "${BASH_REMATCH[3]}" -gt 65535 ]; then
  fail "check version" "'$VERSION' is not an MSI version (major.minor.build, at most 255.255.65535)" \
    "pass --version like 0.1.0"
fi

# The file must be an x86-64 PE executable (MZ header, "PE\0\0", machine 0x8664).
[ -f "$EXE" ] || fail "check exe" "$EXE does not exist" \
  "build it: ./scripts/build-windows.sh, or pass --exe PATH"
read_hex() { od -An -tx1 -j "$2" -N "$3" "$1" 2>/dev/null | tr -d ' \n' || true; }
[ "$(read_hex "$EXE" 0 2)" = "4d5a" ] ||
  fail "check exe" "$EXE is not a Windows executable (no MZ header)" "pass the cross-built vmsnap-agent.exe"
pe_le="$(read_hex "$EXE" 60 4)"
[ "${#pe_le}" = 8 ] || fail "check exe" "$EXE is too short to be a Windows executable" \
  "pass the cross-built vmsnap-agent.exe"
pe_offset=$((16#${pe_le:6:2}${pe_le:4:2}${pe_le:2:2}${pe_le:0:2}))
[ "$(read_hex "$EXE" "$pe_offset" 6)" = "504500006486" ] ||
  fail "check exe" "$EXE is not an x86-64 PE executable" "pass the 64-bit (x86_64-w64-mingw32) build"

[ -n "$OUTPUT" ] || OUTPUT="$ROOT/build-windows/vmsnap-agent-$VERSION-x64.msi"
mkdir -p "$(dirname "$OUTPUT")"
OUTPUT="$(cd "$(dirname "$OUTPUT")" && pwd)/$(basename "$OUTPUT")"

# wixl resolves File/@Source relative to the working directory only: stage the exe.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp "$EXE" "$STAGE/vmsnap-agent.exe"
cp "$ROOT/installer/windows/vmsnap-agent.wxs" "$STAGE/"
TMP_OUT="$(mktemp "$OUTPUT.XXXXXX.tmp")"
trap 'rm -rf "$STAGE" "$TMP_OUT"' EXIT
(cd "$STAGE" && wixl -a x64 -D "Version=$VERSION" -o "$TMP_OUT" vmsnap-agent.wxs) ||
  fail "build msi" "wixl failed (output above)" "fix installer/windows/vmsnap-agent.wxs"
mv -f "$TMP_OUT" "$OUTPUT"
echo "msi: $OUTPUT"
