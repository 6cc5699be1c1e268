#!/usr/bin/env bash
# Request latency of the real binary while it reloads: sticky-proxy with
# 1,000 backends (spread over 3 nginx instances that answer 200 at once),
# keep-alive load from wrk, phases without reloads alternating with phases
# that reload 100 ms after the last reload answered, medians and ratios.
#
#   bash benches/load/reload.sh [--rounds N] [--duration S] [--kinds LIST] [BINARY]
#
# Kinds (what each reload changes): identical (nothing), same-ring (every
# address: the ring is kept), rebuild (ten backends renamed: a new ring).
# Reloads are POST /reload over bash's /dev/tcp from a loop of shell
# builtins, so the harness forks nothing while it measures, and each reload
# is done before the next write of the file. Environment: WORKERS (default 2), RUNTIME
# (server.runtime, default the proxy's). See benches/load/README.md.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

ROUNDS=3
DURATION=8
KINDS="identical,same-ring,rebuild"
BINARY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift 2 ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift 2 ;;
    --kinds) KINDS="${2:?--kinds needs a list}"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    *) BINARY="$1"; shift ;;
  esac
done
for v in ROUNDS DURATION; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ] || [ "${!v}" -gt 600 ]; then
    echo "${v,,} must be 1..600, got '${!v}'" >&2; exit 2
  fi
done
IFS=, read -r -a KIND_LIST <<<"$KINDS"
for k in "${KIND_LIST[@]}"; do
  case "$k" in identical|same-ring|rebuild) ;; *) echo "unknown kind '$k' (identical, same-ring, rebuild)" >&2; exit 2 ;; esac
done
WORKERS="${WORKERS:-2}"
case "$WORKERS" in ''|*[!0-9]*|0) echo "WORKERS must be a positive number, got '$WORKERS'" >&2; exit 2 ;; esac
RUNTIME="${RUNTIME:-}"

REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PROXY_PORT=18080
ADMIN_PORT=19901
BACKEND_PORTS=(19101 19102 19103)
BACKENDS=1000
MAX_RELOADS=600          # per phase: the loop is bounded even if the clock is not
export PATH="$PATH:/usr/sbin:/sbin"
for tool in wrk curl nginx; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool (benches/load/run.sh installs it: run it once, or apt-get install wrk curl nginx-light)" >&2; exit 1; }
done
if [ -z "$BINARY" ]; then
  echo "building: cargo build --release --bin sticky-proxy (in $REPO_ROOT)" >&2
  (cd "$REPO_ROOT" && cargo build --release --bin sticky-proxy >&2)
  target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  BINARY="${target_dir:-$REPO_ROOT/target}/release/sticky-proxy"
