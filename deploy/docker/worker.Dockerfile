# rankway-worker with the libtorch libraries it links (from the PyPI torch wheel, the
# CPU set or, for the `cuda` build, the CUDA set), the MiniLM weights and the SmolLM2
# GGUF (RANKWAY_MODEL=smollm2 serves it; deploy/groups/chat).
# Build context: the folder scripts/build_images.sh stages (bin/, lib/, models/).
#   podman build -f deploy/docker/worker.Dockerfile -t rankway-worker target/image/worker
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}
COPY lib/ /opt/rankway/lib/
COPY models/ /opt/rankway/models/
COPY bin/rankway-worker /usr/local/bin/rankway-worker
# Containers log JSON, one object per line (`-e RANKWAY_LOG_FORMAT=text` for people).
ENV LD_LIBRARY_PATH=/opt/rankway/lib \
    RANKWAY_MODEL_DIR=/opt/rankway/models/minilm \
    RANKWAY_LOG_FORMAT=json
USER 65532:65532
EXPOSE 9000 29500
ENTRYPOINT ["/usr/local/bin/rankway-worker"]
CMD ["serve"]
