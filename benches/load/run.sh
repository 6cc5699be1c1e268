#!/usr/bin/env bash
# End-to-end load benchmark: wrk -> sticky-proxy demo (proxy + demo backends)
# on loopback, 10,000 distinct device IDs, alternating two binaries.
#
#   bash benches/load/run.sh [--runs N] [--duration S] [--warmup S] [BINARY_A [BINARY_B]]
#
# No binary: builds the release binary (cargo build --release) and measures it.
# One binary: measures it. Two: alternates A, B, A, B ... for --runs rounds and
# prints medians and the ratio B/A. See benches/load/README.md.
#
# Everything it starts listens on 127.0.0.1 only; every loop is bounded; an
# EXIT trap stops whatever is still running.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

# ---------------------------------------------------------------- settings
RUNS=5
DURATION=10
WARMUP=1
THREADS=2
CONNECTIONS=64
DEVICE_IDS=10000
INSTANCES=3
PROXY_ADDR=127.0.0.1:18080
ADMIN_ADDR=127.0.0.1:19901
FIRST_BACKEND_PORT=19001
READY_TRIES=100          # x 0.1 s: give up on a proxy not healthy within 10 s
NOISY_PCT=15             # flag a run when other work took more than this % of a CPU
STOP_TRIES=50            # x 0.1 s: SIGKILL a proxy still alive 5 s after SIGTERM

BINARIES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="${2:?--runs needs a number}"; shift 2 ;;
    --runs=*) RUNS="${1#*=}"; shift ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift 2 ;;
    --duration=*) DURATION="${1#*=}"; shift ;;
    --warmup) WARMUP="${2:?--warmup needs seconds}"; shift 2 ;;
    --warmup=*) WARMUP="${1#*=}"; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    *) BINARIES+=("$1"); shift ;;
  esac
done
for v in RUNS DURATION WARMUP; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then echo "--${v,,} must be a whole number, got '${!v}'" >&2; exit 2; fi
done
if [ "$RUNS" -lt 1 ] || [ "$RUNS" -gt 100 ]; then echo "--runs must be 1..100" >&2; exit 2; fi
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 3600 ]; then echo "--duration must be 1..3600" >&2; exit 2; fi
if [ "$WARMUP" -gt 60 ]; then echo "--warmup must be 0..60" >&2; exit 2; fi
if [ "${#BINARIES[@]}" -gt 2 ]; then echo "at most two binaries" >&2; usage 2 >&2; fi

SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
LUA_SCRIPT="$SCRIPT_DIR/device_ids.lua"

# ---------------------------------------------------------------- cleanup
PROXY_PID=""
WRK_PID=""
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

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$WRK_PID"
  stop_pid "$PROXY_PID"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

apt_install() { # packages...
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: $* (and no apt-get here): install them and re-run" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "missing: $* (not root, no sudo): install them and re-run" >&2
    exit 1
  fi
  echo "installing $* (apt-get)" >&2
  # Try without refreshing the package lists first; refresh once if that fails.
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
  fi
}

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v timeout >/dev/null 2>&1 || missing+=(coreutils)
command -v getconf >/dev/null 2>&1 || missing+=(libc-bin)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
CLK_TCK="$(getconf CLK_TCK)"

PIN=0
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then PIN=1; fi

# ---------------------------------------------------------------- binaries
if [ "${#BINARIES[@]}" -eq 0 ]; then
  command -v cargo >/dev/null 2>&1 || { echo "no binary given and no cargo to build one" >&2; exit 1; }
  echo "building: cargo build --release (in $REPO_ROOT)" >&2
  (cd "$REPO_ROOT" && cargo build --release >&2)
  target_dir="${CARGO_TARGET_DIR:-}"
  if [ -z "$target_dir" ]; then
    target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps \
      | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  fi
  [ -n "$target_dir" ] || target_dir="$REPO_ROOT/target"
  case "$target_dir" in /*) ;; *) target_dir="$REPO_ROOT/$target_dir" ;; esac
  BINARIES=("$target_dir/release/sticky-proxy")
fi
LABELS=(A B)
for i in "${!BINARIES[@]}"; do
  b="${BINARIES[$i]}"
  case "$b" in */*) ;; *) b="$(command -v "$b" || echo "$b")" ;; esac
  if [ ! -x "$b" ]; then echo "not an executable: ${BINARIES[$i]}" >&2; exit 1; fi
  BINARIES[i]="$(cd "$(dirname "$b")" && pwd)/$(basename "$b")"
