"""Evaluate an allocation under hard gates: held-out loss (split by position), multi-key retrieval,
a needle-at-depth grid, and the KV-cache bytes it needs.

All numbers come back as a plain JSON-able dict. `allocation=None` evaluates the unmodified model.
The data (token rows + retrieval prompts) is built once by `build_eval_set` so that every allocation
of a comparison sees exactly the same tokens.
"""

import inspect
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from consa.core import data as data_mod
from consa.core.errors import Cancelled
from consa.model.hybrid_attention import allocation_applied, model_shape
from consa.runtime.kv_accounting import head_dim_of, kv_bytes


@dataclass
class EvalSet:
    rows: torch.Tensor  # (N, seq_len) held-out token rows for the loss
    docs: list  # RetrievalDoc prompts, each seq_len tokens with its answer
    query_depths: list  # relative depth (0..1) of the queried key in each doc
    seq_len: int
    seed: int
    ruler: list = field(default_factory=list)  # RulerSample prompts (consa.evaluation.ruler), any lengths


def build_eval_set(tokenizer, data, *, seq_len: int, num_sequences: int, retrieval_docs: int, seed: int = 0,
                   num_keys: int = 4, ruler_lengths=(), ruler_samples: int = 4, ruler_tasks=None) -> EvalSet:
    """Held-out rows from `data` (path or an (N, T) tensor) and `retrieval_docs` seeded retrieval prompts
    whose filler comes from the same text. The same seed gives the same prompts. ruler_lengths: also
    `ruler_samples` RULER prompts per task (`ruler_tasks`, default all) at each of these context lengths."""
    if isinstance(data, torch.Tensor):
        rows = data[:num_sequences, :seq_len]
        texts = None
    else:
        rows = data_mod.pack_tokens(tokenizer, data_mod.iter_texts(data, seed=seed), seq_len, max_sequences=num_sequences)
        texts = data
    docs, depths = [], []
    if retrieval_docs:
        if texts is not None:
            filler = data_mod.filler_token_ids(tokenizer, data_mod.iter_texts(texts, seed=seed + 1),
                                               max_tokens=max(seq_len * 8, 65536))
        else:
            filler = rows.flatten().tolist()
        rng = random.Random(seed)
        for _ in range(retrieval_docs):
            q = rng.randrange(num_keys)  # chosen here so we know the queried key's depth
            doc = data_mod.retrieval_document(tokenizer, filler, seq_len, rng, num_keys=num_keys, query_index=q)
            docs.append(doc)
            depths.append(doc.depths[q])
    ruler_prompts = []
    if ruler_lengths:
        from consa.evaluation import ruler

        ruler_prompts = ruler.samples_from(tokenizer, rows if texts is None else texts, ruler_lengths,
                                           tasks=ruler_tasks, samples=ruler_samples, seed=seed)
    return EvalSet(rows=rows, docs=docs, query_depths=depths, seq_len=seq_len, seed=seed, ruler=ruler_prompts)


# -- loss -------------------------------------------------------------------------------------------
def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(rows: torch.Tensor, batch_size: int):
    """Fixed-size batches (the last one padded by repeating rows) so compiled kernels see one shape.
    Yields (batch, number of real rows)."""
    batch_size = min(batch_size, rows.shape[0])
    for i in range(0, rows.shape[0], batch_size):
        batch = rows[i:i + batch_size]
        n = batch.shape[0]
        if n < batch_size:
            batch = torch.cat([batch, batch[-1:].expand(batch_size - n, -1)])
        yield batch, n


