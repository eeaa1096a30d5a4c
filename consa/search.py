"""The search: learn which units keep full attention under an exact SWA budget.

Recipe: setup (load model, freeze it, install the hybrid attention, build data and gates) ->
train (gates by AdamW, multipliers by ascent) -> finalize (rank gates, exactly round(s*N) SWA).
"""

import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from consa import data as data_mod
from consa.constraint import AugmentedLagrangian
from consa.errors import Cancelled, ConsaError, DataError, ModelLoadError
from consa.gates import HardConcreteGate, exact_swa_mask
from consa.hybrid_attention import BACKENDS, install, model_shape
from consa.manifest import Allocation, check_granularity

OBJECTIVES = ("lm", "distill")


@dataclass
class SearchConfig:
    model: str  # local path (or a hub id where the machine is online)
    sparsity: float  # share of units that become SWA, in [0, 1]
    granularity: str = "kv_head"  # "layer" | "kv_head"
    window: int = 256  # SWA window W in tokens
    sink_tokens: int = 0  # tokens at the start every SWA unit still sees (0 = plain SWA)
    data: str | None = None  # text file, directory of text files, or .jsonl with a `text` field
    retrieval_ratio: float | None = None  # share of training rows that are synthetic multi-key retrieval
    # docs; None = 0.25 where a document can hold keys far beyond the window (seq_len >= max(4W, 512)),
    # else 0. 0.25 is what the benchmark found best for retrieval (bench/RESULTS.md)
    seq_len: int = 1024
    batch_size: int = 1
    steps: int = 200
    lr: float = 0.1  # AdamW on log_alpha: gates start far from the boundary and need a large lr
    lambda_lr: float = 20.0  # ascent step on the Lagrange multipliers
    penalty_init: float = 1000.0  # initial lambda2: a strong quadratic term damps the oscillation
                                  # a pure integrator (lambda1) causes under Adam (tests/test_core.py toy)
    warmup_frac: float = 0.8  # share of steps over which the target ramps from 0
    init_log_alpha: float = 3.0
    objective: str = "lm"  # "lm" (next-token loss) or "distill" (KL to the unmodified model)
    seed: int = 0
    revision: str | None = None
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU) | "float32" | "bfloat16"
    gradient_checkpointing: bool = False
    backend: str = "auto"  # attention backend: auto | sdpa | flex | flash
    num_sequences: int | None = None  # rows of training data (default: steps * batch_size, cycled)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a local path or a hub id")
        if not 0.0 <= float(self.sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        check_granularity(self.granularity)
        if self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}: expected auto, float32 or bfloat16")
        for name in ("seq_len", "batch_size", "steps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retrieval_ratio is None:
            self.retrieval_ratio = 0.25 if self.seq_len >= max(4 * self.window, 512) else 0.0
        if not 0.0 <= self.retrieval_ratio <= 1.0:
            raise ValueError(f"retrieval_ratio must be in [0, 1], got {self.retrieval_ratio}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")
        if self.lr <= 0 or self.lambda_lr < 0 or self.penalty_init < 0:
            raise ValueError("lr must be > 0, lambda_lr and penalty_init >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown search setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class SearchResult:
    allocation: Allocation
    gate_state: dict  # log_alpha (+ lambdas, step) to resume or inspect
    history: list = field(default_factory=list)  # one record per logged step

    def save(self, out_dir) -> Path:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.allocation.save(out_dir / "manifest.json")
        tensors = {"log_alpha": self.gate_state["log_alpha"].detach().cpu().contiguous()}
        meta = {k: str(v) for k, v in self.gate_state.items() if k != "log_alpha"}
        save_file(tensors, str(out_dir / "gates.safetensors"), metadata=meta)
        return out_dir


# -- setup ----------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(model: str, revision: str | None = None, device="cpu", dtype=torch.float32):
    """Load a causal LM and its tokenizer, turning loader failures into a user-facing error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        try:
            lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype, attn_implementation="sdpa")
        except ValueError as e:
            if "attn_implementation" not in str(e) and "does not support" not in str(e):
                raise
            # Older architectures have no SDPA path; load them as they are and let install() say why.
            lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {model!r}: {first}") from None
    tokenizer.model_max_length = int(1e12)  # documents are packed into seq_len rows, never fed whole
    return lm.to(device).eval(), tokenizer


def load_search_model(config: "SearchConfig"):
    """The model and tokenizer as run_search loads them (its device and weight dtype), for callers
    that keep using the model afterwards (the worker evaluates on the same copy)."""
    weights = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    return load_model(config.model, config.revision, pick_device(config.device), weights)


def load_gate_state(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        state = {"log_alpha": fh.get_tensor("log_alpha")}
        meta = fh.metadata() or {}
    for key in ("lambda1", "lambda2"):
        if key in meta:
            state[key] = float(meta[key])
    if "step" in meta:
        state["step"] = int(meta["step"])
    return state


def num_units(granularity: str, num_layers: int, num_kv_heads: int) -> int:
    return num_layers if granularity == "layer" else num_layers * num_kv_heads


def gates_to_grid(z: torch.Tensor, granularity: str, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """Unit values -> (num_layers, num_kv_heads): a layer gate covers all its KV heads."""
    if granularity == "layer":
        return z[:, None].expand(num_layers, num_kv_heads)
    return z.view(num_layers, num_kv_heads)


# -- the loss -------------------------------------------------------------------------------------
def per_row_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values (B, T-1) per predicted token -> mean over labelled tokens of each row, then over rows.

    Averaging per row first gives a retrieval row (a handful of labelled answer tokens) the same
    weight as a text row, so the units that retrieval needs get a signal of their own.
    """
    mask = (labels[:, 1:] != data_mod.IGNORE).float()  # (B, T-1)
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def task_loss(model, hybrid, batch: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Next-token loss of the gated model, or KL to the unmodified model's next-token distribution."""
    if objective == "lm":
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")  # (B, T-1)
        return per_row_mean(nll, labels)
    gates = hybrid.z
    with torch.no_grad():
        hybrid.set_gates(None)  # all full = the unmodified teacher
        teacher = model(input_ids=batch).logits[:, :-1].float()
    hybrid.set_gates(gates)
    student = model(input_ids=batch).logits[:, :-1].float()
    # KL(teacher || student) per predicted token: (B, T-1)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
    return per_row_mean(kl, labels)


# -- the search -----------------------------------------------------------------------------------
def run_search(config: SearchConfig, progress=None, should_cancel=None, resume_from=None,
               model=None, tokenizer=None, dataset=None, log_every: int = 1) -> SearchResult:
    """Learn an allocation. `progress(record)` gets step/loss/sparsity/target/lambdas each logged step;
    `should_cancel()` is checked every step and raises Cancelled when it says so. `dataset`: (N, T)
    token rows, or (rows, labels) from data.build_dataset(with_labels=True)."""
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    autocast = device.type == "cuda" and config.dtype in ("auto", "bfloat16")

    # setup: frozen model with the hybrid attention, data, gates and multipliers
    if model is None:
        model, tokenizer = load_search_model(config)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # the new name from transformers 5.2x on, the old one before
        model.train()  # checkpointing is only active in train mode; dropout is 0 in these models
    num_layers, num_kv_heads = model_shape(model)
    hybrid = install(model, config.window, config.sink_tokens, config.backend)

    if dataset is None:
        if config.data is None:
            raise DataError("a dataset path is required (data=...)")
        dataset = data_mod.build_dataset(tokenizer, config.data, config.seq_len,
                                         config.num_sequences or config.steps * config.batch_size,
                                         retrieval_ratio=config.retrieval_ratio, seed=config.seed, with_labels=True)
    rows, labels = dataset if isinstance(dataset, tuple) else (dataset, dataset)  # plain rows: every token
    rows, labels = rows.to(device), labels.to(device)

    gate = HardConcreteGate(num_units(config.granularity, num_layers, num_kv_heads), config.init_log_alpha).to(device)
    lagrangian = AugmentedLagrangian(config.sparsity, config.steps, config.warmup_frac, config.lambda_lr,
                                     lambda2=config.penalty_init)
    start_step = 0
    if resume_from is not None:
        state = load_gate_state(resume_from) if not isinstance(resume_from, dict) else resume_from
        gate.log_alpha.data.copy_(state["log_alpha"].to(device))
        lagrangian.load_state_dict(state)
        start_step = int(state.get("step", 0))
    # Little first-moment momentum: with beta1=0.9 the gates overshoot the ramped target and
    # oscillate (toy problem in tests/test_core.py: max gap 0.2-0.7 vs <0.05 with these settings).
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, betas=(0.5, 0.99), weight_decay=0.0)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(config.seed))

    # train
    history = []
    gate.train()
    for step in range(start_step, config.steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {step}")
        pick = torch.stack([order[(step * config.batch_size + i) % len(order)] for i in range(config.batch_size)])
        batch, batch_labels = rows[pick], labels[pick]  # (B, T)

        z = gates_to_grid(gate(), config.granularity, num_layers, num_kv_heads)  # (L, K)
        hybrid.set_gates(z)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_task = task_loss(model, hybrid, batch, batch_labels, config.objective)
        s_hat = gate.expected_sparsity()
        loss = loss_task + lagrangian.penalty(s_hat, step)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lagrangian.ascend(s_hat.item(), step)

        if not math.isfinite(loss_task.item()):
            raise ConsaError(f"the loss became {loss_task.item()} at step {step}: try a lower lr")
        if step % log_every == 0 or step == config.steps - 1:
            record = {"step": step + 1, "total_steps": config.steps, "loss": round(loss_task.item(), 6),
                      "sparsity": round(s_hat.item(), 6), "target": round(lagrangian.target_at(step), 6),
                      "lambda1": round(lagrangian.lambda1, 6), "lambda2": round(lagrangian.lambda2, 6),
                      "elapsed_s": round(time.time() - started, 3)}
            history.append(record)
            if progress is not None:
                progress(record)
    hybrid.set_gates(None)

    # finalize: exactly round(s * N) units SWA, chosen by log_alpha
    log_alpha = gate.log_alpha.detach().cpu()
    swa_units = exact_swa_mask(log_alpha, config.sparsity)
    full = gates_to_grid(~swa_units, config.granularity, num_layers, num_kv_heads)
    prob_full = gates_to_grid(gate.prob_full().detach().cpu(), config.granularity, num_layers, num_kv_heads)
    training = {k: v for k, v in asdict(config).items() if k not in ("model", "sparsity", "granularity", "window",
                                                                      "sink_tokens", "revision")}
    training.update(seconds=round(time.time() - started, 2), final_expected_sparsity=round(gate.expected_sparsity().item(), 6),
                    lambda1=lagrangian.lambda1, lambda2=lagrangian.lambda2)
    allocation = Allocation.from_full_mask(
        full, model=config.model, revision=config.revision, granularity=config.granularity, window=config.window,
        sink_tokens=config.sink_tokens, sparsity_target=float(config.sparsity),
        gate_prob_full=[[round(p, 6) for p in row] for row in prob_full.tolist()],
        method=f"learned-{config.objective}", training=training)
    gate_state = {"log_alpha": log_alpha, "step": config.steps, **lagrangian.state_dict()}
    return SearchResult(allocation=allocation, gate_state=gate_state, history=history)
