#!/usr/bin/env bash
# The Windows agent under Wine (issue 8). Registered with the Linux build's ctest as "windows".
#
#   1. cross-builds vmsnap-agent.exe and windows_tests.exe (scripts/build-windows.sh, cached deps)
#   2. windows_tests.exe passes under Wine (unit tests, the Windows platform layer, VSS logic)
#   3. vmsnap-agent.exe backs up a disk image file (holes and data) to a real Linux vmsnap-vault
#      on loopback TLS; the Linux agent restores it byte-identical; an incremental backup after
#      changing 3 blocks uploads exactly those 3 and restores byte-identical too
#   4. vmsnap-agent.exe backup --disk \\.\C: fails with the VSS error (Wine has no VSS) and
#      creates no recovery point: never a silent live read
#
# Usage: windows-test.sh --vault PATH/vmsnap-vault --agent PATH/vmsnap-agent
# Without the tools (mingw-w64, wine64) it skips saying why (exit 77); under CI=true it fails.
# Wine runs with WINEPREFIX=${VMSNAP_WINEPREFIX:-/var/cache/vmsnap/wineprefix}, no display.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VAULT_BIN="" AGENT_BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vault) VAULT_BIN="$2"; shift 2 ;;
    --agent) AGENT_BIN="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "windows-test: unknown argument '$1'. Fix: see --help" >&2; exit 2 ;;
  esac
done

say() { echo "windows-test: $*"; }
fail() { echo "windows-test: FAIL: $*" >&2; exit 1; }
skip() {
  if [ "${CI:-}" = "true" ]; then fail "$* (CI=true: missing tools are a failure)"; fi
  echo "windows-test: SKIP: $*"
  exit 77
}

[ -x "$VAULT_BIN" ] || fail "--vault '$VAULT_BIN' is not an executable. Fix: pass the Linux vmsnap-vault"
[ -x "$AGENT_BIN" ] || fail "--agent '$AGENT_BIN' is not an executable. Fix: pass the Linux vmsnap-agent"
command -v x86_64-w64-mingw32-g++-posix >/dev/null ||
  skip "x86_64-w64-mingw32-g++-posix not found. Fix: ./scripts/install-deps.sh (g++-mingw-w64-x86-64-posix)"
WINE=""
for w in wine64 /usr/lib/wine/wine64 wine; do
  if command -v "$w" >/dev/null 2>&1; then WINE="$(command -v "$w")"; break; fi
done
[ -n "$WINE" ] || skip "wine64 not found. Fix: ./scripts/install-deps.sh (wine64)"
WINESERVER="$(command -v wineserver || echo /usr/lib/wine/wineserver64)"

T0=$SECONDS
# --- 1. build -------------------------------------------------------------------------------
"$ROOT/scripts/build-windows.sh"
BUILD_DIR="${VMSNAP_WINDOWS_BUILD_DIR:-$ROOT/build-windows}"
AGENT_EXE="$BUILD_DIR/agent/vmsnap-agent.exe"
TESTS_EXE="$BUILD_DIR/windows_tests.exe"
[ -f "$AGENT_EXE" ] && [ -f "$TESTS_EXE" ] || fail "the Windows build produced no $AGENT_EXE / $TESTS_EXE"
BUILD_S=$((SECONDS - T0))

# --- Wine -----------------------------------------------------------------------------------
export WINEPREFIX="${VMSNAP_WINEPREFIX:-/var/cache/vmsnap/wineprefix}"
export WINEDEBUG=-all WINEARCH=win64 WINEDLLOVERRIDES="mscoree,mshtml="
unset DISPLAY WAYLAND_DISPLAY
mkdir -p "$(dirname "$WINEPREFIX")"
T1=$SECONDS
if [ ! -f "$WINEPREFIX/system.reg" ]; then
  say "initialising the Wine prefix $WINEPREFIX (once)"
  "$WINE" wineboot -i >/dev/null 2>&1 || fail "wineboot -i failed for $WINEPREFIX"
  "$WINESERVER" -w
fi
WORK="$(mktemp -d /tmp/vmsnap-windows-test.XXXXXX)"
VAULT_PID=""
cleanup() {
  if [ -n "$VAULT_PID" ]; then kill "$VAULT_PID" 2>/dev/null || true; wait "$VAULT_PID" 2>/dev/null || true; fi
  "$WINESERVER" -k 2>/dev/null || true  # this prefix's wineserver only
  rm -rf "$WORK"
}
trap cleanup EXIT
winpath() { local p="$1"; echo "Z:${p//\//\\}"; }  # Wine maps Z: to /
wine_run() { "$WINE" "$@" </dev/null; }

