"""Sharded frozen weights (consa.model.sharding, FSDP2) on CPU with gloo: 2 processes each hold half of every decoder
layer, and the search learns the same gates as with whole copies."""

import pytest
import torch
import torch.multiprocessing as mp

from consa.core.config import SearchConfig
from consa.core.errors import ConsaError
from consa.model.sharding import should_shard
from test_distributed import _config, _join, pytestmark  # noqa: F401  (pytestmark: skipped without distributed)


def _rank(rank, world_size, port, config_dict, out_path):
    from consa.model.hybrid_attention import decoder_layers
    from consa.search.loop import run_search

    _join(rank, world_size, port)
    seen = {}

    def progress(record):  # rank 0 only: what its first decoder layer holds while the search runs
        weight = decoder_layers(model_of[0])[0].self_attn.q_proj.weight
        seen["local"] = tuple(weight.to_local().shape) if hasattr(weight, "to_local") else tuple(weight.shape)

    from consa.search import loop as search
    model_of, load = [], search.load_for_search

    def loading(*args, **kwargs):  # the model run_search loads, to look into it while it runs
        loaded = load(*args, **kwargs)
        model_of.append(loaded[0])
        return loaded

    search.load_for_search = loading
    result = run_search(SearchConfig.from_dict(config_dict), device="cpu", progress=progress)
    torch.save({"log_alpha": result.gate_state["log_alpha"], "full": result.allocation.full_mask(),
                "sharded": result.allocation.training["weights_sharded"], "seen": seen},
               f"{out_path}.rank{rank}.pt")


def _search(config, tmp_path, name):
    from consa.search.distributed import _free_port

    mp.start_processes(_rank, args=(2, _free_port(), config.to_dict(), str(tmp_path / name)), nprocs=2,
                       start_method="spawn")
    return [torch.load(tmp_path / f"{name}.rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_two_ranks_with_sharded_weights_learn_the_gates_of_two_ranks_with_whole_copies(tiny_model_dir, text_dir,
                                                                                        tmp_path):
    whole = _search(_config(tiny_model_dir, text_dir, shard_weights="off"), tmp_path, "whole")
    sharded = _search(_config(tiny_model_dir, text_dir, shard_weights="on"), tmp_path, "sharded")
    assert [r["sharded"] for r in whole + sharded] == [False, False, True, True]
    q_proj = tuple(whole[0]["seen"]["local"])
    assert sharded[0]["seen"]["local"] == (q_proj[0] // 2, q_proj[1])  # half of the layer on each rank
    assert torch.equal(sharded[0]["log_alpha"], sharded[1]["log_alpha"])
    assert torch.allclose(sharded[0]["log_alpha"], whole[0]["log_alpha"], atol=1e-5)
    assert torch.equal(sharded[0]["full"], whole[0]["full"])
    assert not torch.allclose(whole[0]["log_alpha"], torch.full((8,), 3.0))  # the gates did learn


def test_who_shards(tiny_model_dir, text_dir):
    config = _config(tiny_model_dir, text_dir)  # shard_weights auto
    assert not should_shard(config, 2, "cpu")  # auto: only where a GPU's memory is short
    assert should_shard(_config(tiny_model_dir, text_dir, shard_weights="on"), 2, "cpu")
    assert not should_shard(_config(tiny_model_dir, text_dir, shard_weights="on"), 1, "cpu")  # one process: no one to share with


def test_a_sharded_search_refuses_evaluation_and_export_before_it_loads_anything(tiny_model_dir, text_dir, tmp_path,
                                                                                monkeypatch):
    from consa.recipe.pipeline import run_allocation

    monkeypatch.setenv("WORLD_SIZE", "2")  # no group is joined: the refusal comes first
    config = _config(tiny_model_dir, text_dir, shard_weights="on")
    for flags in ({"evaluate": True}, {"checkpoint": True}):
        with pytest.raises(ConsaError, match="cannot evaluate or export"):
            run_allocation(config, tmp_path / "out", device="cpu", **flags)


def test_a_model_passed_in_whole_cannot_join_a_sharded_search(tiny_model_dir, text_dir, monkeypatch):
    import tiny
    from consa.search.loop import run_search

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConsaError, match="must too"):
        run_search(_config(tiny_model_dir, text_dir, shard_weights="on"), model=tiny.build_model())


def test_the_weights_are_counted_from_the_config_alone(tiny_model_dir, text_dir, tmp_path):
    import tiny
    from consa.core.errors import ModelLoadError
    from consa.model.sharding import weight_bytes

    model = tiny.build_model()  # the architecture tiny_model_dir holds; float32 on the CPU
    assert weight_bytes(_config(tiny_model_dir, text_dir)) == sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(ModelLoadError, match="cannot load model"):
        weight_bytes(_config(tmp_path / "nothing-here", text_dir))
