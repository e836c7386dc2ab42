"""Start-up: what a 4-token answer pays before its first token, and that the fast paths give
exactly what the slow ones gave."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tpllama


def test_gguf_header_reader_agrees_with_the_gguf_package(smol_gguf):
    import gguf

    from tpllama.weights.gguf_file import GGUFFile

    ours, ref = GGUFFile(smol_gguf), gguf.GGUFReader(str(smol_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(x) for x in b.shape) and a.tensor_type == b.tensor_type, a.name
        assert a.data.shape == b.data.shape and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries (version, counts), not metadata
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.fields[key] == len(field.data), key  # arrays: their length only
        else:
            assert ours.fields[key] == field.contents(), key


def test_truncated_gguf_header_is_refused(smol_gguf, tmp_path):
    from tpllama.weights.checkpoint import CheckpointError, open_checkpoint

    f = tmp_path / "cut.gguf"
    f.write_bytes(smol_gguf.read_bytes()[:300_000])  # inside the vocabulary
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        open_checkpoint(f)


def test_q8_embedding_dequantized_as_the_gguf_package_does(smol_gguf):
    from gguf.quants import dequantize

    from tpllama.weights.checkpoint import EMBED, open_checkpoint

    ckpt = open_checkpoint(smol_gguf)
    t = ckpt._tensor(EMBED)
    want = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    assert torch.equal(ckpt.read(EMBED), want.reshape(ckpt.shape(EMBED)))


def test_tokenizer_without_transformers_agrees_with_transformers(smol_gguf):
    """tokenizer.json read by the tokenizers library: the ids, text and chat ids transformers gives."""
    from transformers import AutoTokenizer

    from tpllama.env import cache_dir
    from tpllama.weights.tokenizer import FastTokenizer, gguf_tokenizer_dir, load_tokenizer

    directory = gguf_tokenizer_dir(smol_gguf, cache_dir())
    ours, ref = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(ours, FastTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                    ref.pad_token_id, ref.unk_token_id)
    for text in ["Hello world", "  two  spaces\n\nnew lines\t", "ünïcödé → 東京 🙂", "<|im_start|>user\nhi<|im_end|>", ""]:
        for special in (True, False):
            ids = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    for conversation in ([{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a planet."}]):
        for generation_prompt in (True, False):
            want = ref.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True)
            want = list(want["input_ids"] if hasattr(want, "keys") else want)
            assert ours.chat(conversation, add_generation_prompt=generation_prompt) == want


LIGHT = """
import sys
import tpllama
from tpllama.cli import build_parser
build_parser()
heavy = sorted(m for m in ("torch", "transformers", "fastapi", "uvicorn", "gguf") if m in sys.modules)
print(",".join(heavy))
"""


def test_import_and_the_command_line_pay_for_nothing_they_do_not_run():
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""  # neither `import tpllama` nor the CLI's parser imports them
    help_ = subprocess.run([sys.executable, "-m", "tpllama", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--max-batch" in help_.stdout


def test_modules_are_built_without_initialising_weights(tiny_dirs, monkeypatch):
    """No random initialisation on any path: the weights are loaded right after."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was initialised")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    with tpllama.load(tiny_dirs["gqa6"]) as engine:
        assert engine.generate([[5, 6, 7]], max_new_tokens=2).shape == (1, 5)


def test_startup_benchmark_measures_a_process(tmp_path):
    from tpllama.bench import startup

    r = startup.run_case([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(0.2)"], env=None)
    assert r["exit_code"] == 0 and 0 < r["first_s"] < r["end_s"] and r["end_s"] >= 0.2
    text = startup.table([dict(r, case="echo", cache="warm")])
    assert "| echo | warm |" in text


def test_building_every_extension_at_set_up():
    """``python -m tpllama.kernels`` (run by ``make`` at set-up) builds or loads every C++
    extension and says which this machine uses."""
    from tpllama import kernels

    out = subprocess.run([sys.executable, "-m", "tpllama.kernels"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expect = "ready" if kernels.available() else "not available here"
    for path in kernels.runnable_paths() or ["avx2"]:  # every path this CPU runs
        assert any(line.startswith(f"CPU kernels ({path}): " + expect) for line in lines), out.stdout
    assert any(line.startswith("shared-memory collectives: ") for line in lines)
    assert any(line.startswith("TCP collectives: ") for line in lines)
    assert f"kernel path: {kernels.isa()}" in lines