done

# ---------------------------------------------------------------- helpers
port_busy() { # host:port -> 0 if something accepts connections there
  local rc=0
  curl -s -o /dev/null --max-time 1 "http://$1/" || rc=$?
  [ "$rc" -ne 7 ] && [ "$rc" -ne 28 ]
}

proc_cpu_ticks() { # pid -> utime+stime (all threads) in clock ticks
  local stat rest
  stat="$(cat "/proc/$1/stat")"
  rest="${stat##*) }"            # drop "pid (comm) ", comm may hold spaces
  local -a f
  read -r -a f <<<"$rest"
  # f[0] is field 3 (state): utime is field 14, stime field 15.
  echo $((f[11] + f[12]))
}

sys_ticks() { # all CPUs, ticks: "busy softirq"; busy = user nice system irq steal
  local _cpu u n sy _idle _iow irq sirq steal _rest
  read -r _cpu u n sy _idle _iow irq sirq steal _rest </proc/stat
  echo "$((u + n + sy + irq + steal)) $sirq"
}

reaped_children_ticks() { # user+sys of this shell's reaped children (bash `times`), ticks
  times | awk -v hz="$CLK_TCK" 'NR == 2 {
    t = 0
    for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
    printf "%d", t * hz + 0.5 }'
}

now_ns() { date +%s%N; }

field() { # line key -> value of key=value
  sed -n "s/.*[[:space:]]$2=\([^[:space:]]*\).*/\1/p" <<<" $1"
}

median() { # numbers... -> median (mean of the middle two for an even count)
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) printf "%.6g\n", v[(NR + 1) / 2]
    else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'; }

WRK_PIN=(); PROXY_PIN=()
if [ "$PIN" -eq 1 ]; then WRK_PIN=(taskset -c 0); PROXY_PIN=(taskset -c 1); fi

OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sticky-proxy-load.XXXXXX")"

