#!/usr/bin/env bash
# windows_msi (ctest): the Windows agent's MSI, built by scripts/build-msi.sh from the
# cross-built vmsnap-agent.exe, has what an install, an upgrade and an uninstall need; then,
# when Wine is there, it really installs, upgrades in place and uninstalls under Wine.
#
#   tests/windows_msi_test.sh                 # exe: build-windows/agent/vmsnap-agent.exe
#   VMSNAP_WINDOWS_AGENT_EXE=PATH tests/windows_msi_test.sh
#   VMSNAP_MSI_WINE=0 tests/windows_msi_test.sh   # tables only, no Wine install
#   tests/windows_msi_test.sh --vault PATH/vmsnap-vault --admin PATH/vmsnap
#       # also enroll the installed agent with a real Linux vault (ctest passes both)
#
# Without the cross-built exe (scripts/build-windows.sh) or msitools the test is skipped (exit
# 77) saying why; under CI=true it fails instead. Without Wine only the Wine part is skipped
# (under CI=true: fails).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXE="${VMSNAP_WINDOWS_AGENT_EXE:-$ROOT/build-windows/agent/vmsnap-agent.exe}"
SERVICE=vmsnap-agent
VAULT_BIN=""
ADMIN_BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vault) VAULT_BIN="${2:?}"; shift 2 ;;
    --admin) ADMIN_BIN="${2:?}"; shift 2 ;;
    *) echo "windows_msi: unknown argument '$1'" >&2; exit 1 ;;
  esac
done

failures=0
check() {  # check DESCRIPTION COMMAND...
  local what="$1"
  shift
  if "$@"; then
    echo "ok: $what"
  else
    echo "FAILED: $what" >&2
    failures=$((failures + 1))
  fi
}
die() { echo "windows_msi: $1" >&2; exit 1; }
skip() {
  if [ "${CI:-}" = "true" ]; then die "$1, and CI=true forbids skipping"; fi
  echo "SKIPPED: $1"
  exit 77
}

[ -f "$EXE" ] || skip "no cross-built agent at $EXE (build it: ./scripts/build-windows.sh)"
for tool in wixl msiinfo msiextract; do
  command -v "$tool" >/dev/null 2>&1 || skip "$tool is missing (apt-get install wixl msitools)"
done

