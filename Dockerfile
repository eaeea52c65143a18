# strata in a container: `docker build -t strata . && docker run -p 8080:8080 strata`
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin strata

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/strata /usr/local/bin/strata
ENV STRATA_CACHE_DIR=/var/cache/strata
EXPOSE 8080
ENTRYPOINT ["strata"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
