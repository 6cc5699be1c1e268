# syntax=docker/dockerfile:1
# Multi-stage build (BuildKit): compile on the Rust image, run on a slim
# Debian of the same release (bookworm: the same glibc).
#
#   docker build -t sticky-proxy .
#   docker compose -f deploy/docker/compose.yaml up   # proxy + 3 demo apps
#
# The image reads /etc/sticky-proxy/config.toml; the one baked in is
# deploy/docker/config.toml (listens on 0.0.0.0:8080, admin API on
# 0.0.0.0:9901 with a bearer token read from /run/secrets/admin-token: mount
# a file there, or mount your own config). CI checks this file without a
# daemon: deploy/docker/check.sh lints it and replays the build stage.

FROM rust:1.95-bookworm AS build
# --version names the commit: docker build --build-arg
# STICKY_PROXY_GIT_COMMIT=$(git rev-parse --short HEAD) . (build.rs reads it;
# the context has no .git).
ARG STICKY_PROXY_GIT_COMMIT=unknown
WORKDIR /build
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
# Cache mounts keep the registry and the target directory between builds,
# so no dependency-only stub build is needed. The target directory is a
# mount (gone after this step): the binary is copied out of it, stripped.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/sticky-proxy out/sticky-proxy \
    && strip out/sticky-proxy

FROM debian:bookworm-slim
# ca-certificates: the system trust store for `tls = true` backends without
# tls_ca. Not pinned to a Debian revision: bookworm's security updates
# replace it, and a pinned revision would stop building.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sticky \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sticky
COPY --from=build /build/out/sticky-proxy /usr/local/bin/sticky-proxy
COPY deploy/docker/config.toml /etc/sticky-proxy/config.toml
USER 10001:10001
EXPOSE 8080 9901
# The binary probes its own admin API (the image has no curl): 2xx is healthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sticky-proxy", "probe", "http://127.0.0.1:9901/readyz"]
ENTRYPOINT ["sticky-proxy"]
CMD ["run", "--config", "/etc/sticky-proxy/config.toml"]
