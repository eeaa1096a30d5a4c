"""The modeling file a consa-format checkpoint ships beside its weights (`modeling_consa_hybrid.py`).

A KV-head hybrid (or a layer hybrid no stock config can express) must never load as plain full
attention. Its config.json therefore names model type "consa_hybrid" with an `auto_map` pointing
here, the Hugging Face convention for custom architectures: stock `from_pretrained` refuses it
unless given `trust_remote_code=True`, and then builds the classes below, which subclass the base
family's model (Qwen3, Llama, ...) and install consa's hybrid attention with the allocation's hard
gates. The attention itself is consa's, so consa must be installed; without it the import fails
with a message saying so.

`consa.export.checkpoint` copies this file and fills in BASE_MODEL_TYPE; it also registers `hybrid_classes`
with transformers' Auto classes, so that a process that imported consa needs no remote code at all.
"""

from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE_MODEL_TYPE = ""  # the family this checkpoint's weights belong to, written at export
MODEL_TYPE = "consa_hybrid"


def _install_hybrid(model, config) -> None:
    try:
        from consa.model.hybrid_attention import apply_allocation
        from consa.core.manifest import Allocation
        from consa.runtime.generation import use_hybrid_cache
    except ImportError as e:
        raise ImportError(
            "this checkpoint is a consa hybrid (some attention heads are sliding-window): its attention "
            f"comes from the consa package, which cannot be imported ({e}). Install it (pip install consa) "
            "and load with trust_remote_code=True or consa.load_hybrid(path)") from None
    import torch

    with torch.device("cpu"):  # from_pretrained builds the model on the meta device; the gates are real
        apply_allocation(model, Allocation.from_dict(config.consa["allocation"]))
    use_hybrid_cache(model)  # generate() keeps only the window for SWA heads


def hybrid_classes(base_model_type: str):
    """(config class, causal-LM class) for a hybrid of `base_model_type`."""
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]

    class ConsaHybridConfig(base_config):
        model_type = MODEL_TYPE

    class ConsaHybridForCausalLM(base_model):
        config_class = ConsaHybridConfig

        def __init__(self, config):
            super().__init__(config)
            _install_hybrid(self, config)

    return ConsaHybridConfig, ConsaHybridForCausalLM


if BASE_MODEL_TYPE:
    ConsaHybridConfig, ConsaHybridForCausalLM = hybrid_classes(BASE_MODEL_TYPE)
