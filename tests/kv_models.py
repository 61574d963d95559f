"""Tiny decoder models from configs (random weights) for the KV cache tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
        model: torch.nn.Module = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0
        )
        model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = 0
    return model.eval()