# One measured run: start the demo, wait for health, warm up, measure, stop.
# Sets RESULT_* globals.
one_run() { # label binary run_no
  local label="$1" bin="$2" n="$3" i rc
  local log="$OUT_DIR/proxy-$label-$n.log" wout="$OUT_DIR/wrk-$label-$n.txt"
  for addr in "$PROXY_ADDR" "$ADMIN_ADDR"; do
    if port_busy "$addr"; then echo "something already listens on $addr: stop it first" >&2; exit 1; fi
  done

  RUST_LOG=warn "${PROXY_PIN[@]}" "$bin" demo --listen "$PROXY_ADDR" --admin "$ADMIN_ADDR" \
    --first-backend-port "$FIRST_BACKEND_PORT" --instances "$INSTANCES" >"$OUT_DIR/proxy-$label-$n.out" 2>"$log" &
  PROXY_PID=$!   # taskset execs the binary: this is the proxy's own pid

  local ready=0
  for ((i = 0; i < READY_TRIES; i++)); do
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then break; fi
    if curl -fsS --max-time 1 -o /dev/null "http://$ADMIN_ADDR/healthz" 2>/dev/null; then ready=1; break; fi
    sleep 0.1
  done
  if [ "$ready" -ne 1 ]; then
    if kill -0 "$PROXY_PID" 2>/dev/null; then
      echo "proxy $label ($bin) not healthy on http://$ADMIN_ADDR/healthz after $((READY_TRIES / 10)) s; its log:" >&2
    else
      rc=0; wait "$PROXY_PID" || rc=$?
      PROXY_PID=""
      echo "proxy $label ($bin) exited (status $rc) before it was healthy; its log:" >&2
    fi
    tail -n 20 "$log" >&2
    exit 1
  fi
  # Sanity: a request through the proxy reaches a demo instance.
  if ! curl -fsS --max-time 2 -o /dev/null -H 'X-Device-Id: dev-1' "http://$PROXY_ADDR/whoami"; then
    echo "proxy $label is healthy but GET /whoami through it failed; its log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi

  if [ "$WARMUP" -gt 0 ]; then
    DEVICE_IDS=$DEVICE_IDS timeout $((WARMUP + 30)) "${WRK_PIN[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" \
      -d"${WARMUP}s" -s "$LUA_SCRIPT" "http://$PROXY_ADDR/whoami" >"$OUT_DIR/warmup-$label-$n.txt" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || true
    WRK_PID=""
  fi

  local cpu0 cpu1 busy0 busy1 sirq0 sirq1 kids0 kids1 t0 t1
  kids0="$(reaped_children_ticks)"
  read -r busy0 sirq0 <<<"$(sys_ticks)"
  t0="$(now_ns)"
  cpu0="$(proc_cpu_ticks "$PROXY_PID")"
  DEVICE_IDS=$DEVICE_IDS timeout $((DURATION + 30)) "${WRK_PIN[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" \
    -d"${DURATION}s" --latency -s "$LUA_SCRIPT" "http://$PROXY_ADDR/whoami" >"$wout" 2>&1 &
  WRK_PID=$!
  rc=0; wait "$WRK_PID" || rc=$?
  WRK_PID=""
  cpu1="$(proc_cpu_ticks "$PROXY_PID")"
  t1="$(now_ns)"
  read -r busy1 sirq1 <<<"$(sys_ticks)"
  kids1="$(reaped_children_ticks)"   # wrk (and timeout) reaped; the proxy not yet
  stop_pid "$PROXY_PID"
  PROXY_PID=""
  if [ "$rc" -ne 0 ]; then echo "wrk failed (exit $rc); its output:" >&2; cat "$wout" >&2; exit 1; fi

  local line
  line="$(grep '^SP_RESULT ' "$wout" | tail -n 1)"
  if [ -z "$line" ]; then echo "no SP_RESULT line from wrk; its output:" >&2; cat "$wout" >&2; exit 1; fi
  local reqs dur p50 p99 errs
  reqs="$(field "$line" requests)"; dur="$(field "$line" duration_us)"
  p50="$(field "$line" p50_us)"; p99="$(field "$line" p99_us)"
  errs=$(( $(field "$line" err_connect) + $(field "$line" err_read) + $(field "$line" err_write) \
    + $(field "$line" err_timeout) + $(field "$line" err_status) ))
  RESULT_RPS="$(awk -v r="$reqs" -v d="$dur" 'BEGIN { printf "%.1f", r / (d / 1e6) }')"
  RESULT_P50="$(awk -v p="$p50" 'BEGIN { printf "%.3f", p / 1000 }')"
  RESULT_P99="$(awk -v p="$p99" 'BEGIN { printf "%.3f", p / 1000 }')"
  RESULT_CPU="$(awk -v t=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v r="$reqs" \
    'BEGIN { if (r > 0) printf "%.2f", t / hz / r * 1e6; else print "nan" }')"
  # In % of one CPU over the run: softirq time (the kernel's loopback packet
  # processing, mostly charged to no process), and everything else that was
  # neither the proxy nor wrk: other processes and steal.
  RESULT_SIRQ="$(awk -v s=$((sirq1 - sirq0)) -v hz="$CLK_TCK" -v ns=$((t1 - t0)) \
    'BEGIN { printf "%.0f", s / hz / (ns / 1e9) * 100 }')"
  RESULT_OTHER="$(awk -v b=$((busy1 - busy0)) -v p=$((cpu1 - cpu0)) -v w=$((kids1 - kids0)) \
    -v hz="$CLK_TCK" -v ns=$((t1 - t0)) 'BEGIN { o = (b - p - w) / hz / (ns / 1e9) * 100;
      if (o < 0) o = 0; printf "%.0f", o }')"
  RESULT_REQS="$reqs"
  RESULT_ERRS="$errs"
  RESULT_LOGLINES="$(wc -l <"$log")"
}

# ---------------------------------------------------------------- header
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo "sticky-proxy load benchmark  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine: $(nproc) CPUs (${cpu_model:-unknown}), $(uname -sr), load avg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wrk: $(wrk -v 2>&1 | head -n 1)"
for i in "${!BINARIES[@]}"; do
  echo "binary ${LABELS[$i]}: ${BINARIES[$i]} ($("${BINARIES[$i]}" --version 2>&1 | head -n 1))"
done
echo "load: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, GET /whoami, X-Device-Id cycling"
echo "      through $DEVICE_IDS IDs (dev-1..dev-$DEVICE_IDS); ${WARMUP}s unmeasured warm-up per run; $RUNS rounds"
echo "proxy: sticky-proxy demo --listen $PROXY_ADDR --admin $ADMIN_ADDR --instances $INSTANCES (backends from :$FIRST_BACKEND_PORT),"
echo "       RUST_LOG=warn (the default, info, writes a log line per request: its cost would be measured too)"
echo "       demo mode: the $INSTANCES demo backends run inside the proxy process, so the proxy's CPU"
echo "       and latency include theirs; one fresh process per run"
if [ "$PIN" -eq 1 ]; then
  echo "pinning: wrk on CPU 0, proxy (+ its demo backends) on CPU 1 (taskset); tokio then sizes its"
  echo "         runtime to the 1 CPU it may use"
