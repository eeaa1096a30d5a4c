"""SearchConfig: every setting of a search, with its default, help text and bounds — in one place.

The `consa search` flags, the API's job fields (service/schemas.py) and the worker's mapping from a
job to a search are all derived from the fields below, so a new setting is one field here (plus the
code that uses it). A field's metadata:

    help        one line, shown by `consa search --help` and in the API's schema
    ge/gt/le    numeric bounds (inclusive / exclusive), checked here, by the CLI and by the API
    choices     the allowed strings (a callable returning them for the registries' names below)
    max_length  the longest string accepted
"""

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields


def setting(default=MISSING, help: str = "", **meta):
    """A SearchConfig field: its default plus the metadata the CLI and the API are built from."""
    return field(default=default, metadata={"help": help, **meta})


# The names each registry implements, declared here so that the settings (and the API's schema) need
# no torch: consa.core.units.GRIDS, consa.search.objectives.OBJECTIVES, consa.evaluation.baselines
# (the scored baselines a warm start ranks by) and consa.model.hybrid_attention check at import that
# they implement exactly these. A new granularity, objective or scored baseline adds its name here.
GRANULARITIES = ("layer", "kv_head")
OBJECTIVES = ("lm", "distill", "distill-hidden", "lm+distill")
WARM_STARTS = ("none", "heuristic-loss", "retrieval-heads", "duo")
BACKENDS = ("auto", "sdpa", "flex", "flash")


def check_registry(kind: str, implemented, declared) -> None:
    """Fail at import when a registry and its declared names (above) disagree."""
    if tuple(sorted(implemented)) != tuple(sorted(declared)):
        raise ImportError(f"consa: the {kind} implemented ({', '.join(sorted(implemented))}) differ from those "
                          f"declared in consa.core.config ({', '.join(sorted(declared))})")


