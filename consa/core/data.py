"""Training and evaluation data: local text packed into fixed-length sequences, plus synthetic
multi-key retrieval documents.

Retrieval documents are what make long-range heads matter: a few `KEY_abcd = "12345"` lines sit at
random depths inside filler text and the document ends with `assert KEY_abcd == "`; only a unit
that can see far back can complete the value. The format matches the testbed model's training data.
"""

import itertools
import json
import random
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consa.core.errors import DataError

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs"}
# Files read through Hugging Face `datasets` (the optional `data` extra), by the builder that reads them.
DATASET_FILES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl.zst": "json", ".json.zst": "json",
                 ".jsonl.gz": "json", ".json.gz": "json"}
# Columns tried, in order, when no text field is named: plain text corpora and code corpora (the Stack).
TEXT_FIELDS = ("text", "content")


# -- reading text ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSource:
    """Where a search's text comes from and how to read it: everything that takes a dataset path
    also takes one of these, so a new reading option is a field here (and in SearchConfig)."""

    path: str
    text_field: str | None = None  # the column of a jsonl / parquet / arrow / `datasets` source


_confined_to: list[Path] | None = None  # confine_reads(): the folders every file read must lie under


def confine_reads(roots) -> None:
    """From now on, in this process, read a dataset's files only where they really lie under one of
    `roots` (symlinks resolved): a server's worker confines jobs to its data roots, so a link inside a
    dataset folder cannot make it read a file elsewhere. None: no confinement (the default)."""
    global _confined_to
    _confined_to = None if roots is None else [Path(r).resolve() for r in roots]


def _check_confined(f: Path, top: Path) -> None:
    if _confined_to is not None and not any(f.resolve().is_relative_to(root) for root in _confined_to):
        where = f.relative_to(top) if f.is_relative_to(top) else f.name
        raise DataError(f"{where} in the dataset links outside the allowed data roots; it is not read")


def iter_texts(path, max_files: int | None = None, seed: int = 0, suffixes=None, text_field: str | None = None):
    """Yield documents from a file, a directory of text files, a .jsonl with a `text` field, or (with
    the `data` extra) parquet / arrow / .jsonl.zst files, a directory saved by `datasets`
    (`save_to_disk`), or a hub dataset name where the machine is online. `text_field` names the
    column to read (default: "text", else "content"). `path` may be a TextSource."""
    if isinstance(path, TextSource):
        path, text_field = path.path, path.text_field or text_field
    suffixes = set(suffixes or TEXT_SUFFIXES)
    path = Path(path)
    if not path.exists():
        if _looks_like_hub_name(str(path)):
            yield from _iter_dataset(str(path), None, text_field)
            return
        raise DataError(f"dataset path does not exist: {path}")
    if path.is_dir() and _is_saved_dataset(path):
        for f in (p for p in path.rglob("*") if p.is_file()):
            _check_confined(f, path)
        yield from _iter_dataset(path, "disk", text_field)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if (p.suffix in suffixes or _builder(p)) and p.is_file())
        if not files:
            raise DataError(f"no text files ({', '.join(sorted(suffixes | set(DATASET_FILES)))}) under {path}")
        random.Random(seed).shuffle(files)  # a dataset directory is usually sorted by topic
    else:
        files = [path]
    # A folder that also holds text files may hold stray .json.gz / .parquet files that are no corpus
    # (package data in site-packages), or the `datasets` extra may be missing: such a file is skipped
    # with a warning there. A folder of dataset files only, or a single file, fails on it.
    mixed = any(not _builder(f) for f in files)
    for f in files:
        _check_confined(f, path)
    for f in files[:max_files]:
        if _builder(f):
            try:
                yield from _iter_dataset(f, _builder(f), text_field)
            except DataError as e:
                if not mixed:
                    raise
                warnings.warn(f"skipped {f.name}: {e}", stacklevel=2)
        elif f.suffix == ".jsonl":
            yield from _iter_jsonl(f, text_field or "text")
        else:
            try:
                yield f.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise DataError(f"cannot read {f}: {e}") from None


def _iter_jsonl(path: Path, field: str = "text"):
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno} has no string field {field!r}")
            yield record[field]


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").exists() or ((path / "state.json").exists()
                                                     and (path / "dataset_info.json").exists())


