"""RULER's synthetic long-context tasks, generated from the user's own text, scored by greedy decoding.

The tasks follow RULER's definitions (NVIDIA/RULER, scripts/data/synthetic and scripts/synthetic.yaml:
templates, answer prefixes, needle formats, counts, tokens to generate and the string-match metric),
with two substitutions so that nothing is downloaded:
- where RULER's haystack is Paul Graham's essays ("essay"), it is the user's text (its words, with
  whitespace collapsed as RULER does; needles go in at sentence boundaries, or every 40 words of a
  text with few sentence ends, such as code);
- where RULER draws words from the `wonderwords` lists (the needles' word keys, common-words
  extraction), it draws them from the vocabulary of the user's text (random strings if that is short).
RULER's "noise" and "needle" haystacks and the frequent-words task are synthetic already and kept.
lm-eval's own `ruler` group cannot run offline (it downloads the essays and NLTK data at import)
and cannot take the user's text as haystack, hence this module.

Each prompt is RULER's base template + answer prefix, sized so that its tokens plus the task's tokens
to generate fit the asked context length (RULER's rule), as close to it as the haystack unit allows.
A model's answer is its greedy continuation, up to the task's tokens to generate (stopped early at EOS
or once every answer is in it, which cannot change the score), scored with RULER's string_match_all:
the share of the expected strings found in the prediction, case-insensitive, x 100.
"""

import math
import random
import re
import string
import uuid
from dataclasses import dataclass

import torch

from consa.core import data as data_mod
from consa.core.errors import Cancelled, DataError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded

TEMPLATES = {  # RULER's task template + answer prefix (the "base" model template)
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

# RULER's synthetic tasks (scripts/synthetic.yaml) less the two QA tasks, which need SQuAD / HotpotQA.
# haystack: "text" is the user's text where RULER uses its essays.
TASKS = {
    "niah_single_1": dict(kind="niah", haystack="noise", k="words", v="numbers", num_k=1, num_v=1, num_q=1),
    "niah_single_2": dict(kind="niah", haystack="text", k="words", v="numbers", num_k=1, num_v=1, num_q=1),
    "niah_single_3": dict(kind="niah", haystack="text", k="words", v="uuids", num_k=1, num_v=1, num_q=1),
    "niah_multikey_1": dict(kind="niah", haystack="text", k="words", v="numbers", num_k=4, num_v=1, num_q=1),
    "niah_multikey_2": dict(kind="niah", haystack="needle", k="words", v="numbers", num_k=1, num_v=1, num_q=1),
    "niah_multikey_3": dict(kind="niah", haystack="needle", k="uuids", v="uuids", num_k=1, num_v=1, num_q=1),
    "niah_multivalue": dict(kind="niah", haystack="text", k="words", v="numbers", num_k=1, num_v=4, num_q=1),
    "niah_multiquery": dict(kind="niah", haystack="text", k="words", v="numbers", num_k=4, num_v=1, num_q=4),
    "vt": dict(kind="vt", num_chains=1, num_hops=4),
    "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(kind="fwe", alpha=2.0, coded_wordlen=6),
}
VT_ICL_TOKENS = 500  # RULER's one-shot variable-tracking example is built for 500 tokens


@dataclass
class RulerSample:
    task: str
    length: int  # the context length asked for: prompt tokens + max_new_tokens <= length
    prompt: str  # template + answer prefix, ready to continue
    input_ids: list
    answers: list  # the strings the prediction must contain (string_match_all)
    max_new_tokens: int


# -- metric (RULER's scripts/eval/synthetic/constants.py) -------------------------------------------
def postprocess(pred: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: list, refs: list) -> float:
    """Mean over samples of the share of a sample's references found in its prediction, x 100."""
    return round(sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
                 / len(preds) * 100, 2)


def string_match_part(preds: list, refs: list) -> float:
    """RULER's QA metric: a sample counts when any of its references is found."""
    return round(sum(max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs)) / len(preds) * 100, 2)


