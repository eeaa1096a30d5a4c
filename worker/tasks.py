"""The Celery task: thin. It receives a job id and hands it to the runner, which owns the DB row.

Beside it, each worker process beats a heartbeat every CONSA_WORKER_HEARTBEAT_S from a thread (the
row in `workers`, and the heartbeat of the job it runs, even while one step or a model download takes
minutes): /readyz and the reconciler tell a live worker from a dead one by it. Only the job the process
runs right now is beaten: a job the worker's name still holds but no code runs goes stale.
"""

import logging
import os
import signal
import threading
import time

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from service.crud import heartbeats
from service.db import sessionmaker_for
from service.queue import TASK_NAME
from service.reconciler import settle_lost
from service.serve import PARENT_PID_ENV, STOP_GRACE_S
from service.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import STOPPING, current_job, run_job

log = logging.getLogger("consa.worker")
_stop_beating = threading.Event()


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_job_task(self, job_id: str) -> str | None:
    return run_job(job_id, get_settings(), worker=self.request.hostname or "worker")


def _beat(name: str) -> None:
    settings = get_settings()
    device = worker_device()
    while not _stop_beating.is_set():
        try:
            with sessionmaker_for(settings.database_url)() as session:
                # Only the job this process runs now (worker/runner.py), never every job naming the worker.
                heartbeats.beat_worker(session, worker=name, job=current_job(), device=device)
        except Exception:  # the database is down for a moment: beat again next time
            log.exception("worker heartbeat failed")
        _stop_beating.wait(settings.worker_heartbeat_s)


def worker_device() -> str:
    """What this worker runs searches on, as the workers table records it (the job estimate's device kind)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)}"
    except Exception:
        log.debug("no device name", exc_info=True)
    return "cpu"


@worker_ready.connect
def _on_ready(sender, **_):
    # One worker name runs one job at a time, so its jobs still active at start died with its previous
    # process: queue them again (or fail them past their attempts) now rather than after stale_after_s.
    settle_lost(get_settings(), worker=sender.hostname)
    threading.Thread(target=_beat, args=(sender.hostname,), name="worker-heartbeat", daemon=True).start()
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and parent.isdigit():
        threading.Thread(target=_watch_parent, args=(int(parent),), name="parent-watch", daemon=True).start()
    # Import torch + transformers now, while idle, instead of inside the first job (seconds).
    import consa.search.loop  # noqa: F401


def _watch_parent(parent: int, poll_s: float = 0.5) -> None:
    """A worker started by `consa serve` never outlives it: once its parent is gone (killed, so it could
    not stop us), stop as serve's own stop would (SIGTERM: the job is handed back), and exit for good
    STOP_GRACE_S later. On Linux the kernel's PR_SET_PDEATHSIG sends that SIGTERM at once (service/serve.py)."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("the worker's parent (pid %d) is gone: stopping", parent)
    if not STOPPING.is_set():
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, in the main thread
    time.sleep(STOP_GRACE_S)
    log.error("the worker did not stop within %ss of its parent's death: exiting", STOP_GRACE_S)
    os._exit(1)


@worker_shutting_down.connect
def _on_shutting_down(sender=None, sig=None, how=None, **_):
    # Sent from Celery's SIGTERM/SIGINT handler, in the main thread, while a job may be running there:
    # the job saves its search state after the current step and goes back to the queue (worker/runner.py).
    STOPPING.set()


@worker_shutdown.connect
def _on_shutdown(sender, **_):
    _stop_beating.set()
    try:
        with sessionmaker_for(get_settings().database_url)() as session:
            heartbeats.remove_worker(session, worker=sender.hostname)
    except Exception:
        log.exception("could not remove the worker's heartbeat row")