def _builder(path: Path) -> str | None:
    return DATASET_FILES.get("".join(path.suffixes[-2:])) or DATASET_FILES.get(path.suffix)


def _looks_like_hub_name(name: str) -> bool:
    """"owner/name" that is not a local path (no file suffix, no leading ./ or /)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and "." not in parts[1] and not name.startswith((".", "/", "~"))


def _iter_dataset(source, builder: str | None, text_field: str | None):
    """Rows of a `datasets` dataset (a local file read by `builder`, a saved dataset, or a hub name)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs Hugging Face datasets: pip install 'consa[data]'") from None
    try:
        if builder == "disk":
            ds = datasets.load_from_disk(str(source))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            # Streamed: rows are read as they are packed, with no arrow copy in the datasets cache and
            # no whole-corpus download for the few thousand rows a search needs.
            ds = datasets.load_dataset(builder or str(source), data_files=str(source) if builder else None,
                                       split="train", streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ArrowInvalid ...)
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read dataset {source}: {line}") from None
    if first is None:
        return
    field = text_field or next((c for c in TEXT_FIELDS if c in first), None)
    if field not in first:
        raise DataError(f"{source} has no text column {text_field or ' / '.join(TEXT_FIELDS)!r} "
                        f"(its columns: {', '.join(first)}); name one with text_field")
    for row in itertools.chain([first], rows):
        if isinstance(row[field], str):
            yield row[field]


