# Two stages: build the release binary, then run it on a slim Debian with CA certificates only.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
# Cargo.toml names the benchmark target, and cargo reads every target's path on load.
COPY benches ./benches
RUN cargo build --release --locked --bin fusion

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/fusion fusion
COPY --from=build /src/target/release/fusion /usr/local/bin/fusion
USER fusion
WORKDIR /var/lib/fusion
ENV FUSION_LISTEN=0.0.0.0:8080 \
    DATABASE_URL=sqlite:///var/lib/fusion/fusion.db
EXPOSE 8080
ENTRYPOINT ["fusion"]
CMD ["serve"]
