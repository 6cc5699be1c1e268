#!/usr/bin/env bash
# Instructions and heap allocations per proxied request, for one or more
# sticky-proxy binaries, counted by valgrind (callgrind, dhat): numbers that do
# not depend on what else the machine is doing.
#
#   bash benches/load/profile.sh [--requests N] [--close] BINARY [BINARY ...]
#
# For each binary and tool: run the proxy under valgrind behind nginx
# backends (`return 200`), send SHORT and then N requests (X-Device-Id over
# 10,000 IDs, 4 keep-alive connections, or with --close a new connection
# per request) in two separate runs, and report
# (count(N) - count(SHORT)) / (N - SHORT), so startup and shutdown cancel out.
# Leaves callgrind files in the output directory for callgrind_annotate.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

REQUESTS=6000
SHORT=1000
# server.workers of the proxy (valgrind runs its threads one at a time, so
# with 2 the counts include what threads cost each other: wakeups, locks).
PROXY_WORKERS="${PROXY_WORKERS:-1}"
case "$PROXY_WORKERS" in ''|*[!0-9]*|0) echo "PROXY_WORKERS must be a positive number" >&2; exit 2 ;; esac
PROXY_PORT=18090
ADMIN_PORT=19909
BACKEND_PORTS=(19121 19122 19123)
BINARIES=()
CLOSE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) REQUESTS="${2:?--requests needs a number}"; shift 2 ;;
    --close) CLOSE=(--close); shift ;;
    -h|--help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    *) BINARIES+=("$1"); shift ;;
  esac
done
[ "${#BINARIES[@]}" -ge 1 ] || usage 2 >&2
if ! [[ "$REQUESTS" =~ ^[0-9]+$ ]] || [ "$REQUESTS" -le "$SHORT" ] || [ "$REQUESTS" -gt 1000000 ]; then
  echo "--requests must be $((SHORT + 1))..1000000" >&2; exit 2
fi

SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
    || { $sudo apt-get update -q >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; }
fi

target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
(cd "$REPO_ROOT" && cargo build --release --example loadgen >&2)
LOADGEN="$target_dir/release/examples/loadgen"

PIDS=()
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || continue
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PIN=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then PIN=(taskset -c 1); fi
OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sticky-proxy-profile.XXXXXX")"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port pid what (bounded: 60 s, valgrind starts slowly)
  local i
  for ((i = 0; i < 600; i++)); do
    port_open "$1" && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 exited; see $OUT_DIR" >&2; exit 1; }
    sleep 0.1
  done
  echo "$3 not listening on $1 after 60 s; see $OUT_DIR" >&2; exit 1
}

for p in "${BACKEND_PORTS[@]}" "$PROXY_PORT" "$ADMIN_PORT"; do
  if port_open "$p"; then echo "127.0.0.1:$p is taken: stop what listens there" >&2; exit 1; fi
done
mkdir -p "$OUT_DIR/nginx/logs"
{
  echo "worker_processes 1; daemon off; pid $OUT_DIR/nginx/nginx.pid; error_log $OUT_DIR/nginx/logs/error.log warn;"
  echo "events { worker_connections 1024; }"
  echo "http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s; server {"
  for p in "${BACKEND_PORTS[@]}"; do echo "  listen 127.0.0.1:$p;"; done
  printf '  location / { return 200 "ok\\n"; }\n} }\n'
} >"$OUT_DIR/nginx/nginx.conf"
nginx -p "$OUT_DIR/nginx" -c "$OUT_DIR/nginx/nginx.conf" >"$OUT_DIR/nginx.log" 2>&1 &
PIDS+=($!)
wait_port "${BACKEND_PORTS[0]}" "$!" nginx

{
  printf '[server]\nlisten = "127.0.0.1:%s"\nworkers = %s\naccess_log = false\n' "$PROXY_PORT" "$PROXY_WORKERS"
  # No keep-alive request limit, as before keepalive_requests existed: a
  # connection past its 1000 requests is closed under loadgen's feet.
  printf 'keepalive_requests = 1000000\n'
  printf '[admin]\nlisten = "127.0.0.1:%s"\n[reload]\nwatch = false\n' "$ADMIN_PORT"
  printf '[routing]\nkey = ["header:x-device-id"]\n'
  i=0
  for p in "${BACKEND_PORTS[@]}"; do i=$((i + 1)); printf '[[backends]]\nid = "b%s"\naddress = "127.0.0.1:%s"\n' "$i" "$p"; done
} >"$OUT_DIR/sticky.toml"

