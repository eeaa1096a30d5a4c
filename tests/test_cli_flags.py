"""Enumerated flags fail at parse time, naming the allowed values; `consa --version`."""

import pytest

from consa.cli.commands import build_parser

BASE = ["search", "--model", "m", "--sparsity", "0.5", "--out", "o"]


@pytest.mark.parametrize("flag,allowed", [("--granularity", "kv_head"), ("--objective", "lm"), ("--backend", "sdpa"),
                                          ("--dtype", "bfloat16")])
@pytest.mark.parametrize("prefix", [BASE, ["jobs", "submit", "--model", "m", "--sparsity", "0.5"]])
def test_an_unknown_choice_is_a_parse_error(prefix, flag, allowed, capsys):
    parser = build_parser()
    assert getattr(parser.parse_args([*prefix, flag, allowed]), flag[2:]) == allowed
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*prefix, flag, "nonsense"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "nonsense" in err and allowed in err


@pytest.mark.parametrize("argv", [["export", "--model", "m", "--allocation", "a", "--out", "o", "--format", "gz"],
                                  ["export", "--model", "m", "--allocation", "a", "--out", "o", "--dtype", "fp8"],
                                  ["import-duo", "p", "--out", "o", "--granularity", "row"]])
def test_export_choices_are_checked(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "invalid choice" in capsys.readouterr().err
