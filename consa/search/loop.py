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

from consa.core import data as data_mod
from consa.core.artifacts import GATES, MANIFEST
from consa.core.config import SearchConfig
from consa.core.errors import Cancelled, ConsaError, DataError
from consa.core.manifest import Allocation
from consa.core.units import exact_swa_mask, unit_grid
from consa.model.devices import data_parallel, env_world_size
from consa.model.hybrid_attention import decoder_layers, install, model_shape
from consa.model.loading import free_accelerator_memory
from consa.model.sharding import load_for_search, should_shard
from consa.search import fused_kernels, refine
from consa.search.constraint import AugmentedLagrangian
from consa.search.gates import HardConcreteGate, annealed_beta
from consa.search.memory import checkpoint_plan, enable_checkpointing
from consa.search.objectives import get_objective
from consa.search.warm_start import warm_start_logits


@dataclass
class SearchResult:
    allocation: Allocation
    gate_state: dict  # log_alpha, the multipliers, the optimizer's moments and the step: enough to resume
    history: list = field(default_factory=list)  # one record per logged step

    def save(self, out_dir) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.allocation.save(out_dir / MANIFEST.name)
        save_gate_state(self.gate_state, out_dir / GATES.name)
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
               on_checkpoint=None, checkpoint_every: int = 0, keep_attention: bool = True) -> SearchResult:
    """Learn an allocation. `progress(record)` gets step/loss/sparsity/target/lambdas each logged step;
    `should_cancel()` is checked every step and raises Cancelled when it says so. `dataset`: (N, T)
    token rows, or (rows, labels) from data.build_dataset(with_labels=True). `device` is where a model
    loaded here goes; a given `model` stays where it is. `on_checkpoint(state)` gets the search's state
    every `checkpoint_every` steps; `resume_from` (that state, or a gates.safetensors holding it)
    continues the search exactly where it stopped. `keep_attention=False`: checkpointed layers never
    keep their attention outputs (bench/search_scale.py measures the difference). Under torchrun (or
    consa.search.distributed.helpers) the search runs data-parallel: see consa.search.distributed."""
    search = Search(config, progress=progress, should_cancel=should_cancel, log_every=log_every,
                    on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every)
    search.setup(model, tokenizer, dataset, device, resume_from)
    search.train(keep_attention)
    return search.finalize()


