#!/usr/bin/env bash
# Server instructions per request, counted by valgrind's callgrind: a figure that does not move
# with the machine's speed or its neighbours (records/s on a shared 2-core VM drift by 2× within
# an hour; see BENCHMARKS.md). Use it to compare two commits' CPU cost per request.
#
#   benches/load/instructions.sh                       # appends, 100 streams, 16 connections
#   STREAMS=1 benches/load/instructions.sh             # one stream
#   URLPATH=/load/read/r7 SCRIPT= benches/load/instructions.sh   # raw reads
#   PROFILE=/tmp/appends.cg benches/load/instructions.sh   # keep the profile: callgrind_annotate
#
# The server runs on PostgreSQL (WEBPODS_BENCH_ADMIN_URL, as run.sh) about 50× slower than
# natively, so batches are smaller than under a real load run: compare like with like only.
# SHA-256 runs in software under valgrind (no SHA extensions), so hashing weighs more here.
set -euo pipefail
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
seconds=${SECONDS_MEASURED:-10}
conns=${CONNECTIONS:-16}
export STREAMS=${STREAMS:-100}
script=${SCRIPT-append.lua}
command -v valgrind >/dev/null || { echo "valgrind is required (Debian: valgrind)" >&2; exit 1; }

bench_setup wp_instr
start_server valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" target/release/webpods
create_pod bench
seed_reads
args=(-t1 -c"$conns" -H "Host: bench.localhost" -H "Authorization: Bearer $token")
[ -z "$script" ] || args+=(-s "benches/load/$script")
# Warm-up (streams created, caches filled, statements prepared), then count only the run.
wrk "${args[@]}" -d10s "$base${URLPATH:-}" >/dev/null
callgrind_control -z "$server" >/dev/null 2>&1
out=$(wrk "${args[@]}" -d"${seconds}s" "$base${URLPATH:-}")
callgrind_control -d "$server" >/dev/null 2>&1
sleep 1
requests=$(awk '/requests in/ {print $1}' <<<"$out")
total=0
for f in "$work"/cg.*; do
  n=$(awk '/^(summary|totals):/ {print $2; exit}' "$f"); total=$((total + ${n:-0}))
done
[ -z "${PROFILE:-}" ] || cat "$work"/cg.* > "$PROFILE"
echo "${URLPATH:-appends, $STREAMS streams}, $conns connections: $requests requests, $((total / requests)) instructions per request"
