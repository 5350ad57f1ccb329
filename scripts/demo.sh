#!/usr/bin/env bash
# The main job end to end: installs what is needed, builds, starts a real vault on loopback
# TLS, backs up a sample ext4 disk image (full), changes files in it, backs it up again
# (incremental), restores the latest recovery point and proves it is byte-identical.
# Needs no root. Leaves everything under ./demo-run (removed at the next run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
./scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF >/dev/null
cmake --build build -j "$(nproc)"
VAULT="$ROOT/build/vault/vmsnap-vault"
AGENT="$ROOT/build/agent/vmsnap-agent"

W="$ROOT/demo-run"
rm -rf "$W"
mkdir -p "$W/src/docs" "$W/src/data"

vault_pid=""
cleanup() { if [ -n "$vault_pid" ]; then kill -TERM "$vault_pid" 2>/dev/null || true; wait "$vault_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

echo "== starting vmsnap-vault on 127.0.0.1 (TLS)"
"$VAULT" serve --data "$W/vault" --listen 127.0.0.1:0 >"$W/vault.out" 2>"$W/vault.log" &
vault_pid=$!
for _ in $(seq 1 100); do [ -s "$W/vault/vault.json" ] && break; sleep 0.1; done
[ -s "$W/vault/vault.json" ] || { echo "vault did not start:"; cat "$W/vault.log"; exit 1; }
cat "$W/vault.out"
URL=$(jq -r .url "$W/vault/vault.json")
CONN=(--vault "$URL" --ca "$W/vault/tls/ca.pem" --token-file "$W/vault/token")

echo "== creating a 512 MiB ext4 disk image with ~120 MiB of files (rest is empty space)"
head -c $((48 << 20)) /dev/urandom >"$W/src/data/random.bin"
for i in $(seq 1 40); do seq $((i * 100000)) $((i * 100000 + 60000)) >"$W/src/docs/log-$i.txt"; done
head -c $((24 << 20)) /dev/urandom | base64 >"$W/src/data/encoded.txt"
mkfs.ext4 -q -F -L vmsnap-demo -d "$W/src" "$W/disk.img" 512M >/dev/null 2>&1

echo "== backup 1 (full)"
"$AGENT" backup "${CONN[@]}" --disk "$W/disk.img" --state-dir "$W/state" --item demo-vm --json \
  >"$W/backup1.json"
jq -r '"recovery point \(.recovery_point): consistency \(.consistency), \(.duration_ms) ms"' "$W/backup1.json"

echo "== changing files inside the image (debugfs, no mount needed)"
head -c $((4 << 20)) /dev/urandom >"$W/new.bin"
debugfs -w -R "write $W/new.bin /data/new.bin" "$W/disk.img" >/dev/null 2>&1
debugfs -w -R "rm /docs/log-7.txt" "$W/disk.img" >/dev/null 2>&1

echo "== backup 2 (incremental)"
"$AGENT" backup "${CONN[@]}" --disk "$W/disk.img" --state-dir "$W/state" --item demo-vm --json \
  >"$W/backup2.json"
RP=$(jq -r .recovery_point "$W/backup2.json")
jq -r '"recovery point \(.recovery_point): consistency \(.consistency), \(.duration_ms) ms"' "$W/backup2.json"

echo "== recovery points in the vault"
"$AGENT" list "${CONN[@]}" --item demo-vm

echo "== restoring $RP to a new image"
"$AGENT" restore "${CONN[@]}" --rp "$RP" --to "$W/restored.img" --json >"$W/restore.json"
SRC_SUM=$(sha256sum "$W/disk.img" | cut -d' ' -f1)
DST_SUM=$(sha256sum "$W/restored.img" | cut -d' ' -f1)
if [ "$SRC_SUM" != "$DST_SUM" ]; then
  echo "FAILED: restored image differs (source $SRC_SUM, restored $DST_SUM)"
  exit 1
fi
e2fsck -fn "$W/restored.img" >/dev/null 2>&1

echo
echo "== summary"
summary() {
  jq -r --arg name "$1" '.disks[0] as $d |
    [$name, $d.blocks_total, $d.blocks_read, $d.blocks_changed, $d.blocks_uploaded,
     $d.bytes_uploaded, .bytes_sent, .duration_ms,
     (if .duration_ms > 0 then ($d.size_bytes / 1048576 / (.duration_ms / 1000) | floor) else 0 end)]
    | @tsv' "$2"
}
{
  printf 'backup\tblocks\tread\tchanged\tuploaded\tpayload_bytes\twire_bytes\tms\tMiB/s\n'
  summary full "$W/backup1.json"
  summary incremental "$W/backup2.json"
} | column -t
jq -r '"restore: \(.disks[0].blocks_data) blocks fetched and verified, \(.bytes_received) bytes received, \(.duration_ms) ms"' "$W/restore.json"
echo "restored image is byte-identical (sha256 $DST_SUM) and passes e2fsck"
