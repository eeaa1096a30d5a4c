"""Running the quality benchmark: worker processes that each hold the model, the eval set and the
search data, the jobs they run (full attention, one learned search, the scored baselines' scores, the
baselines of one cell), and the orchestration that submits them (seeds, resume, deadline, screen)."""

import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from .report import log, write_reports
from .variants import ALIASES, BASELINES, LOSS_WEIGHT, SCORED, pick_default, screen_score

BENCH_DIR = Path(__file__).parents[1]
RESULTS_DIR = BENCH_DIR / "results" / "current"  # where a run writes without --out
HEATMAP_DIR = BENCH_DIR / "heatmaps"
# Kept small on purpose: the random mean over seeds, and the per-unit detail, go in as extra fields.
RECORD_KEYS = ("loss", "loss_pos_lt_window", "loss_pos_ge_window", "loss_pos_ge_1024", "retrieval_acc",
               "needle_grid", "kv_bytes", "kv_bytes_ratio")


def pattern(allocation) -> list[str]:
    """One string per layer (bottom first), F = full, . = SWA: where the FA units land, at a glance."""
    return ["".join("F" if v == "full" else "." for v in row) for row in allocation.assignment]


def record_of(method, granularity, sparsity, result, allocation=None, **extra) -> dict:
    rec = {"method": method, "granularity": granularity, "sparsity": sparsity,
           **{k: result[k] for k in RECORD_KEYS if k in result}, **extra}
    if allocation is not None:
        rec["pattern"] = pattern(allocation)
    return rec


