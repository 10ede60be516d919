# rankway-gateway: one binary (glibc only) on Debian slim, run as a non-root user.
# Build context: the folder scripts/build_images.sh stages (bin/rankway-gateway).
#   podman build -f deploy/docker/gateway.Dockerfile -t rankway-gateway target/image/gateway
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}
COPY bin/rankway-gateway /usr/local/bin/rankway-gateway
# Containers log JSON, one object per line (`-e RANKWAY_LOG_FORMAT=text` for people).
ENV RANKWAY_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8000 8001
ENTRYPOINT ["/usr/local/bin/rankway-gateway"]
