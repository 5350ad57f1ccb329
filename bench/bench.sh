#!/usr/bin/env bash
# vmsnap's benchmark against restic and borg on the same disk images (issue 6).
# docs/PERFORMANCE.md explains the method and records results.
#
#   bench/bench.sh [--size MIB] [--runs N] [--tools vmsnap,restic,borg] [--block-size SIZE]
#                  [--sweep 16K,32K,...] [--churn PERCENT] [--scaling] [--bin BUILD_DIR]
#                  [--json FILE] [--cold-restore]
#   bench/bench.sh --smoke --bin BUILD_DIR     # tiny run that only checks the harness works
#
# Per run: a fresh image (half holes, a quarter compressible, a quarter random), the machine's
# limits on that data (page-cache read, SHA-256 and zstd -1 with one and two threads), then per
# tool: full backup, CHURN % of random 16 KiB writes, incremental backup, full restore
# (timed until the restored image is flushed to the disk, verified by SHA-256 of the whole
# image; with --cold-restore, root only, the page cache is dropped before each restore, as for
# a restore long after the backup). Reports wall and CPU time, peak memory, bytes stored in the
# repository or vault, bytes sent (vmsnap), medians over the runs, and ratios.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=4096 RUNS=3 TOOLS="vmsnap,restic,borg" BLOCK="" SWEEP="" CHURN=2 SCALING=0 SMOKE=0 BIN="" JSON_OUT="" COLD_RESTORE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --block-size) BLOCK=$2; shift 2 ;;
    --sweep) SWEEP=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --scaling) SCALING=1; shift ;;
    --bin) BIN=$2; shift 2 ;;
    --json) JSON_OUT=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --cold-restore) COLD_RESTORE=1; shift ;;
    *) echo "bench: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ "$SMOKE" = 1 ]; then
  SIZE_MIB=64 RUNS=1 SWEEP=${SWEEP:-32K,1M}
  t=vmsnap
  command -v restic >/dev/null && t="$t,restic"
  command -v borg >/dev/null && t="$t,borg"
  TOOLS=$t
fi
for tool in ${TOOLS//,/ }; do
  case "$tool" in
    vmsnap) ;;
    restic|borg) command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (apt-get install ${tool/borg/borgbackup})" >&2; exit 2; } ;;
    *) echo "bench: unknown tool $tool" >&2; exit 2 ;;
  esac
done
if [ "$COLD_RESTORE" = 1 ] && [ ! -w /proc/sys/vm/drop_caches ]; then
  echo "bench: --cold-restore drops the page cache and needs root" >&2; exit 2
fi
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time is missing (apt-get install time)" >&2; exit 2; }

if [ -z "$BIN" ]; then
  BIN="$ROOT/build-bench"
  cmake -S "$ROOT" -B "$BIN" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF >/dev/null
  cmake --build "$BIN" --target vmsnap-agent vmsnap-vault vmsnap-freeze-guard vmsnap-bench-image
fi
find_bin() { find "$BIN" -name "$1" -type f -perm -u+x | head -1; }
AGENT=$(find_bin vmsnap-agent) VAULT=$(find_bin vmsnap-vault) IMAGE=$(find_bin vmsnap-bench-image)
for b in AGENT VAULT IMAGE; do
  [ -n "${!b}" ] || { echo "bench: no ${b,,} binary under $BIN (build it first)" >&2; exit 2; }
done

