"""Objects several tests (and benches) build the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Six small prompt/response pairs the training tests (and the kill-resume harness) train on.
TRAIN_ROWS = [
    {"id": "a", "prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"id": "b", "prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"id": "c", "prompt": "Capital of France?", "response": "The capital of France is Paris."},
    {"id": "d", "prompt": "Reverse 'abc'.", "response": "'cba'"},
    {"id": "e", "prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
    {"id": "f", "prompt": "Say hello.", "response": "Hello! How can I help you today?"},
]


def save_tiny_llama(folder: Path, tokenizer: Any) -> Path:
    """The suite's tiny model: a 2-layer, 64-wide llama with `tokenizer` (SmolLM2's), seeded, saved
    with its tokenizer as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
