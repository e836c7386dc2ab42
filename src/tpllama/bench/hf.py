"""``tpllama bench --compare hf``: transformers' ``LlamaForCausalLM`` on the same weights.

The model is built in memory from a config and a state dict (no hub, no files written): from an
HF directory or a GGUF file through tpllama's own checkpoint reader (``open_checkpoint``: HF
names, float tensors, GGUF q/k permutation undone), or from a cut directory (a synthetic model,
or ``tpllama cut`` output) by concatenating the ranks' slices back (quantized slices
dequantized). It runs in a child process (``python -m tpllama.bench.hf REQUEST RESULT``) so its
memory peak is its own, with the thread count given, and is timed like ``bench.measure``:
prefill forward (logits of the last position only), then one-token forwards against a
``DynamicCache``, greedy, EOS ignored, exactly ``output_len`` tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import ModelArgs, torch_dtype
from ..parallel.plan import split_rule
from ..weights.checkpoint import expected_shapes, open_checkpoint
from ..weights.parts import is_cut_dir, read_manifest


# ---------------------------------------------------------------------- weights
def state_from_cut(directory: Path, dtype: torch.dtype) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The whole model's HF state dict, concatenated back from a cut directory's parts."""
    from safetensors import safe_open

    from ..model import quant as quantmod

    manifest = read_manifest(directory)
    args = ModelArgs.from_hf_config(manifest["config"])
    ws = int(manifest["world_size"])
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(directory / "part_model" / str(r) / "model.safetensors"), framework="pt"))
                   for r in range(ws)]
        modules: dict[str, list[str]] = {}
        for name in handles[0].keys():
            module, suffix = name.rsplit(".", 1)
            modules.setdefault(module, []).append(suffix)
        for module, suffixes in modules.items():
            if module == "lm_head" and args.tie_word_embeddings:
                continue  # a quantized copy of the tied embedding; transformers ties lm_head itself
            rule = split_rule(module + ".weight")
            ranks = range(ws) if rule is not None and ws > 1 else range(1)
            pieces = []
            for r in ranks:
                h = handles[r]
                if "weight" in suffixes:
                    t = h.get_tensor(module + ".weight").to(dtype)
                else:
                    q = quantmod.QuantLinear.from_state({s: h.get_tensor(f"{module}.{s}") for s in suffixes})
                    t = q.dequantize().to(dtype)
                    del q
                pieces.append(t)
            state[module + ".weight"] = torch.cat(pieces, dim=rule[0]) if len(pieces) > 1 else pieces[0]
            del pieces
    return args, state


def state_from_checkpoint(path: Path, dtype: torch.dtype) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    ckpt = open_checkpoint(path)
    ckpt.validate()
    state = {name: ckpt.read(name).to(dtype) for name in expected_shapes(ckpt.args)}
    ckpt.close()
    return ckpt.args, state


def build_hf_model(source: Path, dtype: torch.dtype, device: str = "cpu"):
    """(transformers LlamaForCausalLM in eval mode, ModelArgs) built in memory from ``source``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args, state = state_from_cut(source, dtype) if is_cut_dir(source) else state_from_checkpoint(source, dtype)
    cfg = LlamaConfig(**args.to_hf_config())
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    result = model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and args.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"transformers model does not match the checkpoint: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers are not in the state dict
    model = model.to(device=device).eval()
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"transformers model left tensors unset: {on_meta[:5]}")
    return model, args


# ---------------------------------------------------------------------- timing
def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def measure_hf(model, prompts: list[list[int]], output_len: int, on_token=None):
    """Like ``bench.measure``: prefill, then ``output_len - 1`` greedy one-token steps."""
    from transformers import DynamicCache

    from .timing import Measurement

    dev = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    kw = _cache_kwarg(model)
    ids = torch.tensor(prompts, dtype=torch.int64)
    B, S = ids.shape
    sync()
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids.to(dev), use_cache=True, logits_to_keep=1, **{kw: cache})
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tok.cpu()  # the tokens are on the host (as tpllama's are), which waits for the device
    t_first = time.perf_counter()
    if on_token is not None:
        for _ in range(B):
            on_token()
    steps = []
    for _ in range(output_len - 1):
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tok.cpu()
        steps.append(time.perf_counter())
        if on_token is not None:
            for _ in range(B):
                on_token()
    sync()
    t_end = time.perf_counter()
    lat = [b - a for a, b in zip([t_first] + steps[:-1], steps)]
    return Measurement(batch=B, input_len=S, output_len=output_len, prefill_s=t_first - t0, ttft_s=t_first - t0,
                       decode_s=t_end - t_first, decode_steps=output_len - 1, step_latencies_s=lat)


# ---------------------------------------------------------------------- child process
def _child(request: dict) -> dict:
    import transformers
    from tqdm import tqdm

    from .roofline import RssSampler, stream_probe

    threads = int(request["threads"])
    torch.set_num_threads(threads)
    dtype = torch_dtype(request["dtype"])
    device = request["device"]
    t0 = time.perf_counter()
    model, _args = build_hf_model(Path(request["source"]), dtype, device)
    load_s = time.perf_counter() - t0
    prompts = request["prompts"]
    out_len = int(request["output_len"])
    warmup, repeat = int(request["warmup"]), int(request["repeat"])
    B = len(prompts)
    bar = tqdm(total=(warmup + repeat) * out_len * B, desc="transformers", unit="tok", file=sys.stderr,
               disable=not request.get("progress", True), leave=False)
    runs = []
    with RssSampler({0: os.getpid()}) as sampler:
        for i in range(warmup + repeat):
            bar.set_description(f"transformers {'warm-up' if i < warmup else f'{i - warmup + 1}/{repeat}'}")
            m = measure_hf(model, prompts, out_len, on_token=lambda: bar.update(1))
            if i >= warmup:
                runs.append(dataclasses.asdict(m))
    memory = sampler.report()  # before the probe allocates its buffer
    bar.close()
    probe = None
    if request.get("probe_bytes"):
        probe = stream_probe(threads, int(request["probe_bytes"]), device=device)
    return {
        "measurements": runs,
        "memory": memory,
        "probe": probe,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "transformers_version": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "device": device,
        "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
    }


def run_hf(source: Path, dtype: torch.dtype, device: str, threads: int, prompts: list[list[int]], output_len: int,
           warmup: int, repeat: int, probe_bytes: int, progress: bool = True) -> dict:
    """Run the transformers measurement in a child process; returns its result dict."""
    request = {"source": str(source), "dtype": str(dtype).removeprefix("torch."), "device": device, "threads": threads,
               "prompts": prompts, "output_len": output_len, "warmup": warmup, "repeat": repeat,
               "probe_bytes": probe_bytes, "progress": progress}
    with tempfile.TemporaryDirectory(prefix="tpllama-bench-hf-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        req.write_text(json.dumps(request))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run([sys.executable, "-m", "tpllama.bench.hf", str(req), str(res)], env=env)
        if proc.returncode != 0 or not res.is_file():
            raise RuntimeError(f"the transformers comparison failed (child exited with code {proc.returncode}; "
                               f"its error is printed above)")
        return json.loads(res.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    result = _child(request)
    out = Path(argv[1])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
