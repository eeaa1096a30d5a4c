"""`consa serve` and `consa keys create`: the lead wires these into the consa CLI.

serve() runs everything one machine needs: it migrates the database, starts one real Celery worker
as a child process (solo pool, queue from CONSA_QUEUE) and serves the API with uvicorn until stopped.
"""

import logging
import os
import signal
import subprocess
import sys

from service import crud
from service.db import sessionmaker_for
from service.migrate import upgrade
from service.settings import Settings, get_settings

log = logging.getLogger("consa.service")


def prepare(settings: Settings) -> None:
    """Create the var/artifact folders and create or migrate the database (safe to repeat)."""
    settings.ensure_dirs()
    upgrade(settings.database_url)


def create_key(name: str) -> str:
    """Create an API key named `name`; print it as the last line of output and return it."""
    settings = get_settings()
    prepare(settings)
    with sessionmaker_for(settings.database_url)() as session:
        key = crud.create_api_key(session, name=name)
    print(f"Created API key {name!r}. Store it now; it cannot be shown again:", file=sys.stderr)
    print(key, flush=True)
    return key


def worker_command(settings: Settings, hostname: str = "consa@%h") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
            "--concurrency", "1", "--prefetch-multiplier", "1", "-Q", settings.queue, "-n", hostname,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Migrate, start a Celery worker process, and serve the API until SIGINT/SIGTERM."""
    import uvicorn

    from service.main import create_app

    settings = get_settings()
    prepare(settings)
    # The worker inherits the environment, so it reads the same CONSA_* settings as this process.
    worker = subprocess.Popen(worker_command(settings), env=os.environ.copy())
    log.info("worker pid %d on queue %s; API on http://%s:%d", worker.pid, settings.queue, host, port)
    # uvicorn re-raises the signal it caught after its shutdown; with the default SIGTERM action that
    # kills this process before `finally` stops the worker, so make SIGTERM an exception here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        _stop(worker)


def _stop(worker: subprocess.Popen, grace_s: float = 10.0) -> None:
    # SIGTERM is Celery's warm shutdown, which would wait for a running job to finish (hours).
    # Give it a moment, then stop it; the job it held is marked failed when the worker next starts.
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
