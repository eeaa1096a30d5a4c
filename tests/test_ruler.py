"""RULER's synthetic tasks generated from the user's text: prompts that fit the asked context length,
answers exactly where RULER puts them, the same prompts for the same seed; scored by greedy decoding
with RULER's string match (a solver that reads the prompt gets 100, a random tiny model next to 0);
reported per context length by `consa eval` and in a job's evaluation records."""

import contextlib
import dataclasses
import io
import json
import re
from collections import Counter

import pytest
import tiny
import torch

from consa.core.errors import Cancelled
from consa.core.manifest import Allocation
from consa.evaluation import ruler
from consa.evaluation.compare import markdown_table

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

LENGTHS = [1536, 2048]
TEXT_HAYSTACK = [t for t, spec in ruler.TASKS.items() if spec.get("haystack") == "text"]



@pytest.fixture(scope="module")
def tok():
    """A 2000-token BPE: English costs the 300-token test tokenizer a token per character or so."""
    return tiny.build_tokenizer(2000)


@pytest.fixture(scope="module")
def samples(tok):
    return ruler.build_samples(tok, tiny.corpus_texts(), LENGTHS, samples=2, seed=0)


def solve(sample) -> str:
    """What a model that reads the prompt right would answer: the answers, found in the prompt alone."""
    p, kind = sample.prompt, ruler.TASKS[sample.task]["kind"]
    if kind == "niah":
        body, question = p.rsplit("\nWhat ", 1)
        keys = re.split(r", and |, ", re.search(r"for (.+) mentioned in the provided text\?", question).group(1))
        return " ".join(v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", body))
    if kind == "vt":
        main = p[p.rindex("Memorize and track"):]  # after the one-shot example
        value = re.search(r"assigned the value (\d+) in the text above", main).group(1)
        assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", main))
        found = {name for name, x in assigned.items() if x == value}
        while True:
            more = {name for name, x in assigned.items() if x.startswith("VAR ") and x[4:] in found} - found
            if not more:
                return " ".join(sorted(found))
            found |= more
    if kind == "cwe":
        listed = p[p.rindex("Below is a numbered list"):].split("\nQuestion:")[0]
        return " ".join(w for w, _ in Counter(re.findall(r"\d+\. (\S+)", listed)).most_common(10))
    coded = p[p.rindex("coded words. ") + len("coded words. "):].split("\nQuestion:")[0]
    return " ".join(w for w, _ in Counter(w for w in coded.split() if w != "...").most_common(3))


def test_prompts_fit_their_length_and_hold_their_answers(samples, tok):
    assert {(s.task, s.length) for s in samples} == {(t, n) for t in ruler.TASKS for n in LENGTHS}
    for s in samples:
        assert s.input_ids == tok(s.prompt)["input_ids"]
        total = len(s.input_ids) + s.max_new_tokens  # RULER's rule: prompt + tokens to generate <= length
        assert 0.75 * s.length <= total <= s.length, (s.task, s.length, total)
        assert s.max_new_tokens == ruler.TOKENS_TO_GENERATE[ruler.TASKS[s.task]["kind"]]
        spec = ruler.TASKS[s.task]
        if spec["kind"] == "niah":
            assert len(s.answers) == spec["num_v"] * spec["num_q"]
            for value in s.answers:  # each value once, in its needle, before the question
                assert s.prompt.count(value) == 1 and f"is: {value}." in s.prompt.rsplit("\nWhat ", 1)[0]
            assert s.prompt.endswith("mentioned in the provided text " + ("is" if len(s.answers) == 1 else "are"))
        elif spec["kind"] == "vt":
            main = s.prompt[s.prompt.rindex("Memorize and track"):]
            first, *rest = s.answers
            assert len(s.answers) == 5 and re.search(rf"VAR {first} = \d{{5}}", main)
            assert all(f"VAR {b} = VAR {a}" in main for a, b in zip(s.answers, rest))
            assert s.prompt.count("Memorize and track") == 2  # RULER's one-shot example first
        elif spec["kind"] == "cwe":
            listed = s.prompt[s.prompt.rindex("Below is a numbered list"):]
            counts = Counter(re.findall(r"\d+\. (\S+)", listed.split("\nQuestion:")[0]))
            assert len(s.answers) == 10 and all(counts[w] == 6 for w in s.answers)  # RULER below 4096: 6 and 1
            assert sorted(counts.values())[:-10] == [1] * (len(counts) - 10)
        else:
            coded = Counter(s.prompt.split("coded words. ")[1].split("\nQuestion:")[0].split())
            ranked = [w for w, _ in coded.most_common()]
            assert ranked[0] == "..." and ranked[1:4] == s.answers
    # the haystack is the user's text: a run of its words sits in every text-haystack prompt
    corpus = re.sub(r"\s+", " ", " ".join(tiny.corpus_texts()))
    for s in samples:
        if s.task in TEXT_HAYSTACK:
            context = s.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]
            longest = max(re.split(r" ?One of the special magic \S+ for \S+ is: \S+\. ?", context), key=len)
            words = longest.split(" ")
            windows = [" ".join(words[i:i + 12]) for i in range(0, len(words) - 12, 12)]
            assert len(words) > 100 and sum(w not in corpus for w in windows) <= 1  # one may span the wrap-around


