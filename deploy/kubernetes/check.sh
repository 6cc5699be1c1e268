#!/usr/bin/env bash
# deploy/kubernetes/ checked without a cluster (CI runs this from .ci/run):
#   1. every manifest against the Kubernetes schemas, strictly (unknown fields
#      are errors), for the oldest and newest versions we support, with
#      kubernetes-validate from PyPI (pinned; it ships the schemas, so no
#      network is needed past the install);
#   2. manifest_check.py: the manifests fit together and fit the config
#      (ports, probes, grace period, mounts, selectors, the SRV name);
#   3. `sticky-proxy check` on the ConfigMap's config.toml.
# Usage: deploy/kubernetes/check.sh [STICKY_PROXY_BINARY]
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
dir=deploy/kubernetes
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
VALIDATOR_VERSION=1.37.0
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

echo "--- kubernetes: kubernetes-validate $VALIDATOR_VERSION"
venv=$(bash deploy/pip-tool.sh kubernetes-validate "$VALIDATOR_VERSION" kubernetes-validate)
manifests=()
for f in "$dir"/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
for version in "${KUBERNETES_VERSIONS[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
  echo "${#manifests[@]} manifests valid against Kubernetes $version"
done

echo "--- kubernetes: manifest_check.py lint"
"$venv/bin/python" "$dir/manifest_check.py" lint "$dir"
echo "manifests fit together and fit the config"

echo "--- kubernetes: sticky-proxy check on the ConfigMap's config"
binary="${1:-}"
if [ -z "$binary" ]; then
  cargo build --locked --quiet
  binary="${CARGO_TARGET_DIR:-$PWD/target}/debug/sticky-proxy"
fi
"$venv/bin/python" "$dir/manifest_check.py" config "$dir" "$work/config.toml"
"$binary" check --config "$work/config.toml"

echo "kubernetes check: OK in $((SECONDS - start)) s"
