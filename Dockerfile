# syntax=docker/dockerfile:1
# pacer: multi-stage build. The runtime image holds the binary, CA certificates and a
# non-root user; configuration goes to /etc/pacer/pacer.toml (mount it, or set PACER_CONFIG).
#
#   docker build -t pacer .
#   docker run --rm -p 8080:8080 -p 9090:9090 -v $PWD/config/genesys.toml:/etc/pacer/pacer.toml:ro pacer

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artifacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pacer \
    && install -D -m 0755 target/release/pacer /out/pacer

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pacer \
    && useradd --system --uid 10001 --gid pacer --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pacer \
    && mkdir -p /etc/pacer
COPY --from=builder /out/pacer /usr/local/bin/pacer
COPY config/pacer.toml /etc/pacer/pacer.example.toml
USER 10001:10001
# 8080: the proxy; 9090: admin (/ live page, /metrics, /healthz, /readyz, /status).
EXPOSE 8080 9090
ENV PACER_LOG=info
# Asks /readyz on the admin listener: 127.0.0.1:9090, or the `admin_listen` of the file in
# PACER_CONFIG when that is set (an unspecified address is asked on loopback).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["pacer", "healthcheck"]
ENTRYPOINT ["pacer"]
CMD ["run", "--config", "/etc/pacer/pacer.toml"]
