"""Frozen weights sharded over the data-parallel ranks (FSDP2), for a model larger than one GPU.

A data-parallel search (consa.search.distributed) holds a whole copy of the frozen model on every GPU. With
`shard_weights`, each rank holds 1/N of every decoder layer instead (torch.distributed.fsdp.fully_shard):
a layer's weights are gathered for its forward (and for its recomputation) and freed after. The weights are
frozen, so no weight gradient is reduced; the gates' gradient is averaged exactly as without sharding, and
the gates come out the same (tests/test_sharding.py). The embeddings, the final norm and the LM head stay
whole on every rank: the search's loss uses the head outside the model's forward (consa.search.objectives).

No rank ever holds the whole model on its GPU: every rank builds it on the meta device, shards it,
allocates its own shards, and rank 0 reads the checkpoint (into CPU memory) and broadcasts it.

What runs after the search in the same process (evaluation, export) needs the whole model on rank 0, so a
sharded search does neither (consa.recipe.pipeline refuses them up front).
"""

import functools

import torch

from consa.model.devices import data_parallel, env_world_size, pick_device
from consa.model.hybrid_attention import decoder_layers
from consa.model.loading import LOAD_ERRORS, load_error, load_model, refuse_export, stock_attention, weight_dtype

# auto shards when the frozen weights alone would take more than this share of one GPU's memory.
SHARE_OF_DEVICE = 0.5


def weight_bytes(config) -> int:
    """What the frozen weights of config.model take on the device, from its config alone (nothing loaded)."""

    return _parameter_count(config.model, config.revision) * \
        weight_dtype(config, "cuda" if torch.cuda.is_available() else "cpu").itemsize


@functools.cache
def _parameter_count(model: str, revision: str | None) -> int:
    """Counted once per model: a job asks before it refuses evaluation and again when it loads."""
    from transformers import AutoConfig, AutoModelForCausalLM


    try:
        cfg = AutoConfig.from_pretrained(model, revision=revision)
    except LOAD_ERRORS as e:
        raise load_error(model, e) from None
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def should_shard(config, world_size: int, device, model=None) -> bool:
    """Whether a search with `config` over `world_size` processes shards its weights (`model`: one already
    loaded, whose weights are counted instead). Every rank answers the same (same config, same GPU model),
    which they must: sharding is a collective decision."""
    if world_size <= 1 or config.shard_weights == "off":
        return False
    if config.shard_weights == "on":
        return True
    device = torch.device(device)
    if device.type != "cuda":
        return False
    size = weight_bytes(config) if model is None else sum(p.numel() * p.element_size() for p in model.parameters())
    return size > SHARE_OF_DEVICE * torch.cuda.get_device_properties(device).total_memory


def shard(model, device) -> None:
    """fully_shard every decoder layer over the process group's ranks (the group must be up)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh)
    model.consa_sharded = True


def _rebuild_rotary(model, device) -> None:
    """Rotary embeddings keep their frequencies in non-persistent buffers, which no checkpoint carries: a model
    built on the meta device computes them again here."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, child = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent_name) if parent_name else model, child, type(module)(module.config))


def load_sharded(config, device):
    """(model, tokenizer) with every decoder layer sharded over the ranks of the (already joined) group; rank 0
    reads the weights and broadcasts them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    device = torch.device(device)
    dtype = weight_dtype(config, device)
    full_state = {}
    try:
        if dist.get_rank() == 0:
            whole, tokenizer = load_model(config.model, config.revision, "cpu", dtype)
            full_state = whole.state_dict()
            del whole
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision)
            tokenizer.model_max_length = int(1e12)
        cfg = AutoConfig.from_pretrained(config.model, revision=config.revision)
    except LOAD_ERRORS as e:
        raise load_error(config.model, e) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=stock_attention(cfg))
    shard(model, device)
    model.to_empty(device=device)
    _rebuild_rotary(model, device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if model.config.tie_word_embeddings:
        model.tie_weights()  # to_empty gave the head its own storage
    return model.eval(), tokenizer


def load_for_search(config, device="auto"):
    """The model and tokenizer as run_search loads them (its device and weight dtype), for callers
    that keep using the model afterwards (the pipeline evaluates on the same copy). Under data parallelism
    with sharded weights (this module) every rank loads its shards together with the others."""
    device = pick_device(str(device))
    refuse_export(config.model)  # on every rank, before any of them waits for another
    if should_shard(config, env_world_size(), device):
        data_parallel(device)  # the ranks load together: rank 0 reads the weights and broadcasts them
        return load_sharded(config, device)
    return load_model(config.model, config.revision, device, weight_dtype(config, device))
