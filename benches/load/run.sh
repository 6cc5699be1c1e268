#!/usr/bin/env bash
# Side-by-side load benchmark: nginx, HAProxy and sticky-proxy doing the same
# job (route by X-Device-Id on a consistent-hash ring to 3 backends) on
# loopback, one worker each, interleaved runs, medians and ratios.
#
#   bash benches/load/run.sh [--quick] [--rounds N] [--duration S] [--scenarios LIST]
#                            [--ws-sockets N] [--ws-messages N] [--idle-sockets N]
#                            [--only-sticky] [BINARY_A [BINARY_B]]
#
# BINARY_A is the sticky-proxy measured (default: cargo build --release);
# BINARY_B adds a second sticky-proxy build (A/B mode). --only-sticky leaves
# nginx and HAProxy out. Scenarios: keepalive,close,body1k,body64k,ws,ws-idle.
# See benches/load/README.md.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

# ---------------------------------------------------------------- settings
ROUNDS=3
DURATION=10
WARMUP=1
THREADS=2
CONNECTIONS=64
DEVICE_IDS=10000
WS_SOCKETS=1000
WS_MESSAGES=20
IDLE_SOCKETS=2000
SCENARIOS="keepalive,close,body1k,body64k,ws,ws-idle"
ONLY_STICKY=0
QUICK=0

# Ports (all on 127.0.0.1): the proxy under test (one at a time) on 18080,
# sticky-proxy's admin on 19901, nginx's HTTP backends on 19101-19103, the
# WebSocket echo backends on 19111-19113.
PROXY_PORT=18080
ADMIN_PORT=19901
HTTP_BACKEND_PORTS=(19101 19102 19103)
WS_BACKEND_FIRST=19111
WS_BACKEND_PORTS=(19111 19112 19113)
READY_TRIES=100          # x 0.1 s: a server not answering within 10 s is an error
STOP_TRIES=50            # x 0.1 s: SIGKILL what is still alive 5 s after SIGTERM

BINARIES=()
WS_SOCKETS_OPT=""; WS_MESSAGES_OPT=""; IDLE_SOCKETS_OPT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --rounds|--runs) ROUNDS="${2:?$1 needs a number}"; shift 2 ;;
    --rounds=*|--runs=*) ROUNDS="${1#*=}"; shift ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift 2 ;;
    --duration=*) DURATION="${1#*=}"; shift ;;
    --warmup) WARMUP="${2:?--warmup needs seconds}"; shift 2 ;;
    --warmup=*) WARMUP="${1#*=}"; shift ;;
    --scenarios) SCENARIOS="${2:?--scenarios needs a list}"; shift 2 ;;
    --scenarios=*) SCENARIOS="${1#*=}"; shift ;;
    --only-sticky) ONLY_STICKY=1; shift ;;
    --ws-sockets) WS_SOCKETS_OPT="${2:?--ws-sockets needs a number}"; shift 2 ;;
    --ws-messages) WS_MESSAGES_OPT="${2:?--ws-messages needs a number}"; shift 2 ;;
    --idle-sockets) IDLE_SOCKETS_OPT="${2:?--idle-sockets needs a number}"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    *) BINARIES+=("$1"); shift ;;
  esac
done
if [ "$QUICK" -eq 1 ]; then
  ROUNDS=1; DURATION=2; WARMUP=0; WS_SOCKETS=200; WS_MESSAGES=10; IDLE_SOCKETS=500
fi
[ -z "$WS_SOCKETS_OPT" ] || WS_SOCKETS="$WS_SOCKETS_OPT"
[ -z "$WS_MESSAGES_OPT" ] || WS_MESSAGES="$WS_MESSAGES_OPT"
[ -z "$IDLE_SOCKETS_OPT" ] || IDLE_SOCKETS="$IDLE_SOCKETS_OPT"
for v in WS_SOCKETS WS_MESSAGES IDLE_SOCKETS; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ] || [ "${!v}" -gt 9500 ]; then
    echo "${v,,} must be 1..9500 (each idle socket takes descriptors in the client, proxy and backend), got '${!v}'" >&2
    exit 2
  fi
done
for v in ROUNDS DURATION WARMUP; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then echo "--${v,,} must be a whole number, got '${!v}'" >&2; exit 2; fi
done
if [ "$ROUNDS" -lt 1 ] || [ "$ROUNDS" -gt 100 ]; then echo "--rounds must be 1..100" >&2; exit 2; fi
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 3600 ]; then echo "--duration must be 1..3600" >&2; exit 2; fi
if [ "$WARMUP" -gt 60 ]; then echo "--warmup must be 0..60" >&2; exit 2; fi
if [ "${#BINARIES[@]}" -gt 2 ]; then echo "at most two sticky-proxy binaries" >&2; usage 2 >&2; fi
IFS=',' read -r -a SCENARIO_LIST <<<"$SCENARIOS"
for s in "${SCENARIO_LIST[@]}"; do
  case "$s" in keepalive|close|body1k|body64k|ws|ws-idle) ;; *) echo "unknown scenario: $s" >&2; exit 2 ;; esac
