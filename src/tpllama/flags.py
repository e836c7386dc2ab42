"""The command line's shared flags, and the one place they become an ``EngineConfig``."""

from __future__ import annotations

import argparse

from .config import DEFAULT_TIMEOUT_S, EngineConfig


def add_model_args(p: argparse.ArgumentParser, default_world_size: int = 1) -> None:
    g = p.add_argument_group("model and ranks")
    g.add_argument("--model", default=None, help="HF directory, .gguf file or cut directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--world-size", type=int, default=None,
                   help=f"number of tensor-parallel ranks (default {default_world_size}; under torchrun: its WORLD_SIZE)")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    g.add_argument("--quant", default="auto",
                   help="weights: auto (keep a GGUF file's own Q8_0/Q4_0/Q4_1 blocks, others float; the default) | "
                        "none (all float) | int8 | int4")
    g.add_argument("--kv-cache", default="auto",
                   help="KV cache element type: auto (float16 for quantized weights on the CPU, else --dtype; the "
                        "default) | float32 | float16")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds before a stuck rank is declared dead (default {DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--iface", default=None,
                   help="network interface of this host's ranks (default: the one that routes to MASTER_ADDR; "
                        "GLOO_SOCKET_IFNAME wins when set)")
    g.add_argument("--shares", default=None,
                   help="relative speed of each rank, e.g. 3,1: the split gives each rank that proportion of the "
                        "weights (default equal); auto: every host measures itself at start (tpllama probe)")
    g.add_argument("--collectives", default="auto",
                   help="auto (shared memory inside a host, TCP between hosts; the default) | gloo")
    p.set_defaults(default_world_size=default_world_size)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=tuple(a.stop))


def world_size_of(a: argparse.Namespace) -> int:
    """``--world-size``, else torchrun's WORLD_SIZE, else the command's default."""
    from .env import torchrun_env

    if a.world_size is not None:
        return a.world_size
    tr = torchrun_env()
    return tr.world_size if tr is not None else a.default_world_size


def engine_config(a: argparse.Namespace, progress: bool = True, **extra) -> EngineConfig:
    """The validated engine settings of a command's flags (``extra``: fields the command sets)."""
    return EngineConfig(model=a.model, world_size=world_size_of(a), dtype=a.dtype, quant=a.quant, kv_cache=a.kv_cache,
                        device=a.device, threads=a.threads, timeout_s=a.timeout, iface=a.iface,
                        collectives=a.collectives, shares=a.shares, progress=progress, **extra).validate()
