#!/usr/bin/env bash
# Installs Debian packages for the tests, without letting them start their
# own services (nginx would take port 80, prometheus 9090): policy-rc.d is
# Debian's switch for that. Root only; otherwise says what to run and fails.
# All output goes to stderr. Used by tests/{nginx,prometheus,dns}/install.sh.
#
#   tests/apt-install.sh PACKAGE...
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }

if [ "$(id -u)" != 0 ]; then
  echo "missing $*; as root: apt-get install -y --no-install-recommends $*" >&2
  exit 1
fi
echo "--- installing $* (Debian packages)" >&2
own_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  own_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
install_ok=1
timeout 600 apt-get update -qq >&2 \
  && timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
  || install_ok=0
[ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
[ "$install_ok" = 1 ] || { echo "apt-get install $* failed" >&2; exit 1; }