one() { # binary tool requests label -> prints the tool's total (Ir, or "blocks bytes")
  local bin="$1" tool="$2" n="$3" label="$4" pid i rc=0
  local base="$OUT_DIR/$label-$tool-$n"
  local -a vg=(valgrind --tool="$tool" --log-file="$base.vg")
  case "$tool" in
    callgrind) vg+=(--callgrind-out-file="$base.out") ;;
    dhat) vg+=(--dhat-out-file="$base.json") ;;
  esac
  # Builds older than server.workers / server.access_log / server.keepalive_requests: the same without
  # them (one CPU gives one worker; RUST_LOG=warn silences the access log).
  local config="$OUT_DIR/sticky.toml"
  if ! "$bin" check --config "$config" >/dev/null 2>&1; then
    config="$OUT_DIR/sticky-legacy.toml"
    grep -v -e '^workers' -e '^access_log' -e '^keepalive_requests' "$OUT_DIR/sticky.toml" >"$config"
  fi
  RUST_LOG=warn "${PIN[@]}" "${vg[@]}" "$bin" run --config "$config" >"$base.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_port "$PROXY_PORT" "$pid" "$label ($tool)"
  timeout 600 "$LOADGEN" --time-limit 550 http --addr "127.0.0.1:$PROXY_PORT" --connections 4 \
    --requests "$n" "${CLOSE[@]}" >"$base.load" 2>&1 || rc=$?
  kill -TERM "$pid"
  for ((i = 0; i < 600; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$rc" -ne 0 ] || grep -q 'errors=[1-9]' "$base.load"; then
    echo "loadgen failed against $label; see $base.load" >&2; cat "$base.load" >&2; exit 1
  fi
  case "$tool" in
    callgrind) sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$base.out" ;;
    dhat) sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\2 \1/p' "$base.vg" | tr -d ',' ;;
  esac
}

echo "sticky-proxy per-request cost under valgrind  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
if [ "${#CLOSE[@]}" -gt 0 ]; then conns="4 clients, a new connection per request"; else conns="4 keep-alive connections"; fi
echo "load: loadgen http, $conns, GET / with X-Device-Id over 10,000 IDs;"
echo "      per request = (run with $REQUESTS requests - run with $SHORT) / $((REQUESTS - SHORT))"
echo "backends: nginx return 200 on :${BACKEND_PORTS[*]}; proxy: workers = $PROXY_WORKERS, access_log = false, RUST_LOG=warn"
echo "output: $OUT_DIR"
echo
printf '%-4s %14s %12s %12s  %s\n' bin Ir/request allocs/req bytes/req binary
n=0
for bin in "${BINARIES[@]}"; do
  n=$((n + 1))
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
  ir_short="$(one "$bin" callgrind "$SHORT" "bin$n")"
  ir_long="$(one "$bin" callgrind "$REQUESTS" "bin$n")"
  read -r blocks_short bytes_short <<<"$(one "$bin" dhat "$SHORT" "bin$n")"
  read -r blocks_long bytes_long <<<"$(one "$bin" dhat "$REQUESTS" "bin$n")"
  d=$((REQUESTS - SHORT))
  printf '%-4s %14s %12s %12s  %s\n' "$n" \
    "$(awk "BEGIN { printf \"%.0f\", ($ir_long - $ir_short) / $d }")" \
    "$(awk "BEGIN { printf \"%.2f\", ($blocks_long - $blocks_short) / $d }")" \
    "$(awk "BEGIN { printf \"%.0f\", ($bytes_long - $bytes_short) / $d }")" "$bin"
done
echo
echo "hot spots: callgrind_annotate --inclusive=yes $OUT_DIR/bin1-callgrind-$REQUESTS.out | head -60"