W=$(mktemp -d /var/tmp/vmsnap-bench.XXXXXX)
vault_pid=""
cleanup() {
  if [ -n "$vault_pid" ]; then kill -TERM "$vault_pid" 2>/dev/null || true; wait "$vault_pid" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
RESULTS="$W/results.jsonl"
: >"$RESULTS"
export RESTIC_PASSWORD=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

# measure RUN TOOL PHASE EXTRA_JSON -- command...: runs it under /usr/bin/time and records.
measure() {
  local run=$1 tool=$2 phase=$3 extra=$4
  shift 5
  if ! /usr/bin/time -f '%e %U %S %M' -o "$W/time.txt" "$@" >"$W/cmd.out" 2>"$W/cmd.err"; then
    echo "bench: $tool $phase failed: $*" >&2
    tail -20 "$W/cmd.err" >&2
    exit 1
  fi
  read -r wall user sys rss <"$W/time.txt"
  jq -nc --argjson run "$run" --arg tool "$tool" --arg phase "$phase" --argjson wall "$wall" \
    --argjson user "$user" --argjson sys "$sys" --argjson rss "$rss" --argjson extra "$extra" \
    '{run:$run, tool:$tool, phase:$phase, wall_s:$wall, cpu_s:((($user+$sys)*100|round)/100), max_rss_kib:$rss} + $extra' >>"$RESULTS"
}
record() { jq -nc --argjson run "$1" --arg tool "$2" --arg phase "$3" --argjson extra "$4" '{run:$run, tool:$tool, phase:$phase} + $extra' >>"$RESULTS"; }
# until_synced FILE -- command...: runs the command, then flushes FILE to the disk. Every tool's
# restore is timed until the restored image is durable: restic and borg leave it in the page
# cache (dirty) when they exit, vmsnap flushes before it reports success.
SYNCED=(bash -c '"${@:2}" && sync "$1"' until_synced)
# before_restore: with --cold-restore, every tool restores from a repository that is not cached.
before_restore() { if [ "$COLD_RESTORE" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
# settle: flushes what the harness itself left dirty (the copy of the image, the churn) before a
# timed backup, so no tool is charged for writing back the harness's pages or waits behind them.
settle() { sync; }
bytes_of() { du -sb "$@" 2>/dev/null | awk '{s+=$1} END {printf "%.0f\n", s}'; }

start_vault() {
  "$VAULT" serve --data "$1" --listen 127.0.0.1:0 >"$W/vault.out" 2>"$W/vault.log" &
  vault_pid=$!
  for _ in $(seq 1 100); do [ -s "$1/vault.json" ] && return 0; sleep 0.1; done
  echo "bench: vault did not start" >&2; cat "$W/vault.log" >&2; exit 1
}
stop_vault() { kill -TERM "$vault_pid"; wait "$vault_pid" || true; vault_pid=""; }

limits() {
  local run=$1 sample="$W/sample.img" mib=$((SIZE_MIB / 2 < 256 ? SIZE_MIB / 2 : 256))
  "$IMAGE" sample "$sample" "$mib" 7
  cat "$W/base.img" >/dev/null
  # The image's data (not its holes): what the throughput ratios below are computed on.
  local data_bytes; data_bytes=$(du -B1 "$W/base.img" | awk '{print $1}')
  measure "$run" limit read "{\"data_bytes\": $data_bytes}" -- dd if="$W/base.img" of=/dev/null bs=4M status=none
  # Sequential write of as many bytes as the image holds data, flushed (restores flush too):
  # through the page cache, and direct (O_DIRECT, 4 MiB writes); the faster is the limit.
  local count=$(( (data_bytes + 4194303) / 4194304 ))
  measure "$run" limit write "{\"data_bytes\": $data_bytes}" -- dd if=/dev/zero of="$W/write.img" bs=4M \
    count=$count conv=fsync status=none
  rm -f "$W/write.img"
  measure "$run" limit write_direct "{\"data_bytes\": $data_bytes}" -- dd if=/dev/zero of="$W/write.img" bs=4M \
    count=$count oflag=direct conv=fsync status=none
  rm -f "$W/write.img"
  for threads in 1 2; do
    local multi=() kb
    [ "$threads" = 2 ] && multi=(-multi 2)
    kb=$(openssl speed -bytes 65536 -seconds 2 -evp sha256 "${multi[@]}" 2>/dev/null | awk '$1=="sha256"{v=$NF} END{sub("k","",v); print v+0}')
    record "$run" limit "sha256_${threads}t" "{\"mb_per_s\": $(awk -v k="$kb" 'BEGIN{printf "%.1f", k/1000}')}"
    local mbs
    mbs=$(zstd -b1 -e1 -i2 -T"$threads" -B65536 "$sample" 2>&1 | tr '\r' '\n' | awk -F', ' '/MB\/s/{split($2,a," "); v=a[1]} END{print v+0}')
    record "$run" limit "zstd1_${threads}t" "{\"mb_per_s\": $mbs}"
  done
  rm -f "$sample"
}

# run_vmsnap RUN [LABEL BLOCK]: LABEL "vmsnap" (default) or "vmsnap@16K" for the sweep.
run_vmsnap() {
  local run=$1 tool=${2:-vmsnap} block=${3:-$BLOCK} d="$W/vmsnap" img="$W/vmsnap/disk.img"
  mkdir -p "$d/hooks" "$d/run"
  cp --sparse=always "$W/base.img" "$img"
  start_vault "$d/vault"
  local conn=(--vault "$(jq -r .url "$d/vault/vault.json")" --ca "$d/vault/tls/ca.pem" --token-file "$d/vault/token")
  local common=(--disk "$img" --state-dir "$d/state" --item bench --hooks-dir "$d/hooks" --runtime-dir "$d/run" --json)
  [ -n "$block" ] && common+=(--block-size "$block")
  settle
  measure "$run" "$tool" full '{}' -- "$AGENT" backup "${conn[@]}" "${common[@]}"
  local sent stored
  sent=$(jq .bytes_sent "$W/cmd.out"); stored=$(bytes_of "$d/vault/blocks" "$d/vault/rps")
  record "$run" "$tool" full_bytes "{\"sent_bytes\": $sent, \"stored_bytes\": $stored}"
  "$IMAGE" churn "$img" "$CHURN" 11 >"$W/churn.txt"
  settle
  measure "$run" "$tool" incremental '{}' -- "$AGENT" backup "${conn[@]}" "${common[@]}"
  local rp; rp=$(jq -r .recovery_point "$W/cmd.out"); sent=$(jq .bytes_sent "$W/cmd.out")
  local stored2; stored2=$(bytes_of "$d/vault/blocks" "$d/vault/rps")
  record "$run" "$tool" incremental_bytes "{\"sent_bytes\": $sent, \"stored_bytes\": $((stored2 - stored)), \"changed_bytes\": $(cat "$W/churn.txt")}"
  before_restore
  measure "$run" "$tool" restore '{}' -- "${SYNCED[@]}" "$d/restored.img" "$AGENT" restore "${conn[@]}" --rp "$rp" --to "$d/restored.img" --json
  [ "$(sha256sum <"$img")" = "$(sha256sum <"$d/restored.img")" ] || { echo "bench: vmsnap restore differs" >&2; exit 1; }
  stop_vault
  rm -rf "$d"
}

run_restic() {
  local run=$1 d="$W/restic" img="$W/restic/disk.img"
  mkdir -p "$d"
  cp --sparse=always "$W/base.img" "$img"
  export RESTIC_REPOSITORY="$d/repo"
  restic init -q >/dev/null
  settle
  measure "$run" restic full '{}' -- restic backup -q "$img"
  local stored; stored=$(bytes_of "$d/repo")
  record "$run" restic full_bytes "{\"stored_bytes\": $stored}"
  "$IMAGE" churn "$img" "$CHURN" 11 >"$W/churn.txt"
  settle
  measure "$run" restic incremental '{}' -- restic backup -q "$img"
  record "$run" restic incremental_bytes "{\"stored_bytes\": $(($(bytes_of "$d/repo") - stored)), \"changed_bytes\": $(cat "$W/churn.txt")}"
  before_restore
  measure "$run" restic restore '{}' -- "${SYNCED[@]}" "$d/out$img" restic restore -q latest --target "$d/out"
  [ "$(sha256sum <"$img")" = "$(sha256sum <"$d/out$img")" ] || { echo "bench: restic restore differs" >&2; exit 1; }
  rm -rf "$d"
}

run_borg() {
  local run=$1 d="$W/borg" img="$W/borg/disk.img"
  mkdir -p "$d/out"
  cp --sparse=always "$W/base.img" "$img"
  borg init -e none "$d/repo" >/dev/null 2>&1
  settle
  measure "$run" borg full '{}' -- borg create --compression zstd,1 "$d/repo::full" "$img"
  local stored; stored=$(bytes_of "$d/repo")
  record "$run" borg full_bytes "{\"stored_bytes\": $stored}"
  "$IMAGE" churn "$img" "$CHURN" 11 >"$W/churn.txt"
  settle
  measure "$run" borg incremental '{}' -- borg create --compression zstd,1 "$d/repo::inc" "$img"
  record "$run" borg incremental_bytes "{\"stored_bytes\": $(($(bytes_of "$d/repo") - stored)), \"changed_bytes\": $(cat "$W/churn.txt")}"
  before_restore
  measure "$run" borg restore '{}' -- "${SYNCED[@]}" "$d/out$img" \
    bash -c "cd '$d/out' && borg extract --sparse '$d/repo::inc'"
  [ "$(sha256sum <"$img")" = "$(sha256sum <"$d/out$img")" ] || { echo "bench: borg restore differs" >&2; exit 1; }
  rm -rf "$d"
}

echo "bench: ${SIZE_MIB} MiB image, ${RUNS} run(s), tools ${TOOLS}, block size ${BLOCK:-default}, churn ${CHURN} %$([ "$COLD_RESTORE" = 1 ] && echo ", restores from a cold page cache")" >&2
for run in $(seq 1 "$RUNS"); do
  "$IMAGE" create "$W/base.img" "$SIZE_MIB" "$run"
  limits "$run"
  for tool in ${TOOLS//,/ }; do
    echo "bench: run $run: $tool" >&2
    "run_$tool" "$run"
  done
  for b in ${SWEEP//,/ }; do
    echo "bench: run $run: vmsnap, block size $b" >&2
    run_vmsnap "$run" "vmsnap@$b" "$b"
  done
  rm -f "$W/base.img"
done

if [ "$SCALING" = 1 ]; then
  # Same total churn spread over 1, 2, 4, 8 disks of a fixed total size (seed 002: spread churn
  # backs up faster), then backup time against image size.
  for disks in 1 2 4 8; do
    d="$W/scale"; mkdir -p "$d/hooks" "$d/run"; start_vault "$d/vault"
    conn=(--vault "$(jq -r .url "$d/vault/vault.json")" --ca "$d/vault/tls/ca.pem" --token-file "$d/vault/token")
    args=()
    for i in $(seq 1 "$disks"); do
      "$IMAGE" create "$d/disk$i.img" $((SIZE_MIB / disks)) "$i"; args+=(--disk "$d/disk$i.img")
    done
    "$AGENT" backup "${conn[@]}" "${args[@]}" --state-dir "$d/state" --item scale --hooks-dir "$d/hooks" --runtime-dir "$d/run" --json >/dev/null
    for i in $(seq 1 "$disks"); do "$IMAGE" churn "$d/disk$i.img" "$CHURN" "$i" >/dev/null; done
    measure 0 vmsnap "incremental_${disks}_disks" '{}' -- "$AGENT" backup "${conn[@]}" "${args[@]}" --state-dir "$d/state" --item scale --hooks-dir "$d/hooks" --runtime-dir "$d/run" --json
    stop_vault; rm -rf "$d"
  done
  for mib in 1024 2048 4096 8192; do
    d="$W/size"; mkdir -p "$d/hooks" "$d/run"; start_vault "$d/vault"
    conn=(--vault "$(jq -r .url "$d/vault/vault.json")" --ca "$d/vault/tls/ca.pem" --token-file "$d/vault/token")
    "$IMAGE" create "$d/disk.img" "$mib" 1
    measure 0 vmsnap "full_${mib}_mib" '{}' -- "$AGENT" backup "${conn[@]}" --disk "$d/disk.img" --state-dir "$d/state" --item size --hooks-dir "$d/hooks" --runtime-dir "$d/run" --json
    stop_vault; rm -rf "$d"
  done
fi

# Medians per tool and phase, and the ratios the issue's targets are stated in.
SUMMARY=$(jq -s --argjson size_mib "$SIZE_MIB" --arg block "$BLOCK" --argjson churn "$CHURN" \
  --argjson cold "$COLD_RESTORE" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  def med(f): map(f) | map(select(. != null)) | median;
  (group_by(.tool + "/" + .phase) | map({key: (.[0].tool + "/" + .[0].phase),
     value: {wall_s: med(.wall_s), cpu_s: med(.cpu_s), max_rss_kib: med(.max_rss_kib),
             mb_per_s: med(.mb_per_s), sent_bytes: med(.sent_bytes), stored_bytes: med(.stored_bytes),
             changed_bytes: med(.changed_bytes), data_bytes: med(.data_bytes)}}) | from_entries) as $m
  | {image_mib: $size_mib, block_size: $block, churn_percent: $churn, runs: (map(.run) | max),
     cold_restore: ($cold == 1),
     medians: $m,
     ratios: ({} + (if $m["restic/full"] then {
        full_speedup_vs_restic: ($m["restic/full"].wall_s / $m["vmsnap/full"].wall_s),
        incremental_speedup_vs_restic: ($m["restic/incremental"].wall_s / $m["vmsnap/incremental"].wall_s),
        restore_speedup_vs_restic: ($m["restic/restore"].wall_s / $m["vmsnap/restore"].wall_s),
        full_stored_vs_restic: ($m["vmsnap/full_bytes"].stored_bytes / $m["restic/full_bytes"].stored_bytes)} else {} end)
      + (if $m["borg/full"] then {
        full_speedup_vs_borg: ($m["borg/full"].wall_s / $m["vmsnap/full"].wall_s),
        incremental_speedup_vs_borg: ($m["borg/incremental"].wall_s / $m["vmsnap/incremental"].wall_s),
        restore_speedup_vs_borg: ($m["borg/restore"].wall_s / $m["vmsnap/restore"].wall_s)} else {} end)
      + (if $m["vmsnap/full"] and $m["limit/sha256_2t"] then {
        full_vs_sha256_2t_limit: (($m["limit/read"].data_bytes / 1e6 / $m["vmsnap/full"].wall_s) / $m["limit/sha256_2t"].mb_per_s),
        restore_vs_write_limit: ([$m["limit/write"].wall_s, $m["limit/write_direct"].wall_s] | min / $m["vmsnap/restore"].wall_s),
        agent_peak_rss_mib: ([$m["vmsnap/full"].max_rss_kib, $m["vmsnap/incremental"].max_rss_kib, $m["vmsnap/restore"].max_rss_kib] | max / 1024)} else {} end)
      + ($m | to_entries | map(select(.key | test("^vmsnap@[^/]+/incremental_bytes$")))
         | map({key: ("incremental_stored_vs_changed@" + (.key | capture("@(?<b>[^/]+)/").b)),
                value: (.value.stored_bytes / .value.changed_bytes)}) | from_entries)
      + (if $m["vmsnap/incremental_bytes"] then {
        incremental_stored_vs_changed: ($m["vmsnap/incremental_bytes"].stored_bytes / $m["vmsnap/incremental_bytes"].changed_bytes),
        incremental_sent_vs_changed: ($m["vmsnap/incremental_bytes"].sent_bytes / $m["vmsnap/incremental_bytes"].changed_bytes)} else {} end)),
     raw: .}' "$RESULTS")
echo
echo "$SUMMARY" | jq -r '.medians | to_entries[] | [.key, (.value.wall_s // "-"), (.value.cpu_s // "-"),
    (.value.max_rss_kib // "-"), (.value.mb_per_s // "-"), (.value.sent_bytes // "-"), (.value.stored_bytes // "-")] | @tsv' |
  (printf 'tool/phase\twall_s\tcpu_s\tmax_rss_kib\tMB/s\tsent_bytes\tstored_bytes\n'; cat) | column -t -s $'\t'
echo
echo "$SUMMARY" | jq -r '.ratios | to_entries[] | "\(.key): \(.value * 100 | round / 100)"'
if [ -n "$JSON_OUT" ]; then echo "$SUMMARY" >"$JSON_OUT"; echo "bench: JSON written to $JSON_OUT" >&2; fi
if [ "$SMOKE" = 1 ]; then
  echo "$SUMMARY" | jq -e '.medians["vmsnap/full"].wall_s > 0 and .medians["vmsnap/restore"].wall_s > 0
     and .medians["vmsnap/incremental_bytes"].changed_bytes > 0 and .medians["limit/sha256_1t"].mb_per_s > 0' >/dev/null ||
    { echo "bench smoke: the summary is missing measurements" >&2; exit 1; }
  echo "bench smoke: ok"
fi
