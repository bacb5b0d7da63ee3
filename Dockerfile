# wsimil: one image for the coordinator and the workers.
#   docker build -t wsimil .
# The runtime image carries libopenslide and OpenBLAS (loaded at run time) and CA certificates for
# S3 over TLS.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Extra cargo features (e.g. `cuda` for GPU workers: needs nvcc in the build stage, see docs/gpu.md).
ARG CARGO_FEATURES=""
RUN cargo build --release -p wsimil-coordinator --bin wsimil ${CARGO_FEATURES:+--features $CARGO_FEATURES} \
    && cp target/release/wsimil /usr/local/bin/wsimil

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenslide0 libopenblas0-pthread ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/wsimil /usr/local/bin/wsimil
ENTRYPOINT ["wsimil"]
