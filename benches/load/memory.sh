#!/usr/bin/env bash
# Memory target of issue 7: after 100,000 distinct streams were each appended to once, idle
# stream actors are gone and the server's resident memory stays below 300 MB.
#
#   benches/load/memory.sh          # STREAMS=100000, actors idle out after 5 s
#
# A release `webpods` on a fresh PostgreSQL database (postgres://postgres@127.0.0.1:5432 unless
# WEBPODS_BENCH_ADMIN_URL says otherwise); wrk sends one append per stream over 64 connections.
set -euo pipefail
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
streams=${STREAMS:-100000}

bench_setup wp_mem
start_server WEBPODS_ACTOR_IDLE_SECS=5 target/release/webpods
create_pod mem
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