WORK="$(mktemp -d)"
WINEPREFIX="$WORK/wineprefix"
export WINEPREFIX WINEDEBUG=-all
VAULT_PID=""
cleanup() {
  if [ -n "$VAULT_PID" ]; then kill "$VAULT_PID" 2>/dev/null || true; fi
  # Only this test's own Wine prefix: its wineserver and every process in it.
  if [ -d "$WINEPREFIX" ] && command -v wineserver >/dev/null 2>&1; then
    wineserver -k 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

V1=0.1.0
V2=0.1.1
"$ROOT/scripts/build-msi.sh" --exe "$EXE" --version "$V1" --output "$WORK/v1.msi" >/dev/null
"$ROOT/scripts/build-msi.sh" --exe "$EXE" --version "$V2" --output "$WORK/v2.msi" >/dev/null

# ---------------------------------------------------------------------------------------------
# The build script refuses what cannot be an MSI, and leaves no file behind.
printf 'MZ but not a PE file' >"$WORK/not-pe.exe"
check "build-msi.sh refuses a file that is not an x86-64 PE executable" \
  bash -c "! '$ROOT/scripts/build-msi.sh' --exe '$WORK/not-pe.exe' --output '$WORK/bad.msi' \
           2>'$WORK/err' && grep -q 'check exe' '$WORK/err' && [ ! -e '$WORK/bad.msi' ]"
check "build-msi.sh refuses a version that is not major.minor.build" \
  bash -c "! '$ROOT/scripts/build-msi.sh' --exe '$EXE' --version 1.2 --output '$WORK/bad.msi' \
           2>'$WORK/err' && grep -q 'check version' '$WORK/err' && [ ! -e '$WORK/bad.msi' ]"
check "no temporary MSI left next to the output" \
  bash -c "! ls '$WORK' | grep -q '\\.tmp$'"

# ---------------------------------------------------------------------------------------------
# The tables. `msiinfo export` prints 3 header lines, then one tab-separated row per line.
rows() { msiinfo export "$1" "$2" | tail -n +4 | tr -d '\r'; }
# field MSI TABLE KEYCOLUMN KEY FIELDNO: one field of the row whose column KEYCOLUMN is KEY.
field() { rows "$1" "$2" | awk -F'\t' -v k="$4" -v c="$3" -v f="$5" '$c == k { print $f }'; }
prop() { field "$1" Property 1 "$2" 2; }

MSI="$WORK/v1.msi"
file_row="$(rows "$MSI" File | awk -F'\t' '$3 == "vmsnap-agent.exe" || $3 ~ /\|vmsnap-agent\.exe$/')"
file_id="$(cut -f1 <<<"$file_row")"
component="$(cut -f2 <<<"$file_row")"
check "File table: vmsnap-agent.exe, with the size of the exe that was given" \
  test -n "$file_id" -a "$(cut -f4 <<<"$file_row")" = "$(stat -c %s "$EXE")"
check "Component of the exe: in INSTALLDIR, 64-bit (attribute 256), keyed by the exe" \
  test "$(field "$MSI" Component 1 "$component" 3)" = INSTALLDIR \
  -a $(($(field "$MSI" Component 1 "$component" 4) & 256)) = 256 \
  -a "$(field "$MSI" Component 1 "$component" 6)" = "$file_id"
check "INSTALLDIR is ProgramFiles64Folder\\vmsnap" \
  test "$(field "$MSI" Directory 1 INSTALLDIR 2)" = ProgramFiles64Folder \
  -a "$(field "$MSI" Directory 1 INSTALLDIR 3)" = vmsnap

svc="$(rows "$MSI" ServiceInstall | awk -F'\t' -v n="$SERVICE" '$2 == n')"
# Columns: ServiceInstall Name DisplayName ServiceType StartType ErrorControl LoadOrderGroup
#          Dependencies StartName Password Arguments Component_ Description
check "ServiceInstall: $SERVICE, own process (16), auto start (2), LocalSystem, 'run'" \
  test -n "$svc" -a "$(cut -f4 <<<"$svc")" = 16 -a "$(cut -f5 <<<"$svc")" = 2 \
  -a "$(cut -f9 <<<"$svc")" = LocalSystem -a "$(cut -f11 <<<"$svc")" = run
check "ServiceInstall belongs to the exe's component" test "$(cut -f12 <<<"$svc")" = "$component"

ctl="$(rows "$MSI" ServiceControl | awk -F'\t' -v n="$SERVICE" '$2 == n')"
event="$(cut -f3 <<<"$ctl")"
# msidbServiceControlEvent: Start 1, Stop 2 (install); Stop 32, Delete 128 (uninstall).
check "ServiceControl: start on install, stop on install and uninstall, delete on uninstall" \
  test -n "$ctl" -a $((event & 1)) = 1 -a $((event & 2)) = 2 -a $((event & 32)) = 32 \
  -a $((event & 128)) = 128 -a "$(cut -f6 <<<"$ctl")" = "$component"
check "ServiceControl waits for the service (Wait=1)" test "$(cut -f5 <<<"$ctl")" = 1

seq="$(rows "$MSI" InstallExecuteSequence | cut -f1)"
for action in StopServices DeleteServices InstallServices StartServices CreateFolders \
  FindRelatedProducts RemoveExistingProducts; do
  check "InstallExecuteSequence has $action" grep -qx "$action" <<<"$seq"
done

hooks_dir="$(rows "$MSI" CreateFolder | cut -f1 | while read -r d; do
  [ "$(field "$MSI" Directory 1 "$d" 3)" = hooks.d ] && echo "$d"; done)"