def test_same_seed_same_prompts(samples, tok):
    again = ruler.build_samples(tok, tiny.corpus_texts(), [LENGTHS[0]], tasks=["niah_single_2", "vt", "fwe"],
                                samples=2, seed=0)
    first = {(s.task, s.prompt) for s in samples if s.length == LENGTHS[0]}
    assert {(s.task, s.prompt) for s in again} <= first
    other = ruler.build_samples(tok, tiny.corpus_texts(), [LENGTHS[0]], tasks=["niah_single_2"], samples=2, seed=1)
    assert not {s.prompt for s in other} & {s.prompt for s in again}
    short = ruler.build_samples(tok, tiny.corpus_texts(), [512], tasks=["fwe"], samples=1, max_new_tokens=4)
    assert short[0].max_new_tokens == 4 and 400 < len(short[0].input_ids) <= 508  # the prompt takes the room left
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.build_samples(tok, tiny.corpus_texts(), [512], tasks=["qa_1"])


def test_string_match_is_rulers():
    assert ruler.string_match_all(["The values are 12 and 34.", "12"], [["12", "34"], ["12", "56"]]) == 75.0
    assert ruler.string_match_part(["12"], [["12", "56"]]) == 100.0
    assert ruler.postprocess("  a\x00b\n") == "a\nb"


def test_a_solver_that_reads_the_prompt_scores_100_per_length(samples):
    report = ruler.score(samples, solve)
    assert set(report) == {str(n) for n in LENGTHS}
    for tasks in report.values():
        assert tasks == {**{t: 100.0 for t in ruler.TASKS}, "average": 100.0}
    assert ruler.average(report) == 100.0
    with pytest.raises(Cancelled):
        ruler.score(samples, solve, should_cancel=lambda: True)


