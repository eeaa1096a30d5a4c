"""The recipe every front end runs: consa.recipe.pipeline.run_allocation."""

import json

import pytest

import tiny
from consa import SearchConfig
from consa.core.errors import Cancelled, DataError
from consa.core.artifacts import ARTIFACTS
from consa.recipe.pipeline import run_allocation


@pytest.fixture(scope="module")
def body_jsonl(tmp_path_factory):
    """Training text under a column that is not `text`: what a user's own dataset often looks like."""
    path = tmp_path_factory.mktemp("jsonl") / "code.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(tiny.corpus_texts())))
    return path


def _config(model_dir, dataset, **kw):
    return SearchConfig(**{**dict(model=str(model_dir), sparsity=0.5, window=8, dataset=str(dataset), seq_len=64,
                                  steps=3), **kw})


@pytest.mark.slow
def test_every_artifact_and_phase_of_a_job(tiny_model_dir, body_jsonl, tmp_path):
    published, records, events = [], [], []
    run = run_allocation(_config(tiny_model_dir, body_jsonl, text_field="body"), tmp_path, evaluate=True,
                         checkpoint=True, on_artifact=lambda name, path: published.append(name),
                         progress=records.append, on_event=lambda type, message: events.append(message))
    assert published == list(ARTIFACTS)  # every declared artifact, in the order the recipe writes them
    assert [r["step"] for r in json.loads((tmp_path / "history.json").read_text())] == [1, 2, 3]
    assert all((tmp_path / name).stat().st_size > 0 for name in published)
    phases = [(r["phase"], r["phase_done"], r["phase_total"]) for r in records]
    evaluated = len(run.evaluation)  # full, the learned allocation and every baseline
    # The evaluation's units: each baseline built, then each part of the eval set scored for each allocation.
    parts = 1 + (run.evaluation[0]["retrieval_acc"] is not None) + ("ruler" in run.evaluation[0])
    total = (evaluated - 2) + evaluated * parts
    assert phases == [("search", s, 3) for s in (1, 2, 3)] + [("evaluation", k, total) for k in
                                                              range(total + 1)] + [("export", d, 2) for d in range(3)]
    assert {r["name"] for r in run.evaluation} >= {"full", "learned", "heuristic-loss"}
    assert any("exporting" in m for m in events)


def test_the_text_field_setting_reaches_the_search_and_the_evaluation(tiny_model_dir, body_jsonl, tmp_path):
    with pytest.raises(DataError, match="text"):  # the default column is not there
        run_allocation(_config(tiny_model_dir, body_jsonl), tmp_path, heatmap=False)
    run = run_allocation(_config(tiny_model_dir, body_jsonl, text_field="body"), tmp_path, heatmap=False)
    assert run.search.allocation.sparsity_achieved == 0.5


def test_a_cancel_during_the_evaluation_stops_before_the_export(tiny_model_dir, text_dir, tmp_path):
    phases = []

    def cancel_once_evaluating():
        return bool(phases) and phases[-1] == "search" and len(phases) >= 3

    with pytest.raises(Cancelled, match="evaluation"):
        run_allocation(_config(tiny_model_dir, text_dir), tmp_path, evaluate=True, checkpoint=True,
                       progress=lambda r: phases.append(r["phase"]), should_cancel=cancel_once_evaluating)
    assert not (tmp_path / "checkpoint.tar").exists() and not (tmp_path / "evaluation.json").exists()


@pytest.mark.parametrize("duo_steps, trained", [(None, 3), (2, 2)])
def test_the_duo_baseline_trains_as_long_as_the_search_unless_told(tiny_model_dir, text_dir, tmp_path, monkeypatch,
                                                                   duo_steps, trained):
    from consa.evaluation import duo

    steps, scores = [], duo.duo_head_scores
    monkeypatch.setattr(duo, "duo_head_scores", lambda *a, **k: steps.append(k["steps"]) or scores(*a, **k))
    run = run_allocation(_config(tiny_model_dir, text_dir), tmp_path, evaluate=True, baselines=["duo"],
                         duo_steps=duo_steps, heatmap=False)
    assert steps == [trained] and {r["name"] for r in run.evaluation} == {"full", "learned", "duo"}
