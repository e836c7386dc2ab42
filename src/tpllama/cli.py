"""``tpllama cut | run | generate | chat | bench | serve``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .flags import add_model_args, add_sampling_args, engine_config, sampling_kwargs
from .version import __version__

EXIT_BAD_INPUT = 2
EXIT_RANK_FAILURE = 1


def open_engine(a: argparse.Namespace, progress: bool = True, **extra):
    """The engine of a command's flags. Ranks 1..N-1 are started first, so that they import
    torch while this process does (``parallel.early``)."""
    from .parallel.early import EarlyWorkers

    cfg = engine_config(a, progress=progress, **extra)
    early = EarlyWorkers.for_config(cfg)  # should this process fail first, they see their stdin close and exit
    from .engine.load import start

    return start(cfg, early)


# ---------------------------------------------------------------------- cut
def add_cut_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="HF directory, .gguf file, or a cut directory (re-cut without the original)")
    p.add_argument("--output", required=True, help="directory to write (DIR/part_model/<rank>/, DIR/manifest.json)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32; a re-cut keeps its source's)")
    p.add_argument("--quant", default=None,
                   help="none | auto | int8 | int4 (default none: float parts; a re-cut keeps its source's)")
    p.add_argument("--shares", default=None, help="relative speed of each rank, e.g. 3,1 (default equal)")


def cmd_cut(a: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .weights.parts import cut, is_cut_dir, read_manifest, share_from_json

    if a.shares == "auto":
        raise ValueError("--shares auto measures the hosts the ranks run on, so it works at start (run, serve, "
                         "bench under torchrun), not in cut: give the numbers (tpllama probe prints them)")
    source = Path(a.input).expanduser()
    cfg = EngineConfig(model=a.input, world_size=a.world_size, dtype=a.dtype or "float32", quant=a.quant,
                       shares=a.shares).validate()
    t0 = time.perf_counter()
    if is_cut_dir(source):
        from .weights.recut import recut

        manifest = read_manifest(source)
        for flag, asked, have in (("--dtype", a.dtype, manifest["dtype"]), ("--quant", a.quant, manifest["quant"])):
            if asked is not None and asked != have:
                raise ValueError(f"{flag} {asked}: {source} holds {have} parts, and a re-cut keeps them as they are; "
                                 f"cut the original checkpoint for another {flag[2:]}")
        out = recut(source, a.output, a.world_size, cfg.shares, progress=True)
    else:
        out = cut(source, a.output, a.world_size, dtype=cfg.torch_dtype, quant=cfg.quant, progress=True,
                  proportions=cfg.shares)
    manifest = json.loads((out / "manifest.json").read_text())
    for r in manifest["ranks"]:
        print(share_from_json(r).describe())
    print(f"wrote {out} ({a.world_size} parts) in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------- run (the seed's job)
def add_run_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default_world_size=2)
    p.add_argument("--prompts", default=None, help="questions, one per line or JSONL with a 'prompt' field (default: 16 packaged)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap (default 96)")
    p.add_argument("--input-len", type=int, default=1024, help="performance row: prompt tokens (default 1024)")
    p.add_argument("--output-len", type=int, default=1024, help="performance row: generated tokens (default 1024)")
    p.add_argument("--no-perf", action="store_true", help="skip the performance table")


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        from importlib import resources

        text = resources.files("tpllama").joinpath("data/questions.txt").read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise ValueError(f"prompts file {p} does not exist")
    prompts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                prompts.append(str(obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{p}:{n}: a JSONL line needs a 'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompts")
    return prompts


def cmd_run(a: argparse.Namespace) -> int:
    from .bench.timing import hardware_name, measure, seed_table

    prompts = read_prompts(a.prompts)
    for name in ("max_new_tokens", "input_len", "output_len"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    with open_engine(a) as engine:
        if engine.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so it cannot answer text questions")
        for s in engine.shares:
            print(s.describe())
        print("warm-up ...", flush=True)
        list(engine.stream(engine.encode_chat([{"role": "user", "content": "Hello!"}]), max_new_tokens=8))
        for i, q in enumerate(prompts, 1):
            print(f"\n[{i}/{len(prompts)}] Q: {q}\nA: ", end="", flush=True)
            ids = engine.encode_chat([{"role": "user", "content": q}])
            stream_text(engine, ids, a.max_new_tokens)
        if not a.no_perf:
            print(f"\nmeasuring decode speed: 1 x {a.input_len} in, {a.output_len} out ...", flush=True)
            engine.check_length(a.input_len, a.output_len)
            m = measure(engine, a.input_len, a.output_len)
            print()
            print(seed_table(hardware_name(engine), m))
            print(f"\n(time to first token {m.ttft_s * 1000:.0f} ms; decode p50 {m.latency(0.5) * 1000:.1f} ms/token; "
                  f"dtype {engine.info['dtype']}, quant {engine.info['quant']}, KV cache {engine.info['kv_cache']})")
    return 0


def stream_text(engine, ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
    """Print the answer as it is generated (decoding the growing sequence, printing the new suffix)."""
    out: list[int] = []
    shown = ""
    for tok in engine.stream(ids, max_new_tokens=max_new_tokens, **sampling):
        if tok in engine.eos_ids:
            break
        out.append(tok)
        text = engine.tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(flush=True)
    return out


# ---------------------------------------------------------------------- generate / chat
def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_sampling_args(p, max_new_tokens=128)


def cmd_generate(a: argparse.Namespace) -> int:
    with open_engine(a, progress=True) as engine:
        if engine.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: use the Python API with token ids")
        if a.raw or not engine.tokenizer.has_chat_template:
            ids = engine.tokenizer.encode(a.prompt)
        else:
            ids = engine.encode_chat([{"role": "user", "content": a.prompt}])
        stream_text(engine, ids, a.max_new_tokens, **sampling_kwargs(a))
    return 0


def add_chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, max_new_tokens=256)


def cmd_chat(a: argparse.Namespace) -> int:
    with open_engine(a, progress=True) as engine:
        if engine.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer")
        messages = [{"role": "system", "content": a.system}] if a.system else []
        print("chat: empty line or Ctrl-D to quit, /reset to forget the conversation")
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                break
            if not line:
                break
            if line == "/reset":
                messages = messages[:1] if a.system else []
                continue
            messages.append({"role": "user", "content": line})
            ids = engine.encode_chat(messages)
            room = engine.args.max_seq_len - len(ids)
            if room < 1:
                print(f"(conversation is {len(ids)} tokens, the context is {engine.args.max_seq_len}: /reset)")
                messages.pop()
                continue
            out = stream_text(engine, ids, min(a.max_new_tokens, room), **sampling_kwargs(a))
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(out)})
    return 0


# ---------------------------------------------------------------------- dispatch
def _lazy(module: str):
    """(add_arguments, main) of a command living in its own module, imported only when used. The
    module's flags never depend on optional packages; a package missing when the command runs is
    named, with how to install it."""
    import importlib

    def add(p):
        importlib.import_module(f"tpllama.{module}").add_arguments(p)

    def run(a):
        try:
            return importlib.import_module(f"tpllama.{module}").main(a)
        except ModuleNotFoundError as err:
            if err.name is None or err.name.split(".")[0] in ("tpllama", "torch"):
                raise
            raise ValueError(f"`tpllama {a.command}` needs the Python package `{err.name}`, which is not installed "
                             f"here: pip install {err.name}  (or reinstall tpllama with its dependencies)") from None

    return add, run


def commands() -> dict:
    """name -> (help, add_arguments, main). bench and serve live in their own modules."""
    bench_add, bench_main = _lazy("bench.command")
    serve_add, serve_main = _lazy("serve.cli")
    quality_add, quality_main = _lazy("bench.quality")
    probe_add, probe_main = _lazy("bench.probe")
    return {
        "cut": ("cut a checkpoint into N tensor-parallel parts", add_cut_args, cmd_cut),
        "run": ("the seed's job: warm-up, 16 Q&A, performance table", add_run_args, cmd_run),
        "generate": ("generate from one prompt, streaming", add_generate_args, cmd_generate),
        "chat": ("interactive chat", add_chat_args, cmd_chat),
        "bench": ("benchmark: the seed's table, comparisons, memory roofline", bench_add, bench_main),
        "serve": ("OpenAI-compatible HTTP server", serve_add, serve_main),
        "quality": ("greedy-token agreement of quantized weights with float32", quality_add, quality_main),
        "probe": ("measure this host (every host under torchrun) and print the --shares to cut with", probe_add,
                  probe_main),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpllama", description="Tensor-parallel LLaMA inference.")
    parser.add_argument("--version", action="version", version=f"tpllama {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each rank holds and more")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, fn) in commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(fn=fn)
    return parser


def run() -> None:
    """The ``tpllama`` command: ``main``, then leave at once (flushing output) instead of tearing
    the interpreter down, which spends about a second freeing a loaded model's memory and module
    state that nobody waits for. The engine and its ranks are closed by then."""
    import os

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    import logging

    from .config import ConfigError
    from .env import is_rank0
    from .errors import CheckpointError, ModelFetchError, RankFailure, ShardError

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return a.fn(a)
    except (ValueError, CheckpointError, ConfigError, ShardError) as err:
        print(f"tpllama: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelFetchError as err:
        print(f"tpllama: error: {err}", file=sys.stderr)
        return EXIT_RANK_FAILURE
    except RankFailure as err:
        if is_rank0():
            print(f"tpllama: rank failure: {err}", file=sys.stderr)
        return EXIT_RANK_FAILURE
    except KeyboardInterrupt:
        return 130
