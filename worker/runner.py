"""Run one allocation job: claim it, search, store artifacts, record the end. The database is the truth.

setup (claim the row, build the SearchConfig) -> search (progress + cancel checks every step) ->
artifacts (manifest, gates, heatmap, checkpoint, evaluation) -> terminal status.
"""

import datetime as dt
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from service import artifacts, crud
from service.db import sessionmaker_for
from service.models import CANCEL_REQUESTED, CANCELLED, FAILED, RUNNING, SUCCEEDED, Job, utcnow
from service.settings import Settings

log = logging.getLogger("consa.worker")

# Job params that are SearchConfig fields under the same name (dataset is `data` there).
_SEARCH_FIELDS = ("model", "revision", "sparsity", "granularity", "window", "sink_tokens", "retrieval_ratio",
                  "seq_len", "batch_size", "steps", "lr", "objective", "seed")
# Evaluation size: enough rows and retrieval prompts to rank allocations, small next to the search.
EVAL_SEQUENCES, EVAL_RETRIEVAL_DOCS = 16, 64


def run_job(job_id: str, settings: Settings, worker: str) -> str | None:
    """Run the job if this delivery may; return its final status, or None when it was not ours to run."""
    with sessionmaker_for(settings.database_url)() as session:
        job = crud.claim_job(session, job_id=job_id, worker=worker)
        if job is None:
            _not_claimed(session, job_id, settings)
            return None
        log.info("running %s on %s", job.id, worker)
        return JobRun(session, job, settings).run()


def _not_claimed(session: Session, job_id: str, settings: Settings) -> None:
    """A delivery we may not run: unknown id, already finished, or running elsewhere (a redelivery)."""
    job = crud.get_job(session, job_id=job_id)
    if job is None:
        log.warning("job %s is not in the database; dropping the message", job_id)
    elif job.status in (RUNNING, CANCEL_REQUESTED):
        stale_before = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
        if crud.mark_lost(session, job=job, stale_before=stale_before):
            log.warning("job %s was running with no heartbeat since %s: marked failed", job_id, job.heartbeat_at)
        else:
            log.info("job %s is running elsewhere; ignoring this redelivery", job_id)
    else:
        log.info("job %s is already %s; ignoring this delivery", job_id, job.status)


def fail_orphans(settings: Settings, worker: str) -> int:
    """At worker start: jobs still marked running on this worker name died with its previous process."""
    with sessionmaker_for(settings.database_url)() as session:
        return crud.fail_orphans(session, worker=worker)