else
  echo "pinning: none (no taskset, or fewer than 2 CPUs): wrk and proxy share all CPUs"
fi
echo "cpu/req: proxy process utime+stime (/proc/PID/stat, CLK_TCK=$CLK_TCK) over the measured run / requests"
echo "         (does not include kernel softirq time for loopback packets: most of it is charged to no"
echo "         process; it is shown as sirq%)"
echo "sirq%:  softirq time on all CPUs during the run, % of one CPU (mostly loopback TCP for wrk+proxy)"
echo "other%: CPU used during the run by anything else (other processes, steal; softirq excluded),"
echo "        % of one CPU; runs above $NOISY_PCT% are flagged: the machine was not quiet"
echo "raw wrk output and proxy logs: $OUT_DIR"
echo

# ---------------------------------------------------------------- rounds
declare -A RPS P99 CPU
printf '%-5s %-3s %10s %8s %8s %11s %9s %7s %6s %7s\n' run bin req/s p50_ms p99_ms cpu_us/req requests errors sirq% other%
NOISY=0
for ((r = 1; r <= RUNS; r++)); do
  for i in "${!BINARIES[@]}"; do
    label="${LABELS[$i]}"
    one_run "$label" "${BINARIES[$i]}" "$r"
    RPS[$label]+="$RESULT_RPS "
    P99[$label]+="$RESULT_P99 "
    CPU[$label]+="$RESULT_CPU "
    note=""
    [ "$RESULT_ERRS" -eq 0 ] || note="  <- $RESULT_ERRS errors/non-2xx, see $OUT_DIR/wrk-$label-$r.txt"
    [ "$RESULT_LOGLINES" -eq 0 ] || note="$note  (proxy logged $RESULT_LOGLINES warn/error lines)"
    if [ "$RESULT_OTHER" -gt "$NOISY_PCT" ]; then NOISY=$((NOISY + 1)); note="$note  <- busy machine"; fi
    printf '%-5s %-3s %10s %8s %8s %11s %9s %7s %6s %7s%s\n' "$r/$RUNS" "$label" "$RESULT_RPS" \
      "$RESULT_P50" "$RESULT_P99" "$RESULT_CPU" "$RESULT_REQS" "$RESULT_ERRS" "$RESULT_SIRQ" "$RESULT_OTHER" "$note"
  done
done

# ---------------------------------------------------------------- summary
echo
echo "medians over $RUNS runs:"
declare -A MED_RPS MED_P99 MED_CPU
for i in "${!BINARIES[@]}"; do
  label="${LABELS[$i]}"
  # shellcheck disable=SC2086 # word-splitting the space-separated lists is intended
  MED_RPS[$label]="$(median ${RPS[$label]})"
  # shellcheck disable=SC2086
  MED_P99[$label]="$(median ${P99[$label]})"
  # shellcheck disable=SC2086
  MED_CPU[$label]="$(median ${CPU[$label]})"
  printf '  %s  req/s %10.1f   p99 %7.3f ms   cpu %7.2f us/req   %s\n' "$label" \
    "${MED_RPS[$label]}" "${MED_P99[$label]}" "${MED_CPU[$label]}" "${BINARIES[$i]}"
done
if [ "${#BINARIES[@]}" -eq 2 ]; then
  echo "ratio B/A:  req/s $(ratio "${MED_RPS[A]}" "${MED_RPS[B]}")   p99 $(ratio "${MED_P99[A]}" "${MED_P99[B]}")   cpu/req $(ratio "${MED_CPU[A]}" "${MED_CPU[B]}")"
  echo "  (req/s > 1: B is faster; p99 and cpu/req < 1: B is better)"
fi
if [ "$NOISY" -gt 0 ]; then
  echo "WARNING: $NOISY of $((RUNS * ${#BINARIES[@]})) runs shared the machine with other work (other% > $NOISY_PCT);"
  echo "         re-run on a quiet machine before trusting small differences"
fi
echo
for i in "${!BINARIES[@]}"; do
  label="${LABELS[$i]}"
  echo "SUMMARY $label runs=$RUNS duration_s=$DURATION median_rps=${MED_RPS[$label]} median_p99_ms=${MED_P99[$label]} median_cpu_us_per_req=${MED_CPU[$label]} binary=${BINARIES[$i]}"
done