# -- generation of the samples ----------------------------------------------------------------------
class _Source:
    """The user's text as RULER's essay haystack (words) and a word list (the wonderwords stand-in)."""

    def __init__(self, texts, max_words: int):
        words = []
        for text in texts:
            words += re.sub(r"\s+", " ", text).strip().split(" ")
            if len(words) >= max_words:
                break
        self.words = [w for w in words if w][:max_words]
        if not self.words:
            raise DataError("RULER tasks need text for their haystack: the data holds none")
        self.vocab = sorted({w.lower() for w in re.sub(r"[^A-Za-z]", " ", " ".join(self.words)).split() if len(w) >= 3})

    @staticmethod
    def words_for(length: int) -> int:
        return 2 * length + 1000  # a prompt of `length` tokens holds fewer words than that

    def view(self, length: int) -> "_Source":
        """The text a prompt of `length` tokens draws from: the same whatever other lengths are asked."""
        return _Source([" ".join(self.words)], self.words_for(length))

    def haystack(self, n: int, start: int) -> list:
        """n words from `start` on, wrapping around (RULER repeats its essays when they are too short)."""
        words = self.words
        return [words[(start + i) % len(words)] for i in range(n)]


def _sentences(words: list) -> list:
    """The haystack cut where RULER's sent_tokenize would cut it; long stretches every 40 words."""
    out, current = [], []
    for w in words:
        current.append(w)
        if re.search(r"[.!?][\"')\]]*$", w) or len(current) >= 40:
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


def _random_value(kind: str, rng: random.Random, source: _Source) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{_word(rng, source)}-{_word(rng, source)}"  # RULER: adjective-noun pairs


def _word(rng: random.Random, source: _Source) -> str:
    if len(source.vocab) >= 50:
        return rng.choice(source.vocab)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(6))


def _niah(spec: dict, n: int, rng: random.Random, source: _Source) -> tuple[str, list]:
    type_v = spec["v"]
    keys, values, needles = [], [], []
    for _ in range(max(spec["num_k"], spec["num_q"])):
        keys.append(_random_value(spec["k"], rng, source))
        values.append([_random_value(type_v, rng, source) for _ in range(spec["num_v"])])
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if spec["haystack"] == "text":
        sents = _sentences(source.haystack(n, rng.randrange(len(source.words))))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(p for p in parts if p)
    else:
        if spec["haystack"] == "noise":
            sentences = [NOISE] * n
        else:  # "needle": the haystack is distractor needles
            sentences = [NEEDLE.format(type_needle_v=type_v, key=_random_value(spec["k"], rng, source),
                                       value=_random_value(type_v, rng, source)) for _ in range(n)]
        for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)
    picked = rng.sample(range(len(keys)), spec["num_q"])
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template = "".join(TEMPLATES["niah"])
    if spec["num_q"] * spec["num_v"] == 1:  # RULER's singular wording
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(a, b)
        type_v = type_v[:-1]
    return template.format(type_needle_v=type_v, context=context, query=query), answers


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list, list]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _vt_context(n: int, chains: list, rng: random.Random) -> str:
    sentences = [NOISE] * n
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (pos, line) in enumerate(zip(positions, chain)):
            sentences.insert(pos + j, line)
    return "\n".join(sentences).replace(". \n", ".\n")


def _vt(spec: dict, n: int, rng: random.Random, source: _Source, icl: str = "") -> tuple[str, list]:
    chains = [_vt_chain(rng, spec["num_hops"], 5) for _ in range(spec["num_chains"])]
    names = chains[0][0]
    value = chains[0][1][0].split("=")[-1].strip()
    prompt = "".join(TEMPLATES["vt"]).format(context=_vt_context(n, [c for _, c in chains], rng), query=value,
                                            num_v=spec["num_hops"] + 1)
    return icl + prompt, names


def _vt_icl(spec: dict, n: int, rng: random.Random) -> str:
    """RULER's one-shot example: a short variable-tracking prompt (3-letter names) and its answer."""
    names, chain = _vt_chain(rng, min(10, spec["num_hops"]), 3)
    value = chain[0].split("=")[-1].strip()
    prompt = "".join(TEMPLATES["vt"]).format(context=_vt_context(n, [chain], rng), query=value,
                                            num_v=len(names))
    return prompt + " " + " ".join(names) + "\n"


