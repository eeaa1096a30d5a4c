"""Reading, packing and the retrieval mix."""

import json
import random
import re

import pytest
import torch

import tiny
from consa.core import data
from consa.core.errors import DataError
from consa.search.objectives import per_row_mean


def test_text_file_directory_and_jsonl_are_read(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta " * 50}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    texts = list(data.iter_texts(tmp_path))
    assert sorted(t[:5] for t in texts) == ["alpha", "beta ", "gamma"]
    rows = data.pack_tokens(tokenizer, texts, seq_len=16)
    assert rows.shape[1] == 16 and (rows == tokenizer.eos_token_id).any()  # documents are EOS-separated


@pytest.mark.parametrize("content,message", [
    ("not json\n", "is not valid JSON"), (json.dumps({"body": "x"}) + "\n", "no string field 'text'"),
])
def test_bad_jsonl_says_which_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + content)
    with pytest.raises(DataError, match=f"d.jsonl:2 .*{message}|d.jsonl:2 has {message}"):
        list(data.iter_texts(tmp_path / "d.jsonl"))


def test_missing_empty_and_too_short_data_are_user_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        list(data.iter_texts(tmp_path / "nope"))
    with pytest.raises(DataError, match="no text files"):
        list(data.iter_texts(tmp_path))
    with pytest.raises(DataError, match="fewer than seq_len"):
        data.pack_tokens(tokenizer, ["tiny"], seq_len=512)


def test_retrieval_document_hides_keys_at_the_given_depths_and_asks_for_one(tokenizer):
    filler = data.filler_token_ids(tokenizer, tiny.corpus_texts(), 20000)
    doc = data.retrieval_document(tokenizer, filler, 400, random.Random(1), depths=[0.1, 0.3, 0.6, 0.9], query_index=2)
    text = tokenizer.decode(doc.input_ids)
    assert text.count("KEY_") == 5 and text.rstrip().endswith('== "')
    assert f'= "{doc.answer}"' in text and sorted(doc.depths) == [0.1, 0.3, 0.6, 0.9]
    answer_len = len(tokenizer(doc.answer, add_special_tokens=False)["input_ids"])
    assert len(doc.input_ids) + answer_len == 400


def test_build_dataset_mixes_at_the_ratio_and_labels_retrieval_answers_only(text_dir, tokenizer):
    rows, labels = data.build_dataset(tokenizer, text_dir, 200, 8, retrieval_ratio=0.25, seed=0, with_labels=True)
    assert rows.shape == labels.shape == (8, 200)
    is_retrieval = (labels == data.IGNORE).any(1)
    assert int(is_retrieval.sum()) == 2
    for row, lab in zip(rows[is_retrieval], labels[is_retrieval]):
        answer = tokenizer.decode(row[lab != data.IGNORE])
        assert answer[:5].isdigit() and answer[5:] in ('', '"')  # the row ends at seq_len
    assert torch.equal(rows[~is_retrieval], labels[~is_retrieval])
    again = data.build_dataset(tokenizer, text_dir, 200, 8, retrieval_ratio=0.25, seed=0)
    assert torch.equal(again, rows)  # seeded


def test_retrieval_rows_can_ask_for_every_key_each_answer_scored(tokenizer):
    filler = data.filler_token_ids(tokenizer, tiny.corpus_texts(), 20000)
    one, one_labels = data.retrieval_sequences(tokenizer, filler, 400, 3, seed=5, num_keys=4)
    rows, labels = data.retrieval_sequences(tokenizer, filler, 400, 3, seed=5, num_keys=4, queries=9)  # capped at 4
    assert rows.shape == labels.shape == (3, 400)
    for row, lab in zip(rows, labels):
        text = tokenizer.decode(row)
        defined = dict(re.findall(r'(KEY_[a-z]{4}) = "(\d{5})"', text))
        asked = re.findall(r'assert (KEY_[a-z]{4}) == "(\d{5})"', text)
        assert len(defined) == 4 and sorted(name for name, _ in asked) == sorted(defined)  # each key asked once
        assert all(defined[name] == value for name, value in asked)  # ... with its own value
        scored = tokenizer.decode(row[lab != data.IGNORE])
        assert scored == "".join(f'{value}"' for _, value in asked)  # exactly the answers are labelled
    # one query (the default): one answer per row; the first document is the same, asked the same key first
    assert re.findall(r'assert (KEY_[a-z]{4})', tokenizer.decode(rows[0]))[0] == \
        re.findall(r'assert (KEY_[a-z]{4})', tokenizer.decode(one[0]))[0]
    assert [len(re.findall("assert", tokenizer.decode(r))) for r in one] == [1, 1, 1]
    assert ((one_labels != data.IGNORE).sum(1) < (labels != data.IGNORE).sum(1)).all()
    # a short row keeps room for its document: further queries take at most a quarter of it
    short, _ = data.retrieval_sequences(tokenizer, filler, 160, 2, seed=5, num_keys=4, queries=4)
    assert [len(re.findall("assert", tokenizer.decode(r))) for r in short] == [2, 2]


