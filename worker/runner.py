"""Run one allocation job: claim the row, run the library's recipe, publish what it writes, record the end.

The recipe itself (search -> manifest + gates -> heatmap -> evaluation -> checkpoint) is
`consa.recipe.pipeline.run_allocation`, the same the CLI runs; this module keeps the job's lifecycle: the
claim, heartbeats (progress), cancel checks, publishing artifacts, the terminal status, and the
search's resume point: its state is saved into the job's folder of the artifact store every
CONSA_CHECKPOINT_EVERY_S seconds / _STEPS steps, and a later attempt of the job (its worker died and
the reconciler queued it again) continues from there instead of from step 0.
A worker told to stop (SIGTERM: Celery's warm shutdown, e.g. `docker stop`, `consa serve` stopping or
dying) does not wait for a search of hours: STOPPING is set, the search saves its state after the step
it is in (or the evaluation / export stops at its next unit: the search's final state is saved), and
the job is handed back (queued again, not counted as a lost attempt) to resume there on the next worker.
The database is the truth, and it may be away for a moment (a PostgreSQL restart, a failover): every
database call of a job waits it out (rollback, reconnect through the pool's pre-ping, retry) for up to
DB_PATIENCE_S, and the worker's heartbeat beats only the job this process runs (current_job), so a job whose
attempt died in a way the process survived goes stale and the reconciler settles it.
A job also ends at CONSA_TASK_TIME_LIMIT_S (checked at every step and every unit of the later phases,
like a cancel), whatever the pool: Celery's own time limit needs the prefork pool, the workers run solo.
"""

import datetime as dt
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.orm import Session

from service import artifacts
from service.crud import artifact_records, heartbeats, job_events, job_records, job_states, outbox
from service.db import sessionmaker_for
from service.models import CANCEL_REQUESTED, CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, utcnow
from service.settings import Settings
from service.store import get_store

log = logging.getLogger("consa.worker")
STOPPING = threading.Event()  # set by the worker's warm shutdown (worker/tasks.py)
DB_PATIENCE_S = 120.0  # a job waits this long for a database that went away before it gives up
_current: tuple[int, int] | None = None  # (job pk, attempt) this process runs now: what its heartbeat beats


def current_job() -> tuple[int, int] | None:
    """The job (pk, attempt) this process is running, or None: the heartbeat thread beats only it."""
    return _current


def run_job(job_id: str, settings: Settings, worker: str) -> str | None:
    """Run the job if this delivery may; return its final status, or None when it was not ours to run."""
    with sessionmaker_for(settings.database_url)() as session:
        if STOPPING.is_set():  # a stopping worker starts nothing (Celery may still hand it a message)
            outbox.mark_unsent(session, job_id=job_id)
            log.info("not starting %s: this worker is stopping; the outbox sends it again", job_id)
            return None
        job = job_states.claim_job(session, job_id=job_id, worker=worker)
        if job is None:
            _not_claimed(session, job_id, settings)
            return None
        log.info("running %s on %s", job.id, worker)
        global _current
        _current = (job.pk, job.attempts)
        try:
            return JobRun(session, job, settings).run()
        finally:
            _current = None


def _not_claimed(session: Session, job_id: str, settings: Settings) -> None:
    """A delivery we may not run: unknown id, already finished, or running elsewhere (a redelivery)."""
    job = job_records.get_job(session, job_id=job_id)
    if job is None:
        log.warning("job %s is not in the database; dropping the message", job_id)
    elif job.status in (RUNNING, CANCEL_REQUESTED):
        stale_before = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
        if job_states.mark_lost(session, job=job, stale_before=stale_before):
            log.warning("job %s was running with no heartbeat since %s: marked failed", job_id, job.heartbeat_at)
        else:
            log.info("job %s is running elsewhere; ignoring this redelivery", job_id)
    else:
        log.info("job %s is already %s; ignoring this delivery", job_id, job.status)