def test_a_random_tiny_model_scores_low_and_decodes_greedily(samples, tok):
    model = tiny.build_model(vocab_size=2000)
    # one prompt per task, with 4 tokens to generate (the random model never stops early: it never answers)
    cheap = [dataclasses.replace(s, max_new_tokens=4) for s in samples if s.length == 1536][::2]
    report = ruler.evaluate_model(model, tok, cheap)
    assert set(report["1536"]) == set(ruler.TASKS) | {"average"} and report["1536"]["average"] < 20
    s = cheap[0]  # the decode with its KV cache is the model's greedy continuation
    want = model.generate(torch.tensor([s.input_ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = ruler.greedy_continuation(model, tok, s.input_ids, 4)
    assert got == tok.decode(want[0, len(s.input_ids):], skip_special_tokens=True)


def test_consa_eval_reports_ruler_per_length(tiny_model_dir, text_dir):
    from consa.cli.commands import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(text_dir), "--seq-len", "64",
                     "--num-sequences", "1", "--ruler-lengths", "512,768", "--ruler-tasks", "fwe",
                     "--ruler-samples", "1"]) == 0
    result = json.loads(out.getvalue())
    assert set(result["ruler"]) == {"512", "768"}
    assert set(result["ruler"]["768"]) == {"fwe", "average"}
    assert result["ruler_average"] is not None


def test_a_jobs_evaluation_records_ruler(tiny_model_dir, text_dir, tok, monkeypatch):
    from consa.core.config import SearchConfig
    from consa.evaluation.metrics import build_eval_set
    from consa.model.loading import load_model
    from consa.recipe import pipeline

    model, tokenizer = load_model(str(tiny_model_dir))
    config = SearchConfig(model=str(tiny_model_dir), dataset=str(text_dir), sparsity=0.5, window=8, seq_len=64)
    alloc = Allocation.from_full_mask(torch.tensor([[True, False], [False, True], [False, False], [True, True]]),
                                      model=str(tiny_model_dir), granularity="kv_head", window=8)
    eval_set = build_eval_set(tokenizer, str(text_dir), seq_len=64, num_sequences=2, retrieval_docs=0,
                              ruler_lengths=[1024], ruler_samples=1, ruler_tasks=["niah_single_1", "fwe"])
    assert [s.task for s in eval_set.ruler] == ["niah_single_1", "fwe"]
    for s in eval_set.ruler:  # a cheaper decode: the random model never finds the answer, so never stops early
        s.max_new_tokens = 4
    records = pipeline.evaluate_allocation(model, tokenizer, alloc, config, eval_set=eval_set, baselines=[])
    assert [r["name"] for r in records] == ["full", "learned"]
    assert all(set(r["ruler"]["1024"]) == {"niah_single_1", "fwe", "average"} for r in records)
    assert "| RULER |" in markdown_table(records)
    # built by the job itself: a seq_len too short for RULER's prompts is evaluated without them, said so
    monkeypatch.setattr(pipeline, "EVAL_RULER_MIN_SEQ_LEN", 64)
    events = []
    records = pipeline.evaluate_allocation(model, tokenizer, alloc, config, baselines=[],
                                           on_event=lambda kind, message: events.append((kind, message)))
    assert "ruler" not in records[0] and any("without RULER" in m for _, m in events)
    # the run option `ruler: false` leaves RULER out before any prompt is built: no warning either
    events.clear()
    records = pipeline.evaluate_allocation(model, tokenizer, alloc, config, baselines=[], ruler=False,
                                           on_event=lambda kind, message: events.append((kind, message)))
    assert "ruler" not in records[0] and not any("RULER" in m for _, m in events)


def test_the_ruler_run_option_is_a_job_field_and_the_estimate_follows_it(tiny_model_dir):
    from consa.core.config import RunOptions
    from service.estimate import estimate

    assert RunOptions().ruler is True and RunOptions.from_dict({"ruler": False}).ruler is False
    job = {"model": str(tiny_model_dir), "seq_len": 4096, "batch_size": 1, "steps": 100, "evaluate": True}
    with_ruler, without = estimate(job, "cpu", baselines=10), estimate(job | {"ruler": False}, "cpu", baselines=10)
    assert without["evaluation_s"] < with_ruler["evaluation_s"]
    # one part fewer (RULER) for each of the 12 allocations scored: full, learned and 10 baselines
    assert with_ruler["evaluation_units"] - without["evaluation_units"] == 12


def test_the_estimate_counts_the_search_warm_start(tiny_model_dir):
    from consa.core.config import WARM_STARTS
    from service.estimate import estimate

    job = {"model": str(tiny_model_dir), "seq_len": 512, "batch_size": 1, "steps": 100, "granularity": "kv_head"}
    plain = estimate(job, "cpu")["search_s"]
    warm = {name: estimate(job | {"warm_start": name}, "cpu")["search_s"] for name in WARM_STARTS}
    assert warm["none"] == plain and all(warm[name] > plain for name in WARM_STARTS if name != "none")
    assert warm["duo"] > warm["retrieval-heads"]  # 200 training steps against one pass over 8 rows


def test_the_estimates_copies_of_the_warm_start_sizes_match_the_library():
    from consa.evaluation import duo
    from consa.search import warm_start
    from service import estimate

    assert (estimate.WARM_START_ROWS, estimate.DUO_STEPS) == (warm_start.CALIBRATION_ROWS, duo.DEFAULT_STEPS)
