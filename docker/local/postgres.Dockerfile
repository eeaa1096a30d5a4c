# A local stand-in for the official postgres image where Docker Hub cannot be reached: Debian's
# PostgreSQL on a Debian base, with the official image's interface (POSTGRES_USER / POSTGRES_PASSWORD /
# POSTGRES_DB on first start, data in /var/lib/postgresql/data, pg_isready, SIGINT = fast shutdown).
# Used by docker/compose.local.yaml; BASE is any Debian image (docker/smoke.sh makes one with debootstrap).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && rm -rf /var/lib/postgresql/*/main /etc/postgresql/* \
    && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY docker/local/postgres-entrypoint.sh /usr/local/bin/
USER postgres
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
