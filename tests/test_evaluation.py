import torch

import tiny
from consa.evaluation.baselines import build_baseline
from consa.evaluation.metrics import build_eval_set, evaluate, retrieval_correct
from consa.runtime.kv_accounting import kv_bytes
from consa.core.manifest import Allocation


def _all_full(layers=4, heads=2, window=16):
    return Allocation.from_full_mask(torch.ones(layers, heads, dtype=torch.bool), model="tiny", granularity="kv_head",
                                     window=window, method="full")


def test_all_full_allocation_equals_the_models_own_loss(text_dir, tokenizer):
    model = tiny.build_model()
    eval_set = build_eval_set(tokenizer, text_dir, seq_len=96, num_sequences=5, retrieval_docs=0, seed=0)
    with torch.no_grad():  # the unmodified model, before consa touches it
        own = torch.stack([model(input_ids=r[None], labels=r[None]).loss for r in eval_set.rows]).mean().item()
    plain = evaluate(model, tokenizer, None, data=eval_set, window=16, batch_size=2)
    full = evaluate(model, tokenizer, _all_full(), data=eval_set, batch_size=2)
    assert abs(plain["loss"] - own) < 1e-5
    assert abs(full["loss"] - own) < 1e-5
    assert full["kv_bytes_ratio"] == 1.0 and full["retrieval_acc"] is None
    # the position split covers every token: its weighted mean is the loss
    n_lt, n_ge = 16, 95 - 16
    assert abs((full["loss_pos_lt_window"] * n_lt + full["loss_pos_ge_window"] * n_ge) / 95 - own) < 1e-5


def test_swa_changes_only_positions_beyond_the_window(text_dir, tokenizer):
    model = tiny.build_model()
    eval_set = build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=3, retrieval_docs=2, seed=0)
    full = evaluate(model, tokenizer, None, data=eval_set, window=16)
    swa = evaluate(model, tokenizer, build_baseline("bottom", (4, 2), 1.0, "layer", 16), data=eval_set)
    assert abs(swa["loss_pos_lt_window"] - full["loss_pos_lt_window"]) < 1e-5
    assert abs(swa["loss_pos_ge_window"] - full["loss_pos_ge_window"]) > 1e-4
    assert set(swa) >= {"loss", "loss_pos_lt_window", "loss_pos_ge_window", "retrieval_acc", "needle_grid",
                        "kv_bytes", "kv_bytes_ratio"}
    assert sum(swa["needle_grid"]["count"]) == 2
    assert model.consa_hybrid.z is None  # evaluation leaves the model all-full


def test_retrieval_documents_are_deterministic_per_seed(text_dir, tokenizer):
    a = build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=1, retrieval_docs=4, seed=7)
    b = build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=1, retrieval_docs=4, seed=7)
    c = build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=1, retrieval_docs=4, seed=8)
    assert [d.input_ids for d in a.docs] == [d.input_ids for d in b.docs]
    assert [d.answer for d in a.docs] == [d.answer for d in b.docs] and a.query_depths == b.query_depths
    assert [d.input_ids for d in a.docs] != [d.input_ids for d in c.docs]
    for d in a.docs:  # prompt + answer is exactly the context length asked for
        assert len(d.input_ids) + len(tokenizer(d.answer, add_special_tokens=False)["input_ids"]) == 160


class _Oracle(torch.nn.Module):
    """Predicts a fixed continuation: the next token of `script` (answers) or always `wrong`."""

    def __init__(self, vocab, docs, tokenizer, right=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.right = vocab, right
        self.prompts = {tuple(d.input_ids): tokenizer(d.answer, add_special_tokens=False)["input_ids"] for d in docs}

    def forward(self, input_ids, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            for prompt, ans in self.prompts.items():
                if tuple(row[:len(prompt)]) == prompt:
                    for t, tok in enumerate(ans):
                        logits[b, len(prompt) - 1 + t, tok if self.right else 1] = 1.0
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def test_retrieval_scores_greedy_decoding(text_dir, tokenizer):
    docs = build_eval_set(tokenizer, text_dir, seq_len=160, num_sequences=1, retrieval_docs=3, seed=0).docs
    assert retrieval_correct(_Oracle(300, docs, tokenizer), tokenizer, docs, batch_size=2) == [True] * 3
    assert retrieval_correct(_Oracle(300, docs, tokenizer, right=False), tokenizer, docs, batch_size=2) == [False] * 3


def test_kv_bytes_follow_the_formula():
    a = build_baseline("bottom", (4, 2), 0.5, "layer", window=100)
    a.sink_tokens = 4
    kv = kv_bytes(a, (4, 2), context=1000, head_dim=8, element_size=2)
    per_token = 2 * 8 * 2
    assert kv["kv_bytes"] == (4 * 1000 + 4 * 104) * per_token
    assert kv["kv_bytes_full"] == 8 * 1000 * per_token
    assert kv["kv_bytes_ratio"] == (4 * 1000 + 4 * 104) / 8000
    short = kv_bytes(a, (4, 2), context=50, head_dim=8)  # a window longer than the sequence saves nothing
    assert short["kv_bytes_ratio"] == 1.0