# --- 2. unit tests ----------------------------------------------------------------------------
say "windows_tests.exe under Wine"
# Wine has no FSCTL_QUERY_ALLOCATED_RANGES: every file reads as all data there (correct, only
# not sparse-aware), so the hole-reporting cases of unit_misc.cpp and
# composed_disk_reader_test.cpp run on real NTFS only.
wine_run "$TESTS_EXE" --no-colors=true \
  --test-case-exclude="env: sparse files report holes*,composed disk reader: holes*" \
  >"$WORK/unit.out" 2>&1 || {
  cat "$WORK/unit.out" >&2
  fail "windows_tests.exe failed under Wine"
}
tail -n 3 "$WORK/unit.out"
UNIT_S=$((SECONDS - T1))

# --- 3. backup of an image file from the Windows agent to a Linux vault ------------------------
T2=$SECONDS
mkdir -p "$WORK/vault"
"$VAULT_BIN" serve --data "$WORK/vault" --listen 127.0.0.1:0 >"$WORK/vault.out" 2>"$WORK/vault.err" &
VAULT_PID=$!
for _ in $(seq 1 300); do
  [ -f "$WORK/vault/vault.json" ] && grep -q "\"pid\": $VAULT_PID" "$WORK/vault/vault.json" && break
  kill -0 "$VAULT_PID" 2>/dev/null || { cat "$WORK/vault.err" >&2; fail "the vault did not start"; }
  sleep 0.1
done
URL="$(sed -n 's/.*"url": "\(.*\)".*/\1/p' "$WORK/vault/vault.json")"
[ -n "$URL" ] || fail "the vault wrote no URL"
CA="$WORK/vault/tls/ca.pem"
TOKEN_FILE="$WORK/vault/token"
WIN_CONN=(--vault "$URL" --ca "$(winpath "$CA")" --token-file "$(winpath "$TOKEN_FILE")" --retries 2)
LINUX_CONN=(--vault "$URL" --ca "$CA" --token-file "$TOKEN_FILE" --retries 2)

# 64 MiB, sparse: data at MiB 0, 5-6, 40 and the last 64 KiB; holes elsewhere.
IMG="$WORK/disk.img"
truncate -s 64M "$IMG"
for mib in 0 5 6 40; do
  dd if=/dev/urandom of="$IMG" bs=1M count=1 seek="$mib" conv=notrunc status=none
done
dd if=/dev/urandom of="$IMG" bs=64K count=1 seek=1023 conv=notrunc status=none
win_backup() {
  wine_run "$AGENT_EXE" backup "${WIN_CONN[@]}" --disk "$(winpath "$IMG")" --item winvm \
    --state-dir "$(winpath "$WORK/state")" --runtime-dir "$(winpath "$WORK/run")" \
    --hooks-dir "$(winpath "$WORK/hooks.d")" --block-size 64K --json
}
say "full backup with vmsnap-agent.exe"
win_backup >"$WORK/full.json" 2>"$WORK/full.err" || {
  cat "$WORK/full.err" >&2; fail "the Windows agent's full backup failed"
}
field() { jq -r "$2" "$1"; }
RP1="$(field "$WORK/full.json" '.recovery_point')"
[ "$(field "$WORK/full.json" '.disks[0].mode')" = "full" ] || fail "the first backup is not full"
say "full: $RP1, $(field "$WORK/full.json" '.disks[0].blocks_uploaded') blocks uploaded," \
    "consistency $(field "$WORK/full.json" '.consistency')"
"$AGENT_BIN" restore "${LINUX_CONN[@]}" --rp "$RP1" --to "$WORK/restored1.img" >/dev/null ||
  fail "the Linux agent could not restore $RP1"
cmp "$IMG" "$WORK/restored1.img" || fail "restored image of $RP1 differs from the source"
cp "$IMG" "$WORK/source1.img"

# Incremental: three 64 KiB blocks change (one inside data, one in a hole, one at the end).
for blk in 81 300 1023; do
  dd if=/dev/urandom of="$IMG" bs=64K count=1 seek="$blk" conv=notrunc status=none