fi
[ -x "$BINARY" ] || { echo "not an executable: $BINARY" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "${BACKEND_PORTS[@]}" "$PROXY_PORT" "$ADMIN_PORT"; do
  if port_open "$p"; then echo "something already listens on 127.0.0.1:$p: stop it first" >&2; exit 1; fi
done

OUT_DIR="$(mktemp -d /tmp/sticky-reload-bench.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# The backends: one nginx answering 200 on all three ports.
mkdir -p "$OUT_DIR/nginx/logs"
{
  echo "worker_processes 1; daemon off; error_log stderr error; pid $OUT_DIR/nginx/nginx.pid;"
  echo "events { worker_connections 4096; }"
  echo "http { access_log off; server {"
  for p in "${BACKEND_PORTS[@]}"; do echo "  listen 127.0.0.1:$p;"; done
  echo "  keepalive_requests 1000000; location / { return 200 \"ok\\n\"; } } }"
} >"$OUT_DIR/nginx/nginx.conf"
nginx -p "$OUT_DIR/nginx" -c "$OUT_DIR/nginx/nginx.conf" 2>"$OUT_DIR/nginx.log" &
PIDS+=($!)

# A config with ids app-FIRST.. and the i-th backend on port (i + SHIFT) % 3.
config() { # first shift
  echo "[server]"
  echo "listen = \"127.0.0.1:$PROXY_PORT\""
  echo "workers = $WORKERS"
  if [ -n "$RUNTIME" ]; then echo "runtime = \"$RUNTIME\""; fi
  echo "access_log = false"
  echo "[admin]"
  echo "listen = \"127.0.0.1:$ADMIN_PORT\""
  echo "[routing]"
  echo 'key = ["header:x-device-id"]'
  echo "[reload]"
  echo "watch = false"
  local i
  for ((i = 0; i < BACKENDS; i++)); do
    printf '[[backends]]\nid = "app-%d"\naddress = "127.0.0.1:%d"\n' $((i + $1)) "${BACKEND_PORTS[$(((i + $2) % 3))]}"
  done
}
config 1 0 >"$OUT_DIR/a.toml"
config 1 0 >"$OUT_DIR/identical.toml"
config 1 1 >"$OUT_DIR/same-ring.toml"
config 11 0 >"$OUT_DIR/rebuild.toml"
mkfifo "$OUT_DIR/never"   # read -t on it: a sleep without a fork

wait_ready() { # pid
  local i
  for ((i = 0; i < 100; i++)); do
    if curl -s -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz"; then return 0; fi
    kill -0 "$1" 2>/dev/null || { echo "sticky-proxy exited; its log:" >&2; cat "$OUT_DIR/proxy.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "sticky-proxy not ready within 10 s" >&2; exit 1
}

# POST /reload with bash's /dev/tcp (no fork); waits for the answer, so
# the reload is over. Fails unless it is 200.
reload_now() {
  local status=""
  exec 8<>"/dev/tcp/127.0.0.1/$ADMIN_PORT" || return 1
  printf 'POST /reload HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$ADMIN_PORT" >&8
  read -r -t 30 -u 8 _ status _ || true
  exec 8<&-
  [ "$status" = 200 ]
}

# Reloads every ~100 ms until the file `stop` exists, alternating the
# starting config and `kind`'s; prints how many (and fails on a failed one).
reloader() { # kind
  local a b flip=0 n=0
  a="$(<"$OUT_DIR/a.toml")"; b="$(<"$OUT_DIR/$1.toml")"
  exec 9<>"$OUT_DIR/never"
  while [ ! -e "$OUT_DIR/stop" ] && [ "$n" -lt "$MAX_RELOADS" ]; do
    read -r -t 0.1 -u 9 _ || true
    flip=$((1 - flip)); n=$((n + 1))
    if [ "$flip" -eq 1 ]; then printf '%s\n' "$b" >"$OUT_DIR/config.toml"; else printf '%s\n' "$a" >"$OUT_DIR/config.toml"; fi
    reload_now || { echo "reload $n failed; the proxy's log: $OUT_DIR/proxy.log" >&2; echo "$n"; return 1; }
  done
  echo "$n"
}

ms() { # wrk latency (e.g. 812.00us, 1.23ms, 1.01s) -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /s$/ && v !~ /ms$/) n *= 1000; printf "%.2f", n }'
}

# One wrk run: "req/s p50_ms p99_ms".
load() {
  local out
  out="$(cd "$REPO_ROOT" && DEVICE_IDS=10000 timeout $((DURATION + 30)) wrk -t2 -c64 -d"${DURATION}s" --latency \
    -s benches/load/device_ids.lua "http://127.0.0.1:$PROXY_PORT/" 2>&1)" || { echo "wrk failed: $out" >&2; exit 1; }
  echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(ms "$(echo "$out" | awk '$1 == "50%" {print $2}')") $(ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else print v[int((NR + 1) / 2)] }'; }

cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo "sticky-proxy reload benchmark  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine:  $(nproc) CPUs (${cpu_model:-unknown}), $(uname -sr), load avg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "proxy:    $BINARY ($("$BINARY" --version 2>/dev/null || echo '?')), $WORKERS workers${RUNTIME:+, runtime $RUNTIME}, $BACKENDS backends on 3 nginx ports"
echo "load:     wrk -t2 -c64 -d${DURATION}s keep-alive, 10,000 device IDs; in reloading phases a POST /reload 100 ms after the last one answered"
printf '%-10s %5s %-9s %10s %8s %8s %8s\n' kind round phase "req/s" "p50 ms" "p99 ms" reloads
declare -A P99
for ((round = 1; round <= ROUNDS; round++)); do
  for kind in "${KIND_LIST[@]}"; do
    cp "$OUT_DIR/a.toml" "$OUT_DIR/config.toml"
    "$BINARY" run --config "$OUT_DIR/config.toml" >"$OUT_DIR/proxy.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "$pid"
    for phase in quiet reloading; do
      reloads=0
      if [ "$phase" = reloading ]; then
        rm -f "$OUT_DIR/stop"
        reloader "$kind" >"$OUT_DIR/reloads" &
        rpid=$!
      fi
      read -r rps p50 p99 <<<"$(load)"
      if [ "$phase" = reloading ]; then
        touch "$OUT_DIR/stop"
        if ! wait "$rpid"; then trap - EXIT; cleanup; exit 1; fi
        reloads="$(<"$OUT_DIR/reloads")"
      fi
      printf '%-10s %5s %-9s %10s %8s %8s %8s\n' "$kind" "$round" "$phase" "$rps" "$p50" "$p99" "$reloads"
      P99["$kind,$phase"]+="$p99 "
    done
    failed="$(grep -c "config reload failed" "$OUT_DIR/proxy.log" || true)"
    if [ "$failed" != 0 ]; then echo "$failed reloads failed; the proxy's log: $OUT_DIR/proxy.log" >&2; trap - EXIT; cleanup; exit 1; fi
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
echo
echo "medians over $ROUNDS rounds (p99, ms):"
for kind in "${KIND_LIST[@]}"; do
  quiet="$(tr ' ' '\n' <<<"${P99[$kind,quiet]}" | grep . | median)"
  busy="$(tr ' ' '\n' <<<"${P99[$kind,reloading]}" | grep . | median)"
  printf '  %-10s quiet %6s  reloading %6s  ratio %s\n' "$kind" "$quiet" "$busy" "$(awk -v a="$busy" -v b="$quiet" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
done
rm -rf "$OUT_DIR"