@dataclass
class SearchConfig:
    model: str = setting(help="local model directory (or a hub id where the machine is online)", max_length=1000)
    sparsity: float = setting(help="share of attention units that become sliding-window, in [0, 1]", ge=0.0, le=1.0)
    granularity: str = setting("kv_head", "switch whole layers (layer) or single KV heads (kv_head)",
                               choices=lambda: GRANULARITIES)
    window: int = setting(256, "sliding-window length W in tokens", gt=0, le=1 << 20)
    sink_tokens: int = setting(0, "leading tokens every SWA unit still attends to (0 = plain SWA)", ge=0, le=1 << 16)
    dataset: str | None = setting(None, "training text: a text file, a directory of text files, a .jsonl with a "
                                        "`text` field, or (extra `data`) parquet / arrow / .jsonl.zst files or a "
                                        "saved `datasets` directory", max_length=4000)
    text_field: str | None = setting(None, "the text column of a jsonl / parquet / arrow / `datasets` source "
                                           "(default: text, else content)", max_length=200)
    retrieval_ratio: float | None = setting(
        None, "share of training rows that are synthetic multi-key retrieval documents; default 0.25 where a "
              "document can hold keys far beyond the window (seq_len >= max(4 x window, 512)), else 0 "
              "(the benchmark's best share, bench/RESULTS.md)", ge=0.0, le=1.0)
    seq_len: int = setting(1024, "training sequence length in tokens", ge=8, le=1 << 20)
    batch_size: int = setting(1, "sequences per search step", ge=1, le=4096)
    steps: int = setting(200, "search steps", ge=1, le=1_000_000)
    num_sequences: int | None = setting(None, "rows of training data (default: steps x batch_size, cycled)",
                                        ge=1, le=1 << 24)
    lr: float = setting(0.1, "AdamW learning rate of the gate logits (they start far from the boundary, so it "
                             "is large)", gt=0.0, le=100.0)
    gate_momentum: float = setting(0.5, "AdamW beta1 of the gate logits: little momentum, because with 0.9 the "
                                        "gates overshoot the ramped target and oscillate (tests/test_gates.py)",
                                   ge=0.0, le=0.999)
    lambda_lr: float = setting(20.0, "ascent step on the Lagrange multipliers", ge=0.0, le=1e6)
    penalty_init: float = setting(1000.0, "initial lambda2: a strong quadratic term damps the oscillation a pure "
                                          "integrator (lambda1) causes under Adam (tests/test_gates.py toy)",
                                  ge=0.0, le=1e9)
    warmup_frac: float = setting(0.8, "share of the steps over which the sparsity target ramps up from 0",
                                 ge=0.0, le=1.0)
    init_log_alpha: float = setting(3.0, "initial gate logit (high = every unit starts as full attention)",
                                    ge=-20.0, le=20.0)
    objective: str = setting("lm", "what the gates minimise (see consa.search.objectives)", choices=lambda: OBJECTIVES)
    warm_start: str = setting("none", "start the gate logits from a training-free ranking of the units (a scored "
                                      "baseline of consa.evaluation.baselines), or none", choices=lambda: WARM_STARTS)
    warm_start_spread: float = setting(2.0, "range of the warm-start logits: the best unit starts at init_log_alpha "
                                            "+ spread/2, the worst at init_log_alpha - spread/2", ge=0.0, le=40.0)
    temperature_final: float | None = setting(None, "anneal the Hard-Concrete temperature linearly from 2/3 to this "
                                                    "over the search (lower = harder gates); none keeps 2/3",
                                              gt=0.0, le=10.0)
    retrieval_keys: int = setting(4, "key lines per synthetic retrieval document (more keys = harder rows)",
                                  ge=1, le=64)
    retrieval_queries: int = setting(4, "keys asked for at the end of each synthetic retrieval document, each "
                                        "answer scored (at most retrieval_keys): more answers per row, a steadier "
                                        "retrieval signal for the same compute (4 rather than 1: seed spread 2-20x "
                                        "smaller, bench/RESULTS.md)", ge=1, le=64)
    refine_swaps: int = setting(0, "after the search, at most this many greedy swaps of an FA and an SWA unit at "
                                   "the ranking's boundary, each kept only if it lowers the objective on held-out "
                                   "rows of the training data", ge=0, le=1000)
    seed: int = setting(0, "seed of the data order, the gate noise and the retrieval documents", ge=0, le=2**31 - 1)
    revision: str | None = setting(None, "hub revision (branch, tag or commit)", max_length=200)
    dtype: str = setting("auto", "frozen weights: auto (bfloat16 on a GPU, float32 on CPU; gates, multipliers and "
                                 "loss reductions stay float32 either way), float32 (with bf16 autocast on GPU) or "
                                 "bfloat16", choices=("auto", "float32", "bfloat16"))
    gradient_checkpointing: str = setting(
        "auto", "recompute layers' activations in the backward pass: auto = as few layers as the memory estimate "
                "(consa.search.memory) needs for the step to fit the GPU (none when it fits), on = every layer, off = none",
        choices=("auto", "on", "off"))
    backend: str = setting("auto", "attention kernel for the SWA side", choices=lambda: BACKENDS)
    shard_weights: str = setting("auto", "with several GPUs: each holds 1/N of every decoder layer's frozen weights "
                                         "(FSDP2), for a model larger than one GPU; auto = when the weights would "
                                         "take more than half of one GPU's memory. A sharded search does not "
                                         "evaluate or export in the same run (consa.model.sharding)",
                                 choices=("auto", "on", "off"))
    fused_kernels: str = setting("auto", "the frozen model's RMSNorm, SwiGLU and RoPE: auto = liger-kernel's fused "
                                         "kernels on a GPU where it is installed (the `fused` extra; faster, and they "
                                         "keep less for the backward: consa.search.fused_kernels), off = transformers' own",
                                 choices=("auto", "off"))

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a local path or a hub id")
        check_settings(self)
        if self.retrieval_ratio is None:
            self.retrieval_ratio = 0.25 if self.seq_len >= max(4 * self.window, 512) else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        """From a mapping such as a job's config; keys that are not settings are errors."""
        unknown = set(d) - set(setting_names())
        if unknown:
            raise ValueError(f"unknown search setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def text_source(self):
        """The training text as consa.core.data reads it (None when no dataset is named)."""
        from consa.core.data import TextSource

        return TextSource(self.dataset, self.text_field) if self.dataset is not None else None


@dataclass
class RunOptions:
    """What a run adds to its search (`consa search` flags, a job's fields): the steps after the search."""

    evaluate: bool = setting(False, "score the allocation against full attention and every baseline after the "
                                    "search (evaluation.md / evaluation.json)")
    heatmap: bool = setting(True, "draw heatmap.png, the allocation per layer and KV head (needs matplotlib)")
    ruler: bool = setting(True, "with evaluate: also score RULER's synthetic long-context tasks at the search's "
                                "seq_len, when it is at least 1024 (4 prompts per task for every allocation)")
    duo_steps: int | None = setting(None, "training steps of the duo baseline's gates in the evaluation (default: "
                                          "the search's steps)", ge=1, le=1_000_000)

    @classmethod
    def from_dict(cls, d: dict) -> "RunOptions":
        """From a mapping that may hold more (a job's parameters, parsed flags): its options, None = default."""
        return cls(**{name: d[name] for name in setting_names(cls) if d.get(name) is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        check_settings(self)


def setting_names(settings=SearchConfig) -> list[str]:
    return [f.name for f in fields(settings)]


def setting_fields(settings=SearchConfig):
    """(name, value type, default or MISSING, metadata, optional?) per setting of a settings dataclass."""
    for f in fields(settings):
        optional = type(None) in typing.get_args(f.type)
        kind = next(t for t in typing.get_args(f.type) if t is not type(None)) if optional else f.type
        meta = dict(f.metadata)
        if callable(meta.get("choices")):  # read when asked, so a test can register a toy entry
            meta["choices"] = tuple(meta["choices"]())
        yield f.name, kind, f.default, meta, optional


def check_settings(obj) -> None:
    """Validate every setting of a settings dataclass instance in place."""
    for name, _, _, meta, _ in setting_fields(type(obj)):
        setattr(obj, name, check_setting(name, getattr(obj, name), meta))


def check_setting(name: str, value, meta: dict | None = None, settings=SearchConfig):
    """Validate one setting's value against its metadata (looked up when not given); return it."""
    meta = meta if meta is not None else next(m for n, _, _, m, _ in setting_fields(settings) if n == name)
    if value is None:
        return value
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"unknown {name.replace('_', ' ')} {value!r}: expected one of {', '.join(meta['choices'])}")
    if "max_length" in meta and len(str(value)) > meta["max_length"]:
        raise ValueError(f"{name} must be at most {meta['max_length']} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = [(meta.get("ge"), lambda v, b: v >= b), (meta.get("gt"), lambda v, b: v > b),
                  (meta.get("le"), lambda v, b: v <= b)]
        if not all(ok(value, b) for b, ok in bounds if b is not None) or value != value:  # NaN fails too
            raise ValueError(f"{name} must be in {describe_bounds(meta)}, got {value}")
    return value


def describe_bounds(meta: dict) -> str:
    """e.g. "[0, 1]" or "(0, 1048576]"."""
    num = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    low = f"[{num(meta['ge'])}" if "ge" in meta else f"({num(meta['gt'])}" if "gt" in meta else "(-inf"
    high = f"{num(meta['le'])}]" if "le" in meta else "inf)"
    return f"{low}, {high}"
