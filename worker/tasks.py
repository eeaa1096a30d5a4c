"""The Celery task: thin. It receives a job id and hands it to the runner, which owns the DB row.

Beside it, each worker process beats a heartbeat every CONSA_WORKER_HEARTBEAT_S from a thread (the
row in `workers`, and the heartbeat of the job it runs, even while one step or a model download takes
minutes): /readyz and the reconciler tell a live worker from a dead one by it.
"""

import logging
import threading

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from service.crud import heartbeats
from service.db import sessionmaker_for
from service.queue import TASK_NAME
from service.reconciler import settle_lost
from service.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import STOPPING, run_job

log = logging.getLogger("consa.worker")
_stop_beating = threading.Event()


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_job_task(self, job_id: str) -> str | None:
    return run_job(job_id, get_settings(), worker=self.request.hostname or "worker")


def _beat(name: str) -> None:
    settings = get_settings()
    while not _stop_beating.is_set():
        try:
            with sessionmaker_for(settings.database_url)() as session:
                heartbeats.beat_worker(session, worker=name)
        except Exception:  # the database is down for a moment: beat again next time
            log.exception("worker heartbeat failed")
        _stop_beating.wait(settings.worker_heartbeat_s)


@worker_ready.connect
def _on_ready(sender, **_):
    # One worker name runs one job at a time, so its jobs still active at start died with its previous
    # process: queue them again (or fail them past their attempts) now rather than after stale_after_s.
    settle_lost(get_settings(), worker=sender.hostname)
    threading.Thread(target=_beat, args=(sender.hostname,), name="worker-heartbeat", daemon=True).start()
    # Import torch + transformers now, while idle, instead of inside the first job (seconds).
    import consa.search.loop  # noqa: F401


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
