"""Train the second testbed: a Qwen3 with Qwen3-0.6B's attention topology (28 layers x 8 KV heads,
16 query heads), narrow (~18M parameters), at 8k context, on Python source code with consa's own
multi-key retrieval documents mixed in (issue 25).

    PYTHONUNBUFFERED=1 python bench/train_testbed.py --out $OUT --minutes 7.3 2>&1 | tee $OUT/train_log.txt

What it does:
- Text: the `.py` files (< 400 KB) under --data (default: this machine's site-packages), shuffled by
  --seed, tokenized by a process pool ahead of the training loop, packed into --seq-len rows with
  `<|endoftext|>` between files. Held-out text (the validation curve and the final evaluation): this
  machine's Python standard library, the benchmark's eval text.
- Retrieval rows (--retrieval-ratio of the rows): consa's `retrieval_sequences` (4 `KEY_abcd = "12345"`
  lines at random depths of code filler, then `assert KEY_abcd == "` for every key, each followed by its
  value), so the testbed learns exactly the format the quality benchmark asks. The whole row is
  next-token loss (the filler is real code); the answer tokens are also averaged into an extra term
  weighted --answer-weight, since 4 answers in 8k tokens are otherwise a faint signal.
- The model is written out here (a few dozen lines, the names and the arithmetic of transformers'
  Qwen3) so that each of the 28 blocks is compiled once, and saved in transformers' layout: config.json,
  bf16 safetensors in shards under 16 MiB (what the device machine's $OUT carries back) and their index.
  `AutoModelForCausalLM.from_pretrained(out)` loads it (tests/test_train_testbed.py checks the logits).
- Deep narrow models are fragile: linear warm-up, a moderate peak lr, residual projections initialised
  at 0.02 / sqrt(2 x layers), grad clip 1. If the loss has not fallen below --stall-loss by
  --stall-step, training restarts from scratch at half the lr (the issue saw a 28-layer run stay at 5.1).
- The lr schedule follows the time budget (--minutes; warm-up in steps, cosine to 10% of the peak over
  the budget) or a fixed --steps. The final evaluation (full attention, all-SWA at 512 / 1024, and the
  layer rules at 512: loss inside / beyond the window, retrieval accuracy on 100 four-key documents)
  goes to testbed_eval.json with the training curve.
"""

import argparse
import json
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.corpora import TRAIN_TEXT, check_held_out, held_out_text  # noqa: E402
from consa.core import data as data_mod  # noqa: E402

DEFAULT_TOKENIZER = ROOT / "testbeds" / "qwen3-code-28x8"
IGNORE = -100


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (the model, testbed_eval.json)")
    p.add_argument("--data", nargs="+", default=[TRAIN_TEXT],
                   help="training text: directories of .py files (default: site-packages)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: stdlib, without site-packages)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="directory with tokenizer.json")
    # the shape: Qwen3-0.6B's attention topology, narrow everything else
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--ff", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=100000.0)
    # the run
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="rows per step at --seq-len (shorter rows: as many tokens)")
    p.add_argument("--seq-schedule", default="1024:0.15,2048:0.35",
                   help="sequence-length warm-up: LEN:UNTIL,... (UNTIL = share of the budget); --seq-len after")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--minutes", type=float, default=None, help="training time budget (the lr schedule follows it)")
    p.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --minutes")
    p.add_argument("--retrieval-ratio", type=float, default=0.2)
    p.add_argument("--answer-weight", type=float, default=0.25)
    p.add_argument("--stall-step", type=int, default=0, help="0 = never restart")
    p.add_argument("--stall-loss", type=float, default=4.0)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-rows", type=int, default=4)
    p.add_argument("--save-every", type=float, default=180.0, help="seconds between checkpoints into --out")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--eval-docs", type=int, default=100)
    p.add_argument("--eval-windows", default="512,1024")
    p.add_argument("--max-file-bytes", type=int, default=400_000)
    p.add_argument("--tok-workers", type=int, default=max(1, min(10, (os.cpu_count() or 2) - 2)))
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--init-from", default=None, help="start from this saved testbed's weights (a continuation; "
                   "the optimizer starts fresh, with --warmup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    args.eval_data = args.eval_data or held_out_text()
    check_held_out(args.eval_data, *args.data)
    if (args.minutes is None) == (args.steps is None):
        p.error("give exactly one of --minutes and --steps")
    args.seq_schedule = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in args.seq_schedule.split(",") if x]
    return args


