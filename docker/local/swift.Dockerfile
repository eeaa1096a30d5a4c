# An S3-compatible object store for docker/compose.s3.yaml where none is at hand (no AWS, no MinIO
# image from Docker Hub): OpenStack Swift from Debian's packages, a single-node "all in one" on
# /srv/node with its s3api middleware (docker/local/swift-entrypoint.sh; tests/s3_server.py starts the
# same layout for the tests). It makes the bucket S3_BUCKET at start. BASE is any Debian bookworm image.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        swift swift-proxy swift-account swift-container swift-object python3 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /srv/node /etc/swift-aio && chown swift:swift /srv/node /etc/swift-aio
COPY docker/local/swift-entrypoint.sh /usr/local/bin/
USER swift
VOLUME /srv/node
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/swift-entrypoint.sh"]
