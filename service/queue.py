"""The job queue, shared by the API (which publishes) and the worker (which consumes): the Celery app
factory, the task's name and `enqueue`. Only a job id travels through the broker; the database holds
everything else. The worker registers the task on this app (worker/tasks.py); nothing here imports it.

Delivery and "a long job must not run twice":
- `task_acks_late`: the message is acknowledged after the task returns, so a job whose worker dies
  before it is claimed is delivered again instead of being lost.
- Redis redelivers any message not acknowledged within `visibility_timeout`, even when the first
  worker is still busy with it. We set it far above a search's length (CONSA_VISIBILITY_TIMEOUT_S,
  default 7 days), and the task does not trust delivery anyway: it claims the job row with a
  conditional `UPDATE ... WHERE status = 'queued'`. A second delivery of a running or finished job
  finds nothing to claim and returns. Lost messages and dead workers are the reconciler's business
  (service/reconciler.py), which reads the database, not the broker.
- `worker_prefetch_multiplier = 1` + solo pool: one worker process per GPU holds one job at a time
  and never reserves a second message that another idle GPU could take. Solo also keeps CUDA in the
  main process (CUDA does not survive fork). Start one worker per GPU with CUDA_VISIBLE_DEVICES.
"""

from collections.abc import Sequence

from celery import Celery

from service.settings import Settings

TASK_NAME = "consa.run_job"


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The Celery app for these settings; `include` names the task modules a worker imports at start."""
    app = Celery("consa", broker=settings.broker_url, include=list(include), set_as_current=False)
    transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_url.startswith("sqla+sqlite"):
        # kombu passes these options straight to create_engine: wait on SQLite's lock instead of
        # failing when the API and the worker touch the broker file at the same moment.
        transport_options = {"connect_args": {"timeout": 30}}
    app.conf.update(
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # a killed job is settled by the reconciler, never re-run blindly
        # The runner ends a job at task_time_limit_s itself (any pool; the solo pool has no Celery time
        # limit); a prefork pool's hard limit stays a backstop a little later, for a step that hangs.
        task_time_limit=settings.task_time_limit_s + 600,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        task_ignore_result=True,  # results live in the database
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue(app: Celery, job_id: str, queue: str) -> None:
    """Publish one job id. Raises when the broker cannot be reached (no retries beyond one reconnect)."""
    app.send_task(TASK_NAME, args=[job_id], queue=queue, retry=False)