data_dir="$(field "$MSI" Directory 1 "${hooks_dir:-none}" 2)"
check "CreateFolder: hooks.d under CommonAppDataFolder\\vmsnap (ProgramData)" \
  test -n "$hooks_dir" -a "$(field "$MSI" Directory 1 "${data_dir:-none}" 2)" = CommonAppDataFolder \
  -a "$(field "$MSI" Directory 1 "${data_dir:-none}" 3)" = vmsnap

upgrade_code="$(prop "$MSI" UpgradeCode)"
# Upgrade columns: UpgradeCode VersionMin VersionMax Language Attributes Remove ActionProperty.
# The upgrade row: same UpgradeCode, older versions (VersionMax = this version, exclusive), not
# OnlyDetect (attribute 2), its property secured; the downgrade row only detects.
upgrade_row="$(rows "$MSI" Upgrade | awk -F'\t' -v u="$upgrade_code" -v v="$V1" \
  '$1 == u && $2 == "" && $3 == v')"
downgrade_row="$(rows "$MSI" Upgrade | awk -F'\t' -v u="$upgrade_code" -v v="$V1" \
  '$1 == u && $2 == v && $3 == ""')"
check "Upgrade: older versions of the same UpgradeCode are found and removed" \
  test -n "$upgrade_row" -a $(($(cut -f5 <<<"${upgrade_row:-x	x	x	x	2}") & 2)) = 0
check "Upgrade: the upgrade property is a secure custom property" \
  grep -qw "$(cut -f7 <<<"$upgrade_row")" <<<"$(prop "$MSI" SecureCustomProperties)"
check "Upgrade: a newer installed version blocks this one (downgrade detected, launch condition)" \
  bash -c "[ -n '$downgrade_row' ] && [ \$(( \$(cut -f5 <<<'$downgrade_row') & 2 )) = 2 ] &&
           msiinfo export '$MSI' LaunchCondition | grep -q 'NOT $(cut -f7 <<<"$downgrade_row")'"
check "the two builds share the UpgradeCode and differ in ProductCode and ProductVersion" \
  test "$(prop "$WORK/v2.msi" UpgradeCode)" = "$upgrade_code" \
  -a "$(prop "$WORK/v2.msi" ProductCode)" != "$(prop "$MSI" ProductCode)" \
  -a "$(prop "$MSI" ProductVersion)" = "$V1" -a "$(prop "$WORK/v2.msi" ProductVersion)" = "$V2"
check "per-machine install (ALLUSERS=1)" test "$(prop "$MSI" ALLUSERS)" = 1
check "64-bit package: summary Template is x64;1033" \
  grep -qx 'Template: x64;1033' <(msiinfo suminfo "$MSI")

mkdir -p "$WORK/extract"
(cd "$WORK/extract" && msiextract "$MSI" >/dev/null)
packed="$(find "$WORK/extract" -name vmsnap-agent.exe | head -1)"
check "the MSI carries exactly the given exe" cmp -s "$EXE" "${packed:-/nonexistent}"

if [ "$failures" -gt 0 ]; then die "$failures table check(s) failed"; fi

# ---------------------------------------------------------------------------------------------
# Install, upgrade and uninstall under Wine (its own prefix; a persistent wineserver keeps
# Wine's services.exe, and so the service, alive between commands).
if [ "${VMSNAP_MSI_WINE:-1}" = 0 ]; then
  echo "Wine part not run (VMSNAP_MSI_WINE=0)"
  exit 0
fi
if ! command -v wine >/dev/null 2>&1 || ! command -v wineserver >/dev/null 2>&1; then
  [ "${CI:-}" = "true" ] && die "wine is missing (apt-get install wine64), and CI=true forbids skipping"
  echo "SKIPPED (Wine part): wine is missing (apt-get install wine64)"
  exit 0
fi

