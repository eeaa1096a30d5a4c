"""The recipe of one allocation, end to end: what `consa search`, a service job and the quality
benchmark all run.

setup (load the model once) -> search (progress + cancel checks every step) -> manifest + gates ->
heatmap -> evaluation against the unmodified model and every baseline (on the search's copy of the
model) -> hybrid checkpoint (its own CPU copy, in the source dtype). Each file is handed to
`on_artifact(name, path)` as soon as it is written, so a caller can publish it; `on_event(type,
message)` narrates the phases after the search so a long export or evaluation never looks like a hang.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from consa.core.artifacts import CHECKPOINT, EVALUATION, EVALUATION_TABLE, GATES, HEATMAP, HISTORY, MANIFEST
from consa.core.config import SearchConfig
from consa.core.errors import Cancelled, ConsaError, DataError
from consa.search.loop import SearchResult, run_search

CHECKPOINT_DIR = CHECKPOINT.name.removesuffix(".tar")  # exported here, then packed into checkpoint.tar

# A job's evaluation: enough rows and retrieval prompts to rank allocations, small next to the search.
EVAL_SEQUENCES, EVAL_RETRIEVAL_DOCS = 16, 64
# ... and RULER's synthetic tasks at the search's seq_len (consa.evaluation.ruler), where it is long enough
# for them to say something: prompts per task, and the shortest seq_len they run at.
EVAL_RULER_SAMPLES, EVAL_RULER_MIN_SEQ_LEN = 4, 1024


@dataclass
class AllocationRun:
    search: SearchResult
    artifacts: dict = field(default_factory=dict)  # name -> Path, in the order they were written
    evaluation: list | None = None  # compare() records: the learned allocation, full, every baseline


def run_allocation(config: SearchConfig, out_dir, *, evaluate: bool = False, checkpoint: bool = False,
                   heatmap: bool = True, ruler: bool = True, duo_steps: int | None = None, device="auto", model=None, tokenizer=None, dataset=None, eval_set=None,
                   baselines=None, progress=None, on_event=None, on_artifact=None, should_cancel=None,
                   resume_from=None, on_checkpoint=None, checkpoint_every: int = 0) -> AllocationRun:
    """Search an allocation for `config` and write its artifacts into `out_dir`.

    evaluate: score it against full attention and the baselines (`baselines`: names, default every
    baseline of the granularity) on `eval_set` (default: rows and retrieval prompts from the config's
    dataset). checkpoint: export the hybrid model (checkpoint.tar). `model`/`tokenizer`/`dataset` reuse
    what a caller has loaded already; otherwise the model is loaded once for the search and evaluation.
    progress(record): every search step's record, then one per step of the later phases, each with
    `phase` ("search", "evaluation", "export") and `phase_done` / `phase_total`. on_checkpoint(state) +
    checkpoint_every: the search's state every N steps; resume_from: such a state (or its file) to
    continue from.
    """
    from consa.model.loading import free_accelerator_memory
    from consa.model.sharding import load_for_search

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = on_event or (lambda type, message: None)
    run = AllocationRun(search=None)

    def publish(path: Path) -> None:
        run.artifacts[path.name] = path
        if on_artifact is not None:
            on_artifact(path.name, path)

    def check_cancel(phase: str) -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before {phase}")

    def search_progress(record: dict) -> None:
        if progress is not None:
            progress({**record, "phase": "search", "phase_done": record["step"], "phase_total": record["total_steps"]})

    def phase_progress(phase: str, done: int, total: int) -> None:
        # The search's last record stays in: a job's progress keeps its final loss and sparsity.
        if progress is not None:
            last = run.search.history[-1] if run.search.history else {"step": config.steps, "total_steps": config.steps}
            progress({**last, "phase": phase, "phase_done": done, "phase_total": total})

    # setup + search
    owned = model is None
    if owned and (evaluate or checkpoint):
        from consa.model.devices import env_world_size
        from consa.model.devices import pick_device
        from consa.model.sharding import should_shard

        if should_shard(config, env_world_size(), pick_device(str(device))):
            raise ConsaError("a search with sharded weights (shard_weights; a model larger than one GPU) cannot "
                             "evaluate or export its allocation in the same run, which needs the whole model on one "
                             "GPU: run it without evaluation and checkpoint, or with shard_weights=off")
    if owned:
        model, tokenizer = load_for_search(config, device)
    say("info", f"search: {config.steps} steps, sparsity {config.sparsity}, {config.granularity}, "
                f"window {config.window}, objective {config.objective}")
    run.search = run_search(config, progress=search_progress, should_cancel=should_cancel, resume_from=resume_from,
                            model=model, tokenizer=tokenizer, dataset=dataset, on_checkpoint=on_checkpoint,
                            checkpoint_every=checkpoint_every)
    allocation = run.search.allocation
    from consa.search.convergence import convergence_warning

    warning = convergence_warning(config.sparsity, allocation.training.get("final_expected_sparsity"), config.steps)
    if warning:  # in the manifest's training record too, so the allocation carries it wherever it goes
        allocation.training["warning"] = warning
        say("warning", warning)
    run.search.save(out)
    publish(out / MANIFEST.name)
    publish(out / GATES.name)
    (out / HISTORY.name).write_text(json.dumps(run.search.history, indent=1))
    publish(out / HISTORY.name)

    if heatmap:
        try:
            from consa.evaluation.heatmap import save_heatmap

            publish(save_heatmap(allocation, out / HEATMAP.name))
        except ImportError as e:
            say("warning", f"heatmap not available: {e}")

    if evaluate:
        check_cancel("the evaluation")
        say("info", "evaluating the allocation against full attention and the baselines")
        run.evaluation = evaluate_allocation(model, tokenizer, allocation, config, eval_set=eval_set, duo_steps=duo_steps, ruler=ruler,
                                             baselines=baselines, on_event=say, should_cancel=should_cancel,
                                             on_scored=lambda done, total: phase_progress("evaluation", done, total))
        from consa.evaluation.compare import markdown_table

        (out / EVALUATION_TABLE.name).write_text(markdown_table(run.evaluation))
        (out / EVALUATION.name).write_text(json.dumps(run.evaluation, indent=1, default=str))
        publish(out / EVALUATION_TABLE.name)
        publish(out / EVALUATION.name)

    if checkpoint:
        if owned:
            del model  # the export loads its own CPU copy; give the accelerator's memory back first
            free_accelerator_memory()
        check_cancel("the export")
        say("info", "exporting the hybrid checkpoint")
        phase_progress("export", 0, 2)
        from consa.export.checkpoint import export_hybrid, pack_checkpoint

        summary = export_hybrid(config.model, allocation, out / CHECKPOINT_DIR)
        if summary.get("message"):
            say("info", f"checkpoint: {summary['message']}")
        say("info", "packing the checkpoint for download")
        phase_progress("export", 1, 2)
        publish(pack_checkpoint(out / CHECKPOINT_DIR, out / CHECKPOINT.name))
        phase_progress("export", 2, 2)
    return run


def evaluate_allocation(model, tokenizer, allocation, config: SearchConfig, *, eval_set=None, baselines=None,
                        duo_steps: int | None = None, ruler: bool = True, on_event=None, on_scored=None,
                        should_cancel=None) -> list[dict]:
    """The allocation (as "learned") next to full attention and the baselines, on the same rows, with
    RULER's tasks at seq_len when `ruler` and seq_len is at least EVAL_RULER_MIN_SEQ_LEN.
    `duo_steps`: the duo baseline's training steps (default: the search's). on_scored(done, total) at the
    start (0) and after each unit: a baseline built, or one part of the eval set scored for one allocation.
    should_cancel() is asked between units and inside the long ones (the duo baseline's steps, the
    heuristic-loss baseline's units, RULER's prompts)."""
    from consa.evaluation.baselines import baseline_names
    from consa.evaluation.compare import baseline_allocations, compare
    from consa.evaluation.metrics import build_eval_set, eval_parts

    say = on_event or (lambda type, message: None)
    model.eval()  # the search's copy: frozen weights, gates swapped per allocation
    if eval_set is None:
        if config.dataset is None:
            raise DataError("an evaluation needs data: give the config a dataset or pass eval_set")
        sizes = dict(seq_len=config.seq_len, num_sequences=EVAL_SEQUENCES, seed=config.seed)
        try:
            eval_set = build_eval_set(tokenizer, config.text_source, retrieval_docs=EVAL_RETRIEVAL_DOCS, **sizes)
        except DataError as e:  # retrieval documents need room for their keys; score the loss alone
            say("warning", f"evaluation without retrieval: {e}")
            eval_set = build_eval_set(tokenizer, config.text_source, retrieval_docs=0, **sizes)
        if ruler and config.seq_len >= EVAL_RULER_MIN_SEQ_LEN:
            from consa.evaluation.ruler import samples_from

            try:
                eval_set.ruler = samples_from(tokenizer, config.text_source, [config.seq_len],
                                              samples=EVAL_RULER_SAMPLES, seed=config.seed)
            except DataError as e:
                say("warning", f"evaluation without RULER: {e}")
    names = baseline_names(config.granularity) if baselines is None else list(baselines)
    # The phase's units: each baseline built, then each part of the eval set (loss, retrieval, RULER)
    # scored for each allocation (full, learned, the baselines). A cancel is honoured between any two.
    parts = eval_parts(eval_set)
    total, done = len(names) + (2 + len(names)) * len(parts), 0
    started = time.monotonic()

    def unit_done(what: str | None = None) -> None:
        nonlocal done, started
        done += 1
        if what is not None:
            say("info", f"evaluation {done}/{total}: {what} ({time.monotonic() - started:.1f}s)")
        started = time.monotonic()
        if on_scored is not None:
            on_scored(done, total)

    if on_scored is not None:
        on_scored(0, total)
    allocations = {"full": None, "learned": allocation}
    allocations |= baseline_allocations(names, model, tokenizer, sparsity=config.sparsity,
                                        granularity=config.granularity, window=config.window,
                                        sink_tokens=config.sink_tokens, seed=config.seed,
                                        calibration_data=config.text_source, seq_len=config.seq_len,
                                        model_name=config.model, steps=duo_steps or config.steps, on_event=say,
                                        should_cancel=should_cancel,
                                        on_built=lambda name: unit_done(f"baseline {name} built"))
    return compare(model, tokenizer, allocations, data=eval_set, window=allocation.window,
                   progress=lambda line: say("info", f"scored {line}"), should_cancel=should_cancel,
                   on_part=lambda name, part: unit_done())
