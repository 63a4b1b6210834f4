# Multi-stage build: dependencies are compiled in their own cached layer, the runtime image
# holds only the binary and CA certificates, and runs as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Build the dependencies alone first, so that changing the code reuses this layer.
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src src
COPY migrations migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home webhook
COPY --from=build /src/target/release/webhook-worker /usr/local/bin/webhook-worker
USER 10001
# /healthz and /readyz; probe them from the orchestrator (see README, "Running it").
EXPOSE 8080
ENTRYPOINT ["webhook-worker"]
CMD ["run"]