done

SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
LUA_SCRIPT="$SCRIPT_DIR/device_ids.lua"

# ---------------------------------------------------------------- cleanup
PIDS=()          # long-lived: backends
RUN_PIDS=()      # one run: the proxy and the load generator
OUT_DIR=""

stop_pid() { # pid: SIGTERM, wait up to STOP_TRIES x 0.1 s, then SIGKILL; reap
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TRIES; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  (pid $pid still alive $((STOP_TRIES / 10)) s after SIGTERM: SIGKILL)" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

stop_run_pids() {
  local pid
  for pid in "${RUN_PIDS[@]}"; do stop_pid "$pid"; done
  RUN_PIDS=()
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  stop_run_pids
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
apt_install() { # packages...
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: $* (and no apt-get here): install them and re-run" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "missing: $* (not root, no sudo): install them and re-run" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing $* (apt-get)" >&2
  # Try without refreshing the package lists first; refresh once if that fails.
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
  fi
}

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v timeout >/dev/null 2>&1 || missing+=(coreutils)
command -v getconf >/dev/null 2>&1 || missing+=(libc-bin)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ "$ONLY_STICKY" -eq 0 ]; then
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
fi
need_nginx=0
for s in "${SCENARIO_LIST[@]}"; do case "$s" in keepalive|close|body1k|body64k) need_nginx=1 ;; esac; done
if [ "$ONLY_STICKY" -eq 0 ] || [ "$need_nginx" -eq 1 ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
fi
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
export PATH="$PATH:/usr/sbin:/sbin"
CLK_TCK="$(getconf CLK_TCK)"

# PIN=0: no taskset at all (the kernel places everything); PIN=1: load on
# CPU 0, servers on CPU 1. Default: 1 with 2 CPUs or more.
PIN="${PIN:-}"
if [ -z "$PIN" ]; then PIN=0; if [ "$(nproc)" -ge 2 ]; then PIN=1; fi; fi
case "$PIN" in 0|1) ;; *) echo "PIN must be 0 or 1, got '$PIN'" >&2; exit 2 ;; esac
if [ "$PIN" -eq 1 ] && [ "$(nproc)" -lt 2 ]; then echo "PIN=1 needs 2 CPUs or more" >&2; exit 2; fi
# Workers of each proxy under test: nginx worker_processes, HAProxy nbthread,
# sticky-proxy server.workers (STICKY_RUNTIME, if set, its server.runtime).
PROXY_WORKERS="${PROXY_WORKERS:-1}"
case "$PROXY_WORKERS" in ''|*[!0-9]*|0) echo "PROXY_WORKERS must be a positive number, got '$PROXY_WORKERS'" >&2; exit 2 ;; esac
STICKY_RUNTIME="${STICKY_RUNTIME:-}"
# STICKY_OPS=MS: sticky-proxy also runs active health checks every MS
# milliseconds on the HTTP scenarios, and its /metrics is scraped every MS
# ms while wrk runs; each such run's line notes the scrapes' median and
# slowest time and the health checks that passed and failed (step 4 of issue 18).
STICKY_OPS="${STICKY_OPS:-}"
case "$STICKY_OPS" in ''|[1-9][0-9]|[1-9][0-9][0-9]|[1-9][0-9][0-9][0-9]) ;; *) echo "STICKY_OPS must be 10..9999 ms, got '$STICKY_OPS'" >&2; exit 2 ;; esac
LOAD_PIN=(); SERVER_PIN=()
if [ "$PIN" -eq 1 ]; then LOAD_PIN=(taskset -c 0); SERVER_PIN=(taskset -c 1); fi

# ---------------------------------------------------------------- binaries
target_dir="${CARGO_TARGET_DIR:-}"
if [ -z "$target_dir" ] && command -v cargo >/dev/null 2>&1; then
  target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
fi
[ -n "$target_dir" ] || target_dir="$REPO_ROOT/target"
case "$target_dir" in /*) ;; *) target_dir="$REPO_ROOT/$target_dir" ;; esac
command -v cargo >/dev/null 2>&1 || { echo "cargo is needed to build the load generator (examples/loadgen.rs)" >&2; exit 1; }
if [ "${#BINARIES[@]}" -eq 0 ]; then
  echo "building: cargo build --release --bin sticky-proxy --example loadgen (in $REPO_ROOT)" >&2
  (cd "$REPO_ROOT" && cargo build --release --bin sticky-proxy --example loadgen >&2)
  BINARIES=("$target_dir/release/sticky-proxy")
else
  echo "building: cargo build --release --example loadgen (in $REPO_ROOT)" >&2
  (cd "$REPO_ROOT" && cargo build --release --example loadgen >&2)
fi
LOADGEN="$target_dir/release/examples/loadgen"
for i in "${!BINARIES[@]}"; do
  b="${BINARIES[$i]}"
  case "$b" in */*) ;; *) b="$(command -v "$b" || echo "$b")" ;; esac
  if [ ! -x "$b" ]; then echo "not an executable: ${BINARIES[$i]}" >&2; exit 1; fi
  BINARIES[i]="$(cd "$(dirname "$b")" && pwd)/$(basename "$b")"
