"""Running a model with consa's memory-saving KV cache: `generate` (and `use_hybrid_cache`, which
makes it the model's default), `compile_layers` for fast decoding, and the small shims over
transformers' renamed cache argument.

The cache itself is consa.runtime.cache (HybridCache for kv_head hybrids; a stock DynamicCache built from
`layer_types` for layer-granularity checkpoints); its bytes are counted by consa.runtime.kv_accounting.
"""

import functools
import inspect

import torch

from consa.runtime.cache import make_cache


def compile_layers(model, enable: bool = True, backend: str = "inductor"):
    """torch.compile each decoder layer around consa's cache and attention (which stay eager).

    At batch 1 a small model's decode step is hundreds of tiny kernels (RMSNorm, RoPE, residuals,
    activations) whose launch costs dwarf the KV read the hybrid saves; fusing them is what lets
    that saving show. Capture the step in a CUDA graph afterwards, as bench/runtime.py does.
    `enable=False` restores eager layers.
    """
    # Dynamo specialises each layer's graph on the layer_idx it hands the cache (an int argument at a
    # graph break), so a model needs one entry per layer and batch size; the compiled code itself is
    # the same and comes from inductor's cache after the first layer.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 1024)
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
    for layer in model.get_decoder().layers:
        if enable:
            layer.compile(dynamic=False, backend=backend)
        else:
            layer._compiled_call_impl = None
    return model


def generate(model, *args, **kwargs):
    """`model.generate` with the memory-saving cache unless the caller passes one."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
        kwargs[cache_kwarg(model)] = make_cache(model)
    return type(model).generate(model, *args, **kwargs)


def use_hybrid_cache(model):
    """Make `model.generate(...)` use `make_cache(model)` by default (load_hybrid does this)."""
    model.generate = functools.partial(generate, model)
    return model


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); forward takes whichever it knows."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(outputs):
    """The cache a forward returned, under either name."""
    return getattr(outputs, "cache", None) if getattr(outputs, "cache", None) is not None else outputs.past_key_values


__all__ = ["compile_layers", "generate", "use_hybrid_cache", "cache_kwarg", "output_cache"]
