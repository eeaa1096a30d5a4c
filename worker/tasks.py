"""The Celery task: thin. It receives a job id and hands it to the runner, which owns the DB row."""

import logging

from celery.signals import worker_ready

from service.queue import TASK_NAME
from service.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import fail_orphans, run_job

log = logging.getLogger("consa.worker")


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_job_task(self, job_id: str) -> str | None:
    return run_job(job_id, get_settings(), worker=self.request.hostname or "worker")


@worker_ready.connect
def _on_ready(sender, **_):
    # One worker name runs one job at a time, so its jobs still "running" at start died with it.
    n = fail_orphans(get_settings(), worker=sender.hostname)
    if n:
        log.warning("marked %d job(s) left running by a previous %s as failed", n, sender.hostname)
    # Import torch + transformers now, while idle, instead of inside the first job (seconds).
    import consa.search  # noqa: F401
