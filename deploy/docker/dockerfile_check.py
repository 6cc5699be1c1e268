#!/usr/bin/env python3
"""The Dockerfile, checked without a Docker daemon (deploy/docker/check.sh).

  dockerfile_check.py lint                 rules that matter here (see lint())
  dockerfile_check.py context              the files `docker build .` sends: git's
                                           files, .dockerignore applied
  dockerfile_check.py replay ROOT CONTEXT TARGET
                                           run every stage's COPY and RUN on this
                                           host, with ROOT standing for the image's
                                           / and TARGET for the cache mount of the
                                           build's target directory; prints the
                                           path of the binary the final stage gets

Run from the repository's root. Python 3.11+ (tomllib), standard library only.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

DOCKERFILE = os.environ.get("DOCKERFILE", "Dockerfile")
IGNORE = ".dockerignore"


def instructions(path=DOCKERFILE):
    """(line number, INSTRUCTION, rest) with continuations joined, comments dropped."""
    out, buf, start = [], "", 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if not buf and (not stripped or stripped.startswith("#")):
                continue
            if buf and stripped.startswith("#"):
                continue
            if not buf:
                start = n
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            buf += stripped
            word, _, rest = buf.partition(" ")
            out.append((start, word.upper(), rest.strip()))
            buf = ""
    return out


def stages():
    """[{name, image, instrs}] in order."""
    result = []
    for n, word, rest in instructions():
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append({"name": name, "image": parts[0], "line": n, "instrs": []})
        elif result:
            result[-1]["instrs"].append((n, word, rest))
    return result


def flags(rest):
    """Leading --flag=value words of an instruction, and the remaining words."""
    words = shlex.split(rest)
    found = []
    while words and words[0].startswith("--"):
        found.append(words.pop(0))
    return found, words


def exec_form(rest):
    rest = rest.strip()
    if rest.startswith("["):
        import json

        return json.loads(rest)
    return shlex.split(rest)


# ------------------------------------------------------------ .dockerignore


def pattern_regex(pattern):
    """A .dockerignore pattern (Go's filepath.Match plus **) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i)
            if end < 0:
                out += re.escape(c)
            else:
                cls = pattern[i + 1 : end]
                out += "[" + ("^" + cls[1:] if cls.startswith("^") else cls) + "]"
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def ignore_rules():
    rules = []
    if not os.path.exists(IGNORE):
        return rules
    with open(IGNORE, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            rules.append((negate, pattern_regex(pattern)))
    return rules


def included(path, rules):
    """moby's patternmatcher: the last rule matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def context_files():
    listed = subprocess.run(["git", "ls-files", "-z"], check=True, capture_output=True).stdout
    rules = ignore_rules()
    return [p for p in listed.decode().split("\0") if p and os.path.isfile(p) and included(p, rules)]


# ------------------------------------------------------------ lint


def cargo_bin_name():
    with open("Cargo.toml", "rb") as f:
        manifest = tomllib.load(f)
    bins = manifest.get("bin") or [{"name": manifest["package"]["name"]}]
    return bins[0]["name"]


def lint():
    problems = []
    bad = lambda n, msg: problems.append(f"{DOCKERFILE}:{n}: {msg}")  # noqa: E731
    with open(DOCKERFILE, encoding="utf-8") as f:
        first = f.readline().strip()
    if not re.fullmatch(r"#\s*syntax=docker/dockerfile:1(\.\d+)*", first):
        bad(1, "the first line must be `# syntax=docker/dockerfile:1` (RUN --mount needs it)")
    all_stages = stages()
    if not all_stages:
        bad(1, "no FROM")
        return problems
    names = {s["name"] for s in all_stages if s["name"]}
    files = set(context_files())
    dirs = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
    for s in all_stages:
        image = s["image"]
        if image in names:
            continue
        tag = image.split("@")[0].rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            bad(s["line"], f"base image {image} is not pinned to a tag")
    final = all_stages[-1]
    bin_name = cargo_bin_name()
    for s in all_stages:
        workdir, caches = "/", []
        for n, word, rest in s["instrs"]:
            if word == "WORKDIR":
                workdir = os.path.join(workdir, rest)
            elif word == "RUN":
                fl, _ = flags(rest)
                caches += [m.group(1) for f in fl for m in [re.search(r"target=([^,\s]+)", f)] if m]
                cached_target = any(c.rstrip("/").endswith("/target") for c in caches)
                if "cargo build" in rest and cached_target and f"target/release/{bin_name}" not in rest:
                    bad(n, f"cargo builds target/release/{bin_name}, which this RUN does not copy out")
            elif word in ("COPY", "ADD"):
                fl, words = flags(rest)
                sources = words[:-1]
                src_stage = next((f.split("=", 1)[1] for f in fl if f.startswith("--from=")), None)
                if src_stage is None:
                    for src in sources:
                        src = os.path.normpath(src).lstrip("/")
                        if src not in files and src not in dirs and src != ".":
                            bad(n, f"{src} is not in the build context (missing, untracked or excluded by {IGNORE})")
                else:
                    built = next((b for b in all_stages if b["name"] == src_stage), None)
                    if built is None:
                        bad(n, f"--from={src_stage}: no such stage")
                        continue
                    made = " ".join(r for _, w, r in built["instrs"] if w == "RUN")
                    bwd = next((r for _, w, r in reversed(built["instrs"]) if w == "WORKDIR"), "/")
                    for src in sources:
                        rel = os.path.relpath(src, bwd)
                        bcaches = [
                            m.group(1)
                            for _, w, r in built["instrs"]
                            if w == "RUN"
                            for f in flags(r)[0]
                            for m in [re.search(r"target=([^,\s]+)", f)]
                            if m
                        ]
                        if rel not in made.split() and src not in made.split():
                            bad(n, f"{src} is not written by a RUN of stage {src_stage}")
                        if any(src == c or src.startswith(c.rstrip("/") + "/") for c in bcaches):
                            bad(n, f"{src} is inside a cache mount of stage {src_stage}: gone after its RUN")
    words = [(w, r) for _, w, r in final["instrs"]]
    health = [r for w, r in words if w == "HEALTHCHECK"]
    if not health or health[-1].upper().startswith("NONE"):
        bad(final["line"], "the final stage has no HEALTHCHECK")
    users = [r for w, r in words if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        bad(final["line"], "the final stage must end with a non-root USER")
    # The config the image runs with: the file CMD names, as COPY'd in.
    cmd = next((exec_form(r) for w, r in reversed(words) if w == "CMD"), [])
    config_path = next((cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a in ("--config", "-c")), None)
    copied = {}
    for _, w, r in final["instrs"]:
        if w == "COPY":
            fl, ws = flags(r)
            if not any(f.startswith("--from=") for f in fl) and len(ws) == 2:
                copied[ws[1]] = ws[0]
    source = copied.get(config_path)
    if source is None:
        bad(final["line"], f"CMD's config {config_path} is not COPY'd from the context")
        return problems
    with open(source, "rb") as f:
        config = tomllib.load(f)
    listens = [
        ("server.listen", config.get("server", {}).get("listen")),
        ("server.tls.listen", config.get("server", {}).get("tls", {}).get("listen")),
        ("admin.listen", config.get("admin", {}).get("listen", "127.0.0.1:9901")),
    ]
    ports = set()
    for key, addr in listens:
        if addr is None:
            continue
        host, _, port = addr.rpartition(":")
        ports.add(port)
        if host.strip("[]") in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
            bad(final["line"], f"{source}: {key} = {addr} is loopback: unreachable from outside the container")
    exposed = {p.split("/")[0] for w, r in words if w == "EXPOSE" for p in r.split()}
    if exposed != ports:
        bad(final["line"], f"EXPOSE {' '.join(sorted(exposed))} but {source} listens on {' '.join(sorted(ports))}")
    if health and str(config.get("admin", {}).get("listen", ":9901")).rpartition(":")[2] not in health[-1]:
        bad(final["line"], "the HEALTHCHECK does not probe the admin port of the baked config")
    for b in config.get("backends", []):
        if b.get("address", "").startswith(("127.", "localhost", "[::1]")):
            bad(final["line"], f"{source}: backend {b.get('id')} at {b['address']} is the container itself")
    return problems


# ------------------------------------------------------------ replay


def replay(root, context, target):
    """Runs every stage's COPY/RUN with `root` as / (stages share it: they use
    different paths). Returns the final stage's binary as copied in."""
    root, context, target = (os.path.abspath(p) for p in (root, context, target))
    host = lambda p: os.path.join(root, p.lstrip("/"))  # noqa: E731
    final_bin = None
    all_stages = stages()
    for s in all_stages:
        last = s is all_stages[-1]
        workdir = "/"
        for n, word, rest in s["instrs"]:
            if word == "WORKDIR":
                workdir = os.path.join(workdir, rest)
                os.makedirs(host(workdir), exist_ok=True)
            elif word == "COPY":
                fl, words = flags(rest)
                src_stage = next((f.split("=", 1)[1] for f in fl if f.startswith("--from=")), None)
                dest = os.path.join(workdir, words[-1])
                for src in words[:-1]:
                    origin = host(src) if src_stage else os.path.join(context, src)
                    to = host(dest)
                    if words[-1].endswith("/") or len(words) > 2:
                        to = os.path.join(to, os.path.basename(src.rstrip("/")))
                    print(f"replay {DOCKERFILE}:{n}: COPY {src} -> {dest}", file=sys.stderr)
                    if os.path.isdir(origin):
                        shutil.copytree(origin, to, dirs_exist_ok=True)
                    elif os.path.isfile(origin):
                        os.makedirs(os.path.dirname(to), exist_ok=True)
                        shutil.copy2(origin, to)
                    else:
                        sys.exit(f"replay {DOCKERFILE}:{n}: {src} does not exist")
                    if src_stage and last and os.access(to, os.X_OK):
                        final_bin = to
            elif word == "RUN":
                fl, _ = flags(rest)
                command = rest
                for f in fl:
                    command = command.replace(f, "", 1)
                command = command.strip()
                if last:
                    # The runtime stage's packages and users are the image's, not this host's.
                    print(f"replay {DOCKERFILE}:{n}: (runtime stage, not run) RUN {command[:60]}…", file=sys.stderr)
                    continue
                env = dict(os.environ)
                for f in fl:
                    m = re.search(r"type=cache,.*target=([^,\s]+)", f)
                    if m and m.group(1).startswith(workdir.rstrip("/") + "/"):
                        link = host(m.group(1))
                        if not os.path.islink(link):
                            os.makedirs(target, exist_ok=True)
                            os.symlink(target, link)
                        if os.path.basename(m.group(1)) == "target":
                            env["CARGO_TARGET_DIR"] = target
                print(f"replay {DOCKERFILE}:{n}: RUN {command}", file=sys.stderr)
                code = subprocess.run(["sh", "-ec", command], cwd=host(workdir), env=env).returncode
                if code != 0:
                    sys.exit(f"replay {DOCKERFILE}:{n}: the RUN failed (exit {code}): `docker build` would too")
    return final_bin


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "lint":
        problems = lint()
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{DOCKERFILE}: {len(problems)} problem(s)")
        return 1 if problems else 0
    if what == "context":
        for p in context_files():
            print(p)
        return 0
    if what == "replay" and len(sys.argv) == 5:
        binary = replay(*sys.argv[2:5])
        if not binary:
            print("replay: the final stage copies no executable from a build stage", file=sys.stderr)
            return 1
        print(binary)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
