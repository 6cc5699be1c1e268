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
  "$(dirname "$0")/../apt-install.sh" nginx
  nginx_bin=/usr/sbin/nginx
fi
echo "$nginx_bin"
