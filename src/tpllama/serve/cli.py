"""``tpllama serve``: its flags and their checks. Imports nothing heavy, so ``tpllama serve --help``
and a clear message for a missing package work even where the server's packages do not."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..flags import add_model_args

    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all but /health)")
    g.add_argument("--max-batch", type=int, default=8, help="KV-cache slots = requests decoded together (default 8)")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per request, prompt + output (default: the model's context, at most 4096)")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file's name)")


def main(a: argparse.Namespace) -> int:
    for name, lo in (("max_batch", 1), ("max_queue", 0), ("port", 0)):
        v = getattr(a, name)
        if v < lo or (name == "port" and v > 65535):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {a.max_seq_len}")
    from ..flags import engine_config
    from ..parallel.early import EarlyWorkers

    cfg = engine_config(a, max_batch=a.max_batch, max_seq_len=a.max_seq_len or 4096)
    early = EarlyWorkers.for_config(cfg)  # they import torch while this process imports the web stack
    from .app import run_server

    return run_server(a, cfg, early)
