# wsimil: one image for the coordinator and the workers.
#   docker build -t wsimil .
#   docker build -t wsimil:cuda --build-arg CARGO_FEATURES=cuda \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 .
# The runtime image carries libopenslide and OpenBLAS (loaded at run time) and CA certificates for
# S3 over TLS; the CUDA one also cuBLAS, cuRAND, NVRTC and cudart from NVIDIA's runtime image.
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Extra cargo features: `cuda` builds through scripts/build-cuda.sh (CUDA 13 from PyPI, docs/gpu.md).
ARG CARGO_FEATURES=""
RUN case "$CARGO_FEATURES" in \
      *cuda*) apt-get update && apt-get install -y --no-install-recommends python3-pip unzip \
              && ./scripts/build-cuda.sh && cp target/cuda/release/wsimil /usr/local/bin/wsimil ;; \
      *) cargo build --release -p wsimil-coordinator --bin wsimil ${CARGO_FEATURES:+--features $CARGO_FEATURES} \
              && cp target/release/wsimil /usr/local/bin/wsimil ;; \
    esac

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenslide0 libopenblas0-pthread ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/wsimil /usr/local/bin/wsimil
ENTRYPOINT ["wsimil"]
