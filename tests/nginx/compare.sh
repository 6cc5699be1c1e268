#!/usr/bin/env bash
# Runs real nginx with `hash $http_x_device_id consistent` over each server
# list in tests/fixtures/nginx/*.txt, sends it 10,000 device IDs
# (sticky_proxy::tools::sample::varied_ids(7, 10000)) and records which server
# answered each one.
#
#   tests/nginx/compare.sh            compare with the committed fixtures (CI)
#   tests/nginx/compare.sh --update   rewrite the fixtures' answers
#
# A fixture holds `server …` lines exactly as in an nginx upstream block,
# then `answers`, then one line per ID: the index of the server nginx chose.
# tests/nginx_hash.rs checks that `routing.hash = "nginx"` chooses the same;
# this script checks that nginx still does, so the two can't drift apart.
#
# Needs root only to install nginx (Debian's package, if missing:
# tests/nginx/install.sh) and to bind port 80 on 127.0.0.x for the servers
# written without a port. Everything else lives in a temp dir; each nginx is
# stopped by its PID, also on failure.
# Loopback addresses only.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=check
case "${1:-}" in
  --update) mode=update ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

SEED=7
COUNT=10000
FRONT=127.0.0.1:18000
fixtures=tests/fixtures/nginx

nginx_bin=$(tests/nginx/install.sh)
nginx_version=$("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //')
echo "--- $nginx_version at $nginx_bin"

echo "--- building the probe"
cargo build --quiet --locked --example nginx_probe
probe="${CARGO_TARGET_DIR:-target}/debug/examples/nginx_probe"

tmp=$(mktemp -d /tmp/nginx-compare.XXXXXX)
nginx_pid=

# Children of a PID, from /proc (no procps needed).
children_of() {
  local status
  for status in /proc/[0-9]*/status; do
    awk -v p="$1" '$1 == "PPid:" && $2 == p { split(FILENAME, f, "/"); print f[3] }' "$status" 2>/dev/null || true
  done
}

stop_nginx() {
  [ -n "$nginx_pid" ] || return 0
  if kill -0 "$nginx_pid" 2>/dev/null; then
    kill -TERM "$nginx_pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$nginx_pid" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$nginx_pid" 2>/dev/null; then
      # Workers outlive a killed master: end them first, by PID.
      for child in $(children_of "$nginx_pid"); do kill -KILL "$child" 2>/dev/null || true; done
      kill -KILL "$nginx_pid" 2>/dev/null || true
    fi
  fi
  wait "$nginx_pid" 2>/dev/null || true
  nginx_pid=
}
trap 'stop_nginx; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

# `listen` addresses of a server as written: host (port 80 if none), a
# hostname on every address it resolves to, as nginx connects to them all.
listen_addresses() {
  local server=$1 host port
  if [[ $server =~ ^(.*):([0-9]+)$ ]]; then
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
  else
    host=$server port=80
  fi
  if [[ $host =~ ^\[.*\]$ || $host =~ ^[0-9.]+$ ]]; then
    echo "$host:$port"
  else
    getent ahosts "$host" | awk '{print $1}' | sort -u | while read -r ip; do
      if [[ $ip == *:* ]]; then echo "[$ip]:$port"; else echo "$ip:$port"; fi
    done
  fi
}

write_config() {
  local fixture=$1 conf=$2 i=0 line server
  {
    echo "worker_processes 1;"
    echo "pid $tmp/nginx.pid;"
    echo "error_log $tmp/error.log warn;"
    echo "events { worker_connections 1024; }"
    echo "http {"
    echo "  access_log off;"
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $tmp/$t;"; done
    echo "  upstream devices {"
    echo "    hash \$http_x_device_id consistent;"
    grep '^server ' "$fixture" | sed 's/^/    /; s/$/;/'
    echo "    keepalive 16;"
    echo "  }"
    echo "  server {"
    echo "    listen $FRONT;"
    echo "    keepalive_requests 1000000;"
    echo "    location / {"
    echo "      proxy_pass http://devices;"
    echo "      proxy_http_version 1.1;"
    echo "      proxy_set_header Connection \"\";"
    # A server that fails must show, not hand its IDs to another one.
    echo "      proxy_next_upstream off;"
    echo "    }"
    echo "  }"
    # Each server of the list answers with its index.
    while read -r line; do
      read -r _ server rest <<<"$line"
      if [[ " $rest " != *" down "* ]]; then
        echo "  server {"
        listen_addresses "$server" | sed 's/^/    listen /; s/$/;/'
        echo "    location / { return 200 \"$i\"; }"
        echo "  }"
      fi
      i=$((i + 1))
    done < <(grep '^server ' "$fixture")
    echo "}"
  } >"$conf"
}

status=0
start=$(date +%s)
for fixture in "$fixtures"/*.txt; do
  name=$(basename "$fixture" .txt)
  conf="$tmp/$name.conf"
  write_config "$fixture" "$conf"
  : >"$tmp/error.log"
  "$nginx_bin" -e "$tmp/error.log" -p "$tmp" -c "$conf" -g 'daemon off;' &
  nginx_pid=$!
  if ! timeout 300 "$probe" "$FRONT" "$SEED" "$COUNT" >"$tmp/$name.answers"; then
    echo "FAIL $name: the probe failed; nginx's error log:" >&2
    tail -n 20 "$tmp/error.log" >&2
    stop_nginx
    status=1
    continue
  fi
  stop_nginx
  if [ "$mode" = update ]; then
    {
      echo "# Recorded from $nginx_version by tests/nginx/compare.sh --update: do not edit the answers."
      echo "# upstream { hash \$http_x_device_id consistent; <the server lines below> }"
      echo "# answers: for each of sticky_proxy::tools::sample::varied_ids($SEED, $COUNT), in order,"
      echo "# the index (from 0) of the server line nginx sent it to."
      grep '^server ' "$fixture"
      echo "answers"
      cat "$tmp/$name.answers"
    } >"$tmp/$name.fixture"
    mv "$tmp/$name.fixture" "$fixture"
    echo "updated $name: $(wc -l <"$tmp/$name.answers") answers"
  else
    sed -n '/^answers$/,$p' "$fixture" | tail -n +2 >"$tmp/$name.expected"
    if cmp -s "$tmp/$name.expected" "$tmp/$name.answers"; then
      echo "ok   $name: nginx sent all $COUNT IDs where the fixture says"
    else
      differ=$(diff "$tmp/$name.expected" "$tmp/$name.answers" | grep -c '^>' || true)
      echo "FAIL $name: $differ of $COUNT IDs went elsewhere than the fixture says (first lines: ID index, fixture, nginx)" >&2
      paste "$tmp/$name.expected" "$tmp/$name.answers" | awk '$1 != $2 { print "  #" NR-1, $1, $2; if (++n == 10) exit }' >&2
      status=1
    fi
  fi
done
echo "--- nginx comparison took $(($(date +%s) - start)) s"
exit "$status"
