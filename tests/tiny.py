"""Tiny random decoders and a real byte-level BPE tokenizer, built offline for tests."""

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

STDLIB = Path(os.path.dirname(os.__file__))
CORPUS_FILES = ["argparse.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py"]


def corpus_texts() -> list[str]:
    return [(STDLIB / name).read_text() for name in CORPUS_FILES]


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(model_type: str = "qwen3", vocab_size: int = 300, layers: int = 4, kv_heads: int = 2, **extra):
    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=2048,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    if model_type == "mistral":
        fields["sliding_window"] = None
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def build_model(model_type: str = "qwen3", seed: int = 0, **config):
    """SDPA, or eager for a family without it (Gemma 2), as consa and stock transformers load it."""
    from consa.model.loading import stock_attention

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **config)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=stock_attention(cfg)).eval()


def save_tiny(path, model_type: str = "qwen3", seed: int = 0, **config) -> Path:
    path = Path(path)
    build_model(model_type, seed, **config).save_pretrained(path)
    build_tokenizer(config.get("vocab_size", 300)).save_pretrained(path)
    return path


def write_text_dir(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, text in zip(CORPUS_FILES, corpus_texts()):
        (path / name).write_text(text)
    return path