done
say "incremental backup with vmsnap-agent.exe"
win_backup >"$WORK/incr.json" 2>"$WORK/incr.err" || {
  cat "$WORK/incr.err" >&2; fail "the Windows agent's incremental backup failed"
}
RP2="$(field "$WORK/incr.json" '.recovery_point')"
[ "$(field "$WORK/incr.json" '.disks[0].mode')" = "incremental" ] ||
  fail "the second backup is not incremental: $(cat "$WORK/incr.json")"
UPLOADED="$(field "$WORK/incr.json" '.disks[0].blocks_uploaded')"
CHANGED="$(field "$WORK/incr.json" '.disks[0].blocks_changed')"
[ "$UPLOADED" = 3 ] && [ "$CHANGED" = 3 ] ||
  fail "the incremental changed $CHANGED and uploaded $UPLOADED blocks, expected 3 and 3"
"$AGENT_BIN" restore "${LINUX_CONN[@]}" --rp "$RP2" --to "$WORK/restored2.img" >/dev/null ||
  fail "the Linux agent could not restore $RP2"
cmp "$IMG" "$WORK/restored2.img" || fail "restored image of $RP2 differs from the source"
say "incremental: $RP2, $CHANGED changed, $UPLOADED uploaded; both restores byte-identical"

# --- 4. a volume under Wine: VSS unavailable, no live read -----------------------------------
count_rps() { "$AGENT_BIN" list "${LINUX_CONN[@]}" --json | jq '.recovery_points | length'; }
BEFORE="$(count_rps)"
set +e
wine_run "$AGENT_EXE" backup "${WIN_CONN[@]}" --disk '\\.\C:' --item winvm-volume \
  --state-dir "$(winpath "$WORK/state")" --runtime-dir "$(winpath "$WORK/run")" \
  --hooks-dir "$(winpath "$WORK/hooks.d")" >"$WORK/vss.out" 2>"$WORK/vss.err"
RC=$?
set -e
[ "$RC" -ne 0 ] || fail "backup of \\\\.\\C: under Wine succeeded; it must refuse a live read"
grep -qi "vss" "$WORK/vss.err" || { cat "$WORK/vss.err" >&2; fail "the error does not name VSS"; }
[ "$(count_rps)" = "$BEFORE" ] || fail "a recovery point was created for \\\\.\\C:"
say "\\\\.\\C: refused (exit $RC): $(grep -i vss "$WORK/vss.err" | head -n1)"
[ "$RC" -eq 3 ] || fail "VSS unavailable must exit 3 (unavailable, retryable), got $RC"
# The same with every --vss-* flag: still no live read, and the flags are accepted.
set +e
wine_run "$AGENT_EXE" backup "${WIN_CONN[@]}" --disk '\\.\C:' --item winvm-volume --json \
  --snapshot vss --vss-backup-type full --vss-exclude-writer "Registry Writer" \
  --vss-snapshot-timeout 30 --state-dir "$(winpath "$WORK/state")" \
  --runtime-dir "$(winpath "$WORK/run")" --hooks-dir "$(winpath "$WORK/hooks.d")" \
  >"$WORK/vss2.out" 2>"$WORK/vss2.err"
RC=$?
wine_run "$AGENT_EXE" backup "${WIN_CONN[@]}" --disk '\\.\C:' --vss-snapshot-timeout 61 \
  >"$WORK/vss3.out" 2>"$WORK/vss3.err"
RC3=$?
set -e
[ "$RC" -eq 3 ] || { cat "$WORK/vss2.err" >&2; fail "--snapshot vss with --vss-* flags: exit $RC, expected 3"; }
jq -e '(.error | test("vss"; "i")) and .retryable' "$WORK/vss2.out" >/dev/null ||
  { cat "$WORK/vss2.out" >&2; fail "the --json error does not name VSS or is not retryable"; }
[ "$(count_rps)" = "$BEFORE" ] || fail "a recovery point was created by --snapshot vss"
[ "$RC3" -ne 0 ] && grep -q "vss-snapshot-timeout" "$WORK/vss3.err" ||
  { cat "$WORK/vss3.err" >&2; fail "--vss-snapshot-timeout 61 was not refused by name"; }
say "--snapshot vss with --vss-* flags refused the same way; --vss-snapshot-timeout 61 refused"
E2E_S=$((SECONDS - T2))

say "PASS (build ${BUILD_S} s, Wine unit tests ${UNIT_S} s, Wine end-to-end ${E2E_S} s)"