# -- the model: transformers' Qwen3, written out ----------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.kv, self.hd = a.heads, a.kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden, a.heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.hidden, a.kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.hidden, a.kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.heads * a.head_dim, a.hidden, bias=False)
        self.q_norm = RMSNorm(a.head_dim)
        self.k_norm = RMSNorm(a.head_dim)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k = q.to(v.dtype), k.to(v.dtype)
        k = k.repeat_interleave(self.h // self.kv, dim=1)  # GQA, as transformers' sdpa path does
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden, a.ff, bias=False)
        self.up_proj = nn.Linear(a.hidden, a.ff, bias=False)
        self.down_proj = nn.Linear(a.ff, a.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, a, vocab: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, a.hidden)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden)


class Qwen3LM(nn.Module):
    """State-dict names are transformers' Qwen3ForCausalLM's (lm_head tied to the embedding)."""

    def __init__(self, a, vocab: int):
        super().__init__()
        self.a = a
        self.model = Body(a, vocab)
        inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.a.layers))
            else:
                nn.init.normal_(p, std=0.02)

    def rope(self, T: int, device):
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def hidden(self, ids, masks=None):
        """Final normed hidden states; masks: one attention mask per layer (None = causal)."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rope(ids.shape[1], ids.device)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, None if masks is None else masks[i])
        return self.model.norm(x)

    def forward(self, ids, masks=None):
        return F.linear(self.hidden(ids, masks), self.model.embed_tokens.weight)


def token_nll(h, weight, targets):
    """Per-token loss of hidden states h (B, T, D) against targets (B, T), fp32; IGNORE -> 0."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none").view(targets.shape)


def hf_config(a, vocab: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.ff, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                       max_position_embeddings=a.seq_len, rope_theta=a.rope_theta, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       use_sliding_window=False, sliding_window=None, attention_bias=False,
                       layer_types=["full_attention"] * a.layers, dtype="bfloat16")


