#!/usr/bin/env bash
# Makes sure dnsmasq is installed and prints its path (the only stdout).
#
#   tests/dns/install.sh            e.g. dnsmasq_bin=$(tests/dns/install.sh)
#
# tests/dns.rs runs a real DNS server (dnsmasq, on a free loopback port) to
# test [[discovery]]. Idempotent: a dnsmasq on PATH or at /usr/sbin/dnsmasq
# is used as it is. Otherwise, as root, installs Debian's dnsmasq-base (the
# binary alone: no service, nothing starts); not as root it says what to run
# and fails. Used by .ci/run before `cargo test`.
set -euo pipefail

dnsmasq_bin=$(command -v dnsmasq || true)
[ -z "$dnsmasq_bin" ] && [ -x /usr/sbin/dnsmasq ] && dnsmasq_bin=/usr/sbin/dnsmasq
if [ -z "$dnsmasq_bin" ]; then
  "$(dirname "$0")/../apt-install.sh" dnsmasq-base
  dnsmasq_bin=/usr/sbin/dnsmasq
fi
echo "$dnsmasq_bin"