done

CONTESTANTS=()
if [ "$ONLY_STICKY" -eq 0 ]; then CONTESTANTS+=(nginx haproxy); fi
CONTESTANTS+=(sticky)
if [ "${#BINARIES[@]}" -eq 2 ]; then CONTESTANTS+=(sticky-B); fi

OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sticky-proxy-load.XXXXXX")"

# ---------------------------------------------------------------- helpers
port_open() { # port -> 0 if something accepts TCP connections on 127.0.0.1:port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port pid what: bounded wait until the port accepts, or the pid died
  local port="$1" pid="$2" what="$3" i
  for ((i = 0; i < READY_TRIES; i++)); do
    if port_open "$port"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$what exited before listening on 127.0.0.1:$port; its log:" >&2
      tail -n 20 "$OUT_DIR/$what.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "$what not listening on 127.0.0.1:$port after $((READY_TRIES / 10)) s; its log:" >&2
  tail -n 20 "$OUT_DIR/$what.log" >&2 || true
  exit 1
}

tree_pids() { # pid -> the pid and its descendants
  local pid="$1" child
  echo "$pid"
  for child in $(pgrep -P "$pid" 2>/dev/null); do tree_pids "$child"; done
}

tree_cpu_ticks() { # pid -> "utime+stime stime" of it and its descendants, clock ticks
  local total=0 sys=0 p stat rest
  for p in $(tree_pids "$1"); do
    stat="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"            # drop "pid (comm) ", comm may hold spaces
    local -a f
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))   # fields 14 (utime) and 15 (stime)
    sys=$((sys + f[12]))
  done
  echo "$total $sys"
}

kernel_share() { # cpu0 sys0 cpu1 sys1 -> % of the proxy's CPU time spent in the kernel
  calc "printf \"%.0f\", ($3 > $1) ? ($4 - $2) / ($3 - $1) * 100 : 0"
}

tree_rss_kb() { # pid -> VmRSS of it and its descendants, kB
  local total=0 p kb
  for p in $(tree_pids "$1"); do
    kb="$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$p/status" 2>/dev/null)" || continue
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

sys_busy_ticks() { # all CPUs: user nice system irq softirq steal, ticks
  local _cpu u n sy _idle _iow irq sirq steal _rest
  read -r _cpu u n sy _idle _iow irq sirq steal _rest </proc/stat
  echo "$((u + n + sy + irq + sirq + steal))"
}

field() { # line key -> value of key=value
  sed -n "s/.*[[:space:]]$2=\([^[:space:]]*\).*/\1/p" <<<" $1"
}

median() { # numbers... -> median (mean of the middle two for an even count)
  printf '%s\n' "$@" | grep -v '^nan$' | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) printf "%.6g\n", v[(NR + 1) / 2]
    else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

calc() { awk "BEGIN { $1 }"; }

# ---------------------------------------------------------------- configs
http_mode_ports() { # scenario -> the backend ports it uses
  case "$1" in ws|ws-idle) echo "${WS_BACKEND_PORTS[*]}" ;; *) echo "${HTTP_BACKEND_PORTS[*]}" ;; esac
}

# The part every nginx config here shares: one worker, in the foreground,
# logs and pid in `dir`, no access log, long keep-alive.
nginx_conf_head() { # dir [workers]
  local dir="$1" workers="${2:-1}"
    echo "worker_processes $workers;"
    echo "daemon off;"
    echo "pid $dir/nginx.pid;"
    echo "error_log $dir/logs/error.log warn;"
    echo "worker_rlimit_nofile 20000;"
    echo "events { worker_connections 19500; }"   # a proxied WebSocket is two
    echo "http {"
    echo "  access_log off;"
    echo "  keepalive_requests 1000000;"
}

write_backend_nginx_conf() { # dir
  local dir="$1" p
  mkdir -p "$dir/logs"
  {
    nginx_conf_head "$dir"
    echo "  keepalive_timeout 300s;"
    echo "  client_body_buffer_size 128k;"
    echo "  client_body_temp_path $dir/body;"
    echo "  server {"
    for p in "${HTTP_BACKEND_PORTS[@]}"; do echo "    listen 127.0.0.1:$p reuseport;"; done
    printf '    location / { return 200 "ok\\n"; }\n'
    echo "  }"
    echo "}"
  } >"$dir/nginx.conf"
}

