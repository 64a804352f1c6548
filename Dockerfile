# sipmail's container image. Base images are build arguments, so the same file works with a
# registry (the defaults) and without one (integration/docker/base-images.sh builds
# debian:bookworm-slim from Debian's packages; see README.md, "Run with Docker").
#
#   docker build -t sipmail .                         # from source (needs RUST_IMAGE)
#   cargo build --release --no-default-features
#   docker build --target runtime-prebuilt -t sipmail .   # the host's binary, no Rust image
#
# Only the last stage is the default target; the stages a target does not need are not
# built (BuildKit), and the classic builder stops at the target, so runtime-prebuilt never
# asks for RUST_IMAGE.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# What both runtime targets share: a non-root user, its directories (named volumes take
# their owner from here on first use), the start script, the health check.
FROM ${RUNTIME_IMAGE} AS runtime-base
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/sipmail \
        --shell /usr/sbin/nologin sipmail \
    && mkdir -p /var/lib/sipmail/keyring /var/lib/sipmail/spool /var/lib/sipmail/exchange /etc/sipmail \
    && chown -R sipmail:sipmail /var/lib/sipmail \
    && chmod 700 /var/lib/sipmail/keyring
COPY contrib/docker/sipmail-docker /usr/local/bin/sipmail-docker
COPY contrib/docker/sipmail.toml.in /etc/sipmail/sipmail.toml.in
USER sipmail
WORKDIR /var/lib/sipmail
# SMTP from the site's MTA; SIP (UDP and TCP) from partners. Media ports are picked per call.
EXPOSE 2525 5060 5060/udp 40000-40100
# A real SMTP greeting from the listener, not just "the process exists".
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/sipmail-docker", "healthcheck"]
# The start script execs sipmail, so the relay is PID 1 and gets SIGTERM itself: it stops
# taking connections, finishes sessions, ends calls with BYE and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sipmail-docker"]
CMD ["run"]

# The binary built on the host (`cargo build --release --no-default-features`), for
# machines without a Rust image. SIPMAIL_BINARY is its path inside the build context.
FROM runtime-base AS runtime-prebuilt
ARG SIPMAIL_BINARY=target/release/sipmail
COPY ${SIPMAIL_BINARY} /usr/local/bin/sipmail

# Build from source. OpenSSL is vendored and linked statically: the runtime needs only libc.
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# curve25519-dalek's backend choice (docs/ARCHITECTURE.md, "Choices").
COPY .cargo .cargo
COPY src src
COPY benches benches
RUN cargo build --release --locked --no-default-features \
    && cp target/release/sipmail /usr/local/bin/sipmail

FROM runtime-base AS runtime
COPY --from=builder /usr/local/bin/sipmail /usr/local/bin/sipmail