def _cwe_example(words: list, common_repeats: int, uncommon_repeats: int, num_cw: int, rng: random.Random):
    common, uncommon = words[:num_cw], words[num_cw:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe(spec: dict, n: int, rng: random.Random, source: _Source, length: int) -> tuple[str, list]:
    num_cw = spec["num_cw"]
    shots, main = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (spec["freq_cw"], spec["freq_ucw"]))
    pool = source.vocab if len(source.vocab) >= n + shots[0] else None
    if pool is None:  # too few distinct words in the user's text: random lowercase words
        pool = set()
        while len(pool) < n + shots[0]:
            pool.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9))))
        pool = sorted(pool)
    drawn = rng.sample(pool, n + shots[0])
    template = "".join(TEMPLATES["cwe"])
    context, answer = _cwe_example(drawn[n:], shots[1], shots[2], num_cw, rng)
    shot = template.format(context=context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
    context, answer = _cwe_example(drawn[:n], *main, num_cw, rng)
    return shot + "\n" + template.format(context=context), answer


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi ** 2 / 6
    n = 10_000  # partial sum + Euler-Maclaurin tail
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2


def _fwe(spec: dict, n: int, rng: random.Random, source: _Source, length: int) -> tuple[str, list]:
    size = max(8, (length - TOKENS_TO_GENERATE["fwe"]) // 50)  # RULER: vocab_size = max_seq_length // 50
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(spec["coded_wordlen"])))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    z = _zeta(spec["alpha"])
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -spec["alpha"] / z))]
    rng.shuffle(words)
    return "".join(TEMPLATES["fwe"]).format(context=" ".join(words)), vocab[1:4]


def _make(task: str, n: int, seed: str, source: _Source, length: int, icl: str) -> tuple[str, list]:
    spec, rng = TASKS[task], random.Random(seed)
    if spec["kind"] == "niah":
        return _niah(spec, n, rng, source)
    if spec["kind"] == "vt":
        return _vt(spec, n, rng, source, icl)
    if spec["kind"] == "cwe":
        return _cwe(spec, n, rng, source, length)
    return _fwe(spec, n, rng, source, length)


