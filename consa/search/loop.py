"""The search: learn which units keep full attention under an exact SWA budget.

Recipe: setup (load model, freeze it, install the hybrid attention, build data and gates) ->
train (gates by AdamW, multipliers by ascent) -> finalize (rank gates, exactly round(s*N) SWA).
"""

import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consa import data as data_mod
from consa.config import SearchConfig
from consa.constraint import AugmentedLagrangian
from consa.distributed import data_parallel, env_world_size
from consa.errors import Cancelled, ConsaError, DataError
from consa import fused_kernels, refine
from consa.gates import HardConcreteGate, annealed_beta, exact_swa_mask
from consa.hybrid_attention import install, model_shape
from consa.loading import free_accelerator_memory, load_for_search
from consa.memory import checkpoint_plan, decoder_layers, enable_checkpointing
from consa.manifest import Allocation
from consa.objectives import get_objective
from consa.sharding import should_shard
from consa.units import unit_grid
from consa.warm_start import warm_start_logits


@dataclass
class SearchResult:
    allocation: Allocation
    gate_state: dict  # log_alpha, the multipliers, the optimizer's moments and the step: enough to resume
    history: list = field(default_factory=list)  # one record per logged step

    def save(self, out_dir) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.allocation.save(out_dir / "manifest.json")
        save_gate_state(self.gate_state, out_dir / "gates.safetensors")
        return out_dir