write_nginx_conf() { # dir ports...
  local dir="$1" p; shift
  mkdir -p "$dir/logs"
  {
    nginx_conf_head "$dir" "$PROXY_WORKERS"
    echo "  client_body_buffer_size 128k;"
    echo "  client_body_temp_path $dir/body;"
    echo "  proxy_temp_path $dir/proxy;"
    echo "  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }"
    echo "  upstream backends {"
    echo "    hash \$http_x_device_id consistent;"
    for p in "$@"; do echo "    server 127.0.0.1:$p;"; done
    echo "    keepalive 512;"
    echo "    keepalive_requests 1000000;"
    echo "  }"
    echo "  server {"
    # reuseport: a listening socket per worker, as sticky-proxy's thread-per-core.
    if [ "$PROXY_WORKERS" -gt 1 ]; then echo "    listen 127.0.0.1:$PROXY_PORT reuseport;"; else echo "    listen 127.0.0.1:$PROXY_PORT;"; fi
    echo "    location / {"
    echo "      proxy_pass http://backends;"
    echo "      proxy_http_version 1.1;"
    echo "      proxy_set_header Upgrade \$http_upgrade;"
    echo "      proxy_set_header Connection \$connection_upgrade;"
    echo "      proxy_read_timeout 3600s;"
    echo "    }"
    echo "  }"
    echo "}"
  } >"$dir/nginx.conf"
}

write_haproxy_conf() { # file ports...
  local file="$1" p i=0; shift
  {
    echo "global"
    echo "  nbthread $PROXY_WORKERS"
    echo "  maxconn 9600"   # 2 descriptors each: fits the 20,000 open files of our machines
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 3s"
    echo "  timeout client 60s"
    echo "  timeout server 60s"
    echo "  timeout http-keep-alive 60s"
    echo "  timeout tunnel 1h"
    echo "frontend proxy"
    echo "  bind 127.0.0.1:$PROXY_PORT"
    echo "  default_backend backends"
    echo "backend backends"
    echo "  balance hdr(X-Device-Id)"
    echo "  hash-type consistent"
    echo "  http-reuse always"
    for p in "$@"; do i=$((i + 1)); echo "  server b$i 127.0.0.1:$p"; done
  } >"$file"
}

write_sticky_conf() { # file ports...
  local file="$1" p i=0; shift
  {
    echo "[server]"
    echo "listen = \"127.0.0.1:$PROXY_PORT\""
    echo "workers = $PROXY_WORKERS"
    if [ -n "$STICKY_RUNTIME" ]; then echo "runtime = \"$STICKY_RUNTIME\""; fi
    echo "access_log = false"
    echo "[admin]"
    echo "listen = \"127.0.0.1:$ADMIN_PORT\""
    echo "[routing]"
    echo "key = [\"header:x-device-id\"]"
    for p in "$@"; do
      i=$((i + 1))
      printf '[[backends]]\nid = "b%s"\naddress = "127.0.0.1:%s"\n' "$i" "$p"
    done
  } >"$file"
}

start_proxy() { # contestant scenario -> sets PROXY_PID
  local who="$1" scenario="$2" dir="$OUT_DIR/$1-$2" ports
  read -r -a ports <<<"$(http_mode_ports "$scenario")"
  mkdir -p "$dir"
  if port_open "$PROXY_PORT"; then echo "something already listens on 127.0.0.1:$PROXY_PORT: stop it first" >&2; exit 1; fi
  case "$who" in
    nginx)
      write_nginx_conf "$dir" "${ports[@]}"
      "${SERVER_PIN[@]}" nginx -p "$dir" -c "$dir/nginx.conf" >"$OUT_DIR/$who.log" 2>&1 &
      ;;
    haproxy)
      write_haproxy_conf "$dir/haproxy.cfg" "${ports[@]}"
      "${SERVER_PIN[@]}" haproxy -db -f "$dir/haproxy.cfg" >"$OUT_DIR/$who.log" 2>&1 &
      ;;
    sticky|sticky-B)
      local bin="${BINARIES[0]}"
      [ "$who" = sticky ] || bin="${BINARIES[1]}"
      write_sticky_conf "$dir/sticky.toml" "${ports[@]}"
      if [ -n "$STICKY_OPS" ] && [ "$scenario" != ws ] && [ "$scenario" != ws-idle ]; then
        printf '[health]\npath = "/"\ninterval = "%sms"\ntimeout = "%sms"\n' "$STICKY_OPS" "$((STICKY_OPS / 2))" >>"$dir/sticky.toml"
      fi
      if ! "$bin" check --config "$dir/sticky.toml" >/dev/null 2>&1; then
        # A build older than server.runtime: without it.
        sed -i -e '/^runtime/d' "$dir/sticky.toml"
      fi
      if ! "$bin" check --config "$dir/sticky.toml" >/dev/null 2>&1; then
        # A build older than server.workers / server.access_log: pinned to
        # one CPU it runs one worker, and RUST_LOG=warn silences its access log.
        sed -i -e '/^workers/d' -e '/^access_log/d' "$dir/sticky.toml"
      fi
      RUST_LOG=warn "${SERVER_PIN[@]}" "$bin" run --config "$dir/sticky.toml" >"$OUT_DIR/$who.log" 2>&1 &
      ;;
  esac
  PROXY_PID=$!   # taskset execs the server: this is its own pid
  RUN_PIDS+=("$PROXY_PID")
  wait_port "$PROXY_PORT" "$PROXY_PID" "$who"
  # Sanity: a request through it reaches a backend.
  if [ "$scenario" != ws ] && [ "$scenario" != ws-idle ]; then
    if ! curl -fsS --max-time 2 -o /dev/null -H 'X-Device-Id: dev-1' "http://127.0.0.1:$PROXY_PORT/"; then
      echo "$who is listening but GET / through it failed; its log:" >&2
      tail -n 20 "$OUT_DIR/$who.log" >&2
      exit 1
    fi
  fi
}