class JobRun:
    def __init__(self, session: Session, job: Job, settings: Settings):
        self.session, self.job, self.settings = session, job, settings
        # Detached: a rollback (the database went away) must not expire it, or reading job.pk would query.
        if job in session:
            session.expunge(job)
        self.params = job.params
        self.attempt = job.attempts  # this delivery's attempt: a later one (after a requeue) owns the row
        self.staging: Path | None = None
        self.store = get_store(settings)  # service/store/: the local folder, or an S3 bucket (another host's API)
        # Where the search writes its resume state: in the local store itself; for s3 a local copy, pushed
        # to the bucket after every save and pulled back by the next attempt, on whichever host it runs.
        self.state_path = self.store.state_file(job.id)
        self.in_search = True  # until the progress names a later phase
        self.saver: StateSaver | None = None
        # CONSA_TASK_TIME_LIMIT_S, from this attempt's start, checked like a cancel (every step, every
        # unit of the evaluation and export): the solo pool has no Celery time limit.
        self.deadline = time.monotonic() + settings.task_time_limit_s
        self.timed_out = False

    def db(self, call, **kwargs):
        """`call(session, **kwargs)`, waiting out a database that is down or restarting: roll back the
        broken transaction, wait (0.5 s doubling to 5 s), try again; after DB_PATIENCE_S the error stands
        (the job then goes stale and the reconciler settles it)."""
        deadline, delay = time.monotonic() + DB_PATIENCE_S, 0.5
        while True:
            try:
                return call(self.session, **kwargs)
            except (OperationalError, InterfaceError, PendingRollbackError, DBAPIError) as e:
                if isinstance(e, DBAPIError) and not isinstance(e, (OperationalError, InterfaceError)) \
                        and not e.connection_invalidated:
                    raise  # a real error in the statement, not the connection
                try:
                    self.session.rollback()
                except Exception:  # the connection is gone: the pool replaces it on the next checkout
                    log.debug("rollback after a database error failed", exc_info=True)
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: database unavailable (%s); retrying in %.1fs", self.job.id,
                            type(e.orig if isinstance(e, DBAPIError) else e).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        from consa.core.errors import Cancelled

        self.db(job_events.log_event, job=self.job, type=type, message=message, data=data)
        # Events come between the steps of the evaluation and export too: a cancel stops them there.
        if self.should_cancel():
            raise Cancelled(f"cancelled during: {message}")

    def finish(self, status: str, **error) -> str:
        if self.db(job_states.finish_job, job=self.job, status=status, attempt=self.attempt, **error):
            try:
                self.state_path.unlink(missing_ok=True)  # the job ended: nothing will resume from it
                self.store.delete_state(self.job.id)
            except OSError:  # a broken store: the job's terminal status matters more than the stray file
                log.warning("job %s: could not remove its search state", self.job.id)
        return self.db(job_states.job_status, job_pk=self.job.pk)

    def run(self) -> str:
        from consa.core.config import RunOptions
        from consa.core.errors import Cancelled, ConsaError
        from consa.model.loading import free_accelerator_memory
        from consa.recipe.pipeline import run_allocation
        from consa.search.distributed import helpers

        from consa.core.data import confine_reads

        # The API checked the dataset's path; the files inside a dataset folder are checked as they are read.
        confine_reads(self.settings.data_roots or None)
        try:
            # Before the search, not after hours of it: a full or read-only store fails the job now.
            self.staging = self.writable_staging()
            config = self.search_config()
            if config is None:
                return self.db(job_states.job_status, job_pk=self.job.pk)
            resume_from, gpus = self.resume_point(config), self.settings.gpus_per_job
            self.saver = saver = StateSaver(self.state_path, self.settings.checkpoint_every_steps,
                                            self.settings.checkpoint_every_s,
                                            start_step=int(resume_from["step"]) if resume_from else 0,
                                            last_step=config.steps, on_saved=self.push_state)
            if gpus > 1:
                self.event("info", f"search data-parallel over {gpus} GPUs", {"gpus": gpus})
            # This process is rank 0 (progress, cancel, outputs); helpers() runs ranks 1..N-1 beside it.
            with helpers(config, gpus, resume_from=resume_from) as device:
                run_allocation(config, self.staging, **RunOptions.from_dict(self.params).to_dict(), checkpoint=True,
                               device=device or "auto", progress=self.progress, should_cancel=self.should_cancel,
                               on_event=self.event, on_artifact=self.publish, resume_from=resume_from,
                               on_checkpoint=saver if saver.enabled else None,
                               checkpoint_every=1 if saver.enabled else 0)
            # A cancel that came during the last phase still wins over success.
            return self.finish(CANCELLED if self.cancelled() else SUCCEEDED)
        except Cancelled:
            if self.timed_out and not self.cancelled():
                limit = self.settings.task_time_limit_s
                return self.fail(error_code="time_limit_exceeded", error_type="user",
                                 error_message=f"the job ran longer than this server allows ({limit} s, "
                                               "CONSA_TASK_TIME_LIMIT_S); submit it with fewer steps, a shorter "
                                               "seq_len or without evaluate")
            if STOPPING.is_set() and not self.cancelled():
                return self.hand_back()
            return self.finish(CANCELLED)
        except ConsaError as e:  # the user's model, data or settings: they can fix it
            return self.fail(error_code=e.code, error_type="user", error_message=str(e))
        except OSError as e:  # the disk: full, read-only, gone. Say what, never where.
            log.exception("job %s failed on storage", self.job.id)
            return self.fail(error_code="storage_error", error_type="system",
                             error_message=f"the server could not write the job's files: {e.strerror or type(e).__name__}")
        except Exception as e:
            log.exception("job %s failed", self.job.id)
            return self.fail(error_code="internal_error", error_type="system",
                             error_message=without_paths(f"{type(e).__name__}: {e}")[:2000])
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            free_accelerator_memory()

    def writable_staging(self) -> Path:
        """A staging folder in the store (same filesystem, so publishing is a copy + rename without
        crossing devices), after proving that the store takes a write."""
        self.settings.artifact_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{self.job.id}-", dir=self.settings.artifact_dir))
        self.staging = staging
        probe = staging / ".probe"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        self.store.probe(self.job.id)  # the s3 store: a write to the bucket (a local store: the probe above)
        return staging

    def push_state(self, path: Path) -> None:
        """After each save of the search state: make it durable in the store. A failed push (the store is
        away for a moment) costs only resume progress: the search goes on, the next save tries again."""
        try:
            self.store.push_state(self.job.id, path)
        except OSError as e:
            log.warning("job %s: the search state could not be stored (%s); the search goes on", self.job.id, e)

    def hand_back(self) -> str:
        """The worker is stopping: queue the job again (the search state saved at the last step stays,
        so the next attempt resumes there). Not a lost attempt: a graceful restart never fails a job."""
        self.db(job_events.log_event, job=self.job, type="info",
                             message="worker stopping: the job goes back to the queue")
        log.warning("job %s handed back: the worker is stopping", self.job.id)
        if self.db(job_states.hand_back_job, job=self.job, attempt=self.attempt):
            # This attempt's partial artifacts go; its search state stays for the next one.
            self.remove_files(keep_search_state=True)
        return self.db(job_states.job_status, job_pk=self.job.pk)

    def fail(self, **error) -> str:
        """A failed job lists no artifacts: the partial ones of this attempt are removed, rows and files."""
        if not self.db(job_states.is_attempt, job_pk=self.job.pk, attempt=self.attempt):
            return self.db(job_states.job_status, job_pk=self.job.pk)  # another attempt owns the files now
        self.db(artifact_records.delete_artifacts, job=self.job)
        self.remove_files()
        return self.finish(FAILED, **error)

    def remove_files(self, keep_search_state: bool = False) -> None:
        try:
            self.store.delete_job(self.job.id, keep_search_state=keep_search_state)
        except OSError as e:  # the rows are what the API lists; the orphan sweep or a later attempt cleans up
            log.warning("job %s: could not remove its stored files (%s)", self.job.id, e)

    def resume_point(self, config) -> dict | None:
        """The state an earlier attempt of this job saved, announced as an event; None: start at step 0."""
        from consa.search.loop import load_gate_state

        if self.attempt <= 1 or not self.store.pull_state(self.job.id, self.state_path):
            if self.attempt > 1:
                self.event("info", f"attempt {self.attempt}: no saved search state; starting from step 0")
            return None
        try:
            state = load_gate_state(self.state_path)
            step = int(state["step"])
            # step == steps: the search had ended (the job died in its evaluation or export); the
            # search runs no step and finalizes to the same allocation.
            if not 0 < step <= config.steps or state["log_alpha"].numel() == 0:
                raise ValueError(f"step {step} of {config.steps}")
        except Exception as e:  # a state that does not fit: the search starts over rather than fail
            log.warning("job %s: unusable search state (%s); starting from step 0", self.job.id, e)
            self.event("warning", f"attempt {self.attempt}: the saved search state is unusable; starting from step 0")
            return None
        after = " (the search had ended: it is not run again)" if step == config.steps else ""
        self.event("info", f"resumed from step {step} (attempt {self.attempt}){after}",
                   data={"resumed_from_step": step, "attempt": self.attempt, "search_done": step == config.steps})
        return state

    def search_config(self):
        if not Path(self.params["model"]).is_absolute() and Path(self.params["model"]).exists():
            # transformers would load a hub-like ID such as "data/x" from the worker's working
            # directory, outside every model root: refuse rather than guess.
            self.finish(FAILED, error_code="model_path_not_allowed", error_type="user",
                        error_message=f"{self.params['model']!r} names a local folder of the worker, not a hub "
                                      "model; give an absolute path under a model root")
            return None
        if Path(self.params["model"]).is_absolute() and not Path(self.params["model"]).exists():
            # The API checked the path against its model roots, but the model is read here, on the worker:
            # on another host it must see the same folder (the shared, read-only model mount).
            self.finish(FAILED, error_code="model_not_loadable", error_type="user",
                        error_message=f"model {self.params['model']!r} is not on the worker that ran the job: no such "
                                      "folder. Check the path; if it is right, the server's workers lack the shared "
                                      "model folder (CONSA_MODEL_ROOTS): ask its operator")
            return None
        try:
            return search_config_of(self.params)
        except ValueError as e:  # the request passed the API's checks but not the library's
            self.finish(FAILED, error_code="invalid_request", error_type="user", error_message=str(e))
            return None

    def progress(self, record: dict) -> None:
        self.in_search = record.get("phase") in (None, "search")
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self.db(heartbeats.record_progress, job=self.job, progress=clean)

    def should_cancel(self) -> bool:
        # The worker stops: the search ends after this step (its state saved); the evaluation and the
        # export stop at their next unit when the search's final state is saved (the next attempt resumes
        # after the search), else they finish first (Celery's warm shutdown waits for them).
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return (STOPPING.is_set() and (self.in_search or self.search_saved())) or self.cancelled()

    def search_saved(self) -> bool:
        return self.saver is not None and self.saver.enabled and self.saver.saved_step >= (self.saver.last_step or 0) \
            and self.state_path.exists()

    def cancelled(self) -> bool:
        # Anything but running *here* stops the job: cancel_requested, a row someone else ended, or a
        # row the reconciler gave to another worker (or attempt) because this one looked dead.
        return not self.db(job_states.runs_on, job_pk=self.job.pk, worker=self.job.worker, attempt=self.attempt)

    def publish(self, name: str, path: Path) -> None:
        from consa.core.errors import Cancelled

        if not self.db(job_states.is_attempt, job_pk=self.job.pk, attempt=self.attempt):
            # A worker that froze past its heartbeat, lost the job to a requeue and woke up: the files
            # in the job's folder are the new attempt's now.
            raise Cancelled("this attempt of the job was superseded")
        size, sha256 = self.store.put(self.job.id, name, path)  # sha256 computed while the bytes stream
        self.db(artifact_records.add_artifact, job=self.job, name=name, size=size, sha256=sha256,
                          content_type=artifacts.content_type(name))