# A new prefix's first boot has failed once in CI within seconds, with nothing to say why (its
# output was discarded). Keep the output, and retry from a clean prefix before giving up.
booted=0
for attempt in 1 2 3; do
  if wine wineboot --init >"$WORK/wineboot-$attempt.log" 2>&1; then
    booted=1
    break
  fi
  echo "windows_msi: wineboot attempt $attempt failed in $WINEPREFIX; its output:" >&2
  tail -n 20 "$WORK/wineboot-$attempt.log" >&2 || true
  wineserver -k 2>/dev/null || true  # this prefix's server only
  sleep 2
  rm -rf "$WINEPREFIX"
done
[ "$booted" = 1 ] || die "wineboot failed 3 times in $WINEPREFIX (output above)"
wineserver -w  # let the boot's services settle and exit before the persistent server starts
wineserver -p
C="$WINEPREFIX/drive_c"

service_state() {  # RUNNING, STOPPED, ... or MISSING
  local out
  out="$(wine sc query "$SERVICE" 2>/dev/null | tr -d '\r')" || true
  awk '/STATE/ { print $4; found = 1 } END { if (!found) print "MISSING" }' <<<"$out"
}
wait_state() {  # wait_state STATE SECONDS
  local i
  for ((i = 0; i < $2 * 2; i++)); do
    [ "$(service_state)" = "$1" ] && return 0
    sleep 0.5
  done
  return 1
}
msi() {  # msi ARGS... : msiexec with a verbose log; prints the log's errors on failure
  local log="$WORK/msiexec-$RANDOM.log"
  if ! timeout 300 wine msiexec "$@" /qn /l*v "$(winepath -w "$log")" >/dev/null 2>&1; then
    echo "msiexec $* failed; its log:" >&2
    grep -a -E 'Return value 3|error|Error' "$log" | head -20 >&2 || true
    return 1
  fi
}
installed_version() {  # the DisplayVersion of the product registered with this UpgradeCode's name
  wine reg query 'HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall' /s 2>/dev/null |
    tr -d '\r' | awk '/DisplayName/ && /vmsnap agent/ { f = 1 } f && /DisplayVersion/ { print $3; f = 0 }'
}

check "Wine: msiexec /i v$V1 installs" msi /i "$(winepath -w "$WORK/v1.msi")"
check "Wine: the exe is in Program Files\\vmsnap" test -f "$C/Program Files/vmsnap/vmsnap-agent.exe"
check "Wine: ProgramData\\vmsnap\\hooks.d exists" test -d "$C/ProgramData/vmsnap/hooks.d"
check "Wine: the service is registered (HKLM\\System\\CurrentControlSet\\Services\\$SERVICE)" \
  bash -c "wine reg query 'HKLM\\System\\CurrentControlSet\\Services\\$SERVICE' /v ImagePath \
           2>/dev/null | tr -d '\\r' | grep -q 'vmsnap-agent.exe.* run'"
check "Wine: the service was started and runs (waiting for enrollment)" wait_state RUNNING 30
# Under %ProgramData%\vmsnap\state\logs; Wine's services.exe may see a different
# %ProgramData% (C:\users\Public) than msiexec (C:\ProgramData), so search the whole drive.
log_file="$(find "$C" -name vmsnap-agent.log 2>/dev/null | head -1)"
echo "service log: ${log_file#"$C"/}"
check "Wine: the service logs that it waits for enrollment" \
  grep -q "not enrolled yet" "${log_file:-/nonexistent}"
wine sc stop "$SERVICE" >/dev/null 2>&1 || true
check "Wine: sc stop stops the idle service (STOPPED)" wait_state STOPPED 30
wine sc start "$SERVICE" >/dev/null 2>&1 || true
check "Wine: sc start starts it again" wait_state RUNNING 30
check "Wine: installed version is $V1" test "$(installed_version)" = "$V1"

