"""Shared test helpers: tiny random LLaMA checkpoints and transformers references."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

def random_weight(out: int, kin: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A [out, kin] weight of small random values, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, kin, generator=g) * 0.05).to(dtype)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Torch emulation of the CPU kernels' activation rounding: x [M, K] to int8 per 32-block
    (round half to even), returned dequantized as float."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(m, k)


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


def make_fresh_cache(root: Path) -> Path:
    """An empty tpllama cache at ``root`` that shares the built C++ extensions of the real one."""
    real = Path(os.environ.get("TPLLAMA_CACHE") or Path.home() / ".cache" / "tpllama")
    (real / "ext").mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ext").symlink_to(real / "ext")
    return root


def hf_model(directory: Path):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_greedy(model, input_ids: torch.Tensor, new: int, eos=None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)


# ---------------------------------------------------------------------- the seed's checkpoint layout
LLAMA1_WORDS = ("the cat dog sat on a mat under big small red blue tree house river city north south model token "
                "layer head rank split part weight value query key cache answer question capital France Paris "
                "one two three four five six seven eight nine ten hello world running jumped quickly slowly").split()


def train_sentencepiece(path: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """A small BPE sentencepiece model with byte fallback and LLaMA's ids (unk 0, <s> 1, </s> 2)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(LLAMA1_WORDS) for _ in range(rng.randint(4, 14))) + rng.choice([".", "?", "!", ","])
             for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def make_llama1_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random LLaMA in exactly the layout of decapoda-research/llama-13b-hf (the seed's checkpoint):
    sentencepiece ``tokenizer.model``, ``tokenizer_config.json`` naming ``LLaMATokenizer`` with empty
    special tokens, an empty ``special_tokens_map.json``, a LLaMA-1 ``config.json``
    (``LLaMAForCausalLM``, ``max_sequence_length``, ``pad_token_id: -1``, the wrong bos 0 / eos 1),
    float16 weights in ``pytorch_model-0000N-of-00002.bin`` shards with their index (and the
    ``rotary_emb.inv_freq`` buffers those files carry)."""
    import json

    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(directory / "tokenizer.model", seed=seed)))
    vocab = sp.get_piece_size()
    config = {"architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              "hidden_size": 64, "intermediate_size": 96, "initializer_range": 0.02, "max_sequence_length": 2048,
              "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": -1,
              "rms_norm_eps": 1e-06, "torch_dtype": "float16", "transformers_version": "4.27.0.dev0",
              "use_cache": True, "vocab_size": vocab}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "", "eos_token": "", "model_max_length": 1000000000000000019884624838656,
         "tokenizer_class": "LLaMATokenizer", "unk_token": ""}))
    (directory / "special_tokens_map.json").write_text("{}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_hidden_layers=2, vocab_size=vocab, rms_norm_eps=1e-6,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    shards: list[dict] = [{}, {}]
    for name, t in state.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        shards[0 if layer == 0 else 1][name] = t
    for i in range(2):
        shards[0 if i == 0 else 1][f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, directory / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory
