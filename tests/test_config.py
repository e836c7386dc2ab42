"""ModelArgs from HF config.json (both rope spellings, llama3 scaling) and from GGUF metadata."""

import math

import pytest
import torch

from tpllama.config import ConfigError, ModelArgs, rope_inv_freq

BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
            rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)


def test_old_spelling_llama3_scaling():
    cfg = dict(BASE, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0, original_max_position_embeddings=8192))
    a = ModelArgs.from_hf_config(cfg)
    assert (a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.n_layers) == (64, 4, 2, 16, 128, 2)
    assert a.rope_theta == 500000.0 and a.rope_scaling.rope_type == "llama3" and a.rope_scaling.factor == 8.0
    assert a.eos_token_ids == (2, 3) and a.bos_token_id == 1 and a.pad_token_id == 0
    assert a.max_seq_len == 512 and a.norm_eps == 1e-6


def test_new_spelling_rope_parameters_matches_old():
    old = ModelArgs.from_hf_config(dict(BASE, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}))
    new = ModelArgs.from_hf_config(dict(BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}))
    assert old == new
    plain = ModelArgs.from_hf_config(dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1234.0}))
    assert plain.rope_theta == 1234.0 and plain.rope_scaling.rope_type == "default"


def test_round_trip_through_hf_config():
    cfg = dict(BASE, head_dim=32, tie_word_embeddings=True, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64))
    a = ModelArgs.from_hf_config(cfg)
    assert a.head_dim == 32 and a.tie_word_embeddings
    assert ModelArgs.from_hf_config(a.to_hf_config()) == a


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    cfg = dict(BASE, rope_theta=500000.0, rope_scaling=scaling)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelArgs.from_hf_config(cfg))
    assert torch.equal(ours.float(), hf_inv.float())


@pytest.mark.parametrize("change,match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "not a LLaMA-family"),
    (dict(num_attention_heads=5, num_key_value_heads=2), "multiple of n_kv_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "not supported"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_bad_configs_are_refused(change, match):
    cfg = dict(BASE, **change)
    if cfg.get("hidden_size") is None:
        del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=match):
        ModelArgs.from_hf_config(cfg)


def test_gguf_fields():
    fields = {"general.architecture": "llama", "llama.embedding_length": 576, "llama.block_count": 30,
              "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536,
              "llama.vocab_size": 49152, "llama.rope.freq_base": 100000.0, "llama.context_length": 8192,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.bos_token_id": 1, "_tied": True}
    a = ModelArgs.from_gguf_fields(fields)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) == (576, 30, 9, 3, 64, 49152)
    assert a.tie_word_embeddings and a.eos_token_ids == (2,) and math.isclose(a.rope_theta, 1e5)
    with pytest.raises(ConfigError, match="architecture 'qwen2'"):
        ModelArgs.from_gguf_fields(dict(fields, **{"general.architecture": "qwen2"}))
