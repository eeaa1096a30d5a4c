"""Engine and sessions. SQLite gets WAL + a busy timeout because the API and the worker write to it at once."""

from functools import lru_cache

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

# Connections per process: pool + overflow = 40, anyio's thread pool, which runs every sync route, so
# a request never waits on the pool longer than on a thread. configure_pool() sets them from settings.
POOL = {"pool_size": 10, "max_overflow": 30}


def configure_pool(pool_size: int, max_overflow: int) -> None:
    """Pool size of the engines made from now on (call before the first request)."""
    POOL.update(pool_size=pool_size, max_overflow=max_overflow)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **POOL)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's progress writes
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **POOL)


@lru_cache
def engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache
def sessionmaker_for(url: str) -> sessionmaker:
    return sessionmaker(engine_for(url), expire_on_commit=False)
