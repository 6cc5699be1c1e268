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
  "$(dirname "$0")/../apt-install.sh" "${packages[@]}"
  promtool_bin=/usr/bin/promtool
fi
echo "$promtool_bin"