class JobRun:
    def __init__(self, session: Session, job: Job, settings: Settings):
        self.session, self.job, self.settings = session, job, settings
        self.params = job.params
        self.staging: Path | None = None
        self.model = self.tokenizer = None  # loaded once: the search and the evaluation share it

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        crud.log_event(self.session, job=self.job, type=type, message=message, data=data)

    def finish(self, status: str, **error) -> str:
        crud.finish_job(self.session, job=self.job, status=status, **error)
        return crud.job_status(self.session, job_pk=self.job.pk)

    # -- the phases -----------------------------------------------------------------------------
    def run(self) -> str:
        from consa.errors import Cancelled, ConsaError

        self.settings.artifact_dir.mkdir(parents=True, exist_ok=True)
        # Same filesystem as the store, so publishing is a copy + rename without crossing devices.
        self.staging = Path(tempfile.mkdtemp(prefix=f".staging-{self.job.id}-", dir=self.settings.artifact_dir))
        try:
            config = self.search_config()
            if config is None:
                return crud.job_status(self.session, job_pk=self.job.pk)
            result = self.search(config)
            self.store(result)
            return self.finish(SUCCEEDED)
        except Cancelled:
            return self.finish(CANCELLED)
        except ConsaError as e:  # the user's model, data or settings: they can fix it
            return self.finish(FAILED, error_code=e.code, error_type="user", error_message=str(e))
        except Exception as e:
            log.exception("job %s failed", self.job.id)
            return self.finish(FAILED, error_code="internal_error", error_type="system",
                               error_message=f"{type(e).__name__}: {e}"[:2000])
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.release_model()

    def search_config(self):
        from consa.search import SearchConfig

        fields = {name: self.params[name] for name in _SEARCH_FIELDS}
        if not Path(fields["model"]).is_absolute() and Path(fields["model"]).exists():
            # transformers would load a hub-like ID such as "data/x" from the worker's working
            # directory, outside every model root: refuse rather than guess.
            self.finish(FAILED, error_code="model_path_not_allowed", error_type="user",
                        error_message=f"{fields['model']!r} names a local folder of the worker, not a hub model; "
                                      "give an absolute path under a model root")
            return None
        try:
            return SearchConfig(**fields, dataset=self.params["dataset"])
        except ValueError as e:  # the request passed the API's checks but not the library's
            self.finish(FAILED, error_code="invalid_request", error_type="user", error_message=str(e))
            return None

    def release_model(self) -> None:
        if self.model is not None:
            self.model = self.tokenizer = None
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next job on this GPU gets the memory back

    def search(self, config):
        from consa.loading import load_for_search
        from consa.search import run_search

        def progress(record: dict) -> None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
            crud.record_progress(self.session, job=self.job, progress=clean)

        def should_cancel() -> bool:
            # Anything but running stops the search: cancel_requested, or a row someone else ended.
            return crud.job_status(self.session, job_pk=self.job.pk) != RUNNING

        self.model, self.tokenizer = load_for_search(config)
        self.event("info", f"search: {config.steps} steps, sparsity {config.sparsity}, {config.granularity}, "
                           f"window {config.window}")
        return run_search(config, progress=progress, should_cancel=should_cancel, model=self.model,
                          tokenizer=self.tokenizer)

    def store(self, result) -> None:
        out = self.staging
        result.save(out)
        self.publish(out / "manifest.json", "manifest.json")
        self.publish(out / "gates.safetensors", "gates.safetensors")
        self.heatmap(result.allocation, out)
        if not self.params.get("evaluate"):
            self.release_model()  # before the export loads its own copy on the CPU
        self.checkpoint(result.allocation, out)
        if self.params.get("evaluate"):
            self.evaluate(result.allocation, out)

    def publish(self, path: Path, name: str) -> None:
        size, sha256 = artifacts.publish(path, self.settings.artifact_dir, self.job.id, name)
        crud.add_artifact(self.session, job=self.job, name=name, size=size, sha256=sha256,
                          content_type=artifacts.content_type(name))

    # -- derived artifacts ------------------------------------------------------------------------------
    def heatmap(self, allocation, out: Path) -> None:
        try:
            from consa.heatmap import save_heatmap

            path = save_heatmap(allocation, out / "heatmap.png")
        except ImportError as e:
            self.event("warning", f"heatmap not available: {e}")
            return
        self.publish(Path(path), "heatmap.png")

    def checkpoint(self, allocation, out: Path) -> None:
        """The hybrid model as an HF directory, packed as checkpoint.tar.gz for one download."""
        from consa.export import export_hybrid, pack_checkpoint

        self.event("info", "exporting the hybrid checkpoint")
        summary = export_hybrid(self.params["model"], allocation, out / "checkpoint")
        if summary.get("message"):
            self.event("info", f"checkpoint: {summary['message']}", data={"format": summary.get("format")})
        self.publish(pack_checkpoint(out / "checkpoint"), "checkpoint.tar.gz")

    def evaluate(self, allocation, out: Path) -> None:
        """The learned allocation against the unmodified model and the rule-based baselines, on the job's data."""
        from consa.baselines import baseline_names, build_baseline
        from consa.compare import compare, markdown_table
        from consa.data import calibration_rows
        from consa.errors import DataError
        from consa.evaluation import build_eval_set
        p = self.params
        self.event("info", "evaluating the allocation against the baselines")
        model, tokenizer = self.model.eval(), self.tokenizer  # the search's copy: frozen weights, gates swapped per allocation
        shape = (allocation.num_layers, allocation.num_kv_heads)
        allocations = {"full": None, "learned": allocation}
        calibration = calibration_rows(tokenizer, p["dataset"], p["seq_len"], p["seed"]).to(model.device)
        units = shape[0] if p["granularity"] == "layer" else shape[0] * shape[1]
        self.event("info", f"heuristic-loss baseline: the loss of each of {units} units made SWA alone, "
                           f"on {calibration.shape[0]} calibration rows")
        for name in baseline_names(p["granularity"]):
            allocations[name] = build_baseline(name, shape, p["sparsity"], p["granularity"], p["window"],
                                               seed=p["seed"], sink_tokens=p["sink_tokens"], model_name=p["model"],
                                               model=model, calibration=calibration)
        try:
            eval_set = build_eval_set(tokenizer, p["dataset"], seq_len=p["seq_len"], num_sequences=EVAL_SEQUENCES,
                                      retrieval_docs=EVAL_RETRIEVAL_DOCS, seed=p["seed"])
        except DataError as e:  # retrieval documents need room for their keys; score the loss alone
            self.event("warning", f"evaluation without retrieval: {e}")
            eval_set = build_eval_set(tokenizer, p["dataset"], seq_len=p["seq_len"], num_sequences=EVAL_SEQUENCES,
                                      retrieval_docs=0, seed=p["seed"])
        records = compare(model, tokenizer, allocations, data=eval_set, window=allocation.window,
                          progress=lambda line: self.event("info", f"evaluation: {line}"))
        (out / "evaluation.md").write_text(markdown_table(records))
        (out / "evaluation.json").write_text(json.dumps(records, indent=1, default=str))
        self.publish(out / "evaluation.md", "evaluation.md")
        self.publish(out / "evaluation.json", "evaluation.json")