# Enrollment with a real vault: enroll (default config path) sets the service to start
# automatically and restarts it through the SCM; the restarted service reads the config and
# connects to the vault.
service_log_has() {  # service_log_has TEXT SECONDS [TIMES]: TEXT in at least TIMES lines
  local i f
  for ((i = 0; i < $2 * 2; i++)); do
    f="$(find "$C" -name vmsnap-agent.log 2>/dev/null | head -1)"
    [ -n "$f" ] && [ "$(grep -c -F "$1" "$f")" -ge "${3:-1}" ] && return 0
    sleep 0.5
  done
  return 1
}
if [ -n "$VAULT_BIN" ] && [ -n "$ADMIN_BIN" ]; then
  mkdir -p "$WORK/vault"
  "$VAULT_BIN" serve --data "$WORK/vault" --listen 127.0.0.1:0 >"$WORK/vault.out" 2>"$WORK/vault.err" &
  VAULT_PID=$!
  for _ in $(seq 1 300); do
    grep -qs "\"pid\": $VAULT_PID" "$WORK/vault/vault.json" && break
    sleep 0.1
  done
  url="$(sed -n 's/.*"url": "\(.*\)".*/\1/p' "$WORK/vault/vault.json")"
  fingerprint="$(sed -n 's/.*"ca_fingerprint_sha256": "\(.*\)".*/\1/p' "$WORK/vault/vault.json")"
  token="$("$ADMIN_BIN" enroll-token create --expires 1h --vault-config "$WORK/vault/vault.json" \
    --json | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')"
  truncate -s 16M "$C/disk.img"
  wine 'C:\Program Files\vmsnap\vmsnap-agent.exe' enroll --vault "$url" \
    --ca-fingerprint "$fingerprint" --token "$token" --name winvm --disk 'C:\disk.img' --json \
    >"$WORK/enroll.json" 2>"$WORK/enroll.err" || cat "$WORK/enroll.err" >&2
  check "Wine: enroll restarts the installed service through the SCM" \
    grep -q '"service":"service vmsnap-agent set to start automatically and (re)started"' \
    "$WORK/enroll.json"
  check "Wine: the service runs after enrollment" wait_state RUNNING 30
  check "Wine: the restarted service reads the config and polls the vault" \
    service_log_has "agent winvm running; vault $url" 30
else
  [ "${CI:-}" = "true" ] && die "--vault and --admin are needed for the enrollment part under CI=true"
  echo "SKIPPED (enrollment part): pass --vault PATH/vmsnap-vault --admin PATH/vmsnap"
fi

check "Wine: msiexec /i v$V2 upgrades in place" msi /i "$(winepath -w "$WORK/v2.msi")"
check "Wine: exactly one vmsnap agent product is registered, version $V2" \
  test "$(installed_version)" = "$V2"
check "Wine: the service runs after the upgrade" wait_state RUNNING 30
if [ -n "$VAULT_PID" ]; then
  check "Wine: the upgraded service is still enrolled and polls the vault" \
    service_log_has "agent winvm running; vault $url" 30 2  # once before, once after
fi
check "Wine: msiexec /i v$V1 (a downgrade) is refused" \
  bash -c "! timeout 300 wine msiexec /i '$(winepath -w "$WORK/v1.msi")' /qn >/dev/null 2>&1"
check "Wine: still version $V2 after the refused downgrade" test "$(installed_version)" = "$V2"

check "Wine: msiexec /x uninstalls" msi /x "$(winepath -w "$WORK/v2.msi")"
check "Wine: the service is gone" wait_state MISSING 30
check "Wine: the service's registry key is gone" \
  bash -c "! wine reg query 'HKLM\\System\\CurrentControlSet\\Services\\$SERVICE' >/dev/null 2>&1"
check "Wine: the exe is gone" test ! -e "$C/Program Files/vmsnap/vmsnap-agent.exe"
check "Wine: no vmsnap agent product is registered" test -z "$(installed_version)"

if [ "$failures" -gt 0 ]; then die "$failures check(s) failed"; fi
echo "windows_msi: all checks passed"
