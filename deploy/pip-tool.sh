#!/usr/bin/env bash
# Installs a pinned PyPI tool into its own cached venv (once) and prints the
# venv's path; deploy/docker/check.sh and deploy/kubernetes/check.sh use it.
#   venv=$(bash deploy/pip-tool.sh PACKAGE VERSION EXECUTABLE)
set -euo pipefail
package="${1:?package}" version="${2:?version}" executable="${3:?executable}"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/sticky-proxy/$package-$version"
if [ ! -x "$venv/bin/$executable" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$package==$version" >&2
fi
echo "$venv"