# ---------------------------------------------------------------- one run
# Sets R_* (metric values for this run) and R_NOTE.
run_http() { # who scenario round
  local who="$1" scenario="$2" n="$3" wout="$OUT_DIR/wrk-$1-$2-$3.txt" rc=0
  local -a env=(DEVICE_IDS="$DEVICE_IDS" LOAD_PATH=/)
  case "$scenario" in
    close) env+=(CONN_CLOSE=1) ;;
    body1k) env+=(BODY_BYTES=1024) ;;
    body64k) env+=(BODY_BYTES=65536) ;;
  esac
  start_proxy "$who" "$scenario"
  if [ "$WARMUP" -gt 0 ]; then
    env "${env[@]}" timeout $((WARMUP + 30)) "${LOAD_PIN[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" \
      -s "$LUA_SCRIPT" "http://127.0.0.1:$PROXY_PORT/" >"$OUT_DIR/warmup-$who-$scenario-$n.txt" 2>&1 || true
  fi
  local cpu0 cpu1 sys0 sys1 busy0 busy1 t0 t1 scraper="" scrapes="$OUT_DIR/scrape-$who-$scenario-$n.txt"
  if [ -n "$STICKY_OPS" ] && [ "${who#sticky}" != "$who" ]; then
    # Bounded: DURATION seconds, each scrape at most 5 s.
    (
      end=$((SECONDS + DURATION)); pause="$(calc "printf \"%.3f\", $STICKY_OPS / 1000")"
      while [ "$SECONDS" -lt "$end" ]; do
        curl -s -o /dev/null --max-time 5 -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$ADMIN_PORT/metrics" || true
        sleep "$pause"
      done
    ) >"$scrapes" 2>&1 &
    scraper=$!
  fi
  busy0="$(sys_busy_ticks)"; t0="$(date +%s%N)"; read -r cpu0 sys0 <<<"$(tree_cpu_ticks "$PROXY_PID")"
  env "${env[@]}" timeout $((DURATION + 30)) "${LOAD_PIN[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" \
    --latency -s "$LUA_SCRIPT" "http://127.0.0.1:$PROXY_PORT/" >"$wout" 2>&1 || rc=$?
  read -r cpu1 sys1 <<<"$(tree_cpu_ticks "$PROXY_PID")"; t1="$(date +%s%N)"; busy1="$(sys_busy_ticks)"
  if [ -n "$scraper" ]; then
    wait "$scraper" || true
    local checks
    checks="$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" \
      | awk '/^sticky_proxy_health_checks_total\{/ { if (/result="success"/) ok += $NF; else bad += $NF }
             END { printf "%d ok, %d failed", ok, bad }')"
    local bad
    bad="$(awk '$1 != 200' "$scrapes" | wc -l)"
    R_OPS="$(awk '$1 == 200 { print $2 * 1000 }' "$scrapes" | sort -n | awk -v checks="$checks" -v bad="$bad" '{ t[NR] = $1 }
      END { if (NR == 0) { print "  scrapes: none answered"; exit }
            printf "  scrapes: %d (%d failed), median %.1f ms, max %.1f ms; health checks: %s", NR, bad, t[int((NR + 1) / 2)], t[NR], checks }')"
  fi
  stop_run_pids
  if [ "$rc" -ne 0 ]; then echo "wrk failed (exit $rc); its output:" >&2; cat "$wout" >&2; exit 1; fi
  local line reqs dur
  line="$(grep '^SP_RESULT ' "$wout" | tail -n 1)"
  if [ -z "$line" ]; then echo "no SP_RESULT line from wrk; its output:" >&2; cat "$wout" >&2; exit 1; fi
  reqs="$(field "$line" requests)"; dur="$(field "$line" duration_us)"
  R_RATE="$(calc "printf \"%.0f\", $reqs / ($dur / 1e6)")"
  R_P99="$(calc "printf \"%.3f\", $(field "$line" p99_us) / 1000")"
  R_CPU="$(calc "printf \"%.2f\", ($reqs > 0) ? ($((cpu1 - cpu0)) / $CLK_TCK / $reqs * 1e6) : 0")"
  R_KERN="$(kernel_share "$cpu0" "$sys0" "$cpu1" "$sys1")"
  R_ERRS=$(( $(field "$line" err_connect) + $(field "$line" err_read) + $(field "$line" err_write) \
    + $(field "$line" err_timeout) + $(field "$line" err_status) ))
  R_MEM="-"
  # CPU busy beyond two CPUs' worth of this run's own work is someone else's.
  R_BUSY="$(calc "printf \"%.0f\", $((busy1 - busy0)) / $CLK_TCK / (($t1 - $t0) / 1e9) * 100")"
}

