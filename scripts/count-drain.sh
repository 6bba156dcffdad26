#!/usr/bin/env bash
# Count the instructions a fusion worker spends per drained job (valgrind's callgrind: user space
# only, exact, whatever else the machine is doing). See BENCHMARKS.md, sixteenth round.
#
#   scripts/count-drain.sh [DATABASE_URL]     # default: a fresh SQLite file
#
# Needs valgrind, curl, python3, and sqlite3 or psql for the database. Uses the release builds
# of `fusion` and of the bench harness (for its fake upstream): `cargo bench --bench bench
# --no-run` makes both. An API-only server queues JOBS jobs (10,000) against the zero-latency
# fake; a worker running FUSION_CONCURRENCY (256) jobs at once drains them under callgrind,
# counting from WARM seconds (0.7) for SECONDS_COUNTED seconds (25). It prints the jobs finished in that
# window and leaves the profile (callgrind_annotate it) in the printed directory. A Postgres
# database must be empty and migrated by nobody else; the worker migrates it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fusion=${FUSION:-$root/target/release/fusion}
bench=$(ls -t "$root"/target/release/deps/bench-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[[ -x $fusion && -x $bench ]] || { echo "run: cargo bench --bench bench --no-run" >&2; exit 1; }
dir=$(mktemp -d /tmp/fusion-count.XXXX)
db=${1:-sqlite://$dir/db.sqlite}
jobs=${JOBS:-10000}
port=${PORT:-18099}

cd "$dir"
echo '{"default_ms":0,"delays":[]}' > script.json
coproc FAKE { exec "$bench" fake-upstream --script script.json; }
read -r -u "${FAKE[0]}" line
export FUSION_UPSTREAM_URL="http://${line#listening }/v1" RUST_LOG=warn NO_COLOR=1 DATABASE_URL=$db

FUSION_CONCURRENCY=0 FUSION_LISTEN=127.0.0.1:$port "$fusion" serve > api.log 2>&1 &
api=$!
for _ in $(seq 100); do curl -sf "localhost:$port/readyz" > /dev/null && break; sleep 0.1; done
python3 - "$jobs" "$port" <<'PY'
import concurrent.futures, json, sys, urllib.request
n, port = int(sys.argv[1]), sys.argv[2]
body = json.dumps({"model": "fusion", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                   "plugins": [{"id": "fusion", "model": "judge", "analysis_models": ["m1", "m2", "m3"]}]}).encode()
def post(_):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/jobs", data=body,
                                 headers={"content-type": "application/json"})
    return urllib.request.urlopen(req).status
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    print("queued", sum(1 for s in pool.map(post, range(n)) if s == 202))
PY
kill $api; wait $api || true

finished() {
    local q="SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'running')"
    case $db in
        sqlite:*) sqlite3 "${db#sqlite://}" "PRAGMA busy_timeout = 5000; $q" | tail -1 ;;
        *) psql -qtA "$db" -c "$q" ;;
    esac
}
FUSION_CONCURRENCY=${FUSION_CONCURRENCY:-256} valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$dir/callgrind.out.%p" "$fusion" worker > worker.log 2>&1 &
worker=$!
sleep "${WARM:-0.7}"
callgrind_control -i on $worker > /dev/null 2>&1
before=$(finished)
sleep "${SECONDS_COUNTED:-25}"
callgrind_control -d $worker > /dev/null 2>&1
after=$(finished)
kill $worker; wait $worker || true
echo "jobs finished while counting: $((after - before))"
echo "profile: $(ls "$dir"/callgrind.out.*.1)  (callgrind_annotate --inclusive=yes FILE)"
