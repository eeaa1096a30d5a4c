#!/bin/sh
# As the official image: `redis-server [--flags]` without a config file runs with protected mode off
# (the container's network is the boundary) and keeps its files (the AOF) in /data.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
