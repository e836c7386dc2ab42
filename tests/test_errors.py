"""Bad input gets a clear error naming the value and what is allowed, before any work starts."""

import json
import shutil

import pytest
import torch

import tpllama
from tpllama.weights.checkpoint import CheckpointError
from tpllama.config import ConfigError


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    with tpllama.load(tiny_dirs["gqa6"]) as e:
        yield e


def copy_of(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tpllama.load(tmp_path / "nope")


def test_not_a_llama(tiny_dirs, tmp_path):
    d = copy_of(tiny_dirs["gqa6"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not a LLaMA-family checkpoint.*gpt2"):
        tpllama.load(d)


def test_corrupt_safetensors_header(tiny_dirs, tmp_path):
    d = copy_of(tiny_dirs["gqa6"], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tpllama.load(d)


def test_truncated_safetensors(tiny_dirs, tmp_path):
    d = copy_of(tiny_dirs["gqa6"], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        tpllama.load(d)


def test_truncated_gguf(smol_gguf, tmp_path):
    f = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as src:
        f.write_bytes(src.read(5_000_000))
    with pytest.raises(CheckpointError, match="GGUF"):
        tpllama.load(f)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a model directory nor a GGUF"):
        tpllama.load(f)


def test_tensor_of_wrong_shape(tiny_dirs, tmp_path):
    d = copy_of(tiny_dirs["gqa6"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has shape \(100, 96\), expected \(104, 96\)"):
        tpllama.load(d)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="float64"), "dtype 'float64' is not supported"),
    (dict(quant="int3"), "quantization 'int3' is not supported"),
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(timeout_s=-1), "timeout_s"),
])
def test_bad_load_options(tiny_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tpllama.load(tiny_dirs["gqa6"], **kwargs)


@pytest.mark.parametrize("device,match", [
    ("tpu", "device 'tpu' is not understood; allowed: cpu, cuda, cuda:N, auto"),
    ("mps", "device 'mps' is not supported; allowed: cpu, cuda"),
])
def test_bad_device(tiny_dirs, device, match):
    with pytest.raises(ValueError, match=match):
        tpllama.load(tiny_dirs["gqa6"], device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is visible")
@pytest.mark.parametrize("world_size", [1, 2])
def test_cuda_asked_for_without_a_gpu(tiny_dirs, world_size):
    with pytest.raises(ValueError, match="no CUDA GPU is visible here; use --device cpu"):
        tpllama.load(tiny_dirs["gqa6"], world_size=world_size, device="cuda")


def test_world_size_larger_than_query_heads(tiny_dirs):
    with pytest.raises(ValueError, match="world size 6 is larger than the model's 5 query heads"):
        tpllama.load(tiny_dirs["mqa5"], world_size=6)


@pytest.mark.parametrize("ids,match", [
    ([[1, -1, 3]], "token id -1; allowed: 0 <= id < vocab_size \\(97\\)"),
    ([[1, 97]], "token id 97"),
    ([[1, 2**62]], "token id"),
    ([[1.5, 2.0]], "must hold integers"),
    ([[]], "shape"),
    (torch.zeros(2, 2, 2, dtype=torch.int64), "shape \\[batch, seq\\]"),
])
def test_bad_input_ids(engine, ids, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(1, 4), "shape \\(1, 4\\)"),
    (torch.ones(1, 1, 3, 3, dtype=torch.float16), "must be float32"),
    (torch.full((1, 1, 3, 3), 0.5), "0.0 \\(attend\\) or a large negative"),
    (torch.zeros(1, 1, 3, 3), "not a causal mask"),
    (torch.tensor([[2, 1, 1]]), "only 0 \\(padding\\) and 1"),
    (torch.ones(1, 3, 1), "2-D \\[batch, seq\\] or 4-D"),
])
def test_bad_masks(engine, mask, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(torch.tensor([[5, 6, 7]]), attention_mask=mask, max_new_tokens=2)


def test_prompt_plus_new_tokens_beyond_context(engine):
    with pytest.raises(ValueError, match="prompt of 3 tokens \\+ max_new_tokens 254 = 257 exceeds the model's context length 256"):
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=254)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-5), "seed"),
    (dict(stop=["x"]), "stop strings need a tokenizer"),
    (dict(stop=[""]), "stop must be non-empty strings"),  # the same rule as the server's (400 naming stop)
    (dict(stop=""), "stop must be non-empty strings"),
    (dict(colour=3), "unknown sampling parameter"),
])
def test_bad_sampling_parameters(engine, kwargs, match):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        engine.generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_engine_still_serves_after_bad_requests(engine):
    ids = torch.tensor([[5, 6, 7, 8]])
    before = engine.generate(ids, max_new_tokens=8)
    for bad in ([[-1]], [[10**6]]):
        with pytest.raises(ValueError):
            engine.generate(bad, max_new_tokens=8)
    assert torch.equal(engine.generate(ids, max_new_tokens=8), before)
