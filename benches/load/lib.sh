# Shared by the load scripts (run.sh, memory.sh, instructions.sh): sourced, not run.
#
#   . "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
#   bench_setup wp_load                  # cd to the repository, wrk, release build, a fresh database
#   start_server target/release/webpods  # or: start_server VAR=value … [wrapper …] target/release/webpods
#   create_pod bench
#
# After bench_setup: $admin, $db, $url (the fresh database) and $work (a temporary directory).
# After start_server: $server (its pid), $base (http://127.0.0.1:port) and $token (the local
# user's). On exit the server stops, $work goes and the database is dropped.

bench_setup() {
  root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
  cd "$root"
  admin=${WEBPODS_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  command -v wrk >/dev/null || { echo "installing wrk" >&2; apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null); }
  cargo build --release -q --bin webpods
  db="$1_$(date +%s)"
  psql "$admin" -qAtc "CREATE DATABASE $db" >/dev/null
  url=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2]).geturl())" "$admin" "$db")
  work=$(mktemp -d)
  server=
  trap bench_cleanup EXIT
}

bench_cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  rm -rf "$work"
  psql "$admin" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}

# Starts the server on $url, rate limits off; the arguments are extra VAR=value settings and
# the command (a wrapper such as valgrind may come first). Waits until it listens.
start_server() {
  env WEBPODS_LISTEN=127.0.0.1:0 WEBPODS_DATABASE_URL="$url" WEBPODS_RATE_LIMITS=off \
    WEBPODS_LOG=warn WEBPODS_TOKEN_FILE="$work/token" "$@" >"$work/log" 2>&1 &
  server=$!
  until grep -q "listening on" "$work/log" && [ -s "$work/token" ]; do
    kill -0 "$server" 2>/dev/null || { echo "the server did not start:" >&2; cat "$work/log" >&2; exit 1; }
    sleep 0.1
  done
  base=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/log" | head -1)
  token=$(cat "$work/token")
}

create_pod() {
  curl -fsS -X POST "$base/api/pods" -H "Host: localhost" -H "Authorization: Bearer $token" \
    -d "{\"name\":\"$1\"}" >/dev/null
}

# The read scenarios' data: 200 records of 128 bytes in the stream load/read of pod bench.
seed_reads() {
  for i in $(seq 200); do echo "{\"name\":\"r$i\",\"content\":\"$(head -c 128 /dev/zero | tr '\0' 'y')\"}"; done \
    | curl -fsS -X POST "$base/load/read?batch=true" -H "Host: bench.localhost" \
      -H "Authorization: Bearer $token" --data-binary @- >/dev/null
}