def pack_tokens(tokenizer, texts, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Concatenate tokenized documents (EOS between them) and cut into (N, seq_len) rows."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    buffer: list[int] = []
    rows: list[list[int]] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        while len(buffer) >= seq_len:
            rows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise DataError(f"the dataset holds fewer than seq_len={seq_len} tokens")
    return torch.tensor(rows, dtype=torch.long)


# -- synthetic retrieval ----------------------------------------------------------------------------
@dataclass
class RetrievalDoc:
    input_ids: list  # prompt tokens, ending right before the value
    answer: str  # the value the model should produce
    depths: list  # relative depth (0..1) of each key line in the document
    keys: list = field(default_factory=list)  # (name, value) of every key line, the queried one first



def calibration_rows(tokenizer, data, seq_len: int, seed: int = 0, num_sequences: int = 4) -> torch.Tensor:
    """A few packed rows to calibrate on (the heuristic-loss baseline): the same data as an evaluation,
    drawn in another file order (seed + 1) so the rows are not the evaluation's first rows."""
    return pack_tokens(tokenizer, iter_texts(data, seed=seed + 1), seq_len, max_sequences=num_sequences)

def _key_name(rng: random.Random) -> str:
    return "KEY_" + "".join(rng.choice(string.ascii_lowercase) for _ in range(4))


def retrieval_document(tokenizer, filler_ids: list, seq_len: int, rng: random.Random,
                       num_keys: int = 4, depths: list | None = None, query_index: int | None = None) -> RetrievalDoc:
    """`num_keys` key lines at random (or given) depths inside filler, then the query for one of them.

    The prompt is exactly seq_len tokens minus the answer's tokens, so loss and retrieval are
    measured at the context length asked for.
    """
    names = []
    while len(names) < num_keys:
        name = _key_name(rng)
        if name not in names:
            names.append(name)
    values = ["".join(rng.choice(string.digits) for _ in range(5)) for _ in names]
    key_ids = [tokenizer(f'\n{n} = "{v}"\n', add_special_tokens=False)["input_ids"] for n, v in zip(names, values)]
    q = rng.randrange(num_keys) if query_index is None else query_index
    query_ids = tokenizer(f'\nassert {names[q]} == "', add_special_tokens=False)["input_ids"]
    answer_len = len(tokenizer(values[q], add_special_tokens=False)["input_ids"])

    budget = seq_len - answer_len - len(query_ids) - sum(map(len, key_ids))
    if budget < num_keys:
        raise DataError(f"seq_len={seq_len} is too short for a {num_keys}-key retrieval document")
    if len(filler_ids) < budget:
        raise DataError("not enough filler text for a retrieval document")
    start = rng.randrange(0, len(filler_ids) - budget + 1)
    filler = filler_ids[start:start + budget]
    depths = sorted(depths if depths is not None else [rng.random() for _ in range(num_keys)])
    cuts = [int(d * budget) for d in depths]
    order = list(range(num_keys))
    rng.shuffle(order)  # which key sits at which depth

    ids, prev = [], 0
    for cut, k in zip(cuts, order):
        ids += filler[prev:cut] + key_ids[k]
        prev = cut
    ids += filler[prev:] + query_ids
    depth_of = {k: d for d, k in zip(depths, order)}
    return RetrievalDoc(input_ids=ids, answer=values[q], depths=[depth_of[k] for k in range(num_keys)],
                        keys=[(names[q], values[q])] + [kv for k, kv in enumerate(zip(names, values)) if k != q])


def filler_token_ids(tokenizer, texts, max_tokens: int) -> list:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


IGNORE = -100  # label of tokens that carry no loss


QUERY_TOKENS = 32  # room kept for each further query line (`assert KEY_abcd == "12345"`) of a row


def retrieval_sequences(tokenizer, filler_ids: list, seq_len: int, count: int, seed: int,
                        num_keys: int = 4, queries: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, seq_len) rows of retrieval prompts followed by their answer, and their labels.

    Only the answer tokens are labelled: they are the tokens that need a unit which sees far back,
    and in a row of thousands of filler tokens their signal would otherwise be lost. With `queries`
    > 1 the row goes on to ask for further keys of the document, each answer labelled: more answers
    per row for the same compute, so the retrieval part of the loss is less noisy.
    """
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    extra = min(queries, num_keys, 1 + seq_len // 4 // QUERY_TOKENS) - 1  # further queries take at most 1/4 of a row
    rows, labels = [], []
    for _ in range(count):
        doc = retrieval_document(tokenizer, filler_ids, seq_len - extra * QUERY_TOKENS, rng, num_keys=num_keys)
        answer = tokenizer(doc.answer + '"', add_special_tokens=False)["input_ids"]
        row, spans = doc.input_ids + answer, [(len(doc.input_ids), len(answer))]
        others = doc.keys[1:]
        if extra:  # only then: rows with one query draw exactly what they drew before the option existed
            rng.shuffle(others)
        for name, value in others[:extra]:
            row += tokenizer(f'\nassert {name} == "', add_special_tokens=False)["input_ids"]
            answer = tokenizer(value + '"', add_special_tokens=False)["input_ids"]
            spans.append((len(row), len(answer)))
            row += answer
        row = (row + [eos] * seq_len)[:seq_len]
        scored = {i for start, n in spans for i in range(start, start + n)}
        labels.append([t if i in scored else IGNORE for i, t in enumerate(row)])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# -- the training mix -----------------------------------------------------------------------------
def build_dataset(tokenizer, path, seq_len: int, num_sequences: int, retrieval_ratio: float = 0.0,
                  seed: int = 0, num_keys: int = 4, with_labels: bool = False, text_field: str | None = None,
                  queries: int = 1):
    """(num_sequences, seq_len) token rows: packed text mixed with retrieval documents at a ratio.

    With `with_labels`, returns (rows, labels): text rows are labelled everywhere, retrieval rows on
    their answers only (`queries` of them per row: see retrieval_sequences).
    """
    if not 0.0 <= retrieval_ratio <= 1.0:
        raise DataError(f"retrieval_ratio must be in [0, 1], got {retrieval_ratio}")
    n_retrieval = int(round(retrieval_ratio * num_sequences))
    n_text = num_sequences - n_retrieval
    rows, labels = [], []
    if n_text:
        text = pack_tokens(tokenizer, iter_texts(path, seed=seed, text_field=text_field), seq_len,
                           max_sequences=n_text)
        rows.append(text)
        labels.append(text)
    if n_retrieval:
        filler = filler_token_ids(tokenizer, iter_texts(path, seed=seed + 1, text_field=text_field),
                                  max_tokens=max(seq_len * 8, 65536))
        r_rows, r_labels = retrieval_sequences(tokenizer, filler, seq_len, n_retrieval, seed=seed, num_keys=num_keys,
                                               queries=queries)
        rows.append(r_rows)
        labels.append(r_labels)
    rows, labels = torch.cat(rows), torch.cat(labels)
    # Mix the two kinds so every batch sees both; a seeded permutation keeps runs reproducible.
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return (rows[perm], labels[perm]) if with_labels else rows[perm]