# -- the search's state: what a resumed search needs to continue exactly -----------------------------
def save_gate_state(state: dict, path) -> Path:
    """Tensors as safetensors tensors, numbers in its metadata. Atomic and durable (a temporary file,
    fsync, rename): a process killed at any moment leaves the previous file or the new one."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: json.dumps(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load_gate_state(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
        state |= {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
    return state


def step_noise(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s gate noise: a function of the seed and the step only, so a
    resumed search (or another rank) draws exactly what the uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# -- the search -----------------------------------------------------------------------------------
def run_search(config: SearchConfig, progress=None, should_cancel=None, resume_from=None,
               model=None, tokenizer=None, dataset=None, log_every: int = 1, device="auto",
               on_checkpoint=None, checkpoint_every: int = 0) -> SearchResult:
    """Learn an allocation. `progress(record)` gets step/loss/sparsity/target/lambdas each logged step;
    `should_cancel()` is checked every step and raises Cancelled when it says so. `dataset`: (N, T)
    token rows, or (rows, labels) from data.build_dataset(with_labels=True). `device` is where a model
    loaded here goes; a given `model` stays where it is. `on_checkpoint(state)` gets the search's state
    every `checkpoint_every` steps; `resume_from` (that state, or a gates.safetensors holding it)
    continues the search exactly where it stopped. Under torchrun (or consa.distributed.helpers)
    the search runs data-parallel: see consa.distributed."""
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    # setup: frozen model with the hybrid attention, data, gates and multipliers
    if model is None:
        model, tokenizer = load_for_search(config, device)
    elif not getattr(model, "consa_sharded", False) \
            and should_shard(config, env_world_size(), next(model.parameters()).device, model):
        raise ConsaError("shard_weights: the other ranks shard this model's weights, so this rank must too: let "
                         "run_search load the model (consa.sharding), or set shard_weights=off")
    device = next(model.parameters()).device
    parallel = data_parallel(device)
    autocast = device.type == "cuda" and config.dtype in ("auto", "bfloat16")
    for p in model.parameters():
        p.requires_grad_(False)
    grid = unit_grid(config.granularity, *model_shape(model))
    hybrid = install(model, config.window, config.sink_tokens, config.backend)
    objective = get_objective(config.objective)

    if dataset is None:
        if config.dataset is None:
            raise DataError("a dataset path is required (dataset=...)")
        dataset = data_mod.build_dataset(tokenizer, config.text_source, config.seq_len,
                                         config.num_sequences or config.steps * config.batch_size * parallel.world_size
                                         + (refine.ROWS if config.refine_swaps else 0),
                                         retrieval_ratio=config.retrieval_ratio, seed=config.seed,
                                         num_keys=config.retrieval_keys, queries=config.retrieval_queries,
                                         with_labels=True)
    rows, labels = dataset if isinstance(dataset, tuple) else (dataset, dataset)  # plain rows: every token
    rows, labels = rows.to(device), labels.to(device)

    gate = HardConcreteGate(grid.count, config.init_log_alpha).to(device)
    if config.warm_start != "none" and resume_from is None:
        gate.log_alpha.data.copy_(warm_start_logits(
            config.warm_start, model, grid, rows, labels, window=config.window, sink_tokens=config.sink_tokens,
            init=config.init_log_alpha, spread=config.warm_start_spread).to(device))
    lagrangian = AugmentedLagrangian(config.sparsity, config.steps, config.warmup_frac, config.lambda_lr,
                                     lambda2=config.penalty_init)
    start_step = 0
    if resume_from is not None:
        state = load_gate_state(resume_from) if not isinstance(resume_from, dict) else resume_from
        gate.log_alpha.data.copy_(state["log_alpha"].to(device))
        lagrangian.load_state_dict(state)
        start_step = int(state.get("step", 0))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, betas=(config.gate_momentum, 0.99),
                                  weight_decay=0.0)
    if resume_from is not None and "exp_avg" in state:  # older gate files hold no moments: Adam restarts
        optimizer.state[gate.log_alpha] = {"step": torch.tensor(float(state["adam_step"])),
                                           "exp_avg": state["exp_avg"].to(device),
                                           "exp_avg_sq": state["exp_avg_sq"].to(device)}

    def search_state(step: int) -> dict:
        moments = optimizer.state.get(gate.log_alpha, {})
        state = {"log_alpha": gate.log_alpha.detach().cpu().clone(), "step": step, **lagrangian.state_dict()}
        if moments:
            state |= {"exp_avg": moments["exp_avg"].cpu().clone(), "exp_avg_sq": moments["exp_avg_sq"].cpu().clone(),
                      "adam_step": float(moments["step"])}
        return state
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(config.seed))

    def forward_backward(step: int, batch, batch_labels):
        """The step's loss and its gradient on the gates (and the multipliers' penalty); nothing updated."""
        hybrid.set_gates(grid.to_grid(gate(step_noise(config.seed, step))))  # (L, K)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_task = objective.loss(model, hybrid, batch, batch_labels)
        s_hat = gate.expected_sparsity()
        optimizer.zero_grad(set_to_none=True)
        (loss_task + lagrangian.penalty(s_hat, step)).backward()
        return loss_task, s_hat

    def train_steps():
        nonlocal checkpointed, keep_attention, replanned
        for step in range(start_step, config.steps):
            cancel = should_cancel is not None and should_cancel()
            if cancel and parallel.world_size == 1:
                raise Cancelled(f"cancelled at step {step}")
            pick = parallel.rows(order, step, config.batch_size)
            batch, batch_labels = rows[pick], labels[pick]  # (B, T)

            gate.beta = annealed_beta(step, config.steps, config.temperature_final)
            out_of_memory = False
            try:
                loss_task, s_hat = forward_backward(step, batch, batch_labels)
            except torch.OutOfMemoryError:
                if (checkpointed, keep_attention) == (len(decoder_layers(model)), False):
                    raise
                out_of_memory = True  # recovered below, once the exception no longer holds the step's tensors
            if out_of_memory:
                # The memory plan comes from an estimate: rather than lose the job, redo the step (same rows,
                # same noise, nothing updated yet) with every layer checkpointed and nothing kept.
                optimizer.zero_grad(set_to_none=True)
                hybrid.set_gates(None)
                free_accelerator_memory()
                checkpointed, keep_attention = len(decoder_layers(model)), False
                enable_checkpointing(model, checkpointed, keep_attention)
                model.train()
                replanned = {"checkpointing_replanned_at_step": step}
                warnings.warn(f"out of device memory at step {step}: checkpointing every layer from now on")
                loss_task, s_hat = forward_backward(step, batch, batch_labels)
            # Every rank's own rows -> one averaged gradient, so log_alpha (and all that follows from it:
            # s_hat, the multipliers, the allocation) stays identical on every rank.
            grad, task_value, cancel = parallel.reduce_step(gate.log_alpha.grad, loss_task, cancel)
            if cancel:
                raise Cancelled(f"cancelled at step {step}")
            gate.log_alpha.grad = grad
            optimizer.step()
            lagrangian.ascend(s_hat.item(), step)

            if not math.isfinite(task_value):
                raise ConsaError(f"the loss became {task_value} at step {step}: try a lower lr")
            if parallel.is_main and (step % log_every == 0 or step == config.steps - 1):
                record = {"step": step + 1, "total_steps": config.steps, "loss": round(task_value, 6),
                          "sparsity": round(s_hat.item(), 6), "target": round(lagrangian.target_at(step), 6),
                          "lambda1": round(lagrangian.lambda1, 6), "lambda2": round(lagrangian.lambda2, 6),
                          "elapsed_s": round(time.time() - started, 3)}
                history.append(record)
                if progress is not None:
                    progress(record)
            # The last step's state too: a job killed later (evaluation, export) resumes past the search.
            if on_checkpoint is not None and checkpoint_every and parallel.is_main \
                    and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
                on_checkpoint(search_state(step + 1))

    # train: the fused kernels first, since what they keep for the backward decides what to checkpoint
    fused = fused_kernels.apply(model) if config.fused_kernels == "auto" else []
    checkpointed, keep_attention, _ = checkpoint_plan(config.gradient_checkpointing, model, config.seq_len,
                                                      config.batch_size, device)
    enable_checkpointing(model, checkpointed, keep_attention)
    if checkpointed:
        model.train()  # checkpointing is only active in train mode; dropout is 0 in these models
    history, replanned = [], {}
    gate.train()
    try:
        train_steps()
    finally:  # also when cancelled or failed: what runs next on this model (evaluation, export) runs transformers' code
        hybrid.set_gates(None)
        fused_kernels.remove(model)

    # finalize: exactly round(s * N) units SWA, chosen by log_alpha (refined by swaps where asked)
    log_alpha = gate.log_alpha.detach().cpu()
    refined = {}
    if config.refine_swaps:
        used = min(len(order), config.steps * config.batch_size * parallel.world_size)
        held = order[used:used + refine.ROWS] if len(order) - used >= refine.ROWS else order[:refine.ROWS]
        model.eval()
        log_alpha, swaps, before, after = refine.refine_scores(
            model, hybrid, grid, objective, log_alpha, config.sparsity, rows[held], labels[held],
            config.refine_swaps, autocast=autocast)
        refined = {"refine": {"swaps": swaps, "loss_before": round(before, 6), "loss_after": round(after, 6),
                              "held_out_rows": bool(len(order) - used >= refine.ROWS)}}
    full = grid.to_grid(~exact_swa_mask(log_alpha, config.sparsity))
    prob_full = grid.to_grid(gate.prob_full().detach().cpu())
    placement = ("model", "sparsity", "granularity", "window", "sink_tokens", "revision")  # top-level manifest fields
    training = {k: v for k, v in config.to_dict().items() if k not in placement}
    training.update(seconds=round(time.time() - started, 2), final_expected_sparsity=round(gate.expected_sparsity().item(), 6),
                    lambda1=lagrangian.lambda1, lambda2=lagrangian.lambda2, gpus=parallel.world_size,
                    activation_checkpointing=checkpointed > 0,
                    checkpointed_layers=checkpointed, checkpoint_keeps_attention=keep_attention, **replanned,
                    fused_kernels_used=fused, weights_sharded=bool(getattr(model, "consa_sharded", False)),
                    weights_dtype=str(next(model.parameters()).dtype),
                    **refined)
    allocation = Allocation.from_full_mask(
        full, model=config.model, revision=config.revision, granularity=config.granularity, window=config.window,
        sink_tokens=config.sink_tokens, sparsity_target=float(config.sparsity),
        gate_prob_full=[[round(p, 6) for p in row] for row in prob_full.tolist()],
        method=f"learned-{config.objective}", training=training)
    gate_state = {**search_state(config.steps), "log_alpha": log_alpha}
    return SearchResult(allocation=allocation, gate_state=gate_state, history=history)
