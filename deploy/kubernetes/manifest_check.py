#!/usr/bin/env python3
"""The rules deploy/kubernetes/ must keep that a schema can't see.

kubernetes-validate checks each manifest against the Kubernetes schemas;
this checks that they fit together and fit the proxy's config:

  lint DIR        kustomization lists every manifest; the Deployment's ports,
                  probes, grace period, mounts and security match the
                  ConfigMap's config.toml; Services and PDBs select pods that
                  exist; the SRV name in [[discovery]] is the headless
                  Service's.
  config DIR OUT  write the ConfigMap's config.toml to OUT, its token_file
                  pointed at OUT's directory (for `sticky-proxy check`).

Needs PyYAML (installed beside kubernetes-validate by check.sh).
"""
import os
import re
import sys
import tomllib

import yaml

errors = []


def fail(message):
    errors.append(message)


def load(directory):
    """Every resource of the manifests listed in kustomization.yaml, by kind."""
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        listed = yaml.safe_load(f)["resources"]
    present = sorted(n for n in os.listdir(directory) if n.endswith(".yaml") and n != "kustomization.yaml")
    if sorted(listed) != present:
        fail(f"kustomization.yaml lists {sorted(listed)}, the directory has {present}")
    by_kind = {}
    for name in present:
        with open(os.path.join(directory, name)) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def one(by_kind, kind, name):
    found = [d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name]
    if len(found) != 1:
        sys.exit(f"error: expected one {kind} {name}, found {len(found)}")
    return found[0]


def seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not match:
        sys.exit(f"error: can't read the duration {text!r}")
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def config_of(by_kind):
    configmap = one(by_kind, "ConfigMap", "sticky-proxy")
    return tomllib.loads(configmap["data"]["config.toml"])


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def lint(directory):
    by_kind = load(directory)
    config = config_of(by_kind)
    deployment = one(by_kind, "Deployment", "sticky-proxy")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    if spec["replicas"] < 2:
        fail(f"the proxy Deployment has {spec['replicas']} replica(s); at least 2")
    if ports.get("http") != port_of(config["server"]["listen"]):
        fail(f"containerPort http {ports.get('http')} is not server.listen {config['server']['listen']}")
    if ports.get("admin") != port_of(config["admin"]["listen"]):
        fail(f"containerPort admin {ports.get('admin')} is not admin.listen {config['admin']['listen']}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "admin":
            fail(f"{probe} must GET {path} on the admin port, not {get}")

    delay = seconds(config["server"].get("shutdown_delay", "0s"))
    grace = seconds(config["server"].get("shutdown_grace", "10s"))
    period = pod.get("terminationGracePeriodSeconds", 30)
    if period < delay + grace:
        fail(f"terminationGracePeriodSeconds {period} < shutdown_delay + shutdown_grace ({delay + grace} s)")
    if delay < 1:
        fail("server.shutdown_delay must be a few seconds on Kubernetes (endpoints catch up meanwhile)")

    for kind, name in (("Deployment", "sticky-proxy"), ("StatefulSet", "app")):
        workload = one(by_kind, kind, name)
        pod_spec = workload["spec"]["template"]["spec"]
        if not pod_spec.get("securityContext", {}).get("runAsNonRoot"):
            fail(f"{kind} {name}: runAsNonRoot")
        for c in pod_spec["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{kind} {name}: container {c['name']} needs a read-only root filesystem, no privilege escalation")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(f"{kind} {name}: container {c['name']} must drop all capabilities")
            resources = c.get("resources", {})
            if "memory" not in resources.get("requests", {}) or "memory" not in resources.get("limits", {}):
                fail(f"{kind} {name}: container {c['name']} needs memory requests and limits")

    # The config and the token are where the config says they are.
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_path = container["args"][container["args"].index("--config") + 1]
    config_volume = volumes.get(mounts.get(os.path.dirname(config_path)), {})
    if config_volume.get("configMap", {}).get("name") != "sticky-proxy":
        fail(f"{config_path} is not the ConfigMap sticky-proxy's mount")
    token_dir = os.path.dirname(config["admin"]["token_file"])
    if "secret" not in volumes.get(mounts.get(token_dir), {}):
        fail(f"admin.token_file's directory {token_dir} is not a Secret's mount")

    # Services and PDBs select the pods they mean.
    pods = {
        "sticky-proxy": spec["template"]["metadata"]["labels"],
        "app": one(by_kind, "StatefulSet", "app")["spec"]["template"]["metadata"]["labels"],
    }
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in by_kind.get(kind, []):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            name = doc["metadata"]["name"]
            if not selects(selector, pods.get(name, {})):
                fail(f"{kind} {name} selects {selector}, not the {name} pods")
    service = one(by_kind, "Service", "sticky-proxy")
    if any(p["targetPort"] not in ports for p in service["spec"]["ports"]):
        fail("Service sticky-proxy targets a port the proxy doesn't name")

    # [[discovery]] names the headless Service's SRV records.
    app = one(by_kind, "Service", "app")
    statefulset = one(by_kind, "StatefulSet", "app")
    if app["spec"].get("clusterIP") != "None":
        fail("Service app must be headless (clusterIP: None): one SRV record per pod")
    if statefulset["spec"]["serviceName"] != "app":
        fail("StatefulSet app's serviceName must be the headless Service, for stable pod names")
    namespace = app["metadata"]["namespace"]
    srv = {
        f"_{p['name']}._{p.get('protocol', 'TCP').lower()}.app.{namespace}.svc.cluster.local"
        for p in app["spec"]["ports"]
    }
    names = {d["dns"] for d in config.get("discovery", []) if d.get("kind", "srv") == "srv"}
    if not names or not names <= srv:
        fail(f"[[discovery]] dns {sorted(names)} is not an SRV name of Service app ({sorted(srv)})")
    namespaces = {d["metadata"].get("namespace") for k, docs in by_kind.items() if k != "Namespace" for d in docs}
    if namespaces != {namespace}:
        fail(f"every resource must be in namespace {namespace}, found {sorted(map(str, namespaces))}")


def write_config(directory, out):
    text = one(load(directory), "ConfigMap", "sticky-proxy")["data"]["config.toml"]
    token = os.path.join(os.path.dirname(os.path.abspath(out)), "admin-token")
    text = re.sub(r'(?m)^token_file = ".*"$', f'token_file = "{token}"', text)
    with open(token, "w") as f:
        f.write("a-token-for-check-only\n")
    with open(out, "w") as f:
        f.write(text)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "lint":
        lint(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "config":
        write_config(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