def _largest(fits, lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n) (RULER's binary search over the haystack size)."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _smallest(spec: dict) -> int:
    """The fewest haystack units a prompt can have: room for every needle / chain line / common word."""
    if spec["kind"] == "niah":
        return max(spec["num_k"], spec["num_q"]) * spec["num_v"]
    if spec["kind"] == "vt":
        return spec["num_hops"] + 1
    if spec["kind"] == "cwe":
        return spec["num_cw"] + 1
    return 10


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def build_samples(tokenizer, texts, lengths, *, tasks=None, samples: int = 4, seed: int = 0,
                  max_new_tokens: int | None = None) -> list[RulerSample]:
    """`samples` prompts per task and context length. texts: an iterable of documents (the haystack).
    The same texts and seed give the same prompts. max_new_tokens: override every task's RULER budget
    (cheaper tests); the prompt then grows into what the budget leaves."""
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}: expected some of {', '.join(TASKS)}")
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] <= 0:
        raise ValueError(f"RULER lengths must be positive token counts, got {lengths}")
    everything = _Source(texts, max_words=_Source.words_for(lengths[-1]))
    out = []
    for length in lengths:
        source = everything.view(length)
        for task in tasks:
            kind = TASKS[task]["kind"]
            budget_new = TOKENS_TO_GENERATE[kind] if max_new_tokens is None else max_new_tokens
            budget = length - budget_new
            icl = ""
            if kind == "vt":  # the one-shot example takes at most a third of the context
                icl_budget = min(VT_ICL_TOKENS, length // 3)
                icl_seed = f"{seed}/{task}/{length}/icl"
                m = _largest(lambda m: _count(tokenizer, _vt_icl(TASKS[task], m, random.Random(icl_seed))) <= icl_budget,
                             5, max(5, icl_budget))
                if m is None:
                    raise DataError(f"RULER {task}: a context of {length} tokens has no room for its one-shot example")
                icl = _vt_icl(TASKS[task], m, random.Random(icl_seed))
            low = _smallest(TASKS[task])
            seed0 = f"{seed}/{task}/{length}/0"
            fits = lambda m: _count(tokenizer, _make(task, m, seed0, source, length, icl)[0]) <= budget  # noqa: E731
            n = _largest(fits, low, max(2 * low, 2 * length))
            if n is None:
                raise DataError(f"RULER {task}: a context of {length} tokens is too short for its prompt and "
                                f"{budget_new} tokens to generate")
            step = max(1, n // 50)
            for i in range(samples):
                sample_seed, used = f"{seed}/{task}/{length}/{i}", n
                while True:  # another draw may tokenize longer: shrink the haystack until it fits
                    prompt, answers = _make(task, used, sample_seed, source, length, icl)
                    ids = tokenizer(prompt)["input_ids"]
                    if len(ids) <= budget or used <= low:
                        break
                    used = max(low, used - step)
                if len(ids) > budget:
                    raise DataError(f"RULER {task}: no prompt fits {length} tokens")
                out.append(RulerSample(task, length, prompt, ids, answers, budget_new))
    return out


# -- scoring ----------------------------------------------------------------------------------------
def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def greedy_continuation(model, tokenizer, input_ids: list, max_new_tokens: int, answers=None) -> str:
    """The model's greedy continuation of a prompt, with its KV cache; stops at EOS, after
    max_new_tokens, or once every string of `answers` is in it (more tokens cannot lose them)."""
    import inspect

    from consa.runtime.generation import cache_kwarg, output_cache

    device = next(model.parameters()).device
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    eos = tokenizer.eos_token_id
    ids = torch.tensor([input_ids], device=device)
    cache, generated = None, []
    for _ in range(max_new_tokens):
        with _autocast(device):
            out = model(input_ids=ids, use_cache=True, **({cache_kwarg(model): cache} if cache is not None else {}),
                        **keep)
        cache = output_cache(out)
        token = int(out.logits[0, -1].argmax())
        if token == eos:
            break
        generated.append(token)
        if answers and all(a.lower() in postprocess(tokenizer.decode(generated)).lower() for a in answers):
            break
        ids = torch.tensor([[token]], device=device)
    return tokenizer.decode(generated, skip_special_tokens=True)


def score(samples: list, generate, should_cancel=None) -> dict:
    """RULER scores per context length and task: {"<length>": {task: score, ..., "average": mean}}.

    generate(sample) -> the predicted text. should_cancel() is asked before every sample."""
    preds = {}
    for sample in samples:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled during the RULER evaluation")
        preds.setdefault((sample.length, sample.task), []).append((postprocess(generate(sample)), sample.answers))
    report = {}
    for (length, task), pairs in preds.items():
        report.setdefault(str(length), {})[task] = string_match_all(*zip(*pairs))
    for tasks in report.values():
        tasks["average"] = round(sum(tasks.values()) / len(tasks), 2)
    return report


def evaluate_model(model, tokenizer, samples: list, should_cancel=None) -> dict:
    """score() of the model's greedy answers (the model as it is: apply an allocation first)."""
    return score(samples, lambda s: greedy_continuation(model, tokenizer, s.input_ids, s.max_new_tokens, s.answers),
                 should_cancel)


def average(report: dict) -> float | None:
    """The mean of the per-length averages: one number for a table."""
    values = [tasks["average"] for tasks in report.values()]
    return round(sum(values) / len(values), 2) if values else None


def samples_from(tokenizer, data, lengths, *, tasks=None, samples: int = 4, seed: int = 0, text_field=None,
                 max_new_tokens: int | None = None) -> list[RulerSample]:
    """build_samples over a data path (or TextSource), or an (N, T) token tensor decoded to text."""
    if isinstance(data, torch.Tensor):
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in data.tolist()]
    else:
        texts = data_mod.iter_texts(data, seed=seed + 2, text_field=text_field)
    return build_samples(tokenizer, texts, lengths, tasks=tasks, samples=samples, seed=seed,
                         max_new_tokens=max_new_tokens)
