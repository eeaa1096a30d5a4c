"""Fused elementwise kernels for the frozen model: liger-kernel's RMSNorm, SwiGLU and RoPE on a GPU.

At long context a search step spends about a fifth of its time in memory-bound elementwise ops that
transformers runs one at a time (RMSNorm in fp32, SiLU x up, RoPE's rotate-half: bench/RESULTS.md),
and autograd keeps their intermediates: an fp32 copy of the input per RMSNorm, SiLU's output next to
both MLP projections. liger-kernel (the optional `fused` extra) has one Triton kernel for each, which
keeps less: RMSNorm its input and one fp32 per row, SwiGLU its two inputs (consa.search.memory counts both).

They go onto the model's own modules (RoPE, a function of the modeling module, is wrapped there) and
take over only for CUDA tensors, so the same model on the CPU runs transformers' code unchanged.
`remove` puts transformers' code back.
"""

import importlib.util
import sys
import warnings
from functools import cache, partial

import torch

OPS = ("rms_norm", "swiglu", "rope")


@cache
def available() -> bool:
    """A GPU is there for the Triton kernels, and liger-kernel's three imports work (an install that does not
    match this Triton or torch fails here, with a warning, rather than in the middle of a search)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: F401
        from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: F401
    except Exception as e:
        warnings.warn(f"liger-kernel is installed but cannot be used ({type(e).__name__}: {e}); "
                      "the search runs transformers' kernels")
        return False
    return True


def is_rms_norm(module) -> bool:
    """transformers' Llama-style RMSNorm (weight x normalized input; Gemma's 1 + weight is not one)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_swiglu(module) -> bool:
    """An MLP computing down(silu(gate(x)) * up(x))."""
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) \
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def _rms_norm(module, x):
    if not x.is_cuda:
        return type(module).forward(module, x)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # casting "llama": the inverse RMS in fp32, cast back before the weight, as transformers does;
    # in_place=False: the incoming gradient may still be read by another branch.
    return LigerRMSNormFunction.apply(x, module.weight, module.variance_epsilon, 0.0, "llama", False)


def _swiglu(module, x):
    if not x.is_cuda:
        return type(module).forward(module, x)
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return module.down_proj(LigerSiLUMulFunction.apply(module.gate_proj(x), module.up_proj(x)))


def _rope(original, q, k, cos, sin, *args, **kwargs):
    if not q.is_cuda or args or kwargs.get("unsqueeze_dim", 1) != 1:
        return original(q, k, cos, sin, *args, **kwargs)
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb(q, k, cos, sin)


def apply(model) -> list[str]:
    """Install the fused kernels on `model` where liger-kernel and a GPU are there; returns the ops fused
    (empty otherwise, and then nothing changed)."""
    if not available():
        return []
    fused = set()
    for module in model.modules():
        if is_rms_norm(module):
            module.forward = partial(_rms_norm, module)
            fused.add("rms_norm")
        elif is_swiglu(module):
            module.forward = partial(_swiglu, module)
            fused.add("swiglu")
    modeling = sys.modules.get(type(model).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is not None:
        if not isinstance(original, partial):  # already wrapped for another model of the family
            modeling.apply_rotary_pos_emb = partial(_rope, original)
        fused.add("rope")
    model.consa_fused_kernels = [op for op in OPS if op in fused]
    return model.consa_fused_kernels


def remove(model) -> None:
    """transformers' own code again: the modules' class forwards and the modeling module's RoPE."""
    if not getattr(model, "consa_fused_kernels", None):
        return
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), partial):
            del module.forward
    modeling = sys.modules.get(type(model).__module__)
    wrapped = getattr(modeling, "apply_rotary_pos_emb", None)
    if isinstance(wrapped, partial) and wrapped.func is _rope:
        modeling.apply_rotary_pos_emb = wrapped.args[0]
    model.consa_fused_kernels = []
