#!/usr/bin/env bash
# Load run (issue 7): a release `webpods` on PostgreSQL with durable commits, driven by wrk over
# loopback, and in the same run the machine's PostgreSQL ceiling measured with pgbench, so our
# figures can be read as ratios that hold on a noisy machine.
#
#   benches/load/run.sh            # uses postgres://postgres@127.0.0.1:5432 (fsync/sync commit as configured there)
#   WEBPODS_BENCH_ADMIN_URL=postgres://user@host:port/db DURATION=10 benches/load/run.sh
#
# Prints one line per scenario: throughput, p50 and p99 latency, and the ratio to pgbench.
set -euo pipefail
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
duration=${DURATION:-10}
conns=${CONNECTIONS:-64}
threads=${THREADS:-2}
command -v pgbench >/dev/null || { echo "pgbench is required (Debian: postgresql-client)" >&2; exit 1; }

bench_setup wp_load
echo "database: $db — fsync=$(psql "$url" -Atc 'show fsync'), synchronous_commit=$(psql "$url" -Atc 'show synchronous_commit')"
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); server, PostgreSQL and load generator share them"
start_server target/release/webpods
H=(-H "Host: bench.localhost" -H "Authorization: Bearer $token")
create_pod bench
# Data for the read scenarios: 200 records in load/read.
seed_reads

declare -A RPS P50 P99
run() { # name, records per request, wrk args…
  local name=$1 per=$2; shift 2
  local out; out=$(wrk -t"$threads" -c"$conns" -d"${duration}s" --latency "$@")
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  RPS[$name]=$(awk -v r="$rps" -v p="$per" 'BEGIN {printf "%.0f", r*p}')
  P50[$name]=$(awk '$1=="50%" {print $2}' <<<"$out")
  P99[$name]=$(awk '$1=="99%" {print $2}' <<<"$out")
  local errors; errors=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
  [ -z "$errors" ] || echo "  $name: $errors" >&2
}
STREAMS=1 run append_1_stream 1 -s benches/load/append.lua "${H[@]}" "$base"
# Warm-up: the first append to each of the 1,000 streams creates it (a stream creation, not
# an append, and serialized on the parent stream); measure appends once they exist.
STREAMS=1000 wrk -t"$threads" -c"$conns" -d"${duration}s" -s benches/load/append.lua "${H[@]}" "$base" >/dev/null
STREAMS=1000 run append_1000_streams 1 -s benches/load/append.lua "${H[@]}" "$base"
run batch_100 100 -s benches/load/batch.lua "${H[@]}" "$base"
run raw_read 1 "${H[@]}" "$base/load/read/r7"
run list_100 1 "${H[@]}" "$base/load/read?limit=100"

# PostgreSQL's own ceiling, same machine, same moment: single-row autocommit inserts with 32
# clients, and 100-row multi-row inserts.
psql "$url" -qc "CREATE TABLE pgb (id bigserial PRIMARY KEY, body text NOT NULL)"
single=$(mktemp); multi=$(mktemp)
echo "INSERT INTO pgb (body) VALUES (repeat('x', 256));" >"$single"
echo "INSERT INTO pgb (body) SELECT repeat('x', 256) FROM generate_series(1, 100);" >"$multi"
tps() { awk '/^tps/ {print $3; exit}'; }
PG1=$(pgbench -n -c 32 -j "$threads" -T "$duration" -f "$single" "$url" 2>/dev/null | tps)
PG100=$(pgbench -n -c 32 -j "$threads" -T "$duration" -f "$multi" "$url" 2>/dev/null | tps)
PG100_ROWS=$(awk -v t="$PG100" 'BEGIN {printf "%.0f", t*100}')
rm -f "$single" "$multi"

printf '\n%-22s %12s %10s %10s %10s\n' scenario "records/s" p50 p99 "vs pgbench"
for name in append_1_stream append_1000_streams batch_100 raw_read list_100; do
  ref=$PG1; [ "$name" = batch_100 ] && ref=$PG100_ROWS
  ratio=$(awk -v a="${RPS[$name]}" -v b="$ref" 'BEGIN {printf "%.2f×", a/b}')
  case $name in raw_read|list_100) ratio="-";; esac
  printf '%-22s %12s %10s %10s %10s\n' "$name" "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}" "$ratio"
done
printf '%-22s %12.0f\n' pgbench_single_row "$PG1" pgbench_100_row_rows "$PG100_ROWS"
echo "(raw_read and list_100 are requests/s; $conns connections, ${duration}s each, 256-byte records)"
