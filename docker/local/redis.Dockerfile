# A local stand-in for the official redis image where Docker Hub cannot be reached: Debian's Redis on a
# Debian base, with the official image's interface (data and the AOF in /data, redis-cli, and protected
# mode off when started without a config file, so other containers can connect).
# Used by docker/compose.local.yaml; BASE is any Debian image (docker/smoke.sh makes one with debootstrap).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY docker/local/redis-entrypoint.sh /usr/local/bin/
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
