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
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
cd "$root"
admin=${WEBPODS_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
seconds=${SECONDS_MEASURED:-10}
conns=${CONNECTIONS:-16}
export STREAMS=${STREAMS:-100}
script=${SCRIPT-append.lua}

command -v valgrind >/dev/null || { echo "valgrind is required (Debian: valgrind)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "installing wrk" >&2; apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null); }
cargo build --release -q --bin webpods

db="wp_instr_$(date +%s)"
psql "$admin" -qAtc "CREATE DATABASE $db" >/dev/null
url=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2]).geturl())" "$admin" "$db")
work=$(mktemp -d)
WEBPODS_LISTEN=127.0.0.1:0 WEBPODS_DATABASE_URL="$url" WEBPODS_RATE_LIMITS=off WEBPODS_LOG=warn \
  WEBPODS_TOKEN_FILE="$work/token" valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
  target/release/webpods >"$work/log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"; psql "$admin" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 600); do grep -q "listening on" "$work/log" && [ -s "$work/token" ] && break; sleep 0.2; done
base=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/log" | head -1)
token=$(cat "$work/token")
curl -fsS -X POST "$base/api/pods" -H "Host: localhost" -H "Authorization: Bearer $token" -d '{"name":"bench"}' >/dev/null
for i in $(seq 200); do echo "{\"name\":\"r$i\",\"content\":\"$(head -c 128 /dev/zero | tr '\0' 'y')\"}"; done \
  | curl -fsS -X POST "$base/load/read?batch=true" -H "Host: bench.localhost" -H "Authorization: Bearer $token" --data-binary @- >/dev/null
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
