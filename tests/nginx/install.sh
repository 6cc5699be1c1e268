#!/usr/bin/env bash
# Makes sure nginx is installed and prints its path (the only stdout).
#
#   tests/nginx/install.sh            e.g. nginx_bin=$(tests/nginx/install.sh)
#
# Idempotent: an nginx on PATH or at /usr/sbin/nginx is used as it is.
# Otherwise, as root, installs Debian's package without letting it start its
# own service (it would take port 80, which tests/nginx/compare.sh needs);
# not as root it says what to run and fails. Used by tests/nginx/compare.sh
# and by .ci/run before `cargo test`, so that tests/framing.rs checks nginx
# too.
set -euo pipefail

nginx_bin=$(command -v nginx || true)
[ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
if [ -z "$nginx_bin" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "nginx is not installed; as root: apt-get install -y nginx" >&2
    exit 1
  fi
  echo "--- installing nginx (Debian package)" >&2
  # Keep the package from starting its own service: policy-rc.d is Debian's
  # switch for that.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  install_ok=1
  timeout 600 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends nginx >/dev/null \
    || install_ok=0
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$install_ok" = 1 ] || { echo "apt-get install nginx failed" >&2; exit 1; }
  nginx_bin=/usr/sbin/nginx
fi
echo "$nginx_bin"