run_ws() { # who scenario round
  local who="$1" scenario="$2" n="$3" out="$OUT_DIR/ws-$1-$2-$3.txt" rc=0
  start_proxy "$who" "$scenario"
  local cpu0 cpu1 sys0 sys1 busy0 busy1 t0 t1
  busy0="$(sys_busy_ticks)"; t0="$(date +%s%N)"; read -r cpu0 sys0 <<<"$(tree_cpu_ticks "$PROXY_PID")"
  timeout 150 "${LOAD_PIN[@]}" "$LOADGEN" --time-limit 120 ws --addr "127.0.0.1:$PROXY_PORT" \
    --sockets "$WS_SOCKETS" --messages "$WS_MESSAGES" --ids "$DEVICE_IDS" >"$out" 2>&1 || rc=$?
  read -r cpu1 sys1 <<<"$(tree_cpu_ticks "$PROXY_PID")"; t1="$(date +%s%N)"; busy1="$(sys_busy_ticks)"
  stop_run_pids
  if [ "$rc" -ne 0 ]; then echo "loadgen ws failed (exit $rc); its output:" >&2; cat "$out" >&2; exit 1; fi
  local line msgs
  line="$(grep '^SP_WS ' "$out" | tail -n 1)"
  msgs="$(field "$line" messages)"
  R_RATE="$(calc "printf \"%.0f\", $(field "$line" msgs_per_s)")"
  R_P99="$(calc "printf \"%.3f\", $(field "$line" p99_us) / 1000")"
  # Per message, including the sockets' setup (opening is part of the run).
  R_CPU="$(calc "printf \"%.2f\", ($msgs > 0) ? ($((cpu1 - cpu0)) / $CLK_TCK / $msgs * 1e6) : 0")"
  R_KERN="$(kernel_share "$cpu0" "$sys0" "$cpu1" "$sys1")"
  R_ERRS=0; R_MEM="-"
  R_BUSY="$(calc "printf \"%.0f\", $((busy1 - busy0)) / $CLK_TCK / (($t1 - $t0) / 1e9) * 100")"
}

run_ws_idle() { # who scenario round
  local who="$1" scenario="$2" n="$3" out="$OUT_DIR/idle-$1-$3.txt" ready="$OUT_DIR/idle-$1-$3.ready" i
  start_proxy "$who" "$scenario"
  local rss0 rss1 gen
  rss0="$(tree_rss_kb "$PROXY_PID")"
  rm -f "$ready"
  "${LOAD_PIN[@]}" "$LOADGEN" --time-limit 150 ws-idle --addr "127.0.0.1:$PROXY_PORT" \
    --sockets "$IDLE_SOCKETS" --hold 120 --ready-file "$ready" >"$out" 2>&1 &
  gen=$!
  RUN_PIDS+=("$gen")
  for ((i = 0; i < 1200; i++)); do   # x 0.1 s
    [ -s "$ready" ] && break
    kill -0 "$gen" 2>/dev/null || break
    sleep 0.1
  done
  if [ ! -s "$ready" ]; then echo "loadgen ws-idle did not get its sockets open; its output:" >&2; cat "$out" >&2; exit 1; fi
  # Let the proxy settle, then read: buffers freed after the proving echo,
  # and sticky-proxy hands a burst's freed heap back to the OS within 2 s
  # of the burst's end (src/util/memory.rs). Every proxy gets the same wait.
  sleep 3
  rss1="$(tree_rss_kb "$PROXY_PID")"
  # Other devices' HTTP while the sockets stay open: does holding them cost
  # anyone latency? (8 connections, GET /whoami on the demo backends.)
  local wout="$OUT_DIR/wrk-$who-$scenario-$n.txt" rc=0 line
  DEVICE_IDS="$DEVICE_IDS" LOAD_PATH=/whoami timeout $((DURATION + 30)) "${LOAD_PIN[@]}" wrk -t1 -c8 \
    -d"${DURATION}s" --latency -s "$LUA_SCRIPT" "http://127.0.0.1:$PROXY_PORT/" >"$wout" 2>&1 || rc=$?
  stop_run_pids
  if [ "$rc" -ne 0 ]; then echo "wrk failed (exit $rc); its output:" >&2; cat "$wout" >&2; exit 1; fi
  line="$(grep '^SP_RESULT ' "$wout" | tail -n 1)"
  if [ -z "$line" ]; then echo "no SP_RESULT line from wrk; its output:" >&2; cat "$wout" >&2; exit 1; fi
  R_MEM="$(calc "printf \"%.2f\", ($rss1 - $rss0) / $IDLE_SOCKETS")"
  R_RATE="$(calc "printf \"%.0f\", $(field "$line" requests) / ($(field "$line" duration_us) / 1e6)")"
  R_P99="$(calc "printf \"%.3f\", $(field "$line" p99_us) / 1000")"
  R_ERRS=$(( $(field "$line" err_connect) + $(field "$line" err_read) + $(field "$line" err_write) \
    + $(field "$line" err_timeout) + $(field "$line" err_status) ))
  R_CPU="-"; R_KERN="-"; R_BUSY=0
}

