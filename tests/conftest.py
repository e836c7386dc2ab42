"""Session-wide fixtures: tiny random checkpoints and the default model (SmolLM2-135M)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TINY_CONFIGS, make_fresh_cache, make_tiny_hf  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved random checkpoint per TINY_CONFIGS entry."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_hf(root / name, name, seed=i) for i, name in enumerate(TINY_CONFIGS)}


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The default model's GGUF (fetched into the cache on first use)."""
    from tpllama.weights.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_hf_dir(smol_gguf, tmp_path_factory) -> Path:
    """SmolLM2 as an HF directory, converted by transformers' own GGUF loader (an independent
    dequantization and q/k un-permutation), saved as safetensors."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("smol-hf")
    model = LlamaForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name, torch_dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """Where cuts made by tests go (the model cache itself stays shared)."""
    return Path(os.environ.get("TPLLAMA_CACHE") or Path.home() / ".cache" / "tpllama")



@pytest.fixture
def fresh_cache(tmp_path) -> Path:
    """An empty cache for this test (parts, tokenizers) with the extensions already built."""
    return make_fresh_cache(tmp_path / "cache")
