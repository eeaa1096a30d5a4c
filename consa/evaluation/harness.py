"""consa's evaluation rows as an lm-evaluation-harness task, and the numbers lm-eval will print for them.

`write_lm_eval_task(tokenizer, rows, out_dir)` writes a folder lm-eval reads with `--include_path`:
the rows as text (rows.jsonl), a `loglikelihood_rolling` task over them (consa_rows.yaml, the same
kind of task as lm-eval's wikitext) and the few functions it names (consa_rows_utils.py: loads the
rows next to itself, so the folder can be moved to another machine). Nothing is downloaded.

    lm_eval --model hf --model_args pretrained=EXPORT[,trust_remote_code=True] \\
            --include_path OUT --tasks consa_rows --batch_size 1

What each number is (ll = a row's summed log-likelihood, as lm-eval's rolling loglikelihood computes it):
- token_loss = -Σll / Σtokens: the mean next-token NLL in nats, the quantity of consa's `loss`, and
  token_perplexity = exp(token_loss). The two are added by this task; lm-eval has no token metric.
- word_perplexity = exp(-Σll / Σwords) with words = len(re.split(r"\\s+", text)), byte_perplexity =
  exp(-Σll / Σbytes) (UTF-8 bytes) and bits_per_byte = -Σll / Σbytes / ln 2: lm-eval's own metrics
  of a rolling task, normalised by words or bytes, so they compare across tokenizers but not with
  consa's per-token loss.

Why lm-eval's token_loss is not `consa eval`'s `loss` to the digit: consa scores tokens 1..T-1 of a
row with token 0 as the first context; lm-eval's rolling loglikelihood puts its prefix token (BOS,
else EOS) before the text and scores all T tokens (lm-eval's requests are strings, and a context
that ends in whitespace, as code's first tokens often do, cannot be handed to it). So
`lm_eval_reference` computes, with consa's model and allocation, exactly what lm-eval computes:
the same rows, re-encoded as lm-eval encodes them, after the same prefix token, in one window.
Those are the numbers `consa eval --lm-eval-task-dir` prints next to its own; lm-eval's run of the
export gives them within float error (fp32 on CPU; pass `dtype=float32` in --model_args elsewhere).
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

TASK = "consa_rows"
ROWS_FILE = "rows.jsonl"
UTILS_FILE = f"{TASK}_utils.py"

_UTILS = '''"""Written by consa (consa.evaluation.harness): the functions consa_rows.yaml names."""

import json
import math
import re
from pathlib import Path

import datasets


def load_rows(**kwargs):
    rows = [json.loads(line) for line in (Path(__file__).parent / "rows.jsonl").read_text().splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def doc_to_target(doc):
    return doc["text"]


def process_results(doc, results):
    (ll,) = results
    text = doc["text"]
    words, nbytes = len(re.split(r"\\s+", text)), len(text.encode("utf-8"))
    return {"token_loss": (ll, doc["tokens"]), "token_perplexity": (ll, doc["tokens"]),
            "word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes)}


def token_loss(items):
    ll, tokens = zip(*items)
    return -sum(ll) / sum(tokens)
'''

_YAML = f"""# Written by consa (consa.evaluation.harness): consa's evaluation rows, scored as lm-eval scores wikitext.
task: {TASK}
dataset_path: ""
custom_dataset: !function {UTILS_FILE[:-3]}.load_rows
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function {UTILS_FILE[:-3]}.doc_to_target
process_results: !function {UTILS_FILE[:-3]}.process_results
metric_list:
  - metric: token_loss
    aggregation: !function {UTILS_FILE[:-3]}.token_loss
    higher_is_better: false
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval's HF model puts before a rolling text: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def lm_eval_tokens(tokenizer, text: str) -> list[int]:
    """The tokens lm-eval's HF model scores for `text` (its tok_encode with default settings: the
    tokenizer's own special tokens, none where the text already starts with the prefix token)."""
    prefix = tokenizer.decode(prefix_token_id(tokenizer))
    special = {"add_special_tokens": False} if prefix and text.startswith(prefix) else {}
    return tokenizer.encode(text, **special)


def write_lm_eval_task(tokenizer, rows: torch.Tensor, out_dir) -> dict:
    """Write rows (N, T) as the lm-eval task folder `out_dir`; returns its docs and paths.

    Each doc is {"text", "tokens"}: the row decoded, and how many tokens lm-eval will score for it.
    `retokenized` counts rows whose text lm-eval encodes into other tokens than consa's row (BPE
    round trips are exact for almost every row; lm_eval_reference scores what lm-eval will see).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, changed = [], 0
    for row in rows.tolist():
        text = tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ids = lm_eval_tokens(tokenizer, text)
        changed += ids != row
        docs.append({"text": text, "tokens": len(ids)})
    (out / ROWS_FILE).write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"{TASK}.yaml").write_text(_YAML)
    (out / UTILS_FILE).write_text(_UTILS)
    return {"task": TASK, "include_path": str(out.resolve()), "rows": len(docs), "retokenized": changed,
            "docs": docs}


def load_docs(task_dir) -> list[dict]:
    path = Path(task_dir) / ROWS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _max_length(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return None


@torch.no_grad()
def rolling_loglikelihoods(model, tokenizer, texts: list[str]) -> list[tuple[float, int]]:
    """(summed log-likelihood, tokens scored) of each text as lm-eval's loglikelihood_rolling scores
    it with an HF model: prefix token + the text's tokens, every text token scored, one window."""
    device = next(model.parameters()).device
    prefix = prefix_token_id(tokenizer)
    limit = _max_length(model)
    out = []
    for text in texts:
        ids = lm_eval_tokens(tokenizer, text)
        if limit is not None and len(ids) > limit:
            raise ValueError(f"a row of {len(ids)} tokens is longer than the model's {limit} positions: lm-eval "
                             "would score it in several windows; evaluate shorter rows (--seq-len)")
        inp = torch.tensor([[prefix] + ids[:-1]], device=device)
        logits = model(input_ids=inp).logits[0].float()
        nll = F.cross_entropy(logits, torch.tensor(ids, device=device), reduction="sum")
        out.append((-nll.item(), len(ids)))
    return out


def aggregate(docs: list[dict], lls: list[tuple[float, int]]) -> dict:
    """lm-eval's aggregations of the task's metrics (weighted_perplexity, bits_per_byte, token_loss)."""
    ll = sum(x for x, _ in lls)
    tokens = sum(n for _, n in lls)
    words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
    nbytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    return {"token_loss": -ll / tokens, "token_perplexity": math.exp(-ll / tokens),
            "word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2)}


def lm_eval_reference(model, tokenizer, allocation, docs: list[dict], backend: str = "auto") -> dict:
    """The numbers lm-eval prints for the task, computed by consa on `model` under `allocation`
    (hard gates; None = the unmodified model). Leaves every unit full attention."""
    from consa.model.hybrid_attention import allocation_applied

    with allocation_applied(model, allocation, backend):
        lls = rolling_loglikelihoods(model, tokenizer, [d["text"] for d in docs])
    return aggregate(docs, lls)


def lm_eval_command(task_dir, pretrained: str = "EXPORT_DIR", remote_code: bool = False) -> str:
    args = f"pretrained={pretrained}" + (",trust_remote_code=True" if remote_code else "") + ",dtype=float32"
    return f"lm_eval --model hf --model_args {args} --include_path {task_dir} --tasks {TASK} --batch_size 1"