class Search:
    """One search as named steps, read top to bottom: setup -> train (one `step` after another, each
    redone with every layer checkpointed if it runs out of device memory) -> finalize."""

    def __init__(self, config: SearchConfig, *, progress=None, should_cancel=None, log_every: int = 1,
                 on_checkpoint=None, checkpoint_every: int = 0):
        self.config, self.progress, self.should_cancel, self.log_every = config, progress, should_cancel, log_every
        self.on_checkpoint, self.checkpoint_every = on_checkpoint, checkpoint_every
        self.history, self.replanned = [], {}

    # -- setup: frozen model with the hybrid attention, data, gates, multipliers, optimizer ------------
    def setup(self, model=None, tokenizer=None, dataset=None, device="auto", resume_from=None) -> None:
        config = self.config
        self.started = time.time()
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = load_for_search(config, device)
        elif not getattr(model, "consa_sharded", False) \
                and should_shard(config, env_world_size(), next(model.parameters()).device, model):
            raise ConsaError("shard_weights: the other ranks shard this model's weights, so this rank must too: "
                             "let run_search load the model (consa.model.sharding), or set shard_weights=off")
        self.model, self.device = model, next(model.parameters()).device
        self.parallel = data_parallel(self.device)
        self.autocast = self.device.type == "cuda" and config.dtype in ("auto", "bfloat16")
        for p in model.parameters():
            p.requires_grad_(False)
        self.grid = unit_grid(config.granularity, *model_shape(model))
        self.hybrid = install(model, config.window, config.sink_tokens, config.backend)
        self.objective = get_objective(config.objective)
        self.rows, self.labels = self._data(dataset, tokenizer)
        self.gate = HardConcreteGate(self.grid.count, config.init_log_alpha).to(self.device)
        if config.warm_start != "none" and resume_from is None:
            self.gate.log_alpha.data.copy_(warm_start_logits(
                config.warm_start, model, self.grid, self.rows, self.labels, window=config.window,
                sink_tokens=config.sink_tokens, init=config.init_log_alpha, spread=config.warm_start_spread,
                seed=config.seed).to(self.device))
        self.lagrangian = AugmentedLagrangian(config.sparsity, config.steps, config.warmup_frac, config.lambda_lr,
                                              lambda2=config.penalty_init)
        self.optimizer = torch.optim.AdamW(self.gate.parameters(), lr=config.lr, betas=(config.gate_momentum, 0.99),
                                           weight_decay=0.0)
        self.start_step = self._resume(resume_from) if resume_from is not None else 0
        self.order = torch.randperm(self.rows.shape[0], generator=torch.Generator().manual_seed(config.seed))

    def _data(self, dataset, tokenizer):
        config = self.config
        if dataset is None:
            if config.dataset is None:
                raise DataError("a dataset path is required (dataset=...)")
            count = config.num_sequences or config.steps * config.batch_size * self.parallel.world_size \
                + (refine.ROWS if config.refine_swaps else 0)
            dataset = data_mod.build_dataset(tokenizer, config.text_source, config.seq_len, count,
                                             retrieval_ratio=config.retrieval_ratio, seed=config.seed,
                                             num_keys=config.retrieval_keys, queries=config.retrieval_queries,
                                             with_labels=True)
        rows, labels = dataset if isinstance(dataset, tuple) else (dataset, dataset)  # plain rows: every token
        return rows.to(self.device), labels.to(self.device)

    def _resume(self, resume_from) -> int:
        """Load a saved state (gates, multipliers, Adam's moments); return the step it continues from."""
        state = load_gate_state(resume_from) if not isinstance(resume_from, dict) else resume_from
        self.gate.log_alpha.data.copy_(state["log_alpha"].to(self.device))
        self.lagrangian.load_state_dict(state)
        if "exp_avg" in state:  # older gate files hold no moments: Adam restarts
            self.optimizer.state[self.gate.log_alpha] = {"step": torch.tensor(float(state["adam_step"])),
                                                         "exp_avg": state["exp_avg"].to(self.device),
                                                         "exp_avg_sq": state["exp_avg_sq"].to(self.device)}
        step = int(state.get("step", 0))
        if step > 0:  # the temperature of the last step taken: a state saved at the end runs no step,
            # and finalize's gate_prob_full / expected sparsity read it
            self.gate.beta = annealed_beta(step - 1, self.config.steps, self.config.temperature_final)
        return step

    def state(self, step: int) -> dict:
        """What a resumed search needs to continue exactly at `step`."""
        moments = self.optimizer.state.get(self.gate.log_alpha, {})
        state = {"log_alpha": self.gate.log_alpha.detach().cpu().clone(), "step": step,
                 **self.lagrangian.state_dict()}
        if moments:
            state |= {"exp_avg": moments["exp_avg"].cpu().clone(), "exp_avg_sq": moments["exp_avg_sq"].cpu().clone(),
                      "adam_step": float(moments["step"])}
        return state

    # -- train ---------------------------------------------------------------------------------------
    def train(self, keep_attention: bool = True) -> None:
        """Every step from start_step; the fused kernels go on first, since what they keep for the
        backward decides what to checkpoint."""
        config, model = self.config, self.model
        self.fused = fused_kernels.apply(model) if config.fused_kernels == "auto" else []
        self.checkpointed, self.keep_attention, _ = checkpoint_plan(config.gradient_checkpointing, model,
                                                                    config.seq_len, config.batch_size, self.device,
                                                                    keep_attention=keep_attention)
        enable_checkpointing(model, self.checkpointed, self.keep_attention)
        if self.checkpointed:
            model.train()  # checkpointing is only active in train mode; dropout is 0 in these models
        self.gate.train()
        try:
            for step in range(self.start_step, config.steps):
                self.step(step)
        finally:  # also when cancelled or failed: what runs next on this model (evaluation, export) runs transformers' code
            self.hybrid.set_gates(None)
            fused_kernels.remove(model)

    def step(self, step: int) -> None:
        """One step: this rank's rows, forward and backward (redone if out of memory), one all-reduce,
        the gates' and the multipliers' updates, the log record and the checkpoint."""
        config, parallel = self.config, self.parallel
        cancel = self.should_cancel is not None and self.should_cancel()
        if cancel and parallel.world_size == 1:
            raise Cancelled(f"cancelled at step {step}")
        pick = parallel.rows(self.order, step, config.batch_size)
        batch, batch_labels = self.rows[pick], self.labels[pick]  # (B, T)
        self.gate.beta = annealed_beta(step, config.steps, config.temperature_final)
        out_of_memory = False
        try:
            loss_task, s_hat = self.forward_backward(step, batch, batch_labels)
        except torch.OutOfMemoryError:
            if (self.checkpointed, self.keep_attention) == (len(decoder_layers(self.model)), False):
                raise
            out_of_memory = True  # recovered below, once the exception no longer holds the step's tensors
        if out_of_memory:
            self.checkpoint_every_layer(step)
            loss_task, s_hat = self.forward_backward(step, batch, batch_labels)
        # Every rank's own rows -> one averaged gradient, so log_alpha (and all that follows from it:
        # s_hat, the multipliers, the allocation) stays identical on every rank.
        grad, task_value, cancel = parallel.reduce_step(self.gate.log_alpha.grad, loss_task, cancel)
        if cancel:
            raise Cancelled(f"cancelled at step {step}")
        self.gate.log_alpha.grad = grad
        self.optimizer.step()
        self.lagrangian.ascend(s_hat.item(), step)
        if not math.isfinite(task_value):
            raise ConsaError(f"the loss became {task_value} at step {step}: try a lower lr")
        if parallel.is_main and (step % self.log_every == 0 or step == config.steps - 1):
            self.log(step, task_value, s_hat.item())
        # The last step's state too: a job killed later (evaluation, export) resumes past the search.
        if self.on_checkpoint is not None and self.checkpoint_every and parallel.is_main \
                and ((step + 1) % self.checkpoint_every == 0 or step + 1 == config.steps):
            self.on_checkpoint(self.state(step + 1))

    def forward_backward(self, step: int, batch, batch_labels):
        """The step's loss and its gradient on the gates (and the multipliers' penalty); nothing updated."""
        self.hybrid.set_gates(self.grid.to_grid(self.gate(step_noise(self.config.seed, step))))  # (L, K)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss_task = self.objective.loss(self.model, self.hybrid, batch, batch_labels)
        s_hat = self.gate.expected_sparsity()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_task + self.lagrangian.penalty(s_hat, step)).backward()
        return loss_task, s_hat

    def checkpoint_every_layer(self, step: int) -> None:
        """The memory plan comes from an estimate: rather than lose the job, the step is redone (same rows,
        same noise, nothing updated yet) with every layer checkpointed and nothing kept."""
        self.optimizer.zero_grad(set_to_none=True)
        self.hybrid.set_gates(None)
        free_accelerator_memory()
        self.checkpointed, self.keep_attention = len(decoder_layers(self.model)), False
        enable_checkpointing(self.model, self.checkpointed, self.keep_attention)
        self.model.train()
        self.replanned = {"checkpointing_replanned_at_step": step}
        warnings.warn(f"out of device memory at step {step}: checkpointing every layer from now on")

    def log(self, step: int, loss: float, s_hat: float) -> None:
        lagrangian = self.lagrangian
        record = {"step": step + 1, "total_steps": self.config.steps, "loss": round(loss, 6),
                  "sparsity": round(s_hat, 6), "target": round(lagrangian.target_at(step), 6),
                  "lambda1": round(lagrangian.lambda1, 6), "lambda2": round(lagrangian.lambda2, 6),
                  "elapsed_s": round(time.time() - self.started, 3), "start_step": self.start_step}
        self.history.append(record)
        if self.progress is not None:
            self.progress(record)

    # -- finalize: exactly round(s * N) units SWA, chosen by log_alpha (refined by swaps where asked) ----
    def finalize(self) -> SearchResult:
        config, grid = self.config, self.grid
        log_alpha, refined = self.gate.log_alpha.detach().cpu(), {}
        if config.refine_swaps:
            log_alpha, refined = self.refine(log_alpha)
        full = grid.to_grid(~exact_swa_mask(log_alpha, config.sparsity))
        prob_full = grid.to_grid(self.gate.prob_full().detach().cpu())
        allocation = Allocation.from_full_mask(
            full, model=config.model, revision=config.revision, granularity=config.granularity, window=config.window,
            sink_tokens=config.sink_tokens, sparsity_target=float(config.sparsity),
            gate_prob_full=[[round(p, 6) for p in row] for row in prob_full.tolist()],
            method=f"learned-{config.objective}", training=self.training_record(refined))
        gate_state = {**self.state(config.steps), "log_alpha": log_alpha}
        return SearchResult(allocation=allocation, gate_state=gate_state, history=self.history)

    def refine(self, log_alpha):
        """Greedy swaps at the ranking's boundary, judged on rows the search did not train on (where left)."""
        config, order = self.config, self.order
        used = min(len(order), config.steps * config.batch_size * self.parallel.world_size)
        held_out = len(order) - used >= refine.ROWS
        held = order[used:used + refine.ROWS] if held_out else order[:refine.ROWS]
        self.model.eval()
        log_alpha, swaps, before, after = refine.refine_scores(
            self.model, self.hybrid, self.grid, self.objective, log_alpha, config.sparsity, self.rows[held],
            self.labels[held], config.refine_swaps, autocast=self.autocast)
        return log_alpha, {"refine": {"swaps": swaps, "loss_before": round(before, 6), "loss_after": round(after, 6),
                                      "held_out_rows": bool(held_out)}}

    def training_record(self, refined: dict) -> dict:
        """The manifest's `training`: every setting not placed at its top level, and how the search ran."""
        placement = ("model", "sparsity", "granularity", "window", "sink_tokens", "revision")  # top-level fields
        training = {k: v for k, v in self.config.to_dict().items() if k not in placement}
        training.update(seconds=round(time.time() - self.started, 2),
                        final_expected_sparsity=round(self.gate.expected_sparsity().item(), 6),
                        lambda1=self.lagrangian.lambda1, lambda2=self.lagrangian.lambda2, gpus=self.parallel.world_size,
                        activation_checkpointing=self.checkpointed > 0,
                        checkpointed_layers=self.checkpointed, checkpoint_keeps_attention=self.keep_attention,
                        **self.replanned, fused_kernels_used=self.fused,
                        weights_sharded=bool(getattr(self.model, "consa_sharded", False)),
                        weights_dtype=str(next(self.model.parameters()).dtype), **refined)
        return training