# ---------------------------------------------------------------- backends
start_backends() {
  local dir="$OUT_DIR/backends"
  mkdir -p "$dir"
  for p in "${HTTP_BACKEND_PORTS[@]}" "${WS_BACKEND_PORTS[@]}" "$PROXY_PORT"; do
    if port_open "$p"; then echo "something already listens on 127.0.0.1:$p: stop it first" >&2; exit 1; fi
  done
  if [ "$need_nginx" -eq 1 ]; then
    write_backend_nginx_conf "$dir"
    "${SERVER_PIN[@]}" nginx -p "$dir" -c "$dir/nginx.conf" >"$OUT_DIR/backend-nginx.log" 2>&1 &
    PIDS+=($!)
    wait_port "${HTTP_BACKEND_PORTS[0]}" "$!" backend-nginx
  fi
  "${SERVER_PIN[@]}" "$LOADGEN" --time-limit 86400 backend --listen "127.0.0.1:$WS_BACKEND_FIRST" \
    --count "${#WS_BACKEND_PORTS[@]}" >"$OUT_DIR/backend-ws.log" 2>&1 &
  PIDS+=($!)
  wait_port "$WS_BACKEND_FIRST" "$!" backend-ws
}

# ---------------------------------------------------------------- header
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo "sticky-proxy load benchmark  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine:  $(nproc) CPUs (${cpu_model:-unknown}), $(uname -sr), load avg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk:      $(wrk -v 2>&1 | head -n 1 | cut -c1-40)"
if [ "$ONLY_STICKY" -eq 0 ]; then
  echo "nginx:    $(nginx -v 2>&1 | head -n 1)"
  echo "haproxy:  $(haproxy -v 2>&1 | head -n 1 | cut -d' ' -f1-3)"
fi
for i in "${!BINARIES[@]}"; do
  label=sticky; [ "$i" -eq 0 ] || label=sticky-B
  echo "$label: ${BINARIES[$i]} ($("${BINARIES[$i]}" --version 2>&1 | head -n 1))"
done
echo "setup:    each proxy with $PROXY_WORKERS worker(s)${STICKY_RUNTIME:+ (sticky runtime $STICKY_RUNTIME)} on 127.0.0.1:$PROXY_PORT, hashing X-Device-Id consistently onto 3 backends:"
echo "          HTTP: one nginx (1 worker) answering 'return 200' on :${HTTP_BACKEND_PORTS[*]};"
echo "          WebSocket: 3 demo app instances (echo) in one process (1 thread) on :${WS_BACKEND_PORTS[*]}"
if [ "$PIN" -eq 1 ]; then
  echo "pinning:  load generator (wrk, loadgen) on CPU 0; proxy and backends on CPU 1 (taskset)"
else
  echo "pinning:  none (PIN=0, or fewer than 2 CPUs)"
fi
echo "load:     wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $DEVICE_IDS device IDs, ${WARMUP}s warm-up per run;"
echo "          ws: $WS_SOCKETS sockets x $WS_MESSAGES messages (one at a time per socket); ws-idle: $IDLE_SOCKETS sockets"
echo "rounds:   $ROUNDS, interleaved (${CONTESTANTS[*]}), a fresh proxy process per run"
echo "cpu:      proxy utime+stime (process and children, /proc/PID/stat) / requests (ws: / messages), us;"
echo "          kern%: the share of it spent in the kernel (stime), the part no proxy design removes"
echo "ws-idle:  mem is proxy RSS growth per idle WebSocket; rate and p99 are other devices' HTTP"
echo "          (wrk -t1 -c8, GET /whoami) while those sockets stay open"
echo "busy%:    all CPUs busy during the run, % of one CPU (200 = both saturated); rounds where this"
echo "          exceeds what the run itself explains point at a busy machine"
echo "raw output and logs: $OUT_DIR"
echo

start_backends

# ---------------------------------------------------------------- rounds
declare -A RATE P99 CPU KERN MEM ERRS
printf '%-9s %-5s %-9s %10s %9s %8s %6s %9s %8s %6s\n' scenario round proxy rate p99_ms cpu_us kern% mem_kB errors busy%
for scenario in "${SCENARIO_LIST[@]}"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    for who in "${CONTESTANTS[@]}"; do
      case "$scenario" in
        ws) run_ws "$who" "$scenario" "$r" ;;
        ws-idle) run_ws_idle "$who" "$scenario" "$r" ;;
        *) run_http "$who" "$scenario" "$r" ;;
      esac
      key="$scenario/$who"
      RATE[$key]+="$R_RATE "; P99[$key]+="$R_P99 "; CPU[$key]+="$R_CPU "; KERN[$key]+="$R_KERN "
      MEM[$key]+="$R_MEM "
      ERRS[$key]=$(( ${ERRS[$key]:-0} + R_ERRS ))
      note=""
      [ "$R_ERRS" -eq 0 ] || note="  <- $R_ERRS errors/non-2xx"
      note+="${R_OPS:-}"; R_OPS=""  # set by run_http under STICKY_OPS
      printf '%-9s %-5s %-9s %10s %9s %8s %6s %9s %8s %6s%s\n' "$scenario" "$r/$ROUNDS" "$who" "$R_RATE" "$R_P99" \
        "$R_CPU" "$R_KERN" "$R_MEM" "$R_ERRS" "$R_BUSY" "$note"
    done
  done