@torch.no_grad()
def token_losses(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, T-1) next-token losses; column t is the loss of predicting token t+1 from a query at position t."""
    device = next(model.parameters()).device
    out = []
    for batch, n in _batches(rows.to(device), batch_size):
        with _autocast(device):
            logits = model(input_ids=batch).logits  # (B, T, V)
        for r in range(n):  # one row at a time: a (T, V) fp32 copy, not (B, T, V), for big vocabularies
            out.append(F.cross_entropy(logits[r, :-1].float(), batch[r, 1:], reduction="none").cpu())  # (T-1,)
    return torch.stack(out)


def loss_report(nll: torch.Tensor, window: int | None) -> dict:
    """Mean loss, and split by the query position: SWA changes nothing before position `window`."""
    report = {"loss": nll.mean().item()}
    pos = torch.arange(nll.shape[1])
    if window is not None:
        report["loss_pos_lt_window"] = nll[:, pos < window].mean().item() if window > 0 else None
        report["loss_pos_ge_window"] = nll[:, pos >= window].mean().item() if window < nll.shape[1] else None
    if nll.shape[1] > 1024:
        report["loss_pos_ge_1024"] = nll[:, pos >= 1024].mean().item()
    return report


# -- retrieval --------------------------------------------------------------------------------------
def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _next_token_logits(model, seqs: torch.Tensor, last: torch.Tensor, keep: int) -> torch.Tensor:
    """seqs (B, T) right-padded; last (B, k) positions whose next-token logits we need (all >= T - keep).
    Returns (B, k, V). Right padding is harmless without a mask: causal attention never looks ahead."""
    device = seqs.device
    kwargs = {"logits_to_keep": keep} if _keeps_logits(model) else {}
    with _autocast(device):
        logits = model(input_ids=seqs, **kwargs).logits  # (B, keep or T, V)
    offset = seqs.shape[1] - logits.shape[1]
    idx = (last - offset)[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx).float()


@torch.no_grad()
def retrieval_correct(model, tokenizer, docs: list, batch_size: int = 8, max_new_tokens: int = 8) -> list[bool]:
    """Greedy decode of each doc's value; correct when the decoded text starts with the answer.

    One teacher-forced pass over prompt + answer tokens settles every doc whose greedy path is the
    answer's own tokenization (all argmaxes match) or leaves the answer's text. Only docs whose greedy
    path spells the answer with other tokens are decoded further, step by step.
    """
    device = next(model.parameters()).device
    batch_size = min(batch_size, len(docs))
    answers = [tokenizer(d.answer, add_special_tokens=False)["input_ids"] for d in docs]
    seq_len = max(len(d.input_ids) + len(a) for d, a in zip(docs, answers))
    correct = [False] * len(docs)
    pending = []  # (doc index, generated token ids so far) for the rare non-canonical paths

    for start in range(0, len(docs), batch_size):
        idx = list(range(start, min(start + batch_size, len(docs))))
        idx += [idx[-1]] * (batch_size - len(idx))  # fixed batch shape for compiled kernels
        seqs = torch.zeros(batch_size, seq_len, dtype=torch.long)
        longest = max(len(answers[i]) for i in idx)
        last = torch.zeros(batch_size, longest, dtype=torch.long)
        for b, i in enumerate(idx):
            ids = docs[i].input_ids + answers[i]
            seqs[b, :len(ids)] = torch.tensor(ids)
            p = len(docs[i].input_ids)
            steps = torch.arange(longest).clamp(max=len(answers[i]) - 1)
            last[b] = p - 1 + steps  # position whose prediction is answer token `step`
        keep = int(seq_len - last.min())
        pred = _next_token_logits(model, seqs.to(device), last.to(device), keep).argmax(-1).cpu()  # (B, longest)
        for b, i in enumerate(idx[:min(batch_size, len(docs) - start)]):
            ans = answers[i]
            j = next((t for t in range(len(ans)) if pred[b, t] != ans[t]), len(ans))
            if j == len(ans):
                correct[i] = True
                continue
            generated = ans[:j] + [int(pred[b, j])]
            text = tokenizer.decode(generated)
            if text.startswith(docs[i].answer):
                correct[i] = True
            elif docs[i].answer.startswith(text):
                pending.append((i, generated))

    # Step-by-step greedy decoding for the docs still undecided (usually none).
    width = seq_len + max_new_tokens
    while pending:
        chunk, pending = pending[:batch_size], pending[batch_size:]
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        seqs = torch.zeros(batch_size, width, dtype=torch.long)
        last = torch.zeros(batch_size, 1, dtype=torch.long)
        for b, (i, gen) in enumerate(chunk):
            ids = docs[i].input_ids + gen
            seqs[b, :len(ids)] = torch.tensor(ids)
            last[b, 0] = len(ids) - 1
        nxt = _next_token_logits(model, seqs.to(device), last.to(device), int(width - last.min())).argmax(-1).cpu()
        for b, (i, gen) in enumerate(chunk[:n]):
            gen = gen + [int(nxt[b, 0])]
            text = tokenizer.decode(gen)
            if text.startswith(docs[i].answer):
                correct[i] = True
            elif docs[i].answer.startswith(text) and len(gen) < max_new_tokens:
                pending.append((i, gen))
    return correct


def needle_grid(correct: list[bool], depths: list[float], bins: int = 10) -> dict:
    """Accuracy per depth bin of the queried key (0 = start of the document, 1 = just before the query)."""
    hits, counts = [0] * bins, [0] * bins
    for ok, d in zip(correct, depths):
        b = min(int(d * bins), bins - 1)
        counts[b] += 1
        hits[b] += ok
    return {"depth_bins": [round(b / bins, 4) for b in range(bins + 1)], "count": counts,
            "acc": [h / c if c else None for h, c in zip(hits, counts)]}


def eval_parts(eval_set: EvalSet) -> list[str]:
    """The parts of an eval set that evaluate() scores, in its order: what a caller counts as progress."""
    return ["loss"] + (["retrieval"] if eval_set.docs else []) + (["ruler"] if eval_set.ruler else [])


# -- everything at once -----------------------------------------------------------------------------
def evaluate(model, tokenizer, allocation, *, data, seq_len: int = 4096, num_sequences: int = 16,
             retrieval_docs: int = 100, seed: int = 0, window: int | None = None, batch_size: int = 8,
             depth_bins: int = 10, num_keys: int = 4, kv_dtype_bytes: int = 2, backend: str = "auto",
             should_cancel=None, on_part=None) -> dict:
    """Evaluate `allocation` (None = the unmodified model) with hard gates on the model's device.

    data: a text path, an (N, T) token tensor, or an EvalSet from build_eval_set (then the counts
    and seed given here are ignored). window: used for the position split when allocation is None.
    An EvalSet with RULER prompts adds `ruler` (scores per length and task) and `ruler_average`;
    should_cancel() is asked before each part of the eval set (loss, retrieval, RULER: eval_parts) and
    between RULER's prompts; on_part(part) after each. Leaves the model with all units full attention.
    """
    started = time.time()

    def part(name: str, done: bool) -> None:
        if done and on_part is not None:
            on_part(name)
        if not done and should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before the {name} evaluation")

    eval_set = data if isinstance(data, EvalSet) else build_eval_set(
        tokenizer, data, seq_len=seq_len, num_sequences=num_sequences, retrieval_docs=retrieval_docs,
        seed=seed, num_keys=num_keys)
    window = allocation.window if allocation is not None else window
    with allocation_applied(model, allocation, backend):
        part("loss", False)
        report = loss_report(token_losses(model, eval_set.rows, batch_size), window)
        part("loss", True)
        if eval_set.docs:
            part("retrieval", False)
            correct = retrieval_correct(model, tokenizer, eval_set.docs, batch_size)
            report["retrieval_acc"] = sum(correct) / len(correct)
            report["needle_grid"] = needle_grid(correct, eval_set.query_depths, depth_bins)
            part("retrieval", True)
        else:
            report["retrieval_acc"] = None
        if eval_set.ruler:
            from consa.evaluation import ruler

            part("ruler", False)
            report["ruler"] = ruler.evaluate_model(model, tokenizer, eval_set.ruler, should_cancel)
            report["ruler_average"] = ruler.average(report["ruler"])
            part("ruler", True)
    report.update(kv_bytes(allocation, model_shape(model), eval_set.seq_len, head_dim_of(model), kv_dtype_bytes))
    report.update(seq_len=eval_set.seq_len, num_sequences=int(eval_set.rows.shape[0]), retrieval_docs=len(eval_set.docs),
                  window=window, sparsity=allocation.sparsity_achieved if allocation is not None else 0.0,
                  seed=eval_set.seed, seconds=round(time.time() - started, 3))
    return report

