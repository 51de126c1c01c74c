#!/usr/bin/env bash
# Memory target of issue 7: after 100,000 distinct streams were each appended to once, idle
# stream actors are gone and the server's resident memory stays below 300 MB.
#
#   benches/load/memory.sh          # STREAMS=100000, actors idle out after 5 s
#
# A release `webpods` on a fresh PostgreSQL database (postgres://postgres@127.0.0.1:5432 unless
# WEBPODS_BENCH_ADMIN_URL says otherwise); wrk sends one append per stream over 64 connections.
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
cd "$root"
admin=${WEBPODS_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
streams=${STREAMS:-100000}
command -v wrk >/dev/null || { echo "installing wrk" >&2; apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null); }

db="wp_mem_$(date +%s)"
psql "$admin" -qAtc "CREATE DATABASE $db" >/dev/null
url=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2]).geturl())" "$admin" "$db")
cargo build --release -q --bin webpods
log=$(mktemp)
WEBPODS_LISTEN=127.0.0.1:0 WEBPODS_DATABASE_URL="$url" WEBPODS_RATE_LIMITS=off WEBPODS_LOG=warn \
  WEBPODS_ACTOR_IDLE_SECS=5 WEBPODS_TOKEN_FILE="$log.token" target/release/webpods >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log" "$log.token"; psql "$admin" -qAtc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$log" && [ -s "$log.token" ] && break; sleep 0.1; done
base=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1)
token=$(cat "$log.token")
curl -fsS -X POST "$base/api/pods" -H "Host: localhost" -H "Authorization: Bearer $token" -d '{"name":"mem"}' >/dev/null
# The streams exist before the run: what is measured is appending to 100,000 streams (an actor
# each, then idle), not 100,000 stream creations — those are rate limited (100/h per user by
# default) and serialized per parent. Same rows as the engine creates (`public`, owner-created).
psql "$url" -qAtc "INSERT INTO streams (pod_id, parent_id, path, name, access, creator_id, created_at)
  SELECT p.id, NULL, 'm' || g, 'm' || g, 'public', p.owner_id, 0
  FROM pods p, generate_series(0, $streams - 1) g WHERE p.name = 'mem'"
rss() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$server/status"; }
metric() { curl -s "$base/metrics" -H "Host: localhost" | awk -v m="$1" '$1==m {print $2}'; }
echo "resident memory at start: $(rss) MB"

start=$(date +%s)
STREAMS=$streams wrk -t2 -c64 -d3600s -s benches/load/many_streams.lua \
  -H "Host: mem.localhost" -H "Authorization: Bearer $token" "$base" >/dev/null &
load=$!
peak=0
while :; do
  sleep 2
  appended=$(metric webpods_appended_records_total); appended=${appended:-0}
  r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
  # wrk calls request() once per thread before it starts sending: a stream or two is skipped.
  [ "$appended" -ge $((streams - 4)) ] && break
  kill -0 $load 2>/dev/null || { echo "wrk stopped early" >&2; exit 1; }
done
kill $load 2>/dev/null; wait $load 2>/dev/null || true
echo "$(metric webpods_appended_records_total) streams appended to once in $(( $(date +%s) - start )) s; peak resident memory $peak MB, actors alive: $(metric webpods_active_stream_actors)"
for _ in $(seq 60); do
  sleep 1
  [ "$(metric webpods_active_stream_actors)" = 0 ] && break
done
sleep 2
echo "after the idle timeout: actors alive: $(metric webpods_active_stream_actors), resident memory $(rss) MB (target < 300 MB)"