def mean_record(method, granularity, sparsity, runs: list[dict], **extra) -> dict:
    """Mean ± std over seeded runs of one method."""
    rec = {"method": method, "granularity": granularity, "sparsity": sparsity, **extra}
    for key in ("loss", "loss_pos_ge_window", "retrieval_acc", "kv_bytes_ratio"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            rec[key] = statistics.fmean(values)
            rec[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    rec["runs"] = runs
    return rec


# -- worker processes: each holds the model, the eval set and the search data ---------------------
_state: dict = {}


def load_worker(args, counter=None):
    """A worker's model (on its GPU: workers spread round-robin over them), tokenizer and the benchmark's
    eval set. bench/pareto.py evaluates on exactly this set."""
    import torch

    from consa.core.config import SearchConfig
    from consa.evaluation.metrics import build_eval_set
    from consa.model.sharding import load_for_search

    torch.manual_seed(0)
    device = args.device
    if device == "auto" and torch.cuda.device_count() > 1 and counter is not None:
        with counter.get_lock():
            device, counter.value = f"cuda:{counter.value % torch.cuda.device_count()}", counter.value + 1
        torch.cuda.set_device(device)  # compiled kernels launch on the current device
    model, tokenizer = load_for_search(SearchConfig(model=args.model, sparsity=0.5), device)  # a search's dtype
    eval_set = build_eval_set(tokenizer, args.eval_data, seq_len=args.seq_len, num_sequences=args.eval_sequences,
                              retrieval_docs=args.retrieval_docs, seed=0)
    return model, tokenizer, eval_set


def _setup(args, counter=None) -> None:
    from consa.model.hybrid_attention import model_shape

    model, tokenizer, eval_set = load_worker(args, counter)
    _state.update(args=args, model=model, tokenizer=tokenizer, eval_set=eval_set, shape=model_shape(model),
                  data={}, tmp=Path(tempfile.mkdtemp(prefix="quality-")))


def _dataset(config, rows: int):
    """The search data of one seed (cached per worker): text rows + retrieval rows, labelled."""
    from consa.core import data as data_mod

    key = (config.seed, config.retrieval_ratio, config.retrieval_keys, config.retrieval_queries, rows)
    if key not in _state["data"]:
        a = _state["args"]
        _state["data"][key] = data_mod.build_dataset(
            _state["tokenizer"], a.train_data, a.search_seq_len, rows, retrieval_ratio=config.retrieval_ratio,
            seed=config.seed, num_keys=config.retrieval_keys, queries=config.retrieval_queries, with_labels=True)
    return _state["data"][key]


def _evaluate(allocation) -> dict:
    from consa.evaluation.metrics import evaluate

    a, model = _state["args"], _state["model"]
    model.eval()
    return evaluate(model, _state["tokenizer"], allocation, data=_state["eval_set"], window=a.window,
                    batch_size=a.eval_batch)


def _search_config(a, **settings):
    from consa.core.config import SearchConfig

    # The variants were defined, and recorded, with one query per retrieval row (the default until session 6);
    # lm-q4, today's default, asks for every key.
    base = dict(model=a.model, sparsity=0.5, window=a.window, seq_len=a.search_seq_len, batch_size=a.search_batch,
                steps=a.steps, retrieval_queries=1)
    if a.retrieval_ratio is not None:
        base["retrieval_ratio"] = a.retrieval_ratio
    return SearchConfig(**{**base, **settings})


def job_full() -> list[dict]:
    result = _evaluate(None)
    return [record_of("full", None, 0.0, result)]


def job_search(name: str, overrides: dict, granularity: str, sparsity: float, seed: int, heatmap_dir) -> list[dict]:
    """One learned allocation through the pipeline's recipe, evaluated on the shared eval set."""
    from consa.recipe.pipeline import run_allocation
    from consa.search.refine import ROWS

    config = _search_config(_state["args"], sparsity=sparsity, granularity=granularity, seed=seed, **overrides)
    rows = config.steps * config.batch_size + ROWS  # held-out rows for a refinement, unused otherwise
    dataset = _dataset(config, rows)
    t = time.time()
    run = run_allocation(config, _state["tmp"] / f"{name}-{granularity}-{sparsity}-{seed}", evaluate=False,
                         heatmap=heatmap_dir is not None, model=_state["model"], tokenizer=_state["tokenizer"],
                         dataset=dataset)
    seconds = time.time() - t
    allocation = run.search.allocation
    history = run.search.history
    trace = [(r["step"], r["target"], r["sparsity"], r["loss"]) for r in history]
    extra = {"seed": seed, "settings": overrides, "search_seconds": round(seconds, 1),
             "s_per_step": round(seconds / config.steps, 4), "trace": trace[::max(1, len(trace) // 12)] + trace[-1:]}
    if "refine" in allocation.training:
        extra["refine"] = allocation.training["refine"]
    if heatmap_dir is not None and "heatmap.png" in run.artifacts:
        target = Path(heatmap_dir) / f"{granularity}_s{sparsity:g}_learned-{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(run.artifacts["heatmap.png"], target)
    return [record_of(f"learned-{name}", granularity, sparsity, _evaluate(allocation), allocation, **extra)]


PER_HEAD_SCORES = ("duo", "retrieval-heads", "retrieval-heads-answers")  # scored once per KV head, any granularity


def job_scores(seed: int, granularities: list[str], names: list[str]) -> dict:
    """The scored baselines' scores (they do not depend on the sparsity): {(name, granularity): scores}."""
    from consa.core import data as data_mod
    from consa.evaluation.baselines import baseline_scores
    from consa.search.warm_start import calibration_of

    a, model = _state["args"], _state["model"]
    config = _search_config(a, seed=seed)
    rows, labels = _dataset(config, a.steps * a.search_batch + 16)
    calibration = calibration_of(rows, labels, a.calibration_sequences)
    out, seconds = {}, {}
    for name in names:
        t = time.time()
        if name not in PER_HEAD_SCORES:
            for g in granularities:
                out[(name, g)] = baseline_scores(name, model, calibration, g, a.window)
        else:  # per KV head whatever the granularity: scored once, shared by every granularity
            if name == "duo":  # trained on the search data
                cells = baseline_scores("duo", model, calibration, granularities[0], a.window, dataset=(rows, labels),
                                        steps=a.steps, seed=seed)
            elif name == "retrieval-heads":
                cells = baseline_scores(name, model, calibration, granularities[0], a.window)
            else:  # retrieval-heads-answers
                from consa.evaluation.attention_scores import far_attention_scores

                retrieval = (labels == data_mod.IGNORE).any(1)
                cells = far_attention_scores(model, rows[retrieval][:16], a.window, labels=labels[retrieval][:16])
            out.update({(name, g): cells for g in granularities})
        seconds[name] = round(time.time() - t, 1)
    return {"scores": out, "seconds": seconds}


def job_baselines(granularity: str, sparsity: float, seed: int, names: list[str], scores: dict, seconds: dict,
                  heatmap_dir) -> list[dict]:
    from consa.evaluation.baselines import build_baseline

    a, shape = _state["args"], _state["shape"]
    records = []
    for name in names:
        if name == "random":
            runs = []
            for r in range(a.random_seeds):
                allocation = build_baseline("random", shape, sparsity, granularity, a.window, seed=r)
                runs.append(record_of("random", granularity, sparsity, _evaluate(allocation), allocation, seed=r))
            records.append(mean_record("random", granularity, sparsity, runs))
            continue
        allocation = build_baseline(ALIASES.get(name, name), shape, sparsity, granularity, a.window, seed=seed,
                                    scores=scores.get((name, granularity)))
        extra = {"seed": seed} if name in SCORED else {}
        if name in seconds:
            extra["scoring_seconds"] = seconds[name]
        if heatmap_dir is not None:
            from consa.evaluation.heatmap import save_heatmap

            extra["heatmap"] = str(save_heatmap(allocation, Path(heatmap_dir) /
                                                f"{granularity}_s{sparsity:g}_{name.replace(':', 'to')}.png"))
        records.append(record_of(name, granularity, sparsity, _evaluate(allocation), allocation, **extra))
    return records


def _call(fn_name: str, *args):
    return globals()[fn_name](*args)


# -- the orchestration ----------------------------------------------------------------------------
class InlineExecutor:
    """One worker: jobs run in this process as they are submitted (no pickling, easy to debug)."""

    def __init__(self, args):
        _setup(args)

    def submit(self, fn, *args):
        future = cf.Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class Bench:
    def __init__(self, args):
        self.args = args
        self.started = time.time()
        out = Path(args.out) if args.out else None
        self.results_dir = out or RESULTS_DIR
        self.heatmap_dir = (out / "heatmaps") if out else HEATMAP_DIR
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.done: set = set()
        if args.resume:
            self.records = json.loads(Path(args.resume).read_text())
            self.done = {self.key(r) for r in self.records}
        self.screen: dict = {}
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_setup,
                                               initargs=(args, ctx.Value("i", 0)))
        else:
            self.pool = InlineExecutor(args)
        self.pending: dict = {}

    @staticmethod
    def key(r: dict) -> tuple:
        return r["method"], r.get("granularity"), r.get("sparsity"), r.get("seed")

    def late(self) -> bool:
        return bool(self.args.deadline) and time.time() - self.started > self.args.deadline

    def submit(self, label: str, fn: str, *fn_args, on_done=None):
        if self.late():
            log(f"deadline: not starting {label}")
            return
        self.pending[self.pool.submit(_call, fn, *fn_args)] = (label, on_done)

    def wait(self, predicate=lambda label: True) -> None:
        """Collect finished jobs until none whose label matches the predicate is pending."""
        while any(predicate(label) for label, _ in self.pending.values()):
            remaining = None
            if self.args.deadline:
                remaining = max(1.0, self.args.deadline + 30 - (time.time() - self.started))
            done, _ = cf.wait(self.pending, timeout=remaining, return_when=cf.FIRST_COMPLETED)
            if not done:
                log("deadline: giving up on the jobs still running")
                for label, _ in self.pending.values():
                    log(f"  unfinished: {label}")
                self.pending.clear()
                return
            for fut in done:
                label, on_done = self.pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # one failed job must not lose the others' records
                    log(f"FAILED {label}: {type(e).__name__}: {e}")
                    continue
                if on_done is not None:
                    on_done(result)
                else:
                    self.add(result)
                log(f"done {label} ({time.time() - self.started:.0f}s)")

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.records.append(r)
            self.done.add(self.key(r))
            if "loss" in r:
                log(f"  {r['method']} {r.get('granularity')} s={r.get('sparsity')} seed={r.get('seed')}: "
                    f"loss {r['loss']:.4f} retrieval {r['retrieval_acc']:.3f}")
        self.save()

    def save(self) -> None:
        (self.results_dir / "quality.json").write_text(json.dumps(self.records, indent=1, default=str))
        if self.screen:
            (self.results_dir / "screen.json").write_text(json.dumps(self.screen, indent=1, default=str))

    def search(self, name, overrides, g, s, seed, heatmaps=False):
        if (f"learned-{name}", g, s, seed) in self.done:
            return
        self.done.add((f"learned-{name}", g, s, seed))
        self.submit(f"search {name} {g} s={s} seed={seed}", "job_search", name, overrides, g, s, seed,
                    str(self.heatmap_dir) if heatmaps else None)

    def learned(self, name, g=None, s=None, seed=None) -> list[dict]:
        return [r for r in self.records if r["method"] == f"learned-{name}" and g in (None, r["granularity"])
                and s in (None, r["sparsity"]) and seed in (None, r.get("seed"))]

    def full(self) -> dict:
        return next(r for r in self.records if r["method"] == "full")

    def run(self) -> None:
        from consa.evaluation.baselines import baseline_names

        a = self.args
        if ("full", None, 0.0, None) not in self.done:
            self.submit("full attention", "job_full")
        names = [] if a.baselines == "none" else \
            [n for n in BASELINES if a.baselines == "all" or n in a.baselines.split(",")]
        first = a.seeds[0]  # the rules and random run once, with the first seed's job (and heatmaps)
        baseline_seeds = sorted({*a.seeds, *(a.screen_seeds if a.screen else [])})
        for seed in baseline_seeds:
            heatmaps = str(self.heatmap_dir) if seed == first else None
            todo: dict = {}  # baseline -> granularity -> the sparsities this seed still has to run
            for g in a.granularities:
                for s in a.sparsities:
                    for n in names:
                        key = (n, g, s, seed if n in SCORED else None)
                        if (ALIASES.get(n, n) in baseline_names(g) and key not in self.done
                                and ((seed in a.seeds or s == a.screen_sparsity) if n in SCORED else seed == first)):
                            todo.setdefault(n, {}).setdefault(g, []).append(s)
                            self.done.add(key)
            # every scored baseline (and heuristic-loss per granularity) is a job of its own: they run side
            # by side on the workers, and one cut by the deadline loses no other's records
            for n in [n for n in todo if n in SCORED]:
                groups = [list(todo[n])] if n in PER_HEAD_SCORES else [[g] for g in todo[n]]
                for gs in groups:
                    def run_scored(result, n=n, gs=gs, seed=seed):
                        for g in gs:
                            for s in todo[n][g]:
                                self.submit(f"baselines {n} {g} s={s} seed={seed}", "job_baselines", g, s, seed, [n],
                                            result["scores"], result["seconds"], heatmaps)

                    self.submit(f"scores {n} {','.join(gs)} seed={seed}", "job_scores", seed, gs, [n],
                                on_done=run_scored)
            cells: dict = {}  # the rules and random need no scores: one job per cell
            for n in [n for n in todo if n not in SCORED]:
                for g, sparsities in todo[n].items():
                    for s in sparsities:
                        cells.setdefault((g, s), []).append(n)
            for (g, s), names_left in cells.items():
                self.submit(f"baselines {g} s={s}", "job_baselines", g, s, seed, names_left, {}, {}, heatmaps)

        default = a.variants[0][0] if a.variants else None
        if a.screen:
            default = self.run_screen()
        variants = dict(a.variants)
        if default is not None:  # the default's cells first: the deadline must not cut them
            settings = variants.pop(default, None) or self.screen["variants"][default]["settings"]
            variants = {default: settings, **variants}
        for name, overrides in variants.items():
            for seed in a.seeds:
                for g in a.granularities:
                    for s in a.sparsities:
                        self.search(name, overrides, g, s, seed, heatmaps=seed == first)
        self.wait()
        if a.pick_default:
            default = self.pick_default(variants) or default
        for r in self.records:
            r.pop("default", None)  # a resumed run may have marked another variant
            if default is not None and r["method"] == f"learned-{default}":
                r["default"] = True
        self.save()
        self.finish(default)

    def pick_default(self, variants: dict) -> str | None:
        winner, info = pick_default(self.records, variants)
        if winner is None:
            log("pick-default: no learned records, the default stays")
            return None
        self.screen.update(all_cells=info["scores"], default=winner, left_out=info["left_out"],
                           incumbent=info["incumbent"])
        for name, v in sorted(info["scores"].items(), key=lambda kv: -kv[1]["score"]):
            log(f"all cells {name}: {v['score']:+.4f} ({v['runs']} runs)")
        if info["left_out"]:
            log(f"pick-default: no records of {', '.join(info['left_out'])} (left out)")
        log(f"default: {winner} (incumbent: {info['incumbent']})")
        return winner

    def run_screen(self) -> str:
        """Screen the variants at one sparsity; then combinations of the knobs that beat `lm`. Returns the winner."""
        a = self.args
        s = a.screen_sparsity
        tried = dict(a.screen)

        def launch(variants):
            for name, overrides in variants.items():
                for g in a.granularities:
                    for seed in a.screen_seeds:
                        self.search(name, overrides, g, s, seed, heatmaps=False)
            self.wait(lambda label: label.startswith("search") or label == "full attention")

        def scores() -> dict:
            full = self.full()
            out = {}
            for name, overrides in tried.items():
                runs = self.learned(name, s=s)
                runs = [r for r in runs if r.get("seed") in a.screen_seeds]
                if len(runs) == len(a.granularities) * len(a.screen_seeds):
                    out[name] = {"score": round(screen_score(runs, full), 4), "settings": overrides,
                                 "runs": [(r["granularity"], r["seed"], r["loss"], r["retrieval_acc"]) for r in runs]}
            return out

        launch(tried)
        self.screen = {"sparsity": s, "seeds": a.screen_seeds, "loss_weight": LOSS_WEIGHT, "variants": scores()}
        self.save()
        ranked = sorted(self.screen["variants"].items(), key=lambda kv: -kv[1]["score"])
        for name, v in ranked:
            log(f"screen {name}: {v['score']:+.4f}")
        if not ranked:
            raise SystemExit("the screen produced no complete variant")
        best, best_v = ranked[0]
        base = self.screen["variants"].get("lm", {"score": float("-inf")})["score"]
        # Knobs that helped on their own (beyond the objective), added to the best variant one at a time.
        helpful = [(n, v) for n, v in ranked[1:] if v["score"] > base and set(v["settings"]) - {"objective"}]
        combos = {}
        for n, v in helpful[:a.combine]:
            merged = {**best_v["settings"], **{k: x for k, x in v["settings"].items() if k != "objective"}}
            if merged != best_v["settings"] and merged not in tried.values():
                combos[f"{best}+{n.removeprefix('lm-')}"] = merged
        if combos and not self.late():
            tried.update(combos)
            launch(combos)
            self.screen["variants"] = scores()
            self.save()
        winner = max(self.screen["variants"].items(), key=lambda kv: kv[1]["score"])[0]
        self.screen["winner"] = winner
        log(f"screen winner: {winner} {self.screen['variants'][winner]}")
        self.save()
        return winner

    def finish(self, default) -> None:
        workers = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:  # past the deadline some may still be computing: they hold the device
            process.terminate()
        write_reports(self.records, default, self.args, self.results_dir, f"{time.time() - self.started:.0f}s in total")
        if self.args.pack and self.heatmap_dir.exists():
            with tarfile.open(self.results_dir / "heatmaps.tar.gz", "w:gz") as tar:
                for png in sorted(self.heatmap_dir.glob("*.png")):
                    tar.add(png, arcname=f"heatmaps/{png.name}")
                    png.unlink()
            self.heatmap_dir.rmdir()
        log(f"done in {time.time() - self.started:.0f}s: {self.results_dir / 'quality.json'}")
