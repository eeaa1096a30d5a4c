"""A hybrid export evaluated in lm-evaluation-harness gives the numbers `consa eval --lm-eval-task-dir`
prints for the same rows: a layer export in stock `layer_types` format through the real `lm_eval`
command, a kv_head export in consa format (trust_remote_code=True) through lm-eval's Python API.
Nothing is downloaded: the task reads the rows consa wrote next to it."""

import contextlib
import io
import json
import sys

import pytest
import torch

from consa.cli.commands import main
from consa.core.manifest import Allocation
from consa.evaluation import harness
from consa.export.checkpoint import export_hybrid

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # live servers or CLI subprocesses: out of the fast loop (pytest -m 'not slow'); CI runs it

pytest.importorskip("lm_eval")

WINDOW = 8
PATTERNS = {"layer": [[True, True], [False, False], [True, True], [False, False]],
            "kv_head": [[True, False], [False, True], [False, False], [True, True]]}
METRICS = ("token_loss", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}



def consa_eval(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--device", "cpu", *map(str, args)]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def exported(tiny_model_dir, text_dir, tmp_path_factory):
    """granularity -> (export dir, task dir, consa eval's JSON) for both granularities."""
    root = tmp_path_factory.mktemp("harness")
    out = {}
    for granularity, pattern in PATTERNS.items():
        alloc = Allocation.from_full_mask(torch.tensor(pattern), model=str(tiny_model_dir), granularity=granularity,
                                          window=WINDOW)
        manifest = alloc.save(root / f"{granularity}.json")
        summary = export_hybrid(str(tiny_model_dir), alloc, root / f"export-{granularity}")
        assert summary["format"] == ("layer_types" if granularity == "layer" else "consa")
        task_dir = root / f"task-{granularity}"
        result = consa_eval("--model", tiny_model_dir, "--allocation", manifest, "--data", text_dir, "--seq-len", 96,
                            "--num-sequences", 3, "--lm-eval-task-dir", task_dir)
        out[granularity] = (root / f"export-{granularity}", task_dir, result)
    return out


def assert_same(lm: dict, ours: dict):
    # The target is 1e-3; on CPU in fp32 they agree to float error, so hold them to 1e-5 (a random tiny
    # model's hybrid and full attention differ by less than 1e-3, more than 1e-5: see the last test).
    for metric in METRICS:
        assert lm[f"{metric},none"] == pytest.approx(ours[metric], rel=1e-5), metric
    assert abs(lm["token_loss,none"] - ours["token_loss"]) < 1e-5


def test_the_task_folder_holds_the_rows_consa_evaluated(exported, tokenizer):
    _, task_dir, result = exported["layer"]
    block = result["lm_eval"]
    assert block["task"] == "consa_rows" and block["rows"] == result["num_sequences"] == 3
    assert "--include_path" in block["command"] and "trust_remote_code" not in block["command"]
    assert "trust_remote_code=True" in exported["kv_head"][2]["lm_eval"]["command"]
    docs = harness.load_docs(task_dir)
    assert [d["tokens"] for d in docs] == [len(harness.lm_eval_tokens(tokenizer, d["text"])) for d in docs]
    assert sum(d["tokens"] == 96 for d in docs) >= 2  # BPE round trips keep (almost) every row as it was
    assert {p.name for p in task_dir.iterdir()} >= {"consa_rows.yaml", "consa_rows_utils.py", "rows.jsonl"}
    # The mean token loss lm-eval measures is consa's loss, up to the prefix token lm-eval adds.
    assert block["token_loss"] == pytest.approx(result["loss"], abs=0.2)
    assert block["bits_per_byte"] == pytest.approx(block["token_loss"] * sum(d["tokens"] for d in docs)
                                                  / sum(len(d["text"].encode()) for d in docs) / 0.6931471805599453)


def test_lm_eval_command_on_a_layer_types_export_equals_consa(exported, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate  # what the `lm_eval` command runs, here in this process

    export_dir, task_dir, result = exported["layer"]
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "hf", "--model_args", f"pretrained={export_dir},dtype=float32",
                                      "--device", "cpu", "--include_path", str(task_dir), "--tasks", "consa_rows",
                                      "--batch_size", "1", "--output_path", str(tmp_path / "out")])
    cli_evaluate()
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    assert_same(json.loads(results_file.read_text())["results"]["consa_rows"], result["lm_eval"])


def test_lm_eval_on_a_kv_head_export_with_remote_code_equals_consa(exported, tiny_model_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    export_dir, task_dir, result = exported["kv_head"]
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)  # lm-eval's own tasks are not needed
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True,dtype=float32",
                                  tasks=["consa_rows"], task_manager=tasks, batch_size=1, device="cpu")
    lm = out["results"]["consa_rows"]
    assert_same(lm, result["lm_eval"])
    # Not vacuous: the same rows under full attention, and under the layer hybrid, score otherwise.
    from consa.model.loading import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    full = harness.lm_eval_reference(model, tokenizer, None, harness.load_docs(task_dir))
    assert abs(lm["token_loss,none"] - full["token_loss"]) > 1e-4
    assert abs(lm["token_loss,none"] - exported["layer"][2]["lm_eval"]["token_loss"]) > 1e-4
