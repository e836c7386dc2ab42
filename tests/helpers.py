"""Shared test helpers: tiny random LLaMA checkpoints and transformers references."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONFIGS = {
    # 5 heads, 1 KV head (MQA), untied, odd sizes
    "mqa5": dict(hidden_size=80, intermediate_size=96, num_attention_heads=5, num_key_value_heads=1,
                 num_hidden_layers=2, vocab_size=131, tie_word_embeddings=False),
    # GQA 6 heads / 3 KV heads, tied embeddings, FFN not a multiple of 32
    "gqa6": dict(hidden_size=96, intermediate_size=100, num_attention_heads=6, num_key_value_heads=3,
                 num_hidden_layers=3, vocab_size=97, tie_word_embeddings=True),
    # MHA 4 heads, llama3 rope scaling, explicit head_dim
    "mha4-llama3": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=16, num_hidden_layers=2, vocab_size=120, tie_word_embeddings=False,
                        rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
    # 9 heads / 3 KV heads like SmolLM2, FFN multiple of 32, 3 layers
    "smol-like": dict(hidden_size=72, intermediate_size=192, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=3, vocab_size=150, tie_word_embeddings=True),
    # every width a multiple of 32, so every linear layer can be quantized (int8/int4 blocks of 32)
    "q32": dict(hidden_size=192, intermediate_size=320, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                num_hidden_layers=2, vocab_size=150, tie_word_embeddings=True),
}


def make_tiny_hf(directory: Path, name: str = "gqa6", seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random LlamaForCausalLM with one of TINY_CONFIGS into ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(TINY_CONFIGS[name], max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    cfg = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the default init, so logits are far from flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def hf_model(directory: Path):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_greedy(model, input_ids: torch.Tensor, new: int, eos=None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