def test_per_row_mean_weighs_rows_equally():
    values = torch.tensor([[1.0, 1.0, 1.0], [5.0, 9.0, 9.0]])
    labels = torch.tensor([[1, 1, 1, 1], [1, 1, -100, -100]])  # row 2: only its first prediction counts
    assert per_row_mean(values, labels).item() == pytest.approx((1.0 + 5.0) / 2)


def test_calibration_rows_come_in_another_order_than_the_evaluation(text_dir, tokenizer):
    calib = data.calibration_rows(tokenizer, text_dir, 64, seed=0, num_sequences=4)
    first = data.pack_tokens(tokenizer, data.iter_texts(text_dir, seed=0), 64, max_sequences=4)
    assert calib.shape == (4, 64)
    assert not torch.equal(calib, first)
    assert torch.equal(calib, data.calibration_rows(tokenizer, text_dir, 64, seed=0, num_sequences=4))  # seeded


# -- Hugging Face datasets (the `data` extra) -------------------------------------------------------
DOCS = [{"text": f"document {i} " * 20, "content": f"code {i}", "n": i} for i in range(6)]


def _write_formats(root):
    """The same six documents as parquet, arrow, .jsonl.zst and a saved `datasets` directory."""
    import datasets
    import zstandard

    ds = datasets.Dataset.from_list(DOCS)
    ds.to_parquet(str(root / "docs.parquet"))
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "saved-dict"))
    arrow = next((root / "saved").glob("*.arrow"))
    (root / "docs.arrow").write_bytes(arrow.read_bytes())
    lines = "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return root


@pytest.mark.parametrize("name", ["docs.parquet", "docs.arrow", "docs.jsonl.zst", "saved", "saved-dict"])
def test_datasets_formats_are_read(tmp_path, name, tokenizer):
    root = _write_formats(tmp_path)
    assert list(data.iter_texts(root / name)) == [d["text"] for d in DOCS]
    assert list(data.iter_texts(root / name, text_field="content")) == [d["content"] for d in DOCS]
    rows = data.build_dataset(tokenizer, root / name, seq_len=16, num_sequences=3)
    assert rows.shape == (3, 16)


def test_datasets_column_errors_name_the_columns(tmp_path):
    root = _write_formats(tmp_path)
    with pytest.raises(DataError, match="no text column 'body'.*text, content, n"):
        list(data.iter_texts(root / "docs.parquet", text_field="body"))
    import datasets

    datasets.Dataset.from_list([{"code": "x"}]).to_parquet(str(tmp_path / "code.parquet"))
    with pytest.raises(DataError, match="text / content"):  # neither default column
        list(data.iter_texts(tmp_path / "code.parquet"))


def test_a_directory_mixes_text_files_and_parquet(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("alpha")
    datasets.Dataset.from_list([{"text": "beta"}]).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "c.txt.gz").write_bytes(b"\x1f\x8b not json")  # not a dataset file: skipped like any binary
    assert sorted(data.iter_texts(tmp_path)) == ["alpha", "beta"]


def test_stray_data_files_in_a_text_folder_are_skipped_not_fatal(tmp_path):
    """site-packages holds package data such as .json.gz that is no corpus: the folder still reads."""
    import gzip

    (tmp_path / "a.py").write_text("def alpha(): pass")
    (tmp_path / "schema.json.gz").write_bytes(gzip.compress(b'{"type": "object", "n": 1}\n'))
    with pytest.warns(UserWarning, match="skipped schema.json.gz"):
        assert list(data.iter_texts(tmp_path)) == ["def alpha(): pass"]
    (tmp_path / "a.py").unlink()  # dataset files alone: the error is the user's to see
    with pytest.raises(DataError, match="no text column"):
        list(data.iter_texts(tmp_path))


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(data.iter_texts("data/train.txt"))
