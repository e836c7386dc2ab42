"""``tpllama.load``: from settings to a running engine, the same way on every rank.

``start(config)``: rank 0 resolves what the ranks load (the cut, made into the cache first if
needed) before any rank starts, launches the ranks (``parallel.launch``: one rank, spawned ranks or
torchrun's), then every rank runs ``run_rank``: load its part, agree with the others that every
rank loaded, and either follow rank 0 (ranks 1..N-1, until rank 0 closes the engine) or return
the ``Engine`` (rank 0). Spawned ranks enter at ``run_rank`` too (``parallel.worker``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch

from ..config import DEFAULT_TIMEOUT_S, EngineConfig, torch_dtype
from ..env import torchrun_env
from ..parallel.comm import Communicator, RankFailure
from ..parallel.early import EarlyWorkers
from ..parallel.launch import check_device, launch, threads_per_rank
from ..parallel.probe import measured_shares
from ..weights.checkpoint import CheckpointError
from ..weights.ship import ship_parts
from ..weights.source import rank_weights, tokenizer_for, with_parts
from ..weights.stored import assemble, blocks_quantized
from .engine import Engine
from .runner import ModelRunner, follow

log = logging.getLogger("tpllama")


def load(
    path: str | os.PathLike | None = None,
    world_size: int = 1,
    dtype: str | torch.dtype = "float32",
    quant: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    kv_cache: str = "auto",
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    shares=None,
) -> Engine:
    """Load a model on ``world_size`` ranks and return the engine (on rank 0).

    ``path``: an HF directory, a .gguf file, a directory written by ``tpllama cut``, or None for
    the default model. With world_size > 1 and an uncut checkpoint, it is cut into the cache
    first (once). Ranks 1..N-1 are started as child processes, unless this process was
    started by torchrun: then every process calls ``load``, ranks 1..N-1 serve rank 0 inside
    it and exit when rank 0 closes its engine. ``kv_cache``: auto | float32 | float16, the KV
    cache's element type (auto: float16 for quantized float32 models on the CPU, else ``dtype``).
    ``max_batch``: sequences decoded together (None: every prompt of a call); ``max_seq_len``: a
    cap on tokens per sequence (None: the model's context); ``shares``: the ranks' relative speeds
    for the split ("3,1", [3, 1] or "auto"; None: equal). See ``config.EngineConfig``.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    cfg = EngineConfig(model=None if path is None else os.fspath(path), world_size=world_size, dtype=dtype, quant=quant,
                       kv_cache=kv_cache, device=device, threads=threads, timeout_s=timeout_s, progress=progress,
                       max_batch=max_batch, max_seq_len=max_seq_len, shares=shares)
    return start(cfg.validate())


def start(cfg: EngineConfig, early: EarlyWorkers | None = None) -> Engine:
    """See the module docstring. ``cfg`` is validated. ``early``: ranks 1..N-1 the command already
    started (``parallel.early``); they are used if ``cfg`` turns out to need them, else stopped."""
    try:
        check_device(cfg.device, cfg.world_size)
        torchrun = torchrun_env() is not None
        if cfg.shares == "auto" and not torchrun:  # every rank on this host: the same speed
            cfg = dataclasses.replace(cfg, shares=None)
        if not torchrun:  # before any rank starts: bad input is reported here, not as a rank failure
            cfg = with_parts(cfg)
        comm, workers = launch(cfg, early)
    finally:
        if early is not None:
            early.close()  # the ones launch did not take
    if torchrun:  # rank 0 cuts (once, into the cache); the others wait for it, then get their parts
        if cfg.shares == "auto":  # every host measures itself; the split follows
            cfg = dataclasses.replace(cfg, shares=measured_shares(comm, threads_per_rank(cfg)))
        cfg = comm.broadcast_object(with_parts(cfg) if comm.rank == 0 else None)
        cfg = ship_parts(cfg, comm, cfg.progress)
    return run_rank(cfg, comm, workers)


def run_rank(cfg: EngineConfig, comm: Communicator, workers=None) -> Engine:
    """Load this rank's part; rank 0 returns the engine, the others follow rank 0 and exit."""
    model, shares, args, err = _load_model(cfg, comm)
    _agree_loaded(comm, err, workers)
    if comm.rank != 0:
        follow(model, comm)
        comm.close()
        raise SystemExit(0)
    kv_dtype = kv_dtype_for(model, cfg.kv_cache)
    launcher = "torchrun" if torchrun_env() is not None else ("tpllama" if workers is not None else "in-process")
    info = {"path": cfg.model, "parts": cfg.parts, "dtype": cfg.dtype, "quant": cfg.quant or "none",
            "threads_per_rank": threads_per_rank(cfg), "device": str(comm.device), "backend": comm.backend,
            "launcher": launcher, "kv_cache": str(kv_dtype).removeprefix("torch.")}
    for s in shares:
        log.info(s.describe())
    return Engine(cfg, args, ModelRunner(model, comm, kv_dtype), tokenizer_for(cfg), shares, comm, workers, info)


def kv_dtype_for(model, choice: str) -> torch.dtype:
    """The KV cache element type for ``choice``. ``auto``: float16 for a float32 model on the CPU
    whose blocks are quantized (the decode kernels read float16 keys and values at half the
    bytes, as llama.cpp's default cache does), else the model's dtype."""
    dtype = model.norm.weight.dtype
    if choice == "auto":
        fast = dtype == torch.float32 and model.norm.weight.is_cpu and blocks_quantized(model)
        return torch.float16 if fast else dtype
    return torch_dtype(choice)


def _load_model(cfg: EngineConfig, comm: Communicator):
    """This rank's model; returns (model, every rank's share, args, the error or None)."""
    try:
        args, shares, tensors = rank_weights(cfg, comm.rank)
        model = assemble(args, shares[comm.rank], tensors, cfg.torch_dtype, comm.device, comm.all_reduce,
                         comm.gather_vocab([s.vocab_rows for s in shares]))
        _prepare_kernels(model)
        return model, shares, args, None
    except Exception as err:  # reported to every rank below
        return None, None, None, err


def _prepare_kernels(model) -> None:
    """Build (first use, about a minute) or load the CPU kernels now, while loading, rather than in
    the first decode step: there, one rank building while the other waits in an all-reduce would
    run into the compute timeout."""
    if model.norm.weight.is_cpu:
        from .. import kernels

        kernels.get()


def _agree_loaded(comm: Communicator, err: Exception | None, workers) -> None:
    """Every rank says whether it loaded; all raise if any failed (on the long-timeout group).
    Rank 0 raises its own error as it is, or names the first rank that failed."""
    said = None if err is None else f"rank {comm.rank}: {type(err).__name__}: {err}"
    failed = [e for e in comm.all_gather_object(said) if e]
    if not failed:
        return
    if comm.rank != 0:
        if err is not None:
            print(f"tpllama: {said}", file=sys.stderr)
        comm.close()
        raise SystemExit(1)
    if workers is not None:
        workers.kill()
    comm.close()
    if err is not None:
        raise err
    first = failed[0]
    raise (CheckpointError(first) if "CheckpointError" in first else RankFailure(first))
