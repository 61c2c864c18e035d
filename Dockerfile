# syntax=docker/dockerfile:1
#
# One image with every couponrush binary; docker-compose.yml picks one per service
# with `command`. Build: `docker build -t couponrush .` (BuildKit).

FROM rust:1-bookworm AS builder

# rdkafka-sys builds librdkafka from source with its own ./configure and make
# (no cmake): it needs a C toolchain, make, perl, pkg-config and the zlib
# headers. The rust image already has them; they are named so that a slimmer
# base fails here, not halfway through librdkafka's configure. Versions come
# with the pinned base image (Debian stable only ships security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The registry and the target dir are BuildKit caches, so a source edit does
# not rebuild librdkafka. A cache mount is not part of the image: the binaries
# are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin coupon-api --bin coupon-issuer --bin coupon-loadgen --bin coupon-notifier --bin coupon-lab \
 && mkdir -p /out \
 && cp target/release/coupon-api target/release/coupon-issuer target/release/coupon-loadgen \
       target/release/coupon-notifier target/release/coupon-lab /out/

FROM debian:bookworm-slim

# No curl: compose's health checks speak HTTP through bash's /dev/tcp.
# librdkafka links the system zlib, which bookworm-slim ships.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 couponrush \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/couponrush \
        --shell /usr/sbin/nologin couponrush

COPY --from=builder /out/ /usr/local/bin/

# Numeric, so a runtime can verify it is not root (runAsNonRoot).
USER 10001:10001
WORKDIR /home/couponrush
# api (HTTP and /metrics), issuer and notifier (/metrics with METRICS_LISTEN),
# the webhook receiver.
EXPOSE 8080 9000 9100
CMD ["coupon-api"]
