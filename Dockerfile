# strata in a container:
#   docker build -t strata . && docker run -p 8080:8080 -v strata-cache:/var/cache/strata strata
# Needs BuildKit (docker 23+ by default; DOCKER_BUILDKIT=1 on 20.10), which builds only the stages
# the runtime stage uses. Deployment notes: docs/DEPLOY.md.
#
# Two build arguments make the runtime stage buildable without pulling anything (the test of this
# file does so, tests/container_image.rs): RUNTIME_BASE, the image it starts from, and BIN_IMAGE,
# an image holding /out/strata and the empty /out/cache/strata instead of the `build` stage.
ARG RUNTIME_BASE=debian:bookworm-slim
ARG BIN_IMAGE=build

FROM rust:1-bookworm AS build
# ISA-L's inflate is built from source by isal-sys: nasm and the autotools.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nasm autoconf automake libtool \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The release profile keeps line tables for perf (debug = 1): 120 MB a binary, which an image does
# not need; symbols stay, so a backtrace still names functions.
RUN cargo build --release --locked --bin strata \
    && install -D -m 0755 target/release/strata /out/strata \
    && strip --strip-debug /out/strata \
    && mkdir -p /out/cache/strata

FROM ${BIN_IMAGE} AS bin

FROM ${RUNTIME_BASE} AS runtime
# No RUN here: the base needs no shell or package manager. CA certificates are not installed either:
# strata compiles in Mozilla's roots, and --registry-ca adds a private CA.
COPY --from=bin /out/strata /usr/local/bin/strata
# The store and size cache, owned by the service's user; a volume, so it outlives the container and
# a read-only root file system still has somewhere to write.
COPY --from=bin --chown=10001:10001 /out/cache/ /var/cache/
ENV STRATA_CACHE_DIR=/var/cache/strata
VOLUME /var/cache/strata
# A fixed numeric uid, no passwd entry needed: Kubernetes' runAsNonRoot can only check a number.
USER 10001:10001
EXPOSE 8080
# `strata healthcheck` is a plain HTTP GET, so the image needs no curl; listening elsewhere than
# 8080, set STRATA_HEALTHCHECK_URL too.
ENV STRATA_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/strata", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/strata"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