def save_hf(model: Qwen3LM, a, vocab: int, out: Path, shards: int) -> list[Path]:
    """config.json + bf16 safetensors in `shards` pieces + model.safetensors.index.json (transformers' layout)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(a, vocab)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.to_json_file(str(out / "config.json"), use_diff=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    names, groups, size = list(state), [[] for _ in range(shards)], 0
    for name in names:  # in order, cut at equal byte counts
        groups[min(shards - 1, int(size * shards / total))].append(name)
        size += state[name].numel() * state[name].element_size()
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
        files.append(out / fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


# -- data -------------------------------------------------------------------------------------------
_TOK = None


def _tok_init(path: str):
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(path)


def _tok_file(path: str):
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return np.zeros(0, dtype=np.uint16)
    return np.asarray(_TOK.encode(text, add_special_tokens=False).ids + [0], dtype=np.uint16)  # 0 = <|endoftext|>


def py_files(roots, max_bytes: int, seed: int, exclude: str | None) -> list[str]:
    files = []
    for root in roots:
        for p in Path(root).rglob("*.py"):
            try:
                if p.is_file() and 0 < p.stat().st_size < max_bytes:
                    files.append(str(p))
            except OSError:
                continue
    if exclude:  # never train on the held-out text
        ex = str(Path(exclude).resolve())
        files = [f for f in files if not str(Path(f).resolve()).startswith(ex + os.sep)
                 or "site-packages" in f or "dist-packages" in f]
    files.sort()
    random.Random(seed).shuffle(files)
    return files


class TextStream:
    """Packed (seq_len,) rows of tokenized files, read from a process pool that works ahead; the files
    cycle (reshuffled) if the budget outlasts them."""

    def __init__(self, files, tokenizer_json: str, seq_len: int, workers: int, seed: int):
        self.files, self.seq_len, self.seed, self.epoch = files, seq_len, seed, 0
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self.pool = ctx.Pool(workers, initializer=_tok_init, initargs=(tokenizer_json,))
        self.buf = np.zeros(0, dtype=np.uint16)
        self.tokens_read = 0
        self._start()

    def _start(self):
        order = list(self.files)
        if self.epoch:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.it = self.pool.imap(_tok_file, order, chunksize=8)

    def _more(self) -> np.ndarray:
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            log(f"text: epoch {self.epoch} begins ({self.tokens_read / 1e6:.1f}M tokens read)")
            self._start()
            return next(self.it)

    def row(self, n: int | None = None) -> np.ndarray:
        n = n or self.seq_len
        parts, have = [self.buf], len(self.buf)
        while have < n:
            ids = self._more()
            self.tokens_read += len(ids)
            parts.append(ids)
            have += len(ids)
        flat = np.concatenate(parts)
        self.buf = flat[n:]
        return flat[:n]

    def close(self):
        self.pool.terminate()


def retrieval_row(tokenizer, filler, seq_len: int, seed: int):
    """One retrieval row (consa's generator, every key asked) and its labels: the whole row (the
    answers included), the padding after the last answer ignored; and the answer-token mask."""
    rows, answers = data_mod.retrieval_sequences(tokenizer, filler, seq_len, 1, seed=seed, num_keys=4, queries=4)
    row, ans = rows[0], answers[0] != data_mod.IGNORE
    last = int(ans.nonzero().max())
    labels = row.clone()
    labels[last + 1:] = IGNORE
    return row, labels, ans


class Batches:
    def __init__(self, a, tokenizer, stream: TextStream, filler):
        self.a, self.tok, self.stream, self.filler = a, tokenizer, stream, filler
        self.rng = random.Random(a.seed)
        self.n_retrieval = 0

    def next(self, seq: int):
        ids, labels, ans = [], [], []
        for _ in range(max(1, self.a.batch * self.a.seq_len // seq)):  # the same tokens per step at every length
            if self.rng.random() < self.a.retrieval_ratio:
                r, lab, an = retrieval_row(self.tok, self.filler, seq, seed=self.rng.randrange(1 << 30))
                self.n_retrieval += 1
            else:
                r = torch.from_numpy(self.stream.row(seq).astype(np.int64))
                lab, an = r.clone(), torch.zeros_like(r, dtype=torch.bool)
            ids.append(r)
            labels.append(lab)
            ans.append(an)
        return torch.stack(ids), torch.stack(labels), torch.stack(ans)


# -- evaluation -------------------------------------------------------------------------------------
def swa_mask(T: int, window: int, device):
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def layer_masks(rule: str, L: int, T: int, window: int, device):
    """Per-layer masks of a layer rule (SWA layers get the window mask)."""
    swa = {"full": set(), "all_swa": set(range(L)), "interleave_1to1": set(range(0, L, 2)),
           "bottom_half_swa": set(range(L // 2)), "top_half_swa": set(range(L // 2, L))}[rule]
    m = swa_mask(T, window, device)
    return [m if i in swa else None for i in range(L)]


@torch.no_grad()
def evaluate(model, a, rows, docs, device, rules) -> dict:
    """Per (rule, window): loss at positions < W, >= W, >= 1024 on held-out rows; retrieval accuracy
    (teacher-forced: every answer token the argmax) on four-key documents."""
    model.eval()
    T = rows.shape[1]
    out = {}
    doc_rows, spans = [], []
    for doc in docs:
        ans = a._tok(doc.answer, add_special_tokens=False)["input_ids"]
        seq = (doc.input_ids + ans)[:T]
        spans.append((len(doc.input_ids), len(ans)))
        doc_rows.append(seq + [0] * (T - len(seq)))
    doc_rows = torch.tensor(doc_rows)
    for rule, window in rules:
        masks = layer_masks(rule, a.layers, T, window, device)
        if all(m is None for m in masks):
            masks = None
        nll = []
        for i in range(0, rows.shape[0], 4):
            x = rows[i:i + 4].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h = model.hidden(x, masks)
            nll.append(token_nll(h[:, :-1], model.model.embed_tokens.weight, x[:, 1:]).cpu())
        nll = torch.cat(nll)  # (N, T-1): column t = the query at position t (consa's loss_report)
        pos = torch.arange(T - 1)
        hits = []
        for i in range(0, doc_rows.shape[0], 4):
            x = doc_rows[i:i + 4].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = F.linear(model.hidden(x, masks), model.model.embed_tokens.weight)
            pred = logits.argmax(-1).cpu()
            for j, (start, n) in enumerate(spans[i:i + 4]):
                hits.append(bool((pred[j, start - 1:start - 1 + n] == x[j, start:start + n].cpu()).all()))
        out[f"{rule}@{window}"] = {"loss": nll.mean().item(), "loss_pos_lt_window": nll[:, pos < window].mean().item(),
                                   "loss_pos_ge_window": nll[:, pos >= window].mean().item(),
                                   "loss_pos_ge_1024": nll[:, pos >= 1024].mean().item(),
                                   "retrieval_acc": sum(hits) / max(1, len(hits))}
    model.train()
    return out


# -- training ---------------------------------------------------------------------------------------
def make_optimizer(model, a, lr, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def seq_at(a, progress: float) -> int:
    return next((n for n, until in a.seq_schedule if progress < until), a.seq_len)


def lr_at(a, peak, step, progress):
    warm = min(1.0, (step + 1) / a.warmup)
    cos = a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * warm * cos


def train(a, tokenizer, vocab, device, out: Path):
    files = py_files(a.data, a.max_file_bytes, a.seed, exclude=a.eval_data)
    if not files:
        raise SystemExit(f"no .py files under {a.data}")
    tok_json = str(Path(a.tokenizer) / "tokenizer.json")
    stream = TextStream(files, tok_json, a.seq_len, a.tok_workers, a.seed)
    log(f"text: {len(files)} .py files under {', '.join(a.data)}")
    filler = []
    while len(filler) < a.seq_len * 64:  # retrieval filler: code from the same stream
        filler.extend(stream.row().tolist())
    val = data_mod.pack_tokens(tokenizer, data_mod.iter_texts(a.eval_data, seed=0), a.seq_len,
                               max_sequences=max(a.val_rows, a.eval_rows))
    use_compile = a.compile if a.compile is not None else device.type == "cuda"

    peak = a.lr
    started = time.time()
    deadline = started + a.minutes * 60 if a.minutes else None  # the schedule runs from the first step to here
    while True:  # one attempt per peak lr (a stall restarts at half)
        torch.manual_seed(a.seed)
        model = Qwen3LM(a, vocab)
        if a.init_from:
            from safetensors.torch import load_file

            state = {}
            for f in sorted(Path(a.init_from).glob("model*.safetensors")):
                state.update(load_file(str(f)))
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
            log(f"weights from {a.init_from} ({len(state)} tensors)")
        model = model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {a.layers} layers x {a.kv_heads} KV heads ({a.heads} query heads, head_dim {a.head_dim}), "
            f"hidden {a.hidden}, ff {a.ff}, vocab {vocab}: {n_params / 1e6:.2f}M parameters; peak lr {peak}")
        if use_compile:  # one compiled graph shared by the 28 blocks (parameters are inputs)
            for block in model.model.layers:
                block.compile(dynamic=False)
        loss_fn = torch.compile(token_nll, dynamic=False) if use_compile else token_nll
        opt = make_optimizer(model, a, peak, device)
        batches = Batches(a, tokenizer, stream, filler)
        curve, ema, step, t0, tokens, last_save, stalled, cur_seq = [], None, 0, None, 0, time.time(), False, None
        while True:
            if a.steps:
                progress = step / a.steps
            else:
                progress = 0.0 if t0 is None else (time.time() - t0) / max(1e-9, deadline - t0)
            if (a.steps and step >= a.steps) or (not a.steps and progress >= 1.0):
                break
            lr = lr_at(a, peak, step, progress)
            for g in opt.param_groups:
                g["lr"] = lr
            seq = seq_at(a, progress)
            if seq != cur_seq:
                log(f"step {step + 1}: rows of {seq} tokens, {max(1, a.batch * a.seq_len // seq)} per step")
                cur_seq = seq
            ids, labels, ans = batches.next(seq)
            ids, labels, ans = ids.to(device, non_blocking=True), labels.to(device), ans.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h = model.hidden(ids)
            nll = loss_fn(h[:, :-1], model.model.embed_tokens.weight, labels[:, 1:])
            mask = (labels[:, 1:] != IGNORE).float()
            lm = (nll * mask).sum() / mask.sum()
            am = ans[:, 1:].float()
            answer = (nll * am).sum() / am.sum().clamp(min=1)
            loss = lm + a.answer_weight * answer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += ids.numel()
            if t0 is None:  # the first step compiles (it counts in the budget; the tok/s figure leaves it out)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                log(f"first step (compile) done at {t0 - started:.0f}s")
            lm_v = lm.item()
            ema = lm_v if ema is None else 0.95 * ema + 0.05 * lm_v
            row = {"step": step, "tokens": tokens, "seq": seq, "loss": round(lm_v, 4), "loss_ema": round(ema, 4),
                   "lr": round(lr, 7), "seconds": round(time.time() - started, 1)}
            if am.sum() > 0:
                row["answer_loss"] = round(answer.item(), 3)
            if step % a.val_every == 0 or step == 1:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    v = val[:a.val_rows].to(device)
                    vn = token_nll(model.hidden(v)[:, :-1], model.model.embed_tokens.weight, v[:, 1:])
                row["val_loss"] = round(vn.mean().item(), 4)
                row["grad_norm"] = round(gnorm.item(), 3)
                tps = (tokens - ids.numel()) / max(1e-9, time.time() - t0) if step > 1 else 0
                log(f"step {step} loss {lm_v:.4f} (ema {ema:.4f}) val {row['val_loss']:.4f} lr {lr:.2e} "
                    f"gnorm {gnorm.item():.2f} {tps / 1e3:.0f}k tok/s, text {stream.tokens_read / 1e6:.1f}M tokens read, "
                    f"{batches.n_retrieval} retrieval rows")
            curve.append(row)
            if a.stall_step and step == a.stall_step and ema > a.stall_loss:
                log(f"stalled: loss {ema:.3f} > {a.stall_loss} at step {step}; restarting at lr {peak / 2}")
                stalled = True
                break
            if time.time() - last_save > a.save_every:
                save_hf(model, a, vocab, out, a.shards)
                last_save = time.time()
                log(f"checkpoint at step {step}")
        if not stalled:
            break
        peak /= 2
    stream.close()
    return model, curve, val, {"steps": step, "tokens": tokens, "params": n_params, "peak_lr": peak,
                               "train_seconds": round(time.time() - (t0 or started), 1),
                               "retrieval_rows": batches.n_retrieval, "text_tokens_read": stream.tokens_read,
                               "files": len(files)}


def main(argv=None):
    a = parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    a._tok = tokenizer
    vocab = len(tokenizer)
    log(f"device {device}, torch {torch.__version__}, tokenizer {a.tokenizer} ({vocab} tokens)")
    model, curve, val, info = train(a, tokenizer, vocab, device, out)
    files = save_hf(model, a, vocab, out, a.shards)
    log(f"saved {', '.join(f.name for f in files)} ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)")
    # final evaluation: the first rows / documents of the quality benchmark's eval set (seed 0)
    rng = random.Random(0)
    filler = data_mod.filler_token_ids(tokenizer, data_mod.iter_texts(a.eval_data, seed=1),
                                       max_tokens=max(a.seq_len * 8, 65536))
    docs = []
    for _ in range(a.eval_docs):
        q = rng.randrange(4)
        docs.append(data_mod.retrieval_document(tokenizer, filler, a.seq_len, rng, num_keys=4, query_index=q))
    windows = [int(w) for w in a.eval_windows.split(",")]
    rules = [("full", windows[0])] + [("all_swa", w) for w in windows] + \
            [(r, windows[0]) for r in ("interleave_1to1", "bottom_half_swa", "top_half_swa")]
    t = time.time()
    ev = evaluate(model, a, val[:a.eval_rows], docs, device, rules)
    for k, v in ev.items():
        log(f"eval {k}: " + ", ".join(f"{m} {x:.4f}" for m, x in v.items()))
    log(f"evaluation took {time.time() - t:.0f}s")
    record = {**info, "seq_len": a.seq_len, "batch": a.batch, "eval_rows": a.eval_rows, "eval_docs": a.eval_docs,
              "settings": {k: v for k, v in vars(a).items() if not k.startswith("_") and k != "out"},
              "eval": ev, "curve": curve}
    (out / "testbed_eval.json").write_text(json.dumps(record, indent=1) + "\n")
    log("done")
    return record


if __name__ == "__main__":
    main()
