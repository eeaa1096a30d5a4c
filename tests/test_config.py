"""SearchConfig is the one source of the search settings: the CLI, the API and the worker follow it."""

from dataclasses import MISSING, fields

import pytest

from consa import SearchConfig
from consa.cli.commands import build_parser
from consa.core.config import setting_fields


def _search_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["search"]


def test_every_setting_is_a_search_flag_with_the_same_default():
    flags = {a.dest: a for a in _search_parser()._actions}
    for name, _, default, meta, _ in setting_fields():
        assert name in flags, f"SearchConfig.{name} is not a `consa search` flag"
        assert f"--{name.replace('_', '-')}" in flags[name].option_strings
        assert flags[name].required == (default is MISSING)
        if default is not MISSING:
            assert flags[name].default == default
        if "choices" in meta:
            assert meta["choices"]  # resolved from its registry


def test_every_setting_is_a_job_field_with_the_same_default_and_bounds():
    pytest.importorskip("fastapi")
    from service.schemas import JobCreate

    for name, _, default, meta, _ in setting_fields():
        assert name in JobCreate.model_fields, f"SearchConfig.{name} is not a JobCreate field"
        field = JobCreate.model_fields[name]
        assert field.is_required() == (default is MISSING)
        if default is not MISSING:
            assert field.default == default
        schema = JobCreate.model_json_schema()["properties"][name]
        for bound, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum")):
            if bound in meta:
                options = schema.get("anyOf", [schema])
                assert any(o.get(key) == meta[bound] for o in options), (name, bound)


def test_a_job_config_round_trips_into_the_search_config_the_worker_runs():
    pytest.importorskip("fastapi")
    from service.schemas import JobCreate
    from worker.runner import search_config_of

    body = dict(model="/models/m", sparsity=0.375, granularity="layer", window=64, sink_tokens=4,
                dataset="/data/text", retrieval_ratio=0.1, seq_len=512, batch_size=2, steps=7, lr=0.05,
                objective="distill", seed=3, warmup_frac=0.5)
    params = JobCreate(**body, evaluate=True, metadata={"a": "b"}).model_dump(exclude={"metadata"})
    assert search_config_of(params) == SearchConfig(**body)
    every = {f.name for f in fields(SearchConfig)}
    assert every <= set(params)  # nothing the worker needs is dropped on the way


@pytest.mark.parametrize("name,value", [("sparsity", 1.5), ("window", 0), ("granularity", "block"),
                                        ("objective", "rl"), ("steps", 0), ("lr", -1.0)])
def test_the_cli_and_the_api_refuse_what_the_library_refuses(name, value, tmp_path):
    with pytest.raises(ValueError):
        SearchConfig(**{"model": "m", "sparsity": 0.5, name: value})
    with pytest.raises(SystemExit):  # argparse keeps the last of a repeated flag
        build_parser().parse_args(["search", "--model", "m", "--sparsity", "0.5", "--out", str(tmp_path),
                                   f"--{name.replace('_', '-')}", str(value)])
    pytest.importorskip("fastapi")
    from pydantic import ValidationError

    from service.schemas import JobCreate

    with pytest.raises(ValidationError):
        JobCreate(**{"model": "m", "sparsity": 0.5, name: value})
