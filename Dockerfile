# Multi-stage build: compile on the Rust image, run on a slim Debian.
#
#   docker build -t sticky-proxy .
#   docker run --rm -p 8080:8080 -v "$PWD/config.toml:/etc/sticky-proxy/config.toml:ro" sticky-proxy
#
# The config is read from /etc/sticky-proxy/config.toml (mount yours there).
# Its listen addresses must not be loopback-only inside the container, e.g.
# server.listen = "0.0.0.0:8080"; keep admin.listen private (publish 9901
# only to trusted networks, if at all).

FROM rust:1-bookworm AS build
WORKDIR /src
# Build dependencies first so they are cached across source changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/ring.rs && echo 'fn main() {}' > benches/key.rs \
    && cargo build --release --locked && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home sticky
COPY --from=build /src/target/release/sticky-proxy /usr/local/bin/sticky-proxy
COPY config.toml.example /etc/sticky-proxy/config.toml
USER 10001
EXPOSE 8080 9901
ENTRYPOINT ["sticky-proxy"]
CMD ["run", "--config", "/etc/sticky-proxy/config.toml"]