done

# ---------------------------------------------------------------- summary
med() { # list -> median, or "-" for a list of dashes
  # shellcheck disable=SC2086 # word-splitting the space-separated list is intended
  if [ -z "${1//[- ]/}" ]; then echo "-"; else median $1; fi
}
ratio() { # a b -> a/b with 2 decimals, or "-"
  if [ "$1" = "-" ] || [ "$2" = "-" ] || [ "$2" = "nan" ] || [ "$1" = "nan" ]; then echo "-"; return; fi
  calc "if ($2 > 0) printf \"%.2f\", $1 / $2; else printf \"-\""
}
echo
echo "medians over $ROUNDS rounds (rate: req/s, ws: messages/s; mem: proxy kB per idle WebSocket)"
echo "ratios: sticky-proxy / the better of nginx and HAProxy for that column"
echo "        (rate: higher is better, target >= 1.0 (stretch 1.1); p99 and cpu: lower is better, targets <= 1.1 and <= 1.0; mem: <= 4 kB)"
printf '%-9s %-9s %10s %9s %8s %6s %9s %7s\n' scenario proxy rate p99_ms cpu_us kern% mem_kB errors
for scenario in "${SCENARIO_LIST[@]}"; do
  declare -A M_RATE=() M_P99=() M_CPU=() M_KERN=() M_MEM=()
  for who in "${CONTESTANTS[@]}"; do
    key="$scenario/$who"
    M_RATE[$who]="$(med "${RATE[$key]}")"; M_P99[$who]="$(med "${P99[$key]}")"
    M_CPU[$who]="$(med "${CPU[$key]}")"; M_KERN[$who]="$(med "${KERN[$key]}")"; M_MEM[$who]="$(med "${MEM[$key]}")"
    printf '%-9s %-9s %10s %9s %8s %6s %9s %7s\n' "$scenario" "$who" "${M_RATE[$who]}" "${M_P99[$who]}" \
      "${M_CPU[$who]}" "${M_KERN[$who]}" "${M_MEM[$who]}" "${ERRS[$key]}"
  done
  if [ "$ONLY_STICKY" -eq 0 ]; then
    best() { # column higher|lower -> the better of nginx and haproxy
      local -n col="$1"
      local a="${col[nginx]}" b="${col[haproxy]}"
      if [ "$a" = "-" ] || [ "$a" = "nan" ]; then echo "$b"; return; fi
      if [ "$b" = "-" ] || [ "$b" = "nan" ]; then echo "$a"; return; fi
      if [ "$2" = higher ]; then calc "print (($a > $b) ? $a : $b)"; else calc "print (($a < $b) ? $a : $b)"; fi
    }
    for who in "${CONTESTANTS[@]}"; do
      case "$who" in sticky*) ;; *) continue ;; esac
      printf '%-9s %-9s %10s %9s %8s %6s %9s\n' "$scenario" "$who/best" \
        "$(ratio "${M_RATE[$who]}" "$(best M_RATE higher)")" "$(ratio "${M_P99[$who]}" "$(best M_P99 lower)")" \
        "$(ratio "${M_CPU[$who]}" "$(best M_CPU lower)")" "-" "$(ratio "${M_MEM[$who]}" "$(best M_MEM lower)")"
    done
  fi
  if [ "${#BINARIES[@]}" -eq 2 ]; then
    printf '%-9s %-9s %10s %9s %8s %6s %9s\n' "$scenario" "B/A" \
      "$(ratio "${M_RATE[sticky-B]}" "${M_RATE[sticky]}")" "$(ratio "${M_P99[sticky-B]}" "${M_P99[sticky]}")" \
      "$(ratio "${M_CPU[sticky-B]}" "${M_CPU[sticky]}")" "-" "$(ratio "${M_MEM[sticky-B]}" "${M_MEM[sticky]}")"
  fi
done
echo
for scenario in "${SCENARIO_LIST[@]}"; do
  for who in "${CONTESTANTS[@]}"; do
    key="$scenario/$who"
    echo "SUMMARY scenario=$scenario proxy=$who rounds=$ROUNDS rate=$(med "${RATE[$key]}") p99_ms=$(med "${P99[$key]}") cpu_us=$(med "${CPU[$key]}") kern_pct=$(med "${KERN[$key]}") mem_kb=$(med "${MEM[$key]}") errors=${ERRS[$key]}"
  done
done