class StateSaver:
    """The search's `on_checkpoint`: it is offered the state every step and writes it when
    `every_steps` steps or `every_s` seconds have passed since the last write. The write is atomic (a
    temporary file, fsync, rename), so a kill at any moment leaves the previous state or the new one."""

    def __init__(self, path: Path, every_steps: int, every_s: float, start_step: int = 0, last_step: int | None = None,
                 on_saved=None):
        self.path, self.every_steps, self.every_s, self.last_step = Path(path), every_steps, every_s, last_step
        self.on_saved = on_saved  # called with the path after each write (JobRun.push_state: into the store)
        self.enabled = bool(every_steps or every_s)
        self.saved_step, self.saved_at = start_step, time.monotonic()  # a resumed search's state is on disk

    def __call__(self, state: dict) -> None:
        step = int(state["step"])
        due_steps = self.every_steps and step - self.saved_step >= self.every_steps
        due_time = self.every_s and time.monotonic() - self.saved_at >= self.every_s
        finished = self.enabled and step == self.last_step  # the evaluation and export come after it
        stopping = self.enabled and STOPPING.is_set()  # the job is handed back after this step
        if due_steps or due_time or finished or stopping:
            self.save(state)
            self.saved_step, self.saved_at = step, time.monotonic()

    def save(self, state: dict) -> None:
        from consa.search.loop import save_gate_state

        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_gate_state(state, self.path)  # atomic and fsynced
        if self.on_saved is not None:
            self.on_saved(self.path)
        log.info("search state saved at step %d", state["step"])


def without_paths(message: str) -> str:
    """A server fault's message for the client: absolute paths (the server's layout) left out."""
    return re.sub(r"(?<![\w.])/[^\s'\",:]+", "<path>", message)


def search_config_of(params: dict):
    """A job's config as the library's SearchConfig: the search settings are the same fields by name."""
    from consa.core.config import SearchConfig, setting_names

    return SearchConfig.from_dict({name: params[name] for name in setting_names() if name in params})
