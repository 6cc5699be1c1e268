#!/usr/bin/env bash
# Makes sure promtool (Debian's `prometheus` package) and Python's
# prometheus_client (`python3-prometheus-client`) are installed, and prints
# promtool's path (the only stdout).
#
#   tests/prometheus/install.sh       e.g. promtool_bin=$(tests/prometheus/install.sh)
#
# Idempotent: what is already there is used as it is. Otherwise, as root,
# installs the Debian packages without letting them start a Prometheus
# service; not as root it says what to run and fails. Used by .ci/run before
# `cargo test`, so that tests/metrics_format.rs checks the /metrics
# exposition with `promtool check metrics` and Python's parsers too.
set -euo pipefail

promtool_bin=$(command -v promtool || true)
[ -z "$promtool_bin" ] && [ -x /usr/bin/promtool ] && promtool_bin=/usr/bin/promtool
packages=()
[ -z "$promtool_bin" ] && packages+=(prometheus)
# Debian's package goes to the system Python, which may not be the first
# python3 on PATH (pyenv); tests/metrics_format.rs tries both, as here.
python3 -c 'import prometheus_client' 2>/dev/null \
  || /usr/bin/python3 -c 'import prometheus_client' 2>/dev/null \
  || packages+=(python3-prometheus-client)
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing ${packages[*]}; as root: apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 1
  fi
  echo "--- installing ${packages[*]} (Debian packages)" >&2
  # Keep the package from starting its own service (port 9090): policy-rc.d
  # is Debian's switch for that.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  install_ok=1
  timeout 600 apt-get update -qq \
    && timeout 600 apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
    || install_ok=0
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$install_ok" = 1 ] || { echo "apt-get install ${packages[*]} failed" >&2; exit 1; }
  promtool_bin=/usr/bin/promtool
fi
echo "$promtool_bin"
